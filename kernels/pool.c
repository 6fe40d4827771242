/* kernels._cpu: the thread pool. Work is split over a small persistent pool whose workers spin
 * briefly between calls (a decode step issues one every few microseconds), then sleep; part 0 runs on
 * the calling thread. One job holds the pool at a time; a concurrent caller runs alone. */
#include "cpu.h"

#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000  /* ~0.5 ms of pause instructions before a worker sleeps */

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
void run_parallel(task_fn fn, void *ctx, int parallel) {
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

void pool_set_threads(int n) {
    pthread_mutex_lock(&pool_mu);  /* not while another thread's job runs */
    n_threads = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
    pthread_mutex_unlock(&pool_mu);
}
