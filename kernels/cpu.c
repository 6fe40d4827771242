/* kernels._cpu: a layer's ops for one token (see cpu.h): linear, SwiGLU MLPs summed (the picked
 * experts and the shared expert), RMSNorm, routing and attention over the KV cache; and the
 * bfloat16 -> float16 cast of moge convert. Decode reads every active weight once per token, so
 * its speed is memory bandwidth; work is split by output rows (attention: by head) over the pool
 * (pool.c), one contiguous stretch per thread, and every output is summed in one fixed order, so
 * results do not depend on the thread count. */
#include "cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PARALLEL_BYTES (64 * 1024)  /* parallel only when the weights are big enough to pay for waking the workers */

/* [lo, hi) of n items for this part, in multiples of `unit`. Each thread streams one contiguous
 * stretch of every weight: measured faster here than chunks taken in turn from a shared counter
 * (which balance the load but restart the hardware prefetcher at every chunk). */
static void split(long n, long unit, int part, int parts, long *lo, long *hi) {
    long blocks = (n + unit - 1) / unit;
    *lo = blocks * part / parts * unit;
    *hi = blocks * (part + 1) / parts * unit;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

/* ---- linear ------------------------------------------------------------------------------------ */
typedef struct {
    mat_t w;
    const float *b;
    vec_t x;
    float *y;
    long n;
} linear_job;

static void linear_part(void *ctx, int part, int parts) {
    linear_job *j = ctx;
    long lo, hi;
    split(j->n, 4, part, parts, &lo, &hi);
    rows_dot(j->w, j->x, lo, hi, j->y + lo);
    if (j->b)
        for (long r = lo; r < hi; r++) j->y[r] += j->b[r];
}

void linear(mat_t w, const float *bias, vec_t x, long n, float *y) {
    linear_job j = {w, bias, x, y, n};
    run_parallel(linear_part, &j, (size_t)n * row_bytes(w, x.k) >= PARALLEL_BYTES);
}

/* ---- SwiGLU MLPs summed: the picked experts of one token, and the shared expert -----------------
 * Pass 1 splits every MLP's I hidden units, in units of 256, over the threads: each computes its
 * units' gate and up rows, the activation silu(gate) * up (rounded to the model dtype, as torch's
 * path does) and that slice of the activation's prepared vector. Pass 2 splits the H output rows:
 * each thread sums every MLP's down rows times its coefficient, in MLP order. */
#define UNIT 256

typedef struct {
    const mlp_t *m;
    int count, dtype;
    long units;       /* sum over MLPs of ceil(I / UNIT) */
    vec_t x;
    float **h;        /* per MLP: [2I] gate x, up x, then the activation's vector storage */
    float *y;
} mlps_job;

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static void mlps_up_part(void *ctx, int part, int parts) {
    mlps_job *j = ctx;
    long lo, hi;
    split(j->units, 1, part, parts, &lo, &hi);
    for (long g = lo; g < hi; g++) {
        int i = 0;
        long n, u = g;
        while (u >= (n = (j->m[i].inter + UNIT - 1) / UNIT)) u -= n, i++;  /* MLP i, its unit u */
        long I = j->m[i].inter, r0 = u * UNIT, r1 = r0 + UNIT < I ? r0 + UNIT : I;
        float *h = j->h[i], *a = h + 2 * I;
        rows_dot(j->m[i].w13, j->x, r0, r1, h + r0);
        rows_dot(j->m[i].w13, j->x, I + r0, I + r1, h + I + r0);
        for (long c = r0; c < r1; c++) a[c] = silu(h[c]) * h[I + c];
        round_to(a + r0, r1 - r0, j->dtype);
        vec_prepare_range(a, I, r0, r1, vec_needs(j->m[i].w2));
    }
}

static void mlps_down_part(void *ctx, int part, int parts) {
    mlps_job *j = ctx;
    float d[UNIT];
    long lo, hi;
    split(j->x.k, 4, part, parts, &lo, &hi);
    for (long r0 = lo; r0 < hi; r0 += UNIT) {
        long r1 = r0 + UNIT < hi ? r0 + UNIT : hi;
        for (long r = r0; r < r1; r++) j->y[r] = 0.0f;
        for (int i = 0; i < j->count; i++) {
            rows_dot(j->m[i].w2, vec_view(j->h[i] + 2 * j->m[i].inter, j->m[i].inter, vec_needs(j->m[i].w2)), r0, r1, d);
            for (long r = r0; r < r1; r++) j->y[r] += j->m[i].coef * d[r - r0];
        }
    }
}

long mlps_scratch_floats(const mlp_t *m, int count) {
    long n = 0;
    for (int i = 0; i < count; i++) n += 2 * m[i].inter + vec_floats(m[i].inter);
    return n;
}

void mlps(const mlp_t *m, int count, vec_t x, int dtype, float *scratch, float *y) {
    float *h[MAX_PICKS + 1];
    mlps_job j = {m, count, dtype, 0, x, h, y};
    for (int i = 0; i < count; i++) {
        h[i] = scratch;
        scratch += 2 * m[i].inter + vec_floats(m[i].inter);
        j.units += (m[i].inter + UNIT - 1) / UNIT;
    }
    run_parallel(mlps_up_part, &j, 1);
    run_parallel(mlps_down_part, &j, 1);
}

/* ---- RMSNorm, routing, attention ------------------------------------------------------------------ */
AVX2 void rms_norm(const float *x, const float *w, long n, float eps, float *y) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    double sum = hsum(acc);
    for (; i < n; i++) sum += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(sum / n) + eps);
    __m256 iv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
    for (; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* Softmax over all experts in float32; in each contiguous group the `picks` most probable experts,
 * by descending probability, ties to the lowest index; weight = probability * scale[e]. */
int route(const float *l, long E, long G, long picks, const float *scale, int64_t *ids, float *weights) {
    if (E <= 0 || E > 4096 || G <= 0 || E % G || picks <= 0 || picks > E / G) return -1;
    float p[4096], m = l[0], sum = 0.0f;
    for (long e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
    for (long e = 0; e < E; e++) sum += p[e] = expf(l[e] - m);
    for (long e = 0; e < E; e++) p[e] /= sum;
    long per = E / G, out = 0;
    for (long g = 0; g < G; g++)
        for (long j = 0; j < picks; j++) {
            long best = -1;
            for (long e = g * per; e < (g + 1) * per; e++) {
                int used = 0;
                for (long t = out - j; t < out; t++) used |= ids[t] == e;  /* picked already */
                if (!used && (best < 0 || p[e] > p[best])) best = e;     /* strict >: ties to the lowest index */
            }
            ids[out] = best;
            weights[out++] = p[best] * scale[best];
        }
    return 0;
}

typedef struct {
    const float *q;     /* [nH, D] float32, RoPE applied */
    const void *k, *v;  /* cache [nKV, S_max, D] in dtype */
    float *o;           /* [nH, D] float32 */
    float *scores;      /* [nH, S] scratch */
    long n_heads, n_kv, dim, s_max, len;
    int dtype;
} attend_job;

/* 8 values of a float32 or bfloat16 row from index i, as float32. */
AVX2 static inline __m256 load8(const void *p, long i, int dtype) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static void attend_part(void *ctx, int part, int parts) {
    attend_job *j = ctx;
    long D = j->dim, D8 = D - D % 8, lo, hi;
    size_t es = esize(j->dtype);
    float scale = 1.0f / sqrtf((float)D);
    split(j->n_heads, 1, part, parts, &lo, &hi);
    for (long h = lo; h < hi; h++) {
        long g = h / (j->n_heads / j->n_kv);
        const char *kh = (const char *)j->k + g * j->s_max * D * es, *vh = (const char *)j->v + g * j->s_max * D * es;
        const float *q = j->q + h * D;
        float *sc = j->scores + h * j->len, m = -INFINITY, sum = 0.0f;
        for (long t = 0; t < j->len; t++) {
            const void *kt = kh + t * D * es;
            __m256 acc = _mm256_setzero_ps();
            for (long c = 0; c < D8; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(kt, c, j->dtype), acc);
            float d = hsum(acc);
            for (long c = D8; c < D; c++) d += q[c] * load1(kt, c, j->dtype);
            sc[t] = d * scale;
            m = sc[t] > m ? sc[t] : m;
        }
        for (long t = 0; t < j->len; t++) sum += sc[t] = expf(sc[t] - m);
        float *o = j->o + h * D;
        for (long c = 0; c < D; c++) o[c] = 0.0f;
        for (long t = 0; t < j->len; t++) {
            const void *vt = vh + t * D * es;
            float pt = sc[t] / sum;
            __m256 pv = _mm256_set1_ps(pt);
            for (long c = 0; c < D8; c += 8) _mm256_storeu_ps(o + c, _mm256_fmadd_ps(pv, load8(vt, c, j->dtype), _mm256_loadu_ps(o + c)));
            for (long c = D8; c < D; c++) o[c] += pt * load1(vt, c, j->dtype);
        }
    }
}

long attend_scratch_floats(long nH, long D, long pos) { return nH * D + nH * (pos + 1); }

/* Numbers as torch's path: rotation and softmax in float32, k rounded to the cache's dtype before it
 * is used. cos, sin [D]: the RoPE tables' row for pos, sin with its first half negated. */
void attend(const float *qkv, const float *cs, const float *sn, void *kc, void *vc, long pos, long nH, long nKV,
            long D, long s_max, int dtype, float *scratch, float *o) {
    size_t es = esize(dtype);
    float *q = scratch;
    for (long h = 0; h < nH + nKV; h++) {  /* q heads, then k heads: x*cos + roll(x, D/2)*sin */
        const float *x = qkv + h * D;
        float *dst = h < nH ? q + h * D : NULL;
        for (long c = 0; c < D; c++) {
            float r = x[c] * cs[c] + x[(c + D / 2) % D] * sn[c];
            if (dst) dst[c] = r;
            else if (dtype == F32) ((float *)kc)[((h - nH) * s_max + pos) * D + c] = r;
            else ((uint16_t *)kc)[((h - nH) * s_max + pos) * D + c] = to_bf16(r);
        }
    }
    for (long g = 0; g < nKV; g++) from_float(qkv + (nH + nKV + g) * D, D, dtype, (char *)vc + (g * s_max + pos) * D * es);
    attend_job j = {q, kc, vc, o, scratch + nH * D, nH, nKV, D, s_max, pos + 1, dtype};
    run_parallel(attend_part, &j, (size_t)(pos + 1) * nKV * D * es * 2 >= PARALLEL_BYTES);
}

/* ---- conversion: bfloat16 -> float16 with overflow counting (moge convert --dtype float16) ------- */
/* cast_bf16_f16(dst, src, n) -> the number of finite values beyond +-65504 (they become +-inf).
 * One pass: bfloat16 -> float32 is exact (a shift), float32 -> float16 rounds to nearest even
 * (F16C), as torch's .to(float16) does. */
__attribute__((target("avx2,f16c"))) long cast_bf16_f16(uint16_t *dst, const uint16_t *src, long n) {
    const __m256 fp16_max = _mm256_set1_ps(65504.0f), inf = _mm256_set1_ps(INFINITY);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    long over = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i))), 16));
        __m256 a = _mm256_and_ps(v, abs_mask);
        over += __builtin_popcount(_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(a, fp16_max, _CMP_GT_OQ), _mm256_cmp_ps(a, inf, _CMP_LT_OQ))));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) {
        float f = load1(src, i, BF16), a = fabsf(f);
        over += a > 65504.0f && a < INFINITY;
        dst[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    }
    return over;
}
