/* The stateful streaming decoder of a SEANet codec (EnCodec's) as one plan run by one C call
 * per decode: codes in, final audio out, with no Python between the stages.
 *
 * Part of cpu_gemv.c's translation unit (included at its end): the float32 and int8 products of
 * the LSTM and the transposed convolutions are its packed kernels (f32_task, i8_task and
 * quantize_rows), and the threads are its OpenMP team.
 *
 * A plan is a flat list of stages built once (musicsteer/codec/native.py) over weights the
 * caller keeps alive, and state buffers the plan allocates:
 *   conv    stride 1, dilation, k taps: keeps its last (k - 1) * dilation input samples, pads the
 *           clip's first samples once (reflect, replicate or zero) and, at the end, its last ones
 *   convt   transposed, stride s: keeps the overlapping tail of its output, trims the clip's first
 *           `left` samples once and, at the end, its last `right` ones
 *   lstm    layers of an LSTM over the call's timesteps, (h, c) carried, plus its input (the skip)
 *   elu     pointwise
 *   open / close   a residual block: open keeps its input until close adds it to the block's output
 * These are the stages of musicsteer/codec/state.py, which is the reference (same padding, same
 * trimming, same order of the additions where it matters for equality). Samples are time-major,
 * (time, channels), everywhere: a product's rows are time steps.
 *
 * The arithmetic (convolution tiles, products, ELU, the LSTM's cell) is in cpu_codec_math.c. Work
 * of a stage splits over the team by output blocks and time tiles where the stage is large enough
 * (ms_codec_parallel); below that it stays on the calling thread.
 */

#include <time.h>

#define MS_CODEC_BOOKS 32
#define MS_CODEC_LAYERS 4
#define CODEC_PARALLEL_MACS (1 << 22) /* work (multiply-adds) below which a stage runs on the calling thread */

enum { CS_CONV = 1, CS_CONVT = 2, CS_LSTM = 3, CS_ELU = 4, CS_OPEN = 5, CS_CLOSE = 6 };
enum { CPAD_ZERO = 0, CPAD_REFLECT = 1, CPAD_REPLICATE = 2 };
enum { CW_PLAIN = 0, CW_F32 = 1, CW_I8 = 2 }; /* row-major (N, D); packed [N/16][D][16]; int8 packed + scales */

typedef struct {
    int form, n, d;
    const void *w;
    const float *scale;
} cmat;

typedef struct {
    int kind, c_in, c_out, taps, step, left, right, span, mode, peer;
    float alpha;
    cmat m;                                  /* conv (C_out, taps * C_in); convt (taps * C_out, C_in), rows (tap, out) */
    const float *bias;
    int layers, hidden;
    cmat ih[MS_CODEC_LAYERS], hh[MS_CODEC_LAYERS];
    const float *lbias[MS_CODEC_LAYERS];    /* b_ih + b_hh */
    int in_cap, out_cap;                     /* samples one call brings, takes (push and end together) */
    float *buf;                              /* conv window, convt tail, open's hold (rows of channels) */
    int buf_rows, held, started, to_trim, has_tail;
    float *h, *c;                            /* lstm (layers, hidden) */
    double seconds;                          /* time spent in this stage since the plan's last ms_codec_times */
} cstage;

typedef struct {
    int dim, bins, books, max_frames, threads, count, cap, ready, int8;
    double parallel; /* work from which a stage splits over the team */
    const float *book[MS_CODEC_BOOKS];
    cstage *st;
    float *ping[2], *z, *lo[2];
    int8_t *q;
    float *xs;
    int32_t *xc;
} ms_codec_plan;

static void *codec_alloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (p) memset(p, 0, (bytes + 63) / 64 * 64 + 64);
    return p;
}

#include "cpu_codec_math.c" /* tiles, products, pointwise: after the types they use */

/* ---------------------------------------------------------------- stages */

/* Rows [0, rows) of `dst` = `src` (len rows of C) padded with `left` rows before and `right` after,
 * as EnCodec pads a clip (torch's reflect, replicate or zero; a reflect of a clip not longer than
 * its padding first extends it with zeros, as transformers' _pad1d does). */
