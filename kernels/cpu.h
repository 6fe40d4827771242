/* kernels._cpu: shared declarations of the one-token (decode) kernels.
 *
 *   pool.c    the thread pool
 *   dot.c     values, prepared input vectors, weight matrices and their dot products per weight type
 *   cpu.c     the ops of a layer for one token: linear, SwiGLU MLPs summed (routed + shared experts),
 *             RMSNorm, routing, attention; and the bfloat16 -> float16 cast of moge convert
 *   step.c    a whole decode step (every layer, then the lm_head) from a plan of pointers
 *   module.c  the Python entry points (pointers from torch's data_ptr(), checked by kernels/native.py)
 *
 * Activations are float32 inside the kernels; a bfloat16 model's values are rounded to bfloat16
 * wherever torch's path stores them in the model dtype. Weights are float32, bfloat16, int8 with a
 * scale per row, or int4 in compressed-tensors int32 words with a scale and zero point per group.
 */
#ifndef MOGE_CPU_H
#define MOGE_CPU_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define MAX_PICKS 256

/* The dot products of int8 and int4 weights have AVX-512 (VNNI) versions, used where the CPU has
 * them (Ice Lake, Zen 4 and later) unless turned off (set_avx512(0): tests compare both). */
int avx512_available(void);
int set_avx512(int on);  /* returns whether they are now used */

enum { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };  /* activations: F32 or BF16; weights: any */

static inline size_t esize(int t) { return t == F32 ? 4 : t == BF16 ? 2 : 1; }  /* bytes of a value (not I4) */

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


/* A weight matrix [n, k]. I8: w int8 [n, k], scale [n] in sdtype. I4: w uint32 [n, k / 8] (value
 * 8j + t at bits 4t, stored as q + 8), scale float32 [n, k / group], zero uint8 [n, k / group]
 * (the stored zero point + 8; 8 when symmetric): weight = (u - zero) * scale. */
typedef struct {
    const char *w;
    const void *scale;
    const uint8_t *zero;
    int wtype, sdtype;
    long group;
} mat_t;

mat_t mat_row_block(mat_t m, long rows, long k, long index);  /* matrix `index` of a stack of [rows, k] ones */
/* An int8 or int4 matrix [n, k] to values in dtype (F32 or BF16) as torch's path computes them (dot.c). */
void dequant(void *dst, int dtype, mat_t m, long n, long k);
size_t row_bytes(mat_t m, long k);
int mat_supported(mat_t m, long k);                           /* the kernels can read it (I4: k % 64, group) */

/* An input vector, prepared once for every weight type: x [k], its bfloat16 split copy, for int4
 * weights x as int8 with scales and sums per 32 values (Q8), for int8 weights x as int16 with a scale
 * per 128 values (Q16); see dot.c. vec_floats(k) floats of storage. */
typedef struct {
    const float *x, *xs;
    const int8_t *xq;
    const float *sxv, *x32;
    const int16_t *x16;
    const float *s16;
    long k;
    int quant;  /* Q8 | Q16: the integer copies prepared */
} vec_t;

enum { Q8 = 1, Q16 = 2 };
int vec_needs(mat_t m);  /* the integer copies a weight's dot products read: Q8 (int4), Q16 (int8) or 0 */

long vec_floats(long k);
/* x copied to storage (x may be storage itself) and prepared, with the integer copies in `quant`. */
vec_t vec_prepare(const float *x, long k, float *storage, int quant);
void vec_prepare_range(float *storage, long k, long lo, long hi, int quant);  /* lo % 128 == 0; hi % 128 == 0 or k */
vec_t vec_view(const float *storage, long k, int quant);

float load1(const void *p, long i, int dtype);
uint16_t to_bf16(float f);
void round_to(float *v, long n, int dtype);  /* v rounded to dtype in place (no-op for F32) */
void add_rounded(float *x, const float *y, long n, int dtype);  /* x += y, rounded to dtype */
void to_float(const void *src, long n, int dtype, float *dst);
void from_float(const float *src, long n, int dtype, void *dst);

/* ---- thread pool ---- */
typedef void (*task_fn)(void *ctx, int part, int parts);
void run_parallel(task_fn fn, void *ctx, int parallel);
void pool_set_threads(int n);

/* y[r - lo] = row r of m . x, times its scale, for r in [lo, hi) (dot.c) */
void rows_dot(mat_t m, vec_t x, long lo, long hi, float *y);

/* ---- ops: every one float32 in and out (cpu.c) ---- */
void linear(mat_t w, const float *bias, vec_t x, long n, float *y);  /* y[n] = w x (+ bias) */

typedef struct {
    mat_t w13, w2;  /* [2I, H] (gate rows, then up), [H, I] */
    long inter;     /* I */
    float coef;
} mlp_t;
/* y[H] = sum_j coef_j * w2_j(silu(gate_j x) * up_j x), in order; the activation rounded to dtype.
 * scratch: mlps_scratch_floats(...) floats. */
long mlps_scratch_floats(const mlp_t *m, int count);
void mlps(const mlp_t *m, int count, vec_t x, int dtype, float *scratch, float *y);

void rms_norm(const float *x, const float *w, long n, float eps, float *y);
/* kernels.route for one token (E <= 4096): ids [G * picks], weights; 0, or -1 for bad counts. */
int route(const float *logits, long E, long G, long picks, const float *scale, int64_t *ids, float *weights);
/* RoPE on qkv's q and k heads, k and v written to the caches [nKV, s_max, D] (dtype) at pos,
 * attention over 0..pos into o [nH D]. scratch: attend_scratch_floats(...) floats. */
long attend_scratch_floats(long nH, long D, long pos);
void attend(const float *qkv, const float *cos, const float *sin, void *k_cache, void *v_cache, long pos, long nH, long nKV,
            long D, long s_max, int dtype, float *scratch, float *o);

/* dst = src as float16 (n values), one pass; returns the count of finite values beyond +-65504. */
long cast_bf16_f16(uint16_t *dst, const uint16_t *src, long n);

/* ---- a whole decode step (step.c) ---- */
const char *decode_step_check(const int64_t *plan);
int decode_step(const int64_t *plan, float *logits, long token, long pos, void *k_cache, void *v_cache, long s_max, const float *cos,
         const float *sin, float eps);

#endif
