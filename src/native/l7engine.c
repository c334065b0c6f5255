// SPDX-License-Identifier: Apache-2.0
/*
 * kmesh's native L7 engine (l7engine.h): one thread, one epoll set, every
 * hand-off connection the Python side does not take.
 *
 * A connection goes through:
 *   HEAD     its next request head: the first one only peeked (MSG_PEEK), so
 *            that Python can still take the connection untouched; later ones
 *            read into the connection's buffer. The head goes to the decide
 *            callback (Python: the route table, with Envoy's semantics).
 *   CONNECT  a forward: the first endpoint of the decision that connects,
 *            over an idle upstream connection of this client when there is one.
 *   EXCHANGE the head (as decided) and the request body (as framed) up, the
 *            response head and body (as framed) down, concurrently.
 *   ANSWER   a local answer written; then HEAD again or close.
 * Anything else (a decision to hand off, a forward whose endpoints all fail,
 * the engine stopping with the connection idle) gives the connection and
 * what was read of it back to Python through the hand-off queue.
 *
 * Readiness is edge-triggered and remembered per socket (rd/wr flags,
 * cleared on EAGAIN): a socket is read only when its bytes are wanted, which
 * is the backpressure.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "http_tokens.h"
#include "l7engine.h"
#include "l7route.h"

#define MAX_LISTENERS 1024
#define POOL 4                 /* idle upstream connections kept per client connection */
#define READ_CHUNK (64 * 1024)
#define OUT_HIGH (256 * 1024)  /* stop reading the source while this much waits for the sink */
#define EVENTS 256
#define SPARES 256             /* idle upstream connections kept for any client (of the same namespace) */
#define CLOSE_LINE "connection: close\r\n\r\n"
/* A response body with at least this much left (or read to the upstream's
 * close) goes upstream -> pipe -> client with splice(2): its pages are moved,
 * not copied through the engine. */
#define PIPE_MIN (64 * 1024)
#define PIPE_SIZE (1024 * 1024) /* asked of F_SETPIPE_SZ; the default 64 KiB is kept when refused */

enum state { S_HEAD, S_CONNECT, S_EXCHANGE, S_ANSWER };
enum side { SIDE_CLIENT = 0 }; /* 1..POOL: pool slot + 1 */
enum { TAG_CONN = 0, TAG_LISTENER = 1, TAG_WAKE = 2, TAG_SPARE = 3 };
enum { T_NONE, T_HEAD, T_CONNECT, T_RESPONSE };

struct buf {
	char *p;
	size_t off, len, cap; /* bytes p[off, len) are pending */
};

/* A body being carried as framed (RFC 9112 section 6), bytes unchanged. */
enum { B_NONE, B_LENGTH, B_CHUNKED, B_CLOSE };
enum { CH_SIZE, CH_SIZE_WS, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_TRAILER, CH_TRAILER_LINE,
       CH_TRAILER_LF, CH_END_LF, CH_DONE };

struct body {
	int kind;
	uint64_t rem;  /* B_LENGTH: bytes left; B_CHUNKED: data bytes left in the chunk */
	int st;        /* B_CHUNKED state */
	int digits;
	bool done;
};

struct upstream {
	int fd;
	struct kl7_ep ep;
	bool rd, wr, eof;
	bool reused; /* served an earlier exchange: it may have been closed since */
	struct buf in;
};

/* An idle upstream connection no client holds: the next client of the same
 * namespace forwarding to ep takes it (as Envoy's connection pool). */
struct spare {
	int fd; /* -1: free */
	uint32_t gen;
	struct kl7_ep ep;
	uint64_t netns;
	uint64_t since;
};

struct conn {
	uint32_t idx, gen;
	bool used;
	int fd;
	bool rd, wr, eof;
	bool hup;            /* the client hung up (seen while its head is only peeked) */
	enum state st;
	bool first;          /* the first head is still in the socket (peeked) */
	uint32_t head_len;   /* of the head being decided (peeked or at in.off) */
	uint32_t vip_ip, peer_ip;
	uint16_t vip_port, peer_port;
	uint64_t netns;
	int nsfd;            /* -1: the daemon's own namespace */
	struct buf in;       /* from the client, read and not yet carried */
	struct buf out;      /* to the client */
	struct upstream pool[POOL];
	int up;              /* pool slot of the exchange, -1 */
	int evict;           /* the slot the next new upstream takes when all are busy */
	struct buf uout;     /* to the upstream */
	struct body req, resp;
	bool resp_head_seen, resp_keep, head_request;
	bool keep, req_keep, answer_keep;
	struct kl7_ep eps[KL7_MAX_EPS];
	uint32_t n_eps, next_ep;
	uint32_t timeout_ms, connect_timeout_ms;
	uint64_t deadline;   /* the response head's, 0: none */
	const char *fwd_head; /* the decided upstream head (owned), NULL: as received */
	uint32_t fwd_head_len;
	char *replay;        /* the request head sent over a reused upstream connection (owned) */
	uint32_t replay_len;
	uint64_t timer_at;   /* the armed deadline (ms), 0: none */
	uint64_t heap_at;    /* the deadline of this connection's entry in the heap, 0: none */
	struct conn *wprev, *wnext; /* waiting for a head, oldest first */
	bool waiting;
	bool kept;           /* has gone on after a request (a keep-alive connection) */
	bool fresh;          /* the next connect: a new connection, no pooled one */
	bool has_pipe;       /* pipe: the response body's splice(2) path (pipe_body) */
	bool no_pipe;        /* pipe2 failed: bodies are copied */
	int pipe[2];
	uint32_t piped;      /* bytes in the pipe, not yet at the client */
};

struct listener {
	int fd;
	uint32_t gen;
	uint64_t netns;
	int nsfd;
};

struct timer {
	uint64_t at;
	uint32_t idx, gen;
};

/* A VIP's route table (NULL: the Python side decides its requests), of
 * config generation gen. */
struct vip_table {
	uint32_t ip;
	uint16_t port;
	bool used;
	uint32_t gen;
	struct kr_table *t;
};

struct engine {
	struct kl7_config cfg;
	char *fixed[KL7_A_N][2];
	uint32_t fixed_len[KL7_A_N][2];
	int ep, wake, own_ns;
	bool running, done;
	pthread_mutex_t mu;          /* listeners, handoffs, stop */
	pthread_cond_t cond;         /* running / done changed */
	struct listener ls[MAX_LISTENERS];
	struct conn **conns;
	uint32_t nconns, capconns;
	uint32_t *free_idx;
	uint32_t nfree;
	struct timer *heap;
	uint32_t nheap, capheap;
	struct conn *whead, *wtail;
	uint32_t nwaiting;
	struct kl7_handoff *hq;
	uint32_t nhq, caphq;
	bool stopping;
	uint64_t stop_deadline;
	struct kl7_stats stats;
	char *peek;                  /* head_limit bytes: where first heads are peeked into */
	uint32_t gen;                /* the config generation (kl7_invalidate; atomic) */
	struct vip_table *vips;      /* open addressing, cap a power of two */
	uint32_t nvips, capvips;
	uint64_t rng;
	char *scratch;               /* head_limit bytes: a head kr_decide rewrote */
	struct spare spares[SPARES];
	uint32_t nspares;
	uint64_t last_sweep;         /* of the spares (sweep_spares) */
	int sweep_now;               /* a listener went: sweep at once (atomic) */
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t tag(uint32_t kind, uint32_t idx, uint32_t gen, uint32_t side)
{
	return (uint64_t)gen << 32 | (uint64_t)idx << 8 | side << 2 | kind;
}

/* -- buffers ------------------------------------------------------------ */
static size_t buf_avail(const struct buf *b) { return b->len - b->off; }

static int buf_reserve(struct buf *b, size_t more)
{
	if (b->off && b->off == b->len)
		b->off = b->len = 0;
	if (b->len + more <= b->cap)
		return 0;
	if (b->off) { /* slide what is pending to the front first */
		memmove(b->p, b->p + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
		if (b->len + more <= b->cap)
			return 0;
	}
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + more)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p)
		return -1;
	b->p = p;
	b->cap = cap;
	return 0;
}

static int buf_put(struct buf *b, const char *p, size_t n)
{
	if (buf_reserve(b, n))
		return -1;
	memcpy(b->p + b->len, p, n);
	b->len += n;
	return 0;
}

static void buf_drop(struct buf *b, size_t n)
{
	b->off += n;
	if (b->off >= b->len)
		b->off = b->len = 0;
}

