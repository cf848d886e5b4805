/* edgecloud: a batch-invariant float32 matrix product for packed decode steps (partition/rowkernel.py),
   and its twins with int8 weights (rowdot_i8) and with GGUF's Q4_1 blocks (rowdot_q41), below.

   y (R, N) = x (R, K) times w (N, K) transposed. Every y[r, n] is summed in one order, whatever
   R, N, the block it falls in or the thread count: lane i of one vector accumulator takes the
   terms k = i mod LANES in increasing k (fused multiply-adds), the lanes are then added in a fixed
   tree, and the last K mod LANES terms one by one. The blocks (six or eight rows, RB rows, two
   rows, one row, by four or two weight rows, and one by one; rows padded with zeros to fill a
   block) only decide which products share a load, so a row's result does not depend on what
   else is in the call: batching cannot change it. Built with -ffp-contract=off so
   that the compiler fuses nothing the source does not. Each block's first pass over its weights
   also fetches the next block's into the cache, so streaming them overlaps the arithmetic (the
   products are bound by memory alone, by arithmetic and loads at eight rows). With AVX-512 the
   vectors hold 16 lanes, else 8 (AVX2): one machine always computes one way. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

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

/* Weights are float32 (rowdot, mode F32), int8 with a float scale per weight row (rowdot_i8, mode
   I8: weight-only quantization, partition/quantize.py; y[r, n] = scale[n] * sum_k x[r, k] * w[n, k])
   or GGUF's Q4_1 blocks (rowdot_q41, mode Q41: each 32 weights of a row are 24 bytes, a scale d
   and a minimum m, float32 here (float16 in the file: widened once when loaded, exactly), and 32
   four-bit q, the first 16 in the low halves of 16 bytes, the next 16 in the high halves; a
   weight is d * q + m). One body serves all three: it is inlined
   into each with the mode a constant, so each gets its own loads. A weight is widened to float as
   it is loaded, so the products stream a quarter (int8) or a sixth (Q4_1) of float32's bytes; the
   sums keep the same fixed order, so rows stay independent of each other in all three. A Q4_1
   weight is d * q rounded, plus m rounded (two operations, not fused), as GGUF's own
   dequantization computes it in float32: rowdot_q41 gives, bit for bit, what rowdot gives on the
   dequantized matrix. */
enum { F32 = 0, I8 = 1, Q41 = 2, Q80 = 3 };
#define Q41_BLOCK 32
#define Q41_BYTES 24
/* GGUF's Q8_0 (rowdot_q80): each 32 weights are a scale d (float32 here, float16 in the file) and
   32 int8 q, 36 bytes; a weight is d * q, rounded once, as GGUF's dequantization computes it. */
#define Q80_BYTES 36

#ifdef __AVX512F__
#define VLOAD8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSET1(a) _mm512_set1_ps(a)
#else
#define VLOAD8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSET1(a) _mm256_set1_ps(a)
#endif

/* The LANES weights k .. k + LANES - 1 of a Q4_1 row (k a multiple of LANES, which divides 32). */
static inline __attribute__((always_inline)) vec q41_load(const unsigned char *w, long k) {
    const unsigned char *b = w + (k / Q41_BLOCK) * Q41_BYTES;
    const long j = k % Q41_BLOCK;  /* 0 or 16 (AVX-512); 0, 8, 16 or 24 (AVX2) */
    const vec d = VSET1(((const float *)b)[0]), m = VSET1(((const float *)b)[1]);
#ifdef __AVX512F__
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 8));
    q = j ? _mm_srli_epi16(q, 4) : q;
    q = _mm_and_si128(q, _mm_set1_epi8(0x0F));
    const vec qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
#else
    __m128i q = _mm_loadl_epi64((const __m128i *)(b + 8 + j % 16));
    q = j >= 16 ? _mm_srli_epi16(q, 4) : q;
    q = _mm_and_si128(q, _mm_set1_epi8(0x0F));
    const vec qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
#endif
    return VADD(VMUL(d, qf), m);
}

static inline __attribute__((always_inline)) float q41_weight(const unsigned char *w, long k) {
    const unsigned char *b = w + (k / Q41_BLOCK) * Q41_BYTES;
    const long j = k % Q41_BLOCK;
    const int q = (b[8 + j % 16] >> (j >= 16 ? 4 : 0)) & 0x0F;
    const float dq = ((const float *)b)[0] * (float)q;
    return dq + ((const float *)b)[1];
}

