// SPDX-License-Identifier: Apache-2.0
/*
 * Route decisions in C (l7route.h): the table's reader, a strict reader of
 * request heads, and the match, each a copy of kmesh.config.http (match.py,
 * routes.py) for the cases it takes. tests/unit/test_l7_fastpath.py checks
 * every decision against the Python side's on generated tables and heads.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http_tokens.h"
#include "l7route.h"

struct kr_str {
	const char *p;
	uint32_t n;
};

struct kr_ep {
	uint32_t ip, port, weight;
};

struct kr_cluster {
	uint8_t lb;
	uint32_t connect_timeout_ms, n_eps;
	uint64_t total;   /* of the weights */
	uint64_t cursor;  /* round robin: the next slot */
	struct kr_ep *eps;
};

struct kr_cond {
	uint8_t kind, ignore_case, present, invert, missing_as_empty;
	struct kr_str name, value;
};

struct kr_pick {
	uint32_t cluster, weight;
};

struct kr_route {
	uint8_t path_kind, ignore_case, action;
	struct kr_str path;
	uint32_t n_conds;
	struct kr_cond *conds;
	uint32_t timeout_ms, n_picks;
	uint64_t total;
	struct kr_pick *picks;
};

struct kr_vhost {
	uint8_t python;
	uint32_t n_routes;
	struct kr_route *routes;
};

struct kr_host {
	uint8_t kind;
	struct kr_str domain;
	uint32_t vhost;
};

struct kr_table {
	char *blob; /* the strings point into it */
	uint32_t flags, n_clusters, n_hosts, n_vhosts;
	uint32_t n_exact; /* hosts[0, n_exact): the exact domains, in byte order */
	int32_t dflt;
	struct kr_cluster *clusters;
	struct kr_host *hosts;
	struct kr_vhost *vhosts;
};

/* memcmp order, a prefix first (Python's order of bytes) */
static int str_cmp(struct kr_str a, struct kr_str b)
{
	int r = memcmp(a.p, b.p, a.n < b.n ? a.n : b.n);
	return r ? r : (a.n > b.n) - (a.n < b.n);
}

/* -- reading the table ------------------------------------------------------------ */
struct rd {
	const char *p;
	size_t off, n;
	bool bad;
};

static const void *take(struct rd *r, size_t k)
{
	if (r->bad || r->n - r->off < k) {
		r->bad = true;
		return NULL;
	}
	const void *at = r->p + r->off;
	r->off += k;
	return at;
}

static uint8_t rd_u8(struct rd *r)
{
	const uint8_t *v = take(r, 1);
	return v ? *v : 0;
}

static uint32_t rd_u32(struct rd *r)
{
	uint32_t v = 0;
	const void *at = take(r, 4);
	if (at)
		memcpy(&v, at, 4);
	return v;
}

static struct kr_str rd_str(struct rd *r)
{
	struct kr_str s = {.n = rd_u32(r)};
	s.p = take(r, s.n);
	if (!s.p)
		s.n = 0;
	return s;
}

/* calloc of n items, refusing counts the rest of the table cannot hold */
static void *rd_array(struct rd *r, uint32_t n, size_t size, size_t min_bytes)
{
	if (r->bad || (uint64_t)n * min_bytes > r->n - r->off) {
		r->bad = true;
		return NULL;
	}
	void *a = calloc(n ? n : 1, size);
	if (!a)
		r->bad = true;
	return a;
}

static void read_route(struct rd *r, struct kr_route *rt, uint32_t n_clusters)
{
	rt->path_kind = rd_u8(r);
	if (rt->path_kind == KR_P_PYTHON || rt->path_kind > KR_P_PYTHON) {
		r->bad |= rt->path_kind > KR_P_PYTHON;
		return;
	}
	rt->ignore_case = rd_u8(r);
	rt->path = rd_str(r);
	rt->n_conds = rd_u32(r);
	rt->conds = rd_array(r, rt->n_conds, sizeof(*rt->conds), 13);
	for (uint32_t i = 0; i < rt->n_conds && !r->bad; i++) {
		struct kr_cond *c = &rt->conds[i];
		c->kind = rd_u8(r);
		c->ignore_case = rd_u8(r);
		c->present = rd_u8(r);
		c->invert = rd_u8(r);
		c->missing_as_empty = rd_u8(r);
		c->name = rd_str(r);
		c->value = rd_str(r);
		r->bad |= c->kind > KR_C_PRESENCE;
	}
	rt->action = rd_u8(r);
	if (rt->action != KR_A_FORWARD) {
		r->bad |= rt->action != KR_A_PYTHON;
		return;
	}
	rt->timeout_ms = rd_u32(r);
	rt->n_picks = rd_u32(r);
	rt->picks = rd_array(r, rt->n_picks, sizeof(*rt->picks), 8);
	for (uint32_t i = 0; i < rt->n_picks && !r->bad; i++) {
		rt->picks[i].cluster = rd_u32(r);
		rt->picks[i].weight = rd_u32(r);
		rt->total += rt->picks[i].weight;
		r->bad |= rt->picks[i].cluster >= n_clusters;
	}
	r->bad |= rt->total == 0;
}