static void buf_free(struct buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

/* Shrink an idle connection's buffers: thousands of keep-alive
 * connections should not each hold 64 KiB. */
static void buf_trim(struct buf *b)
{
	if (buf_avail(b) == 0 && b->cap > 16384)
		buf_free(b);
}

/* -- socket I/O ------------------------------------------------------------ */
/* Read what is there into b (up to READ_CHUNK): >0 bytes, 0 EOF, -1 EAGAIN, -2 error. */
static ssize_t read_into(int fd, struct buf *b, bool *rd)
{
	if (buf_reserve(b, READ_CHUNK))
		return -2;
	ssize_t n = recv(fd, b->p + b->len, READ_CHUNK, 0);
	if (n > 0) {
		b->len += n;
		return n;
	}
	if (n == 0)
		return 0;
	if (errno == EAGAIN || errno == EWOULDBLOCK) {
		*rd = false;
		return -1;
	}
	return errno == EINTR ? -1 : -2;
}

/* Write what b holds: 0 all written (or EAGAIN with some left), -1 error. */
static int flush(int fd, struct buf *b, bool *wr)
{
	while (buf_avail(b) && *wr) {
		ssize_t n = send(fd, b->p + b->off, buf_avail(b), MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0) {
			buf_drop(b, n);
			continue;
		}
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			*wr = false;
			return 0;
		}
		if (n < 0 && errno == EINTR)
			continue;
		return -1;
	}
	return 0;
}

static void close_reset(int fd)
{
	struct linger l = {1, 0};

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
	close(fd);
}

/* -- HTTP heads -------------------------------------------------------------- */
static const char *find_end(const char *p, size_t n)
{
	if (n < 4)
		return NULL;
	const char *q = memmem(p, n, "\r\n\r\n", 4);
	return q ? q + 4 : NULL;
}

struct resp_head {
	int status;
	bool http10;
	bool keep;
	int framing; /* B_* */
	uint64_t length;
};

/* A response head [p, p+n) (through its blank line), read as kmesh.l7.http1
 * reads one: -1 when it is no valid head. */
static int parse_response(const char *p, size_t n, bool head_request, struct resp_head *r)
{
	const char *end = p + n - 4, *line = p;
	const char *eol = memmem(line, end - line + 2, "\r\n", 2);
	bool te = false, te_chunked = false, cl = false, conn_close = false, conn_keep = false;
	uint64_t length = 0;

	if (!eol || eol - line < 12 || memcmp(line, "HTTP/1.", 7) != 0 || line[8] != ' ')
		return -1;
	r->http10 = line[7] == '0';
	if (line[7] != '0' && line[7] != '1')
		return -1;
	int st = 0;
	for (int i = 9; i < 12; i++) {
		if (line[i] < '0' || line[i] > '9')
			return -1;
		st = st * 10 + line[i] - '0';
	}
	if (eol - line > 12 && line[12] != ' ')
		return -1;
	r->status = st;
	for (line = eol + 2; line < end + 2; line = eol + 2) {
		eol = memmem(line, end + 2 - line, "\r\n", 2);
		if (!eol)
			return -1;
		const char *colon = memchr(line, ':', eol - line);
		if (!colon || colon == line || http_ws(line[0]) || http_ws(colon[-1]))
			return -1;
		size_t nl = colon - line;
		const char *v = colon + 1;
		size_t vn = eol - v;
		while (vn && http_ws(*v))
			v++, vn--;
		while (vn && http_ws(v[vn - 1]))
			vn--;
		size_t i = 0, a, b;
		if (nl == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
			te = true;
			while (next_token(v, vn, &i, &a, &b)) /* the last coding counts */
				te_chunked = token_is(v, a, b, "chunked");
		} else if (nl == 14 && strncasecmp(line, "content-length", 14) == 0) {
			while (next_token(v, vn, &i, &a, &b)) { /* every element the same number */
				if (a == b || b - a > 18)
					return -1;
				uint64_t x = 0;
				for (size_t k = a; k < b; k++) {
					if (v[k] < '0' || v[k] > '9')
						return -1;
					x = x * 10 + v[k] - '0';
				}
				if (cl && x != length)
					return -1;
				length = x;
				cl = true;
			}
		} else if (nl == 10 && strncasecmp(line, "connection", 10) == 0) {
			while (next_token(v, vn, &i, &a, &b)) {
				conn_close |= token_is(v, a, b, "close");
				conn_keep |= token_is(v, a, b, "keep-alive");
			}
		}
	}
	r->keep = r->http10 ? conn_keep : !conn_close;
	r->length = 0;
	if (head_request || (st >= 100 && st < 200) || st == 204 || st == 304) {
		r->framing = B_NONE;
	} else if (te) {
		if (cl)
			return -1; /* both: request smuggling */
		r->framing = te_chunked ? B_CHUNKED : B_CLOSE;
	} else if (cl) {
		r->framing = B_LENGTH;
		r->length = length;
	} else {
		r->framing = B_CLOSE;
	}
	return 0;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* How many of the n bytes at p belong to the body b, advancing it: -1 when
 * they break its framing. b->done once the body has ended. */
static ssize_t body_take(struct body *b, const char *p, size_t n)
{
	size_t i = 0;

	switch (b->kind) {
	case B_NONE:
		b->done = true;
		return 0;
	case B_CLOSE:
		return n;
	case B_LENGTH: {
		size_t k = b->rem < n ? b->rem : n;
		b->rem -= k;
		b->done = b->rem == 0;
		return k;
	}
	}
	while (i < n && !b->done) {
		char c = p[i];
		switch (b->st) {
		case CH_SIZE:
			if (hexval(c) >= 0) {
				if (++b->digits > 15)
					return -1;
				b->rem = b->rem * 16 + hexval(c);
				i++;
				break;
			}
			if (!b->digits && http_ws(c)) {
				i++;
				break;
			}
			if (!b->digits)
				return -1;
			b->st = CH_SIZE_WS;
			break;
		case CH_SIZE_WS:
			if (http_ws(c))
				i++;
			else if (c == ';')
				b->st = CH_EXT, i++;
			else if (c == '\r')
				b->st = CH_SIZE_LF, i++;
			else
				return -1;
			break;
		case CH_EXT:
			if (c == '\r')
				b->st = CH_SIZE_LF;
			else if (c == '\n')
				return -1;
			i++;
			break;
		case CH_SIZE_LF:
			if (c != '\n')
				return -1;
			i++;
			b->st = b->rem ? CH_DATA : CH_TRAILER;
			b->digits = 0;
			break;
		case CH_DATA: {
			size_t k = b->rem < n - i ? b->rem : n - i;
			b->rem -= k;
			i += k;
			if (!b->rem)
				b->st = CH_DATA_CR;
			break;
		}
		case CH_DATA_CR: /* the CRLF after a chunk's data */
		case CH_DATA_LF:
		case CH_TRAILER_LF:
		case CH_END_LF:
			if (c != (b->st == CH_DATA_CR ? '\r' : '\n'))
				return -1;
			b->done = b->st == CH_END_LF;
			b->st = b->st == CH_DATA_CR ? CH_DATA_LF : b->st == CH_DATA_LF ? CH_SIZE : CH_TRAILER;
			i++;
			break;
		case CH_TRAILER: /* the start of a trailer line, or the final CRLF */
			b->st = c == '\r' ? CH_END_LF : CH_TRAILER_LINE;
			i++;
			break;
		case CH_TRAILER_LINE:
			if (c == '\r')
				b->st = CH_TRAILER_LF;
			i++;
			break;
		}
	}
	return i;
}

static void body_init(struct body *b, int kind, uint64_t len)
{
	memset(b, 0, sizeof(*b));
	b->kind = kind;
	b->rem = kind == B_LENGTH ? len : 0;
	b->done = kind == B_NONE || (kind == B_LENGTH && len == 0);
}

/* -- timers ------------------------------------------------------------------------
 * A binary heap with at most one entry per connection: arming a later
 * deadline than the one in the heap only records it (every request re-arms
 * its connection's timer; the heap must not grow per request), and the entry,
 * when it comes due, is pushed again for the later deadline. */
static void heap_push(struct engine *e, uint64_t at, uint32_t idx, uint32_t gen)
{
	if (e->nheap == e->capheap) {
		uint32_t cap = e->capheap ? e->capheap * 2 : 1024;
		struct timer *h = realloc(e->heap, cap * sizeof(*h));
		if (!h)
			return; /* no timer: the connection waits without a deadline */
		e->heap = h;
		e->capheap = cap;
	}
	uint32_t i = e->nheap++;
	while (i) {
		uint32_t parent = (i - 1) / 2;
		if (e->heap[parent].at <= at)
			break;
		e->heap[i] = e->heap[parent];
		i = parent;
	}
	e->heap[i] = (struct timer){at, idx, gen};
}

static void heap_pop(struct engine *e)
{
	struct timer last = e->heap[--e->nheap];
	uint32_t i = 0;

	for (;;) {
		uint32_t l = 2 * i + 1, r = l + 1, m = i;
		uint64_t at = last.at;
		if (l < e->nheap && e->heap[l].at < at)
			m = l, at = e->heap[l].at;
		if (r < e->nheap && e->heap[r].at < at)
			m = r;
		if (m == i)
			break;
		e->heap[i] = e->heap[m];
		i = m;
	}
	if (e->nheap)
		e->heap[i] = last;
}

static void set_timer(struct engine *e, struct conn *c, uint32_t ms)
{
	c->timer_at = ms ? now_ms() + ms : 0;
	if (c->timer_at && (!c->heap_at || c->heap_at > c->timer_at)) {
		heap_push(e, c->timer_at, c->idx, c->gen);
		c->heap_at = c->timer_at;
	}
}


/* -- connections --------------------------------------------------------------- */
static struct conn *conn_new(struct engine *e)
{
	uint32_t idx;

	if (e->nfree) {
		idx = e->free_idx[--e->nfree];
	} else {
		if (e->nconns == e->capconns) {
			uint32_t cap = e->capconns ? e->capconns * 2 : 256;
			struct conn **cs = realloc(e->conns, cap * sizeof(*cs));
			if (!cs)
				return NULL;
			e->conns = cs;
			uint32_t *fi = realloc(e->free_idx, cap * sizeof(*fi));
			if (!fi)
				return NULL;
			e->free_idx = fi;
			e->capconns = cap;
		}
		struct conn *c = calloc(1, sizeof(*c));
		if (!c)
			return NULL;
		idx = e->nconns++;
		e->conns[idx] = c;
	}
	struct conn *c = e->conns[idx];
	uint32_t gen = c->gen + 1;
	memset(c, 0, sizeof(*c));
	c->idx = idx;
	c->gen = gen;
	c->used = true;
	c->up = -1;
	c->nsfd = -1;
	for (int i = 0; i < POOL; i++)
		c->pool[i].fd = -1;
	e->stats.active++;
	return c;
}

static void waiting_unlink(struct engine *e, struct conn *c)
{
	if (!c->waiting)
		return;
	if (c->wprev)
		c->wprev->wnext = c->wnext;
	else
		e->whead = c->wnext;
	if (c->wnext)
		c->wnext->wprev = c->wprev;
	else
		e->wtail = c->wprev;
	c->wprev = c->wnext = NULL;
	c->waiting = false;
	e->nwaiting--;
}

static void conn_close(struct engine *e, struct conn *c);

/* c waits for a request head from now on, the newest of the waiting; past
 * max_waiting, the one waiting longest is closed (slowloris costs the slow). */
static void waiting_add(struct engine *e, struct conn *c)
{
	if (c->waiting)
		return;
	c->wprev = e->wtail;
	c->wnext = NULL;
	if (e->wtail)
		e->wtail->wnext = c;
	else
		e->whead = c;
	e->wtail = c;
	c->waiting = true;
	e->nwaiting++;
	while (e->cfg.max_waiting && e->nwaiting > e->cfg.max_waiting && e->whead != c) {
		e->stats.evicted++;
		conn_close(e, e->whead);
	}
}

static void pool_close(struct engine *e, struct upstream *u, bool reset)
{
	if (u->fd < 0)
		return;
	if (reset)
		close_reset(u->fd);
	else
		close(u->fd);
	u->fd = -1;
	u->rd = u->wr = u->eof = false;
	buf_free(&u->in);
	e->stats.upstreams--;
}

/* -- upstream connections no client holds -------------------------------------------- */
/* s's socket, s free again (events still queued for it are skipped by gen) */
static int spare_release(struct engine *e, struct spare *s)
{
	int fd = s->fd;

	s->fd = -1;
	s->gen++;
	e->nspares--;
	return fd;
}

static void spare_close(struct engine *e, struct spare *s)
{
	close(spare_release(e, s));
	e->stats.upstreams--;
}

static void spares_close_all(struct engine *e)
{
	for (int i = 0; i < SPARES && e->nspares; i++)
		if (e->spares[i].fd >= 0)
			spare_close(e, &e->spares[i]);
}

static bool spare_idle_too_long(const struct engine *e, const struct spare *s, uint64_t now)
{
	return e->cfg.idle_timeout_ms && now - s->since >= e->cfg.idle_timeout_ms;
}

/* u, idle in a client connection that goes away, kept for the next client
 * of namespace netns: true; false when it cannot be (the caller closes it). */
static bool spare_put(struct engine *e, struct upstream *u, uint64_t netns)
{
	if (u->fd < 0 || u->eof || buf_avail(&u->in) || e->stopping || e->nspares == SPARES)
		return false;
	for (int i = 0; i < SPARES; i++) {
		struct spare *s = &e->spares[i];
		if (s->fd >= 0)
			continue;
		/* re-armed: bytes or a FIN already there report at once (and close it) */
		struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET,
					 .data.u64 = tag(TAG_SPARE, i, s->gen, 0)};
		if (epoll_ctl(e->ep, EPOLL_CTL_MOD, u->fd, &ev) != 0)
			return false;
		*s = (struct spare){.fd = u->fd, .gen = s->gen, .ep = u->ep, .netns = netns, .since = now_ms()};
		e->nspares++;
		u->fd = -1;
		u->rd = u->wr = u->eof = false;
		buf_free(&u->in);
		return true;
	}
	return false;
}

