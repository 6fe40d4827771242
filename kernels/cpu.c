/* kernels._cpu: single-token (decode) kernels for x86-64 CPUs with AVX2, FMA and F16C.
 *
 * Decode reads every active weight once per token, so its speed is memory bandwidth. torch's
 * float32 matrix-vector product reaches about half of this machine's read bandwidth, and one
 * token costs ~100 small torch ops per layer. Here:
 *   linear(y, x, w, b)        y[N] = w[N, K] x[K] + b
 *   moe(y, x, ids, coefs)     y[H] = sum_j coef_j * down_j(silu(gate_j x) * up_j x) over the
 *                             picked experts (or a shared expert), two passes over the threads
 *   rms_norm, route, attend   the rest of a layer: RMSNorm; softmax and grouped top-K'; RoPE,
 *                             the KV-cache write and GQA attention over the cache
 *   cast_bf16_f16             bfloat16 -> float16 in one pass, counting overflows (moge convert)
 * Activations are float32 or bfloat16; weights the same, or int8 with a scale per row; products
 * accumulate in float32. Work is split by output rows (attention: by head) over a small persistent
 * thread pool whose workers spin briefly between calls (a decode step issues one every few
 * microseconds), then sleep. Sums run in a fixed order per output, so results do not depend on
 * the thread count.
 *
 * Pointers come from torch (tensor.data_ptr()); kernels/native.py checks shapes, dtypes and
 * contiguity before calling. The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define MAX_THREADS 64
#define MAX_PICKS 256
#define SPIN_ROUNDS 20000  /* ~0.5 ms of pause instructions before a worker sleeps */

enum { F32 = 0, BF16 = 1, I8 = 2 };  /* activations are F32 or BF16; weights also I8 (a float scale per row) */

static size_t esize(int t) { return t == F32 ? 4 : t == BF16 ? 2 : 1; }

/* ---- thread pool ------------------------------------------------------------------------------ */
typedef void (*task_fn)(void *ctx, int part, int parts);

static int n_threads = 1;  /* including the caller */
static int n_started = 0;  /* workers running */
static task_fn job_fn;
static void *job_ctx;
static atomic_uint job_gen;
static atomic_int job_pending;
static pthread_mutex_t job_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cv = PTHREAD_COND_INITIALIZER;

static unsigned start_gen[MAX_THREADS];  /* job_gen when each worker was created: it waits for the next one */

static void *worker(void *arg) {
    int part = (int)(intptr_t)arg;
    unsigned seen = start_gen[part];
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&job_gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&job_mu);
            while (atomic_load_explicit(&job_gen, memory_order_acquire) == seen)
                pthread_cond_wait(&job_cv, &job_mu);
            pthread_mutex_unlock(&job_mu);
            spins = 0;
        }
        seen = g;
        if (part < n_threads) job_fn(job_ctx, part, n_threads);
        atomic_fetch_sub_explicit(&job_pending, 1, memory_order_release);
    }
    return NULL;
}

static void after_fork_in_child(void) { n_started = 0; }  /* the workers do not exist in a forked child */
static void run_on_pool(task_fn fn, void *ctx);

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */

/* Run fn(ctx, part, parts) for part = 0..parts-1, part 0 on the calling thread. A call made while
 * another thread's job holds the pool runs alone on its own thread. */
static void run_parallel(task_fn fn, void *ctx, int parallel) {
    if (parallel && n_threads > 1 && pthread_mutex_trylock(&pool_mu) == 0) {
        run_on_pool(fn, ctx);
        pthread_mutex_unlock(&pool_mu);
    } else
        fn(ctx, 0, 1);
}

static void run_on_pool(task_fn fn, void *ctx) {
    int parts = n_threads;
    if (parts > 1 && n_started < parts - 1) {
        static int atfork = 0;
        if (!atfork) atfork = !pthread_atfork(NULL, NULL, after_fork_in_child);
        while (n_started < parts - 1) {
            pthread_t t;
            start_gen[n_started + 1] = atomic_load_explicit(&job_gen, memory_order_relaxed);
            if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(n_started + 1))) break;
            pthread_detach(t);
            n_started++;
        }
        if (n_started < parts - 1) parts = 1;
    }
    if (parts == 1) {
        fn(ctx, 0, 1);
        return;
    }
    job_fn = fn;
    job_ctx = ctx;
    atomic_store_explicit(&job_pending, n_started, memory_order_relaxed);
    pthread_mutex_lock(&job_mu);
    atomic_fetch_add_explicit(&job_gen, 1, memory_order_release);
    pthread_cond_broadcast(&job_cv);
    pthread_mutex_unlock(&job_mu);
    fn(ctx, 0, parts);
    while (atomic_load_explicit(&job_pending, memory_order_acquire)) _mm_pause();
}

