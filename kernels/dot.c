/* kernels._cpu: values, prepared input vectors, weight matrices and their dot products per weight
 * type (float32, bfloat16, int8 rows against int16 x, int4 words against int8 x); see cpu.h. Each
 * row is read as one stream, a 64-byte line (or more) per step: rows interleaved streamed slower. */
#include "cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- values ------------------------------------------------------------------------------------ */
float load1(const void *p, long i, int dtype) {
    if (dtype == F32) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* bfloat16 rounding of 8 floats, as to_bf16 (nearest even, NaN kept quiet), left in float32 bits. */
AVX2 static inline __m256i round8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v), high = _mm256_set1_epi32((int)0xffff0000u);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), high);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), high), nan);
}

AVX2 void round_to(float *v, long n, int dtype) {
    if (dtype != BF16) return;
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_si256((__m256i *)(v + i), round8_bf16(_mm256_loadu_ps(v + i)));
    for (; i < n; i++) {
        uint16_t h = to_bf16(v[i]);
        v[i] = load1(&h, 0, BF16);
    }
}

AVX2 void to_float(const void *src, long n, int dtype, float *dst) {
    if (dtype == F32) {
        memcpy(dst, src, n * 4);
        return;
    }
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i))), 16));
    for (; i < n; i++) dst[i] = load1(src, i, BF16);
}

AVX2 void from_float(const float *src, long n, int dtype, void *dst) {
    if (dtype == F32) {
        memcpy(dst, src, n * 4);
        return;
    }
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_srli_epi32(round8_bf16(_mm256_loadu_ps(src + i)), 16);  /* 8 x uint16 in 32-bit lanes */
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), packed);
    }
    for (; i < n; i++) ((uint16_t *)dst)[i] = to_bf16(src[i]);
}

AVX2 void add_rounded(float *x, const float *y, long n, int dtype) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) x[i] += y[i];
    round_to(x, n, dtype);
}

/* Rows of int4 words (n x k / 8, see mat_t) to [n, k] values (u - zero) * scale, rounded to bfloat16
 * as torch computes them in the bfloat16 scale's dtype, stored as bfloat16 or (widened) float32.
 * One word is 8 consecutive values: a variable shift puts value 8j + t in lane t, in order. */
AVX2 static void dequant_i4_avx2(void *dst, int dtype, const uint32_t *w, const float *s, const uint8_t *z, long n, long k, long group) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(15);
    long G = k / group;
    for (long r = 0; r < n; r++)
        for (long c = 0; c < k; c += 8) {
            long g = r * G + c / group;
            __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[(r * k + c) / 8]), shifts), low4));
            __m256i v = round8_bf16(_mm256_mul_ps(_mm256_sub_ps(u, _mm256_set1_ps((float)z[g])), _mm256_set1_ps(s[g])));
            if (dtype == F32) _mm256_storeu_si256((__m256i *)((float *)dst + r * k + c), v);
            else {
                __m256i h = _mm256_srli_epi32(v, 16);
                _mm_storeu_si128((__m128i *)((uint16_t *)dst + r * k + c), _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
            }
        }
}

/* ---- input vectors ------------------------------------------------------------------------------
 * xs ("split"): in each block of 16, the 8 even-indexed values, then the 8 odd ones. A 256-bit load
 * of 16 bfloat16 weights holds the even ones in the high halves of its 32-bit lanes after a shift
 * and the odd ones after a mask: two float32 vectors that pair with xs, with no shuffle.
 * xq: x as int8 with a scale per 32 values (sx, as llama.cpp's Q8_0), for int4 weights. A 256-bit
 * load of int4 words holds value 8l + t of a 64-value block in nibble t of lane l; masking gives
 * the even t in bytes 4l + t/2, a shift and mask the odd t: xq stores each block as those two
 * 32-byte vectors, so the products need no shuffle; per 128 values the two even vectors, then the
 * two odd ones, which is the same layout for a 512-bit load of 128 values. sxv: per block the lane scales (sx of values
 * 0-31 in lanes 0-3, of 32-63 in lanes 4-7); x32: per 32 values, sx * sum of xq (zero points:
 * sum (u - z) x = sum u x - z sum x). Only for k % 64 == 0, as int4 weights need. */
