/*
 * Key operations in flight to this relay's ca.
 *
 * The shim's RSA/EC callbacks call keyop_call().  Inside an async job (a
 * handshake run with SSL_MODE_ASYNC) the request is sent, the job pauses,
 * and the event loop goes on serving other connections; when the reply
 * with that request id arrives (or the keyop timeout passes, or the
 * connection is closed) the loop resumes that connection's handshake and
 * keyop_call() returns.  Outside a job -- `keyops blocking`, and LibreSSL,
 * which has no ASYNC -- it waits in poll() for its reply, as relayd does.
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
	void		*owner;		/* the connection to resume */
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
static struct evsrc	 ca_src = { EV_CA, -1, 0 };
static uint64_t		 earliest = UINT64_MAX;	/* no deadline before */
static void		*owner;			/* whose handshake runs now */
static uint32_t		 next_id;

/* counters for the parent (pps_stats), and why the last operation failed */
static struct {
	uint64_t	 calls, fail, timeout, lat_sum;
	uint64_t	 lat[PPS_LAT_BUCKETS];
} counts;
static const uint64_t lat_bounds[PPS_LAT_BUCKETS - 1] = {	/* us */
	250, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000
};
static void		*failed_owner;
static const char	*failed_why;

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

void
keyop_set_owner(void *conn)
{
	owner = conn;
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

/* End an operation and resume its connection, which frees it. */
static void
finish(struct keyop *op, enum keyop_state state, const char *why)
{
	inflight_remove(op);
	op->state = state;
	op->why = why;
	relay_keyop_done(op->owner);
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

/* A connection closes while its handshake waits: fail that operation. */
void
keyop_cancel(void *conn)
{
	struct keyop *op;

	for (op = oldest; op != NULL; op = op->next)
		if (op->owner == conn) {
			inflight_remove(op);
			op->state = KO_FAILED;
			op->why = "connection closed";
			return;
		}
}

/* ---- the call ---- */

static void
build_request(struct keyop *op, const struct keyref *k, int type, int arg,
    const uint8_t *in, size_t inlen)
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
	op->deadline = pps_clock_us() / 1000 + k->timeout_ms;
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
	while (op->state == KO_WAITING) {
		if (!ASYNC_pause_job()) {
			inflight_remove(op);
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

/* Why conn's handshake failed, if a key operation of its own failed. */
const char *
keyop_failure(void *conn)
{
	const char *why = NULL;

	if (conn != NULL && failed_owner == conn) {
		why = failed_why;
		failed_owner = NULL;
	}
	return why;
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
	build_request(op, &none, PPS_OP_PING, 0, NULL, 0);
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
	build_request(op, k, type, arg, in, inlen);
	op->owner = owner;
	start = pps_clock_us();
	counts.calls++;
#ifndef OPENSSL_NO_ASYNC
	if (pps_conf.keyops_async && owner != NULL &&
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
		failed_owner = op->owner;
		failed_why = op->why != NULL ? op->why : "ca failure";
	}
	free(op);
	return len;
}