static inline __attribute__((always_inline)) vec q80_load(const unsigned char *w, long k) {
    const unsigned char *b = w + (k / Q41_BLOCK) * Q80_BYTES;
    return VMUL(VSET1(((const float *)b)[0]), VLOAD8(b + 4 + k % Q41_BLOCK));
}

static inline __attribute__((always_inline)) vec wload(const char *w, long k, int mode) {
    if (mode == Q80) return q80_load((const unsigned char *)w, k);
    if (mode == Q41) return q41_load((const unsigned char *)w, k);
    return mode == I8 ? VLOAD8((const signed char *)w + k) : VLOAD((const float *)w + k);
}

static inline __attribute__((always_inline)) float weight(const char *w, long k, int mode) {
    if (mode == Q80) {
        const unsigned char *b = (const unsigned char *)w + (k / Q41_BLOCK) * Q80_BYTES;
        return ((const float *)b)[0] * (float)((const signed char *)b)[4 + k % Q41_BLOCK];
    }
    if (mode == Q41) return q41_weight((const unsigned char *)w, k);
    return mode == I8 ? (float)((const signed char *)w)[k] : ((const float *)w)[k];
}

/* One x vector into a register, for all the multiply-adds that use it. Left to itself, GCC folded
   the load into each multiply-add of the eight-row block (the same vector loaded again for the
   second weight row): sixteen loads per sixteen multiply-adds bound that loop. The empty asm only
   hides where the vector came from. */
static inline __attribute__((always_inline)) vec xload(const float *p) {
    vec v = VLOAD(p);
#ifdef __AVX512F__
    __asm__("" : "+v"(v));
#else
    __asm__("" : "+x"(v));
#endif
    return v;
}

#ifdef __AVX512F__
/* A Q4_1 block's two vectors at once (AVX-512: 32 weights, two vectors of 16): its d, m and q
   bytes loaded once for both, and no branch on which half a vector is. The same operations per
   weight as q41_load, so the same bits. The blocks' loops widen a row's block at its first
   vector and keep the second for the next turn (PAIRED). */
static inline __attribute__((always_inline)) void q41_pair(const char *w, long k, vec *u0, vec *u1) {
    const unsigned char *b = (const unsigned char *)w + (k / Q41_BLOCK) * Q41_BYTES;
    const vec d = VSET1(((const float *)b)[0]), m = VSET1(((const float *)b)[1]);
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + 8)), low = _mm_set1_epi8(0x0F);
    *u0 = VADD(VMUL(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low)))), m);
    *u1 = VADD(VMUL(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low)))), m);
}
#define PAIRED(mode) ((mode) == Q41)
#else
#define PAIRED(mode) 0
static inline void q41_pair(const char *w, long k, vec *u0, vec *u1) { (void)w; (void)k; (void)u0; (void)u1; }
#endif

/* Weights k .. k + LANES - 1 of the n weight rows wr into u. A Q4_1 block's second vector is
   widened with its first (PAIRED) and waits in hi for the next turn. */
static inline __attribute__((always_inline)) void wload_rows(const char *const *wr, int n, long k, int mode, vec *u,
                                                             vec *hi) {
    if (PAIRED(mode) && k % Q41_BLOCK == 0)
        for (int j = 0; j < n; j++) q41_pair(wr[j], k, &u[j], &hi[j]);
    else if (PAIRED(mode))
        for (int j = 0; j < n; j++) u[j] = hi[j];
    else
        for (int j = 0; j < n; j++) u[j] = wload(wr[j], k, mode);
}

/* Where weight k of a row starts, in bytes (prefetches). */
static inline __attribute__((always_inline)) long wbyte(long k, int mode) {
    if (mode == Q80) return (k / Q41_BLOCK) * Q80_BYTES;
    return mode == Q41 ? (k / Q41_BLOCK) * Q41_BYTES : k * (mode == I8 ? 1 : 4);
}

/* Whether weight k of a row is where the next prefetch goes: a cache line at a time (float32,
   int8), every second block (Q4_1: 48 bytes, so no line is skipped). */
