/* The reduced-precision weight products: int4 (groups of 64 inputs, unpacked in registers for VNNI)
 * and bfloat16 (AVX-512 BF16), for the same few rows as the float32 and int8 products.
 *
 * Part of cpu_gemv.c's translation unit (included after its int8 products and attention, whose
 * activation quantization, scratch lock, threads and bfloat16 rounding it reuses); the packed
 * layouts are described at the top of cpu_gemv.c. cpu_block.c calls the tasks defined here.
 */

/* ---------------------------------------------------------------- int4 (VNNI) */

typedef struct {
    const uint8_t *w;
    const uint16_t *scale; /* [n/16][d/64][16]: bfloat16, per output and group of 64 inputs */
    const int8_t *xq;     /* (rows, d) */
    const float *xscale;  /* (rows, d/64) */
    const int32_t *xcomp; /* (rows, d/64): 128 * sum of the group's x_q (16 times the int4 offset) */
    float *y;
    const float *res;     /* added after the activation, or NULL */
    int n, d, rows, act;
} i4_args;

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* One block of 16 outputs: per group, 8 vectors of packed nibbles become 16 of unsigned bytes,
 * two vpdpbusd chains per row; the group's sums are scaled by its weight and activation scales. */
static inline __attribute__((always_inline)) void i4_block(const i4_args *a, int b, const int R) {
    const int d = a->d, groups = d / MS_GROUP;
    const uint8_t *w = a->w + (size_t)b * d * 8;
    const uint16_t *ws = a->scale + (size_t)b * groups * 16;
    const __m512i nib = _mm512_set1_epi8(0x0f);
    __m512 out[MS_MAX_ROWS];
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i acc[MS_MAX_ROWS][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        const uint8_t *wg = w + (size_t)g * MS_GROUP * 8;
        for (int j = 0; j < 8; j++) {
            MS_PREFETCH(wg + j * 64);
            __m512i v = _mm512_loadu_si512(wg + j * 64);
            __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            for (int r = 0; r < R; r++) {
                const int32_t *xr = (const int32_t *)(a->xq + (size_t)r * d + g * MS_GROUP);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], lo, _mm512_set1_epi32(xr[j]));
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], hi, _mm512_set1_epi32(xr[j + 8]));
            }
        }
        __m512 wsv = bf16x16(ws + g * 16);
        for (int r = 0; r < R; r++) {
            __m512i s = _mm512_sub_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]),
                                         _mm512_set1_epi32(a->xcomp[r * groups + g] >> 4));
            out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wsv, _mm512_set1_ps(a->xscale[r * groups + g])),
                                     out[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        const size_t at = (size_t)r * a->n + b * 16;
        __m512 v = activate(out[r], a->act);
        if (a->res) v = _mm512_add_ps(v, _mm512_loadu_ps(a->res + at));
        _mm512_storeu_ps(a->y + at, v);
    }
}

#define I4_CASE(R) case R: for (int b = begin; b < end; b++) i4_block(a, b, R); break;

static void i4_task(void *args, int begin, int end) {
    i4_args *a = args;
    switch (a->rows) { I4_CASE(1) I4_CASE(2) I4_CASE(3) I4_CASE(4) I4_CASE(5) I4_CASE(6) I4_CASE(7) I4_CASE(8) }
}
#define MS_PATH_I4 "vnni"
#elif defined(__AVX2__) && defined(__FMA__)
/* Without VNNI: the nibbles (q + 8, 0..15) as unsigned bytes into vpmaddubsw against x_q. A pair
 * of products is at most 2 * 15 * 127 = 3810 in magnitude, so the low and the high nibbles each
 * keep an int16 chain over a group's 8 vectors (8 * 3810 = 30480, inside int16: exact), widened
 * once per group by vpmaddwd; the offset comes back as 8 * sum(x_q), as in the VNNI path. The
 * two 8-lane halves of a block are taken one after the other within each group (512 bytes, in L1). */
