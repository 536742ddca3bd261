/*
 * The relay process's event loop: accept on the listening sockets shared
 * by every relay process, run non-blocking TLS handshakes (whose private
 * key operations the shim turns into requests to our ca), connect to the
 * backend, and relay bytes both ways through bounded buffers.
 *
 * Every event source is a struct evsrc whose kind picks the handler from
 * the dispatch table at the bottom; a connection owns two (client and
 * backend) and one function, conn_pump(), moves its bytes and decides
 * what it waits for next.
 */
#ifdef __linux__
#define _GNU_SOURCE		/* accept4, SOCK_NONBLOCK */
#endif
#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/rand.h>

#include "engine.h"

struct pps_engine_conf pps_conf;
time_t pps_now;
static uint64_t now_ms;		/* per loop turn, like pps_now */

struct buf {
	size_t		off, len, cap;
	uint8_t		data[];
};

/* Client to backend: a record at a time.  Backend to client: four, so that
 * a download takes one recv() and one write() (wbuf.c) per four records. */
#define UP_BUFSZ	PPS_BUFSZ
#define DOWN_BUFSZ	(4 * PPS_BUFSZ)

enum conn_state { CS_HANDSHAKE, CS_CONNECTING, CS_RELAY };

/* conn.flags */
#define CF_CLIENT_EOF	0x01	/* no more bytes from the client */
#define CF_BACKEND_EOF	0x02	/* no more bytes from the backend */
#define CF_BACKEND_SHUT	0x04	/* we sent FIN to the backend */
#define CF_TLS_SHUT	0x08	/* we sent close_notify */
#define CF_BACKEND_UP	0x10	/* forward with tls: connected, handshaking */

struct conn {
	struct evsrc	 client;	/* first: a client evsrc is the conn */
	struct evsrc	 backend;
	struct relay	*relay;
	SSL		*ssl;
	SSL		*bssl;		/* forward with tls: to the backend */
	enum conn_state	 state;
	unsigned	 flags;
	unsigned	 rd_want, wr_want;	/* what SSL_read/SSL_write wait for */
	unsigned	 cready, bready;	/* client, backend: found ready */
	unsigned	 brd_want, bwr_want;	/* bssl's SSL_read, SSL_write */
	struct buf	*up, *down;	/* client->backend, backend->client */
	uint64_t	 deadline;	/* monotonic ms */
	struct connlist	*list;
	struct conn	*prev, *next;
	struct conn	*ready_next;	/* pump again without waiting */
	int		 on_ready;
	struct keyop_ctx keyop;		/* keyop.op: handshake waits for the ca */
	struct sockaddr_storage peer;	/* the client */
	struct host	*host;		/* the backend chosen; NULL: none yet */
	int		 retried;	/* a connect failed: once another host */
	time_t		 started, active;	/* accepted, last traffic */
	uint64_t	 bytes_in, bytes_out;
	int		 closed;	/* freed after this turn's events */
	struct conn	*dead_next;
};

struct listener {
	struct evsrc	 src;
	struct relay	*relay;
};

static struct relay	*relays[PPS_MAX_RELAYS];
static int		 nrelays;
static struct listener	 listeners[PPS_MAX_LISTENERS];
static int		 nlisteners;
static int		 accepting = 1;
static int		 nconns;
static struct evsrc	 ctl_src = { EV_CTL, -1, 0, 0 };
static struct conn	*ready;
static struct pps_stats	 stats;
static int		 draining;
static struct conn	*dead;
static volatile sig_atomic_t stopping;

#define CONN_OF(src, member) \
	((struct conn *)((char *)(src) - offsetof(struct conn, member)))

/* ---- buffers: allocated when a direction first carries data ---- */

static size_t
buf_space(struct buf *b, size_t cap)
{
	return b == NULL ? cap : b->cap - b->off - b->len;
}

static size_t
buf_len(struct buf *b)
{
	return b == NULL ? 0 : b->len;
}

static uint8_t *
buf_tail(struct buf **bp, size_t cap)
{
	struct buf *b = *bp;

	if (b == NULL) {
		if ((b = *bp = malloc(sizeof(*b) + cap)) == NULL)
			return NULL;
		b->off = b->len = 0;
		b->cap = cap;
	}
	return b->data + b->off + b->len;
}

/* Consumed n bytes; an empty buffer is freed (idle sessions hold none). */
static void
buf_drain(struct buf **bp, size_t n)
{
	struct buf *b = *bp;

	b->off += n;
	b->len -= n;
	if (b->len == 0) {
		free(b);
		*bp = NULL;
	} else if (b->off > b->cap / 2) {
		memmove(b->data, b->data + b->off, b->len);
		b->off = 0;
	}
}

/* ---- deadlines: per relay block, lists kept in deadline order ---- */

static void
list_unlink(struct conn *c)
{
	struct connlist *l = c->list;

	if (l == NULL)
		return;
	if (c->prev != NULL)
		c->prev->next = c->next;
	else
		l->head = c->next;
	if (c->next != NULL)
		c->next->prev = c->prev;
	else
		l->tail = c->prev;
	c->list = NULL;
	c->prev = c->next = NULL;
}

static void
list_touch(struct conn *c, struct connlist *l, int timeout)
{
	list_unlink(c);
	c->deadline = now_ms + (uint64_t)timeout * 1000;
	c->list = l;
	c->prev = l->tail;
	c->next = NULL;
	if (l->tail != NULL)
		l->tail->next = c;
	else
		l->head = c;
	l->tail = c;
}

/* ---- connections ---- */

static void listeners_enable(int);

/* c's backend is h now (NULL: none): least-states counts them. */
static void
conn_host(struct conn *c, struct host *h)
{
	if (c->host != NULL)
		c->host->nconns--;
	if ((c->host = h) != NULL)
		h->nconns++;
}

static const char *
peer_name(const struct conn *c)
{
	static char buf[INET6_ADDRSTRLEN + 8];
	char host[INET6_ADDRSTRLEN] = "?";
	const struct sockaddr_in *sin = (const struct sockaddr_in *)&c->peer;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&c->peer;

	if (c->peer.ss_family == AF_INET6) {
		inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
		snprintf(buf, sizeof(buf), "[%s]:%u", host, ntohs(sin6->sin6_port));
	} else {
		inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
		snprintf(buf, sizeof(buf), "%s:%u", host, ntohs(sin->sin_port));
	}
	return buf;
}

static void
conn_close(struct conn *c, const char *why)
{
	struct conn **pp;

	if (why != NULL)
		pps_log(LOG_DEBUG, "relay %s: connection closed: %s",
		    c->relay->name, why);
	if (pps_conf.log_conn)
		pps_log(LOG_INFO, "relay %s: %s: closed after %llds, %llu bytes "
		    "in, %llu out", c->relay->name, peer_name(c),
		    (long long)(pps_now - c->started),
		    (unsigned long long)c->bytes_in,
		    (unsigned long long)c->bytes_out);
	(void)wbuf_flush(c->ssl);	/* an alert, a close_notify: if it can */
	keyop_abandon(c->ssl, &c->keyop);	/* a handshake waiting for the ca */
	conn_host(c, NULL);
	list_unlink(c);
	if (c->on_ready)
		for (pp = &ready; *pp != NULL; pp = &(*pp)->ready_next)
			if (*pp == c) {
				*pp = c->ready_next;
				break;
			}
	if (c->backend.fd != -1)
		poller_close(&c->backend);
	poller_close(&c->client);
	SSL_free(c->ssl);
	SSL_free(c->bssl);
	free(c->up);
	free(c->down);
	/* events of this turn may still name c: free it after them */
	c->closed = 1;
	c->dead_next = dead;
	dead = c;
	if (--nconns < pps_conf.max_conns && !accepting && !draining)
		listeners_enable(1);
}