static void pad_rows(const float *src, int len, int left, int right, int mode, int C, float *dst) {
    const size_t row = sizeof(float) * C;
    int extra = 0;
    const int top = left > right ? left : right;
    if (mode == CPAD_REFLECT && len <= top) extra = top - len + 1;
    const int n = len + extra; /* the extended clip: src then `extra` zero rows */
#define SRC(i) ((i) < len ? src + (size_t)(i) * C : NULL)
    for (int i = 0; i < left + len + right; i++) {
        int at; /* index into the extended clip */
        const int p = i - left;
        if (p >= 0 && p < n) at = p;
        else if (mode == CPAD_REFLECT) at = p < 0 ? -p : 2 * (n - 1) - p;
        else if (mode == CPAD_REPLICATE) at = p < 0 ? 0 : len - 1;
        else at = -1;
        const float *s = at >= 0 ? SRC(at) : NULL;
        if (s) memmove(dst + (size_t)i * C, s, row);
        else memset(dst + (size_t)i * C, 0, row);
    }
#undef SRC
}

/* A convolution's outputs over its window's rows 0..held: held - span of them. */
static int conv_window(const ms_codec_plan *P, cstage *s, const float *win, int rows, float *y) {
    const int m = rows - s->span;
    if (m <= 0) return 0;
    conv_rows(P, &s->m, s->taps, s->step, win, s->c_in, m, y, s->bias, NULL);
    return m;
}

static int conv_push(const ms_codec_plan *P, cstage *s, const float *x, int n, float *y) {
    const int C = s->c_in;
    if (s->span == 0) return conv_window(P, s, x, n, y);
    memcpy(s->buf + (size_t)s->held * C, x, sizeof(float) * n * C);
    s->held += n;
    if (!s->started) {
        if (s->held <= s->left) return 0; /* reflect padding reads left + 1 samples */
        memmove(s->buf + (size_t)s->left * C, s->buf, sizeof(float) * s->held * C);
        float *clip = s->buf + (size_t)s->left * C;
        for (int i = 0; i < s->left; i++) { /* the left padding of the clip's start, as pad_rows makes it */
            const int at = s->mode == CPAD_REFLECT ? s->left - i : 0;
            if (s->mode == CPAD_ZERO) memset(s->buf + (size_t)i * C, 0, sizeof(float) * C);
            else memcpy(s->buf + (size_t)i * C, clip + (size_t)at * C, sizeof(float) * C);
        }
        s->held += s->left;
        s->started = 1;
    }
    const int m = conv_window(P, s, s->buf, s->held, y);
    memmove(s->buf, s->buf + (size_t)(s->held - s->span) * C, sizeof(float) * s->span * C);
    s->held = s->span;
    return m;
}

static int conv_end(const ms_codec_plan *P, cstage *s, float *y) {
    const int C = s->c_in;
    if (s->held == 0) return 0;
    int m;
    if (!s->started) { /* a clip shorter than the left padding: the layer on it as the offline decode runs it */
        float *tmp = s->buf + (size_t)(s->buf_rows / 2) * C;
        pad_rows(s->buf, s->held, s->left, s->right, s->mode, C, tmp);
        m = conv_window(P, s, tmp, s->left + s->held + s->right, y);
    } else {
        pad_rows(s->buf, s->held, 0, s->right, s->mode, C, s->buf);
        m = conv_window(P, s, s->buf, s->held + s->right, y);
    }
    s->held = 0;
    return m;
}

static int convt_trim(cstage *s, float *y, int rows) {
    const int cut = s->to_trim < rows ? s->to_trim : rows;
    s->to_trim -= cut;
    if (cut) memmove(y, y + (size_t)cut * s->c_out, sizeof(float) * (rows - cut) * s->c_out);
    return rows - cut;
}

static int convt_push(const ms_codec_plan *P, cstage *s, const float *x, int n, float *y) {
    if (n == 0) return 0;
    const int C = s->c_out, k = s->taps, st = s->step, tail = k - st, length = (n - 1) * st + k;
    codec_product(P, &s->m, x, n, P->z, NULL); /* (n, k * C): every input sample's k output rows */
    memset(y, 0, sizeof(float) * length * C);
    for (int t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            float *o = y + (size_t)(t * st + j) * C;
            const float *zj = P->z + ((size_t)t * k + j) * C;
            for (int i = 0; i < C; i++) o[i] += zj[i];
        }
    if (s->has_tail)
        for (size_t i = 0; i < (size_t)tail * C; i++) y[i] += s->buf[i];
    const int final = n * st;
    memcpy(s->buf, y + (size_t)final * C, sizeof(float) * tail * C);
    s->has_tail = 1;
    for (int t = 0; t < final; t++)
        for (int i = 0; i < C; i++) y[(size_t)t * C + i] += s->bias[i];
    return convt_trim(s, y, final);
}

