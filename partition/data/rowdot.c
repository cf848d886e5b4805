/* edgecloud: a batch-invariant float32 matrix product for packed decode steps (partition/rowkernel.py),
   and its twin with int8 weights (rowdot_i8, below).

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

/* Weights are float32 (rowdot) or int8 with a float scale per weight row (rowdot_i8: weight-only
   quantization, partition/quantize.py; y[r, n] = scale[n] * sum_k x[r, k] * w[n, k]). One body
   serves both: it is inlined into each with q8 a constant, so each gets its own loads. An int8
   weight is widened to float as it is loaded, so its products stream a quarter of the bytes; the
   sums keep the same fixed order, so rows stay independent of each other in both. */
#ifdef __AVX512F__
#define VLOAD8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#else
#define VLOAD8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#endif

static inline __attribute__((always_inline)) vec wload(const char *w, long k, int q8) {
    return q8 ? VLOAD8((const signed char *)w + k) : VLOAD((const float *)w + k);
}

static inline __attribute__((always_inline)) float weight(const char *w, long k, int q8) {
    return q8 ? (float)((const signed char *)w)[k] : ((const float *)w)[k];
}

static inline __attribute__((always_inline)) float finish(vec acc, const float *x, const char *w, long k0,
                                                          long K, int q8) {
    float s = hsum(acc);
    for (long k = k0; k < K; k++) s += x[k] * weight(w, k, q8);
    return s;
}

static inline __attribute__((always_inline)) void rowdot_any(const float *x, const char *w, const float *scale,
                                                             float *y, long R, long K, long N, int threads,
                                                             const int q8) {
    const long KV = K - K % LANES;
    const long NB = (N + 3) / 4;
    const long WB = q8 ? 1 : 4;  /* bytes per weight */
    const long ROW = K * WB;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < NB; b++) {
        const long n0 = b * 4;
        const long nn = N - n0 < 4 ? N - n0 : 4;
        const char *w0 = w + n0 * ROW;
        float sc[4];
        for (int j = 0; j < 4; j++) sc[j] = q8 && j < nn ? scale[n0 + j] : 1.0f;
        if (nn == 4) {
            const char *wr[4] = {w0, w0 + ROW, w0 + 2 * ROW, w0 + 3 * ROW};
            long r = 0;
            for (; r + RB <= R; r += RB) {
                vec acc[RB][4];
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec u[4];
                    for (int j = 0; j < 4; j++) u[j] = wload(wr[j], k, q8);
                    if (r == 0 && b + 1 < NB && (k * WB) % 64 == 0)  /* the next block's weights, a line at a time */
                        for (int j = 0; j < 4; j++) _mm_prefetch(wr[j] + 4 * ROW + k * WB, _MM_HINT_T0);
                    for (int i = 0; i < RB; i++) {
                        vec v = VLOAD(x + (r + i) * K + k);
                        for (int j = 0; j < 4; j++) acc[i][j] = VFMA(v, u[j], acc[i][j]);
                    }
                }
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < 4; j++) {
                        float s = finish(acc[i][j], x + (r + i) * K, wr[j], KV, K, q8);
                        y[(r + i) * N + n0 + j] = q8 ? sc[j] * s : s;
                    }
            }
            for (; r < R; r++) {
                const float *xr = x + r * K;
                vec acc[4];
                for (int j = 0; j < 4; j++) acc[j] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec v = VLOAD(xr + k);
                    for (int j = 0; j < 4; j++) acc[j] = VFMA(v, wload(wr[j], k, q8), acc[j]);
                    if (r == 0 && b + 1 < NB && (k * WB) % 64 == 0)
                        for (int j = 0; j < 4; j++) _mm_prefetch(wr[j] + 4 * ROW + k * WB, _MM_HINT_T0);
                }
                for (int j = 0; j < 4; j++) {
                    float s = finish(acc[j], xr, wr[j], KV, K, q8);
                    y[r * N + n0 + j] = q8 ? sc[j] * s : s;
                }
            }
        } else {
            for (long j = 0; j < nn; j++) {
                const char *wj = w0 + j * ROW;
                for (long r = 0; r < R; r++) {
                    const float *xr = x + r * K;
                    vec a = VZERO();
                    for (long k = 0; k < KV; k += LANES) a = VFMA(VLOAD(xr + k), wload(wj, k, q8), a);
                    float s = finish(a, xr, wj, KV, K, q8);
                    y[r * N + n0 + j] = q8 ? sc[j] * s : s;
                }
            }
        }
    }
}

void rowdot(const float *x, const float *w, float *y, long R, long K, long N, int threads) {
    rowdot_any(x, (const char *)w, 0, y, R, K, N, threads, 0);
}

void rowdot_i8(const float *x, const signed char *w, const float *scale, float *y, long R, long K, long N,
               int threads) {
    rowdot_any(x, (const char *)w, scale, y, R, K, N, threads, 1);
}
