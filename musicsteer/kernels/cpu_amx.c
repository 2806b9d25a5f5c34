/* Many-row int8 and int4 products on AMX tiles (Intel Advanced Matrix Extensions): the re-prime's
 * prefill and other calls of 16 rows or more, where the VNNI kernels (one pass over the weights
 * per 8 rows, a broadcast per input quad) are compute-bound at a small fraction of the machine.
 *
 * The packed weights are already in the layout a tile multiply wants: a block of 16 outputs and
 * a group of 64 inputs is 16 quads of (16 outputs x 4 inputs) bytes, one B tile (16 rows of 64
 * bytes), contiguous for int8 and unpacked from its 8 vectors of nibbles for int4. The A tile is
 * 16 rows of the activations' int8 form (the same per-row, per-group quantization as the VNNI
 * path, quantize_rows), and TDPBSUD (signed activations x unsigned weights) sums each group's
 * products exactly in int32. Each group's sums then take the same float32 steps, in the same
 * order, as i8_block and i4_block, so the results equal the VNNI kernels' bit for bit (tested).
 *
 * The tiles need the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM, once per process);
 * where it is refused, or the build has no AMX, the VNNI kernels take every call.
 *
 * Part of cpu_gemv.c's translation unit (included after cpu_reduced.c, whose argument structs,
 * activation quantization and epilogues it reuses).
 */

#define MS_AMX_MIN_ROWS 16 /* fewer rows than a tile: the VNNI kernels */

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BW__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define MS_ARCH_REQ_XCOMP_PERM 0x1023
#define MS_XFEATURE_XTILEDATA 18

static int amx_state = 0; /* 1 once the kernel has granted the tiles */
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static atomic_int amx_off = 0;

static void amx_ask(void) {
    amx_state = syscall(SYS_arch_prctl, MS_ARCH_REQ_XCOMP_PERM, MS_XFEATURE_XTILEDATA) == 0;
}

/* 1 when the tiles are usable and on, else 0; `on` 0 turns them off for this process, 1 back on,
 * -1 only asks (tests compare the two paths in one process). */
int ms_amx(int on) {
    pthread_once(&amx_once, amx_ask);
    if (on == 0 || on == 1) atomic_store(&amx_off, !on);
    return amx_state == 1 && !atomic_load(&amx_off);
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Tiles: 0 and 3 the sums (16 rows x 16 int32, two groups in flight), 1 the activations (16 rows x
 * 64 bytes), 2 the weights.
 * A constant in memory: gcc 12 does not treat ldtilecfg as reading its operand, and moved the stores
 * of a configuration built on the stack past it. */
static const amx_config AMX_TILES = {.palette = 1, .colsb = {64, 64, 64, 64}, .rows = {16, 16, 16, 16}};

static void amx_configure(void) { _tile_loadconfig(&AMX_TILES); }

typedef struct {
    const uint8_t *w;
    const void *scale;    /* int8: float32 per output (n); int4: bfloat16 per output and group [n/16][d/64][16] */
    const int8_t *xq;     /* (rows16, d), rows16 a multiple of 16, the padding rows zero */
    const float *xscale;  /* (rows16, d/64) */
    const int32_t *xcomp; /* (rows16, d/64): 128 * sum of the group's x_q */
    float *y;             /* (rows, n) */
    uint8_t *unpacked;    /* int4: d * 16 bytes per thread of the team, for a block's unpacked weights */
    int n, d, rows, act, int4;
} amx_args;

/* A block's weights for the B tiles: int8 as packed; int4 unpacked once per block into `unpacked`
 * (d * 16 bytes), for all its row tiles: per group 8 vectors of nibbles, quad j in the low ones,
 * quad j + 8 in the high ones. */
static const uint8_t *amx_weights(const amx_args *a, int b, uint8_t *unpacked) {
    const int d = a->d;
    if (!a->int4) return a->w + (size_t)b * d * 16;
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const uint8_t *wb = a->w + (size_t)b * d * 8;
    for (int g = 0; g < d / MS_GROUP; g++) {
        const uint8_t *wg = wb + (size_t)g * MS_GROUP * 8;
        uint8_t *ug = unpacked + (size_t)g * MS_GROUP * 16;
        for (int j = 0; j < 8; j++) {
            __m512i v = _mm512_loadu_si512(wg + j * 64);
            _mm512_storeu_si512(ug + j * 64, _mm512_and_si512(v, nib));
            _mm512_storeu_si512(ug + (j + 8) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
        }
    }
    return unpacked;
}

/* Group g's tile product for rows r0..r0+15 into sum tile `t` (0 or 3; 1 and 2 hold the operands). */
#define AMX_PRODUCT(t, g)                                                                    \
    do {                                                                                     \
        _tile_zero(t);                                                                       \
        _tile_loadd(1, a->xq + (size_t)r0 * d + (g) * MS_GROUP, d);                          \
        _tile_loadd(2, wt + (size_t)(g) * MS_GROUP * 16, 64);                                \
        _tile_dpbsud(t, 1, 2);                                                               \
    } while (0)

/* One block of 16 outputs for rows r0..r0+15: per group, one tile product, then the VNNI kernels'
 * float32 steps on its sums, in group order. The next group's product runs on the tiles while the
 * float32 steps of this one run on the vector units (two sum tiles, 0 and 3, in turn). */
static void amx_block(const amx_args *a, int b, int r0, const uint8_t *wt, int32_t *sums) {
    const int d = a->d, groups = d / MS_GROUP, last = a->rows - r0 < 16 ? a->rows - r0 : 16;
    __m512 out[16];
    for (int r = 0; r < 16; r++) out[r] = _mm512_setzero_ps();
    AMX_PRODUCT(0, 0);
    for (int g = 0; g < groups; g++) {
        if (g % 2 == 0) {
            _tile_stored(0, sums, 64);
            if (g + 1 < groups) AMX_PRODUCT(3, g + 1);
        } else {
            _tile_stored(3, sums, 64);
            if (g + 1 < groups) AMX_PRODUCT(0, g + 1);
        }
        if (a->int4) {
            const __m512 wsv = bf16x16((const uint16_t *)a->scale + ((size_t)b * groups + g) * 16);
            for (int r = 0; r < last; r++) {
                const int at = (r0 + r) * groups + g;
                __m512i s = _mm512_sub_epi32(_mm512_loadu_si512(sums + r * 16), _mm512_set1_epi32(a->xcomp[at] >> 4));
                out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wsv, _mm512_set1_ps(a->xscale[at])), out[r]);
            }
        } else {
            for (int r = 0; r < last; r++) {
                const int at = (r0 + r) * groups + g;
                __m512i s = _mm512_sub_epi32(_mm512_loadu_si512(sums + r * 16), _mm512_set1_epi32(a->xcomp[at]));
                out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a->xscale[at]), out[r]);
            }
        }
    }
    const __m512 sc = a->int4 ? _mm512_set1_ps(1.0f) : _mm512_loadu_ps((const float *)a->scale + b * 16);
    for (int r = 0; r < last; r++) {
        __m512 v = activate(a->int4 ? out[r] : _mm512_mul_ps(out[r], sc), a->act);
        _mm512_storeu_ps(a->y + (size_t)(r0 + r) * a->n + b * 16, v);
    }
}
#undef AMX_PRODUCT