static inline __attribute__((always_inline)) int line_starts(long k, int mode) {
    if (mode == Q80) return k % Q41_BLOCK == 0;  /* a block (36 bytes) at a time */
    return mode == Q41 ? k % 64 == 0 : wbyte(k, mode) % 64 == 0;
}

static inline __attribute__((always_inline)) float finish(vec acc, const float *x, const char *w, long k0,
                                                          long K, int mode) {
    float s = hsum(acc);
    for (long k = k0; k < K; k++) s += x[k] * weight(w, k, mode);
    return s;
}

static inline __attribute__((always_inline)) void rowdot_block(const float *x, const char *w, const float *scale,
                                                               float *y, long R, long K, long N, long b,
                                                               const int mode, const int many) {
    const int q8 = mode == I8;  /* a scale per weight row */
    const long KV = K - K % LANES;
    const long NB = (N + 3) / 4;
    const long ROW = mode == Q80 ? K / Q41_BLOCK * Q80_BYTES
                   : mode == Q41 ? K / Q41_BLOCK * Q41_BYTES : K * (mode == I8 ? 1 : 4);
    const long n0 = b * 4;
    const long nn = N - n0 < 4 ? N - n0 : 4;
    const char *w0 = w + n0 * ROW;
    float sc[4];
    for (int j = 0; j < 4; j++) sc[j] = q8 && j < nn ? scale[n0 + j] : 1.0f;
    if (nn == 4) {
        const char *wr[4] = {w0, w0 + ROW, w0 + 2 * ROW, w0 + 3 * ROW};
        long r = 0;
#ifdef __AVX512F__
        /* Six rows by all four weight rows (24 accumulators) where there are many float32 rows:
           ten loads per 24 multiply-adds instead of per 16, for prefills' long frames. Weights
           widened as they load need registers of their own, and with them this block spills:
           those take eight rows at a time (37 rows of Q4_1 in 0.94x the time). */
        for (; many && mode == F32 && R >= 16 && r + 6 <= R; r += 6) {
            vec acc[6][4];
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
            for (long k = 0; k < KV; k += LANES) {
                const vec u0 = wload(wr[0], k, mode), u1 = wload(wr[1], k, mode);
                const vec u2 = wload(wr[2], k, mode), u3 = wload(wr[3], k, mode);
                if (r == 0 && b + 1 < NB && line_starts(k, mode))
                    for (int j = 0; j < 4; j++) _mm_prefetch(wr[j] + 4 * ROW + wbyte(k, mode), _MM_HINT_T0);
                for (int i = 0; i < 6; i++) {
                    const vec v = xload(x + (r + i) * K + k);
                    acc[i][0] = VFMA(v, u0, acc[i][0]);
                    acc[i][1] = VFMA(v, u1, acc[i][1]);
                    acc[i][2] = VFMA(v, u2, acc[i][2]);
                    acc[i][3] = VFMA(v, u3, acc[i][3]);
                }
            }
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 4; j++) {
                    float s = finish(acc[i][j], x + (r + i) * K, wr[j], KV, K, mode);
                    y[(r + i) * N + n0 + j] = q8 ? sc[j] * s : s;
                }
        }
        /* Eight rows at a time, two weight rows per pass (16 accumulators): each weight row is
           read once for eight rows, so at eight rows the products stay bound by memory, not by
           a second pass over the block. The sums' order is the same as in any other block. */
        for (; many && r + 8 <= R; r += 8) {
            for (int jh = 0; jh < 4; jh += 2) {
                vec acc[8][2], hi[2] = {VZERO(), VZERO()};
                for (int i = 0; i < 8; i++) acc[i][0] = acc[i][1] = VZERO();
                for (long k = 0; k < KV; k += LANES) {
                    vec u[2];
                    wload_rows(wr + jh, 2, k, mode, u, hi);
                    if (r == 0 && b + 1 < NB && line_starts(k, mode)) {
                        _mm_prefetch(wr[jh] + 4 * ROW + wbyte(k, mode), _MM_HINT_T0);
                        _mm_prefetch(wr[jh + 1] + 4 * ROW + wbyte(k, mode), _MM_HINT_T0);
                    }
                    for (int i = 0; i < 8; i++) {
                        const vec v = xload(x + (r + i) * K + k);
                        acc[i][0] = VFMA(v, u[0], acc[i][0]);
                        acc[i][1] = VFMA(v, u[1], acc[i][1]);
                    }
                }
                for (int i = 0; i < 8; i++)
                    for (int j = 0; j < 2; j++) {
                        float s = finish(acc[i][j], x + (r + i) * K, wr[jh + j], KV, K, mode);
                        y[(r + i) * N + n0 + jh + j] = q8 ? sc[jh + j] * s : s;
                    }
            }
        }
#endif
        for (; r + RB <= R; r += RB) {
            vec acc[RB][4], hi[4] = {VZERO(), VZERO(), VZERO(), VZERO()};
            for (int i = 0; i < RB; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
            for (long k = 0; k < KV; k += LANES) {
                vec u[4];
                wload_rows(wr, 4, k, mode, u, hi);
                if (r == 0 && b + 1 < NB && line_starts(k, mode))  /* the next block's weights, a line at a time */
                    for (int j = 0; j < 4; j++) _mm_prefetch(wr[j] + 4 * ROW + wbyte(k, mode), _MM_HINT_T0);
                for (int i = 0; i < RB; i++) {
                    vec v = xload(x + (r + i) * K + k);
                    for (int j = 0; j < 4; j++) acc[i][j] = VFMA(v, u[j], acc[i][j]);
                }
            }
            for (int i = 0; i < RB; i++)
                for (int j = 0; j < 4; j++) {
                    float s = finish(acc[i][j], x + (r + i) * K, wr[j], KV, K, mode);
                    y[(r + i) * N + n0 + j] = q8 ? sc[j] * s : s;
                }
        }
        /* Two rows (the rest of RB, or a batch of two or three): the weights widened once
           for both, which matters for int8 and Q4_1, whose widening is the work at few rows. */
        for (; r + 2 <= R; r += 2) {
            vec acc[2][4], hi[4] = {VZERO(), VZERO(), VZERO(), VZERO()};
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
            for (long k = 0; k < KV; k += LANES) {
                vec u[4];
                wload_rows(wr, 4, k, mode, u, hi);
                if (r == 0 && b + 1 < NB && line_starts(k, mode))
                    for (int j = 0; j < 4; j++) _mm_prefetch(wr[j] + 4 * ROW + wbyte(k, mode), _MM_HINT_T0);
                for (int i = 0; i < 2; i++) {
                    vec v = xload(x + (r + i) * K + k);
                    for (int j = 0; j < 4; j++) acc[i][j] = VFMA(v, u[j], acc[i][j]);
                }
            }
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 4; j++) {
                    float s = finish(acc[i][j], x + (r + i) * K, wr[j], KV, K, mode);
                    y[(r + i) * N + n0 + j] = q8 ? sc[j] * s : s;
                }
        }
        for (; r < R; r++) {
            const float *xr = x + r * K;
            vec acc[4], hi[4] = {VZERO(), VZERO(), VZERO(), VZERO()};
            for (int j = 0; j < 4; j++) acc[j] = VZERO();
            for (long k = 0; k < KV; k += LANES) {
                vec v = xload(xr + k), u[4];
                wload_rows(wr, 4, k, mode, u, hi);
                for (int j = 0; j < 4; j++) acc[j] = VFMA(v, u[j], acc[j]);
                if (r == 0 && b + 1 < NB && line_starts(k, mode))
                    for (int j = 0; j < 4; j++) _mm_prefetch(wr[j] + 4 * ROW + wbyte(k, mode), _MM_HINT_T0);
            }
            for (int j = 0; j < 4; j++) {
                float s = finish(acc[j], xr, wr[j], KV, K, mode);
                y[r * N + n0 + j] = q8 ? sc[j] * s : s;
            }
        }
    } else {
        for (long j = 0; j < nn; j++) {
            const char *wj = w0 + j * ROW;
            for (long r = 0; r < R; r++) {
                const float *xr = x + r * K;
                vec a = VZERO();
                for (long k = 0; k < KV; k += LANES) a = VFMA(VLOAD(xr + k), wload(wj, k, mode), a);
                float s = finish(a, xr, wj, KV, K, mode);
                y[r * N + n0 + j] = q8 ? sc[j] * s : s;
            }
        }
    }
}

