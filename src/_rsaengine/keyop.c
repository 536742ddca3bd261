/*
 * Key operations: a handshake's private-key operations, sent to this
 * relay's ca, and the handshake's way back once they are answered.
 *
 * One key operation, for a connection c of relay.c:
 *
 *   relay.c  conn_handshake(c): keyop_handshake(c->ssl, &c->keyop)
 *   keyop.c    keyop_handshake(): running = &c->keyop; SSL_do_handshake()
 *   shim.c       the RSA/EC_KEY method's callback: keyop_call()
 *   keyop.c        keyop_call(): the request goes to the ca, and
 *     blocking  (`keyops blocking`; LibreSSL, which has no ASYNC): it waits
 *               in poll() for its reply, as relayd does, and returns it;
 *     async     (the handshake runs in an OpenSSL ASYNC job): wait_async()
 *               puts it in flight (op->ctx = running, ctx->op = op) and
 *               pauses the job; SSL_do_handshake() returns
 *               SSL_ERROR_WANT_ASYNC and the loop serves other connections.
 *               The reply with that id (keyop_ca_event) or the keyop
 *               timeout (keyop_expire) ends it: finish() calls
 *               relay_keyop_done(op->ctx), relay.c runs conn_handshake(c)
 *               again, the job resumes in wait_async() and keyop_call()
 *               returns.  If c closes first, keyop_abandon() fails the
 *               operation and runs the job to its end itself.
 *   relay.c  a failed handshake reads c->keyop.failed: set when a key
 *            operation failed, and why (else the client is to blame).
 *
 * Why `running`, the one piece of a connection's context that is not in
 * its struct keyop_ctx: the shim's callbacks get only the RSA or EC_KEY,
 * which every connection of a keypair shares, not the SSL.  But a
 * handshake step -- and, in async mode, the job that runs it -- only ever
 * runs inside keyop_handshake() for one known connection, so `running`
 * names it exactly while keyop_call() runs, and an operation that has to
 * wait keeps its own pointer, op->ctx.  (The SSL's ASYNC_WAIT_CTX could
 * carry the connection instead, but it exists only once OpenSSL has
 * started a job, so a callback that sees the SSL inside the job would have
 * to put it there, at an allocation a connection, and blocking mode, with
 * no job, would still need `running`.)
 *
 * Every request carries an id.  A reply whose id is not in flight is a late
 * answer to a request that already failed: it is dropped.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/rand.h>
#ifndef OPENSSL_NO_ASYNC
#include <openssl/async.h>
#endif

#include "engine.h"

enum keyop_state { KO_WAITING, KO_DONE, KO_FAILED };

struct keyop {
	struct keyop	*hnext;		/* id hash chain */
	struct keyop	*prev, *next;	/* in flight, oldest first */
	struct keyop	*qnext;		/* not yet sent */
	struct keyop_ctx *ctx;		/* its connection's; NULL: none */
	uint32_t	 id;
	enum keyop_state state;
	const char	*why;		/* KO_FAILED: the reason */
	uint64_t	 deadline;	/* ms */
	size_t		 len;		/* request, then result, in buf */
	uint8_t		 buf[PPS_FRAME_MAX];
};

#define KEYOP_HASH	256

static struct keyop	*hash[KEYOP_HASH];
static struct keyop	*oldest, *newest;	/* in flight */
static struct keyop	*unsent, **unsent_tail = &unsent;
static struct evsrc	 ca_src = { EV_CA, -1, 0, 0 };
static uint64_t		 earliest = UINT64_MAX;	/* no deadline before */
static struct keyop_ctx	*running;	/* whose handshake step runs now */
static uint32_t		 next_id;

/* counters for the parent (pps_stats) */
static struct {
	uint64_t	 calls, fail, timeout, lat_sum;
	uint64_t	 lat[PPS_LAT_BUCKETS];
} counts;
static const uint64_t lat_bounds[PPS_LAT_BUCKETS - 1] = {	/* us */
	250, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000
};