void kr_table_free(struct kr_table *t)
{
	if (!t)
		return;
	for (uint32_t i = 0; t->clusters && i < t->n_clusters; i++)
		free(t->clusters[i].eps);
	for (uint32_t i = 0; t->vhosts && i < t->n_vhosts; i++) {
		struct kr_vhost *v = &t->vhosts[i];
		for (uint32_t j = 0; v->routes && j < v->n_routes; j++) {
			free(v->routes[j].conds);
			free(v->routes[j].picks);
		}
		free(v->routes);
	}
	free(t->clusters);
	free(t->hosts);
	free(t->vhosts);
	free(t->blob);
	free(t);
}

struct kr_table *kr_table_new(const char *p, size_t n)
{
	struct kr_table *t = calloc(1, sizeof(*t));
	if (!t || !(t->blob = malloc(n ? n : 1))) {
		free(t);
		return NULL;
	}
	memcpy(t->blob, p, n);
	struct rd r = {.p = t->blob, .n = n};
	if (rd_u32(&r) != KR_MAGIC)
		goto bad;
	t->flags = rd_u32(&r);
	t->n_clusters = rd_u32(&r);
	t->n_hosts = rd_u32(&r);
	t->n_vhosts = rd_u32(&r);
	t->dflt = (int32_t)rd_u32(&r);
	t->clusters = rd_array(&r, t->n_clusters, sizeof(*t->clusters), 9);
	for (uint32_t i = 0; i < t->n_clusters && !r.bad; i++) {
		struct kr_cluster *c = &t->clusters[i];
		c->lb = rd_u8(&r);
		c->connect_timeout_ms = rd_u32(&r);
		c->n_eps = rd_u32(&r);
		c->eps = rd_array(&r, c->n_eps, sizeof(*c->eps), 12);
		for (uint32_t j = 0; j < c->n_eps && !r.bad; j++) {
			c->eps[j].ip = rd_u32(&r);
			c->eps[j].port = rd_u32(&r);
			c->eps[j].weight = rd_u32(&r);
			c->total += c->eps[j].weight;
			r.bad |= c->eps[j].weight == 0 || c->eps[j].port > 65535;
		}
		r.bad |= c->n_eps == 0 || c->lb > KR_LB_RANDOM;
	}
	t->hosts = rd_array(&r, t->n_hosts, sizeof(*t->hosts), 9);
	for (uint32_t i = 0; i < t->n_hosts && !r.bad; i++) {
		t->hosts[i].kind = rd_u8(&r);
		t->hosts[i].domain = rd_str(&r);
		t->hosts[i].vhost = rd_u32(&r);
		r.bad |= t->hosts[i].kind > KR_H_PREFIX || t->hosts[i].vhost >= t->n_vhosts;
		if (t->hosts[i].kind == KR_H_EXACT && !r.bad) {
			/* the exact ones first and sorted (find_vhost halves them) */
			r.bad |= t->n_exact != i ||
				 (i && str_cmp(t->hosts[i - 1].domain, t->hosts[i].domain) >= 0);
			t->n_exact = i + 1;
		}
	}
	t->vhosts = rd_array(&r, t->n_vhosts, sizeof(*t->vhosts), 5);
	for (uint32_t i = 0; i < t->n_vhosts && !r.bad; i++) {
		struct kr_vhost *v = &t->vhosts[i];
		v->python = rd_u8(&r);
		v->n_routes = rd_u32(&r);
		v->routes = rd_array(&r, v->n_routes, sizeof(*v->routes), 1);
		for (uint32_t j = 0; j < v->n_routes && !r.bad; j++)
			read_route(&r, &v->routes[j], t->n_clusters);
	}
	if (r.bad || r.off != r.n || t->dflt < -1 || t->dflt >= (int32_t)t->n_vhosts)
		goto bad;
	return t;
bad:
	kr_table_free(t);
	return NULL;
}

