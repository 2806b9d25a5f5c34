/* One decoder block of a one-token step in one call: a pre-norm transformer block (self-attention
 * over the static cache, cross-attention to the text states, MLP) for the few rows of the CFG
 * batch, inside one OpenMP parallel region.
 *
 * Part of cpu_gemv.c's translation unit (included at its end): it reuses the packed products,
 * the activations and the one-query attention defined there.
 *
 * Why: a `small` step is ~150 weight products, 72 layer norms, 48 attentions and 72 residual
 * adds. Called one by one from Python they cost about 5 ms a step on the 2-core test machines
 * (a tenth of the float32 step and a quarter of the int8 one) in dispatch alone, and each
 * product forks and joins the thread team. Here the norms and residual adds run on each thread's
 * private copy of the rows (a few KiB: recomputing them costs less than a barrier), products
 * share their output blocks between threads through an atomic counter (a preempted vCPU holds
 * one chunk, not half the matrix), and the only synchronisation is one barrier where a result
 * is read whole.
 *
 * The block is split at the steering hook points so that Python can run hooks between parts:
 *   part 0  a  = Wo · attend(Wqkv · LN_self(x))                  (self-attention, hook "attn")
 *   part 1  x1 = x + a;  c = Wo' · attend_text(Wq · LN_cross(x1)) (cross-attention, hook "cross")
 *           attend_text: the weighted sum of the attention over each prompt slot's memory (the
 *           slot read alone when one has weight exactly 1, the others 0)
 *   part 2  out = x1 + c + fc2 · act(fc1 · LN_mlp(x1 + c))        (MLP; hook "out" follows)
 * `ms_block(first, last)` runs parts first..last in one region. Inputs are never written.
 *
 * A side job (`ms_blocks_side`: the stream's codec decoding the last frame) runs on thread 0 while
 * the other threads start the blocks; thread 0 joins them at the next block boundary once it is
 * done. A one-token step is bound by memory bandwidth and the codec by arithmetic, and one core
 * reads at more than half the speed of two (8 and 14 GB/s on the 2-core test machines), so the
 * blocks run at one thread fewer while the job runs instead of waiting for it. Each block's
 * barriers count the threads running that block (`team`), so the joiner never holds up a barrier
 * it is not part of; the work inside a block is split by counters, so the results are the same
 * bits whoever computes them.
 */

enum { W_QKV, W_O, W_XQ, W_XO, W_FC1, W_FC2, W_COUNT };
#define MS_MAX_SLOTS 8 /* prompt slots (model/kv_cache.py MAX_SLOTS) */
enum { KIND_F32 = 0, KIND_I8 = 1, KIND_BF16 = 2, KIND_I4 = 3 };

/* A block's weights and caches, filled by musicsteer/backends/cpu/fused.py (ctypes mirror: keep in step). */
typedef struct {
    int kind, d, ffn, heads, hd, act, cache_bf16, max_len, text_max;
    float eps;
    const float *norm_w[3], *norm_b[3]; /* self, cross, mlp */
    const void *w[W_COUNT];             /* packed: float32 [N/16][D][16], int8 [N/16][D/4][16][4], bf16 [N/16][D/2][16][2],
                                           int4 [N/16][D/64][8][16][4] (cpu_gemv.c) */
    const void *scale[W_COUNT];         /* int8 float32 per-output scales, int4 bfloat16 per output and group
                                           [N/16][D/64][16] */
    void *kc, *vc;                      /* self-attention cache (B, H, max_len, hd), float32, bfloat16 or int8 */
    const float *tk[MS_MAX_SLOTS], *tv[MS_MAX_SLOTS]; /* per prompt slot: text keys/values (B, H, text_max, hd),
                                                         float32, or NULL for a slot never filled */
    int text_slots;
    /* Steering of the block's output (the `out` hook point), or steer_k = 0: strengths (B, K), read
     * at every call (the plan rewrites them in place), unit directions (K, D), targets (K,). */
    int steer_k, steer_mode;
    const float *steer_alpha, *steer_dirs, *steer_targets;
    float *ks, *vs; /* an 8-bit self-attention cache's scales (B, H, max_len), when cache_i8 is set */
    int cache_i8;
    float *tap; /* or NULL: the block's (steered) output row 0 copied here (d floats) by a call that runs part 2 */
} ms_layer;

