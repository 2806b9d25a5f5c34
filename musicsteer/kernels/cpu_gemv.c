/* The decoder's weight products for a few rows on CPU: y[r] = W x[r] for the CFG pair of a
 * one-token step (and the short chunks of a re-prime), streaming each weight byte once.
 *
 * Weights are packed so that one block of 16 output channels is a single contiguous run:
 *   float32  [N/16][D][16]        one 64-byte vector per input index, times a broadcast x[r][d]
 *   int8     [N/16][D/4][16][4]   unsigned (q + 128), four inputs per 32-bit lane, for VNNI
 *   bfloat16 [N/16][D/2][16][2]   two inputs per 32-bit lane, for AVX-512 BF16 (vdpbf16ps)
 *   int4     [N/16][D/64][8][16][4] per group of 64 inputs, byte (j, lane, k) = quad j in its low
 *                                 nibble and quad j + 8 in its high one, unsigned (q + 8); plus
 *                                 one bfloat16 scale per output and group, [N/16][D/64][16]
 * Each thread reads one sequential stream, there are no horizontal sums, and the activations
 * stay in L1. The int8 form quantizes x per row in groups of 64 inputs (symmetric, one scale
 * per group) and uses vpdpbusd; the +128 offset of the weights is taken back per group with
 * 128 * sum(x_q), which depends on x only, so the weights need no extra bytes. The bfloat16
 * form rounds x to bfloat16 (nearest even) and pairs it the way the weights are paired; the
 * products accumulate in float32. The int4 form unpacks its nibbles in registers (and, shift) into
 * the int8 form's unsigned bytes and takes the offset back with 8 * sum(x_q).
 *
 * Software prefetch, by CPU (ms_set_prefetch; kernels/cpu.py picks the distance): the products and
 * the attention prefetch the stream they read ms_pf bytes ahead, one prefetch per 64-byte line. On
 * the 2-core Intel Xeon hosts 8 KiB ahead made the products 11-31% faster (int4 1.3x -> 1.05x the
 * time of a streaming read of the same bytes in a `small` step): the hardware prefetchers alone
 * left the stream short of lines in flight. On the AMD EPYC hosts 4 KiB ahead made them 20-30%
 * slower (1.35x against 1.06x without), so there it stays off (ms_pf = 0, one predictable branch).
 *
 * Threads: OpenMP, sharing torch's team (see run()).
 *
 * Built by musicsteer/kernels/cpu.py with -O3 -march=native. Each kernel family has an AVX-512
 * path, an AVX2/FMA one (x86-64-v3: most laptops; int8 and int4 through vpmaddubsw, bfloat16 by
 * shifting to float32; helpers in cpu_avx2.h) and a portable C loop as the last fallback, where
 * the int8 and int4 entry points report themselves absent. ms_paths() says which was compiled.
 */
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include "cpu_avx2.h" /* the x86-64-v3 paths' activations and sums */
#endif
/* The int8 and int4 products: AVX-512 VNNI (vpdpbusd), or AVX2 (vpmaddubsw) without it. */
#if (defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
#define MS_INT8_KERNELS 1
#endif

#define MS_MAX_ROWS 8
#define MS_GROUP 64

int ms_caps(void) {
    int caps = 1; /* portable float32 */
#if defined(__AVX512F__)
    caps |= 2;
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    caps |= 4;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    caps |= 8; /* bfloat16 products in hardware (the bfloat16 form has a portable loop otherwise) */
#endif
#if !(defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)) && defined(__AVX2__) && defined(__FMA__)
    caps |= 16; /* int8 and int4 products on AVX2 (vpmaddubsw), without VNNI */
#endif
    return caps;
}

/* ---------------------------------------------------------------- threads */

typedef void (*ms_task)(void *args, int begin, int end);

/* The work is split in contiguous runs of blocks over OpenMP's threads. The library links the
 * libgomp that torch already loaded (same soname), so the decoder's products and torch's own
 * operations share one team of threads instead of two pools fighting for the cores. Small
 * work stays on the calling thread: waking the team costs more than it saves, and its
 * spinning workers would take a core from the audio threads of a live session. */
#define MS_PARALLEL_BYTES (512 * 1024) /* less work than this runs on the calling thread alone */

static void run(ms_task task, void *args, int blocks, size_t bytes) {
    int threads = bytes < MS_PARALLEL_BYTES ? 1 : omp_get_max_threads();
    if (threads > blocks / 2) threads = blocks / 2 > 0 ? blocks / 2 : 1;
    if (threads <= 1) { task(args, 0, blocks); return; }
#pragma omp parallel num_threads(threads)
    {
        int me = omp_get_thread_num(), team = omp_get_num_threads();
        int per = blocks / team, extra = blocks % team;
        int begin = me * per + (me < extra ? me : extra);
        int end = begin + per + (me < extra);
        if (begin < end) task(args, begin, end);
    }
}

/* ---------------------------------------------------------------- prefetch */

/* How far ahead (bytes) the products prefetch their weight stream, or 0 for none; set through
 * ms_set_prefetch by musicsteer/kernels/cpu.py (a negative value only reads it). */
static int ms_pf = 0;
int ms_set_prefetch(int bytes) {
    const int old = ms_pf;
    if (bytes >= 0) ms_pf = bytes;
    return old;
}
#if defined(__x86_64__)
#define MS_PREFETCH(p) do { if (ms_pf) _mm_prefetch((const char *)(p) + ms_pf, _MM_HINT_T0); } while (0)
#else
#define MS_PREFETCH(p) do { (void)(p); } while (0)
#endif

/* ---------------------------------------------------------------- activations */

/* What a product's epilogue applies to its outputs (the MLP's first projection fuses its GELU). */
enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3 };

static inline float act_scalar(float v, int act) {
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678f));
    if (act == ACT_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
    if (act == ACT_RELU) return v > 0.f ? v : 0.f;
    return v;
}