static inline __attribute__((always_inline)) void i4_block8(const i4_args *a, int b, const int R) {
    const int d = a->d, groups = d / MS_GROUP;
    const uint8_t *w = a->w + (size_t)b * d * 8;
    const uint16_t *ws = a->scale + (size_t)b * groups * 16;
    const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 out[MS_MAX_ROWS][2];
    for (int r = 0; r < R; r++) out[r][0] = out[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *wg = w + (size_t)g * MS_GROUP * 8;
        for (int h = 0; h < 2; h++) {
            __m256i acc[MS_MAX_ROWS][2];
            for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                if (h == 0) MS_PREFETCH(wg + j * 64);
                __m256i v = _mm256_loadu_si256((const __m256i *)(wg + j * 64 + 32 * h));
                __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                for (int r = 0; r < R; r++) {
                    const int32_t *xr = (const int32_t *)(a->xq + (size_t)r * d + g * MS_GROUP);
                    acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xr[j])));
                    acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xr[j + 8])));
                }
            }
            __m256 wsv = bf16x8(ws + g * 16 + 8 * h);
            for (int r = 0; r < R; r++) {
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(acc[r][0], ones), _mm256_madd_epi16(acc[r][1], ones));
                s = _mm256_sub_epi32(s, _mm256_set1_epi32(a->xcomp[r * groups + g] >> 4));
                out[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(wsv, _mm256_set1_ps(a->xscale[r * groups + g])),
                                            out[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) {
            const size_t at = (size_t)r * a->n + b * 16 + 8 * h;
            __m256 v = activate8(out[r][h], a->act);
            if (a->res) v = _mm256_add_ps(v, _mm256_loadu_ps(a->res + at));
            _mm256_storeu_ps(a->y + at, v);
        }
}

#define I4_CASE8(R) case R: for (int b = begin; b < end; b++) i4_block8(a, b, R); break;

static void i4_task(void *args, int begin, int end) {
    i4_args *a = args;
    switch (a->rows) { I4_CASE8(1) I4_CASE8(2) I4_CASE8(3) I4_CASE8(4) I4_CASE8(5) I4_CASE8(6) I4_CASE8(7) I4_CASE8(8) }
}
#define MS_PATH_I4 "avx2"
#endif

#if defined(MS_INT8_KERNELS)

/* y (rows, n) = x (rows, d) @ W.T with W int4 per group of 64 inputs (packed as above). Returns 0,
 * -1 where the build has neither VNNI nor AVX2, -2 for unsupported shapes. */
int ms_linear_i4(const uint8_t *w, const uint16_t *scale, const float *x, float *y, int n, int d, int rows, int act) {
    if (d % MS_GROUP || n % 16 || d > 65536) return -2;
    const int tiles = amx_linear(w, scale, x, y, n, d, rows, act, 1);
    if (tiles) return tiles == 1 ? 0 : tiles;
    static int8_t q[MS_MAX_ROWS * 65536];
    static float xs[MS_MAX_ROWS * 65536 / MS_GROUP];
    static int32_t xc[MS_MAX_ROWS * 65536 / MS_GROUP];
    pthread_mutex_lock(&scratch_lock);
    for (int r0 = 0; r0 < rows; r0 += MS_MAX_ROWS) {
        int chunk = rows - r0 < MS_MAX_ROWS ? rows - r0 : MS_MAX_ROWS;
        quantize_rows(x + (size_t)r0 * d, chunk, d, q, xs, xc);
        i4_args a = {w, scale, q, xs, xc, y + (size_t)r0 * n, NULL, n, d, chunk, act};
        run(i4_task, &a, n / 16, (size_t)n * d / 2);
    }
    pthread_mutex_unlock(&scratch_lock);
    return 0;
}
#else
int ms_linear_i4(const uint8_t *w, const uint16_t *scale, const float *x, float *y, int n, int d, int rows, int act) {
    (void)w; (void)scale; (void)x; (void)y; (void)n; (void)d; (void)rows; (void)act;
    return -1;
}
#define MS_PATH_I4 "none"
#endif

/* ---------------------------------------------------------------- bfloat16 */

typedef struct {
    const uint16_t *w;
    const uint32_t *xb; /* (rows, d/2): x rounded to bfloat16, two inputs per 32-bit word */
    float *y;
    const float *res;   /* added after the activation, or NULL */
    int n, d, rows, act;
} bf16_args;