enum { STEER_ADD = 0, STEER_NORM = 1, STEER_CLAMP = 2, STEER_ABLATE = 3 }; /* kernels/ids.py */
#define MS_MAX_STEER 64

/* The barrier of the threads running a block, and the late joining of thread 0 after a side job:
 * `want` once it is done; `decided`, the block it joins at (or the block count: none left), set by
 * the last thread into a block boundary before it opens the barrier (the runners read it after the
 * barrier), and `join`, the same value stored after the barrier opened (the joiner waits on it, so
 * it never enters a barrier of the block before). */
typedef struct {
    atomic_int count, gen, want, decided, join;
} team_state;

static inline void cpu_relax(int spins) {
#if defined(__x86_64__)
    if (spins < 4096) { _mm_pause(); return; }
#endif
    sched_yield(); /* a long wait (a preempted vCPU): give the core away */
}

/* Wait until every one of `team` threads arrived. The last one in runs `decide(ts, at)` first when
 * `at` >= 0 (a block boundary while thread 0 is away). */
static void team_barrier(team_state *ts, int team, int at) {
    int decided = -1;
    if (team > 1) {
        const int g = atomic_load_explicit(&ts->gen, memory_order_acquire);
        if (atomic_fetch_add_explicit(&ts->count, 1, memory_order_acq_rel) != team - 1) {
            for (int spins = 0; atomic_load_explicit(&ts->gen, memory_order_acquire) == g; spins++) cpu_relax(spins);
            return;
        }
    }
    if (at >= 0 && atomic_load(&ts->want) && atomic_load(&ts->decided) < 0) {
        atomic_store(&ts->decided, at);
        decided = at;
    }
    if (team > 1) {
        atomic_store_explicit(&ts->count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&ts->gen, 1, memory_order_release);
    }
    if (decided >= 0) atomic_store_explicit(&ts->join, decided, memory_order_release);
}

/* What one call shares between its threads (for a stack of blocks: the current block's). */
typedef struct {
    const ms_layer *L;
    int rows, pos, len, threads, first, last;
    int rank;               /* this thread's place among the `threads` running this block */
    team_state *ts;
    const int *text_lens;   /* per slot: text positions filled */
    const float *text_w;    /* per slot: weight (normalised; 0 skips the slot) */
    int text_single;        /* the slot read alone, or -1 for a blend */
    const float *x, *a_in, *c_in, *x1_in; /* caller's inputs for the parts it starts at */
    float *a, *x1, *c, *out;              /* results (the caller's buffers, or scratch) */
    float *qkv, *att, *u;                 /* intermediates */
    atomic_int *work;                     /* [8]: next output block of each product (dynamic split) */
} block_call;

/* Per-thread scratch, grown as needed: the normalised rows, a private residual, the int8 form of a
 * product's input, and attention scores. Thread-local, so concurrent callers never share it. */
typedef struct {
    float *h, *xp, *xs, *scores, *mix;
    int8_t *q;
    int32_t *xc;
    uint32_t *xb; /* a product's input rounded to bfloat16 pairs */
    size_t cap_rows_d, cap_q, cap_scores;
} thread_scratch;

static __thread thread_scratch tls;

static int scratch_reserve(int rows, int d, int widest, int len) {
    size_t need_d = (size_t)rows * d, need_q = (size_t)rows * widest, need_s = (size_t)(len > 0 ? len : 1);
    if (need_d > tls.cap_rows_d) {
        free(tls.h); free(tls.xp); free(tls.mix);
        tls.h = aligned_alloc(64, (need_d * sizeof(float) + 63) / 64 * 64);
        tls.xp = aligned_alloc(64, (need_d * sizeof(float) + 63) / 64 * 64);
        tls.mix = aligned_alloc(64, (need_d * sizeof(float) + 63) / 64 * 64);
        tls.cap_rows_d = tls.h && tls.xp && tls.mix ? need_d : 0;
    }
    if (need_q > tls.cap_q) {
        free(tls.q); free(tls.xs); free(tls.xc); free(tls.xb);
        tls.q = malloc(need_q);
        tls.xs = malloc(sizeof(float) * (need_q / MS_GROUP + 1));
        tls.xc = malloc(sizeof(int32_t) * (need_q / MS_GROUP + 1));
        tls.xb = malloc(sizeof(uint32_t) * (need_q / 2 + 1));
        tls.cap_q = tls.q && tls.xs && tls.xc && tls.xb ? need_q : 0;
    }
    if (need_s > tls.cap_scores) {
        free(tls.scores);
        tls.scores = malloc(sizeof(float) * need_s);
        tls.cap_scores = tls.scores ? need_s : 0;
    }
    return tls.cap_rows_d >= need_d && tls.cap_q >= need_q && tls.cap_scores >= need_s;
}