/* A spare connection to ep of namespace netns (idle for less than the idle
 * timeout), taken out of the spares; -1 when there is none. */
static int spare_take(struct engine *e, uint64_t netns, struct kl7_ep ep)
{
	uint64_t now = now_ms();

	for (int i = 0; i < SPARES && e->nspares; i++) {
		struct spare *s = &e->spares[i];
		if (s->fd < 0 || s->netns != netns || s->ep.ip != ep.ip || s->ep.port != ep.port)
			continue;
		if (spare_idle_too_long(e, s, now)) {
			spare_close(e, s);
			continue;
		}
		return spare_release(e, s);
	}
	return -1;
}

/* A listener's namespace: still served (e->mu held). */
static bool netns_served(struct engine *e, uint64_t netns)
{
	for (int i = 0; i < MAX_LISTENERS; i++)
		if (e->ls[i].fd >= 0 && e->ls[i].netns == netns)
			return true;
	return false;
}

/* Spares idle for the idle timeout, and those of a namespace no listener
 * serves any more (a workload gone: its namespace must not be kept alive by
 * our sockets), are closed. Every second while there are spares. */
static void sweep_spares(struct engine *e)
{
	uint64_t now = now_ms();

	e->last_sweep = now;
	if (!e->nspares)
		return;
	pthread_mutex_lock(&e->mu);
	for (int i = 0; i < SPARES; i++) {
		struct spare *s = &e->spares[i];
		if (s->fd >= 0 && (spare_idle_too_long(e, s, now) || !netns_served(e, s->netns)))
			spare_close(e, s);
	}
	pthread_mutex_unlock(&e->mu);
}

/* An event on a spare: the upstream sent something or went away (an idle
 * HTTP/1.1 connection has nothing to say): it goes. */
static void on_spare(struct engine *e, uint32_t idx, uint32_t gen)
{
	if (idx < SPARES && e->spares[idx].fd >= 0 && e->spares[idx].gen == gen)
		spare_close(e, &e->spares[idx]);
}

static void conn_release(struct engine *e, struct conn *c)
{
	waiting_unlink(e, c);
	if (c->has_pipe) {
		close(c->pipe[0]);
		close(c->pipe[1]);
	}
	for (int i = 0; i < POOL; i++)
		if (i == c->up || !spare_put(e, &c->pool[i], c->netns))
			pool_close(e, &c->pool[i], false);
	buf_free(&c->in);
	buf_free(&c->out);
	buf_free(&c->uout);
	free((void *)c->fwd_head);
	free(c->replay);
	uint32_t gen = c->gen + 1, idx = c->idx;
	memset(c, 0, sizeof(*c));
	c->gen = gen; /* events and timers of the old connection are skipped */
	c->idx = idx;
	c->fd = -1;
	e->free_idx[e->nfree++] = idx;
	e->stats.active--;
}