static long xq_floats(long k) { return (k + 127) / 128 * 32; }  /* whole 128-value superblocks */

long vec_floats(long k) { return 2 * k + xq_floats(k) + k / 8 + k / 32 + k / 2 + k / 32 + 2; }

vec_t vec_view(const float *storage, long k, int quant) {
    const float *sxv = storage + 2 * k + xq_floats(k), *x32 = sxv + k / 8, *s16 = x32 + k / 32 + 1;
    const int16_t *x16 = (const int16_t *)(s16 + k / 32 + 1);
    quant &= (k % 64 ? 0 : Q8) | (k % 32 ? 0 : Q16);
    return (vec_t){storage, storage + k, (const int8_t *)(storage + 2 * k), sxv, x32, x16, s16, k, quant};
}

int vec_needs(mat_t m) { return m.wtype == I4 ? Q8 : m.wtype == I8 ? Q16 : 0; }

/* x[0:32] rounded to integers (nearest even) on the scale max |x| / levels, into q; returns max |x|. */
AVX2 static float round32(const float *x, float levels, int32_t q[32]) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) m = _mm256_max_ps(m, _mm256_and_ps(v[i] = _mm256_loadu_ps(x + 8 * i), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? levels / amax : 0.0f);
    for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(q + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
    return amax;
}

/* Values x[0:n] (n <= 128, a multiple of 16) as int16 with one scale (max |x| / 32767): rounding
 * error at most 1 / 65534 of the block's largest value, far below bfloat16's own rounding. */
AVX2 static void quantize16(const float *x, long n, int16_t *q, float *scale) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (long i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    for (long i = 0; i < n; i += 16) {  /* packs works per 128-bit half: a0-3 b0-3 a4-7 b4-7, put back in order */
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inv));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    *scale = amax / 32767.0f;
}

/* Values x[0:32] as 32-value block b of xq (see above): int8, the scale sx = max |x| / 127 into sxv,
 * sx * (sum of the int8 values) into x32. */
static void quantize32(const float *x, long b, int8_t *xq, float *sxv, float *x32) {
    int32_t q[32], sum = 0;
    float sx = round32(x, 127.0f, q) / 127.0f;
    int8_t *dst = xq + 128 * (b / 4) + 32 * (b / 2 % 2);  /* the 64-block's even vector; its odd one 64 bytes on */
    for (int i = 0; i < 32; i++) {  /* value at = 8 l + t of the 64-block: byte 4 l + t / 2 of vector t % 2 */
        int at = 32 * (int)(b % 2) + i, l = at / 8, t = at % 8;
        dst[64 * (t % 2) + 4 * l + t / 2] = (int8_t)q[i];
        sum += q[i];
    }
    for (int l = 0; l < 4; l++) sxv[8 * (b / 2) + 4 * (b % 2) + l] = sx;
    x32[b] = sx * (float)sum;
}

/* xs[lo:hi] from x (see above): per 16 values, the 8 even then the 8 odd ones; the tail as it is. */
AVX2 static void split16(const float *x, float *xs, long lo, long hi) {
    long c = lo;
    for (; c + 16 <= hi; c += 16) {
        __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(x + c + 8);  /* shuffle: a0 a2 b0 b2 | a4 a6 b4 b6 */
        __m256 even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xd8));
        __m256 odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd)), 0xd8));
        _mm256_storeu_ps(xs + c, even);
        _mm256_storeu_ps(xs + c + 8, odd);
    }
    for (; c < hi; c++) xs[c] = x[c];
}

void vec_prepare_range(float *storage, long k, long lo, long hi, int quant) {
    vec_t v = vec_view(storage, k, quant);
    const float *x = storage;
    float *xs = (float *)v.xs, *sxv = (float *)v.sxv, *x32 = (float *)v.x32;
    int8_t *xq = (int8_t *)v.xq;
    split16(x, xs, lo, hi);
    if (v.quant & Q8)
        for (long b = lo / 32; b < hi / 32; b++) quantize32(x + 32 * b, b, xq, sxv, x32);
    if (v.quant & Q16)
        for (long b = lo / 128; 128 * b < hi; b++) quantize16(x + 128 * b, k - 128 * b < 128 ? k - 128 * b : 128, (int16_t *)v.x16 + 128 * b, (float *)v.s16 + b);
}