/* One function, and so one parallel region, per kind of weights: GCC outlines a parallel region
   before it inlines, so a region shared by the kinds would test the kind inside its loops.
   With AVX-512, seven rows past the last eight run as eight, padded with a zero row that is
   computed and dropped: the eight-row block widens each weight once for all of them, where the
   four-, two- and one-row blocks after it widen it three times (seven rows of Q4_1 took 1.35x
   the time of eight; five and six gain nothing padded). A row's sums are the same in every
   block, so padding changes no bit. */
typedef void (*rows_fn)(const float *, const char *, const float *, float *, long, long, long, int);

static void rowdot_parts(const float *x, const char *w, const float *scale, float *y, long R, long K, long N,
                         int threads, rows_fn few, rows_fn many) {
#ifdef __AVX512F__
    const long extra = R % 8 == 7 ? 1 : 0;
    if (extra) {
        float *xp = calloc((size_t)((R + extra) * K), sizeof(float));
        float *yp = malloc(sizeof(float) * (size_t)((R + extra) * N));
        if (xp && yp) {
            memcpy(xp, x, sizeof(float) * (size_t)(R * K));
            many(xp, w, scale, yp, R + extra, K, N, threads);
            memcpy(y, yp, sizeof(float) * (size_t)(R * N));
            free(xp);
            free(yp);
            return;
        }
        free(xp);  /* no memory for the copies: the rows as they are, the same numbers */
        free(yp);
    }
#endif
    (R >= 8 ? many : few)(x, w, scale, y, R, K, N, threads);
}