static void conn_close(struct engine *e, struct conn *c)
{
	if (c->fd >= 0)
		close(c->fd);
	conn_release(e, c);
}

/* c goes back to Python with what was read of it (the engine forgets it). */
static void conn_handoff(struct engine *e, struct conn *c, int reason)
{
	struct kl7_handoff h = {
		.fd = c->fd, .reason = reason, .vip_ip = c->vip_ip, .peer_ip = c->peer_ip,
		.vip_port = c->vip_port, .peer_port = c->peer_port, .first = c->first, .netns = c->netns,
	};
	size_t n = c->first ? 0 : buf_avail(&c->in);

	epoll_ctl(e->ep, EPOLL_CTL_DEL, c->fd, NULL);
	if (n) {
		h.buf = malloc(n);
		if (!h.buf) {
			conn_close(e, c);
			return;
		}
		memcpy(h.buf, c->in.p + c->in.off, n);
		h.buf_len = n;
	}
	pthread_mutex_lock(&e->mu);
	if (e->nhq == e->caphq) {
		uint32_t cap = e->caphq ? e->caphq * 2 : 64;
		struct kl7_handoff *q = realloc(e->hq, cap * sizeof(*q));
		if (!q) {
			pthread_mutex_unlock(&e->mu);
			free(h.buf);
			conn_close(e, c);
			return;
		}
		e->hq = q;
		e->caphq = cap;
	}
	e->hq[e->nhq++] = h;
	pthread_mutex_unlock(&e->mu);
	uint64_t one = 1;
	if (write(e->cfg.handoff_eventfd, &one, sizeof(one)) < 0) {
		/* the counter cannot overflow in practice; Python drains the queue anyway */
	}
	e->stats.handed_off++;
	c->fd = -1; /* Python's now */
	conn_release(e, c);
}

/* A local answer (data: a whole response); keep: HEAD follows, else close. */
static void answer(struct engine *e, struct conn *c, const char *data, size_t n, int status, bool keep)
{
	e->stats.answers++;
	if (status >= 100 && status < 600)
		e->stats.status[status]++;
	buf_put(&c->out, data, n);
	c->answer_keep = keep;
	c->st = S_ANSWER;
	waiting_unlink(e, c);
	set_timer(e, c, 0);
}

static void answer_fixed(struct engine *e, struct conn *c, int which, int status, bool keep)
{
	answer(e, c, e->fixed[which][keep], e->fixed_len[which][keep], status, keep);
}

static void to_head(struct engine *e, struct conn *c)
{
	if (!c->kept) {
		c->kept = true;
		e->stats.per_request++;
	}
	c->st = S_HEAD;
	buf_trim(&c->in);
	buf_trim(&c->out);
	buf_trim(&c->uout);
	waiting_add(e, c);
	if (c->used)
		set_timer(e, c, e->cfg.idle_timeout_ms);
}

/* Read the peeked first head out of the socket (it is all there). */
static int consume_first(struct conn *c)
{
	if (!c->first)
		return 0;
	c->first = false;
	uint32_t left = c->head_len;
	char sink[4096];
	while (left) {
		ssize_t n = recv(c->fd, sink, left < sizeof(sink) ? left : sizeof(sink), 0);
		if (n <= 0)
			return -1;
		left -= n;
	}
	return 0;
}

/* -- one request head: decided here (l7route.c) or by Python ------------------------ */
static struct vip_table *vip_slot(struct vip_table *v, uint32_t cap, uint32_t ip, uint16_t port)
{
	uint32_t h = (ip * 2654435761u) ^ (port * 40503u);

	for (uint32_t i = 0;; i++) {
		struct vip_table *s = &v[(h + i) & (cap - 1)];
		if (!s->used || (s->ip == ip && s->port == port))
			return s;
	}
}

/* The VIP's entry, made (stale: generation 0) when new; NULL without memory. */
static struct vip_table *vip_table(struct engine *e, uint32_t ip, uint16_t port)
{
	if ((e->nvips + 1) * 2 > e->capvips) {
		uint32_t cap = e->capvips ? e->capvips * 2 : 64;
		struct vip_table *v = calloc(cap, sizeof(*v));
		if (!v)
			return NULL;
		for (uint32_t i = 0; i < e->capvips; i++)
			if (e->vips[i].used)
				*vip_slot(v, cap, e->vips[i].ip, e->vips[i].port) = e->vips[i];
		free(e->vips);
		e->vips = v;
		e->capvips = cap;
	}
	struct vip_table *s = vip_slot(e->vips, e->capvips, ip, port);
	if (!s->used) {
		*s = (struct vip_table){.ip = ip, .port = port, .used = true};
		e->nvips++;
	}
	return s;
}

static void take_table(struct engine *e, struct vip_table *v, const struct kl7_decision *d)
{
	struct kr_table *t = NULL;

	if (d->table_len && !(t = kr_table_new(d->table, d->table_len)))
		return; /* malformed (cannot happen): asked again next time */
	kr_table_free(v->t);
	v->t = t;
	v->gen = d->table_gen;
	e->stats.tables++;
}

static bool decide(struct engine *e, struct conn *c, const char *head)
{
	struct kl7_request rq = {
		.head = head, .head_len = c->head_len, .vip_ip = c->vip_ip, .peer_ip = c->peer_ip,
		.vip_port = c->vip_port, .peer_port = c->peer_port, .netns = c->netns, .first = c->first,
		.gen = __atomic_load_n(&e->gen, __ATOMIC_ACQUIRE),
	};
	struct kl7_decision d;
	struct vip_table *v = vip_table(e, c->vip_ip, c->vip_port);

	if (v && v->gen == rq.gen && kr_decide(v->t, head, c->head_len, &e->rng, e->scratch, e->cfg.head_limit, &d)) {
		e->stats.decided++;
	} else {
		memset(&d, 0, sizeof(d));
		rq.want_table = v && v->gen != rq.gen;
		if (e->cfg.decide(&rq, &d) != 0)
			d.kind = KL7_HANDOFF;
		else if (rq.want_table && d.table_given)
			take_table(e, v, &d);
	}
	switch (d.kind) {
	case KL7_ANSWER:
		if (c->first ? consume_first(c) : (buf_drop(&c->in, c->head_len), 0)) {
			conn_close(e, c);
			return false;
		}
		answer(e, c, d.data, d.data_len, d.status, d.keep);
		return true;
	case KL7_FORWARD:
		if (d.n_eps == 0 || d.n_eps > KL7_MAX_EPS)
			break;
		free((void *)c->fwd_head);
		c->fwd_head = NULL;
		c->fwd_head_len = 0;
		if (d.data || c->first) {
			/* the decided head, or the peeked one (the peek buffer is shared) */
			const char *src = d.data ? d.data : head;
			uint32_t n = d.data ? d.data_len : c->head_len;
			char *h = malloc(n ? n : 1);
			if (!h)
				break;
			memcpy(h, src, n);
			c->fwd_head = h;
			c->fwd_head_len = n;
		}
		memcpy(c->eps, d.eps, sizeof(c->eps));
		c->n_eps = d.n_eps;
		c->next_ep = 0;
		c->keep = d.keep;
		c->req_keep = d.req_keep;
		c->timeout_ms = d.timeout_ms;
		c->connect_timeout_ms = d.connect_timeout_ms ? d.connect_timeout_ms : 5000;
		c->deadline = d.timeout_ms ? now_ms() + d.timeout_ms : 0;
		c->head_request = d.head_request;
		body_init(&c->req, d.body == KL7_BODY_LENGTH ? B_LENGTH : d.body == KL7_BODY_CHUNKED ? B_CHUNKED : B_NONE,
			  d.body_len);
		c->up = -1;
		c->st = S_CONNECT;
		waiting_unlink(e, c);
		set_timer(e, c, 0);
		return true;
	case KL7_CLOSE: /* no L7 listener there (any more) */
		e->stats.no_destination++;
		conn_close(e, c);
		return false;
	}
	conn_handoff(e, c, KL7_R_DECIDE);
	return false;
}