static const char *
ssl_reason(void)
{
	static char buf[160];
	unsigned long e = ERR_get_error();

	ERR_clear_error();
	if (e == 0)
		return "connection reset";
	ERR_error_string_n(e, buf, sizeof(buf));
	return buf;
}

/*
 * A connection's two sockets are edge triggered (PPS_POLL_EDGE): an event
 * says a socket became ready, cready and bready remember it, and a read or
 * write that would block clears it again.  So nothing is tried that is
 * known to block, and no event mask changes as the connection goes on.
 */
static unsigned
ready_bits(unsigned events)
{
	return events & PPS_ERR ? PPS_IN | PPS_OUT : events & (PPS_IN | PPS_OUT);
}

/* The client blocked on want: wait for it.  The client's socket is
 * registered for PPS_IN only, until a write first blocks (a download
 * faster than its client): PPS_OUT is added then, and stays. */
static void
client_blocked(struct conn *c, unsigned want)
{
	c->cready &= ~want;
	if ((want & ~c->client.mask) != 0 &&
	    poller_set(&c->client, c->client.mask | want) == -1)
		pps_log(LOG_ERR, "%s", pps_error());
}

/* What this step of c wrote to the client, sent; -1: c is closed. */
static int
conn_flush(struct conn *c)
{
	if (!(c->cready & PPS_OUT) && wbuf_pending(c->ssl))
		return 0;		/* still full: its event flushes */
	switch (wbuf_flush(c->ssl)) {
	case 1:
		return 0;
	case 0:
		client_blocked(c, PPS_OUT);
		return 0;
	default:
		pps_log(LOG_DEBUG, "relay %s: client write: %s", c->relay->name,
		    ssl_reason());
		conn_close(c, "i/o error");
		return -1;
	}
}

/* Run c again on the next loop turn, without waiting for an event. */
static void
conn_ready(struct conn *c)
{
	if (c->on_ready)
		return;
	c->on_ready = 1;
	c->ready_next = ready;
	ready = c;
}

/*
 * The PROXY protocol header, at the front of the client-to-backend buffer
 * (empty until the backend is connected): it goes out with the first
 * send(), with whatever the client sent by then behind it.  The
 * destination is the address the client connected to.
 */
static int
proxy_prepend(struct conn *c)
{
	struct sockaddr_storage local;
	socklen_t len = sizeof(local);
	struct proxy_info pi;
	uint8_t hdr[PPS_PROXY_MAX];
	const unsigned char *alpn = NULL;
	unsigned alpn_len = 0;
	int n;

	memset(&local, 0, sizeof(local));
	if (getsockname(c->client.fd, (struct sockaddr *)&local, &len) == -1) {
		pps_log(LOG_WARNING, "relay %s: %s: getsockname: %s",
		    c->relay->name, peer_name(c), strerror(errno));
		return -1;
	}
	SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
	memset(&pi, 0, sizeof(pi));
	pi.src = &c->peer;
	pi.dst = &local;
	pi.alpn = alpn_len > 0 ? alpn : NULL;
	pi.alpn_len = alpn_len;
	pi.authority = SSL_get_servername(c->ssl, TLSEXT_NAMETYPE_host_name);
	pi.tls_version = SSL_get_version(c->ssl);
	pi.tls_cipher = SSL_get_cipher_name(c->ssl);
	if ((n = proxy_header(c->relay->proxy, &pi, hdr, sizeof(hdr))) <= 0 ||
	    buf_space(c->up, UP_BUFSZ) < (size_t)n ||
	    buf_tail(&c->up, UP_BUFSZ) == NULL) {
		pps_log(LOG_WARNING, "relay %s: %s: no PROXY header made",
		    c->relay->name, peer_name(c));
		return -1;
	}
	/* before anything already there (nothing is, as the loop runs) */
	memmove(c->up->data + c->up->off + n, c->up->data + c->up->off,
	    c->up->len);
	memcpy(c->up->data + c->up->off, hdr, n);
	c->up->len += n;
	return 0;
}

/* ---- choosing a backend: tables and modes ---- */

/* FNV-1a: the same in every relay process, so that every process sends a
 * client (source-hash) to the same host. */
static uint32_t
hash_bytes(uint32_t h, const void *p, size_t n)
{
	const uint8_t *b = p;

	while (n-- > 0)
		h = (h ^ *b++) * 16777619u;
	return h;
}

/* An address without its port (relayd's relay_hash_addr). */
static uint32_t
hash_addr(uint32_t h, const struct sockaddr_storage *ss)
{
	const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;

	if (ss->ss_family == AF_INET6)
		return hash_bytes(h, &sin6->sin6_addr, sizeof(sin6->sin6_addr));
	return hash_bytes(h, &sin->sin_addr, sizeof(sin->sin_addr));
}

static uint32_t
hash_local(uint32_t h, const struct conn *c)
{
	struct sockaddr_storage local;
	socklen_t len = sizeof(local);
	uint16_t port;

	memset(&local, 0, sizeof(local));
	if (getsockname(c->client.fd, (struct sockaddr *)&local, &len) == -1)
		return h;
	port = local.ss_family == AF_INET6 ?
	    ((struct sockaddr_in6 *)&local)->sin6_port :
	    ((struct sockaddr_in *)&local)->sin_port;
	h = hash_addr(h, &local);
	return hash_bytes(h, &port, sizeof(port));
}

static int
usable(const struct host *h, const struct host *not)
{
	return h->up && h != not;
}

/*
 * A host of t for c, per t's mode, other than `not` (the one that just
 * refused); NULL if t has none up.  As relayd's relay_from_table(): the
 * mode picks a slot, and a host that is down passes it on to the next
 * one up, in the table's order.
 */
static struct host *
table_pick(struct table *t, const struct conn *c, const struct host *not)
{
	struct host *best = NULL;
	uint32_t h = 2166136261u, rnd;
	int i, idx = 0;

	for (i = 0; i < t->nhosts && !usable(&t->hosts[i], not); i++)
		;
	if (i == t->nhosts)
		return NULL;
	switch (t->mode) {
	case PPS_MODE_ROUNDROBIN:
		idx = t->rr++ % t->nhosts;
		break;
	case PPS_MODE_RANDOM:
		if (RAND_bytes((unsigned char *)&rnd, sizeof(rnd)) != 1)
			rnd = (uint32_t)now_ms;
		idx = rnd % t->nhosts;
		break;
	case PPS_MODE_SOURCEHASH:
		idx = hash_addr(h, &c->peer) % t->nhosts;
		break;
	case PPS_MODE_LOADBALANCE:
		idx = hash_local(hash_addr(h, &c->peer), c) % t->nhosts;
		break;
	case PPS_MODE_HASH:
		idx = hash_local(h, c) % t->nhosts;
		break;
	case PPS_MODE_LEASTSTATES:
		for (i = 0; i < t->nhosts; i++)
			if (usable(&t->hosts[i], not) &&
			    (best == NULL || t->hosts[i].nconns < best->nconns))
				best = &t->hosts[i];
		return best;
	}
	for (i = 0; i < t->nhosts; i++, idx = (idx + 1) % t->nhosts)
		if (usable(&t->hosts[idx], not))
			return &t->hosts[idx];
	return NULL;
}

/* The first table with a host up serves (the others are fallbacks). */
static struct host *
relay_pick(struct relay *r, const struct conn *c, const struct host *not)
{
	struct host *h;
	int i;

	for (i = 0; i < r->ntables; i++)
		if ((h = table_pick(&r->tables[i], c, not)) != NULL)
			return h;
	return NULL;
}