#if defined(__AVX512F__)
/* e^x for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2 / 2, p of degree 6. */
static inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), tanh through e^(-2|u|). */
static inline __m512 erf_ps(__m512 x) {
    __m512 ax = _mm512_abs_ps(x);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 y = _mm512_fnmadd_ps(p, exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax))), _mm512_set1_ps(1.0f));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y),
                                               _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000))));
}

static inline __m512 tanh_ps(__m512 u) {
    __m512 e = exp_neg(_mm512_mul_ps(_mm512_abs_ps(u), _mm512_set1_ps(-2.0f)));
    __m512 y = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y),
                                               _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(0x80000000))));
}

static inline __m512 activate(__m512 v, int act) {
    if (act == ACT_GELU) {
        __m512 half = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
        return _mm512_fmadd_ps(half, erf_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678f))), half);
    }
    if (act == ACT_GELU_TANH) {
        __m512 inner = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), _mm512_set1_ps(0.044715f), v),
                                     _mm512_set1_ps(0.7978845608f));
        __m512 half = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
        return _mm512_fmadd_ps(half, tanh_ps(inner), half);
    }
    if (act == ACT_RELU) return _mm512_max_ps(v, _mm512_setzero_ps());
    return v;
}
#endif

/* ---------------------------------------------------------------- float32 */

typedef struct {
    const float *w, *x;
    float *y;
    const float *res; /* added to the outputs after the activation (a residual), or NULL */
    int n, d, rows, act;
} f32_args;

#if defined(__AVX512F__)
/* One block of 16 outputs for R rows; U partial sums per row keep four FMA chains in flight. */
static inline __attribute__((always_inline)) void f32_block(const float *w, const float *x, float *y, const float *res,
                                                            int n, int d, int act, const int R, const int U) {
    __m512 acc[MS_MAX_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < U; u++) acc[r][u] = _mm512_setzero_ps();
    const int body = d - d % U;
    for (int i = 0; i < body; i += U) {
        for (int u = 0; u < U; u++) {
            MS_PREFETCH(w + (size_t)(i + u) * 16);
            __m512 wv = _mm512_loadu_ps(w + (size_t)(i + u) * 16);
            for (int r = 0; r < R; r++) acc[r][u] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * d + i + u]), acc[r][u]);
        }
    }
    for (int i = body; i < d; i++) {
        __m512 wv = _mm512_loadu_ps(w + (size_t)i * 16);
        for (int r = 0; r < R; r++) acc[r][0] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * d + i]), acc[r][0]);
    }
    for (int r = 0; r < R; r++) {
        __m512 s = acc[r][0];
        for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[r][u]);
        s = activate(s, act);
        if (res) s = _mm512_add_ps(s, _mm512_loadu_ps(res + (size_t)r * n));
        _mm512_storeu_ps(y + (size_t)r * n, s);
    }
}

#define F32_CASE(R, U) \
    case R: \
        for (int b = begin; b < end; b++) \
            f32_block(a->w + (size_t)b * a->d * 16, a->x, a->y + b * 16, a->res ? a->res + b * 16 : NULL, a->n, a->d, \
                      a->act, R, U); \
        break;

static void f32_task(void *args, int begin, int end) {
    f32_args *a = args;
    switch (a->rows) {
        F32_CASE(1, 4) F32_CASE(2, 2) F32_CASE(3, 2) F32_CASE(4, 1)
        F32_CASE(5, 1) F32_CASE(6, 1) F32_CASE(7, 1) F32_CASE(8, 1)
    }
}
#define MS_PATH_F32 "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
/* One block of 16 outputs as two halves of 8 lanes, for R rows: NH halves from H0 per pass over
 * the block's weights (both for up to 4 rows; beyond, one half per pass, so that the accumulators
 * stay in the 16 ymm registers), U partial sums per half and row. */
static inline __attribute__((always_inline)) void f32_half8(const float *w, const float *x, float *y, const float *res,
                                                            int n, int d, int act, const int R, const int U,
                                                            const int H0, const int NH) {
    __m256 acc[MS_MAX_ROWS][2][2];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++)
            for (int u = 0; u < U; u++) acc[r][h][u] = _mm256_setzero_ps();
    const int body = d - d % U;
    for (int i = 0; i < body; i += U)
        for (int u = 0; u < U; u++) {
            MS_PREFETCH(w + (size_t)(i + u) * 16);
            for (int h = 0; h < NH; h++) {
                __m256 wv = _mm256_loadu_ps(w + (size_t)(i + u) * 16 + 8 * (H0 + h));
                for (int r = 0; r < R; r++)
                    acc[r][h][u] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + r * d + i + u), acc[r][h][u]);
            }
        }
    for (int i = body; i < d; i++)
        for (int h = 0; h < NH; h++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)i * 16 + 8 * (H0 + h));
            for (int r = 0; r < R; r++) acc[r][h][0] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + r * d + i), acc[r][h][0]);
        }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++) {
            const size_t at = (size_t)r * n + 8 * (H0 + h);
            __m256 s = acc[r][h][0];
            for (int u = 1; u < U; u++) s = _mm256_add_ps(s, acc[r][h][u]);
            s = activate8(s, act);
            if (res) s = _mm256_add_ps(s, _mm256_loadu_ps(res + at));
            _mm256_storeu_ps(y + at, s);
        }
}

#define F32_CASE8(R, U) \
    case R: \
        for (int b = begin; b < end; b++) { \
            const float *w = a->w + (size_t)b * a->d * 16, *res = a->res ? a->res + b * 16 : NULL; \
            if (R <= 4) f32_half8(w, a->x, a->y + b * 16, res, a->n, a->d, a->act, R, U, 0, 2); \
            else for (int h = 0; h < 2; h++) f32_half8(w, a->x, a->y + b * 16, res, a->n, a->d, a->act, R, U, h, 1); \
        } \
        break;