static bool step_head(struct engine *e, struct conn *c)
{
	if (e->stopping) {
		/* Idle (nothing read of the next request): the next daemon's. */
		if (c->first || !buf_avail(&c->in))
			conn_handoff(e, c, KL7_R_PARK);
		else
			conn_close(e, c);
		return false;
	}
	if (c->first) {
		if (!c->rd)
			return false;
		ssize_t n = recv(c->fd, e->peek, e->cfg.head_limit, MSG_PEEK);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
				c->rd = false;
				return false;
			}
			conn_close(e, c);
			return false;
		}
		if (n == 0) {
			conn_close(e, c); /* closed before a request */
			return false;
		}
		const char *end = find_end(e->peek, n);
		if (!end) {
			if ((size_t)n >= e->cfg.head_limit) {
				answer_fixed(e, c, KL7_A_TOO_LARGE, 431, false);
				c->first = false; /* nothing to read out: closed after the answer */
				return true;
			}
			if (c->hup) { /* it can never complete */
				conn_close(e, c);
				return false;
			}
			c->rd = false; /* a peek sees the same bytes until more come (a new edge) */
			return false;
		}
		c->head_len = end - e->peek;
		return decide(e, c, e->peek);
	}
	for (;;) {
		const char *start = c->in.p + c->in.off;
		const char *end = buf_avail(&c->in) ? find_end(start, buf_avail(&c->in)) : NULL;
		if (end) {
			c->head_len = end - start;
			return decide(e, c, start);
		}
		if (buf_avail(&c->in) > e->cfg.head_limit) {
			e->stats.bad_requests++;
			answer_fixed(e, c, KL7_A_BAD, 400, false);
			return true;
		}
		if (!c->rd)
			return false;
		ssize_t r = read_into(c->fd, &c->in, &c->rd);
		if (r == 0) {
			if (buf_avail(&c->in)) { /* the stream ended inside a head */
				e->stats.bad_requests++;
				answer_fixed(e, c, KL7_A_BAD, 400, false);
				return true;
			}
			conn_close(e, c);
			return false;
		}
		if (r == -2) {
			conn_close(e, c);
			return false;
		}
		if (r == -1)
			return false;
	}
}

static int pool_find(struct conn *c, struct kl7_ep ep)
{
	for (int i = 0; i < POOL; i++)
		if (c->pool[i].fd >= 0 && c->pool[i].ep.ip == ep.ip && c->pool[i].ep.port == ep.port)
			return i;
	return -1;
}

static int pool_slot(struct engine *e, struct conn *c)
{
	for (int i = 0; i < POOL; i++)
		if (c->pool[i].fd < 0)
			return i;
	/* all taken (by idle ones: none is in an exchange now): one goes, in turn */
	int i = c->evict;
	c->evict = (c->evict + 1) % POOL;
	pool_close(e, &c->pool[i], false);
	return i;
}

/* A socket in the client's namespace (the backend sees the workload's address). */
static int upstream_socket(struct engine *e, struct conn *c)
{
	int fd;

	if (c->nsfd >= 0 && setns(c->nsfd, CLONE_NEWNET) != 0)
		return -1;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->nsfd >= 0 && setns(e->own_ns, CLONE_NEWNET) != 0) {
		/* cannot get back: this thread would make every later socket there */
		abort();
	}
	if (fd >= 0) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
	return fd;
}

static bool start_exchange(struct engine *e, struct conn *c);

static bool connect_failed(struct engine *e, struct conn *c)
{
	e->stats.connect_failures++;
	pool_close(e, &c->pool[c->up], false);
	c->up = -1;
	return true;
}

static bool step_connect(struct engine *e, struct conn *c)
{
	if (c->up >= 0) {
		struct upstream *u = &c->pool[c->up];
		if (!u->wr && !u->eof)
			return false;
		int err = 0;
		socklen_t len = sizeof(err);
		if (getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err)
			return connect_failed(e, c);
		return start_exchange(e, c);
	}
	if (c->next_ep >= c->n_eps) {
		/* Python retries as the route says (its retry policy, back-off, outlier counts) */
		set_timer(e, c, 0);
		conn_handoff(e, c, KL7_R_CONNECT_FAILED);
		return false;
	}
	struct kl7_ep ep = c->eps[c->next_ep++];
	int slot = pool_find(c, ep);
	if (slot >= 0 && !c->pool[slot].eof && !c->fresh) {
		c->up = slot;
		return start_exchange(e, c);
	}
	if (slot >= 0)
		pool_close(e, &c->pool[slot], false);
	slot = pool_slot(e, c);
	struct upstream *u = &c->pool[slot];
	int sfd = c->fresh ? -1 : spare_take(e, c->netns, ep);
	if (sfd >= 0) {
		struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
					 .data.u64 = tag(TAG_CONN, c->idx, c->gen, slot + 1)};
		*u = (struct upstream){.fd = sfd, .ep = ep, .reused = true};
		if (epoll_ctl(e->ep, EPOLL_CTL_MOD, sfd, &ev) == 0) {
			e->stats.pooled++;
			c->up = slot;
			return start_exchange(e, c);
		}
		pool_close(e, u, false);
	}
	c->fresh = false;
	int fd = upstream_socket(e, c);
	if (fd < 0) {
		e->stats.connect_failures++;
		return true;
	}
	memset(u, 0, sizeof(*u));
	u->fd = fd;
	u->ep = ep;
	e->stats.upstreams++;
	c->up = slot;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
				 .data.u64 = tag(TAG_CONN, c->idx, c->gen, slot + 1)};
	if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) != 0)
		return connect_failed(e, c);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(ep.port), .sin_addr.s_addr = ep.ip};
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
		u->wr = true;
		return start_exchange(e, c);
	}
	if (errno != EINPROGRESS)
		return connect_failed(e, c);
	set_timer(e, c, c->connect_timeout_ms);
	return false;
}

static bool start_exchange(struct engine *e, struct conn *c)
{
	struct upstream *u = &c->pool[c->up];
	bool replaying = c->replay != NULL;
	const char *h = c->fwd_head;
	uint32_t hl = c->fwd_head_len;
	int ok = 1;

	if (replaying) {
		h = c->replay;
		hl = c->replay_len;
	} else if (c->first) {
		ok = consume_first(c) == 0;
	} else if (!h) {
		h = c->in.p + c->in.off;
		hl = c->head_len;
	}
	ok = ok && buf_put(&c->uout, h, hl) == 0;
	if (ok && !replaying && u->reused && c->req.kind == B_NONE) {
		/* a reused connection may have been closed by now: keep the head
		 * to send again over a new one (replay_elsewhere) */
		ok = (c->replay = malloc(hl ? hl : 1)) != NULL;
		if (ok) {
			memcpy(c->replay, h, hl);
			c->replay_len = hl;
		}
	}
	if (!replaying && !c->first)
		buf_drop(&c->in, c->head_len);
	if (!ok) {
		conn_close(e, c);
		return false;
	}
	c->first = false;
	u->wr = true; /* connected (or idle): try writing at once */
	body_init(&c->resp, B_NONE, 0);
	c->resp.done = false;
	c->resp_head_seen = false;
	c->st = S_EXCHANGE;
	if (!replaying)
		e->stats.routed++;
	uint64_t now = now_ms();
	if (c->deadline && c->deadline <= now) {
		c->deadline = now + 1;
	}
	set_timer(e, c, c->deadline ? (uint32_t)(c->deadline - now) : 0);
	return true;
}

/* The upstream's answer ends the exchange early: close both (Python's
 * "except (OSError, FramingError): close"). */
static bool exchange_broken(struct engine *e, struct conn *c)
{
	pool_close(e, &c->pool[c->up], true);
	conn_close(e, c);
	return false;
}

/* A reused upstream connection failed before any of its response: the
 * upstream had closed it while idle. The request (its head only: c->replay)
 * goes again over a new connection to the same endpoint. */
static bool replay_elsewhere(struct engine *e, struct conn *c)
{
	pool_close(e, &c->pool[c->up], true);
	c->up = -1;
	buf_drop(&c->uout, buf_avail(&c->uout));
	c->next_ep--;
	c->fresh = true;
	c->st = S_CONNECT;
	e->stats.replayed++;
	return true;
}

/* Nothing of the response came yet and the request can go again. */
static bool may_replay(const struct conn *c)
{
	return c->replay && !c->resp_head_seen && !buf_avail(&c->pool[c->up].in);
}

/* The response body, spliced: pipe_body applies (the head is out, nothing
 * of the body is buffered, and enough of it is left to be worth a pipe). */
static bool pipe_wanted(const struct conn *c, const struct upstream *u)
{
	if (c->piped)
		return true;
	if (c->no_pipe || !c->resp_head_seen || c->resp.done || buf_avail(&u->in) || buf_avail(&c->out))
		return false;
	return c->resp.kind == B_CLOSE || (c->resp.kind == B_LENGTH && c->resp.rem >= PIPE_MIN);
}