vec_t vec_prepare(const float *x, long k, float *storage, int quant) {
    if (x != storage) memmove(storage, x, k * sizeof(float));
    vec_prepare_range(storage, k, 0, k, quant);
    return vec_view(storage, k, quant);
}

/* ---- weight matrices ---------------------------------------------------------------------------- */
size_t row_bytes(mat_t m, long k) { return m.wtype == I4 ? (size_t)k / 2 : (size_t)k * esize(m.wtype); }
static long groups_of(mat_t m, long k) { return m.wtype == I4 ? k / m.group : 1; }

mat_t mat_row_block(mat_t m, long rows, long k, long index) {
    long g = groups_of(m, k);
    if (m.w) m.w += (size_t)index * rows * row_bytes(m, k);
    if (m.scale) m.scale = (const char *)m.scale + (size_t)index * rows * g * (m.wtype == I4 ? 4 : esize(m.sdtype));
    if (m.zero) m.zero += (size_t)index * rows * g;
    return m;
}

int mat_supported(mat_t m, long k) {
    if (m.wtype == I4) return k % 64 == 0 && m.scale && m.zero && m.sdtype == F32 && (m.group == 32 || (m.group > 0 && m.group % 64 == 0 && k % m.group == 0));
    if (m.wtype == I8) return m.scale != NULL && (m.sdtype == F32 || m.sdtype == BF16);
    return m.wtype == F32 || m.wtype == BF16;
}

/* ---- dot products ------------------------------------------------------------------------------- */

/* w[0:k] . x for float32 w, one row at a time and two 64-byte lines per step (as for bfloat16:
 * four rows interleaved, 32 bytes of each per step, streamed slower). */
AVX2 static float dot_f32(const float *w, const float *x, long k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long c = 0;
    for (; c + 32 <= k; c += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 8), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 16), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 24), _mm256_loadu_ps(x + c + 24), a3);
    }
    for (; c + 8 <= k; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; c < k; c++) s += w[c] * x[c];
    return s;
}

#define BF16_16(a, b)                                                                  \
    {                                                                                  \
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + c));                      \
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xs + c), a); \
        b = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), _mm256_loadu_ps(xs + c + 8), b); \
        c += 16;                                                                       \
    }

/* w[0:k] . x for bfloat16 w, one row at a time and a whole 64-byte line per step: measured 16.8 GB/s
 * on one core here against 12.3 for four rows of 32 bytes per step (and 18.5 for a bare read). */
AVX2 static float dot_bf16(const uint16_t *w, vec_t x) {
    const float *xs = x.xs;
    long k = x.k;
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    long c = 0;
    while (c + 64 <= k) {
        BF16_16(a0, b0) BF16_16(a1, b1) BF16_16(a2, b2) BF16_16(a3, b3)
    }
    while (c + 16 <= k) {
        BF16_16(a0, b0)
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1)), _mm256_add_ps(_mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3))));
    for (; c < k; c++) s += load1(w, c, BF16) * x.x[c];
    return s;
}

#define I8_8(a)                                                                                          \
    {                                                                                                    \
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + c)));                     \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(x + c), a);                            \
        c += 8;                                                                                          \
    }

/* w[0:k] . x for int8 w against x as int16 (Q16; k % 32 == 0): sign-extended weights times x in
 * pairs (vpmaddwd), summed in int32 over each 128-value block (at most 8 * 127 * 32767 a lane), then
 * times the block's scale in float32: about half the instructions of converting every weight to
 * float32, which made int8 compute-bound. The row's own scale is applied by the caller. */
AVX2 static float dot_i8_q16(const int8_t *w, vec_t x) {
    __m256 acc = _mm256_setzero_ps();
    for (long b = 0; b < x.k; b += 128) {
        long end = b + 128 < x.k ? b + 128 : x.k;
        __m256i p = _mm256_setzero_si256();
        for (long c = b; c < end; c += 16)
            p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + c))), _mm256_loadu_si256((const __m256i *)(x.x16 + c))));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(x.s16[b / 128]), acc);
    }
    return hsum(acc);
}