/* And one per size: fewer than eight rows run without the eight- and six-row blocks' code, so
   the compiler gives its registers to the blocks that run. */
#define ROWDOT_REGION(fname, MODE, MANY)                                                              \
    static void fname(const float *x, const char *w, const float *scale, float *y, long R, long K,  \
                      long N, int threads) {                                                         \
        const long NB = (N + 3) / 4;                                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
        for (long b = 0; b < NB; b++) rowdot_block(x, w, scale, y, R, K, N, b, MODE, MANY);          \
    }
#define ROWDOT_ALL(name, MODE)                                                                        \
    ROWDOT_REGION(name##_few, MODE, 0)                                                               \
    ROWDOT_REGION(name##_many, MODE, 1)                                                              \
    static void name(const float *x, const char *w, const float *scale, float *y, long R, long K,   \
                     long N, int threads) {                                                          \
        rowdot_parts(x, w, scale, y, R, K, N, threads, name##_few, name##_many);                     \
    }
ROWDOT_ALL(rowdot_f32, F32)
ROWDOT_ALL(rowdot_int8, I8)
ROWDOT_ALL(rowdot_blocks41, Q41)
ROWDOT_ALL(rowdot_blocks80, Q80)

void rowdot(const float *x, const float *w, float *y, long R, long K, long N, int threads) {
    rowdot_f32(x, (const char *)w, 0, y, R, K, N, threads);
}

void rowdot_i8(const float *x, const signed char *w, const float *scale, float *y, long R, long K, long N,
               int threads) {
    rowdot_int8(x, (const char *)w, scale, y, R, K, N, threads);
}

/* w: N rows of K / 32 Q8_0 blocks (K a multiple of 32). */
void rowdot_q80(const float *x, const unsigned char *w, float *y, long R, long K, long N, int threads) {
    rowdot_blocks80(x, (const char *)w, 0, y, R, K, N, threads);
}

/* w: N rows of K / 32 Q4_1 blocks (K a multiple of 32). */
void rowdot_q41(const float *x, const unsigned char *w, float *y, long R, long K, long N, int threads) {
    rowdot_blocks41(x, (const char *)w, 0, y, R, K, N, threads);
}

/* Attention for the packed step's rows (partition/batching.py), each row computed on its own.

   q (R, H, D) holds every part's new rows in turn (a part: one session's frame); knew and vnew
   (R, Hkv, D) their keys and values, which are first written into each part's cache (Hkv,
   cap, D) after its `past` positions. Row r of a part, head h, attends over the positions its
   mask lets it see (all `past + r + 1` without a mask; an additive mask (rows, past + rows) skips
   a position whose value is below -1e30 and adds the others), in increasing position order:
   scores by the fixed-order dot product, their maximum, exp(score - max) summed in that order,
   and the values weighted and summed in that order, divided by the sum at the end. Nothing
   depends on the other rows, heads or parts of the call, or on the thread count: a row of a
   verification frame or of a token tree gets the bits it gets as a one-row decode step on the
   same keys (SDPA's blocked kernels give neither). Head h reads key/value head h / (H / Hkv). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline __attribute__((always_inline)) float dot_fixed(const float *a, const float *b, long D) {
    const long DV = D - D % LANES;
    vec acc = VZERO();
    for (long d = 0; d < DV; d += LANES) acc = VFMA(VLOAD(a + d), VLOAD(b + d), acc);
    float s = hsum(acc);
    for (long d = DV; d < D; d++) s += a[d] * b[d];
    return s;
}

/* Returns 0, or 2 when it could not allocate its scratch (the output is then not written). */
int attend(const float *q, const float *knew, const float *vnew, long P, const long *rows,
           float *const *kc, float *const *vc, const long *cap, const long *past, const float *const *mask,
           long H, long Hkv, long D, float scale, float *out, int threads) {
    long R = 0;
    for (long p = 0; p < P; p++) R += rows[p];
    long *part_of = malloc(sizeof(long) * (R > 0 ? R : 1));
    long *start_of = malloc(sizeof(long) * (P > 0 ? P : 1));
    if (!part_of || !start_of) { free(part_of); free(start_of); return 2; }
    for (long p = 0, r = 0; p < P; p++) {
        start_of[p] = r;
        for (long i = 0; i < rows[p]; i++) part_of[r++] = p;
    }
    for (long r = 0; r < R; r++) {  /* the new keys and values into their caches */
        const long p = part_of[r], t = past[p] + r - start_of[p];
        for (long g = 0; g < Hkv; g++) {
            memcpy(kc[p] + (g * cap[p] + t) * D, knew + (r * Hkv + g) * D, sizeof(float) * D);
            memcpy(vc[p] + (g * cap[p] + t) * D, vnew + (r * Hkv + g) * D, sizeof(float) * D);
        }
    }
    const long group = H / Hkv;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        long longest = 1;
        for (long p = 0; p < P; p++) if (past[p] + rows[p] > longest) longest = past[p] + rows[p];
        float *score = malloc(sizeof(float) * longest);
        float *acc = malloc(sizeof(float) * D);
        if (!score || !acc) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(static)
        for (long item = 0; item < R * H; item++) {
            if (!score || !acc) continue;
            const long r = item / H, h = item % H, p = part_of[r], i = r - start_of[p];
            const long L = past[p] + rows[p];
            const long seen = past[p] + i + 1;  /* without a mask: causal */
            const float *m = mask[p] ? mask[p] + i * L : 0;
            const long upto = m ? L : seen;
            const float *qr = q + (r * H + h) * D;
            const float *kh = kc[p] + (h / group) * cap[p] * D;
            const float *vh = vc[p] + (h / group) * cap[p] * D;
            float top = -INFINITY;
            for (long t = 0; t < upto; t++) {
                if (m && m[t] < -1e30f) { score[t] = -INFINITY; continue; }
                float s = dot_fixed(qr, kh + t * D, D) * scale;
                if (m) s += m[t];
                score[t] = s;
                if (s > top) top = s;
            }
            for (long d = 0; d < D; d++) acc[d] = 0.0f;
            float total = 0.0f;
            for (long t = 0; t < upto; t++) {
                if (score[t] == -INFINITY) continue;
                const float e = expf(score[t] - top);
                total += e;
                const float *vt = vh + t * D;
                for (long d = 0; d < D; d++) acc[d] += e * vt[d];
            }
            float *o = out + (r * H + h) * D;
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            for (long d = 0; d < D; d++) o[d] = acc[d] * inv;
        }
        free(score);
        free(acc);
    }
    free(part_of);
    free(start_of);
    return failed;
}

/* One Llama decoder layer over the packed step's rows (partition/batching.py: run_packed_layer),
   in one call: the Python around a layer (norms, rotary positions, four products, attention,
   SiLU, residuals: some forty torch operations) cost more than the int8 products themselves.
   Every operation is row-wise or the products and attention above, so each row's numbers still
   depend on nothing else in the call. Weights are float32 or, where their scale pointer is set,
   int8 with a scale per output row, or Q4_1 blocks where their bit of q41 is set (1: q/k/v, 2: o,
   4: gate/up, 8: down). hidden (R, H) is updated in place; cos and sin (R, D) are
   each row's rotary factors; the parts and their caches are as for attend(). */
static void rms_norm(const float *x, const float *w, float eps, float *out, long H) {
    const float r = 1.0f / sqrtf(dot_fixed(x, x, H) / (float)H + eps);
    for (long i = 0; i < H; i++) out[i] = w[i] * (x[i] * r);
}

static void product(const float *x, const void *w, const float *scale, int q41, float *y, long R, long K, long N,
                    int threads) {
    if (q41) rowdot_blocks41(x, (const char *)w, 0, y, R, K, N, threads);
    else if (scale) rowdot_int8(x, (const char *)w, scale, y, R, K, N, threads);
    else rowdot_f32(x, (const char *)w, 0, y, R, K, N, threads);
}

/* exp(x) for every lane, the same way in every lane and call: n = round(x / ln 2), r = x - n ln 2
   (in two parts), e^r by its Taylor polynomial to degree 7 (|r| <= ln 2 / 2: within 2 ulp),
   times 2^n put into the exponent bits. x is clamped to [-87, 88] (results stay normal). */
#ifdef __AVX512F__
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(a) _mm512_set1_ps(a)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VDIV(a, b) _mm512_div_ps(a, b)
#define VMIN(a, b) _mm512_min_ps(a, b)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VFNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define VNEG(a) _mm512_sub_ps(_mm512_setzero_ps(), a)
#define VROUND(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* 2^n for whole-numbered n, put into the exponent bits */
#define VPOW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), \
                                                                        _mm512_set1_epi32(127)), 23))
