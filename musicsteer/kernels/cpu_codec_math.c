/* The arithmetic of the codec plan (cpu_codec.c, which includes this file after its types): the
 * convolution tiles, the products of its LSTM and transposed convolutions, ELU and the LSTM's
 * cell, and how a stage's work splits over threads.
 *
 * A convolution is a sum over its taps of products with the input shifted by the dilation: the
 * tile kernel reads its window in place (no im2col copy), tiles of time steps by 16 or 32 outputs,
 * weights packed as the float32 products' (blocks of 16 outputs, inputs ordered tap then channel).
 * The products of the LSTM and the transposed convolutions are cpu_gemv.c's (f32_task, i8_task,
 * quantize_rows): the same kernels and activation quantization as the Python decoder's.
 */

/* ---------------------------------------------------------------- threads */

/* items split over up to `threads` threads in chunks taken from a counter (a preempted vCPU holds
 * one chunk, not half the work); small work runs on the calling thread. */
static void codec_run(const ms_codec_plan *P, ms_task task, void *args, int items, double macs) {
    int threads = P->threads;
    if (macs < P->parallel || threads > items) threads = macs < P->parallel ? 1 : items;
    if (threads <= 1) { task(args, 0, items); return; }
    atomic_int next;
    atomic_init(&next, 0);
    int grain = items / (4 * threads);
    if (grain < 1) grain = 1;
#pragma omp parallel num_threads(threads)
    for (;;) {
        int b = atomic_fetch_add(&next, grain);
        if (b >= items) break;
        task(args, b, b + grain < items ? b + grain : items);
    }
}

/* ---------------------------------------------------------------- convolution tiles */

typedef struct {
    const float *w;    /* packed [n/16][taps * c_in][16] */
    const float *x;    /* window: rows + (taps - 1) * dil rows of ld floats */
    float *y;          /* (rows, n) */
    const float *bias, *res;
    int n, c_in, taps, dil, ld, rows, tiles, pair;
} conv_args;

#if defined(__AVX512F__)
#define CONV_ROWS 12
/* R time steps by NB blocks of 16 outputs from block b: R * NB accumulators, one weight load per
 * block and input, the input broadcast from memory; for few rows, U partial sums over the inputs
 * keep enough chains of FMAs in flight. */