/* w[0:k] . x for int8 w (the row's scale is applied by the caller), a 64-byte line per step. */
AVX2 static float dot_i8(const int8_t *w, const float *x, long k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long c = 0;
    while (c + 64 <= k) {
        I8_8(a0) I8_8(a1) I8_8(a2) I8_8(a3) I8_8(a0) I8_8(a1) I8_8(a2) I8_8(a3)
    }
    while (c + 8 <= k) {
        I8_8(a0)
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; c < k; c++) s += w[c] * x[c];
    return s;
}

/* ---- AVX-512 ------------------------------------------------------------------------------------ */
/* int8 and int4 rows are read with a software prefetch two 4 KB pages ahead, into L2: the hardware
 * prefetcher stops at page boundaries, and their arithmetic per byte (more than bfloat16's) leaves it
 * behind. Measured in whole decode steps, two threads, in-process A/B: int4 one page ahead into L1
 * +20-30% over none, two pages ahead into L2 (with rows_i4_512) 1.05-1.13x over that; int8 1.04-1.07x;
 * bfloat16 0.95-1.02x (left without). */
#define PREFETCH_AHEAD(p) _mm_prefetch((const char *)(p) + 8192, _MM_HINT_T1)

int avx512_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

static int use_avx512 = -1;  /* -1: not yet decided */

int set_avx512(int on) { return use_avx512 = on && avx512_available(); }

static inline int avx512(void) { return use_avx512 < 0 ? set_avx512(1) : use_avx512; }

/* dot_i8_q16 with 512-bit vectors: 32 weights a step, multiplied and summed in one instruction (vpdpwssd). */
AVX512 static float dot_i8_q16_512(const int8_t *w, vec_t x) {
    __m512 acc = _mm512_setzero_ps();
    for (long b = 0; b < x.k; b += 128) {
        long end = b + 128 < x.k ? b + 128 : x.k;
        PREFETCH_AHEAD(w + b);
        PREFETCH_AHEAD(w + b + 64);
        __m512i p = _mm512_setzero_si512();
        for (long c = b; c < end; c += 32)
            p = _mm512_dpwssd_epi32(p, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + c))), _mm512_loadu_si512(x.x16 + c));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(x.s16[b / 128]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* dequant_i4 with 512-bit vectors: 16 values (two words) a step, the scale and zero point loaded once
 * per group; the same float32 arithmetic and rounding, so the same bits. */
AVX512 static void dequant_i4_512(void *dst, int dtype, const uint32_t *w, const float *s, const uint8_t *z, long n, long k, long group) {
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), low4 = _mm512_set1_epi32(15);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u), half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const size_t K = k, G = k / group;
    for (size_t r = 0; r < (size_t)n; r++)
        for (size_t g = 0; g < G; g++) {
            if (!isfinite(s[r * G + g])) {  /* a broken scale: NaN and inf as to_bf16 makes them, value by value */
                dequant_i4_avx2((char *)dst + (r * K + g * group) * esize(dtype), dtype, w + (r * K + g * group) / 8, s + r * G + g, z + r * G + g, 1, group, group);
                continue;
            }
            __m512 zf = _mm512_set1_ps((float)z[r * G + g]), sf = _mm512_set1_ps(s[r * G + g]);
            for (size_t c = g * group; c < (g + 1) * group; c += 16) {
                __m512i words = _mm512_permutexvar_epi32(pair, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(w + (r * K + c) / 8))));
                __m512 u = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), low4));
                __m512i b = _mm512_castps_si512(_mm512_mul_ps(_mm512_sub_ps(u, zf), sf));  /* finite: no NaN to keep */
                __m512i rounded = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(b, 16), one))), high);
                if (dtype == F32) _mm512_storeu_si512((float *)dst + r * K + c, rounded);
                else _mm256_storeu_si256((__m256i *)((uint16_t *)dst + r * K + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
            }
        }
}

/* int8 rows times their scale (float32 or bfloat16), as torch computes w.to(dtype) * scale.to(dtype):
 * the float32 product, rounded to bfloat16 for a bfloat16 dst. 8 values a step (AVX2) or 16 (AVX-512). */