/* Connect to a host of c's relay other than `not`: 0 under way, an errno
 * if connect() failed at once (no socket left), -1 if there is no host up
 * or no socket to be had (logged). */
static int
backend_try(struct conn *c, const struct host *not)
{
	struct relay *r = c->relay;
	struct host *h;
	int fd, err, one = 1;

	if ((h = relay_pick(r, c, not)) == NULL) {
		pps_log(LOG_WARNING, "relay %s: %s: no %sbackend host up",
		    r->name, peer_name(c), not != NULL ? "other " : "");
		return -1;
	}
	conn_host(c, h);
	fd = socket(h->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
	    0);
	if (fd == -1) {
		pps_log(LOG_WARNING, "relay %s: backend socket: %s", r->name,
		    strerror(errno));
		return -1;
	}
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&h->addr, h->addrlen) == -1 &&
	    errno != EINPROGRESS) {
		err = errno;
		close(fd);
		return err > 0 ? err : EIO;
	}
	c->backend.fd = fd;
	c->bready = 0;
	c->brd_want = c->bwr_want = 0;
	c->state = CS_CONNECTING;
	if (poller_add(&c->backend, PPS_IN | PPS_OUT, PPS_POLL_EDGE) == -1) {
		pps_log(LOG_ERR, "%s", pps_error());
		poller_close(&c->backend);
		return -1;
	}
	/* a host that drops the SYN: another one after this long */
	list_touch(c, &r->connecting, PPS_CONNECT_TIMEOUT);
	return 0;
}

static const char *
host_name(const struct host *h)
{
	static char buf[INET6_ADDRSTRLEN + 8];
	char addr[INET6_ADDRSTRLEN] = "?";
	const struct sockaddr_in *sin = (const struct sockaddr_in *)&h->addr;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&h->addr;

	if (h->addr.ss_family == AF_INET6) {
		inet_ntop(AF_INET6, &sin6->sin6_addr, addr, sizeof(addr));
		snprintf(buf, sizeof(buf), "[%s]:%u", addr, ntohs(sin6->sin6_port));
	} else {
		inet_ntop(AF_INET, &sin->sin_addr, addr, sizeof(addr));
		snprintf(buf, sizeof(buf), "%s:%u", addr, ntohs(sin->sin_port));
	}
	return buf;
}

/*
 * Connecting to c's host failed (why), or its TLS handshake did (forward
 * with tls): once, another host up is tried, so that no client sees a
 * failure while one is (the health checks take a dead host out within
 * their interval; until then this hides it).
 */
static void
backend_failed_why(struct conn *c, const char *why)
{
	struct host *failed = c->host;
	int r = -1;

	pps_log(LOG_WARNING, "relay %s: %s: backend: %s (host %s)",
	    c->relay->name, peer_name(c), why,
	    failed != NULL ? host_name(failed) : "?");
	if (c->backend.fd != -1)
		poller_close(&c->backend);
	if (c->bssl != NULL) {
		if (failed != NULL)
			backend_tls_failed(failed);
		SSL_free(c->bssl);
		c->bssl = NULL;
	}
	if (c->flags & CF_BACKEND_UP) {
		/* the PROXY header went to the one that failed: anew */
		c->flags &= ~CF_BACKEND_UP;
		free(c->up);
		c->up = NULL;
		if (c->relay->proxy != PPS_PROXY_NONE && !c->retried &&
		    proxy_prepend(c) == -1)
			c->retried = 1;		/* no other host then */
	}
	while (!c->retried) {
		c->retried = 1;
		if ((r = backend_try(c, failed)) > 0)
			pps_log(LOG_WARNING, "relay %s: %s: backend: %s "
			    "(host %s)", c->relay->name, peer_name(c),
			    strerror(r), host_name(c->host));
	}
	if (r == 0)
		return;
	stats.fail_backend++;
	/* tell the client politely that there is nobody behind us */
	(void)SSL_shutdown(c->ssl);
	conn_close(c, NULL);
}

static void
backend_failed(struct conn *c, int err)
{
	backend_failed_why(c, strerror(err));
}

static void
backend_connect(struct conn *c)
{
	int r;

	if (c->relay->proxy != PPS_PROXY_NONE && proxy_prepend(c) == -1) {
		conn_close(c, NULL);
		return;
	}
	c->state = CS_CONNECTING;
	if ((r = backend_try(c, NULL)) > 0)
		backend_failed(c, r);
	else if (r == -1) {
		stats.fail_backend++;
		(void)SSL_shutdown(c->ssl);
		conn_close(c, NULL);
	}
}

/* Why a handshake failed: the ca (it says why), else the client, and
 * what was wrong with its certificate when one was verified (tls client
 * ca). */
static void
handshake_failed(struct conn *c)
{
	const char *why = c->keyop.failed, *cert = "";
	long verify = SSL_get_verify_result(c->ssl);

	if (why != NULL) {
		stats.fail_ca++;
		ERR_clear_error();
	} else {
		stats.fail_client++;
		why = ssl_reason();
	}
	if (verify != X509_V_OK)
		cert = X509_verify_cert_error_string(verify);
	pps_log(pps_conf.log_errors ? LOG_WARNING : LOG_DEBUG,
	    "relay %s: %s: handshake failed: %s%s%s%s", c->relay->name,
	    peer_name(c), why, *cert ? " (client certificate: " : "", cert,
	    *cert ? ")" : "");
	conn_close(c, NULL);
}

static void
conn_handshake(struct conn *c)
{
	int r;

	r = keyop_handshake(c->ssl, &c->keyop);
	if (r == 1) {
#ifndef OPENSSL_NO_ASYNC
		if (pps_conf.keyops_async)	/* reads and writes: no jobs */
			SSL_clear_mode(c->ssl, SSL_MODE_ASYNC);
#endif
		c->rd_want = 0;		/* what the client sent on is read next */
		if (SSL_session_reused(c->ssl))
			stats.hs_resumed++;
		else
			stats.hs_full++;
		pps_log(LOG_DEBUG, "relay %s: %s: %s handshake %s %s",
		    c->relay->name, peer_name(c), SSL_session_reused(c->ssl) ?
		    "resumed" : "full", SSL_get_version(c->ssl),
		    SSL_get_cipher(c->ssl));
		list_touch(c, &c->relay->established, c->relay->idle_timeout);
		backend_connect(c);
		return;
	}
	switch (SSL_get_error(c->ssl, r)) {
	case SSL_ERROR_WANT_READ:
		c->rd_want = PPS_IN;
		client_blocked(c, PPS_IN);
		break;
	case SSL_ERROR_WANT_WRITE:
		c->rd_want = PPS_OUT;
		client_blocked(c, PPS_OUT);
		break;
#ifndef OPENSSL_NO_ASYNC
	case SSL_ERROR_WANT_ASYNC:	/* waiting for the ca: keyop.c resumes */
		break;
	case SSL_ERROR_WANT_ASYNC_JOB:	/* no job to be had now: again soon */
		conn_ready(c);
		break;
#endif
	default:
		handshake_failed(c);
		return;
	}
	(void)conn_flush(c);	/* the flight just made */
}

/*
 * forward with tls: the PROXY header (if any: all c->up holds before the
 * relay starts) in the clear, then the client handshake, as far as the
 * socket lets it go.  Done: c relays.  Failed: another host, once.  Still
 * connecting until then (the connect timeout covers the handshake too).
 */