/* x (rows, d) float32 -> bfloat16 pairs (rows, d/2), rounded to nearest even. */
static void bf16_rows(const float *x, int rows, int d, uint32_t *xb) {
    for (int r = 0; r < rows; r++) {
        const float *xs = x + (size_t)r * d;
        uint16_t *o = (uint16_t *)(xb + (size_t)r * (d / 2));
        int i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
        for (; i + 32 <= d; i += 32)
            _mm512_storeu_si512(o + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xs + i + 16), _mm512_loadu_ps(xs + i)));
#endif
        for (; i < d; i++) o[i] = to_bf16(xs[i]);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
/* One block of 16 outputs for R rows: one vdpbf16ps per 64 bytes of weights and row, U chains. */
static inline __attribute__((always_inline)) void bf16_block(const bf16_args *a, int b, const int R, const int U) {
    const int d2 = a->d / 2;
    const uint16_t *w = a->w + (size_t)b * a->d * 16;
    __m512 acc[MS_MAX_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < U; u++) acc[r][u] = _mm512_setzero_ps();
    const int body = d2 - d2 % U;
    for (int p = 0; p < body; p += U) {
        for (int u = 0; u < U; u++) {
            MS_PREFETCH(w + (size_t)(p + u) * 32);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (size_t)(p + u) * 32);
            for (int r = 0; r < R; r++)
                acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wv, (__m512bh)_mm512_set1_epi32((int)a->xb[(size_t)r * d2 + p + u]));
        }
    }
    for (int p = body; p < d2; p++) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (size_t)p * 32);
        for (int r = 0; r < R; r++)
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, (__m512bh)_mm512_set1_epi32((int)a->xb[(size_t)r * d2 + p]));
    }
    for (int r = 0; r < R; r++) {
        const size_t at = (size_t)r * a->n + b * 16;
        __m512 s = acc[r][0];
        for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[r][u]);
        s = activate(s, a->act);
        if (a->res) s = _mm512_add_ps(s, _mm512_loadu_ps(a->res + at));
        _mm512_storeu_ps(a->y + at, s);
    }
}

#define BF16_CASE(R) case R: for (int b = begin; b < end; b++) bf16_block(a, b, R, R <= 2 ? 4 : 2); break;

static void bf16_task(void *args, int begin, int end) {
    bf16_args *a = args;
    switch (a->rows) { BF16_CASE(1) BF16_CASE(2) BF16_CASE(3) BF16_CASE(4) BF16_CASE(5) BF16_CASE(6) BF16_CASE(7) BF16_CASE(8) }
}
#define MS_PATH_BF16 "avx512bf16"
#elif defined(__AVX2__) && defined(__FMA__)
/* Without AVX-512 BF16: each 32-bit lane holds a pair of bfloat16 weights; shifted left by 16 (the
 * even input) or masked to its top half (the odd one) it is that weight as float32, times x's pair
 * converted the same way, summed by FMA in float32. E chains per half and row (even and odd apart
 * for up to 2 rows), NH halves of 8 lanes per pass over the block's weights from H0. */