/* LayerNorm of `rows` rows of `src` (+ `add`, when given) into `dst`; `sum` receives src + add. */
static void norm_rows(const float *src, const float *add, float *sum, float *dst, const float *w, const float *b,
                      int rows, int d, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *s = src + (size_t)r * d, *p = add ? add + (size_t)r * d : NULL;
        float *z = sum ? sum + (size_t)r * d : NULL, *o = dst + (size_t)r * d;
        double mean = 0.0;
        for (int i = 0; i < d; i++) {
            float v = p ? s[i] + p[i] : s[i];
            if (z) z[i] = v;
            mean += v;
        }
        mean /= d;
        const float *v = z ? z : s;
        double var = 0.0;
        for (int i = 0; i < d; i++) {
            double e = v[i] - mean;
            var += e * e;
        }
        const float m = (float)mean, inv = (float)(1.0 / sqrt(var / d + eps));
        for (int i = 0; i < d; i++) o[i] = (v[i] - m) * inv * w[i] + b[i];
    }
}

/* out (rows, n) = act(in (rows, d) · W.T) (+ res), the output blocks taken from work[slot] in chunks
 * of about 128 KiB of weights by whichever thread is free. */
static void product(block_call *c, int slot, int which, int n, int d, const float *in, float *out,
                    const float *res, int act) {
    const ms_layer *L = c->L;
    const int blocks = n / 16, item2 = L->kind == KIND_I4 ? 1 : L->kind == KIND_I8 ? 2 : L->kind == KIND_BF16 ? 4 : 8;
    int chunk = (int)(2 * 128 * 1024 / ((size_t)d * 16 * item2)); /* item2: twice the bytes per weight */
    if (chunk < 1) chunk = 1;
#if defined(MS_INT8_KERNELS)
    if (L->kind == KIND_I8) {
        quantize_rows(in, c->rows, d, tls.q, tls.xs, tls.xc);
        i8_args a = {L->w[which], L->scale[which], tls.q, tls.xs, tls.xc, out, res, n, d, c->rows, act};
        for (;;) {
            int b0 = atomic_fetch_add(&c->work[slot], chunk);
            if (b0 >= blocks) break;
            i8_task(&a, b0, b0 + chunk < blocks ? b0 + chunk : blocks);
        }
        return;
    }
    if (L->kind == KIND_I4) {
        quantize_rows(in, c->rows, d, tls.q, tls.xs, tls.xc);
        i4_args a = {L->w[which], L->scale[which], tls.q, tls.xs, tls.xc, out, res, n, d, c->rows, act};
        for (;;) {
            int b0 = atomic_fetch_add(&c->work[slot], chunk);
            if (b0 >= blocks) break;
            i4_task(&a, b0, b0 + chunk < blocks ? b0 + chunk : blocks);
        }
        return;
    }
#endif
    if (L->kind == KIND_BF16) {
        bf16_rows(in, c->rows, d, tls.xb); /* each thread its own copy: a few KiB */
        bf16_args a = {L->w[which], tls.xb, out, res, n, d, c->rows, act};
        for (;;) {
            int b0 = atomic_fetch_add(&c->work[slot], chunk);
            if (b0 >= blocks) break;
            bf16_task(&a, b0, b0 + chunk < blocks ? b0 + chunk : blocks);
        }
        return;
    }
    f32_args a = {L->w[which], in, out, res, n, d, c->rows, act};
    for (;;) {
        int b0 = atomic_fetch_add(&c->work[slot], chunk);
        if (b0 >= blocks) break;
        f32_task(&a, b0, b0 + chunk < blocks ? b0 + chunk : blocks);
    }
}

/* One query per (row, head), the pairs taken from work[slot] one at a time. */
static void attention(block_call *c, int slot, const attend_args *a) {
    const int pairs = c->rows * a->heads;
    for (;;) {
        int i = atomic_fetch_add(&c->work[slot], 1);
        if (i >= pairs) break;
        if (a->k_new) write_kv(a, i / a->heads, i % a->heads);
        attend_any(a, i / a->heads, i % a->heads, tls.scores);
    }
}