AVX2 static void dequant_i8_avx2(void *dst, int dtype, const int8_t *w, const void *s, int sdtype, long n, long k) {
    for (long r = 0; r < n; r++) {
        float sr = load1(s, r, sdtype);
        __m256 sf = _mm256_set1_ps(sr);
        long c = 0;
        for (; c + 8 <= k && isfinite(sr); c += 8) {
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * k + c)))), sf);
            if (dtype == F32) _mm256_storeu_ps((float *)dst + r * k + c, f);
            else from_float((const float *)&f, 8, BF16, (uint16_t *)dst + r * k + c);
        }
        for (; c < k; c++) {  /* the tail, and a row whose scale is NaN / inf: value by value */
            float f = (float)w[r * k + c] * sr;
            if (dtype == F32) ((float *)dst)[r * k + c] = f;
            else ((uint16_t *)dst)[r * k + c] = to_bf16(f);
        }
    }
}

AVX512 static void dequant_i8_512(void *dst, int dtype, const int8_t *w, const void *s, int sdtype, long n, long k) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u), half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    for (long r = 0; r < n; r++) {
        float sr = load1(s, r, sdtype);
        if (!isfinite(sr)) {
            dequant_i8_avx2((char *)dst + r * k * esize(dtype), dtype, w + r * k, (const char *)s + r * esize(sdtype), sdtype, 1, k);
            continue;
        }
        __m512 sf = _mm512_set1_ps(sr);
        long c = 0;
        for (; c + 16 <= k; c += 16) {
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + r * k + c)))), sf);
            if (dtype == F32) {
                _mm512_storeu_ps((float *)dst + r * k + c, f);
                continue;
            }
            __m512i b = _mm512_castps_si512(f);  /* finite: rounded to nearest even as to_bf16 */
            __m512i rounded = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(b, 16), one))), high);
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + r * k + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
        }
        if (c < k)
            dequant_i8_avx2((char *)dst + (r * k + c) * esize(dtype), dtype, w + r * k + c, (const char *)s + r * esize(sdtype), sdtype, 1, k - c);
    }
}

void dequant(void *dst, int dtype, mat_t m, long n, long k) {
    if (m.wtype == I4) (avx512() ? dequant_i4_512 : dequant_i4_avx2)(dst, dtype, (const uint32_t *)m.w, m.scale, m.zero, n, k, m.group);
    else (avx512() ? dequant_i8_512 : dequant_i8_avx2)(dst, dtype, (const int8_t *)m.w, m.scale, m.sdtype, n, k);
}

/* dot_i4 with 512-bit vectors, for groups of 32 or 64 (k % 64 == 0: a last step of 64 values
 * masked, as for Pangu's expert width 1344) or a multiple of 128 (k % 128 == 0): 128 values a step, their nibbles times xq summed four bytes to a 32-bit lane at once (vpdpbusd). Lane l holds
 * word l, so the block scales are xq's sxv as they are and the group scales one per 4, 8 or 16 lanes. */
