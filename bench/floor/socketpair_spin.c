/*
 * The floor for a round trip when neither side ever sleeps: the same ping-pong
 * as socketpair_pingpong.c, but both processes spin on non-blocking reads.
 * It bounds what a busy-polling channel (ClusterBuilder::busy_poll) can reach.
 *
 *   cc -O2 -o /tmp/spin bench/floor/socketpair_spin.c && /tmp/spin
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <time.h>
#include <sys/socket.h>

static int by_value(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? -1 : x > y;
}

int main(void) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) != 0) return 1;
    char buf[64] = {0};
    const int warmup = 1000, rounds = 20000;
    if (fork() == 0) {
        close(sv[0]);
        for (;;) {
            ssize_t n;
            while ((n = read(sv[1], buf, sizeof buf)) < 0) {}
            if (n == 0) _exit(0);
            if (write(sv[1], buf, n) != n) _exit(1);
        }
    }
    close(sv[1]);
    long *samples = malloc(sizeof(long) * rounds);
    struct timespec start, end;
    for (int i = 0; i < warmup + rounds; i++) {
        clock_gettime(CLOCK_MONOTONIC, &start);
        if (write(sv[0], buf, 16) != 16) return 1;
        while (read(sv[0], buf, sizeof buf) < 0) {}
        clock_gettime(CLOCK_MONOTONIC, &end);
        if (i >= warmup)
            samples[i - warmup] = (end.tv_sec - start.tv_sec) * 1000000000L + (end.tv_nsec - start.tv_nsec);
    }
    qsort(samples, rounds, sizeof(long), by_value);
    printf("C spinning socketpair ping-pong: p50 %.1f us p99 %.1f us\n",
           samples[rounds / 2] / 1000.0, samples[rounds * 99 / 100] / 1000.0);
    return 0;
}