/* Carry the response body upstream -> pipe -> client with splice(2) until
 * it is done, or one side must wait: 0 go on (done, or waiting for an
 * event), -1 the exchange is broken. Only an empty pipe is filled, so EAGAIN
 * from the upstream means no data. */
static int pipe_body(struct engine *e, struct conn *c, struct upstream *u)
{
	if (!c->has_pipe) {
		if (pipe2(c->pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
			c->no_pipe = true;
			return 0;
		}
		c->has_pipe = true;
		fcntl(c->pipe[1], F_SETPIPE_SZ, PIPE_SIZE); /* refused past pipe-max-size: 64 KiB it is */
	}
	for (;;) {
		while (c->piped && c->wr) {
			ssize_t n = splice(c->pipe[0], NULL, c->fd, NULL, c->piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
			if (n > 0) {
				c->piped -= n;
				e->stats.spliced += n;
			} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
				c->wr = false;
			} else if (!(n < 0 && errno == EINTR)) {
				return -1;
			}
		}
		if (c->piped || c->resp.done || !u->rd)
			return 0;
		size_t want = c->resp.kind == B_LENGTH && c->resp.rem < PIPE_SIZE ? c->resp.rem : PIPE_SIZE;
		ssize_t n = splice(u->fd, NULL, c->pipe[1], NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (n > 0) {
			c->piped += n;
			if (c->resp.kind == B_LENGTH && (c->resp.rem -= n) == 0)
				c->resp.done = true;
		} else if (n == 0) {
			u->eof = true;
			if (c->resp.kind != B_CLOSE)
				return -1; /* ended inside the body */
			c->resp.done = true;
		} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
			u->rd = false;
		} else if (errno != EINTR) {
			return -1;
		}
	}
}

static bool step_exchange(struct engine *e, struct conn *c)
{
	struct upstream *u = &c->pool[c->up];

	/* the request: head (in uout) and body, client -> upstream; what is
	 * there is framed first and then sent in one write */
	for (;;) {
		if (!c->req.done && buf_avail(&c->uout) < OUT_HIGH && buf_avail(&c->in)) {
			ssize_t k = body_take(&c->req, c->in.p + c->in.off, buf_avail(&c->in));
			if (k < 0 || buf_put(&c->uout, c->in.p + c->in.off, k))
				return exchange_broken(e, c);
			buf_drop(&c->in, k);
		}
		if (flush(u->fd, &c->uout, &u->wr) < 0)
			return may_replay(c) ? replay_elsewhere(e, c) : exchange_broken(e, c);
		if (c->req.done || buf_avail(&c->uout) >= OUT_HIGH)
			break;
		if (buf_avail(&c->in))
			continue;
		if (c->eof)
			return exchange_broken(e, c); /* the client ended inside its body */
		if (!c->rd)
			break;
		ssize_t r = read_into(c->fd, &c->in, &c->rd);
		if (r == 0)
			c->eof = true;
		else if (r == -2)
			return exchange_broken(e, c);
		else if (r == -1)
			break;
	}
	/* the response, upstream -> client: likewise framed, then sent */
	for (;;) {
		if (pipe_wanted(c, u)) {
			if (pipe_body(e, c, u) < 0)
				return exchange_broken(e, c);
			if (c->piped || (!c->resp.done && !c->no_pipe))
				break;
		}
		size_t avail = buf_avail(&u->in);
		bool room = !(c->resp_head_seen && c->resp.done) && buf_avail(&c->out) < OUT_HIGH;
		if (room && !c->resp_head_seen && avail) {
			const char *start = u->in.p + u->in.off, *end = find_end(start, avail);
			if (end) {
				struct resp_head r;
				size_t hl = end - start;
				if (parse_response(start, hl, c->head_request, &r) != 0 || r.status == 101)
					return exchange_broken(e, c);
				if (r.status >= 100 && r.status < 200) { /* an interim answer: not passed on */
					buf_drop(&u->in, hl);
					continue;
				}
				/* a client that asked to close is told so (as Envoy does;
				 * its Connection line did not go up: kr_decide) */
				bool tell = !c->req_keep && r.keep;
				if (tell ? buf_put(&c->out, start, hl - 2) || buf_put(&c->out, CLOSE_LINE, sizeof(CLOSE_LINE) - 1)
					 : buf_put(&c->out, start, hl))
					return exchange_broken(e, c);
				buf_drop(&u->in, hl);
				c->resp_head_seen = true;
				c->resp_keep = r.keep;
				body_init(&c->resp, r.framing, r.length);
				set_timer(e, c, 0);
				continue;
			}
			if (avail > e->cfg.head_limit)
				return exchange_broken(e, c);
		} else if (room && c->resp_head_seen && avail) {
			ssize_t k = body_take(&c->resp, u->in.p + u->in.off, avail);
			if (k < 0 || buf_put(&c->out, u->in.p + u->in.off, k))
				return exchange_broken(e, c);
			buf_drop(&u->in, k);
			if (k > 0)
				continue;
		}
		if (flush(c->fd, &c->out, &c->wr) < 0)
			return exchange_broken(e, c);
		if ((c->resp_head_seen && c->resp.done) || buf_avail(&c->out) >= OUT_HIGH)
			break;
		if (u->eof) {
			if (c->resp_head_seen) {
				if (c->resp.kind != B_CLOSE)
					return exchange_broken(e, c); /* ended inside the body */
				c->resp.done = true;
				continue;
			}
			if (avail) /* ended inside a head */
				return exchange_broken(e, c);
			if (may_replay(c))
				return replay_elsewhere(e, c);
			/* closed before a response: 503 */
			e->stats.upstream_failures++;
			pool_close(e, u, false);
			c->up = -1;
			answer_fixed(e, c, KL7_A_RESET, 503, c->keep && c->req.done);
			return true;
		}
		if (!u->rd)
			break;
		if (pipe_wanted(c, u))
			continue; /* all buffered bytes are out: the rest of the body is spliced */
		ssize_t r = read_into(u->fd, &u->in, &u->rd);
		if (r == 0)
			u->eof = true;
		else if (r == -2)
			return may_replay(c) ? replay_elsewhere(e, c) : exchange_broken(e, c); /* a reset: both go */
		else if (r == -1)
			break;
	}
	if (!(c->resp_head_seen && c->resp.done && c->req.done) || buf_avail(&c->out) || buf_avail(&c->uout) || c->piped)
		return false;
	/* the exchange is over */
	bool up_keep = c->resp_keep && c->resp.kind != B_CLOSE && !u->eof;
	if (!up_keep) {
		pool_close(e, u, false);
		conn_close(e, c);
		return false;
	}
	c->up = -1;
	u->reused = true;
	free(c->replay);
	c->replay = NULL;
	if (!c->req_keep) {
		conn_close(e, c); /* its upstream connections become spares */
		return false;
	}
	buf_trim(&u->in);
	to_head(e, c);
	return true;
}

static bool step_answer(struct engine *e, struct conn *c)
{
	if (flush(c->fd, &c->out, &c->wr) < 0) {
		conn_close(e, c);
		return false;
	}
	if (buf_avail(&c->out))
		return false;
	if (!c->answer_keep) {
		conn_close(e, c);
		return false;
	}
	to_head(e, c);
	return true;
}

static void drive(struct engine *e, struct conn *c)
{
	uint32_t gen = c->gen;

	for (int i = 0; i < 64 && c->used && c->gen == gen; i++) {
		bool more = false;
		switch (c->st) {
		case S_HEAD:
			more = step_head(e, c);
			break;
		case S_CONNECT:
			more = step_connect(e, c);
			break;
		case S_EXCHANGE:
			more = step_exchange(e, c);
			break;
		case S_ANSWER:
			more = step_answer(e, c);
			break;
		}
		if (!more)
			break;
	}
}

static void on_timeout(struct engine *e, struct conn *c)
{
	switch (c->st) {
	case S_HEAD:
		e->stats.head_timeouts++;
		conn_close(e, c);
		break;
	case S_CONNECT:
		connect_failed(e, c);
		drive(e, c);
		break;
	case S_EXCHANGE:
		if (c->resp_head_seen)
			break;
		/* no response head in time: the upstream sees the request cancelled */
		e->stats.timeouts++;
		pool_close(e, &c->pool[c->up], true);
		c->up = -1;
		answer_fixed(e, c, KL7_A_TIMEOUT, 504, c->keep && c->req.done);
		drive(e, c);
		break;
	default:
		break;
	}
}

/* -- the orig_dst lookup -------------------------------------------------------------- */
#include <linux/types.h>
#include "kmesh_records.h"

static int lookup_vip(struct engine *e, uint64_t netns, uint32_t ip, uint16_t port_net, uint32_t *vip_ip,
		      uint16_t *vip_port)
{
	/* Addresses are 16 bytes in the maps, IPv4 mapped (kmesh_records.h). */
	struct kmesh_handoff_key key = {.netns = (__u32)netns,
					.addr = {.ip6 = {0, 0, htonl(0xffff), ip}, .port = port_net}};
	struct kmesh_addr val;
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = e->cfg.orig_dst_fd;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&val;
	if (syscall(__NR_bpf, BPF_MAP_LOOKUP_ELEM, &attr, sizeof(attr)) != 0)
		return -1;
	/* The engine serves IPv4 VIPs; an IPv6 one goes to Python, untouched. */
	if (val.ip6[0] || val.ip6[1] || val.ip6[2] != htonl(0xffff))
		return 1;
	*vip_ip = val.ip6[3];
	*vip_port = ntohs(val.port);
	return 0;
}

static void on_listener(struct engine *e, uint32_t idx, uint32_t gen)
{
	pthread_mutex_lock(&e->mu); /* a listener Python removes is not closed under us */
	struct listener *l = &e->ls[idx];
	for (int k = 0; k < 64 && l->fd >= 0 && l->gen == gen && !e->stopping; k++) {
		struct sockaddr_in sa;
		socklen_t sl = sizeof(sa);
		int fd = accept4(l->fd, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE)
				e->stats.refused++;
			break;
		}
		if (fd >= e->cfg.fd_ceiling) {
			/* nearly out of descriptors: refuse (RST) rather than leave the admin API none */
			e->stats.refused++;
			close_reset(fd);
			continue;
		}
		e->stats.accepted++;
		uint32_t vip_ip = 0;
		uint16_t vip_port = 0;
		int found = sa.sin_family == AF_INET ?
			    lookup_vip(e, l->netns, sa.sin_addr.s_addr, sa.sin_port, &vip_ip, &vip_port) : -1;
		if (found < 0) {
			e->stats.no_destination++;
			close(fd);
			continue;
		}
		struct conn *c = conn_new(e);
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->first = true;
		c->rd = c->wr = true;
		c->vip_ip = vip_ip;
		c->vip_port = vip_port;
		c->peer_ip = sa.sin_addr.s_addr;
		c->peer_port = ntohs(sa.sin_port);
		c->netns = l->netns;
		c->nsfd = l->nsfd;
		if (found > 0) {
			/* an IPv6 VIP: Python looks its destination up and serves it */
			pthread_mutex_unlock(&e->mu);
			conn_handoff(e, c, KL7_R_DECIDE);
			pthread_mutex_lock(&e->mu);
			continue;
		}
		struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
					 .data.u64 = tag(TAG_CONN, c->idx, c->gen, 0)};
		if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
			conn_close(e, c);
			continue;
		}
		c->st = S_HEAD;
		waiting_add(e, c);
		if (!c->used)
			continue;
		set_timer(e, c, e->cfg.head_timeout_ms);
		pthread_mutex_unlock(&e->mu);
		drive(e, c);
		pthread_mutex_lock(&e->mu);
	}
	pthread_mutex_unlock(&e->mu);
}

