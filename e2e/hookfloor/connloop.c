// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * connloop: short TCP connections over 127.0.0.1, one after another on one
 * thread pinned to CPU 0, for SECONDS: connect, accept, 64 B each way
 * (checked), close (the client with SO_LINGER 0: a reset, so no TIME_WAIT
 * exhausts the ports). Blocking sockets, so sockbypass leaves them plain.
 * Prints connections per second. Used by e2e/hook-floor.sh.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int read_full(int fd, char *buf, int n)
{
	for (int r = 0; r < n;) {
		int k = read(fd, buf + r, n - r);

		if (k <= 0)
			return -1;
		r += k;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct linger lg = {1, 0};
	socklen_t al = sizeof(a);
	char out[64], in[64];
	double dur, t0, end;
	cpu_set_t cpus;
	long n = 0;
	int l;

	if (argc != 2 || (dur = atof(argv[1])) <= 0) {
		fprintf(stderr, "usage: connloop SECONDS\n");
		return 2;
	}
	CPU_ZERO(&cpus);
	CPU_SET(0, &cpus);
	if (sched_setaffinity(0, sizeof(cpus), &cpus)) {
		perror("connloop: pin to CPU 0");
		return 1;
	}
	l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (void *)&a, sizeof(a)) || listen(l, 128) || getsockname(l, (void *)&a, &al)) {
		perror("connloop: listen on 127.0.0.1");
		return 1;
	}
	t0 = now();
	end = t0 + dur;
	for (;;) {
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		memset(out, (char)n, sizeof(out));
		if (c < 0 || setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) || connect(c, (void *)&a, sizeof(a))) {
			perror("connloop: connect");
			return 1;
		}
		s = accept(l, 0, 0);
		if (s < 0 || write(c, out, sizeof(out)) != sizeof(out) || read_full(s, in, sizeof(in)) ||
		    write(s, in, sizeof(in)) != sizeof(in) || read_full(c, in, sizeof(in)) || memcmp(in, out, sizeof(in))) {
			fprintf(stderr, "connloop: connection %ld: exchange failed\n", n);
			return 1;
		}
		close(c);
		close(s);
		n++;
		if ((n & 63) == 0 && now() > end)
			break;
	}
	printf("%.0f\n", n / (now() - t0));
	return 0;
}
