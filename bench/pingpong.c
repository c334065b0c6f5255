// SPDX-License-Identifier: Apache-2.0
/*
 * Same-host TCP micro-benchmark for bench/sockmap_bench.py, with the
 * non-blocking sockets kmesh's sockmap acceleration enrolls (and that event
 * loops use): poll() waits, never a blocking read.
 *
 *   pingpong echo PORT                      echo server (one thread per connection)
 *   pingpong sink PORT                      read-and-discard server
 *   pingpong rr PORT SIZE CONNS SECONDS     CONNS connections, each sending SIZE bytes and
 *                                           reading SIZE back, as fast as it can; prints JSON
 *                                           {round_trips, p50_us, p99_us, rps, mbps}
 *   pingpong stream PORT WRITE SECONDS      one connection writing WRITE-byte chunks; prints
 *                                           JSON {bytes, gbps}
 *
 * Servers listen on 127.0.0.1 and print "listening" once they do.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (1 << 21)

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void nonblock(int fd)
{
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
		die("fcntl");
}

static void wait_for(int fd, short events)
{
	struct pollfd p = { .fd = fd, .events = events };

	while (poll(&p, 1, 10000) < 0 && errno == EINTR)
		;
}

/* Send (out) or receive all of buf, waiting with poll() whenever the
 * socket would block; -1 when the peer is gone. */
static int io_all(int fd, char *buf, size_t len, int out)
{
	while (len) {
		ssize_t n = out ? send(fd, buf, len, MSG_NOSIGNAL) : recv(fd, buf, len, 0);

		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			wait_for(fd, out ? POLLOUT : POLLIN);
			continue;
		}
		if (n <= 0)
			return -1;
		buf += n;
		len -= n;
	}
	return 0;
}

#define send_all(fd, buf, len) io_all(fd, (char *)(buf), len, 1)
#define recv_all(fd, buf, len) io_all(fd, buf, len, 0)

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int dial(int port)
{
	struct sockaddr_in a = loopback(port);
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1, err = 0;
	socklen_t len = sizeof(err);

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	nonblock(fd); /* before connect: kmesh reads the mode when it is established */
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0 && errno != EINPROGRESS)
		die("connect");
	wait_for(fd, POLLOUT);
	getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
	if (err) {
		errno = err;
		die("connect");
	}
	return fd;
}

struct conn {
	int fd;
	int echo;
};

static void *serve_conn(void *arg)
{
	struct conn *c = arg;
	static __thread char buf[1 << 20];
	int one = 1;

	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	nonblock(c->fd);
	for (;;) {
		ssize_t n = recv(c->fd, buf, sizeof(buf), 0);

		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			wait_for(c->fd, POLLIN);
			continue;
		}
		if (n <= 0)
			break;
		if (c->echo && send_all(c->fd, buf, n) < 0)
			break;
	}
	close(c->fd);
	free(c);
	return NULL;
}

static int serve(int port, int echo)
{
	struct sockaddr_in a = loopback(port);
	int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	nonblock(lfd); /* before listen: stands for the accepted sockets */
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 1024) < 0)
		die("listen");
	printf("listening\n");
	fflush(stdout);
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
		pthread_t t;
		struct conn *c;

		if (fd < 0) {
			wait_for(lfd, POLLIN);
			continue;
		}
		c = malloc(sizeof(*c));
		c->fd = fd;
		c->echo = echo;
		pthread_create(&t, NULL, serve_conn, c);
		pthread_detach(t);
	}
	return 0; /* not reached: servers run until killed */
}

struct rr_thread {
	pthread_t t;
	int port;
	size_t size;
	double until;
	double *samples;
	long count;
};

static void *rr_run(void *arg)
{
	struct rr_thread *r = arg;
	char *buf = calloc(1, r->size);
	int fd = dial(r->port);

	while (now() < r->until) {
		double t0 = now();

		if (send_all(fd, buf, r->size) < 0 || recv_all(fd, buf, r->size) < 0)
			break;
		if (r->count < MAX_SAMPLES)
			r->samples[r->count] = now() - t0;
		r->count++;
	}
	close(fd);
	free(buf);
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static int rr(int port, size_t size, int conns, double seconds)
{
	struct rr_thread *th = calloc(conns, sizeof(*th));
	double start = now(), *all;
	long total = 0, kept = 0;

	for (int i = 0; i < conns; i++) {
		th[i] = (struct rr_thread){ .port = port, .size = size, .until = start + seconds };
		th[i].samples = malloc(sizeof(double) * MAX_SAMPLES);
		pthread_create(&th[i].t, NULL, rr_run, &th[i]);
	}
	for (int i = 0; i < conns; i++) {
		pthread_join(th[i].t, NULL);
		total += th[i].count;
	}
	all = malloc(sizeof(double) * (total ? total : 1));
	for (int i = 0; i < conns; i++) {
		long n = th[i].count < MAX_SAMPLES ? th[i].count : MAX_SAMPLES;

		memcpy(all + kept, th[i].samples, n * sizeof(double));
		kept += n;
	}
	qsort(all, kept, sizeof(double), cmp_double);
	double elapsed = now() - start;
	printf("{\"round_trips\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f, \"rps\": %.1f, \"mbps\": %.2f}\n", total,
	       kept ? all[kept / 2] * 1e6 : 0, kept ? all[(long)(kept * 0.99)] * 1e6 : 0, total / elapsed,
	       total * size * 2 * 8 / elapsed / 1e6);
	return 0;
}

static int stream(int port, size_t chunk, double seconds)
{
	char *buf = calloc(1, chunk);
	int fd = dial(port);
	double start = now(), until = start + seconds;
	long long bytes = 0;

	while (now() < until) {
		if (send_all(fd, buf, chunk) < 0)
			break;
		bytes += chunk;
	}
	double elapsed = now() - start;
	close(fd);
	printf("{\"bytes\": %lld, \"gbps\": %.3f}\n", bytes, bytes * 8 / elapsed / 1e9);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "echo"))
		return serve(atoi(argv[2]), 1);
	if (argc == 3 && !strcmp(argv[1], "sink"))
		return serve(atoi(argv[2]), 0);
	if (argc == 6 && !strcmp(argv[1], "rr"))
		return rr(atoi(argv[2]), atol(argv[3]), atoi(argv[4]), atof(argv[5]));
	if (argc == 5 && !strcmp(argv[1], "stream"))
		return stream(atoi(argv[2]), atol(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: see the comment at the top of bench/pingpong.c\n");
	return 2;
}