static const char *
status_name(unsigned arg)
{
	static const char *const names[] = {
		[PPS_OK] = "ok",
		[PPS_ERR_FRAME] = "malformed frame",
		[PPS_ERR_VERSION] = "protocol version",
		[PPS_ERR_OP] = "operation refused",
		[PPS_ERR_NOKEY] = "unknown key",
		[PPS_ERR_POLICY] = "refused by policy",
		[PPS_ERR_CRYPTO] = "operation failed",
	};

	if (arg < sizeof(names) / sizeof(names[0]) && names[arg] != NULL)
		return names[arg];
	return "unknown status";
}

/*
 * Check a frame from the ca: a well-formed frame (pps_frame_check: so at
 * most PPS_MAX_PAYLOAD bytes of payload) that is a reply.  On success *hdr
 * is the header and *payload points into frame.  Returns 0 or -1.  Exposed
 * (api.h) for the fuzz test.
 */
int
pps_reply_parse(const uint8_t *frame, size_t n, struct pps_hdr *hdr,
    const uint8_t **payload)
{
	if (pps_frame_check(frame, n, PPS_FRAME_MAX, hdr) != 0)
		return -1;
	if (hdr->type != PPS_OP_REPLY)
		return pps_seterr("type %u is not a reply", hdr->type);
	*payload = frame + sizeof(*hdr);
	return 0;
}

int
keyop_init(void)
{
	if (RAND_bytes((unsigned char *)&next_id, sizeof(next_id)) != 1)
		return pps_seterr_ssl("RAND_bytes");
	if (pps_conf.keyops_async) {
#ifdef OPENSSL_NO_ASYNC
		return pps_seterr("keyops async: this TLS library has no "
		    "ASYNC support (use keyops blocking)");
#endif
	}
	return 0;
}

int
keyop_start(void)
{
	ca_src.fd = pps_conf.ca_fd;
	return ca_src.fd == -1 ? 0 : poller_add(&ca_src, PPS_IN, 0);
}

/*
 * Run a step of ssl's handshake, ctx its connection's: the key operations
 * the step makes report to ctx (ctx->failed says why one failed) and, if
 * they wait, resume ctx's connection through relay_keyop_done(ctx).
 * Returns what SSL_do_handshake() does.
 */
int
keyop_handshake(SSL *ssl, struct keyop_ctx *ctx)
{
	struct keyop_ctx *outer = running;
	int r;

	ctx->failed = NULL;
	running = ctx;
	r = SSL_do_handshake(ssl);
	running = outer;
	return r;
}

/* ---- the table of operations in flight ---- */

#ifndef OPENSSL_NO_ASYNC	/* only a paused job leaves one in flight */
static void
inflight_add(struct keyop *op)
{
	struct keyop **hp = &hash[op->id % KEYOP_HASH];

	op->hnext = *hp;
	*hp = op;
	if (op->deadline < earliest)
		earliest = op->deadline;
	op->prev = newest;
	op->next = NULL;
	if (newest != NULL)
		newest->next = op;
	else
		oldest = op;
	newest = op;
}
#endif

static void
inflight_remove(struct keyop *op)
{
	struct keyop **pp;

	for (pp = &hash[op->id % KEYOP_HASH]; *pp != NULL; pp = &(*pp)->hnext)
		if (*pp == op) {
			*pp = op->hnext;
			break;
		}
	if (op->prev != NULL)
		op->prev->next = op->next;
	else
		oldest = op->next;
	if (op->next != NULL)
		op->next->prev = op->prev;
	else
		newest = op->prev;
	/* and from the send queue, should it still be there (rare) */
	for (pp = &unsent; *pp != NULL; pp = &(*pp)->qnext)
		if (*pp == op) {
			*pp = op->qnext;
			if (unsent_tail == &op->qnext)
				unsent_tail = pp;
			break;
		}
}