/* -- the request head, read strictly ------------------------------------------------- */
struct kr_hdr {
	const char *name, *value;
	uint32_t nlen, vlen;
	uint32_t line_len; /* the whole line, from name to CRLF */
	bool connection;
};

struct kr_req {
	struct kr_str method, target, path, host; /* path: what path specifiers match */
	uint32_t n_hdrs;
	struct kr_hdr hdrs[KR_MAX_HEADERS];
	int body;
	uint64_t body_len;
	bool req_keep;
	bool conn_other; /* a Connection token other than close / keep-alive */
};

/* RFC 9110 tchar */
static bool tchar(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* Methods every HTTP parser on the Python side knows (llhttp answers 400
 * to one it does not; CONNECT is the Python side's too). */
static bool known_method(const char *p, size_t n)
{
	static const char *const known[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"};

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (strlen(known[i]) == n && memcmp(p, known[i], n) == 0)
			return true;
	return false;
}

static bool is(const struct kr_hdr *h, const char *name)
{
	return h->nlen == strlen(name) && strncasecmp(h->name, name, h->nlen) == 0;
}

/* The head in the form whose every reading the Python side agrees on: an
 * origin-form HTTP/1.1 request with one Host, printable ASCII only, no
 * folding, no white space before a line's end, plain framing, no Upgrade or
 * Expect. Anything else: false (the Python side reads it, and may answer 400). */
static bool read_head(const char *p, size_t n, struct kr_req *q)
{
	size_t i = 0, hosts = 0, lengths = 0, codings = 0;

	memset(q, 0, sizeof(*q));
	q->req_keep = true;
	while (i < n && tchar(p[i]))
		i++;
	if (i == 0 || i >= n || p[i] != ' ' || !known_method(p, i))
		return false;
	q->method = (struct kr_str){p, i};
	size_t t0 = ++i;
	while (i < n && p[i] > 0x20 && p[i] < 0x7f && p[i] != '#')
		i++;
	if (i == t0 || p[t0] != '/' || n - i < 11 || memcmp(p + i, " HTTP/1.1\r\n", 11) != 0)
		return false;
	q->target = (struct kr_str){p + t0, i - t0};
	i += 11;
	for (;;) {
		if (n - i < 2)
			return false;
		if (p[i] == '\r' && p[i + 1] == '\n') {
			i += 2;
			break;
		}
		size_t a = i;
		while (i < n && tchar(p[i]))
			i++;
		if (i == a || i >= n || p[i] != ':' || q->n_hdrs == KR_MAX_HEADERS)
			return false;
		struct kr_hdr *h = &q->hdrs[q->n_hdrs++];
		h->name = p + a;
		h->nlen = i - a;
		i++;
		while (i < n && http_ws(p[i]))
			i++;
		size_t v = i;
		while (i < n && ((p[i] >= 0x20 && p[i] < 0x7f) || p[i] == '\t'))
			i++;
		if (n - i < 2 || p[i] != '\r' || p[i + 1] != '\n')
			return false;
		if (i > v && http_ws(p[i - 1]))
			return false;
		h->value = p + v;
		h->vlen = i - v;
		i += 2;
		h->line_len = p + i - h->name;
		if (is(h, "host")) {
			hosts++;
			q->host = (struct kr_str){h->value, h->vlen};
		} else if (is(h, "content-length")) {
			lengths++;
			if (h->vlen == 0 || h->vlen > 18)
				return false;
			q->body_len = 0;
			for (uint32_t k = 0; k < h->vlen; k++) {
				if (h->value[k] < '0' || h->value[k] > '9')
					return false;
				q->body_len = q->body_len * 10 + (h->value[k] - '0');
			}
		} else if (is(h, "transfer-encoding")) {
			codings++;
			if (!token_is(h->value, 0, h->vlen, "chunked"))
				return false;
		} else if (is(h, "connection")) {
			h->connection = true;
			size_t k = 0, a, b;
			while (next_token(h->value, h->vlen, &k, &a, &b)) {
				if (token_is(h->value, a, b, "close"))
					q->req_keep = false;
				else if (a < b && !token_is(h->value, a, b, "keep-alive"))
					q->conn_other = true;
			}
		} else if (is(h, "upgrade") || is(h, "expect")) {
			return false;
		}
	}
	if (i != n || hosts != 1 || q->host.n == 0 || lengths > 1 || codings > 1 || (lengths && codings))
		return false;
	q->body = codings ? KL7_BODY_CHUNKED : lengths ? KL7_BODY_LENGTH : KL7_BODY_NONE;
	return true;
}

/* -- matching ------------------------------------------------------------------------ */
static char lower(char c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static bool same(const char *a, const char *b, size_t n, bool ignore_case)
{
	if (!ignore_case)
		return memcmp(a, b, n) == 0;
	for (size_t i = 0; i < n; i++)
		if (lower(a[i]) != b[i]) /* b: lowercased by the compiler */
			return false;
	return true;
}

static bool path_matches(const struct kr_route *rt, struct kr_str path)
{
	uint32_t k = rt->path.n;
	bool ic = rt->ignore_case;

	switch (rt->path_kind) {
	case KR_P_PREFIX:
		return path.n >= k && same(path.p, rt->path.p, k, ic);
	case KR_P_EXACT:
		return path.n == k && same(path.p, rt->path.p, k, ic);
	case KR_P_SEPARATED:
		return path.n >= k && same(path.p, rt->path.p, k, ic) && (path.n == k || path.p[k] == '/');
	}
	return false;
}

static bool text_test(const struct kr_cond *c, const char *v, size_t n)
{
	const char *w = c->value.p;
	size_t k = c->value.n;
	bool ic = c->ignore_case;

	switch (c->kind) {
	case KR_C_EXACT:
		return n == k && same(v, w, k, ic);
	case KR_C_PREFIX:
		return n >= k && same(v, w, k, ic);
	case KR_C_SUFFIX:
		return n >= k && same(v + n - k, w, k, ic);
	case KR_C_CONTAINS:
		for (size_t i = 0; i + k <= n; i++)
			if (same(v + i, w, k, ic))
				return true;
		return false;
	}
	return true; /* KR_C_ANY */
}

/* A value of the request as View.header_values has it: the pseudo-headers
 * and the defaults where nothing of that name was sent. */
static bool implied(const struct kr_req *q, struct kr_str name, struct kr_str *out)
{
#define NAMED(lit) (name.n == sizeof(lit) - 1 && memcmp(name.p, lit, name.n) == 0)
	if (NAMED("host") || NAMED(":authority"))
		*out = q->host;
	else if (NAMED(":path"))
		*out = q->target;
	else if (NAMED(":method"))
		*out = q->method;
	else if (NAMED(":scheme") || NAMED("x-forwarded-proto"))
		*out = (struct kr_str){"http", 4};
	else
		return false;
	return true;
#undef NAMED
}

static bool cond_holds(const struct kr_req *q, const struct kr_cond *c)
{
	bool sent = false, matched = false;
	bool is_host = c->name.n == 4 && memcmp(c->name.p, "host", 4) == 0;

	if (!is_host) /* a sent Host is the authority, not a value of its own */
		for (uint32_t i = 0; i < q->n_hdrs; i++) {
			const struct kr_hdr *h = &q->hdrs[i];
			if (h->nlen != c->name.n || !same(h->name, c->name.p, h->nlen, true))
				continue;
			sent = true;
			if (c->kind == KR_C_PRESENCE)
				break;
			if (text_test(c, h->value, h->vlen)) {
				matched = true;
				break;
			}
		}
	if (!sent) {
		struct kr_str v;
		if (implied(q, c->name, &v))
			matched = c->kind != KR_C_PRESENCE && text_test(c, v.p, v.n);
		else if (!c->missing_as_empty) /* absent: only a presence match can hold */
			return c->kind == KR_C_PRESENCE && c->present == c->invert;
		else
			matched = c->kind != KR_C_PRESENCE && text_test(c, "", 0);
	}
	if (c->kind == KR_C_PRESENCE) /* there (or taken as empty) */
		matched = c->present;
	return matched != c->invert;
}

static int find_vhost(const struct kr_table *t, struct kr_str host)
{
	char buf[256];
	uint32_t n = host.n;

	if (t->n_hosts == 0)
		return t->dflt;
	if (t->flags & KR_F_IGNORE_PORT) {
		/* Envoy's getPortStart: the last ':' not inside an IPv6 literal */
		const char *colon = memrchr(host.p, ':', n), *bracket = memrchr(host.p, ']', n);
		if (colon && (!bracket || bracket < colon))
			n = colon - host.p;
	}
	if (n > sizeof(buf))
		return -2;
	for (uint32_t i = 0; i < n; i++)
		buf[i] = lower(host.p[i]);
	struct kr_str want = {buf, n};
	for (uint32_t lo = 0, hi = t->n_exact; lo < hi;) { /* a mesh's tables have many domains */
		uint32_t mid = lo + (hi - lo) / 2;
		int r = str_cmp(want, t->hosts[mid].domain);
		if (r == 0)
			return t->hosts[mid].vhost;
		if (r < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	for (uint32_t i = t->n_exact; i < t->n_hosts; i++) {
		const struct kr_host *h = &t->hosts[i];
		uint32_t k = h->domain.n;
		bool hit;
		if (k >= n) /* a wildcard stands for one character or more */
			hit = false;
		else if (h->kind == KR_H_SUFFIX)
			hit = memcmp(buf + n - k, h->domain.p, k) == 0;
		else
			hit = memcmp(buf, h->domain.p, k) == 0;
		if (hit)
			return h->vhost;
	}
	return t->dflt;
}

static uint64_t next_rand(uint64_t *s)
{
	/* xorshift64*: the engine's own draws (weights and random LB) */
	uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ull;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dull;
}

/* The head without its Connection lines into out (cap bytes): its length. */
static size_t without_connection(const char *head, size_t n, const struct kr_req *q, char *out, size_t cap)
{
	size_t k = 0, at = 0;

	if (n > cap)
		return 0;
	for (uint32_t i = 0; i < q->n_hdrs; i++) {
		const struct kr_hdr *h = &q->hdrs[i];
		if (!h->connection)
			continue;
		size_t start = h->name - head;
		memcpy(out + k, head + at, start - at);
		k += start - at;
		at = start + h->line_len;
	}
	memcpy(out + k, head + at, n - at);
	return k + n - at;
}

bool kr_decide(struct kr_table *t, const char *head, size_t n, uint64_t *rng, char *scratch, size_t cap,
	       struct kl7_decision *d)
{
	struct kr_req q;

	if (!t || !read_head(head, n, &q))
		return false;
	int v = find_vhost(t, q.host);
	if (v < 0 || t->vhosts[v].python)
		return false; /* no virtual host: Envoy's 404, from the Python side */
	q.path = q.target;
	for (uint32_t i = 0; i < q.path.n; i++)
		if (q.path.p[i] == '?' || ((t->flags & KR_F_IGNORE_PATH_PARAMS) && q.path.p[i] == ';')) {
			q.path.n = i;
			break;
		}
	const struct kr_vhost *vh = &t->vhosts[v];
	const struct kr_route *rt = NULL;
	for (uint32_t i = 0; i < vh->n_routes && !rt; i++) {
		const struct kr_route *r = &vh->routes[i];
		if (r->path_kind == KR_P_PYTHON)
			return false; /* it might match: only the Python side can tell */
		if (!path_matches(r, q.path))
			continue;
		bool all = true;
		for (uint32_t j = 0; j < r->n_conds && all; j++)
			all = cond_holds(&q, &r->conds[j]);
		if (all)
			rt = r;
	}
	if (!rt || rt->action != KR_A_FORWARD)
		return false;
	uint64_t k = next_rand(rng) % rt->total;
	const struct kr_pick *pick = rt->picks;
	while (k >= pick->weight) { /* weights sum to total: ends inside */
		k -= pick->weight;
		pick++;
	}
	struct kr_cluster *c = &t->clusters[pick->cluster];
	k = c->lb == KR_LB_ROUND_ROBIN ? c->cursor++ % c->total : next_rand(rng) % c->total;
	const struct kr_ep *ep = c->eps;
	while (k >= ep->weight) {
		k -= ep->weight;
		ep++;
	}
	memset(d, 0, sizeof(*d));
	d->kind = KL7_FORWARD;
	d->req_keep = q.req_keep;
	d->keep = q.req_keep && q.body == KL7_BODY_NONE;
	d->n_eps = 1;
	d->eps[0].ip = ep->ip;
	d->eps[0].port = ep->port;
	d->timeout_ms = rt->timeout_ms;
	d->connect_timeout_ms = c->connect_timeout_ms;
	d->body = q.body;
	d->body_len = q.body == KL7_BODY_LENGTH ? q.body_len : 0;
	d->head_request = q.method.n == 4 && memcmp(q.method.p, "HEAD", 4) == 0;
	if (!q.req_keep && !q.conn_other && scratch) {
		/* As Envoy: the upstream connection outlives this client's (the
		 * engine tells the client it closes: Connection: close). */
		size_t k = without_connection(head, n, &q, scratch, cap);
		if (k) {
			d->data = scratch;
			d->data_len = k;
		}
	}
	return true;
}