AVX512 static float dot_i4_512(const uint32_t *w, const float *s, const uint8_t *z, const float *xg, long group, vec_t x) {
    const __m512i low4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), group == 32 ? 2 : 3);
    const size_t k = x.k, full = k / 128 * 128, span = group >= 128 ? group : 128;  /* span: values per scale load */
    const size_t scales_per_span = group >= 128 ? 1 : 128 / group;  /* out of the loop: gcc left a division in it */
    const float *sc = s;
    __m512 acc = _mm512_setzero_ps();
    for (size_t c0 = 0; c0 < full; c0 += span, sc += scales_per_span) {
        __m512 sw = group >= 128 ? _mm512_set1_ps(*sc) : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(group == 32 ? 0xf : 0x3, sc));
        for (size_t c = c0; c < c0 + span; c += 128) {
            __m512i v = _mm512_loadu_si512(w + c / 8);
            PREFETCH_AHEAD(w + c / 8);
            const int8_t *xb = x.xq + c;
            __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xb)), hi, _mm512_loadu_si512(xb + 64));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(sw, _mm512_loadu_ps(x.sxv + c / 8)), acc);
        }
    }
    if (full < k) {  /* k % 128 == 64 (groups of 32 or 64): the last 64 values, the upper 8 words masked off */
        __m512i v = _mm512_maskz_loadu_epi32(0xff, w + full / 8);
        const int8_t *xb = x.xq + full;  /* a whole superblock of storage; its unused half meets zero nibbles */
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xb)), hi, _mm512_loadu_si512(xb + 64));
        __m512 sw = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(group == 32 ? 0x3 : 0x1, sc));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(0xff, x.sxv + full / 8)), acc);
    }
    for (long g = 0, G = x.k / group; g < G; g += 16) {  /* minus sum_g scale_g * zero_g * x_g */
        __mmask16 in = G - g >= 16 ? 0xffff : (__mmask16)((1u << (G - g)) - 1);
        __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, z + g)));
        acc = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, s + g), zf), _mm512_maskz_loadu_ps(in, xg + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Four floats: the sums of a0..a3's lanes, in order. */
AVX512 static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 a01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));  /* per 128 bits: r0 r1 r0 r1 */
    __m512 a23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a01), _mm512_castps_pd(a23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a01), _mm512_castps_pd(a23))));  /* r0 r1 r2 r3 */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(r), _mm512_extractf32x8_ps(r, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* dot_i4_512 for four consecutive short rows (k <= 256: at most 512 bytes, one stretch of memory),
 * sharing x's loads and one final sum: a short row otherwise costs more in setup and sums than in
 * products (measured 1.4x faster from cache; rows as long as 512 bytes read four streams at once and
 * ran 2x slower from memory, so they go one at a time). Groups of 32-256 here (powers of 2); at most
 * 8 groups a row. The four sums are kept in named registers: as an array they went through memory. */
AVX512 static __m128 dot_i4_512x4(const uint32_t *w, const float *s, const uint8_t *z, const float *xg, long group, vec_t x) {
    const __m512i low4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), group == 32 ? 2 : 3);
    const __mmask16 scales_in = group == 32 ? 0xf : 0x3, groups_in = (__mmask16)((1u << (x.k / group)) - 1);
    const size_t k = x.k, G = k / group, words = k / 8, shift = __builtin_ctzl(group);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t c = 0; c < k; c += 128) {
        __m512i xe = _mm512_loadu_si512(x.xq + c), xo = _mm512_loadu_si512(x.xq + c + 64);
        __m512 sx = _mm512_loadu_ps(x.sxv + c / 8);
#define ROW_STEP(j, acc)                                                                                                              \
    {                                                                                                                                 \
        const uint32_t *wj = w + j * words + c / 8;                                                                                   \
        const float *sj = s + j * G + (c >> shift);                                                                                   \
        __m512i v = _mm512_loadu_si512(wj);                                                                                           \
        PREFETCH_AHEAD(wj);                                                                                                           \
        __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, _mm512_and_si512(v, low4), xe), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xo); \
        __m512 sw = group >= 128 ? _mm512_set1_ps(*sj) : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(scales_in, sj));   \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(sw, sx), acc);                                                    \
    }
        ROW_STEP(0, a0) ROW_STEP(1, a1) ROW_STEP(2, a2) ROW_STEP(3, a3)
#undef ROW_STEP
    }
    __m512 xgv = _mm512_maskz_loadu_ps(groups_in, xg);  /* minus sum_g scale_g * zero_g * x_g */
#define ZERO_TERM(j, acc) \
    acc = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(groups_in, s + j * G), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(groups_in, z + j * G)))), xgv, acc);
    ZERO_TERM(0, a0) ZERO_TERM(1, a1) ZERO_TERM(2, a2) ZERO_TERM(3, a3)
#undef ZERO_TERM
    return reduce4(a0, a1, a2, a3);
}

/* One int4 row (k % 64 == 0) against xq: sum over groups g of scale_g * (sum u xq sx - zero_g * x_g),
 * where x_g (xg) is the group's sum of x. Integer products per 64-value block (one 256-bit load of
 * words): unsigned nibbles times signed int8 x, pairs summed to int16, then to int32 per lane, then
 * scaled in float32 by weight scale x activation scale. Group 32 takes two weight scales a block. */