static struct keyop *
inflight_find(uint32_t id)
{
	struct keyop *op;

	for (op = hash[id % KEYOP_HASH]; op != NULL; op = op->hnext)
		if (op->id == id)
			return op;
	return NULL;
}

/* End an operation and resume its handshake, whose keyop_call() frees it. */
static void
finish(struct keyop *op, enum keyop_state state, const char *why)
{
	inflight_remove(op);
	op->state = state;
	op->why = why;
	op->ctx->op = NULL;
	relay_keyop_done(op->ctx);
}

/* ---- the ca channel ---- */

/* Send a request; 0 sent, 1 the socket is full, -1 failed. */
static int
send_request(struct keyop *op)
{
	if (send(pps_conf.ca_fd, op->buf, op->len, MSG_DONTWAIT |
	    MSG_NOSIGNAL) != -1)
		return 0;
	if (errno == EAGAIN || errno == ENOBUFS)
		return 1;
	pps_log(LOG_WARNING, "ca: request %u not sent: %s", op->id,
	    strerror(errno));
	return -1;
}

static void
flush_unsent(void)
{
	struct keyop *op;
	int r;

	while ((op = unsent) != NULL) {
		if ((r = send_request(op)) == 1)
			break;
		unsent = op->qnext;
		if (unsent == NULL)
			unsent_tail = &unsent;
		if (r == -1)
			finish(op, KO_FAILED, "ca unreachable");
	}
	(void)poller_set(&ca_src, unsent != NULL ? PPS_IN | PPS_OUT : PPS_IN);
}

/*
 * Read one frame from the ca.  Returns 1 with a reply in hdr and payload,
 * 0 if nothing (well-formed) was there, -1 if the channel is gone.  A frame
 * that is not a well-formed reply is logged and dropped.
 */
static int
ca_recv(struct pps_hdr *hdr, uint8_t *payload)
{
	uint8_t frame[PPS_FRAME_MAX + 1];	/* +1: a longer message shows */
	const uint8_t *p;
	ssize_t n;

	n = recv(pps_conf.ca_fd, frame, sizeof(frame), MSG_DONTWAIT);
	if (n == -1)
		return errno == EAGAIN || errno == EINTR ? 0 : -1;
	if (n == 0)
		return -1;
	if (pps_reply_parse(frame, n, hdr, &p) == -1) {
		pps_log(LOG_WARNING, "ca: malformed reply dropped: %s",
		    pps_error());
		return 0;
	}
	memcpy(payload, p, hdr->len);
	return 1;
}

/* A reply for op: its result, or why there is none. */
static enum keyop_state
take_reply(struct keyop *op, const struct pps_hdr *rep, const uint8_t *payload)
{
	if (rep->arg != PPS_OK) {
		pps_log(LOG_WARNING, "ca: request %u: %s", rep->id,
		    status_name(rep->arg));
		op->why = rep->arg == PPS_ERR_POLICY ? "ca refusal (policy)" :
		    rep->arg == PPS_ERR_NOKEY ? "ca refusal (unknown key)" :
		    "ca refusal";
		return KO_FAILED;
	}
	memcpy(op->buf, payload, rep->len);
	op->len = rep->len;
	return KO_DONE;
}

void
keyop_ca_event(unsigned events)
{
	struct pps_hdr rep;
	uint8_t payload[PPS_MAX_PAYLOAD];
	struct keyop *op;
	enum keyop_state st;
	int r;

	if (events & PPS_OUT)
		flush_unsent();
	while ((r = ca_recv(&rep, payload)) > 0) {
		if ((op = inflight_find(rep.id)) == NULL) {
			pps_log(LOG_DEBUG, "ca: late reply %u dropped", rep.id);
			continue;
		}
		st = take_reply(op, &rep, payload);
		finish(op, st, op->why);
		/* nothing more in flight: no recv that could only find EAGAIN
		 * (a late reply keeps the socket readable for the next turn) */
		if (oldest == NULL)
			return;
	}
	if (r == -1) {
		pps_log(LOG_WARNING, "ca: channel closed");
		poller_del(&ca_src);
	}
}

