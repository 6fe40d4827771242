/* kernels._cpu: the Python entry points. Arguments are pointers (torch's data_ptr()) and sizes;
 * kernels/native.py checks shapes, dtypes and contiguity before calling. The GIL is released while
 * a kernel runs. Activations arrive in the model dtype and are converted to float32 here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "cpu.h"

#define PTR(v) ((void *)(uintptr_t)(v))

/* linear(y, x, w, b, n, k, dtype, wtype, scale, sdtype, zero, group): y[n] = w[n, k] x[k] (+ b[n]);
 * x, b, y in dtype; w in wtype (see mat_t). */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long y, x, w, b, scale, zero;
    long n, k, group;
    int dtype, wtype, sdtype;
    if (!PyArg_ParseTuple(args, "KKKKlliiKiKl", &y, &x, &w, &b, &n, &k, &dtype, &wtype, &scale, &sdtype, &zero, &group)) return NULL;
    mat_t m = {PTR(w), PTR(scale), PTR(zero), wtype, sdtype, group};
    if (!mat_supported(m, k)) {
        PyErr_SetString(PyExc_ValueError, "linear: weight type not supported");
        return NULL;
    }
    float *buf = malloc((size_t)(vec_floats(k) + 2 * n) * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    float *out = buf + vec_floats(k), *bias = b ? out + n : NULL;
    Py_BEGIN_ALLOW_THREADS
    to_float(PTR(x), k, dtype, buf);
    if (bias) to_float(PTR(b), n, dtype, bias);
    linear(m, bias, vec_prepare(buf, k, buf, vec_needs(m)), n, out);
    from_float(out, n, dtype, PTR(y));
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

/* moe(y, x, hidden, dtype, ids, coefs, k, gate_up, down, inter, experts, wtype, gu_scale, dn_scale, sdtype,
 *     gu_zero, dn_zero, gu_group, dn_group)
 *   y [H] float32 out; x [H] in dtype; ids [k] int64 and coefs [k] float32: the picked experts and
 *   their routing weights; gate_up [E, 2I, H], down [E, H, I] in wtype, with their scales and zero
 *   points stacked the same way (see mat_t; 0 where the type has none). */
static PyObject *py_moe(PyObject *self, PyObject *args) {
    unsigned long long y, x, ids, coefs, gate_up, down, gu_scale, dn_scale, gu_zero, dn_zero;
    long hidden, k, inter, experts, gu_group, dn_group;
    int dtype, wtype, sdtype;
    if (!PyArg_ParseTuple(args, "KKliKKlKKlliKKiKKll", &y, &x, &hidden, &dtype, &ids, &coefs, &k, &gate_up, &down, &inter, &experts,
                          &wtype, &gu_scale, &dn_scale, &sdtype, &gu_zero, &dn_zero, &gu_group, &dn_group))
        return NULL;
    if (k < 1 || k > MAX_PICKS) {
        PyErr_SetString(PyExc_ValueError, "moe: k must be 1..256");
        return NULL;
    }
    const int64_t *id = PTR(ids);
    for (long i = 0; i < k; i++)
        if (id[i] < 0 || id[i] >= experts) {
            PyErr_Format(PyExc_ValueError, "moe: expert_ids has values outside 0..%ld", experts - 1);
            return NULL;
        }
    mat_t w13 = {PTR(gate_up), PTR(gu_scale), PTR(gu_zero), wtype, sdtype, gu_group}, w2 = {PTR(down), PTR(dn_scale), PTR(dn_zero), wtype, sdtype, dn_group};
    if (!mat_supported(w13, hidden) || !mat_supported(w2, inter)) {
        PyErr_SetString(PyExc_ValueError, "moe: weight type not supported");
        return NULL;
    }
    mlp_t *m = malloc(k * sizeof(mlp_t));
    if (!m) return PyErr_NoMemory();
    for (long i = 0; i < k; i++)
        m[i] = (mlp_t){mat_row_block(w13, 2 * inter, hidden, id[i]), mat_row_block(w2, hidden, inter, id[i]), inter, ((const float *)PTR(coefs))[i]};
    float *buf = malloc((size_t)(vec_floats(hidden) + mlps_scratch_floats(m, (int)k)) * sizeof(float));
    if (!buf) {
        free(m);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    to_float(PTR(x), hidden, dtype, buf);
    mlps(m, (int)k, vec_prepare(buf, hidden, buf, vec_needs(w13)), dtype, buf + vec_floats(hidden), PTR(y));
    Py_END_ALLOW_THREADS
    free(buf);
    free(m);
    Py_RETURN_NONE;
}

/* rms_norm(y, x, w, n, eps, dtype): y = x * (1 / sqrt(mean(x^2) + eps)) * w; x, y in dtype, w float32. */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long y, x, w;
    long n;
    double eps;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKldi", &y, &x, &w, &n, &eps, &dtype)) return NULL;
    float *buf = malloc(2 * n * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    to_float(PTR(x), n, dtype, buf);
    rms_norm(buf, PTR(w), n, (float)eps, buf + n);
    from_float(buf + n, n, dtype, PTR(y));
    free(buf);
    Py_RETURN_NONE;
}

/* route(ids, weights, logits, experts, groups, picks, scale): kernels.route for one token. */
static PyObject *py_route(PyObject *self, PyObject *args) {
    unsigned long long ids, weights, logits, scale;
    long E, G, picks;
    if (!PyArg_ParseTuple(args, "KKKlllK", &ids, &weights, &logits, &E, &G, &picks, &scale)) return NULL;
    if (route(PTR(logits), E, G, picks, PTR(scale), PTR(ids), PTR(weights))) {
        PyErr_SetString(PyExc_ValueError, "route: bad expert / group / pick counts");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* attend(o, qkv, cos, sin, k_cache, v_cache, pos, n_heads, n_kv, dim, s_max, dtype)
 *   qkv [(nH + 2 nKV) D] in dtype: this token's q, k, v heads; cos, sin [D] float32; caches
 *   [nKV, s_max, D] in dtype. Rotates q and k (neox halves), writes k and v at pos, attends over
 *   0..pos, writes o [nH D] in dtype. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long o, qkv, cosp, sinp, kc, vc;
    long pos, nH, nKV, D, s_max;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKKKKllllli", &o, &qkv, &cosp, &sinp, &kc, &vc, &pos, &nH, &nKV, &D, &s_max, &dtype)) return NULL;
    if (pos < 0 || pos >= s_max || nKV <= 0 || nH % nKV || D % 2) {
        PyErr_SetString(PyExc_ValueError, "attend: bad position or head counts");
        return NULL;
    }
    long n = (nH + 2 * nKV) * D;
    float *buf = malloc((size_t)(n + nH * D + attend_scratch_floats(nH, D, pos)) * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    to_float(PTR(qkv), n, dtype, buf);
    attend(buf, PTR(cosp), PTR(sinp), PTR(kc), PTR(vc), pos, nH, nKV, D, s_max, dtype, buf + n + nH * D, buf + n);
    from_float(buf + n, nH * D, dtype, PTR(o));
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

/* check_plan(plan): ValueError if the kernels cannot run this plan (once, when it is built). */
static PyObject *py_check_plan(PyObject *self, PyObject *args) {
    unsigned long long plan;
    if (!PyArg_ParseTuple(args, "K", &plan)) return NULL;
    const char *problem = decode_step_check(PTR(plan));
    if (problem) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* step(plan, logits, token, pos, k_cache, v_cache, s_max, cos, sin, eps, threads): a whole decode step (step.c)
 * of a plan check_plan accepted, on `threads` threads of the pool (then 1 again). */
static PyObject *py_step(PyObject *self, PyObject *args) {
    unsigned long long plan, logits, kc, vc, cosp, sinp;
    long token, pos, s_max;
    double eps;
    int threads;
    if (!PyArg_ParseTuple(args, "KKllKKlKKdi", &plan, &logits, &token, &pos, &kc, &vc, &s_max, &cosp, &sinp, &eps, &threads)) return NULL;
    if (pos < 0 || pos >= s_max) {
        PyErr_SetString(PyExc_ValueError, "step: position outside the cache");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pool_set_threads(threads);
    rc = decode_step(PTR(plan), PTR(logits), token, pos, PTR(kc), PTR(vc), s_max, PTR(cosp), PTR(sinp), (float)eps);
    pool_set_threads(1);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequant(dst, dtype, w, wtype, scale, sdtype, zero, n, k, group): int8 / int4 weights to float32 / bfloat16 values (dot.c). */
static PyObject *py_dequant(PyObject *self, PyObject *args) {
    unsigned long long dst, w, scale, zero;
    int dtype, wtype, sdtype;
    long n, k, group;
    if (!PyArg_ParseTuple(args, "KiKiKiKlll", &dst, &dtype, &w, &wtype, &scale, &sdtype, &zero, &n, &k, &group)) return NULL;
    mat_t m = {PTR(w), PTR(scale), PTR(zero), wtype, sdtype, group};
    if ((wtype != I8 && wtype != I4) || !mat_supported(m, k) || (dtype != F32 && dtype != BF16)) {
        PyErr_SetString(PyExc_ValueError, "dequant: weight type not supported");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    dequant(PTR(dst), dtype, m, n, k);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_cast_bf16_f16(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    long n, over;
    if (!PyArg_ParseTuple(args, "KKl", &dst, &src, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    over = cast_bf16_f16(PTR(dst), PTR(src), n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(over);
}

/* cast_file_bf16_f16(dst, fd, offset, n) -> overflows: n bfloat16 values read from an open file at
 * `offset` (pread, 512 KB at a time, into a buffer that stays in cache) cast into dst as float16; one
 * call per block so the GIL is released once, not per chunk. OSError on a read error or end of file. */
static PyObject *py_cast_file_bf16_f16(PyObject *self, PyObject *args) {
    unsigned long long dst;
    int fd;
    long long offset;
    long n;
    if (!PyArg_ParseTuple(args, "KiLl", &dst, &fd, &offset, &n)) return NULL;
    enum { CHUNK = 1 << 18 };
    uint16_t *buf = malloc(CHUNK * sizeof(uint16_t));
    if (!buf) return PyErr_NoMemory();
    long over = 0, done = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (done < n) {
        long k = n - done < CHUNK ? n - done : CHUNK;
        size_t want = (size_t)k * 2, got = 0;
        while (got < want) {
            ssize_t r = pread(fd, (char *)buf + got, want - got, (off_t)(offset + (long long)done * 2 + (long long)got));
            if (r <= 0) {
                err = r < 0 ? errno : EIO;
                break;
            }
            got += (size_t)r;
        }
        if (err) break;
        over += cast_bf16_f16((uint16_t *)PTR(dst) + done, buf, k);
        done += k;
    }
    Py_END_ALLOW_THREADS
    free(buf);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(over);
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_set_threads(n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_supported(PyObject *self, PyObject *noargs) {
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"));
}

static PyObject *py_set_avx512(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    return PyBool_FromLong(set_avx512(on));
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "linear(y, x, w, b, n, k, dtype, wtype, scale, sdtype, zero, group): y = w x + b for one token."},
    {"moe", py_moe, METH_VARARGS, "moe(y, x, hidden, dtype, ids, coefs, k, gate_up, down, inter, experts, wtype, ...): routed experts of one token."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(y, x, w, n, eps, dtype): RMSNorm of one token."},
    {"route", py_route, METH_VARARGS, "route(ids, weights, logits, experts, groups, picks, scale): kernels.route for one token."},
    {"attend", py_attend, METH_VARARGS, "attend(o, qkv, cos, sin, k_cache, v_cache, pos, n_heads, n_kv, dim, s_max, dtype): one token's attention."},
    {"check_plan", py_check_plan, METH_VARARGS, "check_plan(plan): ValueError if the kernels cannot run it."},
    {"step", py_step, METH_VARARGS, "step(plan, logits, token, pos, k_cache, v_cache, s_max, cos, sin, eps, threads): a whole decode step on `threads` threads."},
    {"dequant", py_dequant, METH_VARARGS, "dequant(dst, dtype, w, wtype, scale, sdtype, zero, n, k, group): int8 / int4 weights to values."},
    {"cast_bf16_f16", py_cast_bf16_f16, METH_VARARGS, "cast_bf16_f16(dst, src, n) -> values beyond +-65504 (made +-inf)."},
    {"cast_file_bf16_f16", py_cast_file_bf16_f16, METH_VARARGS, "cast_file_bf16_f16(dst, fd, offset, n) -> overflows, reading the file with pread."},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): threads per kernel call, the caller's included."},
    {"set_avx512", py_set_avx512, METH_VARARGS, "set_avx512(on) -> whether the int8 / int4 dot products now use AVX-512 (only where the CPU has it)."},
    {"supported", py_supported, METH_NOARGS, "True when this CPU has AVX2, FMA and F16C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "One-token decode kernels for AVX2 CPUs (see kernels/cpu.h).", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