static inline __attribute__((always_inline)) void conv_tile(const conv_args *a, int b, int r0, const int R, const int NB) {
    const int K = a->taps * a->c_in, U = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    const float *w0 = a->w + (size_t)b * K * 16;
    __m512 acc[CONV_ROWS][2][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NB; v++)
            for (int u = 0; u < U; u++) acc[r][v][u] = _mm512_setzero_ps();
    for (int j = 0; j < a->taps; j++) {
        const float *xj = a->x + (size_t)(r0 + j * a->dil) * a->ld;
        const float *wj = w0 + (size_t)j * a->c_in * 16;
        const int body = a->c_in - a->c_in % U;
        for (int c = 0; c < body; c += U)
            for (int u = 0; u < U; u++) {
                MS_PREFETCH(wj + (size_t)(c + u) * 16);
                if (NB > 1) MS_PREFETCH(wj + (size_t)K * 16 + (size_t)(c + u) * 16);
                __m512 wa = _mm512_loadu_ps(wj + (size_t)(c + u) * 16);
                __m512 wb = NB > 1 ? _mm512_loadu_ps(wj + (size_t)K * 16 + (size_t)(c + u) * 16) : wa;
                for (int r = 0; r < R; r++) {
                    __m512 xv = _mm512_set1_ps(xj[(size_t)r * a->ld + c + u]);
                    acc[r][0][u] = _mm512_fmadd_ps(wa, xv, acc[r][0][u]);
                    if (NB > 1) acc[r][1][u] = _mm512_fmadd_ps(wb, xv, acc[r][1][u]);
                }
            }
        for (int c = body; c < a->c_in; c++) {
            __m512 wa = _mm512_loadu_ps(wj + (size_t)c * 16);
            __m512 wb = NB > 1 ? _mm512_loadu_ps(wj + (size_t)K * 16 + (size_t)c * 16) : wa;
            for (int r = 0; r < R; r++) {
                __m512 xv = _mm512_set1_ps(xj[(size_t)r * a->ld + c]);
                acc[r][0][0] = _mm512_fmadd_ps(wa, xv, acc[r][0][0]);
                if (NB > 1) acc[r][1][0] = _mm512_fmadd_ps(wb, xv, acc[r][1][0]);
            }
        }
    }
    for (int v = 0; v < NB; v++) {
        const int o = (b + v) * 16;
        __m512 bias = a->bias ? _mm512_loadu_ps(a->bias + o) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            const size_t at = (size_t)(r0 + r) * a->n + o;
            __m512 s = acc[r][v][0];
            for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[r][v][u]);
            if (a->bias) s = _mm512_add_ps(s, bias);
            if (a->res) s = _mm512_add_ps(s, _mm512_loadu_ps(a->res + at));
            _mm512_storeu_ps(a->y + at, s);
        }
    }
}
#define CONV_PATH "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CONV_ROWS 6
/* As the AVX-512 form, eight lanes wide: one block of 16 outputs is NB = 2 halves. */
static inline __attribute__((always_inline)) void conv_tile8(const conv_args *a, int b, int r0, const int R) {
    const int K = a->taps * a->c_in;
    const float *w0 = a->w + (size_t)b * K * 16;
    __m256 acc[CONV_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int j = 0; j < a->taps; j++) {
        const float *xj = a->x + (size_t)(r0 + j * a->dil) * a->ld;
        const float *wj = w0 + (size_t)j * a->c_in * 16;
        for (int c = 0; c < a->c_in; c++) {
            MS_PREFETCH(wj + (size_t)c * 16);
            __m256 wa = _mm256_loadu_ps(wj + (size_t)c * 16), wb = _mm256_loadu_ps(wj + (size_t)c * 16 + 8);
            for (int r = 0; r < R; r++) {
                __m256 xv = _mm256_broadcast_ss(xj + (size_t)r * a->ld + c);
                acc[r][0] = _mm256_fmadd_ps(wa, xv, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(wb, xv, acc[r][1]);
            }
        }
    }
    const int o = b * 16;
    for (int h = 0; h < 2; h++) {
        __m256 bias = a->bias ? _mm256_loadu_ps(a->bias + o + 8 * h) : _mm256_setzero_ps();
        for (int r = 0; r < R; r++) {
            const size_t at = (size_t)(r0 + r) * a->n + o + 8 * h;
            __m256 s = a->bias ? _mm256_add_ps(acc[r][h], bias) : acc[r][h];
            if (a->res) s = _mm256_add_ps(s, _mm256_loadu_ps(a->res + at));
            _mm256_storeu_ps(a->y + at, s);
        }
    }
}
#define CONV_PATH "avx2"
#else
#define CONV_ROWS 4
#define CONV_PATH "portable"
#endif

#define CONV_CASE(R) case R: conv_tile(a, b, r0, R, a->pair ? 2 : 1); break;
#define CONV_CASE8(R) case R: conv_tile8(a, b, r0, R); break;

/* Items are (block group, time tile), block-major: consecutive items reuse one group's weights. */
static void conv_task(void *args, int begin, int end) {
    const conv_args *a = args;
    for (int i = begin; i < end; i++) {
        const int g = i / a->tiles, r0 = (i % a->tiles) * CONV_ROWS;
        const int R = a->rows - r0 < CONV_ROWS ? a->rows - r0 : CONV_ROWS;
#if defined(__AVX512F__)
        const int b = a->pair ? 2 * g : g;
        switch (R) {
            CONV_CASE(1) CONV_CASE(2) CONV_CASE(3) CONV_CASE(4) CONV_CASE(5) CONV_CASE(6)
            CONV_CASE(7) CONV_CASE(8) CONV_CASE(9) CONV_CASE(10) CONV_CASE(11) CONV_CASE(12)
        }
#elif defined(__AVX2__) && defined(__FMA__)
        const int b = g;
        switch (R) { CONV_CASE8(1) CONV_CASE8(2) CONV_CASE8(3) CONV_CASE8(4) CONV_CASE8(5) CONV_CASE8(6) }
#else
        const int b = g, K = a->taps * a->c_in;
        const float *w0 = a->w + (size_t)b * K * 16;
        for (int r = r0; r < r0 + R; r++) {
            float acc[16] = {0};
            for (int j = 0; j < a->taps; j++) {
                const float *xj = a->x + (size_t)(r + j * a->dil) * a->ld, *wj = w0 + (size_t)j * a->c_in * 16;
                for (int c = 0; c < a->c_in; c++)
                    for (int u = 0; u < 16; u++) acc[u] += wj[(size_t)c * 16 + u] * xj[c];
            }
            for (int u = 0; u < 16; u++) {
                const size_t at = (size_t)r * a->n + b * 16 + u;
                float s = a->bias ? acc[u] + a->bias[b * 16 + u] : acc[u];
                a->y[at] = a->res ? s + a->res[at] : s;
            }
        }
#endif
    }
}

/* Outputs a plain (n, taps * c_in) weight computes one by one (n not a multiple of 16: the last
 * convolution's single channel), 16 partial sums per dot product; items are time steps. */
static void plain_task(void *args, int begin, int end) {
    const conv_args *a = args;
    for (int r = begin; r < end; r++)
        for (int o = 0; o < a->n; o++) {
            const float *wo = a->w + (size_t)o * a->taps * a->c_in;
            float acc[16] = {0};
            for (int j = 0; j < a->taps; j++) {
                const float *xj = a->x + (size_t)(r + j * a->dil) * a->ld, *wj = wo + (size_t)j * a->c_in;
                int c = 0;
                for (; c + 16 <= a->c_in; c += 16)
                    for (int u = 0; u < 16; u++) acc[u] += xj[c + u] * wj[c + u];
                for (; c < a->c_in; c++) acc[c % 16] += xj[c] * wj[c];
            }
            float s = 0.f;
            for (int u = 0; u < 16; u++) s += acc[u];
            if (a->bias) s += a->bias[o];
            const size_t at = (size_t)r * a->n + o;
            a->y[at] = a->res ? s + a->res[at] : s;
        }
}

/* y (rows, n) = sum over taps j of x[rows shifted by j * dil] @ W_j.T (+ bias) (+ res): a float32
 * convolution over a window of rows + (taps - 1) * dil rows, or with taps = 1 a product. */
static void conv_rows(const ms_codec_plan *P, const cmat *M, int taps, int dil, const float *x, int ld, int rows, float *y,
                      const float *bias, const float *res) {
    if (rows <= 0) return;
    const int c_in = M->d / taps;
    conv_args a = {M->w, x, y, bias, res, M->n, c_in, taps, dil, ld, rows, 0, 0};
    const double macs = (double)rows * M->n * M->d, bytes = 4.0 * M->n * M->d;
    const double work = macs > bytes ? macs : bytes;
    if (M->form == CW_PLAIN) { codec_run(P, plain_task, &a, rows, work); return; }
#if defined(__AVX512F__)
    a.pair = (M->n / 16) % 2 == 0;
#endif
    a.tiles = (rows + CONV_ROWS - 1) / CONV_ROWS;
    const int groups = M->n / 16 / (a.pair ? 2 : 1);
    codec_run(P, conv_task, &a, groups * a.tiles, work);
}

/* ---------------------------------------------------------------- products */

#if defined(MS_INT8_KERNELS)
typedef struct { i8_args a; int rows; } i8_rows_args;

/* i8_task over the blocks begin..end, for every pass of 8 rows. */
static void i8_rows_task(void *args, int begin, int end) {
    const i8_rows_args *p = args;
    const int groups = p->a.d / MS_GROUP;
    for (int r0 = 0; r0 < p->rows; r0 += MS_MAX_ROWS) {
        i8_args a = p->a;
        a.rows = p->rows - r0 < MS_MAX_ROWS ? p->rows - r0 : MS_MAX_ROWS;
        a.xq += (size_t)r0 * a.d;
        a.xscale += (size_t)r0 * groups;
        a.xcomp += (size_t)r0 * groups;
        a.y += (size_t)r0 * a.n;
        if (a.res) a.res += (size_t)r0 * a.n;
        i8_task(&a, begin, end);
    }
}
#endif

static void f32_rows_task(void *args, int begin, int end) { f32_task(args, begin, end); }

/* y (rows, n) = x (rows, d) contiguous @ M.T (+ res): what ms_linear_f32 and ms_linear_i8 compute
 * (the same kernels, the same activation quantization), in one parallel region per product. */
static void codec_product(const ms_codec_plan *P, const cmat *M, const float *x, int rows, float *y, const float *res) {
    if (rows <= 0) return;
    const double macs = (double)rows * M->n * M->d, bytes = (double)M->n * M->d * (M->form == CW_I8 ? 1 : 4);
    const double work = macs > bytes ? macs : bytes;
#if defined(MS_INT8_KERNELS)
    if (M->form == CW_I8) {
        quantize_rows(x, rows, M->d, P->q, P->xs, P->xc);
        i8_rows_args p = {{M->w, M->scale, P->q, P->xs, P->xc, y, res, M->n, M->d, 0, 0}, rows};
        codec_run(P, i8_rows_task, &p, M->n / 16, work);
        return;
    }
#endif
    if (M->form == CW_F32 && rows <= 2) { /* the matrix-vector kernel: four accumulation chains per row */
        f32_args a = {M->w, x, y, res, M->n, M->d, rows, 0};
        codec_run(P, f32_rows_task, &a, M->n / 16, work);
        return;
    }
    conv_rows(P, M, 1, 1, x, M->d, rows, y, NULL, res);
}

/* ---------------------------------------------------------------- pointwise */

#if defined(__AVX512F__)
/* e^x - 1 for x <= 0: a Taylor polynomial near 0 (no cancellation), e^x - 1 below -0.5. */
static inline __m512 expm1_neg(__m512 x) {
    __m512 p = _mm512_set1_ps(1.0f / 362880);
    static const float inv[8] = {1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
    for (int i = 0; i < 8; i++) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(inv[i]));
    __m512 near = _mm512_mul_ps(p, x);
    __m512 far = _mm512_sub_ps(exp_neg(x), _mm512_set1_ps(1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-0.5f), _CMP_LT_OQ), near, far);
}