static void on_conn(struct engine *e, uint64_t t, uint32_t events)
{
	uint32_t idx = (t >> 8) & 0xffffff, gen = t >> 32, side = (t >> 2) & 63;

	if (idx >= e->nconns)
		return;
	struct conn *c = e->conns[idx];
	if (!c->used || c->gen != gen)
		return;
	bool in = events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP);
	bool out = events & (EPOLLOUT | EPOLLHUP | EPOLLERR);
	bool gone = events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP);
	if (side == 0) {
		c->rd |= in;
		c->wr |= out;
		if (gone)
			c->hup = true; /* a peek cannot tell: remember it */
	} else {
		struct upstream *u = &c->pool[side - 1];
		if (u->fd < 0)
			return;
		u->rd |= in;
		u->wr |= out;
		if (gone && (int)side - 1 != c->up) { /* an idle upstream went away */
			pool_close(e, u, false);
			return;
		}
		if (gone && c->st == S_CONNECT)
			u->eof = true;
	}
	drive(e, c);
}

static void run_timers(struct engine *e)
{
	uint64_t now = now_ms();

	while (e->nheap && e->heap[0].at <= now) {
		struct timer t = e->heap[0];
		heap_pop(e);
		if (t.idx >= e->nconns)
			continue;
		struct conn *c = e->conns[t.idx];
		if (!c->used || c->gen != t.gen || c->heap_at != t.at)
			continue; /* closed, or an entry a sooner deadline replaced */
		c->heap_at = 0;
		if (!c->timer_at)
			continue;
		if (c->timer_at > now) { /* re-armed later since: due then */
			heap_push(e, c->timer_at, c->idx, c->gen);
			c->heap_at = c->timer_at;
			continue;
		}
		c->timer_at = 0;
		on_timeout(e, c);
	}
}

/* At stop: idle connections are handed back to be parked; the others may
 * finish their exchange until the drain deadline, then are closed. */
static bool stop_step(struct engine *e)
{
	uint32_t busy = 0;

	for (uint32_t i = 0; i < e->nconns; i++) {
		struct conn *c = e->conns[i];
		if (!c->used)
			continue;
		if (c->st == S_HEAD)
			step_head(e, c);
		else
			busy++;
	}
	if (busy && now_ms() < e->stop_deadline)
		return false;
	for (uint32_t i = 0; i < e->nconns; i++)
		if (e->conns[i]->used)
			conn_close(e, e->conns[i]);
	spares_close_all(e);
	return true;
}

static void *run(void *arg)
{
	struct engine *e = arg;
	struct epoll_event evs[EVENTS];

	for (;;) {
		int timeout = -1;
		if (e->nheap) {
			uint64_t now = now_ms();
			timeout = e->heap[0].at > now ? (int)(e->heap[0].at - now) : 0;
		}
		if (e->stopping && (timeout < 0 || timeout > 20))
			timeout = 20;
		if (e->nspares && (timeout < 0 || timeout > 1000))
			timeout = 1000;
		int n = epoll_wait(e->ep, evs, EVENTS, timeout);
		for (int i = 0; i < n; i++) {
			uint64_t t = evs[i].data.u64;
			switch (t & 3) {
			case TAG_WAKE: {
				uint64_t v;
				if (read(e->wake, &v, sizeof(v)) < 0) {
					/* EAGAIN: another wake-up read it */
				}
				break;
			}
			case TAG_LISTENER:
				on_listener(e, (t >> 8) & 0xffffff, t >> 32);
				break;
			case TAG_SPARE:
				on_spare(e, (t >> 8) & 0xffffff, t >> 32);
				break;
			default:
				on_conn(e, t, evs[i].events);
			}
		}
		run_timers(e);
		if (__atomic_exchange_n(&e->sweep_now, 0, __ATOMIC_ACQ_REL) || (e->nspares && now_ms() - e->last_sweep >= 1000))
			sweep_spares(e);
		if (e->stopping && stop_step(e))
			break;
	}
	return NULL;
}

/* -- the API -------------------------------------------------------------------------- */
int kl7_abi(void) { return KL7_ABI; }

uint32_t kl7_sizeof(int which)
{
	switch (which) {
	case 0: return sizeof(struct kl7_request);
	case 1: return sizeof(struct kl7_decision);
	case 2: return sizeof(struct kl7_handoff);
	case 3: return sizeof(struct kl7_stats);
	case 4: return sizeof(struct kl7_config);
	}
	return 0;
}