/* ---- timeouts and cancellation ---- */

/*
 * `earliest` is a lower bound of the deadlines in flight (an operation that
 * ended may have set it), so the loop may wake early, never late, and the
 * list is walked only when something may have expired.
 */
int
keyop_next_timeout(uint64_t now)
{
	if (oldest == NULL)
		return -1;
	return earliest <= now ? 0 : (int)(earliest - now);
}

void
keyop_expire(uint64_t now)
{
	struct keyop *op, *next;

	if (now < earliest)
		return;
	for (op = oldest; op != NULL; op = next) {
		next = op->next;
		if (op->deadline <= now) {
			pps_log(LOG_WARNING, "ca: request %u timed out", op->id);
			counts.timeout++;
			finish(op, KO_FAILED, "ca timeout");
			next = oldest;	/* resuming may have changed the list */
		}
	}
	earliest = UINT64_MAX;
	for (op = oldest; op != NULL; op = op->next)
		if (op->deadline < earliest)
			earliest = op->deadline;
}

/*
 * A connection closes while its handshake waits for the ca: fail that
 * operation, and let the paused job run to its (failed) end, which frees
 * the operation and the job.  Nothing is resumed through relay.c.
 */
void
keyop_abandon(SSL *ssl, struct keyop_ctx *ctx)
{
	struct keyop *op = ctx->op;

	if (op == NULL)
		return;
	inflight_remove(op);
	op->state = KO_FAILED;
	op->why = "connection closed";
	ctx->op = NULL;
	(void)keyop_handshake(ssl, ctx);
	ERR_clear_error();
}

/* ---- the call ---- */

/* now: pps_clock_us(), which the deadline counts from */
static void
build_request(struct keyop *op, const struct keyref *k, int type, int arg,
    const uint8_t *in, size_t inlen, uint64_t now)
{
	struct pps_hdr hdr;

	memset(&hdr, 0, sizeof(hdr));
	hdr.version = PPS_PROTO_VERSION;
	hdr.type = type;
	hdr.arg = arg;
	hdr.id = op->id = ++next_id;
	hdr.len = inlen;
	memcpy(hdr.key, k->id, sizeof(hdr.key));
	memcpy(op->buf, &hdr, sizeof(hdr));
	if (inlen > 0)
		memcpy(op->buf + sizeof(hdr), in, inlen);
	op->len = sizeof(hdr) + inlen;
	op->deadline = now / 1000 + k->timeout_ms;
}

/* keyops blocking: wait here for our reply, dropping any other. */
static enum keyop_state
wait_blocking(struct keyop *op)
{
	struct pps_hdr rep;
	uint8_t payload[PPS_MAX_PAYLOAD];
	struct pollfd pfd = { pps_conf.ca_fd, POLLIN, 0 };
	uint64_t now;
	int r;

	if (send_request(op) != 0) {
		op->why = "ca unreachable";
		return KO_FAILED;
	}
	while ((now = pps_clock_us() / 1000) < op->deadline) {
		if (poll(&pfd, 1, (int)(op->deadline - now)) == -1 &&
		    errno != EINTR)
			return KO_FAILED;
		while ((r = ca_recv(&rep, payload)) > 0) {
			if (rep.id == op->id)
				return take_reply(op, &rep, payload);
			pps_log(LOG_DEBUG, "ca: late reply %u dropped", rep.id);
		}
		if (r == -1) {
			pps_log(LOG_WARNING, "ca: channel closed");
			op->why = "ca unreachable";
			return KO_FAILED;
		}
	}
	pps_log(LOG_WARNING, "ca: request %u timed out", op->id);
	counts.timeout++;
	op->why = "ca timeout";
	return KO_FAILED;
}

