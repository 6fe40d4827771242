/* kernels._cpu: one whole decode step (batch 1, one token) of a MoGE model, from a plan of pointers.
 *
 * Calling the one-token ops one by one from Python costs ~100 us of interpreter and torch work per
 * layer between them; a step makes the same calls from C. The plan is an int64 array that
 * kernels/decode_step.py builds once per model (the field order is written out in both files):
 *   header  L, H, nH, nKV, D, V, E, I, G, picks, dtype, embed, norm, lm_head (a mat)
 *   layer   input_norm, post_norm, qkv (a mat), qkv_bias, o (a mat), o_bias, gate, router_scale,
 *           gate_up (a mat), down (a mat), w13 (a mat), w2 (a mat), inter
 *   a mat   w, wtype, scale, sdtype, zero, group (see mat_t in cpu.h)
 * gate is 0 for a dense layer (mlp_only_layers): w13 / w2 are then its MLP, else the shared expert;
 * inter is their width, 0 for a MoE layer without a shared expert (w13 / w2 are then not read). Norms, the gate, router_scale and biases are float32; embed is [V, H] in
 * dtype; experts are stacked [E, 2I, H] / [E, H, I]. Values are rounded to the model dtype where
 * torch's path stores them in it (residual stream, norms' outputs, q/k/v, attention output,
 * projections, logits), so a bfloat16 step matches the torch path up to float32 summation order.
 */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const int64_t *p;
} cursor;

static int64_t next(cursor *c) { return *c->p++; }

static mat_t next_mat(cursor *c) {
    mat_t m;
    m.w = (const char *)(intptr_t)next(c);
    m.wtype = (int)next(c);
    m.scale = (const void *)(intptr_t)next(c);
    m.sdtype = (int)next(c);
    m.zero = (const uint8_t *)(intptr_t)next(c);
    m.group = next(c);
    return m;
}

typedef struct {
    long L, H, nH, nKV, D, V, E, I, G, picks;
    int dtype;
    const void *embed;
    const float *norm;
    mat_t lm_head;
} header_t;

typedef struct {
    const float *input_norm, *post_norm, *qkv_bias, *o_bias, *gate, *router_scale;
    mat_t qkv, o, gate_up, down, w13, w2;
    long inter;
} layer_t;

static layer_t next_layer(cursor *c) {
    layer_t l;
    l.input_norm = (const float *)(intptr_t)next(c);
    l.post_norm = (const float *)(intptr_t)next(c);
    l.qkv = next_mat(c);
    l.qkv_bias = (const float *)(intptr_t)next(c);
    l.o = next_mat(c);
    l.o_bias = (const float *)(intptr_t)next(c);
    l.gate = (const float *)(intptr_t)next(c);
    l.router_scale = (const float *)(intptr_t)next(c);
    l.gate_up = next_mat(c);
    l.down = next_mat(c);
    l.w13 = next_mat(c);
    l.w2 = next_mat(c);
    l.inter = next(c);
    return l;
}

static header_t read_header(cursor *c) {
    header_t h;
    h.L = next(c), h.H = next(c), h.nH = next(c), h.nKV = next(c), h.D = next(c), h.V = next(c);
    h.E = next(c), h.I = next(c), h.G = next(c), h.picks = next(c);
    h.dtype = (int)next(c);
    h.embed = (const void *)(intptr_t)next(c);
    h.norm = (const float *)(intptr_t)next(c);
    h.lm_head = next_mat(c);
    return h;
}

/* A message for a plan the kernels cannot run, or NULL: checked once, when the plan is built. */
const char *decode_step_check(const int64_t *plan) {
    cursor c = {plan};
    header_t h = read_header(&c);
    if (h.L < 1 || h.H < 1 || h.nKV < 1 || h.nH % h.nKV || h.D % 2 || h.D > 4096 || (h.dtype != F32 && h.dtype != BF16))
        return "step: bad model dimensions";
    if (!mat_supported(h.lm_head, h.H)) return "step: lm_head weight type not supported";
    for (long i = 0; i < h.L; i++) {
        layer_t l = next_layer(&c);
        if (!mat_supported(l.qkv, h.H) || !mat_supported(l.o, h.nH * h.D) || l.inter < 0 || (!l.gate && l.inter == 0) ||
            (l.inter && (!mat_supported(l.w13, h.H) || !mat_supported(l.w2, l.inter))))
            return "step: weight type not supported";
        if (l.gate && (!mat_supported(l.gate_up, h.H) || !mat_supported(l.down, h.I) || h.G < 1 || h.E % h.G || h.E > 4096 ||
                       h.picks < 1 || h.picks > h.E / h.G || h.G * h.picks + 1 > MAX_PICKS))
            return "step: expert weights or routing counts not supported";
    }
    return NULL;
}