void *kl7_new(const struct kl7_config *cfg)
{
	struct engine *e = calloc(1, sizeof(*e));

	if (!e)
		return NULL;
	e->cfg = *cfg;
	e->peek = malloc(cfg->head_limit);
	e->scratch = malloc(cfg->head_limit);
	if (!e->peek || !e->scratch) {
		free(e->peek);
		free(e->scratch);
		free(e);
		return NULL;
	}
	for (int i = 0; i < SPARES; i++)
		e->spares[i].fd = -1;
	for (int i = 0; i < KL7_A_N; i++)
		for (int k = 0; k < 2; k++) {
			e->fixed_len[i][k] = cfg->fixed_len[i][k];
			e->fixed[i][k] = malloc(cfg->fixed_len[i][k] + 1);
			if (e->fixed[i][k])
				memcpy(e->fixed[i][k], cfg->fixed[i][k], cfg->fixed_len[i][k]);
		}
	for (int i = 0; i < MAX_LISTENERS; i++)
		e->ls[i].fd = -1;
	e->gen = 1;
	e->rng = ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)e ^ now_ms() ^ 0x9e3779b97f4a7c15ull;
	pthread_mutex_init(&e->mu, NULL);
	pthread_cond_init(&e->cond, NULL);
	e->ep = epoll_create1(EPOLL_CLOEXEC);
	e->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	e->own_ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_WAKE};
	if (e->ep < 0 || e->wake < 0 || e->own_ns < 0 || epoll_ctl(e->ep, EPOLL_CTL_ADD, e->wake, &ev)) {
		if (e->ep >= 0)
			close(e->ep);
		if (e->wake >= 0)
			close(e->wake);
		if (e->own_ns >= 0)
			close(e->own_ns);
		for (int i = 0; i < KL7_A_N; i++)
			for (int k = 0; k < 2; k++)
				free(e->fixed[i][k]);
		free(e->peek);
		free(e->scratch);
		free(e);
		return NULL;
	}
	return e;
}

/* Serve the listening socket fd (of the namespace netns; nsfd: open on it,
 * -1 for the daemon's own). The caller keeps both open until removed. */
int kl7_add_listener(struct engine *e, int fd, uint64_t netns, int nsfd)
{
	int ret = -1;

	pthread_mutex_lock(&e->mu);
	for (int i = 0; i < MAX_LISTENERS; i++) {
		if (e->ls[i].fd >= 0)
			continue;
		struct listener *l = &e->ls[i];
		l->gen++;
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(TAG_LISTENER, i, l->gen, 0)};
		if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) == 0) {
			l->fd = fd;
			l->netns = netns;
			l->nsfd = nsfd;
			ret = i;
		}
		break;
	}
	pthread_mutex_unlock(&e->mu);
	return ret;
}

/* Stop serving fd; once this returns the engine no longer touches it (the
 * caller may close it; connections accepted from it go on). */
int kl7_remove_listener(struct engine *e, int fd)
{
	int ret = -1;

	pthread_mutex_lock(&e->mu);
	for (int i = 0; i < MAX_LISTENERS; i++) {
		if (e->ls[i].fd != fd)
			continue;
		epoll_ctl(e->ep, EPOLL_CTL_DEL, fd, NULL);
		e->ls[i].fd = -1;
		ret = 0;
		break;
	}
	pthread_mutex_unlock(&e->mu);
	if (ret == 0) { /* its namespace's spares go (sweep_spares) */
		uint64_t one = 1;
		__atomic_store_n(&e->sweep_now, 1, __ATOMIC_RELEASE);
		if (write(e->wake, &one, sizeof(one)) < 0) {
			/* the counter cannot overflow in practice */
		}
	}
	return ret;
}

/* The engine's loop, in the calling thread until kl7_stop(). The daemon
 * runs it in a thread of its own making (a Python thread: the decide
 * callback then finds the thread's interpreter state instead of making one
 * per call). */
void kl7_run(struct engine *e)
{
	pthread_setname_np(pthread_self(), "kmesh-l7");
	pthread_mutex_lock(&e->mu);
	e->running = true;
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->mu);
	run(e);
	pthread_mutex_lock(&e->mu);
	e->running = false;
	e->done = true;
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->mu);
}

/* Stop: idle connections come back (reason PARK), exchanges in flight may
 * finish within drain_ms; returns once the engine's thread has ended. */
void kl7_stop(struct engine *e)
{
	pthread_mutex_lock(&e->mu);
	if (!e->stopping) {
		e->stopping = true;
		e->stop_deadline = now_ms() + e->cfg.drain_ms;
	}
	uint64_t one = 1;
	if (write(e->wake, &one, sizeof(one)) < 0) {
		/* the loop wakes every 20 ms while stopping anyway */
	}
	while (e->running && !e->done)
		pthread_cond_wait(&e->cond, &e->mu);
	pthread_mutex_unlock(&e->mu);
}

/* Up to max connections handed back, oldest first; how many. */
int kl7_take(struct engine *e, struct kl7_handoff *out, int max)
{
	int n = 0;

	pthread_mutex_lock(&e->mu);
	while (n < max && (uint32_t)n < e->nhq) {
		out[n] = e->hq[n];
		n++;
	}
	memmove(e->hq, e->hq + n, (e->nhq - n) * sizeof(*e->hq));
	e->nhq -= n;
	pthread_mutex_unlock(&e->mu);
	return n;
}

void kl7_free_buf(char *p) { free(p); }

/* The config changed: every VIP's table is stale from now on (asked again
 * with its next request). Any thread. */
void kl7_invalidate(struct engine *e) { __atomic_add_fetch(&e->gen, 1, __ATOMIC_RELEASE); }

void kl7_stats(struct engine *e, struct kl7_stats *out)
{
	*out = e->stats;
	out->waiting = e->nwaiting;
	out->spares = e->nspares;
}

/* After kl7_stop: close what is left and free the engine. */
void kl7_free(struct engine *e)
{
	if (!e)
		return;
	kl7_stop(e);
	for (uint32_t i = 0; i < e->nconns; i++) {
		if (e->conns[i]->used)
			conn_close(e, e->conns[i]);
		free(e->conns[i]);
	}
	for (uint32_t i = 0; i < e->nhq; i++) {
		close(e->hq[i].fd);
		free(e->hq[i].buf);
	}
	for (int i = 0; i < KL7_A_N; i++)
		for (int k = 0; k < 2; k++)
			free(e->fixed[i][k]);
	for (uint32_t i = 0; i < e->capvips; i++)
		kr_table_free(e->vips[i].t);
	free(e->vips);
	free(e->hq);
	free(e->conns);
	free(e->free_idx);
	free(e->heap);
	free(e->peek);
	free(e->scratch);
	spares_close_all(e);
	close(e->ep);
	close(e->wake);
	close(e->own_ns);
	pthread_mutex_destroy(&e->mu);
	pthread_cond_destroy(&e->cond);
	free(e);
}

/* -- for the unit tests (tests/unit/test_l7_engine.py) --------------------------------- */
/* How many of the n bytes at p belong to a body of this framing, fed in
 * pieces of `step` bytes (0: at once): -1 when they break it; *done once
 * it has ended. */
ssize_t kl7_test_body(int kind, uint64_t len, const char *p, size_t n, size_t step, int *done)
{
	struct body b;
	size_t used = 0;

	body_init(&b, kind, len);
	while (used < n && !b.done) {
		size_t piece = step && step < n - used ? step : n - used;
		ssize_t k = body_take(&b, p + used, piece);
		if (k < 0)
			return -1;
		used += k;
		if ((size_t)k < piece && !b.done)
			return -1; /* a piece not taken whole before the end: cannot happen */
	}
	*done = b.done;
	return used;
}

/* kr_decide with the table [t, t+tn) on the head [h, h+hn) (a rewritten
 * head into out, cap bytes): 1 decided (*d), 0 left to Python, -1 a table
 * kr_table_new refuses. */
int kl7_test_decide(const char *t, size_t tn, const char *h, size_t hn, uint64_t *rng, struct kl7_decision *d,
		    char *out, size_t cap)
{
	struct kr_table *tab = kr_table_new(t, tn);

	if (!tab)
		return -1;
	int got = kr_decide(tab, h, hn, rng, out, cap, d);
	kr_table_free(tab);
	return got;
}

/* kl7_test_decide with one table kept across calls (its round-robin
 * cursors with it) until a call with t NULL frees it. */
int kl7_test_decide_many(const char *t, size_t tn, const char *h, size_t hn, uint64_t *rng, struct kl7_decision *d)
{
	static struct kr_table *kept;

	if (!t) {
		kr_table_free(kept);
		kept = NULL;
		return 0;
	}
	if (!kept && !(kept = kr_table_new(t, tn)))
		return -1;
	return kr_decide(kept, h, hn, rng, NULL, 0, d);
}

/* A response head as the engine reads it: 0, or -1 when it is no valid head. */
int kl7_test_response(const char *p, size_t n, int head_request, int *status, int *keep, int *framing,
		      uint64_t *length)
{
	struct resp_head r;

	if (parse_response(p, n, head_request, &r) != 0)
		return -1;
	*status = r.status;
	*keep = r.keep;
	*framing = r.framing;
	*length = r.length;
	return 0;
}