/* Cross-attention over the prompt slots, one (row, head) pair at a time from work[slot]: the slot
 * read alone into att, or each weighted slot into the thread's scratch and summed with its weight. */
static void attention_text(block_call *c, int slot, float scale) {
    const ms_layer *L = c->L;
    const int pairs = c->rows * L->heads, hd = L->hd, d = L->d;
    for (;;) {
        int i = atomic_fetch_add(&c->work[slot], 1);
        if (i >= pairs) break;
        const int b = i / L->heads, h = i % L->heads;
        if (c->text_single >= 0) {
            const int p = c->text_single;
            attend_args a = {c->qkv, NULL, NULL, (void *)L->tk[p], (void *)L->tv[p], c->att, d, L->heads,
                             L->text_max, -1, c->text_lens[p], hd, 0, scale};
            attend_head(&a, b, h, tls.scores);
            continue;
        }
        float *o = c->att + (size_t)b * d + h * hd, *t = tls.mix + (size_t)b * d + h * hd;
        int first = 1;
        for (int p = 0; p < L->text_slots; p++) {
            const float w = c->text_w[p];
            if (w == 0.0f) continue;
            attend_args a = {c->qkv, NULL, NULL, (void *)L->tk[p], (void *)L->tv[p], tls.mix, d, L->heads,
                             L->text_max, -1, c->text_lens[p], hd, 0, scale};
            attend_head(&a, b, h, tls.scores);
            for (int j = 0; j < hd; j++) o[j] = first ? w * t[j] : o[j] + w * t[j];
            first = 0;
        }
    }
}

#define BARRIER() team_barrier(c->ts, c->threads, -1)

/* The steering update of kernels/reference.py on the block's output rows, in float32:
 *   add    x + sum_k a_k v_k
 *   norm   (x + |x| sum_k a_k v_k) / (1 + sum_k |a_k|)
 *   clamp  x + sum_k a_k (c_k - <x, v_k>) v_k
 *   ablate x - sum_k a_k <x, v_k> v_k
 * as y = s x + sum_k w_k v_k: every thread works out s and w for every row (a few dot products),
 * then, after a barrier (so no row is read while it is written), updates its share of them. */
static void steer_out(block_call *c) {
    const ms_layer *L = c->L;
    const int d = L->d, K = L->steer_k, rows = c->rows;
    float w[MS_MAX_ROWS][MS_MAX_STEER], s[MS_MAX_ROWS];
    for (int r = 0; r < rows; r++) {
        const float *x = c->out + (size_t)r * d, *a = L->steer_alpha + (size_t)r * K;
        s[r] = 1.0f;
        if (L->steer_mode == STEER_NORM) {
            double n2 = 0.0, total = 0.0;
            for (int i = 0; i < d; i++) n2 += (double)x[i] * x[i];
            for (int k = 0; k < K; k++) total += fabs((double)a[k]); /* never below 1: no sign flip */
            const float norm = (float)sqrt(n2), inv = 1.0f / (1.0f + (float)total);
            s[r] = inv;
            for (int k = 0; k < K; k++) w[r][k] = norm * a[k] * inv;
        } else if (L->steer_mode == STEER_CLAMP || L->steer_mode == STEER_ABLATE) {
            const int clamp = L->steer_mode == STEER_CLAMP;
            for (int k = 0; k < K; k++) {
                const float *v = L->steer_dirs + (size_t)k * d;
                double proj = 0.0;
                for (int i = 0; i < d; i++) proj += (double)x[i] * v[i];
                /* a_k = 0 gives w = -0 or 0: y = x exactly */
                w[r][k] = clamp ? a[k] * (L->steer_targets[k] - (float)proj) : -(a[k] * (float)proj);
            }
        } else {
            for (int k = 0; k < K; k++) w[r][k] = a[k];
        }
    }
    BARRIER();
    const int me = c->rank, total = rows * d, share = (total + c->threads - 1) / c->threads;
    const int lo = me * share, hi = lo + share < total ? lo + share : total;
    for (int j = lo; j < hi; j++) {
        const int r = j / d, i = j % d;
        float y = c->out[j] * s[r];
        for (int k = 0; k < K; k++) y += w[r][k] * L->steer_dirs[(size_t)k * d + i];
        c->out[j] = y;
    }
}

