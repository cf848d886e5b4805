/* edgecloud: a batch-invariant float32 matrix product for packed decode steps (partition/rowkernel.py).

   y (R, N) = x (R, K) times w (N, K) transposed. Every y[r, n] is summed in one order, whatever
   R, N, the block it falls in or the thread count: lane i of one vector accumulator takes the
   terms k = i mod LANES in increasing k (fused multiply-adds), the lanes are then added in a fixed
   tree, and the last K mod LANES terms one by one. The blocks (RB rows by four weight rows, one
   row by four, one by one) only decide which products share a load, so a row's result does not
   depend on what else is in the call: batching cannot change it. Built with -ffp-contract=off so
   that the compiler fuses nothing the source does not. Each block's first pass over its weights
   also fetches the next block's into the cache, so streaming them overlaps the arithmetic (the
   products are bound by memory alone, by arithmetic at eight rows). With AVX-512 the vectors hold 16 lanes,
   else 8 (AVX2): one machine always computes one way. */
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define RB 4
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
static inline float hsum(vec v) {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum8(_mm256_add_ps(lo, hi));
}
#else
typedef __m256 vec;
#define LANES 8
#define RB 2
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float hsum(vec v) { return hsum8(v); }
#endif

static inline float finish(vec acc, const float *x, const float *w, long k0, long K) {
    float s = hsum(acc);
    for (long k = k0; k < K; k++) s += x[k] * w[k];
    return s;
}

void rowdot(const float *x, const float *w, float *y, long R, long K, long N, int threads) {
    const long KV = K - K % LANES;
    const long NB = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < NB; b++) {
        const long n0 = b * 4;
        const long nn = N - n0 < 4 ? N - n0 : 4;
        const float *w0 = w + n0 * K;
        if (nn == 4) {
            const float *wr[4] = {w0, w0 + K, w0 + 2 * K, w0 + 3 * K};
            long r = 0;
            for (; r + RB <= R; r += RB) {
                vec acc[RB][4];
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec u[4];
                    for (int j = 0; j < 4; j++) u[j] = VLOAD(wr[j] + k);
                    if (r == 0 && b + 1 < NB)  /* the next block's weights, while these compute */
                        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(wr[j] + 4 * K + k), _MM_HINT_T0);
                    for (int i = 0; i < RB; i++) {
                        vec v = VLOAD(x + (r + i) * K + k);
                        for (int j = 0; j < 4; j++) acc[i][j] = VFMA(v, u[j], acc[i][j]);
                    }
                }
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < 4; j++)
                        y[(r + i) * N + n0 + j] = finish(acc[i][j], x + (r + i) * K, wr[j], KV, K);
            }
            for (; r < R; r++) {
                const float *xr = x + r * K;
                vec acc[4];
                for (int j = 0; j < 4; j++) acc[j] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec v = VLOAD(xr + k);
                    for (int j = 0; j < 4; j++) acc[j] = VFMA(v, VLOAD(wr[j] + k), acc[j]);
                    if (r == 0 && b + 1 < NB)
                        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(wr[j] + 4 * K + k), _MM_HINT_T0);
                }
                for (int j = 0; j < 4; j++) y[r * N + n0 + j] = finish(acc[j], xr, wr[j], KV, K);
            }
        } else {
            for (long j = 0; j < nn; j++) {
                const float *wj = w0 + j * K;
                for (long r = 0; r < R; r++) {
                    const float *xr = x + r * K;
                    vec a = VZERO();
                    for (long k = 0; k < KV; k += LANES) a = VFMA(VLOAD(xr + k), VLOAD(wj + k), a);
                    y[r * N + n0 + j] = finish(a, xr, wj, KV, K);
                }
            }
        }
    }
}

/* rowdot_i8: the same product with int8 weights, one float scale per weight row (weight-only
   quantization, partition/quantize.py): y[r, n] = scale[n] * sum_k x[r, k] * w[n, k]. Each
   weight is widened to float as it is loaded, so the products stream a quarter of the bytes;
   the sums keep rowdot's fixed order, so rows stay independent of each other here too. */
#ifdef __AVX512F__
#define VLOAD8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#else
#define VLOAD8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#endif

static inline float finish8(vec acc, const float *x, const signed char *w, long k0, long K) {
    float s = hsum(acc);
    for (long k = k0; k < K; k++) s += x[k] * (float)w[k];
    return s;
}

void rowdot_i8(const float *x, const signed char *w, const float *scale, float *y, long R, long K, long N,
               int threads) {
    const long KV = K - K % LANES;
    const long NB = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < NB; b++) {
        const long n0 = b * 4;
        const long nn = N - n0 < 4 ? N - n0 : 4;
        const signed char *w0 = w + n0 * K;
        if (nn == 4) {
            const signed char *wr[4] = {w0, w0 + K, w0 + 2 * K, w0 + 3 * K};
            long r = 0;
            for (; r + RB <= R; r += RB) {
                vec acc[RB][4];
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec u[4];
                    for (int j = 0; j < 4; j++) u[j] = VLOAD8(wr[j] + k);
                    if (r == 0 && b + 1 < NB && k % 64 == 0)
                        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(wr[j] + 4 * K + k), _MM_HINT_T0);
                    for (int i = 0; i < RB; i++) {
                        vec v = VLOAD(x + (r + i) * K + k);
                        for (int j = 0; j < 4; j++) acc[i][j] = VFMA(v, u[j], acc[i][j]);
                    }
                }
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < 4; j++)
                        y[(r + i) * N + n0 + j] = scale[n0 + j] * finish8(acc[i][j], x + (r + i) * K, wr[j], KV, K);
            }
            for (; r < R; r++) {
                const float *xr = x + r * K;
                vec acc[4];
                for (int j = 0; j < 4; j++) acc[j] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec v = VLOAD(xr + k);
                    for (int j = 0; j < 4; j++) acc[j] = VFMA(v, VLOAD8(wr[j] + k), acc[j]);
                    if (r == 0 && b + 1 < NB && k % 64 == 0)
                        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(wr[j] + 4 * K + k), _MM_HINT_T0);
                }
                for (int j = 0; j < 4; j++) y[r * N + n0 + j] = scale[n0 + j] * finish8(acc[j], xr, wr[j], KV, K);
            }
        } else {
            for (long j = 0; j < nn; j++) {
                const signed char *wj = w0 + j * K;
                for (long r = 0; r < R; r++) {
                    const float *xr = x + r * K;
                    vec a = VZERO();
                    for (long k = 0; k < KV; k += LANES) a = VFMA(VLOAD(xr + k), VLOAD8(wj + k), a);
                    y[r * N + n0 + j] = scale[n0 + j] * finish8(a, xr, wj, KV, K);
                }
            }
        }
    }
}
