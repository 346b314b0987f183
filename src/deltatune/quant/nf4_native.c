/* NF4 dequantisation for deltatune's 4-bit layers on the CPU (see nf4_native.py).
 *
 *   out[2i]   = level[packed[i] >> 4]  * absmax[(2i) / block]
 *   out[2i+1] = level[packed[i] & 0xF] * absmax[(2i) / block]
 *
 * with the absmax decoded from 8 bits block by block when the weight is double-quantised. *
 * The product is one fp32 multiply; bf16 output rounds it to nearest even, as torch's cast
 * does, so the values equal NF4Tensor.dequantize(dtype) bit for bit. Three versions of one
 * loop: AVX-512 and AVX2 (a 16-entry table lookup is one or two permute instructions), and
 * plain C for every other CPU. The compiler picks by the flags it was given (-march=native).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void block_plain(const uint8_t *p, int64_t n_bytes, float s, const float *level, int bf16, void *out) {
    for (int64_t i = 0; i < n_bytes; i++) {
        float a = level[p[i] >> 4] * s, b = level[p[i] & 15] * s;
        if (bf16) {
            ((uint16_t *)out)[2 * i] = bf16_bits(a);
            ((uint16_t *)out)[2 * i + 1] = bf16_bits(b);
        } else {
            ((float *)out)[2 * i] = a;
            ((float *)out)[2 * i + 1] = b;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define STEP 16 /* bytes per iteration */
static inline __m512i bf16_round(__m512 v) { /* the top 16 bits of each lane are the bf16 bits */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}
static void block_simd(const uint8_t *p, int64_t n_bytes, float s, const float *level, int bf16, void *out) {
    const __m512 table = _mm512_loadu_ps(level), scale = _mm512_set1_ps(s);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t i = 0; i < n_bytes; i += STEP) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
        __m512i hi = _mm512_srli_epi32(b, 4), lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
        __m512 v0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table), scale);
        __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table), scale);
        if (bf16) {
            uint16_t *o = (uint16_t *)out + 2 * i;
            _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(bf16_round(v0)));
            _mm256_storeu_si256((__m256i *)(o + 16), _mm512_cvtepi32_epi16(bf16_round(v1)));
        } else {
            float *o = (float *)out + 2 * i;
            _mm512_storeu_ps(o, v0);
            _mm512_storeu_ps(o + 16, v1);
        }
    }
}
#elif defined(__AVX2__)
#define STEP 8
static inline __m256i bf16_round(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
}
static inline __m256 lookup(__m256i idx, __m256 low8, __m256 high8, __m256 scale) {
    __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low8, idx), _mm256_permutevar8x32_ps(high8, idx), upper);
    return _mm256_mul_ps(v, scale);
}
static void block_simd(const uint8_t *p, int64_t n_bytes, float s, const float *level, int bf16, void *out) {
    const __m256 low8 = _mm256_loadu_ps(level), high8 = _mm256_loadu_ps(level + 8), scale = _mm256_set1_ps(s);
    for (int64_t i = 0; i < n_bytes; i += STEP) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
        __m256i hi = _mm256_srli_epi32(b, 4), lo = _mm256_and_si256(b, _mm256_set1_epi32(15));
        __m256i a = _mm256_unpacklo_epi32(hi, lo), c = _mm256_unpackhi_epi32(hi, lo); /* per 128-bit lane */
        __m256 v0 = lookup(_mm256_permute2x128_si256(a, c, 0x20), low8, high8, scale); /* values 0..7 */
        __m256 v1 = lookup(_mm256_permute2x128_si256(a, c, 0x31), low8, high8, scale); /* values 8..15 */
        if (bf16) {
            __m256i packed = _mm256_packus_epi32(bf16_round(v0), bf16_round(v1));
            packed = _mm256_permute4x64_epi64(packed, 0xD8); /* undo packus' lane interleave */
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + 2 * i), packed);
        } else {
            float *o = (float *)out + 2 * i;
            _mm256_storeu_ps(o, v0);
            _mm256_storeu_ps(o + 8, v1);
        }
    }
}
#else
#define STEP 1
static void block_simd(const uint8_t *p, int64_t n_bytes, float s, const float *level, int bf16, void *out) {
    block_plain(p, n_bytes, s, level, bf16, out);
}
#endif

/* The scale of block k: fp32 absmax[k], or, double-quantised, dyn[qabsmax[k]] * qscale[k / group]
 * + offset, computed as NF4Tensor.block_absmax computes it (an fp32 multiply, then an fp32 add). */
typedef struct {
    const float *absmax;           /* (n_blocks,) fp32, or NULL when double-quantised */
    const uint8_t *qabsmax;        /* (n_blocks,) 8-bit codes of the absmax */
    const float *qscale;           /* (ceil(n_blocks / group),) fp32 */
    const float *dyn;              /* (256,) fp32: the dynamic 8-bit map */
    float offset;                  /* the mean subtracted before the 8-bit quantisation */
    int64_t group;                 /* absmax values per qscale (256) */
} dt_scales;

static inline float block_scale(const dt_scales *sc, int64_t k) {
    if (sc->absmax) return sc->absmax[k];
    float t = sc->dyn[sc->qabsmax[k]] * sc->qscale[k / sc->group];
    return t + sc->offset;
}

/* Dequantise the blocks first_block .. first_block + n_bytes / (block / 2) - 1: packed points at
 * the first of their n_bytes codes, out at where their first value goes; block sizes are even.
 * level: the 16 fp32 NF4 levels; bf16: 0 writes fp32, 1 writes bf16. Returns the SIMD width in
 * bytes of the loop that ran (1: plain C), so tests can tell which loop they checked. */
int dt_nf4_dequantize(const uint8_t *packed, int64_t n_bytes, int64_t block, int64_t first_block,
                      const float *absmax, const uint8_t *qabsmax, const float *qscale, const float *dyn,
                      float offset, int64_t group, const float *level, int bf16, void *out) {
    const dt_scales sc = {absmax, qabsmax, qscale, dyn, offset, group};
    const int64_t bytes = block / 2, size = bf16 ? 2 : 4;
    for (int64_t k = 0; k * bytes < n_bytes; k++) {
        const uint8_t *p = packed + k * bytes;
        char *o = (char *)out + 2 * k * bytes * size;
        float s = block_scale(&sc, first_block + k);
        if (bytes % STEP == 0) block_simd(p, bytes, s, level, bf16, o);
        else block_plain(p, bytes, s, level, bf16, o);
    }
    return STEP;
}