static void block_thread(block_call *c) {
    const ms_layer *L = c->L;
    const int d = L->d, rows = c->rows;
    const float scale = 1.0f / sqrtf((float)L->hd);
    if (c->first <= 0) { /* self-attention */
        norm_rows(c->x, NULL, NULL, tls.h, L->norm_w[0], L->norm_b[0], rows, d, L->eps);
        product(c, 0, W_QKV, 3 * d, d, tls.h, c->qkv, NULL, ACT_NONE);
        BARRIER();
        attend_args a = {c->qkv, c->qkv + d, c->qkv + 2 * d, L->kc, L->vc, c->att, 3 * d, L->heads, L->max_len,
                         c->pos, c->len, L->hd, L->cache_bf16, scale, L->ks, L->vs, L->cache_i8};
        attention(c, 1, &a);
        BARRIER();
        product(c, 2, W_O, d, d, c->att, c->a, NULL, ACT_NONE);
        if (c->last == 0) return;
        BARRIER();
    }
    if (c->first <= 1) { /* cross-attention; x1 = x + a kept privately and written once */
        const float *a_rows = c->first == 1 ? c->a_in : c->a;
        norm_rows(c->x, a_rows, tls.xp, tls.h, L->norm_w[1], L->norm_b[1], rows, d, L->eps);
        const int me = c->rank, share = (rows * d + c->threads - 1) / c->threads;
        const int lo = me * share, hi = lo + share < rows * d ? lo + share : rows * d;
        if (lo < hi) memcpy(c->x1 + lo, tls.xp + lo, sizeof(float) * (hi - lo));
        product(c, 3, W_XQ, d, d, tls.h, c->qkv, NULL, ACT_NONE);
        BARRIER();
        attention_text(c, 4, scale);
        BARRIER();
        product(c, 5, W_XO, d, d, c->att, c->c, NULL, ACT_NONE);
        if (c->last == 1) return;
        BARRIER();
    }
    /* MLP: the residual x1 + c is each thread's own copy, added in the last product's epilogue */
    const float *x1 = c->first == 2 ? c->x1_in : c->x1, *cc = c->first == 2 ? c->c_in : c->c;
    norm_rows(x1, cc, tls.xp, tls.h, L->norm_w[2], L->norm_b[2], rows, d, L->eps);
    product(c, 6, W_FC1, L->ffn, d, tls.h, c->u, NULL, L->act);
    BARRIER();
    product(c, 7, W_FC2, d, L->ffn, c->u, c->out, tls.xp, ACT_NONE);
    if (L->steer_k > 0) {
        BARRIER();
        steer_out(c);
    }
}

/* The longest memory a call reads, or -1 when a weighted slot is empty or too long, or none is weighted. */
static int text_reads(const ms_layer *L, const int *lens, const float *w) {
    int longest = 0;
    if (L->text_slots < 1 || L->text_slots > MS_MAX_SLOTS) return -1;
    for (int p = 0; p < L->text_slots; p++) {
        if (w[p] == 0.0f) continue;
        if (lens[p] < 1 || lens[p] > L->text_max || !L->tk[p] || !L->tv[p]) return -1;
        longest = lens[p] > longest ? lens[p] : longest;
    }
    return longest > 0 ? longest : -1;
}

/* The slot read alone: the only weighted one when its weight is exactly 1; else -1 (a blend). */
static int text_single(int slots, const float *w) {
    int found = -1;
    for (int p = 0; p < slots; p++) {
        if (w[p] == 0.0f) continue;
        if (found >= 0) return -1;
        found = p;
    }
    return found >= 0 && w[found] == 1.0f ? found : -1;
}

static int check_layer(const ms_layer *L, int first, int last, int rows, int pos, int len, const int *text_lens,
                       const float *text_w) {
    if (first < 0 || last > 2 || first > last || rows < 1 || rows > MS_MAX_ROWS) return -2;
    if (L->d % 16 || L->ffn % 16 || L->hd > 256 || L->hd < 1 || L->d != L->heads * L->hd) return -2;
    if (first == 0 && (len < 1 || len > L->max_len || pos < 0 || pos >= L->max_len)) return -2;
    if (first <= 1 && last >= 1 && text_reads(L, text_lens, text_w) < 0) return -2;
#if !defined(MS_INT8_KERNELS)
    if (L->kind == KIND_I8 || L->kind == KIND_I4) return -1;
#endif
    if ((L->kind == KIND_I8 || L->kind == KIND_I4) && (L->d % MS_GROUP || L->ffn % MS_GROUP)) return -2;
    if (L->kind < KIND_F32 || L->kind > KIND_I4) return -2;
    if (L->steer_k < 0 || L->steer_k > MS_MAX_STEER || (L->steer_k && last != 2)) return -2;
    if (L->steer_k && (L->steer_mode < STEER_ADD || L->steer_mode > STEER_ABLATE)) return -2;
    return 0;
}