static int convt_end(cstage *s, float *y) {
    if (!s->has_tail) return 0;
    const int C = s->c_out, rows = s->taps - s->step - s->right;
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < C; i++) y[(size_t)t * C + i] = s->buf[(size_t)t * C + i] + s->bias[i];
    s->has_tail = 0;
    return convt_trim(s, y, rows);
}

static int lstm_push(const ms_codec_plan *P, cstage *s, const float *x, int n, float *y) {
    const int H = s->hidden, G = 4 * H;
    const float *inp = x;
    float *gates = P->z + (size_t)n * G;
    for (int l = 0; l < s->layers; l++) {
        float *out = l == s->layers - 1 ? y : P->lo[l % 2], *h = s->h + (size_t)l * H, *c = s->c + (size_t)l * H;
        codec_product(P, &s->ih[l], inp, n, P->z, NULL); /* every timestep's input product in one pass */
        for (int t = 0; t < n; t++)
            for (int i = 0; i < G; i++) P->z[(size_t)t * G + i] += s->lbias[l][i];
        for (int t = 0; t < n; t++) {
            codec_product(P, &s->hh[l], h, 1, gates, P->z + (size_t)t * G);
            lstm_cell(gates, h, c, H);
            memcpy(out + (size_t)t * H, h, sizeof(float) * H);
        }
        inp = out;
    }
    for (size_t i = 0; i < (size_t)n * H; i++) y[i] += x[i]; /* the skip */
    return n;
}

/* One stage on x (len rows): returns its output (x itself for the in-place ones, else `spare`),
 * and with `end` the rest of its samples after them (the clip's end padded as offline). */
static float *stage_run(const ms_codec_plan *P, cstage *s, float *x, int *len, float *spare, int end) {
    const int n = *len;
    int m;
    switch (s->kind) {
    case CS_CONV:
        m = conv_push(P, s, x, n, spare);
        if (end) m += conv_end(P, s, spare + (size_t)m * s->c_out);
        *len = m;
        return spare;
    case CS_CONVT:
        m = convt_push(P, s, x, n, spare);
        if (end) m += convt_end(s, spare + (size_t)m * s->c_out);
        *len = m;
        return spare;
    case CS_LSTM:
        *len = n ? lstm_push(P, s, x, n, spare) : 0;
        return spare;
    case CS_ELU:
        elu_rows(x, (size_t)n * s->c_in, s->alpha);
        return x;
    case CS_OPEN:
        memcpy(s->buf + (size_t)s->held * s->c_in, x, sizeof(float) * n * s->c_in);
        s->held += n;
        return x;
    case CS_CLOSE: {
        cstage *o = &P->st[s->peer];
        const int C = s->c_in;
        for (size_t i = 0; i < (size_t)n * C; i++) x[i] = o->buf[i] + x[i];
        o->held -= n;
        memmove(o->buf, o->buf + (size_t)n * C, sizeof(float) * o->held * C);
        return x;
    }
    }
    return x;
}

/* ---------------------------------------------------------------- the plan's API (codec/native.py) */

void *ms_codec_new(int dim, int bins, int max_frames, int threads) {
    ms_codec_plan *P = calloc(1, sizeof *P);
    if (!P) return NULL;
    P->dim = dim, P->bins = bins, P->max_frames = max_frames;
    P->threads = threads > 0 ? threads : omp_get_max_threads();
    P->parallel = CODEC_PARALLEL_MACS;
    return P;
}

/* The work (multiply-adds; a weight byte read counts as one) from which a stage splits over the
 * team; returns the previous value. */
double ms_codec_parallel(void *plan, double macs) {
    ms_codec_plan *P = plan;
    const double was = P->parallel;
    if (macs > 0) P->parallel = macs;
    return was;
}

int ms_codec_book(void *plan, const float *table) {
    ms_codec_plan *P = plan;
    if (P->books >= MS_CODEC_BOOKS || P->ready) return -2;
    P->book[P->books++] = table;
    return 0;
}