AVX2 static float dot_i4(const uint32_t *w, const float *s, const uint8_t *z, const float *xg, long group, vec_t x) {
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const size_t k = x.k, span = group == 32 ? 64 : group;  /* values per scale load (unsigned: c / 8 is a shift) */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (size_t c0 = 0; c0 < k; c0 += span, s += group == 32 ? 2 : 1) {
        __m256 sw = group == 32 ? _mm256_set_m128(_mm_set1_ps(s[1]), _mm_set1_ps(s[0])) : _mm256_set1_ps(*s);
        for (size_t c = c0; c < c0 + span; c += 64) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + c / 8));
            const __m256i *xb = (const __m256i *)(x.xq + 128 * (c / 128) + (c & 64) / 2);
            __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xb)), _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xb + 2)));
            __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            __m256 sv = _mm256_mul_ps(sw, _mm256_loadu_ps(x.sxv + c / 8));
            if (c & 64) acc1 = _mm256_fmadd_ps(d, sv, acc1);
            else acc0 = _mm256_fmadd_ps(d, sv, acc0);
        }
    }
    s -= x.k / group;
    long G = x.k / group, g = 0;
    __m256 zs = _mm256_setzero_ps();  /* sum_g scale_g * zero_g * x_g */
    for (; g + 8 <= G; g += 8) {
        __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z + g))));
        zs = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + g), zf), _mm256_loadu_ps(xg + g), zs);
    }
    float r = hsum(_mm256_sub_ps(_mm256_add_ps(acc0, acc1), zs));
    for (; g < G; g++) r -= s[g] * (float)z[g] * xg[g];
    return r;
}

/* dot_i4_512 for rows [lo, hi) into y[0 .. hi - lo), inlined into the loop (flatten), its setup
 * hoisted out of the rows: 1.18x from cache. */
__attribute__((flatten)) AVX512 static void rows_i4_512(mat_t m, vec_t x, const float *xg, long lo, long hi, float *y) {
    long G = x.k / m.group;
    size_t rb = row_bytes(m, x.k);
    for (long r = lo; r < hi; r++)
        y[r - lo] = dot_i4_512((const uint32_t *)(m.w + r * rb), (const float *)m.scale + r * G, m.zero + r * G, xg, m.group, x);
}

/* y[r - lo] = row r of m . x, times its scale, for r in [lo, hi). */
void rows_dot(mat_t m, vec_t x, long lo, long hi, float *y) {
    long k = x.k, r = lo;
    size_t rb = row_bytes(m, k);
    if (m.wtype == I4) {
        long G = k / m.group, per = m.group / 32;
        float xg[G];  /* per group: sum of x (as quantized) */
        for (long g = 0; g < G; g++) {
            xg[g] = 0.0f;
            for (long i = 0; i < per; i++) xg[g] += x.x32[g * per + i];
        }
        int wide = avx512() && (m.group <= 64 || m.group % 128 == 0);  /* k % 128 == 64 only with groups of 32 / 64 */
        if (wide && k <= 256 && k % 128 == 0)
            for (; r + 4 <= hi; r += 4)
                _mm_storeu_ps(y + r - lo, dot_i4_512x4((const uint32_t *)(m.w + r * rb), (const float *)m.scale + r * G, m.zero + r * G, xg, m.group, x));
        if (wide)
            rows_i4_512(m, x, xg, r, hi, y + r - lo);
        else
            for (; r < hi; r++)
                y[r - lo] = dot_i4((const uint32_t *)(m.w + r * rb), (const float *)m.scale + r * G, m.zero + r * G, xg, m.group, x);
        return;
    }
    if (m.wtype == F32)
        for (; r < hi; r++) y[r - lo] = dot_f32((const float *)(m.w + r * rb), x.x, k);
    else if (m.wtype == BF16)
        for (; r < hi; r++) y[r - lo] = dot_bf16((const uint16_t *)(m.w + r * rb), x);
    else
        for (; r < hi; r++) {
            const int8_t *wr = (const int8_t *)(m.w + r * rb);
            y[r - lo] = !(x.quant & Q16) ? dot_i8(wr, x.x, k) : avx512() ? dot_i8_q16_512(wr, x) : dot_i8_q16(wr, x);
        }
    if (m.wtype == I8)
        for (r = lo; r < hi; r++) y[r - lo] *= load1(m.scale, r, m.sdtype);
}