static void f32_task(void *args, int begin, int end) {
    f32_args *a = args;
    switch (a->rows) {
        F32_CASE8(1, 2) F32_CASE8(2, 1) F32_CASE8(3, 1) F32_CASE8(4, 1)
        F32_CASE8(5, 1) F32_CASE8(6, 1) F32_CASE8(7, 1) F32_CASE8(8, 1)
    }
}
#define MS_PATH_F32 "avx2"
#else
static void f32_task(void *args, int begin, int end) {
    f32_args *a = args;
    for (int b = begin; b < end; b++) {
        const float *w = a->w + (size_t)b * a->d * 16;
        for (int r = 0; r < a->rows; r++) {
            float acc[16] = {0};
            const float *x = a->x + (size_t)r * a->d;
            for (int i = 0; i < a->d; i++)
                for (int j = 0; j < 16; j++) acc[j] += w[(size_t)i * 16 + j] * x[i];
            for (int j = 0; j < 16; j++) {
                size_t at = (size_t)r * a->n + b * 16 + j;
                a->y[at] = act_scalar(acc[j], a->act) + (a->res ? a->res[at] : 0.f);
            }
        }
    }
}
#define MS_PATH_F32 "portable"
#endif

/* y (rows, n) = x (rows, d) @ W.T with W packed [n/16][d][16]; rows beyond 8 go in passes. */
void ms_linear_f32(const float *w, const float *x, float *y, int n, int d, int rows, int act) {
    for (int r0 = 0; r0 < rows; r0 += MS_MAX_ROWS) {
        int chunk = rows - r0 < MS_MAX_ROWS ? rows - r0 : MS_MAX_ROWS;
        f32_args a = {w, x + (size_t)r0 * d, y + (size_t)r0 * n, NULL, n, d, chunk, act};
        run(f32_task, &a, n / 16, (size_t)n * d * sizeof(float));
    }
}

/* ---------------------------------------------------------------- int8 (VNNI) */

typedef struct {
    const uint8_t *w;
    const float *scale;
    const int8_t *xq;     /* (rows, d) */
    const float *xscale;  /* (rows, d/64) */
    const int32_t *xcomp; /* (rows, d/64): 128 * sum of the group's x_q */
    float *y;
    const float *res;     /* added after the activation, or NULL */
    int n, d, rows, act;
} i8_args;

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER; /* the activations' scratch */

/* U independent accumulators per row keep the vpdpbusd chains short (four for the CFG pair). */
static inline __attribute__((always_inline)) void i8_block(const i8_args *a, int b, const int R, const int U) {
    const int d = a->d, groups = d / MS_GROUP;
    const uint8_t *w = a->w + (size_t)b * d * 16;
    __m512 out[MS_MAX_ROWS];
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i acc[MS_MAX_ROWS][4];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++) acc[r][u] = _mm512_setzero_si512();
        const uint8_t *wg = w + (size_t)g * MS_GROUP * 16;
        for (int q = 0; q < MS_GROUP / 4; q += U) {
            __m512i wv[4];
            for (int u = 0; u < U; u++) {
                MS_PREFETCH(wg + (q + u) * 64);
                wv[u] = _mm512_loadu_si512(wg + (q + u) * 64);
            }
            for (int r = 0; r < R; r++) {
                const int32_t *xr = (const int32_t *)(a->xq + (size_t)r * d + g * MS_GROUP);
                for (int u = 0; u < U; u++) acc[r][u] = _mm512_dpbusd_epi32(acc[r][u], wv[u], _mm512_set1_epi32(xr[q + u]));
            }
        }
        for (int r = 0; r < R; r++) {
            __m512i t = acc[r][0];
            for (int u = 1; u < U; u++) t = _mm512_add_epi32(t, acc[r][u]);
            __m512i s = _mm512_sub_epi32(t, _mm512_set1_epi32(a->xcomp[r * groups + g]));
            out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a->xscale[r * groups + g]), out[r]);
        }
    }
    __m512 sc = _mm512_loadu_ps(a->scale + b * 16);
    for (int r = 0; r < R; r++) {
        const size_t at = (size_t)r * a->n + b * 16;
        __m512 v = activate(_mm512_mul_ps(out[r], sc), a->act);
        if (a->res) v = _mm512_add_ps(v, _mm512_loadu_ps(a->res + at));
        _mm512_storeu_ps(a->y + at, v);
    }
}

#define I8_CASE(R) case R: for (int b = begin; b < end; b++) i8_block(a, b, R, R <= 2 ? 4 : 2); break;

static void i8_task(void *args, int begin, int end) {
    i8_args *a = args;
    switch (a->rows) { I8_CASE(1) I8_CASE(2) I8_CASE(3) I8_CASE(4) I8_CASE(5) I8_CASE(6) I8_CASE(7) I8_CASE(8) }
}

/* Quantize x per row in groups of 64: scale = max|x| / 127, x_q = round(x / scale). */
static void quantize_rows(const float *x, int rows, int d, int8_t *xq, float *xscale, int32_t *xcomp) {
    const int groups = d / MS_GROUP;
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < groups; g++) {
            const float *xs = x + (size_t)r * d + g * MS_GROUP;
            __m512 v[4], m = _mm512_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm512_loadu_ps(xs + 16 * i);
                m = _mm512_max_ps(m, _mm512_abs_ps(v[i]));
            }
            float top = _mm512_reduce_max_ps(m);
            float scale = top > 0.f ? top / 127.f : 1.f;
            __m512 inv = _mm512_set1_ps(1.f / scale);
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < 4; i++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* round to nearest even */
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i *)(xq + (size_t)r * d + g * MS_GROUP + 16 * i), _mm512_cvtepi32_epi8(q));
            }
            xscale[r * groups + g] = scale;
            xcomp[r * groups + g] = 128 * _mm512_reduce_add_epi32(sum);
        }
}
#define MS_PATH_I8 "vnni"
#elif defined(__AVX2__) && defined(__FMA__)
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER; /* the activations' scratch */