static cstage *add_stage(ms_codec_plan *P, int kind, int c_in, int c_out) {
    if (P->ready) return NULL;
    if (P->count == P->cap) {
        int cap = P->cap ? 2 * P->cap : 64;
        cstage *st = realloc(P->st, sizeof(cstage) * cap);
        if (!st) return NULL;
        P->st = st, P->cap = cap;
    }
    cstage *s = &P->st[P->count++];
    memset(s, 0, sizeof *s);
    s->kind = kind, s->c_in = c_in, s->c_out = c_out, s->peer = -1;
    return s;
}

static int check_mat(ms_codec_plan *P, int form, int n, int d) {
    if (form == CW_F32 && n % 16) return -2;
    if (form == CW_I8) {
#if !defined(MS_INT8_KERNELS)
        return -1;
#endif
        if (n % 16 || d % MS_GROUP || d > 65536) return -2;
        P->int8 = 1;
    }
    return form < CW_PLAIN || form > CW_I8 ? -2 : 0;
}

/* A convolution of stride 1: weight (C_out, taps * C_in), inputs ordered tap then channel, in
 * `form` (float32 only: CW_F32 packed, or CW_PLAIN for any C_out). Returns 0, or -2. */
int ms_codec_conv(void *plan, int c_in, int c_out, int taps, int dilation, int left, int right, int mode, int form,
                  const void *w, const float *bias) {
    ms_codec_plan *P = plan;
    if (form == CW_I8 || check_mat(P, form, c_out, taps * c_in) || left < 0 || right < 0 || taps < 1 ||
        dilation < 1 || left + right != (taps - 1) * dilation || mode < CPAD_ZERO || mode > CPAD_REPLICATE)
        return -2;
    cstage *s = add_stage(P, CS_CONV, c_in, c_out);
    if (!s) return -3;
    s->taps = taps, s->step = dilation, s->left = left, s->right = right, s->span = left + right, s->mode = mode;
    s->m = (cmat){form, c_out, taps * c_in, w, NULL};
    s->bias = bias;
    return 0;
}

/* A transposed convolution: weight (taps * C_out, C_in), rows ordered tap then output channel;
 * `left` + `right` = taps - stride output samples trimmed at the clip's ends. Returns 0, -1 (int8
 * absent from this build) or -2. */
int ms_codec_convt(void *plan, int c_in, int c_out, int taps, int stride, int left, int right, int form,
                   const void *w, const float *scale, const float *bias) {
    ms_codec_plan *P = plan;
    int rc = check_mat(P, form, taps * c_out, c_in);
    if (rc) return rc;
    if (stride < 1 || taps < stride || left < 0 || right < 0 || left + right != taps - stride) return -2;
    cstage *s = add_stage(P, CS_CONVT, c_in, c_out);
    if (!s) return -3;
    s->taps = taps, s->step = stride, s->left = left, s->right = right;
    s->m = (cmat){form, taps * c_out, c_in, w, scale};
    s->bias = bias;
    return 0;
}

int ms_codec_lstm(void *plan, int dim) {
    cstage *s = add_stage(plan, CS_LSTM, dim, dim);
    if (!s) return -3;
    s->hidden = dim;
    return 0;
}

/* A layer of the last LSTM stage: W_ih and W_hh (4H, H) each in its form, bias b_ih + b_hh (4H). */
int ms_codec_lstm_layer(void *plan, int form_ih, const void *w_ih, const float *s_ih, int form_hh, const void *w_hh,
                        const float *s_hh, const float *bias) {
    ms_codec_plan *P = plan;
    if (P->ready || !P->count || P->st[P->count - 1].kind != CS_LSTM) return -2;
    cstage *s = &P->st[P->count - 1];
    const int H = s->hidden;
    int rc = check_mat(P, form_ih, 4 * H, H);
    if (!rc) rc = check_mat(P, form_hh, 4 * H, H);
    if (rc) return rc;
    if (s->layers == MS_CODEC_LAYERS) return -2;
    s->ih[s->layers] = (cmat){form_ih, 4 * H, H, w_ih, s_ih};
    s->hh[s->layers] = (cmat){form_hh, 4 * H, H, w_hh, s_hh};
    s->lbias[s->layers++] = bias;
    return 0;
}