static void
backend_handshake(struct conn *c)
{
	char why[300];
	ssize_t n;
	int r;

	while (buf_len(c->up) > 0) {
		if (!(c->bready & PPS_OUT))
			return;
		n = send(c->backend.fd, c->up->data + c->up->off, c->up->len,
		    MSG_NOSIGNAL);
		if (n > 0)
			buf_drain(&c->up, n);
		else if (n == -1 && errno == EAGAIN)
			c->bready &= ~PPS_OUT;
		else if (n == 0 || errno != EINTR) {
			backend_failed(c, n == 0 ? EIO : errno);
			return;
		}
	}
	if (c->bwr_want != 0 && !(c->bready & c->bwr_want))
		return;
	if ((r = SSL_do_handshake(c->bssl)) == 1) {
		c->bwr_want = 0;
		c->flags &= ~CF_BACKEND_UP;
		c->state = CS_RELAY;
		list_touch(c, &c->relay->established, c->relay->idle_timeout);
		pps_log(LOG_DEBUG, "relay %s: %s: backend %s: %s handshake %s",
		    c->relay->name, peer_name(c), host_name(c->host),
		    SSL_session_reused(c->bssl) ? "resumed" : "full",
		    SSL_get_version(c->bssl));
		return;
	}
	switch (SSL_get_error(c->bssl, r)) {
	case SSL_ERROR_WANT_READ:
		c->bwr_want = PPS_IN;
		c->bready &= ~PPS_IN;
		return;
	case SSL_ERROR_WANT_WRITE:
		c->bwr_want = PPS_OUT;
		c->bready &= ~PPS_OUT;
		return;
	default:
		snprintf(why, sizeof(why), "TLS handshake: %s",
		    backend_tls_why(c->bssl, r));
		backend_failed_why(c, why);
	}
}

/* The backend's socket became writable: connected, unless SO_ERROR
 * reports an error (a refusal comes as an error event). */