/* ---- dot products ------------------------------------------------------------------------------ */
AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float load1(const void *w, long i, int dtype) {
    if (dtype == F32) return ((const float *)w)[i];
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float round_bf16(float f) {
    uint16_t h = to_bf16(f);
    return load1(&h, 0, BF16);
}

/* Every vector x[k] handed to the dot products below is stored twice, back to back: as is, then
 * "split" (x + k): in each block of 16, the 8 even-indexed values, then the 8 odd ones. A 256-bit
 * load of 16 bfloat16 weights holds the even ones in the high halves of its 32-bit lanes after a
 * shift and the odd ones after a mask: two float32 vectors that pair with the split x, with no
 * shuffle. Float32 weights use x as is. */
static void split16(const float *x, long k, float *xs) {
    long c = 0;
    for (; c + 16 <= k; c += 16)
        for (int i = 0; i < 8; i++) xs[c + i] = x[c + 2 * i], xs[c + 8 + i] = x[c + 2 * i + 1];
    for (; c < k; c++) xs[c] = x[c];
}

/* out[i] = w[i * ld : i * ld + k] . x for i < 4. */
AVX2 static void dot4_f32(const float *w, long ld, const float *x, long k, float out[4]) {
    const float *w0 = w, *w1 = w0 + ld, *w2 = w1 + ld, *w3 = w2 + ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + c), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + c), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + c), xv, a3);
    }
    out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
    for (; c < k; c++) out[0] += w0[c] * x[c], out[1] += w1[c] * x[c], out[2] += w2[c] * x[c], out[3] += w3[c] * x[c];
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
AVX2 static float dot_bf16(const uint16_t *w, const float *x, long k) {
    const float *xs = x + k;
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
    for (; c < k; c++) s += load1(w, c, BF16) * x[c];
    return s;
}

#define I8_8(a)                                                                                          \
    {                                                                                                    \
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + c)));                     \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(x + c), a);                            \
        c += 8;                                                                                          \
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

static float dot1(const void *w, const float *x, long k, int wtype) {  /* the last n % 4 rows */
    float s = 0.0f;
    for (long c = 0; c < k; c++) s += (wtype == I8 ? ((const int8_t *)w)[c] : load1(w, c, wtype)) * x[c];
    return s;
}

static void dot4(const void *w, long ld, const float *x, long k, int wtype, float out[4]) {
    if (wtype == F32) dot4_f32(w, ld, x, k, out);
    else if (wtype == BF16)
        for (int i = 0; i < 4; i++) out[i] = dot_bf16((const uint16_t *)w + i * ld, x, k);
    else
        for (int i = 0; i < 4; i++) out[i] = dot_i8((const int8_t *)w + i * ld, x, k);
}

/* A weight matrix [n, k]: float32 / bfloat16, or int8 with one scale per row (in sdtype). */
typedef struct {
    const char *w;
    const void *scale;
    int wtype, sdtype;
} mat_t;

/* y[r] = w[r, :] . x (times the row's scale) for r in [lo, hi). */
static void rows_dot(mat_t m, long k, const float *x, long lo, long hi, float *y) {
    size_t es = esize(m.wtype);
    long r = lo;
    for (; r + 4 <= hi; r += 4) dot4(m.w + r * k * es, k, x, k, m.wtype, y + r);
    for (; r < hi; r++) y[r] = dot1(m.w + r * k * es, x, k, m.wtype);
    if (m.scale)
        for (r = lo; r < hi; r++) y[r] *= load1(m.scale, r, m.sdtype);
}

