/* Read rates of the decode dot products (kernels/dot.c rows_dot), without Python: one weight type,
 * rows of two widths, from cache and from memory, one or two threads, AVX-512 on or off.
 *
 *   gcc -O3 -Ikernels -o /tmp/kernel_rates bench/kernel_rates.c kernels/dot.c kernels/pool.c kernels/cpu.c -lm -lpthread
 *   /tmp/kernel_rates [wtype: 1 bf16 | 2 int8 | 3 int4] [rounds]
 *
 * Each round measures every case once (cases alternate, so a change in the machine's memory speed
 * hits them alike); each case prints its best rate and its median ratio to the first case of its
 * round. Found with it (Zen 4, from memory): rows of 1 KB read at 0.77-0.85x the rate of rows of
 * 2 KB (one thread; 0.85-0.89x with two), for bf16 and int8 alike, while from cache both run 2-3x
 * faster than from memory. Not the call, the final sum or the activation vector (tried): the hardware
 * prefetcher falling behind. With int8 rows prefetched two pages ahead into L2 (dot.c), int8 1 KB rows
 * read at 1.02x the 2 KB rate, and one thread at 22-24 GB/s instead of 18.
 */
#include "cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef struct {
    long k, n;     /* row width, rows */
    int threads, wide;
    const char *where;
} case_t;

static size_t row_size(int wtype, long k) { return wtype == I4 ? k / 2 : wtype == I8 ? k : 2 * k; }

/* Seconds of one pass over an n x k matrix of wtype (the best of reps passes). */
static double pass_seconds(int wtype, case_t c, int reps) {
    size_t bytes = c.n * row_size(wtype, c.k);
    char *w = aligned_alloc(64, bytes);
    for (size_t i = 0; i < bytes; i++) w[i] = (char)(i * 2654435761u >> 24) & (wtype == BF16 ? 0x3f : 0xff);
    float *scale = malloc((c.n * c.k / 32 + 16) * sizeof(float)), *x = malloc(c.k * sizeof(float)), *y = malloc(c.n * sizeof(float));
    uint8_t *zero = malloc(c.n * c.k / 32 + 16);
    for (long i = 0; i < c.n * c.k / 32 + 16; i++) scale[i] = 0.01f, zero[i] = 8;
    for (long i = 0; i < c.k; i++) x[i] = (float)(i % 17) / 17 - 0.5f;
    mat_t m = {w, wtype == BF16 ? NULL : scale, wtype == I4 ? zero : NULL, wtype, F32, wtype == I4 ? 128 : 0};
    float *storage = malloc(vec_floats(c.k) * sizeof(float));
    vec_t v = vec_prepare(x, c.k, storage, vec_needs(m));
    set_avx512(c.wide);
    pool_set_threads(c.threads);
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        double t = now();
        if (c.threads > 1) linear(m, NULL, v, c.n, y);
        else rows_dot(m, v, 0, c.n, y);
        t = now() - t;
        best = t < best ? t : best;
    }
    free(w), free(scale), free(zero), free(x), free(y), free(storage);
    return best;
}

static int by_value(const void *a, const void *b) { return *(const double *)a < *(const double *)b ? -1 : 1; }

int main(int argc, char **argv) {
    int wtype = argc > 1 ? atoi(argv[1]) : BF16, rounds = argc > 2 ? atoi(argv[2]) : 3;
    long wide_k = wtype == I4 ? 4096 : wtype == I8 ? 2048 : 1024;  /* 2 KB rows */
    long memory = 256L << 20;                                      /* bytes: beyond any cache */
    case_t cases[] = {
        {wide_k, memory / (2 * 1024), 1, 1, "memory, 2 KB rows"},
        {wide_k / 2, memory / 1024, 1, 1, "memory, 1 KB rows"},
        {wide_k, memory / (2 * 1024), 2, 1, "memory, 2 KB rows, 2 threads"},
        {wide_k / 2, memory / 1024, 2, 1, "memory, 1 KB rows, 2 threads"},
        {wide_k, (512 << 10) / (2 * 1024), 1, 1, "cache (512 KB), 2 KB rows"},
        {wide_k / 2, (512 << 10) / 1024, 1, 1, "cache (512 KB), 1 KB rows"},
        {wide_k / 2, memory / 1024, 1, 0, "memory, 1 KB rows, AVX2"},
    };
    int n = sizeof cases / sizeof cases[0];
    double rate[16][64], ratio[16][64];
    for (int r = 0; r < rounds && r < 64; r++)
        for (int i = 0; i < n; i++) {
            case_t c = cases[i];
            double s = pass_seconds(wtype, c, c.n * row_size(wtype, c.k) < (1 << 20) ? 2000 : 10);
            rate[i][r] = c.n * row_size(wtype, c.k) / s / 1e9;
            ratio[i][r] = rate[i][r] / rate[0][r];
        }
    printf("weights %s; %d rounds; best GB/s, and the median ratio to the first case of the same round\n",
           wtype == I4 ? "int4" : wtype == I8 ? "int8" : "bf16", rounds);
    for (int i = 0; i < n; i++) {
        double best = 0;
        for (int r = 0; r < rounds; r++) best = rate[i][r] > best ? rate[i][r] : best;
        qsort(ratio[i], rounds, sizeof(double), by_value);
        printf("  %-34s k=%-5ld %6.1f GB/s  %.2fx\n", cases[i].where, cases[i].k, best, ratio[i][rounds / 2]);
    }
    return 0;
}
