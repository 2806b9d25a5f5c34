/* AVX2/FMA helpers for the x86-64-v3 paths of cpu_gemv.c, cpu_reduced.c and cpu_block.c: the
 * activations, e^x for the softmax and horizontal sums, eight float32 lanes at a time.
 *
 * Included by cpu_gemv.c (one translation unit) wherever the build has AVX2 and FMA, AVX-512 or
 * not: a build with AVX-512 F but no VNNI (Skylake-X) runs its int8 and int4 products on the
 * AVX2 paths, and those use these activations. The formulas are those of the AVX-512 helpers
 * (same polynomials, same constants); only the 2^n scaling is built from the exponent bits,
 * since AVX2 has no vscalefps.
 */
#include <immintrin.h>

/* e^x for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2 / 2, p of degree 6. */
static inline __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f)); /* n >= -126: 2^n stays a normal float */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

static inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

static inline __m256 copysign8(__m256 magnitude, __m256 sign) { /* magnitude >= 0 */
    return _mm256_or_ps(magnitude, _mm256_and_ps(sign, _mm256_set1_ps(-0.0f)));
}

/* erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), tanh through e^(-2|u|). */
static inline __m256 erf8(__m256 x) {
    __m256 ax = abs8(x);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(ax, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    __m256 y = _mm256_fnmadd_ps(p, exp_neg8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax))), _mm256_set1_ps(1.0f));
    return copysign8(y, x);
}

static inline __m256 tanh8(__m256 u) {
    __m256 e = exp_neg8(_mm256_mul_ps(abs8(u), _mm256_set1_ps(-2.0f)));
    __m256 y = _mm256_div_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), e), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return copysign8(y, u);
}

/* The epilogue activation of a product (ACT_* of cpu_gemv.c) on eight outputs. */
static inline __m256 activate8(__m256 v, int act) {
    if (act == 1) { /* ACT_GELU */
        __m256 half = _mm256_mul_ps(v, _mm256_set1_ps(0.5f));
        return _mm256_fmadd_ps(half, erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678f))), half);
    }
    if (act == 2) { /* ACT_GELU_TANH */
        __m256 inner = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(v, v), v), _mm256_set1_ps(0.044715f), v),
                                     _mm256_set1_ps(0.7978845608f));
        __m256 half = _mm256_mul_ps(v, _mm256_set1_ps(0.5f));
        return _mm256_fmadd_ps(half, tanh8(inner), half);
    }
    if (act == 3) return _mm256_max_ps(v, _mm256_setzero_ps()); /* ACT_RELU */
    return v;
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

static inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

/* The four sums of four vectors, in lanes 0..3. */
static inline __m128 hsum8x4(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3)); /* per 128-bit half */
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