static void amx_task(void *args, int begin, int end) {
    const amx_args *a = args;
    int32_t sums[256] __attribute__((aligned(64)));
    uint8_t *unpacked = a->int4 ? a->unpacked + (size_t)omp_get_thread_num() * a->d * 16 : NULL;
    amx_configure();
    for (int b = begin; b < end; b++) { /* the block's weights stay in L1/L2 across the row tiles */
        const uint8_t *wt = amx_weights(a, b, unpacked);
        for (int r0 = 0; r0 < a->rows; r0 += 16) amx_block(a, b, r0, wt, sums);
    }
    _tile_release();
}

/* y (rows, n) for rows >= 16 on tiles; 1 when done, 0 when the tiles are not usable or off (the
 * caller takes the VNNI kernel), -3 out of memory. */
static int amx_linear(const uint8_t *w, const void *scale, const float *x, float *y, int n, int d, int rows, int act,
                      int int4) {
    if (rows < MS_AMX_MIN_ROWS || !ms_amx(-1)) return 0;
    const int rows16 = (rows + 15) / 16 * 16, groups = d / MS_GROUP;
    int8_t *xq = aligned_alloc(64, (size_t)rows16 * d);
    float *xs = malloc(sizeof(float) * (size_t)rows16 * groups);
    int32_t *xc = malloc(sizeof(int32_t) * (size_t)rows16 * groups);
    uint8_t *unpacked = int4 ? aligned_alloc(64, (size_t)omp_get_max_threads() * d * 16) : NULL;
    if (!xq || !xs || !xc || (int4 && !unpacked)) {
        free(xq), free(xs), free(xc), free(unpacked);
        return -3;
    }
    quantize_rows(x, rows, d, xq, xs, xc);
    memset(xq + (size_t)rows * d, 0, (size_t)(rows16 - rows) * d);
    amx_args a = {w, scale, xq, xs, xc, y, unpacked, n, d, rows, act, int4};
    run(amx_task, &a, n / 16, (size_t)n * d * rows16 / 16);
    free(xq), free(xs), free(xc), free(unpacked);
    return 1;
}
#else
int ms_amx(int on) {
    (void)on;
    return 0;
}

static inline int amx_linear(const uint8_t *w, const void *scale, const float *x, float *y, int n, int d, int rows,
                             int act, int int4) {
    (void)w; (void)scale; (void)x; (void)y; (void)n; (void)d; (void)rows; (void)act; (void)int4;
    return 0;
}
#endif