/* Without VNNI: the weights' bytes back to signed (q + 128 xor 0x80 = q), then vpmaddubsw of |q|
 * with x_q carrying q's sign (vpsignb) and vpmaddwd by ones: each pair of products is at most
 * 2 * 127 * 127 = 32258 in magnitude, inside int16, so vpmaddubsw never saturates and the sums are
 * exactly the VNNI path's (no offset to take back). One 16-output block is two 8-lane halves: both
 * in one pass for up to 2 rows, one per pass beyond (the accumulators stay in registers). */
static inline __attribute__((always_inline)) void i8_half8(const i8_args *a, int b, const int R, const int H0,
                                                           const int NH) {
    const int d = a->d, groups = d / MS_GROUP;
    const uint8_t *w = a->w + (size_t)b * d * 16;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 out[MS_MAX_ROWS][2];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++) out[r][h] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i acc[MS_MAX_ROWS][2];
        for (int r = 0; r < R; r++)
            for (int h = 0; h < NH; h++) acc[r][h] = _mm256_setzero_si256();
        const uint8_t *wg = w + (size_t)g * MS_GROUP * 16;
        for (int q = 0; q < MS_GROUP / 4; q++) {
            MS_PREFETCH(wg + q * 64);
            __m256i xv[MS_MAX_ROWS];
            for (int r = 0; r < R; r++)
                xv[r] = _mm256_set1_epi32(((const int32_t *)(a->xq + (size_t)r * d + g * MS_GROUP))[q]);
            for (int h = 0; h < NH; h++) {
                __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wg + q * 64 + 32 * (H0 + h))), flip);
                __m256i mag = _mm256_abs_epi8(v);
                for (int r = 0; r < R; r++)
                    acc[r][h] = _mm256_add_epi32(acc[r][h],
                                                 _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(xv[r], v)), ones));
            }
        }
        for (int r = 0; r < R; r++)
            for (int h = 0; h < NH; h++)
                out[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), _mm256_set1_ps(a->xscale[r * groups + g]), out[r][h]);
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++) {
            const size_t at = (size_t)r * a->n + b * 16 + 8 * (H0 + h);
            __m256 v = activate8(_mm256_mul_ps(out[r][h], _mm256_loadu_ps(a->scale + b * 16 + 8 * (H0 + h))), a->act);
            if (a->res) v = _mm256_add_ps(v, _mm256_loadu_ps(a->res + at));
            _mm256_storeu_ps(a->y + at, v);
        }
}

#define I8_CASE8(R) \
    case R: \
        for (int b = begin; b < end; b++) { \
            if (R <= 2) i8_half8(a, b, R, 0, 2); \
            else { i8_half8(a, b, R, 0, 1); i8_half8(a, b, R, 1, 1); } \
        } \
        break;

static void i8_task(void *args, int begin, int end) {
    i8_args *a = args;
    switch (a->rows) { I8_CASE8(1) I8_CASE8(2) I8_CASE8(3) I8_CASE8(4) I8_CASE8(5) I8_CASE8(6) I8_CASE8(7) I8_CASE8(8) }
}

/* As the AVX-512 form: per group of 64, scale = max|x| / 127, x_q = round(x / scale) (nearest even). */
static void quantize_rows(const float *x, int rows, int d, int8_t *xq, float *xscale, int32_t *xcomp) {
    const int groups = d / MS_GROUP;
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' lane interleave */
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < groups; g++) {
            const float *xs = x + (size_t)r * d + g * MS_GROUP;
            __m256 v[8], m = _mm256_setzero_ps();
            for (int i = 0; i < 8; i++) {
                v[i] = _mm256_loadu_ps(xs + 8 * i);
                m = _mm256_max_ps(m, abs8(v[i]));
            }
            float top = hmax8(m);
            float scale = top > 0.f ? top / 127.f : 1.f;
            __m256 inv = _mm256_set1_ps(1.f / scale);
            __m256i sum = _mm256_setzero_si256(), q[8];
            for (int i = 0; i < 8; i++) {
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* round to nearest even */
                q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
                sum = _mm256_add_epi32(sum, q[i]);
            }
            for (int k = 0; k < 2; k++) {
                __m256i lo = _mm256_packs_epi32(q[4 * k], q[4 * k + 1]), hi = _mm256_packs_epi32(q[4 * k + 2], q[4 * k + 3]);
                __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
                _mm256_storeu_si256((__m256i *)(xq + (size_t)r * d + g * MS_GROUP + 32 * k), bytes);
            }
            xscale[r * groups + g] = scale;
            xcomp[r * groups + g] = 128 * hsum8_epi32(sum);
        }
}
#define MS_PATH_I8 "avx2"
#endif

#if defined(MS_INT8_KERNELS)

static int amx_linear(const uint8_t *w, const void *scale, const float *x, float *y, int n, int d, int rows, int act,
                      int int4); /* cpu_amx.c: 16 rows or more on AMX tiles, where there are tiles */

/* y (rows, n) = x (rows, d) @ (scale * (W - 128)).T with W packed [n/16][d/4][16][4]. Returns 0 on
 * success, -1 where the build has neither VNNI nor AVX2, -2 for unsupported shapes, -3 out of memory. */
int ms_linear_i8(const uint8_t *w, const float *scale, const float *x, float *y, int n, int d, int rows, int act) {
    if (d % MS_GROUP || n % 16 || d > 65536) return -2;
    const int tiles = amx_linear(w, scale, x, y, n, d, rows, act, 0);
    if (tiles) return tiles == 1 ? 0 : tiles;
    static int8_t q[MS_MAX_ROWS * 65536];
    static float xs[MS_MAX_ROWS * 65536 / MS_GROUP];
    static int32_t xc[MS_MAX_ROWS * 65536 / MS_GROUP];
    pthread_mutex_lock(&scratch_lock);
    for (int r0 = 0; r0 < rows; r0 += MS_MAX_ROWS) {
        int chunk = rows - r0 < MS_MAX_ROWS ? rows - r0 : MS_MAX_ROWS;
        quantize_rows(x + (size_t)r0 * d, chunk, d, q, xs, xc);
        i8_args a = {w, scale, q, xs, xc, y + (size_t)r0 * n, NULL, n, d, chunk, act};
        run(i8_task, &a, n / 16, (size_t)n * d);
    }
    pthread_mutex_unlock(&scratch_lock);
    return 0;
}
#else
int ms_linear_i8(const uint8_t *w, const float *scale, const float *x, float *y, int n, int d, int rows, int act) {
    (void)w; (void)scale; (void)x; (void)y; (void)n; (void)d; (void)rows; (void)act;
    return -1;
}
#define MS_PATH_I8 "none"
#endif