int ms_codec_elu(void *plan, int dim, float alpha) {
    cstage *s = add_stage(plan, CS_ELU, dim, dim);
    if (!s) return -3;
    s->alpha = alpha;
    return 0;
}

int ms_codec_open(void *plan, int dim) { return add_stage(plan, CS_OPEN, dim, dim) ? 0 : -3; }

/* Closes the innermost open residual block: its output = its input + the block's output. */
int ms_codec_close(void *plan, int dim) {
    ms_codec_plan *P = plan;
    int depth = 0, peer = -1;
    for (int i = P->count - 1; i >= 0 && peer < 0; i--) {
        if (P->st[i].kind == CS_CLOSE) depth++;
        if (P->st[i].kind == CS_OPEN && depth-- == 0) peer = i;
    }
    if (peer < 0 || P->st[peer].c_in != dim) return -2;
    cstage *s = add_stage(P, CS_CLOSE, dim, dim);
    if (!s) return -3;
    s->peer = peer;
    return 0;
}

/* Every buffer at its largest: walks the stages with the most samples a call can bring each one. */
int ms_codec_ready(void *plan) {
    ms_codec_plan *P = plan;
    if (P->ready) return 0;
    if (!P->count || !P->books || P->st[0].c_in != P->dim || P->st[P->count - 1].c_out != 1) return -2;
    size_t ping = (size_t)P->max_frames * P->dim, z = 0, q = 0, lo = 0;
    int n = P->max_frames, depth = 0;
    for (int i = 0; i < P->count; i++) {
        cstage *s = &P->st[i];
        if (i && s->c_in != P->st[i - 1].c_out) return -2;
        s->in_cap = n;
        if (s->kind == CS_CONV) n += s->span + s->left + 1;
        if (s->kind == CS_CONVT) n = n * s->step + s->taps;
        s->out_cap = n;
        ping = (size_t)s->in_cap * s->c_in > ping ? (size_t)s->in_cap * s->c_in : ping;
        ping = (size_t)n * s->c_out > ping ? (size_t)n * s->c_out : ping;
        if (s->kind == CS_CONV) s->buf_rows = 2 * (s->in_cap + 2 * s->span + 2);
        if (s->kind == CS_CONVT) {
            s->buf_rows = s->taps;
            z = (size_t)s->in_cap * s->m.n > z ? (size_t)s->in_cap * s->m.n : z;
            q = (size_t)s->in_cap * s->c_in > q ? (size_t)s->in_cap * s->c_in : q;
        }
        if (s->kind == CS_LSTM) {
            if (!s->layers) return -2;
            const size_t g = (size_t)(s->in_cap + 1) * 4 * s->hidden;
            z = g > z ? g : z;
            q = (size_t)s->in_cap * s->hidden > q ? (size_t)s->in_cap * s->hidden : q;
            lo = (size_t)s->in_cap * s->hidden > lo ? (size_t)s->in_cap * s->hidden : lo;
            s->h = codec_alloc(sizeof(float) * s->layers * s->hidden);
            s->c = codec_alloc(sizeof(float) * s->layers * s->hidden);
            if (!s->h || !s->c) return -3;
        }
        if (s->kind == CS_OPEN) depth++;
        if (s->kind == CS_CLOSE) {
            cstage *o = &P->st[s->peer];
            int lag = 0;
            for (int j = s->peer + 1; j < i; j++) lag += P->st[j].span + P->st[j].left + 1;
            o->buf_rows = o->in_cap + lag + 2;
            depth--;
        }
    }
    if (depth) return -2;
    for (int i = 0; i < P->count; i++) {
        cstage *s = &P->st[i];
        if (s->buf_rows && !(s->buf = codec_alloc(sizeof(float) * s->buf_rows * (s->kind == CS_CONVT ? s->c_out : s->c_in))))
            return -3;
    }
    P->ping[0] = codec_alloc(sizeof(float) * ping);
    P->ping[1] = codec_alloc(sizeof(float) * ping);
    P->z = codec_alloc(sizeof(float) * (z + 1));
    P->lo[0] = codec_alloc(sizeof(float) * (lo + 1));
    P->lo[1] = codec_alloc(sizeof(float) * (lo + 1));
    P->q = codec_alloc(q + MS_GROUP);
    P->xs = codec_alloc(sizeof(float) * (q / MS_GROUP + 1));
    P->xc = codec_alloc(sizeof(int32_t) * (q / MS_GROUP + 1));
    if (!P->ping[0] || !P->ping[1] || !P->z || !P->lo[0] || !P->lo[1] || !P->q || !P->xs || !P->xc) return -3;
    P->ready = 1;
    return 0;
}

