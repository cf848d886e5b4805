/* Would integer dot products (AVX-512 VNNI) make the worker's eight-row Q4_1 products faster?
   A stand-alone prototype, one core, weights in cache: SmolLM2's gate/up shape (3072 x 576 Q4_1
   blocks) times eight rows, three ways, best of 200:

   - float: the row kernel's way (partition/data/rowdot.c, the eight-row block): each weight
     widened to float once, d * q + m, then one fused multiply-add per row, exact;
   - vnni256: each row's activations quantized to int8 per 32 (a scale dx and the sum of its q, as
     llama.cpp's Q8_1), then per block and row one _mm256_dpbusd_epi32 (32 products), its int32
     sums converted and scaled by d * dx, plus m * dx * sum(qx);
   - vnni512: the same on two blocks per _mm512_dpbusd_epi32.

   Each block has its own scale, so every 32 integer products need a conversion and a scaled add
   per row: the float path's two 16-lane multiply-adds per 32 products are not beaten by much.

       gcc -O3 -mavx2 -mfma -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx512vnni \
           bench/proto_q41_int8_activations.c -o /tmp/q41_int8 -lm && /tmp/q41_int8

   (BENCHMARKS.md, "Where a worker's CPU goes at eight sessions".) */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K 576
#define N 3072
#define R 8
#define NBK (K / 32)

typedef struct {
    float d, m;
    unsigned char q[16];  /* weights 0..15 in the low halves, 16..31 in the high halves */
} block;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void halves(const block *b, __m128i *lo, __m128i *hi) {
    const __m128i q = _mm_loadu_si128((const __m128i *)b->q), mask = _mm_set1_epi8(15);
    *lo = _mm_and_si128(q, mask);
    *hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
}

static void float_path(const float *x, const block *w, float *y) {
    for (long n = 0; n < N; n += 2) {
        __m512 acc[R][2];
        for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (long b = 0; b < NBK; b++) {
            __m512 u[2][2];
            for (int j = 0; j < 2; j++) {
                const block *B = &w[(n + j) * NBK + b];
                __m128i lo, hi;
                halves(B, &lo, &hi);
                const __m512 d = _mm512_set1_ps(B->d), m = _mm512_set1_ps(B->m);
                u[j][0] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), m);
                u[j][1] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), m);
            }
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < R; i++) {
                    const __m512 v = _mm512_loadu_ps(x + i * K + b * 32 + h * 16);
                    acc[i][0] = _mm512_fmadd_ps(v, u[0][h], acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(v, u[1][h], acc[i][1]);
                }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < 2; j++) y[i * N + n + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
}

/* qx: int8 activations; dx: their scale per block; sdx: dx * sum(qx) per block. */
static void quantize(const float *x, signed char *qx, float *dx, float *sdx) {
    for (int i = 0; i < R; i++)
        for (int b = 0; b < NBK; b++) {
            const float *xb = x + i * K + b * 32;
            float top = 0;
            for (int k = 0; k < 32; k++) top = fmaxf(top, fabsf(xb[k]));
            const float d = top / 127, inv = d ? 1 / d : 0;
            int sum = 0;
            for (int k = 0; k < 32; k++) sum += qx[i * K + b * 32 + k] = (signed char)lrintf(xb[k] * inv);
            dx[i * NBK + b] = d;
            sdx[i * NBK + b] = d * sum;
        }
}

static void vnni256(const signed char *qx, const float *dx, const float *sdx, const block *w, float *y) {
    for (long n = 0; n < N; n += 2) {
        __m256 acc[R][2];
        float am[R][2] = {{0}};
        for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (long b = 0; b < NBK; b++) {
            __m256i u[2];
            float dw[2], mw[2];
            for (int j = 0; j < 2; j++) {
                const block *B = &w[(n + j) * NBK + b];
                __m128i lo, hi;
                halves(B, &lo, &hi);
                u[j] = _mm256_set_m128i(hi, lo);
                dw[j] = B->d;
                mw[j] = B->m;
            }
            for (int i = 0; i < R; i++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qx + i * K + b * 32));
                const float s = dx[i * NBK + b], sm = sdx[i * NBK + b];
                for (int j = 0; j < 2; j++) {
                    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u[j], v);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw[j] * s), acc[i][j]);
                    am[i][j] += mw[j] * sm;
                }
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < 2; j++)
                y[i * N + n + j] = _mm512_reduce_add_ps(_mm512_castps256_ps512(acc[i][j])) + am[i][j];
    }
}

