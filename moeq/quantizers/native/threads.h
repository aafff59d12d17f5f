/* The thread split of moeq's CPU kernels (clip_screen.c, rtn_codes.c): jobs over contiguous row ranges, one
 * POSIX thread each, the first on the calling thread. */
#ifndef MOEQ_NATIVE_THREADS_H
#define MOEQ_NATIVE_THREADS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 64

/* nthreads within [1, MAX_THREADS] and at most one per row of m (at least one) */
static inline int clamp_threads(int nthreads, int64_t m) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > m) nthreads = m > 0 ? (int)m : 1;
    return nthreads;
}

/* fn on each of the n jobs (an array of size-byte structs) in parallel; a thread that cannot start has its
 * job run on the calling thread afterwards, so every job runs exactly once */
static inline void run_jobs(void *jobs, size_t size, int n, void *(*fn)(void *)) {
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    char *base = jobs;
    for (int t = 1; t < n; t++) started[t] = pthread_create(&tid[t], NULL, fn, base + t * size) == 0;
    fn(base);
    for (int t = 1; t < n; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else fn(base + t * size);
    }
}

#endif