#else
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET1(a) _mm256_set1_ps(a)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VDIV(a, b) _mm256_div_ps(a, b)
#define VMIN(a, b) _mm256_min_ps(a, b)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VFNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VNEG(a) _mm256_sub_ps(_mm256_setzero_ps(), a)
#define VROUND(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), \
                                                                        _mm256_set1_epi32(127)), 23))
#endif

static inline vec vexp(vec x) {
    x = VMIN(VMAX(x, VSET1(-87.0f)), VSET1(88.0f));
    const vec n = VROUND(VMUL(x, VSET1(1.44269504088896341f)));
    vec r = VFNMA(n, VSET1(0.693359375f), x);
    r = VFNMA(n, VSET1(-2.12194440e-4f), r);
    vec p = VSET1(1.0f / 5040);
    p = VFMA(p, r, VSET1(1.0f / 720));
    p = VFMA(p, r, VSET1(1.0f / 120));
    p = VFMA(p, r, VSET1(1.0f / 24));
    p = VFMA(p, r, VSET1(1.0f / 6));
    p = VFMA(p, r, VSET1(0.5f));
    p = VFMA(p, r, VSET1(1.0f));
    p = VFMA(p, r, VSET1(1.0f));
    return VMUL(p, VPOW2(n));
}

static inline vec silu_times(vec g, vec u) { return VMUL(VDIV(g, VADD(VSET1(1.0f), vexp(VNEG(g)))), u); }