static void
conn_connected(struct conn *c, unsigned events)
{
	int err = 0;
	socklen_t len = sizeof(err);

	(void)events;
	if (getsockopt(c->backend.fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
		err = errno;
	if (err == 0)		/* libkqueue read SO_ERROR first (poller.c) */
		err = poller_sockerr(&c->backend);
	if (err == EINPROGRESS)
		return;
	if (err != 0) {
		backend_failed(c, err);	/* another host, or the end */
		return;
	}
	if (c->host != NULL && c->host->tls) {
		c->flags |= CF_BACKEND_UP;
		if ((c->bssl = backend_tls_new(c->relay, c->host,
		    c->backend.fd)) == NULL)
			backend_failed_why(c, pps_error());
		else
			backend_handshake(c);
		return;
	}
	c->state = CS_RELAY;
	list_touch(c, &c->relay->established, c->relay->idle_timeout);
}

/*
 * Whether SSL_read()'s failure err (its result n) is the peer's end: a
 * close_notify, or a close without one (nothing on the error queue, EOF
 * or a reset), which ends the direction as a plain socket's FIN does.
 */
static int
ssl_read_ended(int err, int n)
{
	return err == SSL_ERROR_ZERO_RETURN ||
	    (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 &&
	    (n == 0 || errno == 0 || errno == ECONNRESET));
}

/* SSL_read into up; returns 1 on progress, 0 if blocked, -1 on error. */
static int
pump_client_read(struct conn *c)
{
	uint8_t *p;
	int n, err;

	if (c->flags & CF_CLIENT_EOF || buf_space(c->up, UP_BUFSZ) == 0 ||
	    (c->rd_want != 0 && !(c->cready & c->rd_want)))
		return 0;
	if ((p = buf_tail(&c->up, UP_BUFSZ)) == NULL)
		return -1;
	if ((n = SSL_read(c->ssl, p, (int)buf_space(c->up, UP_BUFSZ))) > 0) {
		c->rd_want = 0;
		c->up->len += n;
		c->bytes_in += n;
		stats.bytes_in += n;
		return 1;
	}
	err = SSL_get_error(c->ssl, n);
	if (ssl_read_ended(err, n)) {
		c->flags |= CF_CLIENT_EOF;
		return 1;
	}
	switch (err) {
	case SSL_ERROR_WANT_READ:
		c->rd_want = PPS_IN;
		client_blocked(c, PPS_IN);
		break;
	case SSL_ERROR_WANT_WRITE:
		c->rd_want = PPS_OUT;
		client_blocked(c, PPS_OUT);
		break;
	default:
		pps_log(LOG_DEBUG, "relay %s: client read: %s", c->relay->name,
		    ssl_reason());
		return -1;
	}
	if (buf_len(c->up) == 0) {
		free(c->up);
		c->up = NULL;
	}
	return 0;
}

/* forward with tls: what an SSL call on bssl said (r <= 0) for the one
 * that waits in *want; 0 blocked, -1 error (logged). */
static int
backend_tls_blocked(struct conn *c, int r, unsigned *want, const char *what)
{
	switch (SSL_get_error(c->bssl, r)) {
	case SSL_ERROR_WANT_READ:
		*want = PPS_IN;
		c->bready &= ~PPS_IN;
		return 0;
	case SSL_ERROR_WANT_WRITE:
		*want = PPS_OUT;
		c->bready &= ~PPS_OUT;
		return 0;
	default:
		pps_log(LOG_DEBUG, "relay %s: backend %s: %s", c->relay->name,
		    what, ssl_reason());
		return -1;
	}
}

static int
pump_backend_tls_write(struct conn *c)
{
	int n;

	if (c->bwr_want != 0 && !(c->bready & c->bwr_want))
		return 0;
	n = SSL_write(c->bssl, c->up->data + c->up->off, (int)c->up->len);
	if (n > 0) {
		c->bwr_want = 0;
		buf_drain(&c->up, n);
		return 1;
	}
	return backend_tls_blocked(c, n, &c->bwr_want, "write");
}

/* After a read from the backend into the down buffer: n bytes came
 * (counted), or none (the buffer is freed if it is still empty).
 * Whether any came. */
static int
down_filled(struct conn *c, ssize_t n)
{
	if (n > 0) {
		c->down->len += n;
		c->bytes_out += n;
		stats.bytes_out += n;
		return 1;
	}
	if (buf_len(c->down) == 0) {
		free(c->down);
		c->down = NULL;
	}
	return 0;
}

static int
pump_backend_tls_read(struct conn *c)
{
	uint8_t *p;
	int n;

	if (c->brd_want != 0 && !(c->bready & c->brd_want))
		return 0;
	if ((p = buf_tail(&c->down, DOWN_BUFSZ)) == NULL)
		return -1;
	n = SSL_read(c->bssl, p, (int)buf_space(c->down, DOWN_BUFSZ));
	if (down_filled(c, n)) {
		c->brd_want = 0;
		return 1;
	}
	if (ssl_read_ended(SSL_get_error(c->bssl, n), n)) {
		c->flags |= CF_BACKEND_EOF;
		return 1;
	}
	return backend_tls_blocked(c, n, &c->brd_want, "read");
}

/* forward with tls: close_notify to the backend; 0 while the socket is
 * full (its event brings us back), 1 sent or given up on. */
static int
backend_tls_shutdown(struct conn *c)
{
	int r;

	if (!(c->bready & PPS_OUT))
		return 0;
	if ((r = SSL_shutdown(c->bssl)) >= 0 ||
	    SSL_get_error(c->bssl, r) != SSL_ERROR_WANT_WRITE) {
		ERR_clear_error();
		return 1;
	}
	c->bready &= ~PPS_OUT;
	return 0;
}

static int
pump_backend_write(struct conn *c)
{
	ssize_t n;

	if (c->state != CS_RELAY || buf_len(c->up) == 0)
		return 0;
	if (c->bssl != NULL)
		return pump_backend_tls_write(c);
	if (!(c->bready & PPS_OUT))
		return 0;
	n = send(c->backend.fd, c->up->data + c->up->off, c->up->len,
	    MSG_NOSIGNAL);
	if (n > 0) {
		buf_drain(&c->up, n);
		return 1;
	}
	if (errno == EINTR)
		return 1;	/* try again */
	if (errno == EAGAIN) {
		c->bready &= ~PPS_OUT;
		return 0;
	}
	pps_log(LOG_DEBUG, "relay %s: backend write: %s", c->relay->name,
	    strerror(errno));
	return -1;
}

static int
pump_backend_read(struct conn *c)
{
	uint8_t *p;
	ssize_t n;

	if (c->state != CS_RELAY || c->flags & CF_BACKEND_EOF ||
	    buf_space(c->down, DOWN_BUFSZ) == 0)
		return 0;
	if (c->bssl != NULL)
		return pump_backend_tls_read(c);
	if (!(c->bready & PPS_IN))
		return 0;
	if ((p = buf_tail(&c->down, DOWN_BUFSZ)) == NULL)
		return -1;
	n = recv(c->backend.fd, p, buf_space(c->down, DOWN_BUFSZ), 0);
	if (down_filled(c, n))
		return 1;
	if (n == 0 || errno == ECONNRESET) {
		c->flags |= CF_BACKEND_EOF;
		return 1;
	}
	if (errno == EINTR)
		return 1;	/* try again */
	if (errno == EAGAIN) {
		c->bready &= ~PPS_IN;
		return 0;
	}
	pps_log(LOG_DEBUG, "relay %s: backend read: %s", c->relay->name,
	    strerror(errno));
	return -1;
}

static int
pump_client_write(struct conn *c)
{
	int n;

	if (buf_len(c->down) == 0 ||
	    (c->wr_want != 0 && !(c->cready & c->wr_want)))
		return 0;
	n = SSL_write(c->ssl, c->down->data + c->down->off, (int)c->down->len);
	if (n > 0) {
		c->wr_want = 0;
		buf_drain(&c->down, n);
		return 1;
	}
	switch (SSL_get_error(c->ssl, n)) {
	case SSL_ERROR_WANT_READ:
		c->wr_want = PPS_IN;
		client_blocked(c, PPS_IN);
		return 0;
	case SSL_ERROR_WANT_WRITE:
		c->wr_want = PPS_OUT;
		client_blocked(c, PPS_OUT);
		return 0;
	default:
		pps_log(LOG_DEBUG, "relay %s: client write: %s", c->relay->name,
		    ssl_reason());
		return -1;
	}
}

/* Half-close: pass each side's end on once its bytes have gone through. */
static void
pump_shutdowns(struct conn *c)
{
	if (c->flags & CF_CLIENT_EOF && !(c->flags & CF_BACKEND_SHUT) &&
	    buf_len(c->up) == 0 && c->state == CS_RELAY) {
		/* forward with tls: a close_notify first, even to a backend
		 * that has ended (its session stays good for resuming) */
		if (c->bssl == NULL || backend_tls_shutdown(c)) {
			/* when the backend has ended and all it sent is gone
			 * on, the connection closes now, and close() sends
			 * the FIN */
			if (!(c->flags & CF_BACKEND_EOF) || buf_len(c->down) > 0)
				(void)shutdown(c->backend.fd, SHUT_WR);
			c->flags |= CF_BACKEND_SHUT;
		}
	}
	if (c->flags & CF_BACKEND_EOF && !(c->flags & CF_TLS_SHUT) &&
	    buf_len(c->down) == 0) {
		(void)SSL_shutdown(c->ssl);
		ERR_clear_error();
		c->flags |= CF_TLS_SHUT;
	}
}

#define PUMP_ROUNDS	16
#define PPS_CA_WAIT_MS	5000	/* for the ca to start, before accepting */

static void
conn_pump(struct conn *c)
{
	int progress, rounds = 0, r;

	do {
		progress = 0;
		if ((r = pump_client_read(c)) == -1 ||
		    (progress |= r, r = pump_backend_write(c)) == -1 ||
		    (progress |= r, r = pump_backend_read(c)) == -1 ||
		    (progress |= r, r = pump_client_write(c)) == -1) {
			conn_close(c, "i/o error");
			return;
		}
		progress |= r;
		pump_shutdowns(c);
	} while (progress && ++rounds < PUMP_ROUNDS);

	if (conn_flush(c) == -1)
		return;
	if ((c->flags & (CF_TLS_SHUT | CF_BACKEND_SHUT)) ==
	    (CF_TLS_SHUT | CF_BACKEND_SHUT) && !wbuf_pending(c->ssl)) {
		conn_close(c, "done");
		return;
	}
	if (rounds > 0 || progress) {
		c->active = pps_now;
		list_touch(c, &c->relay->established, c->relay->idle_timeout);
	}
	if (progress)	/* still going: the others get a turn first */
		conn_ready(c);
}

/* Go on with c: from an event, or its turn on the ready list. */
static void
conn_resume(struct conn *c)
{
	if (c->closed || c->keyop.op != NULL)	/* keyop.c resumes it */
		return;
	if (c->state == CS_HANDSHAKE)
		conn_handshake(c);
	else if (c->state == CS_RELAY)
		conn_pump(c);
}

static void
on_client(struct evsrc *src, unsigned events)
{
	struct conn *c = CONN_OF(src, client);

	c->cready |= ready_bits(events);
	/* a handshake goes on when what it waits for came */
	if (c->state != CS_HANDSHAKE || (c->cready & c->rd_want) != 0)
		conn_resume(c);
}

static void
on_backend(struct evsrc *src, unsigned events)
{
	struct conn *c = CONN_OF(src, backend);

	c->bready |= ready_bits(events);
	if (c->closed)
		return;
	if (c->state == CS_CONNECTING) {
		if (c->flags & CF_BACKEND_UP)	/* forward with tls */
			backend_handshake(c);
		else if (c->bready & PPS_OUT)
			conn_connected(c, events);
		if (c->state != CS_RELAY)
			return;
	}
	conn_pump(c);
}

/* ---- listeners ---- */

static void
listeners_enable(int on)
{
	int i;

	accepting = on;
	for (i = 0; i < nlisteners; i++) {
		if (on)
			(void)poller_add(&listeners[i].src, PPS_IN,
			    PPS_POLL_EXCLUSIVE);
		else
			poller_del(&listeners[i].src);
	}
}

static void
conn_new(struct listener *l, int fd, const struct sockaddr_storage *peer)
{
	struct conn *c;
#ifndef __linux__
	int one = 1;

	/* Linux: inherited from the listener (pps_relay_listen) */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
#endif
	if ((c = calloc(1, sizeof(*c))) == NULL ||
	    (c->ssl = SSL_new(l->relay->kp[0].ctx)) == NULL ||
	    wbuf_attach(c->ssl, fd) == -1) {
		pps_log(LOG_ERR, "relay %s: out of memory", l->relay->name);
		if (c != NULL)
			SSL_free(c->ssl);
		free(c);
		close(fd);
		ERR_clear_error();
		return;
	}
	c->client.kind = EV_CLIENT;
	c->client.fd = fd;
	c->backend.kind = EV_BACKEND;
	c->backend.fd = -1;
	c->relay = l->relay;
	c->state = CS_HANDSHAKE;
	c->peer = *peer;
	c->started = c->active = pps_now;
	SSL_set_accept_state(c->ssl);
#ifndef OPENSSL_NO_ASYNC
	if (pps_conf.keyops_async)
		SSL_set_mode(c->ssl, SSL_MODE_ASYNC);
#endif
	/* the handshake starts when the client has sent something: a silent
	 * connection costs no TLS buffers */
	c->rd_want = PPS_IN;
	c->cready = PPS_OUT;	/* until a write finds it full */
	if (poller_add(&c->client, PPS_IN, PPS_POLL_EDGE) == -1) {
		pps_log(LOG_ERR, "%s", pps_error());
		SSL_free(c->ssl);
		close(fd);
		free(c);
		return;
	}
	nconns++;
	stats.accepted++;
	list_touch(c, &c->relay->handshaking, pps_conf.handshake_timeout);
}

/*
 * One connection a report: the listener is level triggered, so the next
 * turn of the loop reports it again while more wait, and no accept4()
 * ends in EAGAIN (nginx's multi_accept off).  Shared by every relay
 * process, it wakes one of them (PPS_POLL_EXCLUSIVE).
 */
static void
on_listen(struct evsrc *src, unsigned events)
{
	struct listener *l = (struct listener *)src;
	struct sockaddr_storage peer;
	socklen_t len = sizeof(peer);
	int fd;

	(void)events;
	if (!accepting)
		return;
	memset(&peer, 0, sizeof(peer));
	fd = accept4(src->fd, (struct sockaddr *)&peer, &len,
	    SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd == -1) {
		if (errno == EMFILE || errno == ENFILE) {
			pps_log(LOG_WARNING, "accept: %s: pausing",
			    strerror(errno));
			listeners_enable(0);
		}
		return;
	}
	conn_new(l, fd, &peer);
	if (nconns >= pps_conf.max_conns) {
		pps_log(LOG_WARNING, "%d connections: pausing accept", nconns);
		listeners_enable(0);
	}
}

/* ---- the ca and the parent ---- */

static void
on_ca(struct evsrc *src, unsigned events)
{
	(void)src;
	keyop_ca_event(events);
}

/* An answer to the parent: same type and id as its question. */
static void
ctl_answer(const struct pps_hdr *q, unsigned arg, const void *payload,
    size_t len)
{
	uint8_t frame[sizeof(struct pps_hdr) + PPS_CTL_SESSIONS_MAX *
	    sizeof(struct pps_session)];
	struct pps_hdr hdr = *q;

	hdr.arg = arg;
	hdr.len = len;
	memcpy(frame, &hdr, sizeof(hdr));
	memcpy(frame + sizeof(hdr), payload, len);
	if (send(ctl_src.fd, frame, sizeof(hdr) + len, MSG_DONTWAIT |
	    MSG_NOSIGNAL) == -1)
		pps_log(LOG_WARNING, "parent: answer not sent: %s",
		    strerror(errno));
}

static void
ctl_ticket_keys(const struct pps_hdr *q, const uint8_t *payload)
{
	if (pps_ticket_keys(payload, q->len) == -1)
		pps_log(LOG_WARNING, "parent: %s", pps_error());
	else
		pps_log(LOG_DEBUG, "ticket keys updated");
}

static void
ctl_stats(const struct pps_hdr *q, const uint8_t *payload)
{
	(void)payload;
	stats.active = nconns;
	stats.draining = draining;
	keyop_stats(&stats);
	ctl_answer(q, 0, &stats, sizeof(stats));
}

static void
session_of(const struct conn *c, struct pps_session *s)
{
	const struct sockaddr_in *sin = (const struct sockaddr_in *)&c->peer;
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&c->peer;

	memset(s, 0, sizeof(*s));
	if (c->peer.ss_family == AF_INET6) {
		s->family = 6;
		memcpy(s->addr, &sin6->sin6_addr, 16);
		s->port = ntohs(sin6->sin6_port);
	} else {
		s->family = 4;
		memcpy(s->addr, &sin->sin_addr, 4);
		s->port = ntohs(sin->sin_port);
	}
	s->state = c->state;
	s->relay = c->relay->index;
	s->age = pps_now - c->started;
	s->idle = pps_now - c->active;
	s->bytes_in = c->bytes_in;
	s->bytes_out = c->bytes_out;
	if (c->host != NULL) {
		sin = (const struct sockaddr_in *)&c->host->addr;
		sin6 = (const struct sockaddr_in6 *)&c->host->addr;
		if (c->host->addr.ss_family == AF_INET6) {
			s->backend_family = 6;
			memcpy(s->backend, &sin6->sin6_addr, 16);
			s->backend_port = ntohs(sin6->sin6_port);
		} else {
			s->backend_family = 4;
			memcpy(s->backend, &sin->sin_addr, 4);
			s->backend_port = ntohs(sin->sin_port);
		}
		s->backend_id = c->host->id;
	}
}

/* Every open connection, PPS_CTL_SESSIONS_MAX a frame, arg 1 while more. */
static void
ctl_sessions(const struct pps_hdr *q, const uint8_t *payload)
{
	struct pps_session batch[PPS_CTL_SESSIONS_MAX];
	struct connlist *lists[3];
	struct conn *c;
	int i, l, n = 0;

	(void)payload;
	for (i = 0; i < nrelays; i++) {
		lists[0] = &relays[i]->handshaking;
		lists[1] = &relays[i]->connecting;
		lists[2] = &relays[i]->established;
		for (l = 0; l < 3; l++)
			for (c = lists[l]->head; c != NULL; c = c->next) {
				if (n == PPS_CTL_SESSIONS_MAX) {
					ctl_answer(q, 1, batch, sizeof(batch));
					n = 0;
				}
				session_of(c, &batch[n++]);
			}
	}
	ctl_answer(q, 0, batch, n * sizeof(batch[0]));
}

/* Reload: stop accepting, let the sessions end, then exit. */
static void
ctl_drain(const struct pps_hdr *q, const uint8_t *payload)
{
	int i;

	(void)q;
	(void)payload;
	if (draining)
		return;
	draining = 1;
	listeners_enable(0);
	for (i = 0; i < nlisteners; i++)
		close(listeners[i].src.fd);
	nlisteners = 0;
	pps_log(LOG_INFO, "draining: %d connections left", nconns);
}

static void
ctl_verbose(const struct pps_hdr *q, const uint8_t *payload)
{
	(void)payload;
	pps_conf.verbose = q->arg != 0;
}

/* A host went up or down (the health checks): every slot with its id. */
static void
ctl_host(const struct pps_hdr *q, const uint8_t *payload)
{
	struct pps_host_state hs;
	struct host *h;
	int i, t, k;

	if (q->len != sizeof(hs)) {
		pps_log(LOG_WARNING, "parent: host state of %u bytes", q->len);
		return;
	}
	memcpy(&hs, payload, sizeof(hs));
	for (i = 0; i < nrelays; i++)
		for (t = 0; t < relays[i]->ntables; t++)
			for (k = 0; k < relays[i]->tables[t].nhosts; k++) {
				h = &relays[i]->tables[t].hosts[k];
				if (h->id == hs.id && h->up != (hs.up != 0)) {
					h->up = hs.up != 0;
					pps_log(LOG_DEBUG, "relay %s: host %s %s",
					    relays[i]->name, host_name(h),
					    h->up ? "up" : "down");
				}
			}
}

static void (*const ctl_dispatch[])(const struct pps_hdr *, const uint8_t *) = {
	[PPS_CTL_TICKET_KEYS - PPS_CTL_TICKET_KEYS] =	ctl_ticket_keys,
	[PPS_CTL_STATS - PPS_CTL_TICKET_KEYS] =		ctl_stats,
	[PPS_CTL_SESSIONS - PPS_CTL_TICKET_KEYS] =	ctl_sessions,
	[PPS_CTL_DRAIN - PPS_CTL_TICKET_KEYS] =		ctl_drain,
	[PPS_CTL_VERBOSE - PPS_CTL_TICKET_KEYS] =	ctl_verbose,
	[PPS_CTL_HOST - PPS_CTL_TICKET_KEYS] =		ctl_host,
};

static void
on_ctl(struct evsrc *src, unsigned events)
{
	uint8_t frame[sizeof(struct pps_hdr) +
	    PPS_MAX_TICKET_KEYS * PPS_TICKET_KEY_LEN + 1];
	struct pps_hdr hdr;
	unsigned slot;
	ssize_t n;
	int r;

	(void)events;
	n = recv(src->fd, frame, sizeof(frame), MSG_DONTWAIT);
	if (n == -1 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		pps_log(LOG_INFO, "parent gone, stopping");
		stopping = 1;
		poller_del(src);
		return;
	}
	/* the one byte more than the largest message shows a longer one */
	r = pps_frame_check(frame, n, sizeof(frame) - 1, &hdr);
	slot = hdr.type - PPS_CTL_TICKET_KEYS;	/* hdr is set even if r != 0 */
	if (r != 0)
		pps_log(LOG_WARNING, "parent: malformed frame: %s", pps_error());
	else if (hdr.type < PPS_CTL_TICKET_KEYS ||
	    slot >= sizeof(ctl_dispatch) / sizeof(ctl_dispatch[0]))
		pps_log(LOG_WARNING, "parent: unknown message %u", hdr.type);
	else
		ctl_dispatch[slot](&hdr, frame + sizeof(hdr));
	OPENSSL_cleanse(frame, sizeof(frame));
}

/* ---- the loop ---- */

static void (*const dispatch[EV_NKINDS])(struct evsrc *, unsigned) = {
	[EV_LISTEN] =	on_listen,
	[EV_CLIENT] =	on_client,
	[EV_BACKEND] =	on_backend,
	[EV_CA] =	on_ca,
	[EV_CTL] =	on_ctl,
};

static void
on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

/* Close what is past its deadline; returns how many. */
static int
sweep(struct connlist *l, const char *what)
{
	struct conn *c;
	int n = 0;

	while ((c = l->head) != NULL && c->deadline <= now_ms) {
		n++;
		if (c->state == CS_HANDSHAKE) {
			stats.fail_timeout++;
			pps_log(pps_conf.log_errors ? LOG_WARNING : LOG_DEBUG,
			    "relay %s: %s: handshake failed: %s timeout",
			    c->relay->name, peer_name(c), what);
		} else
			pps_log(LOG_DEBUG, "relay %s: %s: %s timeout",
			    c->relay->name, peer_name(c), what);
		conn_close(c, NULL);
	}
	return n;
}

/* Backend connects that had no answer in time: another host, once (a
 * retry is appended with a later deadline, so the loop ends). */
static void
sweep_connecting(struct connlist *l)
{
	struct conn *c;

	while ((c = l->head) != NULL && c->deadline <= now_ms) {
		list_unlink(c);
		backend_failed(c, ETIMEDOUT);
	}
}

/* Milliseconds until the next connection deadline, at most max. */
static int
next_deadline(int max)
{
	uint64_t first = now_ms + max;
	int i;

	for (i = 0; i < nrelays; i++) {
		if (relays[i]->handshaking.head != NULL &&
		    relays[i]->handshaking.head->deadline < first)
			first = relays[i]->handshaking.head->deadline;
		if (relays[i]->established.head != NULL &&
		    relays[i]->established.head->deadline < first)
			first = relays[i]->established.head->deadline;
		if (relays[i]->connecting.head != NULL &&
		    relays[i]->connecting.head->deadline < first)
			first = relays[i]->connecting.head->deadline;
	}
	return first <= now_ms ? 0 : (int)(first - now_ms);
}

static void
tick(void)
{
	uint64_t us = pps_clock_us();
	int i, closed = 0;

	pps_now = us / 1000000;
	now_ms = us / 1000;
	keyop_expire(now_ms);
	for (i = 0; i < nrelays; i++) {
		closed += sweep(&relays[i]->handshaking, "handshake");
		closed += sweep(&relays[i]->established, "idle");
		sweep_connecting(&relays[i]->connecting);
	}
#ifdef __GLIBC__
	/* a flood of idle connections just ended: give its memory back */
	if (closed >= 64)
		malloc_trim(0);
#endif
}

/* Stopping: every connection closed, paused handshakes failed, all freed. */
static void
close_all(void)
{
	struct conn *c;
	int i;

	for (i = 0; i < nrelays; i++) {
		while ((c = relays[i]->handshaking.head) != NULL)
			conn_close(c, NULL);
		while ((c = relays[i]->established.head) != NULL)
			conn_close(c, NULL);
		while ((c = relays[i]->connecting.head) != NULL)
			conn_close(c, NULL);
	}
	while ((c = dead) != NULL) {
		dead = c->dead_next;
		free(c);
	}
}

/* keyop.c: the ca answered c's request (or it failed): go on. */
void
relay_keyop_done(struct keyop_ctx *ctx)
{
	struct conn *c = CONN_OF(ctx, keyop);

	if (!c->closed)
		conn_handshake(c);
}

int
pps_engine_init(const struct pps_engine_conf *conf)
{
	struct rlimit rl;
	struct sigaction sa;
	char prefix[32];

	pps_conf = *conf;
	/* two descriptors a connection */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTERM, &sa, NULL) == -1 ||
	    sigaction(SIGINT, &sa, NULL) == -1)
		return pps_seterr("sigaction: %s", strerror(errno));
	sa.sa_handler = SIG_IGN;
	(void)sigaction(SIGPIPE, &sa, NULL);
	(void)sigaction(SIGHUP, &sa, NULL);
	snprintf(prefix, sizeof(prefix), "relay %d", pps_conf.id);
	pps_log_setup(prefix, pps_conf.use_syslog, pps_conf.verbose);
	if (OPENSSL_init_ssl(0, NULL) != 1)
		return pps_seterr_ssl("OPENSSL_init_ssl");
	if (wbuf_init() == -1 || keyop_init() == -1 ||
	    (pps_conf.ca_fd != -1 && shim_init() == -1))
		return -1;
	return poller_init();
}