/* ---------------------------------------------------------------- attention, one query */

/* One query token per (row, head) against a key/value cache (B, H, Lmax, hd): scores, softmax
 * and the weighted sum of values in one pass over the first L positions, after writing the new
 * key and value at `pos` (when given). Only the filled part of the cache is read. q, k_new and
 * v_new are (B, H * hd) with row stride `stride`; out is (B, H * hd).
 * An 8-bit cache (i8 set) holds int8 keys and values with one float32 scale per row, head and
 * position in ks, vs (B, H, Lmax): symmetric, q = round(x / s) with s = max|x| / 127 over the
 * head's hd values (model/kv_cache.py is the torch form, bit for bit). */
typedef struct {
    const float *q, *k_new, *v_new;
    void *kc, *vc; /* float, or bfloat16 (uint16_t) when bf16 is set, or int8 when i8 is set */
    float *out;
    long stride;
    int heads, max_len, pos, len, hd, bf16;
    float scale;
    float *ks, *vs; /* the 8-bit cache's scales (B, H, Lmax) */
    int i8;
} attend_args;

/* Prefetch the hd values from element `at` of a cache of kind `bf16` (0 float32, 1 bfloat16, 2 int8),
 * ms_pf bytes ahead: every 64-byte line of the key or value (1, 2 or 4 lines at hd = 64). */
static inline __attribute__((always_inline)) void prefetch_cache(const int bf16, const void *base, size_t at, int hd) {
    const int item = bf16 == 2 ? 1 : bf16 ? 2 : 4;
    const char *p = (const char *)base + at * item;
    for (int off = 0; off < hd * item; off += 64) MS_PREFETCH(p + off);
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512F__)
/* 16 cache values (or the masked head of them) as float32, from float32, bfloat16 (kind 1) or int8
 * (kind 2, before its scale) storage. */
static inline __attribute__((always_inline)) __m512 load_cache(const int bf16, const void *base, size_t at,
                                                              __mmask16 m) {
    if (bf16 == 2) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)base + at)));
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + at);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)base + at);
}

/* CH (chunks of 16 in a head) and BF (the cache's kind: 0 float32, 1 bfloat16, 2 int8 with scales)
 * are constants in the common cases, so the query and the accumulators stay in registers and the
 * loads need no branch. */
static inline __attribute__((always_inline)) void attend_head_impl(const attend_args *a, int b, int h, float *scores,
                                                                  const int CH, const int BF) {
    const int hd = a->hd, chunks = CH;
    const __mmask16 tail = (__mmask16)((1u << (hd - 16 * (chunks - 1))) - 1);
    const float *q = a->q + b * a->stride + h * hd;
    const size_t row = ((size_t)b * a->heads + h) * a->max_len, head = row * hd;
    __m512 qv[16];
    for (int c = 0; c < chunks; c++)
        qv[c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(c == chunks - 1 ? tail : 0xffff, q + 16 * c),
                              _mm512_set1_ps(a->scale));
    /* Scores four keys at a time: four lane-wise products, then one transposing reduction
     * gives the four sums (a horizontal sum per key would cost twice the work and a long chain). */
    __m128 top4 = _mm_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 4 <= a->len; j += 4) {
        __m512 s[4];
        for (int t = 0; t < 4; t++) {
            const size_t kj = head + (size_t)(j + t) * hd;
            prefetch_cache(BF, a->kc, kj, hd);
            s[t] = _mm512_setzero_ps();
            for (int c = 0; c < chunks; c++)
                s[t] = _mm512_fmadd_ps(qv[c], load_cache(BF, a->kc, kj + 16 * c, c == chunks - 1 ? tail : 0xffff), s[t]);
        }
        __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(s[0], s[1]), _mm512_unpackhi_ps(s[0], s[1]));
        __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(s[2], s[3]), _mm512_unpackhi_ps(s[2], s[3]));
        __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
        u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
        u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
        __m128 r = _mm512_castps512_ps128(u); /* lanes: keys j, j+1, j+2, j+3 */
        if (BF == 2) r = _mm_mul_ps(r, _mm_loadu_ps(a->ks + row + j));
        _mm_storeu_ps(scores + j, r);
        top4 = _mm_max_ps(top4, r);
    }
    float t4[4];
    _mm_storeu_ps(t4, top4);
    float top = fmaxf(fmaxf(t4[0], t4[1]), fmaxf(t4[2], t4[3]));
    for (; j < a->len; j++) {
        const size_t kj = head + (size_t)j * hd;
        __m512 s = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++)
            s = _mm512_fmadd_ps(qv[c], load_cache(BF, a->kc, kj + 16 * c, c == chunks - 1 ? tail : 0xffff), s);
        float sj = _mm512_reduce_add_ps(s);
        if (BF == 2) sj *= a->ks[row + j];
        scores[j] = sj;
        top = sj > top ? sj : top;
    }
    __m512 total = _mm512_setzero_ps(), m = _mm512_set1_ps(top);
    for (j = 0; j + 16 <= a->len; j += 16) {
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(scores + j), m));
        _mm512_storeu_ps(scores + j, e);
        total = _mm512_add_ps(total, e);
    }
    if (j < a->len) {
        __mmask16 rest = (__mmask16)((1u << (a->len - j)) - 1);
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, scores + j), m));
        e = _mm512_maskz_mov_ps(rest, e);
        _mm512_mask_storeu_ps(scores + j, rest, e);
        total = _mm512_add_ps(total, e);
    }
    float inv = 1.0f / _mm512_reduce_add_ps(total);
    __m512 acc[16];
    for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
    for (int j = 0; j < a->len; j++) {
        __m512 p = _mm512_set1_ps(BF == 2 ? scores[j] * a->vs[row + j] : scores[j]);
        const size_t vj = head + (size_t)j * hd;
        prefetch_cache(BF, a->vc, vj, hd);
        for (int c = 0; c < chunks; c++)
            acc[c] = _mm512_fmadd_ps(p, load_cache(BF, a->vc, vj + 16 * c, c == chunks - 1 ? tail : 0xffff), acc[c]);
    }
    float *o = a->out + (size_t)b * a->heads * hd + h * hd;
    for (int c = 0; c < chunks; c++)
        _mm512_mask_storeu_ps(o + 16 * c, c == chunks - 1 ? tail : 0xffff, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
}