static inline __m512 sigmoid_ps(__m512 x) {
    __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), r, _mm512_mul_ps(e, r));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 expm1_neg8(__m256 x) {
    __m256 p = _mm256_set1_ps(1.0f / 362880);
    static const float inv[8] = {1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
    for (int i = 0; i < 8; i++) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(inv[i]));
    __m256 near = _mm256_mul_ps(p, x);
    __m256 far = _mm256_sub_ps(exp_neg8(x), _mm256_set1_ps(1.0f));
    return _mm256_blendv_ps(near, far, _mm256_cmp_ps(x, _mm256_set1_ps(-0.5f), _CMP_LT_OQ));
}

static inline __m256 sigmoid8(__m256 x) {
    __m256 e = exp_neg8(_mm256_sub_ps(_mm256_setzero_ps(), abs8(x)));
    __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
#endif

static inline float sigmoid1(float x) {
    const float e = expf(-fabsf(x)), r = 1.0f / (1.0f + e);
    return x < 0.f ? e * r : r;
}

/* x = x > 0 ? x : alpha * (e^x - 1), in place. */
static void elu_rows(float *x, size_t count, float alpha) {
    size_t i = 0;
#if defined(__AVX512F__)
    const __m512 al = _mm512_set1_ps(alpha), zero = _mm512_setzero_ps();
    for (; i + 16 <= count; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 neg = _mm512_cmp_ps_mask(v, zero, _CMP_LE_OQ);
        if (neg) v = _mm512_mask_mov_ps(v, neg, _mm512_mul_ps(al, expm1_neg(_mm512_min_ps(v, zero))));
        _mm512_storeu_ps(x + i, v);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 al = _mm256_set1_ps(alpha), zero = _mm256_setzero_ps();
    for (; i + 8 <= count; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 neg = _mm256_cmp_ps(v, zero, _CMP_LE_OQ);
        if (_mm256_movemask_ps(neg))
            v = _mm256_blendv_ps(v, _mm256_mul_ps(al, expm1_neg8(_mm256_min_ps(v, zero))), neg);
        _mm256_storeu_ps(x + i, v);
    }
#endif
    for (; i < count; i++)
        if (x[i] <= 0.f) x[i] = alpha * expm1f(x[i]);
}

/* One LSTM timestep's cell from its gates g (4H: input, forget, cell, output), as state.py:
 * c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c). */
static void lstm_cell(const float *g, float *h, float *c, int H) {
    int u = 0;
#if defined(__AVX512F__)
    for (; u + 16 <= H; u += 16) {
        __m512 i = sigmoid_ps(_mm512_loadu_ps(g + u)), f = sigmoid_ps(_mm512_loadu_ps(g + H + u));
        __m512 gg = tanh_ps(_mm512_loadu_ps(g + 2 * H + u)), o = sigmoid_ps(_mm512_loadu_ps(g + 3 * H + u));
        __m512 cn = _mm512_add_ps(_mm512_mul_ps(f, _mm512_loadu_ps(c + u)), _mm512_mul_ps(i, gg));
        _mm512_storeu_ps(c + u, cn);
        _mm512_storeu_ps(h + u, _mm512_mul_ps(o, tanh_ps(cn)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; u + 8 <= H; u += 8) {
        __m256 i = sigmoid8(_mm256_loadu_ps(g + u)), f = sigmoid8(_mm256_loadu_ps(g + H + u));
        __m256 gg = tanh8(_mm256_loadu_ps(g + 2 * H + u)), o = sigmoid8(_mm256_loadu_ps(g + 3 * H + u));
        __m256 cn = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(c + u)), _mm256_mul_ps(i, gg));
        _mm256_storeu_ps(c + u, cn);
        _mm256_storeu_ps(h + u, _mm256_mul_ps(o, tanh8(cn)));
    }
#endif
    for (; u < H; u++) {
        const float cn = sigmoid1(g[H + u]) * c[u] + sigmoid1(g[u]) * tanhf(g[2 * H + u]);
        c[u] = cn;
        h[u] = sigmoid1(g[3 * H + u]) * tanhf(cn);
    }
}