/* "h2,http/1.1" -> "\x02h2\x08http/1.1", the wire format OpenSSL takes:
 * 1 to PPS_ALPN_MAX_NAMES names of 1 to 255 bytes (config.py refuses the
 * rest first, naming the line). */
static int
alpn_wire(struct relay *r, const char *list)
{
	size_t len = strlen(list), off = 0, n;
	const char *p = list, *comma;
	int names = 0;

	if (len == 0 || len + 1 > PPS_ALPN_MAX)
		return pps_seterr("relay %s: bad ALPN list", r->name);
	if ((r->alpn = malloc(len + 1)) == NULL)
		return pps_seterr("out of memory");
	for (;;) {
		comma = strchr(p, ',');
		n = comma != NULL ? (size_t)(comma - p) : strlen(p);
		if (n == 0 || n > 255 || ++names > PPS_ALPN_MAX_NAMES)
			return pps_seterr("relay %s: bad ALPN list \"%s\"",
			    r->name, list);
		r->alpn[off] = (uint8_t)n;
		memcpy(r->alpn + off + 1, p, n);
		off += n + 1;
		if (comma == NULL)
			break;
		p = comma + 1;
	}
	r->alpn_len = off;	/* == len + 1: one length byte a name */
	return 0;
}

int
pps_relay_new(const char *name, const char *ciphers, int keyop_timeout_ms,
    int idle_timeout, int proxy, const char *alpn)
{
	struct relay *r;

	if (nrelays == PPS_MAX_RELAYS)
		return pps_seterr("more than %d relays", PPS_MAX_RELAYS);
	if ((r = calloc(1, sizeof(*r))) == NULL)
		return pps_seterr("out of memory");
	snprintf(r->name, sizeof(r->name), "%s", name);
	if (ciphers != NULL && (r->ciphers = strdup(ciphers)) == NULL) {
		free(r);
		return pps_seterr("out of memory");
	}
	r->keyop_timeout_ms = keyop_timeout_ms;
	r->idle_timeout = idle_timeout;
	if (proxy != PPS_PROXY_NONE && proxy != PPS_PROXY_V1 &&
	    proxy != PPS_PROXY_V2) {
		pps_seterr("relay %s: no PROXY protocol version %d", name, proxy);
		goto fail;
	}
	r->proxy = proxy;
	if (alpn != NULL && alpn_wire(r, alpn) == -1)
		goto fail;
	if (tls_check_relay(r) == -1)
		goto fail;
	r->index = nrelays;
	relays[nrelays] = r;
	return nrelays++;
fail:
	free(r->alpn);
	free(r->ciphers);
	free(r);
	return -1;
}