static void attend_head(const attend_args *a, int b, int h, float *scores) {
    if (a->i8) {
        if (a->hd == 64) attend_head_impl(a, b, h, scores, 4, 2);
        else attend_head_impl(a, b, h, scores, (a->hd + 15) / 16, 2);
    } else if (a->hd == 64 && a->bf16) attend_head_impl(a, b, h, scores, 4, 1);
    else if (a->hd == 64) attend_head_impl(a, b, h, scores, 4, 0);
    else attend_head_impl(a, b, h, scores, (a->hd + 15) / 16, a->bf16);
}
#define MS_PATH_ATTEND "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
/* 8 cache values as float32, from float32, bfloat16 (kind 1: a float32's top half) or int8 (kind 2,
 * before its scale) storage. */
static inline __attribute__((always_inline)) __m256 load_cache8(const int bf16, const void *base, size_t at) {
    if (bf16 == 2) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)base + at))));
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + at))), 16));
    return _mm256_loadu_ps((const float *)base + at);
}

static inline float cache_value(const int bf16, const void *base, size_t at) {
    if (bf16 == 2) return (float)((const int8_t *)base)[at];
    return bf16 ? from_bf16(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

/* As the AVX-512 form, eight lanes wide: CH whole chunks of 8 in a head (a constant in the common
 * case, so the query stays in registers), the last hd % 8 values in scalar code; AVX2 has no
 * 16-bit masked loads for a bfloat16 tail. BF 2, an 8-bit cache, takes the AVX-512 form's float32
 * steps: each score times its key's scale, each probability times its value's. */
static inline __attribute__((always_inline)) void attend_head_impl8(const attend_args *a, int b, int h, float *scores,
                                                                   const int CH, const int BF) {
    const int hd = a->hd, rest = hd - 8 * CH;
    const float *q = a->q + b * a->stride + h * hd;
    const size_t row = ((size_t)b * a->heads + h) * a->max_len, head = row * hd;
    __m256 qv[32];
    float qs[256];
    for (int i = 0; i < hd; i++) qs[i] = q[i] * a->scale;
    for (int c = 0; c < CH; c++) qv[c] = _mm256_loadu_ps(qs + 8 * c);
    /* Scores four keys at a time: four lane-wise products, then one transposing reduction. */
    __m128 top4 = _mm_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 4 <= a->len; j += 4) {
        __m256 s[4];
        float tail[4] = {0.f, 0.f, 0.f, 0.f};
        for (int t = 0; t < 4; t++) {
            const size_t kj = head + (size_t)(j + t) * hd;
            prefetch_cache(BF, a->kc, kj, hd);
            s[t] = _mm256_setzero_ps();
            for (int c = 0; c < CH; c++) s[t] = _mm256_fmadd_ps(qv[c], load_cache8(BF, a->kc, kj + 8 * c), s[t]);
            for (int i = 8 * CH; i < hd; i++) tail[t] += qs[i] * cache_value(BF, a->kc, kj + i);
        }
        __m128 r = hsum8x4(s[0], s[1], s[2], s[3]); /* lanes: keys j, j+1, j+2, j+3 */
        if (rest) r = _mm_add_ps(r, _mm_loadu_ps(tail));
        if (BF == 2) r = _mm_mul_ps(r, _mm_loadu_ps(a->ks + row + j));
        _mm_storeu_ps(scores + j, r);
        top4 = _mm_max_ps(top4, r);
    }
    float t4[4];
    _mm_storeu_ps(t4, top4);
    float top = fmaxf(fmaxf(t4[0], t4[1]), fmaxf(t4[2], t4[3]));
    for (; j < a->len; j++) {
        const size_t kj = head + (size_t)j * hd;
        __m256 s = _mm256_setzero_ps();
        for (int c = 0; c < CH; c++) s = _mm256_fmadd_ps(qv[c], load_cache8(BF, a->kc, kj + 8 * c), s);
        float sj = hsum8(s);
        for (int i = 8 * CH; i < hd; i++) sj += qs[i] * cache_value(BF, a->kc, kj + i);
        if (BF == 2) sj *= a->ks[row + j];
        scores[j] = sj;
        top = sj > top ? sj : top;
    }
    __m256 total = _mm256_setzero_ps(), m = _mm256_set1_ps(top);
    for (j = 0; j + 8 <= a->len; j += 8) {
        __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m));
        _mm256_storeu_ps(scores + j, e);
        total = _mm256_add_ps(total, e);
    }
    if (j < a->len) {
        __m256i rest_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(a->len - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 e = exp_neg8(_mm256_sub_ps(_mm256_maskload_ps(scores + j, rest_mask), m));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(rest_mask));
        _mm256_maskstore_ps(scores + j, rest_mask, e);
        total = _mm256_add_ps(total, e);
    }
    float inv = 1.0f / hsum8(total);
    __m256 acc[32];
    float tail[8] = {0.f};
    for (int c = 0; c < CH; c++) acc[c] = _mm256_setzero_ps();
    for (int j = 0; j < a->len; j++) {
        const float pj = BF == 2 ? scores[j] * a->vs[row + j] : scores[j];
        __m256 p = _mm256_set1_ps(pj);
        const size_t vj = head + (size_t)j * hd;
        prefetch_cache(BF, a->vc, vj, hd);
        for (int c = 0; c < CH; c++) acc[c] = _mm256_fmadd_ps(p, load_cache8(BF, a->vc, vj + 8 * c), acc[c]);
        for (int i = 0; i < rest; i++) tail[i] += pj * cache_value(BF, a->vc, vj + 8 * CH + i);
    }
    float *o = a->out + (size_t)b * a->heads * hd + h * hd;
    for (int c = 0; c < CH; c++) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
    for (int i = 0; i < rest; i++) o[8 * CH + i] = tail[i] * inv;
}