/* The most samples one call returns. */
int ms_codec_out_cap(void *plan) {
    ms_codec_plan *P = plan;
    return P->ready ? P->st[P->count - 1].out_cap : -2;
}

void ms_codec_reset(void *plan) {
    ms_codec_plan *P = plan;
    for (int i = 0; i < P->count; i++) {
        cstage *s = &P->st[i];
        s->held = s->started = s->has_tail = 0;
        s->to_trim = s->kind == CS_CONVT ? s->left : 0;
        if (s->h) memset(s->h, 0, sizeof(float) * s->layers * s->hidden);
        if (s->c) memset(s->c, 0, sizeof(float) * s->layers * s->hidden);
    }
}

/* Decodes n frames of codes (books, n) int64, then with `end` the rest of the clip (each layer's
 * end padded as offline; the plan is reset after it). Writes the newly final samples to out (at
 * most cap) and returns their count; -2 for a code out of range or more frames than the plan
 * takes, -4 when out would overflow. */
int ms_codec_push(void *plan, const int64_t *codes, int n, int end, float *out, int cap) {
    ms_codec_plan *P = plan;
    if (!P->ready || n < 0 || n > P->max_frames) return -2;
    for (int k = 0; k < P->books; k++)
        for (int t = 0; t < n; t++)
            if (codes[(size_t)k * n + t] < 0 || codes[(size_t)k * n + t] >= P->bins) return -2;
    float *x = P->ping[0], *spare = P->ping[1];
    for (int t = 0; t < n; t++) { /* the quantizer: the sum of each codebook's entry, in codebook order */
        float *row = x + (size_t)t * P->dim;
        memcpy(row, P->book[0] + (size_t)codes[t] * P->dim, sizeof(float) * P->dim);
        for (int k = 1; k < P->books; k++) {
            const float *e = P->book[k] + (size_t)codes[(size_t)k * n + t] * P->dim;
            for (int i = 0; i < P->dim; i++) row[i] += e[i];
        }
    }
    int len = n;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < P->count; i++) {
        float *y = stage_run(P, &P->st[i], x, &len, spare, end);
        if (y != x) spare = x, x = y;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        P->st[i].seconds += (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
        t0 = t1;
    }
    if (end) ms_codec_reset(P);
    if (len > cap) return -4;
    memcpy(out, x, sizeof(float) * len);
    return len;
}

/* A push to run later, on thread 0 of a fused decoder call (ms_blocks_side's job: `ms_codec_run` is its function):
 * filled by the caller, run once; `result` is what ms_codec_push returned, `seconds` how long it took. */
typedef struct {
    void *plan;
    const int64_t *codes;
    int n, end;
    float *out;
    int cap, result, done;
    double seconds;
} ms_codec_job;

void ms_codec_run(void *job) {
    ms_codec_job *j = job;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    j->result = ms_codec_push(j->plan, j->codes, j->n, j->end, j->out, j->cap);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    j->seconds = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    j->done = 1;
}

/* Seconds each stage took over the pushes since the last call (kinds and counts in ms_codec_stage);
 * the clocks restart. Returns the number of stages. */
int ms_codec_times(void *plan, double *seconds, int *kinds) {
    ms_codec_plan *P = plan;
    for (int i = 0; i < P->count; i++) {
        seconds[i] = P->st[i].seconds, kinds[i] = P->st[i].kind;
        P->st[i].seconds = 0.0;
    }
    return P->count;
}

void ms_codec_free(void *plan) {
    ms_codec_plan *P = plan;
    if (!P) return;
    for (int i = 0; i < P->count; i++) {
        free(P->st[i].buf);
        free(P->st[i].h);
        free(P->st[i].c);
    }
    free(P->st);
    free(P->ping[0]); free(P->ping[1]); free(P->z); free(P->lo[0]); free(P->lo[1]);
    free(P->q); free(P->xs); free(P->xc);
    free(P);
}