/* This thread's scratch memory, kept between steps: a fresh allocation of this size would be
 * mmapped, and its pages faulted in and zeroed, on every step. */
static void *scratch(size_t bytes) {
    static __thread void *mem;
    static __thread size_t size;
    if (bytes > size) {
        free(mem);
        size = 0;
        if (!(mem = malloc(bytes))) return NULL;
        size = bytes;
    }
    return mem;
}

/* logits [V] float32 for `token` at `pos`; caches [L, nKV, s_max, D] in dtype; cos, sin [D] float32
 * (the RoPE tables' row for pos, sin with its first half negated). Returns 0, or -1 when out of memory. */
int decode_step(const int64_t *plan, float *logits, long token, long pos, void *k_cache, void *v_cache, long s_max, const float *cos,
         const float *sin, float eps) {
    cursor c = {plan};
    header_t h = read_header(&c);
    long H = h.H, nqkv = (h.nH + 2 * h.nKV) * h.D, nHD = h.nH * h.D, k = h.G * h.picks;
    long max_inter = h.I;
    {
        cursor d = c;
        for (long i = 0; i < h.L; i++) {
            layer_t l = next_layer(&d);
            if (l.inter > max_inter) max_inter = l.inter;
        }
    }
    mlp_t m[MAX_PICKS];
    long mlp_floats = (k + 1) * (2 * max_inter + vec_floats(max_inter));
    long floats = H + vec_floats(H) + nqkv + vec_floats(nHD) + attend_scratch_floats(h.nH, h.D, pos) + H + h.E + mlp_floats;
    float *buf = scratch(floats * sizeof(float) + (k + 1) * (sizeof(int64_t) + sizeof(float)));
    if (!buf) return -1;
    int64_t *ids = (int64_t *)(buf + floats);
    float *coefs = (float *)(ids + k + 1);
    float *x = buf, *hv_buf = x + H, *qkv = hv_buf + vec_floats(H), *o_buf = qkv + nqkv, *att = o_buf + vec_floats(nHD);
    float *y = att + attend_scratch_floats(h.nH, h.D, pos), *router = y + H, *mlp_scratch = router + h.E;
    size_t es = h.dtype == F32 ? 4 : 2, layer_cache = (size_t)h.nKV * s_max * h.D * es;

    to_float((const char *)h.embed + (size_t)token * H * es, H, h.dtype, x);  /* [H], the residual stream */
    for (long i = 0; i < h.L; i++) {
        layer_t l = next_layer(&c);
        rms_norm(x, l.input_norm, H, eps, hv_buf);
        round_to(hv_buf, H, h.dtype);
        vec_t hv = vec_prepare(hv_buf, H, hv_buf, vec_needs(l.qkv));
        linear(l.qkv, l.qkv_bias, hv, nqkv, qkv);
        round_to(qkv, nqkv, h.dtype);
        attend(qkv, cos, sin, (char *)k_cache + i * layer_cache, (char *)v_cache + i * layer_cache, pos, h.nH, h.nKV, h.D, s_max,
               h.dtype, att, o_buf);
        round_to(o_buf, nHD, h.dtype);
        linear(l.o, l.o_bias, vec_prepare(o_buf, nHD, o_buf, vec_needs(l.o)), H, y);
        round_to(y, H, h.dtype);
        add_rounded(x, y, H, h.dtype);

        rms_norm(x, l.post_norm, H, eps, hv_buf);
        round_to(hv_buf, H, h.dtype);
        hv = vec_prepare(hv_buf, H, hv_buf, vec_needs(l.w13) | (l.gate ? vec_needs(l.gate_up) : 0));
        int count = 0;
        if (l.gate) {  /* MoE: the picked experts, then the shared expert with weight 1 */
            mat_t gate = {(const char *)l.gate, NULL, NULL, F32, F32, 0};
            linear(gate, NULL, hv, h.E, router);
            route(router, h.E, h.G, h.picks, l.router_scale, ids, coefs);
            for (; count < k; count++)
                m[count] = (mlp_t){mat_row_block(l.gate_up, 2 * h.I, H, ids[count]), mat_row_block(l.down, H, h.I, ids[count]), h.I, coefs[count]};
        }
        if (l.inter) m[count++] = (mlp_t){l.w13, l.w2, l.inter, 1.0f};
        mlps(m, count, hv, h.dtype, mlp_scratch, y);
        round_to(y, H, h.dtype);
        add_rounded(x, y, H, h.dtype);
    }
    rms_norm(x, h.norm, H, eps, hv_buf);
    round_to(hv_buf, H, h.dtype);
    linear(h.lm_head, NULL, vec_prepare(hv_buf, H, hv_buf, vec_needs(h.lm_head)), h.V, logits);
    round_to(logits, h.V, h.dtype);
    return 0;
}