/* The calling thread's scratch for what a call keeps to itself: intermediates, the ping-pong
 * rows between the blocks of a stack, and the work counters. */
static float *call_scratch(size_t floats) {
    static __thread float *mid;
    static __thread size_t cap;
    if (floats > cap) {
        free(mid);
        mid = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        cap = mid ? floats : 0;
    }
    return mid;
}

/* A call refused before its region: its side job still runs (the caller counts on it). */
static int refused(int rc, void (*side)(void *), void *arg) {
    if (side) side(arg);
    return rc;
}

/* Run `count` blocks (parts first..last of each; a stack runs whole blocks) in one parallel region,
 * with `side(arg)` (or NULL) on thread 0 first. */
static int run_blocks(const ms_layer *const *layers, int count, int first, int last, int rows, int pos, int len,
                      const int *text_lens, const float *text_w, const float *x, const float *a_in,
                      const float *x1_in, const float *c_in, float *a, float *x1, float *c, float *out,
                      void (*side)(void *), void *arg) {
    int d = 0, ffn = 0, scores = len;
    size_t bytes = 0;
    for (int i = 0; i < count; i++) {
        const ms_layer *L = layers[i];
        int rc = check_layer(L, first, last, rows, pos, len, text_lens, text_w);
        if (rc) return refused(rc, side, arg);
        if (first <= 1 && last >= 1) {
            const int t = text_reads(L, text_lens, text_w);
            scores = t > scores ? t : scores;
        }
        if (i && (L->d != d)) return refused(-2, side, arg);
        d = L->d;
        ffn = L->ffn > ffn ? L->ffn : ffn;
        bytes += (size_t)L->d * (4 * L->d + 2 * (size_t)L->ffn) * (L->kind == KIND_I4 ? 1 : L->kind == KIND_I8 ? 2 : L->kind == KIND_BF16 ? 4 : 8) / 2;
    }
    const int widest = ffn > 3 * d ? ffn : 3 * d;
    const size_t rd = (size_t)rows * d, counters = ((size_t)count * 8 * sizeof(atomic_int) + sizeof(float) - 1) / sizeof(float);
    float *mid = call_scratch(rd * 3 + rd + (size_t)rows * ffn + 5 * rd + counters);
    if (!mid) return refused(-3, side, arg);
    float *qkv = mid, *att = qkv + 3 * rd, *u = att + rd, *spare = u + (size_t)rows * ffn;
    float *ping[2] = {spare + 3 * rd, spare + 4 * rd};
    atomic_int *work = (atomic_int *)(spare + 5 * rd);
    for (size_t i = 0; i < (size_t)count * 8; i++) atomic_init(&work[i], 0);
    atomic_int failed;
    atomic_init(&failed, 0);
    team_state ts;
    atomic_init(&ts.count, 0), atomic_init(&ts.gen, 0), atomic_init(&ts.want, 0);
    atomic_init(&ts.decided, -1), atomic_init(&ts.join, -1);
    int threads = bytes < 4 * MS_PARALLEL_BYTES ? 1 : omp_get_max_threads(), team = 1;
#pragma omp parallel num_threads(threads)
    {
        if (!scratch_reserve(rows, d, widest, scores)) atomic_store(&failed, 1);
#pragma omp single
        team = omp_get_num_threads();
        /* (the single's barrier: every thread sees every allocation's outcome before it starts) */
        const int me = omp_get_thread_num(), late = side != NULL && team > 1; /* thread 0 joins late */
        int from = 0;
        if (side != NULL && me == 0) side(arg); /* alone: before the blocks, as a plain call would */
        if (late && me == 0) {
            atomic_store(&ts.want, 1);
            for (int spins = 0; (from = atomic_load_explicit(&ts.join, memory_order_acquire)) < 0; spins++)
                cpu_relax(spins);
        }
        if (!atomic_load(&failed))
            for (int i = from; i < count; i++) {
                /* the previous block's output is read whole; at a boundary without thread 0, the last one in
                 * decides whether it joins here */
                const int joined = !late || (atomic_load(&ts.decided) >= 0 && i > atomic_load(&ts.decided));
                if (i > from) team_barrier(&ts, joined ? team : team - 1, joined ? -1 : i);
                const int all = !late || (i >= atomic_load(&ts.decided) && atomic_load(&ts.decided) >= 0);
                block_call call = {.L = layers[i], .rows = rows, .pos = pos, .len = len, .text_lens = text_lens,
                                   .text_w = text_w, .text_single = text_single(layers[i]->text_slots, text_w),
                                   .threads = all ? team : team - 1, .rank = all ? me : me - 1, .ts = &ts,
                                   .first = first, .last = last, .a_in = a_in, .c_in = c_in,
                                   .x1_in = x1_in, .qkv = qkv, .att = att, .u = u, .work = work + 8 * i};
                call.x = i == 0 ? x : ping[(i - 1) % 2];
                call.out = i == count - 1 ? out : ping[i % 2];
                if (i && call.rank == 0 && layers[i - 1]->tap && last == 2) /* the last block's output, whole */
                    memcpy(layers[i - 1]->tap, call.x, sizeof(float) * d);
                call.a = a ? a : spare;
                call.x1 = x1 ? x1 : spare + rd;
                call.c = c ? c : spare + 2 * rd;
                block_thread(&call);
            }
        if (late && me != 0) { /* the blocks are done: a joiner still away finds none left */
            int none = -1;
            if (atomic_compare_exchange_strong(&ts.decided, &none, count))
                atomic_store_explicit(&ts.join, count, memory_order_release);
        }
    }
    if (atomic_load(&failed)) return -3;
    if (layers[count - 1]->tap && last == 2) memcpy(layers[count - 1]->tap, out, sizeof(float) * d);
    return 0;
}