static void vnni512(const signed char *qx, const float *dx, const float *sdx, const block *w, float *y) {
    for (long n = 0; n < N; n += 2) {
        __m512 acc[R][2];
        float am[R][2] = {{0}};
        for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (long b = 0; b < NBK; b += 2) {
            __m512i u[2];
            __m512 dw[2];
            float mw[2][2];
            for (int j = 0; j < 2; j++) {
                const block *B0 = &w[(n + j) * NBK + b], *B1 = B0 + 1;
                __m128i lo0, hi0, lo1, hi1;
                halves(B0, &lo0, &hi0);
                halves(B1, &lo1, &hi1);
                u[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(hi0, lo0)),
                                          _mm256_set_m128i(hi1, lo1), 1);
                dw[j] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(B0->d)), _mm256_set1_ps(B1->d), 1);
                mw[j][0] = B0->m;
                mw[j][1] = B1->m;
            }
            for (int i = 0; i < R; i++) {
                const __m512i v = _mm512_loadu_si512((const void *)(qx + i * K + b * 32));
                const __m512 s = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(dx[i * NBK + b])),
                                                    _mm256_set1_ps(dx[i * NBK + b + 1]), 1);
                for (int j = 0; j < 2; j++) {
                    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[j], v);
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw[j], s), acc[i][j]);
                    am[i][j] += mw[j][0] * sdx[i * NBK + b] + mw[j][1] * sdx[i * NBK + b + 1];
                }
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < 2; j++) y[i * N + n + j] = _mm512_reduce_add_ps(acc[i][j]) + am[i][j];
    }
}

static double max_diff(const float *a, const float *b) {
    double top = 0;
    for (long i = 0; i < R * N; i++) top = fmax(top, fabs((double)a[i] - b[i]));
    return top;
}

int main(void) {
    block *w = malloc(sizeof(block) * N * NBK);
    float *x = malloc(sizeof(float) * R * K), *y[3], *dx = malloc(sizeof(float) * R * NBK),
          *sdx = malloc(sizeof(float) * R * NBK);
    signed char *qx = malloc(R * K);
    for (int i = 0; i < 3; i++) y[i] = malloc(sizeof(float) * R * N);
    srand(1);
    for (long i = 0; i < N * NBK; i++) {
        w[i].d = 0.0001f * (rand() % 100 + 1);
        w[i].m = -0.0008f * (rand() % 100);
        for (int j = 0; j < 16; j++) w[i].q[j] = rand() & 255;
    }
    for (long i = 0; i < R * K; i++) x[i] = (rand() % 2000 - 1000) / 1000.0f;
    double best[4] = {1e9, 1e9, 1e9, 1e9};  /* float, quantize, vnni256, vnni512 */
    for (int rep = 0; rep < 200; rep++) {
        double t[5];
        t[0] = now();
        float_path(x, w, y[0]);
        t[1] = now();
        quantize(x, qx, dx, sdx);
        t[2] = now();
        vnni256(qx, dx, sdx, w, y[1]);
        t[3] = now();
        vnni512(qx, dx, sdx, w, y[2]);
        t[4] = now();
        for (int i = 0; i < 4; i++) best[i] = fmin(best[i], t[i + 1] - t[i]);
    }
    const double macs = (double)R * N * K;
    printf("float   %7.1f us (%.1f G multiply-adds/s)\n", best[0] * 1e6, macs / best[0] / 1e9);
    printf("vnni256 %7.1f us + quantizing %.1f us: %.2fx the float path's speed, max difference %.3g\n",
           best[2] * 1e6, best[1] * 1e6, best[0] / (best[1] + best[2]), max_diff(y[0], y[1]));
    printf("vnni512 %7.1f us + quantizing %.1f us: %.2fx the float path's speed, max difference %.3g\n",
           best[3] * 1e6, best[1] * 1e6, best[0] / (best[1] + best[3]), max_diff(y[0], y[2]));
    return 0;
}