/* [lo, hi) of n rows for this part, in multiples of 4 so that dot4 stays in step. */
static void split(long n, int part, int parts, long *lo, long *hi) {
    long blocks = (n + 3) / 4;
    *lo = blocks * part / parts * 4;
    *hi = blocks * (part + 1) / parts * 4;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

/* dst[0:n] = src as float32, and dst[n:2n] its split copy (see split16). */
static void to_f32(const void *src, long n, int dtype, float *dst) {
    if (dtype == F32) memcpy(dst, src, n * 4);
    else
        for (long i = 0; i < n; i++) dst[i] = load1(src, i, BF16);
    split16(dst, n, dst + n);
}

/* Parallel only when the weights are big enough (bytes) to pay for waking the workers. */
#define PARALLEL_BYTES (64 * 1024)

/* ---- linear ------------------------------------------------------------------------------------ */
typedef struct {
    mat_t w;
    const void *b;
    const float *x;
    float *y;
    long n, k;
    int dtype;
} linear_job;

static void linear_part(void *ctx, int part, int parts) {
    linear_job *j = ctx;
    long lo, hi;
    split(j->n, part, parts, &lo, &hi);
    rows_dot(j->w, j->k, j->x, lo, hi, j->y);
    if (j->b)
        for (long r = lo; r < hi; r++) j->y[r] += load1(j->b, r, j->dtype);
}

/* linear(y, x, w, b, n, k, dtype, wtype, scale, sdtype): y[n] = w[n, k] x[k] (+ b[n]); x, b, y in
 * dtype; w in wtype (int8: times scale[n] in sdtype). */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long y, x, w, b, scale;
    long n, k;
    int dtype, wtype, sdtype;
    if (!PyArg_ParseTuple(args, "KKKKlliiKi", &y, &x, &w, &b, &n, &k, &dtype, &wtype, &scale, &sdtype)) return NULL;
    float *buf = malloc((size_t)(2 * k + n) * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    linear_job j = {{(const char *)w, (const void *)scale, wtype, sdtype}, (const void *)b, buf, buf + 2 * k, n, k, dtype};
    Py_BEGIN_ALLOW_THREADS
    to_f32((const void *)x, k, dtype, buf);
    run_parallel(linear_part, &j, (size_t)n * k * esize(wtype) >= PARALLEL_BYTES);
    if (dtype == F32) memcpy((void *)y, j.y, n * 4);
    else for (long r = 0; r < n; r++) ((uint16_t *)y)[r] = to_bf16(j.y[r]);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

/* ---- SwiGLU MLPs summed: the routed experts of one token ------------------------------------- */
typedef struct {
    mat_t w13, w2;         /* [2I, H] (gate rows, then up), [H, I] */
    long inter;            /* I */
    float coef;
    float *h;              /* [2I] scratch: gate x, up x; then silu(gate) * up and its split copy */
} mlp_t;

typedef struct {
    mlp_t m[MAX_PICKS];
    int count;
    long hidden, total_rows;  /* total_rows = sum of 2I */
    const float *x;
    float *y;
    int dtype;
} moe_job;

static void moe_up_part(void *ctx, int part, int parts) {  /* every mlp's gate and up rows */
    moe_job *j = ctx;
    long lo, hi, base = 0;
    split(j->total_rows, part, parts, &lo, &hi);
    for (int i = 0; i < j->count && base < hi; base += 2 * j->m[i].inter, i++) {
        long rows = 2 * j->m[i].inter, a = lo > base ? lo - base : 0, b = hi - base < rows ? hi - base : rows;
        if (a < b) rows_dot(j->m[i].w13, j->hidden, j->x, a, b, j->m[i].h);
    }
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static void moe_down_part(void *ctx, int part, int parts) {  /* y rows: sum over mlps in order */
    moe_job *j = ctx;
    long lo, hi;
    split(j->hidden, part, parts, &lo, &hi);
    for (long r = lo; r < hi; r++) j->y[r] = 0.0f;
    float acc[4];
    for (int i = 0; i < j->count; i++) {
        mlp_t *m = &j->m[i];
        size_t es = esize(m->w2.wtype);
        long r = lo;
        for (; r + 4 <= hi; r += 4) {
            dot4(m->w2.w + r * m->inter * es, m->inter, m->h, m->inter, m->w2.wtype, acc);
            for (int t = 0; t < 4; t++) j->y[r + t] += m->coef * (m->w2.scale ? acc[t] * load1(m->w2.scale, r + t, m->w2.sdtype) : acc[t]);
        }
        for (; r < hi; r++) {
            float d = dot1(m->w2.w + r * m->inter * es, m->h, m->inter, m->w2.wtype);
            j->y[r] += m->coef * (m->w2.scale ? d * load1(m->w2.scale, r, m->w2.sdtype) : d);
        }
    }
}

/* moe(y, x, hidden, dtype, ids, coefs, k, gate_up, down, inter, experts, wtype, gate_up_scale, down_scale, sdtype)
 *   y [H] float32 out; x [H] in dtype; ids [k] int64 and coefs [k] float32: the picked experts
 *   and their routing weights; gate_up [E, 2I, H], down [E, H, I] in wtype; for int8 weights,
 *   scales [E, 2I] and [E, H] in sdtype (else 0). */
static PyObject *py_moe(PyObject *self, PyObject *args) {
    unsigned long long y, x, ids, coefs, gate_up, down, gu_scale, dn_scale;
    long hidden, k, inter, experts;
    int dtype, wtype, sdtype;
    if (!PyArg_ParseTuple(args, "KKliKKlKKlliKKi", &y, &x, &hidden, &dtype, &ids, &coefs, &k, &gate_up, &down, &inter, &experts, &wtype,
                          &gu_scale, &dn_scale, &sdtype))
        return NULL;
    if (k < 1 || k > MAX_PICKS) {
        PyErr_SetString(PyExc_ValueError, "moe: k must be 1..256");
        return NULL;
    }
    for (long i = 0; i < k; i++)
        if (((const int64_t *)ids)[i] < 0 || ((const int64_t *)ids)[i] >= experts) {
            PyErr_Format(PyExc_ValueError, "moe: expert_ids has values outside 0..%ld", experts - 1);
            return NULL;
        }
    size_t es = esize(wtype), ss = esize(sdtype);
    float *buf = malloc((size_t)(2 * hidden + 2 * inter * k) * sizeof(float));
    moe_job *j = malloc(sizeof(moe_job));
    if (!buf || !j) {
        free(buf), free(j);
        return PyErr_NoMemory();
    }
    *j = (moe_job){.count = (int)k, .hidden = hidden, .total_rows = 2 * inter * k, .x = buf, .y = (float *)y, .dtype = dtype};
    for (long i = 0; i < k; i++) {
        int64_t e = ((const int64_t *)ids)[i];
        mat_t w13 = {(const char *)gate_up + e * 2 * inter * hidden * es, gu_scale ? (const char *)gu_scale + e * 2 * inter * ss : NULL, wtype, sdtype};
        mat_t w2 = {(const char *)down + e * hidden * inter * es, dn_scale ? (const char *)dn_scale + e * hidden * ss : NULL, wtype, sdtype};
        j->m[i] = (mlp_t){w13, w2, inter, ((const float *)coefs)[i], buf + 2 * hidden + 2 * inter * i};
    }
    Py_BEGIN_ALLOW_THREADS
    to_f32((const void *)x, hidden, dtype, buf);
    run_parallel(moe_up_part, j, 1);
    for (int i = 0; i < j->count; i++) {
        mlp_t *m = &j->m[i];
        for (long c = 0; c < m->inter; c++) m->h[c] = silu(m->h[c]) * m->h[m->inter + c];
        if (dtype == BF16)  /* the activation is rounded to the model's dtype, as torch's path does */
            for (long c = 0; c < m->inter; c++) m->h[c] = round_bf16(m->h[c]);
        split16(m->h, m->inter, m->h + m->inter);  /* over the up values, no longer needed */
    }
    run_parallel(moe_down_part, j, 1);
    Py_END_ALLOW_THREADS
    free(buf);
    free(j);
    Py_RETURN_NONE;
}

/* ---- the rest of a decode step: RMSNorm, routing, attention over the cache --------------------- */
static void store(void *y, long i, float v, int dtype) {
    if (dtype == F32) ((float *)y)[i] = v;
    else ((uint16_t *)y)[i] = to_bf16(v);
}

/* rms_norm(y, x, w, n, eps, dtype): y = x * (1 / sqrt(mean(x^2) + eps)) * w; x, y in dtype, w float32. */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long y, x, w;
    long n;
    double eps;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKldi", &y, &x, &w, &n, &eps, &dtype)) return NULL;
    double sum = 0.0;
    for (long i = 0; i < n; i++) {
        float v = load1((const void *)x, i, dtype);
        sum += (double)v * v;
    }
    float inv = 1.0f / sqrtf((float)(sum / n) + (float)eps);
    for (long i = 0; i < n; i++) store((void *)y, i, load1((const void *)x, i, dtype) * inv * ((const float *)w)[i], dtype);
    Py_RETURN_NONE;
}

/* route(ids, weights, logits, experts, groups, picks, scale): kernels.route for one token.
 * Softmax over all experts in float32; in each contiguous group the `picks` most probable experts,
 * by descending probability, ties to the lowest index; weight = probability * scale[e]. */
static PyObject *py_route(PyObject *self, PyObject *args) {
    unsigned long long ids, weights, logits, scale;
    long E, G, picks;
    if (!PyArg_ParseTuple(args, "KKKlllK", &ids, &weights, &logits, &E, &G, &picks, &scale)) return NULL;
    if (E <= 0 || E > 4096 || G <= 0 || E % G || picks <= 0 || picks > E / G) {
        PyErr_SetString(PyExc_ValueError, "route: bad expert / group / pick counts");
        return NULL;
    }
    const float *l = (const float *)logits;
    float p[4096], m = l[0], sum = 0.0f;
    for (long e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
    for (long e = 0; e < E; e++) sum += p[e] = expf(l[e] - m);
    for (long e = 0; e < E; e++) p[e] /= sum;
    long per = E / G, out = 0;
    for (long g = 0; g < G; g++) {
        for (long j = 0; j < picks; j++) {
            long best = -1;
            for (long e = g * per; e < (g + 1) * per; e++) {
                int used = 0;
                for (long t = out - j; t < out; t++) used |= ((int64_t *)ids)[t] == e;  /* picked already */
                if (!used && (best < 0 || p[e] > p[best])) best = e;  /* strict >: ties to the lowest index */
            }
            ((int64_t *)ids)[out] = best;
            ((float *)weights)[out++] = p[best] * ((const float *)scale)[best];
        }
    }
    Py_RETURN_NONE;
}

/* Attention of one query token (batch 1) over a KV cache, heads split over the pool. */
typedef struct {
    const float *q;        /* [nH, D] float32, RoPE applied */
    const void *k, *v;     /* cache [nKV, S_max, D] in dtype */
    float *o;              /* [nH, D] float32 */
    float *scores;         /* [nH, S] scratch */
    long n_heads, n_kv, dim, s_max, len;
    int dtype;
} attend_job;

static void attend_part(void *ctx, int part, int parts) {
    attend_job *j = ctx;
    long lo = j->n_heads * part / parts, hi = j->n_heads * (part + 1) / parts;
    size_t es = j->dtype == F32 ? 4 : 2;
    float scale = 1.0f / sqrtf((float)j->dim);
    for (long h = lo; h < hi; h++) {
        long g = h / (j->n_heads / j->n_kv);
        const char *kh = (const char *)j->k + g * j->s_max * j->dim * es, *vh = (const char *)j->v + g * j->s_max * j->dim * es;
        const float *q = j->q + h * j->dim;
        float *sc = j->scores + h * j->len, m = -INFINITY, sum = 0.0f;
        for (long t = 0; t < j->len; t++) {
            float d = 0.0f;
            for (long c = 0; c < j->dim; c++) d += q[c] * load1(kh + t * j->dim * es, c, j->dtype);
            sc[t] = d * scale;
            m = sc[t] > m ? sc[t] : m;
        }
        for (long t = 0; t < j->len; t++) sum += sc[t] = expf(sc[t] - m);
        float *o = j->o + h * j->dim;
        for (long c = 0; c < j->dim; c++) o[c] = 0.0f;
        for (long t = 0; t < j->len; t++) {
            float pt = sc[t] / sum;
            for (long c = 0; c < j->dim; c++) o[c] += pt * load1(vh + t * j->dim * es, c, j->dtype);
        }
    }
}

/* attend(o, qkv, cos, sin, k_cache, v_cache, pos, n_heads, n_kv, dim, s_max, dtype)
 *   qkv [(nH + 2 nKV) D] in dtype: this token's q, k, v heads; cos, sin [D] float32: the RoPE
 *   tables' row for position pos (sin with its first half negated); caches [nKV, s_max, D] in
 *   dtype. Rotates q and k (neox halves), writes k and v at pos, attends over 0..pos, writes o
 *   [nH D] in dtype. Numbers as the torch path: rotation and softmax in float32, k rounded to
 *   the cache's dtype before it is used. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long o, qkv, cosp, sinp, kc, vc;
    long pos, nH, nKV, D, s_max;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKKKKllllli", &o, &qkv, &cosp, &sinp, &kc, &vc, &pos, &nH, &nKV, &D, &s_max, &dtype)) return NULL;
    if (pos < 0 || pos >= s_max || nKV <= 0 || nH % nKV || D % 2) {
        PyErr_SetString(PyExc_ValueError, "attend: bad position or head counts");
        return NULL;
    }
    size_t es = dtype == F32 ? 4 : 2;
    float *buf = malloc((size_t)(2 * nH * D + nH * (pos + 1)) * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    const float *cs = (const float *)cosp, *sn = (const float *)sinp;
    float *q = buf, *out = buf + nH * D, rot[4096];
    if (D > 4096) {
        free(buf);
        PyErr_SetString(PyExc_ValueError, "attend: head_dim over 4096");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (long h = 0; h < nH + nKV; h++) {  /* q heads, then k heads: x*cos + roll(x, D/2)*sin */
        for (long c = 0; c < D; c++) {
            float x = load1((const void *)qkv, h * D + c, dtype), r = load1((const void *)qkv, h * D + (c + D / 2) % D, dtype);
            rot[c] = x * cs[c] + r * sn[c];
        }
        if (h < nH) memcpy(q + h * D, rot, D * sizeof(float));
        else
            for (long c = 0; c < D; c++) store((char *)kc + ((h - nH) * s_max + pos) * D * es, c, rot[c], dtype);
    }
    for (long g = 0; g < nKV; g++)
        memcpy((char *)vc + (g * s_max + pos) * D * es, (const char *)qkv + ((nH + nKV + g) * D) * es, D * es);
    attend_job j = {q, (const void *)kc, (const void *)vc, out, buf + 2 * nH * D, nH, nKV, D, s_max, pos + 1, dtype};
    run_parallel(attend_part, &j, (size_t)(pos + 1) * nKV * D * es * 2 >= PARALLEL_BYTES);
    for (long i = 0; i < nH * D; i++) store((void *)o, i, out[i], dtype);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

/* ---- conversion: bfloat16 -> float16 with overflow counting (moge convert --dtype float16) ------- */
/* cast_bf16_f16(dst, src, n) -> the number of finite values beyond +-65504 (they become +-inf).
 * One pass: bfloat16 -> float32 is exact (a shift), float32 -> float16 rounds to nearest even
 * (F16C), as torch's .to(float16) does. */
__attribute__((target("avx2,f16c"))) static long cast_bf16_f16(uint16_t *dst, const uint16_t *src, long n) {
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

static PyObject *py_cast_bf16_f16(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    long n, over;
    if (!PyArg_ParseTuple(args, "KKl", &dst, &src, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    over = cast_bf16_f16((uint16_t *)dst, (const uint16_t *)src, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(over);
}

/* ---- module ------------------------------------------------------------------------------------ */
static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&pool_mu);  /* not while another thread's job runs */
    n_threads = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
    pthread_mutex_unlock(&pool_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_supported(PyObject *self, PyObject *noargs) {
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"));
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "linear(y, x, w, b, n, k, dtype): y = w x + b for one token (pointers)."},
    {"moe", py_moe, METH_VARARGS, "moe(y, x, hidden, dtype, ids, coefs, k, gate_up, down, inter, experts): routed experts of one token."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(y, x, w, n, eps, dtype): RMSNorm of one token."},
    {"route", py_route, METH_VARARGS, "route(ids, weights, logits, experts, groups, picks, scale): kernels.route for one token."},
    {"attend", py_attend, METH_VARARGS, "attend(o, qkv, cos, sin, k_cache, v_cache, pos, n_heads, n_kv, dim, s_max, dtype): one token's attention."},
    {"cast_bf16_f16", py_cast_bf16_f16, METH_VARARGS, "cast_bf16_f16(dst, src, n) -> values beyond +-65504 (made +-inf)."},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): threads per kernel call, the caller's included."},
    {"supported", py_supported, METH_NOARGS, "True when this CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "Decode kernels for AVX2 CPUs (see kernels/cpu.c).", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