static inline __attribute__((always_inline)) void bf16_half8(const bf16_args *a, int b, const int R, const int E,
                                                             const int H0, const int NH) {
    const int d2 = a->d / 2;
    const uint16_t *w = a->w + (size_t)b * a->d * 16;
    const __m256i top = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[MS_MAX_ROWS][2][2];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++)
            for (int e = 0; e < E; e++) acc[r][h][e] = _mm256_setzero_ps();
    for (int p = 0; p < d2; p++) {
        MS_PREFETCH(w + (size_t)p * 32);
        __m256 x0[MS_MAX_ROWS], x1[MS_MAX_ROWS];
        for (int r = 0; r < R; r++) {
            __m256i xv = _mm256_set1_epi32((int)a->xb[(size_t)r * d2 + p]);
            x0[r] = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));
            x1[r] = _mm256_castsi256_ps(_mm256_and_si256(xv, top));
        }
        for (int h = 0; h < NH; h++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (size_t)p * 32 + 16 * (H0 + h)));
            __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), w1 = _mm256_castsi256_ps(_mm256_and_si256(wv, top));
            for (int r = 0; r < R; r++) {
                acc[r][h][0] = _mm256_fmadd_ps(w0, x0[r], acc[r][h][0]);
                acc[r][h][E - 1] = _mm256_fmadd_ps(w1, x1[r], acc[r][h][E - 1]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++) {
            const size_t at = (size_t)r * a->n + b * 16 + 8 * (H0 + h);
            __m256 s = E == 2 ? _mm256_add_ps(acc[r][h][0], acc[r][h][1]) : acc[r][h][0];
            s = activate8(s, a->act);
            if (a->res) s = _mm256_add_ps(s, _mm256_loadu_ps(a->res + at));
            _mm256_storeu_ps(a->y + at, s);
        }
}

#define BF16_CASE8(R) \
    case R: \
        for (int b = begin; b < end; b++) { \
            if (R <= 2) bf16_half8(a, b, R, 2, 0, 2); \
            else { bf16_half8(a, b, R, 1, 0, 1); bf16_half8(a, b, R, 1, 1, 1); } \
        } \
        break;

static void bf16_task(void *args, int begin, int end) {
    bf16_args *a = args;
    switch (a->rows) { BF16_CASE8(1) BF16_CASE8(2) BF16_CASE8(3) BF16_CASE8(4) BF16_CASE8(5) BF16_CASE8(6) BF16_CASE8(7) BF16_CASE8(8) }
}
#define MS_PATH_BF16 "avx2"
#else
/* Without AVX-512 BF16: the same rounding of x and float32 sums of the same products. */
static void bf16_task(void *args, int begin, int end) {
    bf16_args *a = args;
    const int d2 = a->d / 2;
    for (int b = begin; b < end; b++) {
        const uint16_t *w = a->w + (size_t)b * a->d * 16;
        for (int r = 0; r < a->rows; r++) {
            float acc[16] = {0};
            const uint16_t *x = (const uint16_t *)(a->xb + (size_t)r * d2);
            for (int p = 0; p < d2; p++) {
                const float x0 = from_bf16(x[2 * p]), x1 = from_bf16(x[2 * p + 1]);
                for (int j = 0; j < 16; j++)
                    acc[j] += from_bf16(w[(size_t)p * 32 + 2 * j]) * x0 + from_bf16(w[(size_t)p * 32 + 2 * j + 1]) * x1;
            }
            for (int j = 0; j < 16; j++) {
                size_t at = (size_t)r * a->n + b * 16 + j;
                a->y[at] = act_scalar(acc[j], a->act) + (a->res ? a->res[at] : 0.f);
            }
        }
    }
}
#define MS_PATH_BF16 "portable"
#endif

static pthread_mutex_t bf16_scratch_lock = PTHREAD_MUTEX_INITIALIZER; /* the activations' scratch */

/* y (rows, n) = x (rows, d) @ W.T with W bfloat16 packed [n/16][d/2][16][2] and x rounded to
 * bfloat16. Returns 0, or -2 for unsupported shapes (n not a multiple of 16, d odd or > 65536). */
int ms_linear_bf16(const uint16_t *w, const float *x, float *y, int n, int d, int rows, int act) {
    if (d % 2 || n % 16 || d > 65536) return -2;
    static uint32_t xb[MS_MAX_ROWS * 65536 / 2];
    pthread_mutex_lock(&bf16_scratch_lock);
    for (int r0 = 0; r0 < rows; r0 += MS_MAX_ROWS) {
        int chunk = rows - r0 < MS_MAX_ROWS ? rows - r0 : MS_MAX_ROWS;
        bf16_rows(x + (size_t)r0 * d, chunk, d, xb);
        bf16_args a = {w, xb, y + (size_t)r0 * n, NULL, n, d, chunk, act};
        run(bf16_task, &a, n / 16, (size_t)n * d * 2);
    }
    pthread_mutex_unlock(&bf16_scratch_lock);
    return 0;
}