static void attend_head(const attend_args *a, int b, int h, float *scores) {
    if (a->i8) {
        if (a->hd == 64) attend_head_impl8(a, b, h, scores, 8, 2);
        else attend_head_impl8(a, b, h, scores, a->hd / 8, 2);
    } else if (a->hd == 64 && a->bf16) attend_head_impl8(a, b, h, scores, 8, 1);
    else if (a->hd == 64) attend_head_impl8(a, b, h, scores, 8, 0);
    else attend_head_impl8(a, b, h, scores, a->hd / 8, a->bf16);
}
#define MS_PATH_ATTEND "avx2"
#else
static void attend_head(const attend_args *a, int b, int h, float *scores) {
    const int hd = a->hd;
    const float *q = a->q + b * a->stride + h * hd;
    const size_t head = ((size_t)b * a->heads + h) * a->max_len * hd;
#define CACHE(base, at) (a->bf16 ? from_bf16(((const uint16_t *)(base))[head + (at)]) : ((const float *)(base))[head + (at)])
    float top = -INFINITY, total = 0.f;
    for (int j = 0; j < a->len; j++) {
        float s = 0.f;
        for (int i = 0; i < hd; i++) s += q[i] * CACHE(a->kc, (size_t)j * hd + i);
        scores[j] = s * a->scale;
        top = scores[j] > top ? scores[j] : top;
    }
    for (int j = 0; j < a->len; j++) total += (scores[j] = expf(scores[j] - top));
    float *o = a->out + (size_t)b * a->heads * hd + h * hd;
    for (int i = 0; i < hd; i++) o[i] = 0.f;
    for (int j = 0; j < a->len; j++)
        for (int i = 0; i < hd; i++) o[i] += scores[j] / total * CACHE(a->vc, (size_t)j * hd + i);
#undef CACHE
}
#define MS_PATH_ATTEND "portable"
#endif

/* One head's hd values as int8 at `q` and its scale at `s`, as model/kv_cache.py quantizes them
 * (the same float32 operations: max|x| / 127, then round half to even of x / scale). */
static void quantize_head(const float *x, int hd, int8_t *q, float *s) {
#if defined(__AVX512F__)
    /* 16 lanes at a time, the same operations lane by lane (IEEE division, round half to even),
     * so the bytes are the scalar loop's: a re-prime slice stores 64 rows x 1024 values a layer. */
    __m512 top16 = _mm512_setzero_ps();
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 m = hd - i >= 16 ? 0xffff : (__mmask16)((1u << (hd - i)) - 1);
        top16 = _mm512_max_ps(top16, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)));
    }
    const float top = _mm512_reduce_max_ps(top16);
    const float scale = top / 127.0f, div = scale > 0.f ? scale : 1.0f;
    const __m512 d = _mm512_set1_ps(div), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 m = hd - i >= 16 ? 0xffff : (__mmask16)((1u << (hd - i)) - 1);
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), d),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(q + i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
#else
    float top = 0.f;
    for (int i = 0; i < hd; i++) top = fmaxf(top, fabsf(x[i]));
    const float scale = top / 127.0f, div = scale > 0.f ? scale : 1.0f;
    for (int i = 0; i < hd; i++) {
        float v = nearbyintf(x[i] / div);
        q[i] = (int8_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
    }
#endif
    *s = scale;
}

/* One query against an 8-bit cache, in portable C (the AVX-512 and AVX2 builds take their
 * attend_head's kind 2): scores q . k_j * ks_j, softmax, sum_j p_j vs_j v_j. */
static __attribute__((unused)) void attend_head_i8(const attend_args *a, int b, int h, float *scores) {
    const int hd = a->hd;
    const float *q = a->q + b * a->stride + h * hd;
    const size_t row = ((size_t)b * a->heads + h) * a->max_len, head = row * hd;
    const int8_t *kc = (const int8_t *)a->kc + head, *vc = (const int8_t *)a->vc + head;
    const float *ks = a->ks + row, *vs = a->vs + row;
    float top = -INFINITY, total = 0.f;
    float *o = a->out + (size_t)b * a->heads * hd + h * hd;
    for (int j = 0; j < a->len; j++) {
        float s = 0.f;
        for (int i = 0; i < hd; i++) s += q[i] * (float)kc[(size_t)j * hd + i];
        scores[j] = s * a->scale * ks[j];
        top = scores[j] > top ? scores[j] : top;
    }
    for (int j = 0; j < a->len; j++) total += (scores[j] = expf(scores[j] - top));
    for (int i = 0; i < hd; i++) o[i] = 0.f;
    for (int j = 0; j < a->len; j++) {
        const float p = scores[j] * vs[j] / total;
        for (int i = 0; i < hd; i++) o[i] += p * (float)vc[(size_t)j * hd + i];
    }
}

/* Every cache layout: attend_head takes all three with AVX-512 or AVX2, the float32 and bfloat16
 * ones in the portable build, where the 8-bit one takes the portable loop. */
static inline void attend_any(const attend_args *a, int b, int h, float *scores) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    attend_head(a, b, h, scores);
#else
    if (a->i8) attend_head_i8(a, b, h, scores);
    else attend_head(a, b, h, scores);
#endif
}