/* Parts first..last (0 self-attention, 1 cross-attention, 2 MLP) of one block for `rows` rows at
 * position `pos`, attending over `len` cached positions and, per prompt slot p with a non-zero
 * weight text_w[p], text_lens[p] text positions (arrays of the layers' text_slots entries).
 * x: the block's input (parts 0 and 1); a_in, x1_in, c_in: results of earlier parts when starting
 * later (after Python hooks); outputs a (part 0), x1 and c (part 1), out (part 2), each (rows, d)
 * float32; buffers a call does not use may be NULL. Returns 0; -1 for a kind this build lacks;
 * -2 for positions outside the cache or shapes the kernels do not take; -3 when out of memory. */
int ms_block(const ms_layer *L, int first, int last, int rows, int pos, int len, const int *text_lens,
             const float *text_w, const float *x, const float *a_in, const float *x1_in, const float *c_in,
             float *a, float *x1, float *c, float *out) {
    return run_blocks(&L, 1, first, last, rows, pos, len, text_lens, text_w, x, a_in, x1_in, c_in, a, x1, c, out,
                      NULL, NULL);
}

/* `count` whole blocks in sequence, x (rows, d) -> out (rows, d), in one parallel region: the
 * step's blocks between two hook points (one call for an unsteered step). Returns as ms_block. */
int ms_blocks(const ms_layer *const *layers, int count, int rows, int pos, int len, const int *text_lens,
              const float *text_w, const float *x, float *out) {
    if (count < 1) return -2;
    return run_blocks(layers, count, 0, 2, rows, pos, len, text_lens, text_w, x, NULL, NULL, NULL, NULL, NULL, NULL,
                      out, NULL, NULL);
}

/* ms_blocks with `side(arg)` run on thread 0 while the others start the blocks (it joins them at a
 * block boundary when done; with one thread it runs first). A side job must not use OpenMP itself.
 * Returns as ms_block; the job has run once this returns, whatever it returns. */
int ms_blocks_side(const ms_layer *const *layers, int count, int rows, int pos, int len, const int *text_lens,
                   const float *text_w, const float *x, float *out, void (*side)(void *), void *arg) {
    if (count < 1) return refused(-2, side, arg);
    return run_blocks(layers, count, 0, 2, rows, pos, len, text_lens, text_w, x, NULL, NULL, NULL, NULL, NULL, NULL,
                      out, side, arg);
}