/* act = silu(gate) * up, LANES elements at a time (a short tail goes through a padded vector, so
   every element is computed the same way), the rows shared among the threads. */
static void silu_mul(const float *gu, float *act, long R, long I, int threads) {
    const long per_row = (I + LANES - 1) / LANES;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long item = 0; item < R * per_row; item++) {
        const long r = item / per_row, i = (item % per_row) * LANES, n = I - i < LANES ? I - i : LANES;
        const float *g = gu + r * 2 * I + i, *u = g + I;
        if (n == LANES) {
            VSTORE(act + r * I + i, silu_times(VLOAD(g), VLOAD(u)));
            continue;
        }
        float gb[LANES], ub[LANES], ob[LANES];
        for (long j = 0; j < LANES; j++) { gb[j] = j < n ? g[j] : 0.0f; ub[j] = j < n ? u[j] : 0.0f; }
        VSTORE(ob, silu_times(VLOAD(gb), VLOAD(ub)));
        for (long j = 0; j < n; j++) act[r * I + i + j] = ob[j];
    }
}

static void rotate(float *x, const float *c, const float *s, long D) {
    const long half = D / 2;
    float tmp[1024];
    for (long i = 0; i < D; i++) tmp[i] = x[i];
    for (long i = 0; i < half; i++) x[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
    for (long i = half; i < D; i++) x[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
}

int decode_layer(float *hidden, long R, long H, const float *norm1, const float *norm2, float eps,
                 const void *wqkv, const float *sqkv, const void *wo, const float *so,
                 const void *wgu, const float *sgu, long I, const void *wd, const float *sd,
                 long heads, long kv_heads, long D, const float *cosv, const float *sinv,
                 long P, const long *rows, float *const *kc, float *const *vc, const long *cap,
                 const long *past, const float *const *mask, float scale, int q41, int threads) {
    if (D > 1024) return 1;
    const long NQ = heads * D, NK = kv_heads * D, NQKV = NQ + 2 * NK;
    float *x = malloc(sizeof(float) * R * H);
    float *qkv = malloc(sizeof(float) * R * NQKV);
    float *q = malloc(sizeof(float) * R * NQ);
    float *k = malloc(sizeof(float) * R * NK);
    float *v = malloc(sizeof(float) * R * NK);
    float *att = malloc(sizeof(float) * R * NQ);
    float *gu = malloc(sizeof(float) * R * 2 * I);
    float *act = malloc(sizeof(float) * R * I);
    float *y = malloc(sizeof(float) * R * (H > I ? H : I));
    int failed = !(x && qkv && q && k && v && att && gu && act && y);
    if (!failed) {
        for (long r = 0; r < R; r++) rms_norm(hidden + r * H, norm1, eps, x + r * H, H);
        product(x, wqkv, sqkv, q41 & 1, qkv, R, H, NQKV, threads);
        for (long r = 0; r < R; r++) {
            const float *row = qkv + r * NQKV;
            memcpy(q + r * NQ, row, sizeof(float) * NQ);
            memcpy(k + r * NK, row + NQ, sizeof(float) * NK);
            memcpy(v + r * NK, row + NQ + NK, sizeof(float) * NK);
            for (long h = 0; h < heads; h++) rotate(q + r * NQ + h * D, cosv + r * D, sinv + r * D, D);
            for (long h = 0; h < kv_heads; h++) rotate(k + r * NK + h * D, cosv + r * D, sinv + r * D, D);
        }
        failed = attend(q, k, v, P, rows, kc, vc, cap, past, mask, heads, kv_heads, D, scale, att, threads);
    }
    if (!failed) {
        product(att, wo, so, q41 & 2, y, R, NQ, H, threads);
        for (long i = 0; i < R * H; i++) hidden[i] = hidden[i] + y[i];
        for (long r = 0; r < R; r++) rms_norm(hidden + r * H, norm2, eps, x + r * H, H);
        product(x, wgu, sgu, q41 & 4, gu, R, H, 2 * I, threads);
        silu_mul(gu, act, R, I, threads);
        product(act, wd, sd, q41 & 8, y, R, I, H, threads);
        for (long i = 0; i < R * H; i++) hidden[i] = hidden[i] + y[i];
    }
    free(x); free(qkv); free(q); free(k); free(v); free(att); free(gu); free(act); free(y);
    return failed ? 2 : 0;
}

/* decode_layer over L layers in turn, in place on hidden: layer l's ten weight pointers at
   w[10 l .. 10 l + 10) (input norm, post-attention norm, then the weight and scale of q/k/v, o,
   gate/up and down), its Q4_1 flags at q41[l], its parts' cache storage and past positions at
   kc, vc, cap, past [l P .. l P + P). The same calls as one layer at a time, so the same bits,
   without a trip back to Python between layers. */
int decode_layers(float *hidden, long R, long H, long L, const void *const *w, const int *q41, float eps, long I,
                  long heads, long kv_heads, long D, const float *cosv, const float *sinv, long P, const long *rows,
                  float *const *kc, float *const *vc, const long *cap, const long *past, const float *const *mask,
                  float scale, int threads) {
    for (long l = 0; l < L; l++) {
        const void *const *wl = w + 10 * l;
        const int failed = decode_layer(hidden, R, H, (const float *)wl[0], (const float *)wl[1], eps, wl[2],
                                        (const float *)wl[3], wl[4], (const float *)wl[5], wl[6],
                                        (const float *)wl[7], I, wl[8], (const float *)wl[9], heads, kv_heads, D,
                                        cosv, sinv, P, rows, kc + l * P, vc + l * P, cap + l * P, past + l * P,
                                        mask, scale, q41[l], threads);
        if (failed) return failed;
    }
    return 0;
}