/* Store the new key and value of row b, head h at position `pos` (rounded to nearest even for a
 * bfloat16 cache, quantized with its scale for an 8-bit one). */
static void write_kv(const attend_args *a, int b, int h) {
    const int hd = a->hd;
    const size_t at = (((size_t)b * a->heads + h) * a->max_len + a->pos) * hd;
    const float *kn = a->k_new + b * a->stride + h * hd, *vn = a->v_new + b * a->stride + h * hd;
    if (a->i8) {
        const size_t s = ((size_t)b * a->heads + h) * a->max_len + a->pos;
        quantize_head(kn, hd, (int8_t *)a->kc + at, a->ks + s);
        quantize_head(vn, hd, (int8_t *)a->vc + at, a->vs + s);
    } else if (a->bf16) {
        for (int i = 0; i < hd; i++) {
            ((uint16_t *)a->kc)[at + i] = to_bf16(kn[i]);
            ((uint16_t *)a->vc)[at + i] = to_bf16(vn[i]);
        }
    } else {
        memcpy((float *)a->kc + at, kn, sizeof(float) * hd);
        memcpy((float *)a->vc + at, vn, sizeof(float) * hd);
    }
}

static void attend_task(void *args, int begin, int end) {
    const attend_args *a = args;
    float stack[4096];
    float *scores = a->len <= 4096 ? stack : malloc(sizeof(float) * a->len);
    if (!scores) return;
    for (int i = begin; i < end; i++) attend_any(a, i / a->heads, i % a->heads, scores);
    if (scores != stack) free(scores);
}

/* Returns 0, or -2 when `pos`/`len` do not fit the cache. The cache holds float32, or bfloat16
 * when `bf16` is set (new keys and values are rounded to nearest even when written), or int8 with
 * the scales ks, vs when `i8` is set. */
int ms_attend(const float *q, const float *k_new, const float *v_new, long stride, void *kc, void *vc,
              float *out, int batch, int heads, int max_len, int hd, int pos, int len, float scale, int bf16,
              float *ks, float *vs, int i8) {
    if (len < 1 || len > max_len || pos >= max_len || (k_new && pos < 0) || hd > 256) return -2;
    if (i8 && (!ks || !vs || bf16)) return -2;
    attend_args a = {q, k_new, v_new, kc, vc, out, stride, heads, max_len, pos, len, hd, bf16, scale, ks, vs, i8};
    if (k_new)
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++) write_kv(&a, b, h);
    size_t item = i8 ? 1 : bf16 ? 2 : sizeof(float);
    run(attend_task, &a, batch * heads, (size_t)batch * heads * len * hd * 2 * item);
    return 0;
}

/* ---------------------------------------------------------------- an 8-bit cache, many positions */

/* A prefill's keys or values (B, H, T, hd), strided (element strides sb, sh, st; the last dimension
 * contiguous), into an 8-bit cache (B, H, L, hd) with its scales (B, H, L) at positions pos[t], each
 * head quantized as quantize_head does; then, when `out` is given, the cache's first `upto`
 * positions dequantized into out (B, H, upto, hd): float(q) * scale, as the torch form computes it.
 * One call per layer instead of a dozen torch operations (model/kv_cache.py QuantizedKVCache). */
typedef struct {
    const float *x;
    long sb, sh, st;
    const int64_t *pos;
    int8_t *cache;
    float *scales, *out;
    int heads, T, L, hd, upto;
} kv_store_args;

static void kv_store_task(void *args, int begin, int end) {
    const kv_store_args *a = args;
    for (int i = begin; i < end; i++) {
        const int b = i / a->heads, h = i % a->heads;
        const size_t row = (size_t)i * a->L;
        for (int t = 0; t < a->T; t++) {
            const size_t at = row + (size_t)a->pos[t];
            quantize_head(a->x + b * a->sb + h * a->sh + t * a->st, a->hd, a->cache + at * a->hd, a->scales + at);
        }
        if (!a->out) continue;
        float *o = a->out + (size_t)i * a->upto * a->hd;
        for (int j = 0; j < a->upto; j++) {
            const int8_t *q = a->cache + (row + j) * a->hd;
            const float s = a->scales[row + j];
            for (int d = 0; d < a->hd; d++) o[(size_t)j * a->hd + d] = (float)q[d] * s;
        }
    }
}

/* Returns 0, or -2 when a position or `upto` does not fit the cache. */
int ms_kv_store_i8(const float *x, long sb, long sh, long st, const int64_t *pos, int T, int8_t *cache,
                   float *scales, int batch, int heads, int L, int hd, float *out, int upto) {
    if (hd < 1 || T < 0 || upto < 0 || upto > L) return -2;
    for (int t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= L) return -2;
    kv_store_args a = {x, sb, sh, st, pos, cache, scales, out, heads, T, L, hd, upto};
    run(kv_store_task, &a, batch * heads, (size_t)batch * heads * (T + (out ? upto : 0)) * hd * 5);
    return 0;
}

/* 16 (8) bfloat16 values as float32 lanes: the int4 products' group scales. */
#if defined(__AVX512F__)
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif
#if defined(__AVX2__)
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

#include "cpu_reduced.c" /* the int4 and bfloat16 products, in this translation unit */
#include "cpu_amx.c" /* many-row int8 and int4 products on AMX tiles */
#include "cpu_block.c" /* the fused decoder block, in this translation unit */
#include "cpu_codec.c" /* the stateful codec decoder as one plan */

/* Which path each kernel family was compiled with, e.g. "f32=avx2 i8=avx2 i4=avx2 bf16=avx2
 * attend=avx2 codec=avx2" for an x86-64-v3 build (kernels/cpu.py: paths()). */
const char *ms_paths(void) {
    return "f32=" MS_PATH_F32 " i8=" MS_PATH_I8 " i4=" MS_PATH_I4 " bf16=" MS_PATH_BF16 " attend=" MS_PATH_ATTEND " codec=" CONV_PATH;
}