static struct relay *
relay_get(int index)
{
	if (index < 0 || index >= nrelays) {
		pps_seterr("no relay %d", index);
		return NULL;
	}
	return relays[index];
}

int
pps_relay_table(int index, int mode)
{
	struct relay *r = relay_get(index);

	if (r == NULL)
		return -1;
	if (r->ntables == PPS_MAX_TABLES)
		return pps_seterr("relay %s: more than %d tables", r->name,
		    PPS_MAX_TABLES);
	if (mode < PPS_MODE_ROUNDROBIN || mode > PPS_MODE_LEASTSTATES)
		return pps_seterr("relay %s: no mode %d", r->name, mode);
	memset(&r->tables[r->ntables], 0, sizeof(r->tables[0]));
	r->tables[r->ntables].mode = mode;
	return r->ntables++;
}

int
pps_relay_host(int index, int table, uint32_t id, const char *addr, int port,
    int up)
{
	struct relay *r = relay_get(index);
	struct sockaddr_in *sin;
	struct sockaddr_in6 *sin6;
	struct table *t;
	struct host *h;

	if (r == NULL)
		return -1;
	if (table < 0 || table >= r->ntables)
		return pps_seterr("relay %s: no table %d", r->name, table);
	t = &r->tables[table];
	if (t->nhosts == PPS_MAX_HOSTS)
		return pps_seterr("relay %s: more than %d hosts in a table",
		    r->name, PPS_MAX_HOSTS);
	if (port < 1 || port > 65535)
		return pps_seterr("relay %s: bad port %d", r->name, port);
	h = &t->hosts[t->nhosts];
	memset(h, 0, sizeof(*h));
	sin = (struct sockaddr_in *)&h->addr;
	sin6 = (struct sockaddr_in6 *)&h->addr;
	if (inet_pton(AF_INET, addr, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		h->addrlen = sizeof(*sin);
	} else if (inet_pton(AF_INET6, addr, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		h->addrlen = sizeof(*sin6);
	} else
		return pps_seterr("relay %s: forward address %s is not numeric",
		    r->name, addr);
	h->id = id;
	h->up = up != 0;
	h->tls = t->tls;
	t->nhosts++;
	return 0;
}

/* forward with tls: the relay's client side (backend.c). */
int
pps_relay_backend_tls(int index, const char *ca_pem, size_t ca_len,
    const char *name)
{
	struct relay *r = relay_get(index);

	if (r == NULL)
		return -1;
	return backend_tls_ctx(r, ca_pem, ca_len, name);
}

int
pps_relay_table_tls(int index, int table)
{
	struct relay *r = relay_get(index);

	if (r == NULL)
		return -1;
	if (table < 0 || table >= r->ntables)
		return pps_seterr("relay %s: no table %d", r->name, table);
	if (r->backend_ctx == NULL || r->tables[table].nhosts > 0)
		return pps_seterr("relay %s: table %d: TLS before its hosts, "
		    "after pps_relay_backend_tls", r->name, table);
	r->tables[table].tls = 1;
	return 0;
}

int
pps_relay_listen(int index, int fd)
{
	struct relay *r = relay_get(index);
	struct listener *l;
	int flags, one = 1;

	if (r == NULL)
		return -1;
	if (nlisteners == PPS_MAX_LISTENERS)
		return pps_seterr("more than %d listeners", PPS_MAX_LISTENERS);
	if ((flags = fcntl(fd, F_GETFL)) == -1 ||
	    fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1)
		return pps_seterr("listener: %s", strerror(errno));
	/* the connections accepted inherit it (Linux) */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	l = &listeners[nlisteners++];
	l->src.kind = EV_LISTEN;
	l->src.fd = fd;
	l->relay = r;
	return 0;
}

int
pps_relay_keypair(int index, const char *chain_pem, size_t chain_len,
    const uint8_t *keyid, const char *key_pem, size_t key_len)
{
	struct relay *r = relay_get(index);

	if (r == NULL)
		return -1;
	if (key_pem == NULL && pps_conf.ca_fd == -1)
		return pps_seterr("relay %s: no ca and no key", r->name);
	return tls_keypair(r, chain_pem, chain_len, keyid, key_pem, key_len);
}

int
pps_relay_client_ca(int index, const char *pem, size_t len, int optional)
{
	struct relay *r = relay_get(index);

	if (r == NULL)
		return -1;
	return tls_client_ca(r, pem, len, optional);
}

int
pps_relay_ocsp(int index, const uint8_t *der, size_t len, int64_t not_before,
    int64_t not_after)
{
	struct relay *r = relay_get(index);

	if (r == NULL)
		return -1;
	return tls_ocsp(r, der, len, not_before, not_after);
}

int
pps_engine_run(void)
{
	struct pps_event evs[256];
	struct conn *c;
	int i, n, wait;

	for (i = 0; i < nrelays; i++) {
		if (relays[i]->nkp == 0)
			return pps_seterr("relay %s has no keypair",
			    relays[i]->name);
		if (relays[i]->ntables == 0 ||
		    relays[i]->tables[0].nhosts == 0)
			return pps_seterr("relay %s has no backend",
			    relays[i]->name);
	}
	ctl_src.fd = pps_conf.ctl_fd;
	if (keyop_start() == -1 ||
	    (ctl_src.fd != -1 && poller_add(&ctl_src, PPS_IN, 0) == -1))
		return -1;
	if (keyop_ping(PPS_CA_WAIT_MS) == -1)
		pps_log(LOG_WARNING, "ca not answering yet: accepting anyway");
	listeners_enable(1);
	tick();
	while (!stopping) {
		if (ready != NULL)
			wait = 0;
		else if ((wait = keyop_next_timeout(now_ms)) == -1 ||
		    wait > 1000)
			wait = 1000;
		wait = next_deadline(wait);
		n = poller_wait(evs, 256, wait);
		if (n == -1 && errno != EINTR)
			return pps_seterr("poll: %s", strerror(errno));
		tick();
		/* connections that had more to do get their turn first */
		while ((c = ready) != NULL) {
			ready = c->ready_next;
			c->on_ready = 0;
			conn_resume(c);
		}
		for (i = 0; i < n; i++)
			dispatch[evs[i].src->kind](evs[i].src, evs[i].events);
		while ((c = dead) != NULL) {
			dead = c->dead_next;
			free(c);
		}
		if (draining && nconns == 0) {
			pps_log(LOG_INFO, "drained");
			break;
		}
	}
	if (!draining || nconns > 0)
		pps_log(LOG_INFO, "stopping with %d connections", nconns);
	close_all();
	return 0;
}