#ifndef OPENSSL_NO_ASYNC
/* keyops async: send (or queue), pause this handshake's job until resumed. */
static enum keyop_state
wait_async(struct keyop *op)
{
	op->state = KO_WAITING;
	inflight_add(op);
	if (unsent == NULL) {
		switch (send_request(op)) {
		case 0:
			break;
		case 1:
			op->qnext = NULL;
			*unsent_tail = op;
			unsent_tail = &op->qnext;
			(void)poller_set(&ca_src, PPS_IN | PPS_OUT);
			break;
		default:
			inflight_remove(op);
			op->why = "ca unreachable";
			return KO_FAILED;
		}
	} else {
		op->qnext = NULL;
		*unsent_tail = op;
		unsent_tail = &op->qnext;
	}
	op->ctx->op = op;
	while (op->state == KO_WAITING) {
		if (!ASYNC_pause_job()) {
			inflight_remove(op);
			op->ctx->op = NULL;
			op->why = "ASYNC_pause_job failed";
			return KO_FAILED;
		}
	}
	return op->state;
}
#endif

static void
count_latency(uint64_t us)
{
	int i;

	for (i = 0; i < PPS_LAT_BUCKETS - 1 && us > lat_bounds[i]; i++)
		;
	counts.lat[i]++;
	counts.lat_sum += us;
}

/* The latency histogram's upper bounds (us), for the parent's metrics. */
int64_t
pps_lat_bound(int i)
{
	if (i < 0 || i >= PPS_LAT_BUCKETS - 1)
		return -1;
	return (int64_t)lat_bounds[i];
}

void
keyop_stats(struct pps_stats *st)
{
	st->keyops = counts.calls;
	st->keyop_fail = counts.fail;
	st->keyop_timeout = counts.timeout;
	st->keyop_lat_sum = counts.lat_sum;
	memcpy(st->keyop_lat, counts.lat, sizeof(st->keyop_lat));
}

/*
 * Before a relay accepts: wait (at most timeout_ms) until its ca answers,
 * so that no handshake waits for a ca that is still loading its keys.
 */
int
keyop_ping(int timeout_ms)
{
	struct keyref none;
	struct keyop *op;
	enum keyop_state st;

	if (pps_conf.ca_fd == -1)
		return 0;
	if ((op = calloc(1, sizeof(*op))) == NULL)
		return -1;
	memset(&none, 0, sizeof(none));
	none.timeout_ms = timeout_ms;
	build_request(op, &none, PPS_OP_PING, 0, NULL, 0, pps_clock_us());
	st = wait_blocking(op);
	free(op);
	return st == KO_DONE ? 0 : -1;
}

int
keyop_call(const struct keyref *k, int type, int arg, const uint8_t *in,
    size_t inlen, uint8_t *out, size_t outsize)
{
	struct keyop *op;
	enum keyop_state st;
	uint64_t start;
	int len = -1;

	if (pps_conf.ca_fd == -1 || inlen > PPS_MAX_PAYLOAD ||
	    (op = calloc(1, sizeof(*op))) == NULL)
		return -1;
	start = pps_clock_us();
	build_request(op, k, type, arg, in, inlen, start);
	op->ctx = running;
	counts.calls++;
#ifndef OPENSSL_NO_ASYNC
	if (pps_conf.keyops_async && op->ctx != NULL &&
	    ASYNC_get_current_job() != NULL)
		st = wait_async(op);
	else
#endif
		st = wait_blocking(op);
	if (st == KO_DONE) {
		if (op->len <= outsize) {
			memcpy(out, op->buf, op->len);
			len = (int)op->len;
		} else {
			pps_log(LOG_WARNING, "ca: reply %u too long (%zu > %zu)",
			    op->id, op->len, outsize);
			op->why = "ca reply too long";
		}
	}
	if (len >= 0)
		count_latency(pps_clock_us() - start);
	else {
		counts.fail++;
		if (op->ctx != NULL)
			op->ctx->failed = op->why != NULL ? op->why :
			    "ca failure";
	}
	free(op);
	return len;
}
