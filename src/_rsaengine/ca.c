/*
 * The ca's request path: one frame in, one reply out, with no Python on
 * the way.  Python (pyprivsep/ca.py) loads the keys, hardens the process
 * and hands them here; pps_ca_serve() then answers the relay until the
 * channel closes or the parent stops the ca with SIGTERM.
 *
 * The policy -- what TLS needs of a key and nothing more, so that a relay
 * in an attacker's hands cannot use its ca as an RSA oracle:
 *   RSA, PPS_PAD_NONE:  the block must be a well-formed EMSA-PSS encoding
 *       (RFC 8017 9.1) for the key's modulus with SHA-256/384/512, MGF1 of
 *       the same hash and a salt as long as the hash;
 *   RSA, PPS_PAD_PKCS1: a DigestInfo of SHA-256/384/512 with a digest of
 *       exactly that length (TLS 1.2 and 1.3 sign nothing else: SHA-1 never);
 *   RSA-PSS (id-RSASSA-PSS) keys: PPS_PAD_NONE only, checked as above,
 *       and within the key's own restrictions when it has them: its hash
 *       (and MGF1 hash), a salt of at least its minimum salt length;
 *   ECDSA: a digest of 20 to 64 bytes;
 *   Ed25519, Ed448 (PPS_OP_EDDSA_SIGN, the whole message): a TLS 1.3 server
 *       CertificateVerify or TLS 1.2 ServerKeyExchange (edpolicy.c);
 *   anything else, RSA decryption always, is refused.
 * Each check needs only the public key's size.  The check decides the
 * operation (enum pps_signop) and cakey.c performs exactly that one: the
 * request is decoded once, here.
 */
#ifdef __linux__
#define _GNU_SOURCE		/* recvmmsg, sendmmsg */
#endif
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>

#include <openssl/evp.h>

#include "engine.h"

#define PPS_CA_MAX_KEYS	256
#define REFUSALS_LOGGED	10		/* a second; the rest are counted */
#define CA_BATCH	32		/* requests read at once */
#define CA_COALESCE_NS	1000000		/* replies held back at most ~1 ms */

struct ca_key {
	uint8_t			 id[PPS_KEYID_LEN];
	struct pps_cakey	*key;
	char			 name[96];
};

struct pps_ca {
	int		 index;
	int		 nkeys;
	struct ca_key	 keys[PPS_CA_MAX_KEYS];
	time_t		 second;		/* refusal log rate limit */
	int		 logged, suppressed;
	char		 who[64];		/* "relay 1", "client pid 7 uid 33" */
};

/* ---- the policy ---- */

static const struct digestinfo {
	uint8_t		 prefix[19];
	size_t		 len;			/* of the prefix */
	size_t		 digest;		/* bytes after it */
} digestinfos[] = {
	{ { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	    0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 }, 19, 32 },
	{ { 0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	    0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30 }, 19, 48 },
	{ { 0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	    0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40 }, 19, 64 },
};

static int
refuse(int status, const char *why)
{
	pps_seterr("%s", why);
	return status;
}

static int
check_digestinfo(const uint8_t *in, size_t len)
{
	size_t i;

	for (i = 0; i < sizeof(digestinfos) / sizeof(digestinfos[0]); i++) {
		const struct digestinfo *d = &digestinfos[i];

		if (len != d->len + d->digest)
			continue;
		if (memcmp(in, d->prefix, d->len) == 0)
			return PPS_OK;
	}
	return refuse(PPS_ERR_POLICY, "PKCS#1 block is not a DigestInfo of an "
	    "allowed hash");
}

static int
mgf1(uint8_t *mask, size_t len, const uint8_t *seed, size_t seedlen,
    const EVP_MD *md)
{
	static EVP_MD_CTX *ctx;
	uint8_t d[EVP_MAX_MD_SIZE], ctr[4];
	unsigned int dlen;
	uint32_t i;
	size_t off, n;

	if (ctx == NULL && (ctx = EVP_MD_CTX_new()) == NULL)
		return -1;
	for (i = 0, off = 0; off < len; i++, off += n) {
		ctr[0] = i >> 24;
		ctr[1] = i >> 16;
		ctr[2] = i >> 8;
		ctr[3] = i;
		if (!EVP_DigestInit_ex(ctx, md, NULL) ||
		    !EVP_DigestUpdate(ctx, seed, seedlen) ||
		    !EVP_DigestUpdate(ctx, ctr, sizeof(ctr)) ||
		    !EVP_DigestFinal_ex(ctx, d, &dlen))
			return -1;
		n = len - off < dlen ? len - off : dlen;
		memcpy(mask + off, d, n);
	}
	return 0;
}

/* DB = MGF1(H) ^ maskedDB must be 00..00 01 || salt of hlen bytes. */
static int
pss_db_ok(const uint8_t *em, size_t emlen, int top, const EVP_MD *md)
{
	uint8_t db[PPS_MAX_PAYLOAD];
	size_t hlen = EVP_MD_size(md), dblen, pslen, i;
	uint8_t acc = 0;

	if (emlen < 2 * hlen + 2)		/* 0x01, salt, H, 0xbc */
		return 0;
	dblen = emlen - hlen - 1;
	if (mgf1(db, dblen, em + dblen, hlen, md) == -1)
		return 0;
	for (i = 0; i < dblen; i++)
		db[i] ^= em[i];
	if (top)
		db[0] &= 0xff >> (8 - top);
	pslen = dblen - hlen - 1;
	for (i = 0; i < pslen; i++)
		acc |= db[i];
	return acc == 0 && db[pslen] == 0x01;
}

/*
 * The hashes an RSA-PSS key's restrictions leave (any for a plain RSA key):
 * a key restricted to one hash allows it alone; an MGF1 hash other than
 * the hash, or a minimum salt longer than the hash (TLS salts with the
 * hash's length), allows none.
 */
static int
pss_allowed(const struct pps_cakey *key, const EVP_MD *md)
{
	int kmd, kmgf1, saltlen;

	if (!pps_cakey_pss(key, &kmd, &kmgf1, &saltlen))
		return 1;
	if (kmd != NID_undef && kmd != EVP_MD_type(md))
		return 0;
	if (kmgf1 != NID_undef && kmgf1 != EVP_MD_type(md))
		return 0;
	return saltlen <= EVP_MD_size(md);
}

static int
check_pss(const struct pps_cakey *key, const uint8_t *block, size_t len,
    int bits)
{
	const EVP_MD *mds[3];
	size_t k = (bits + 7) / 8, emlen;
	const uint8_t *em = block;
	int top = (bits - 1) % 8, i;	/* bits used in EM's first byte */

	if (len != k) {
		pps_seterr("raw RSA block of %zu bytes, modulus is %zu", len, k);
		return PPS_ERR_POLICY;
	}
	emlen = len;
	if (top == 0) {			/* EM is one byte shorter */
		if (block[0] != 0)
			return refuse(PPS_ERR_POLICY,
			    "not a PSS encoding (leading byte)");
		em++;
		emlen--;
	}
	if (top && em[0] >> top)
		return refuse(PPS_ERR_POLICY, "not a PSS encoding (top bits set)");
	if (em[emlen - 1] != 0xbc)
		return refuse(PPS_ERR_POLICY, "not a PSS encoding (trailer)");
	mds[0] = EVP_sha256();
	mds[1] = EVP_sha384();
	mds[2] = EVP_sha512();
	for (i = 0; i < 3; i++)
		if (pss_allowed(key, mds[i]) &&
		    pss_db_ok(em, emlen, top, mds[i]))
			return PPS_OK;
	return refuse(PPS_ERR_POLICY, "not a PSS encoding with SHA-2 and a "
	    "digest-length salt (within the key's PSS restrictions)");
}

/*
 * What a request may have done with this key: PPS_OK and *how, the one
 * operation cakey.c will perform, or the refusal's status.
 */
static int
policy_check(const struct pps_cakey *key, int op, int arg, const uint8_t *in,
    size_t len, enum pps_signop *how)
{
	int is_pss = pps_cakey_type(key) == EVP_PKEY_RSA_PSS;
	int is_rsa = pps_cakey_type(key) == EVP_PKEY_RSA || is_pss, status;

	if (pps_cakey_eddsa(key) || op == PPS_OP_EDDSA_SIGN) {
		if (op != PPS_OP_EDDSA_SIGN || !pps_cakey_eddsa(key))
			return refuse(PPS_ERR_OP, pps_cakey_eddsa(key) ?
			    "operation not allowed on an EdDSA key" :
			    "EdDSA signing needs an Ed25519 or Ed448 key");
		if (arg != 0)
			return refuse(PPS_ERR_OP, "EdDSA takes no argument");
		*how = PPS_SIGN_EDDSA;
		return pps_eddsa_policy(in, len);	/* edpolicy.c */
	}
	if (op == PPS_OP_RSA_PRIV_ENC && is_rsa) {
		if (arg == PPS_PAD_NONE) {
			*how = PPS_SIGN_RSA_RAW;
			return check_pss(key, in, len, pps_cakey_bits(key));
		}
		if (arg == PPS_PAD_PKCS1 && is_pss)
			return refuse(PPS_ERR_OP, "PKCS#1 v1.5 on an RSA-PSS "
			    "key");
		if (arg == PPS_PAD_PKCS1) {
			*how = PPS_SIGN_RSA_PKCS1;
			return check_digestinfo(in, len);
		}
		return refuse(PPS_ERR_OP, "RSA padding not allowed");
	}
	if (op == PPS_OP_ECDSA_SIGN && !is_rsa) {
		if (arg != 0)
			return refuse(PPS_ERR_OP, "ECDSA takes no argument");
		if (len < 20 || len > 64) {
			pps_seterr("ECDSA digest of %zu bytes (20 to 64)", len);
			status = PPS_ERR_POLICY;
		} else
			status = PPS_OK;
		*how = PPS_SIGN_ECDSA;
		return status;
	}
	if (op == PPS_OP_RSA_PRIV_DEC)
		return refuse(PPS_ERR_OP, "RSA decryption is never performed");
	return refuse(PPS_ERR_OP, is_rsa ? "operation not allowed on an RSA key"
	    : "operation not allowed on an EC key");
}

/* ---- the keys ---- */

struct pps_ca *
pps_ca_new(int index)
{
	struct pps_ca *ca;

	if ((ca = calloc(1, sizeof(*ca))) == NULL) {
		pps_seterr("out of memory");
		return NULL;
	}
	ca->index = index;
	snprintf(ca->who, sizeof(ca->who), "relay %d", index);
	return ca;
}

void
pps_ca_free(struct pps_ca *ca)
{
	free(ca);	/* the keys belong to their Python owners */
}

int
pps_ca_add_key(struct pps_ca *ca, const uint8_t *keyid, struct pps_cakey *key,
    const char *name)
{
	struct ca_key *k;

	if (ca->nkeys == PPS_CA_MAX_KEYS)
		return pps_seterr("more than %d keys", PPS_CA_MAX_KEYS);
	k = &ca->keys[ca->nkeys++];
	memcpy(k->id, keyid, sizeof(k->id));
	k->key = key;
	snprintf(k->name, sizeof(k->name), "%s", name);
	return 0;
}

static struct ca_key *
find_key(struct pps_ca *ca, const uint8_t *id)
{
	int i;

	for (i = 0; i < ca->nkeys; i++)
		if (memcmp(ca->keys[i].id, id, PPS_KEYID_LEN) == 0)
			return &ca->keys[i];
	return NULL;
}

/* ---- requests ---- */

/* The refusal log's rate limit: whether this refusal may be logged now. */
static int
may_log(struct pps_ca *ca);

static void
log_summary(struct pps_ca *ca)
{
	if (ca->suppressed > 0)
		pps_log(LOG_WARNING, "%d more refusals not logged",
		    ca->suppressed);
	ca->suppressed = 0;
}

static void
log_refusal(struct pps_ca *ca, uint32_t id, const struct ca_key *k,
    const uint8_t *keyid, const char *why)
{
	char hex[17];
	int i;

	if (!may_log(ca))
		return;
	for (i = 0; i < 8; i++)
		snprintf(hex + 2 * i, 3, "%02x", keyid[i]);
	pps_log(LOG_WARNING, "refused request %u from %s, key %s: %s", id,
	    ca->who, k != NULL ? k->name : hex, why);
}

static int
may_log(struct pps_ca *ca)
{
	time_t now = time(NULL);

	if (now != ca->second) {
		log_summary(ca);
		ca->second = now;
		ca->logged = 0;
	}
	if (ca->logged == REFUSALS_LOGGED) {
		ca->suppressed++;
		return 0;
	}
	ca->logged++;
	return 1;
}

/*
 * A request's frame, checked by the one header check every reader uses
 * (pps_frame_check, util.c); n may exceed PPS_FRAME_MAX, the buffer has a
 * byte more to tell.  Fills *hdr from the header when there is one, so the
 * reply can echo its id and key.
 */
static int
frame_check(const uint8_t *req, size_t n, struct pps_hdr *hdr)
{
	switch (pps_frame_check(req, n, PPS_FRAME_MAX, hdr)) {
	case 0:
		return PPS_OK;
	case PPS_FRAME_VERSION:
		return PPS_ERR_VERSION;
	default:			/* short, long, lying length */
		return PPS_ERR_FRAME;
	}
}

/*
 * One request frame in, its reply out (always one, in reply, which holds
 * PPS_FRAME_MAX bytes); returns the reply's length.
 */
static size_t
ca_handle(struct pps_ca *ca, const uint8_t *req, size_t n, uint8_t *reply)
{
	struct pps_hdr hdr, rep;
	const struct ca_key *k = NULL;
	const uint8_t *payload = req + sizeof(hdr);
	enum pps_signop how;
	int status, len = 0;

	memset(&rep, 0, sizeof(rep));
	status = frame_check(req, n, &hdr);
	rep.id = hdr.id;			/* zeros without a header */
	memcpy(rep.key, hdr.key, sizeof(rep.key));
	if (status != PPS_OK)
		;
	else if (hdr.type == PPS_OP_PING && hdr.len == 0)
		status = PPS_OK;
	else if ((k = find_key(ca, hdr.key)) == NULL)
		status = refuse(PPS_ERR_NOKEY, "unknown key");
	else if ((status = policy_check(k->key, hdr.type, hdr.arg, payload,
	    hdr.len, &how)) == PPS_OK &&
	    (len = pps_cakey_sign(k->key, how, payload, hdr.len,
	    reply + sizeof(rep), PPS_MAX_PAYLOAD)) < 0) {
		len = 0;
		status = PPS_ERR_CRYPTO;
	}
	if (status != PPS_OK)
		log_refusal(ca, rep.id, k, rep.key, pps_error());
	rep.version = PPS_PROTO_VERSION;
	rep.type = PPS_OP_REPLY;
	rep.arg = status;
	rep.len = len;
	memcpy(reply, &rep, sizeof(rep));
	return sizeof(rep) + len;
}

/* ---- the loop ---- */

/*
 * SIGTERM (the parent stops us) must end the ca whatever it is doing:
 * waiting for a request, waiting to send into a full channel (a relay that
 * stopped reading), or signing.  Its handler only sets a flag, looked at
 * between operations.  It is blocked for as long as the ca serves, and let
 * in only inside the one place the ca waits, ppoll() (ca_ppoll), so that
 * it cannot come between the look at the flag and the wait, and the wait
 * costs no system call but itself.  Sends and receives never block; a
 * SIGTERM that comes while the ca signs is let in at the next wait.
 */
static volatile sig_atomic_t ca_stopping;

static void
ca_sigterm(int signo)
{
	(void)signo;
	ca_stopping = 1;
}

/*
 * Requests read at once, and their replies: with an async relay many
 * requests wait together, and one recvmmsg() takes them all.  Each reply
 * goes out as soon as it is ready, except that the replies of fast
 * operations are sent together (sendmmsg) while the oldest of them has
 * waited less than CA_COALESCE_NS: a slow one (RSA-8192 takes ~40 ms) must
 * not hold back the replies before it, whose relays are counting down.
 */
struct ca_io {
	int		 fd;
	sigset_t	 term;		/* SIGTERM alone */
	sigset_t	 waitmask;	/* while in ppoll(): SIGTERM let in */
	uint8_t		 req[CA_BATCH][PPS_FRAME_MAX + 1];
	size_t		 reqlen[CA_BATCH];
	uint8_t		 reply[CA_BATCH][PPS_FRAME_MAX];
	size_t		 replylen[CA_BATCH];
	int		 nreply, nsent;	/* replies made, and sent of them */
	struct timespec	 oldest;	/* when the oldest unsent one began */
};

/* What a step of the loop came to; IO_STOP: SIGTERM or the channel closed. */
enum { IO_STOP = 0, IO_OK = 1, IO_TIMEOUT = 2, IO_AGAIN = 3, IO_ERR = -1 };

/* ppoll() with io->term let in (timeout_ms -1: for ever). */
static int
ca_ppoll(const struct ca_io *io, struct pollfd *pfd, int n, int timeout_ms)
{
	struct timespec ts;

	ts.tv_sec = timeout_ms / 1000;
	ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000;
	return ppoll(pfd, n, timeout_ms >= 0 ? &ts : NULL, &io->waitmask);
}

/* Block io->term while serving; *old gets the mask to restore. */
static int
ca_block_term(struct ca_io *io, sigset_t *old)
{
	if (sigprocmask(SIG_BLOCK, &io->term, old) == -1)
		return pps_seterr("sigprocmask: %s", strerror(errno));
	io->waitmask = *old;
	return 0;
}

/* Wait for events on the channel (timeout_ms -1: for ever). */
static int
wait_fd(struct ca_io *io, short events, int timeout_ms, short *revents)
{
	struct pollfd pfd = { io->fd, events, 0 };
	int r, saved;

	r = ca_stopping ? 0 : ca_ppoll(io, &pfd, 1, timeout_ms);
	saved = errno;
	if (ca_stopping)
		return IO_STOP;
	if (r == -1) {
		if (saved != EINTR)
			return pps_seterr("ppoll: %s", strerror(saved));
		return IO_AGAIN;	/* another signal (SIGSTOP/SIGCONT) */
	}
	*revents = pfd.revents;
	return r == 0 ? IO_TIMEOUT : IO_OK;
}

static int64_t
ns_since(const struct timespec *t)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(now.tv_sec - t->tv_sec) * 1000000000 +
	    (now.tv_nsec - t->tv_nsec);
}

/* Send every reply made and not sent yet, waiting while the channel is full. */
static int
flush_replies(struct ca_io *io)
{
	short revents;
	int r;
#if defined(__linux__)
	struct mmsghdr out[CA_BATCH];
	struct iovec iov[CA_BATCH];
	int i, n;
#endif

	while (io->nsent < io->nreply) {
#if defined(__linux__)
		n = io->nreply - io->nsent;
		memset(out, 0, sizeof(out[0]) * n);
		for (i = 0; i < n; i++) {
			iov[i].iov_base = io->reply[io->nsent + i];
			iov[i].iov_len = io->replylen[io->nsent + i];
			out[i].msg_hdr.msg_iov = &iov[i];
			out[i].msg_hdr.msg_iovlen = 1;
		}
		r = sendmmsg(io->fd, out, n, MSG_DONTWAIT | MSG_NOSIGNAL);
#else
		r = send(io->fd, io->reply[io->nsent],
		    io->replylen[io->nsent], MSG_DONTWAIT | MSG_NOSIGNAL) ==
		    -1 ? -1 : 1;
#endif
		if (r > 0) {
			io->nsent += r;
			continue;
		}
		if (r == -1 && errno != EAGAIN && errno != EWOULDBLOCK &&
		    errno != EINTR && errno != ENOBUFS)
			return pps_seterr("send: %s", strerror(errno));
		/* the relay is not reading: wait, but not past a SIGTERM */
		if ((r = wait_fd(io, POLLOUT, -1, &revents)) == IO_STOP ||
		    r == IO_ERR)
			return r;
	}
	return IO_OK;
}

/* Read what requests wait (at least one is there): how many, or IO_*. */
static int
read_requests(struct ca_io *io)
{
#if defined(__linux__)
	struct mmsghdr in[CA_BATCH];
	struct iovec iov[CA_BATCH];
	int i, n;

	memset(in, 0, sizeof(in));
	for (i = 0; i < CA_BATCH; i++) {
		iov[i].iov_base = io->req[i];
		iov[i].iov_len = sizeof(io->req[i]);
		in[i].msg_hdr.msg_iov = &iov[i];
		in[i].msg_hdr.msg_iovlen = 1;
	}
	if ((n = recvmmsg(io->fd, in, CA_BATCH, MSG_DONTWAIT, NULL)) == -1)
		goto fail;
	for (i = 0; i < n; i++)
		io->reqlen[i] = in[i].msg_len;
	return n;
#else
	ssize_t n;

	if ((n = recv(io->fd, io->req[0], sizeof(io->req[0]), MSG_DONTWAIT)) ==
	    -1)
		goto fail;
	io->reqlen[0] = n;
	return 1;
#endif
fail:
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
		return 0;
	return pps_seterr("recv: %s", strerror(errno));
}

static int
hung_up(int fd)
{
	struct pollfd pfd = { fd, POLLIN, 0 };

	return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP);
}

static int
serve(struct pps_ca *ca, struct ca_io *io)
{
	short revents;
	int i, n, r;

	for (;;) {
		/* a flood's count is logged once a second passes quietly */
		r = wait_fd(io, POLLIN, ca->suppressed > 0 ? 1000 : -1,
		    &revents);
		if (r == IO_TIMEOUT)
			log_summary(ca);
		if (r == IO_TIMEOUT || r == IO_AGAIN)
			continue;
		if (r != IO_OK)
			return r;
		if ((n = read_requests(io)) < 0)
			return IO_ERR;
		io->nreply = io->nsent = 0;
		for (i = 0; i < n; i++) {
			/* no bytes: a malformed frame, unless the channel hung up */
			if (io->reqlen[i] == 0 && hung_up(io->fd))
				return IO_STOP;
			if (io->nsent < io->nreply &&
			    ns_since(&io->oldest) > CA_COALESCE_NS &&
			    (r = flush_replies(io)) != IO_OK)
				return r;
			if (ca_stopping)
				return IO_STOP;
			if (io->nsent == io->nreply)
				clock_gettime(CLOCK_MONOTONIC, &io->oldest);
			io->replylen[i] = ca_handle(ca, io->req[i],
			    io->reqlen[i], io->reply[i]);
			io->nreply++;
		}
		if ((r = flush_replies(io)) != IO_OK)
			return r;
	}
}

/*
 * Answer until the channel closes or SIGTERM comes (0), or the channel
 * fails (-1).  A message of no bytes is a malformed frame, not the end:
 * only POLLHUP is.  SIGTERM is ours while serving; the caller's handler
 * is back when this returns.
 */
int
pps_ca_serve(struct pps_ca *ca, int fd)
{
	static struct ca_io io;		/* 70 KB of frames: not on the stack */
	struct sigaction sa, oldsa;
	sigset_t mask;
	int r;

	io.fd = fd;
	sigemptyset(&io.term);
	sigaddset(&io.term, SIGTERM);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = ca_sigterm;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;		/* no SA_RESTART: ppoll() must return */
	ca_stopping = 0;
	if (sigaction(SIGTERM, &sa, &oldsa) == -1)
		return pps_seterr("sigaction: %s", strerror(errno));
	if (ca_block_term(&io, &mask) == -1) {
		sigaction(SIGTERM, &oldsa, NULL);
		return -1;
	}
	sigdelset(&io.waitmask, SIGTERM);
	r = serve(ca, &io);
	sigprocmask(SIG_SETMASK, &mask, NULL);
	sigaction(SIGTERM, &oldsa, NULL);
	return r == IO_STOP ? 0 : -1;
}

/* ---- a key service: many clients on a listening socket ---- */

/*
 * A keyservice ca (pyprivsep.conf(5) "keyservice") serves programs we did
 * not write.  Several cas share one listening SOCK_SEQPACKET socket, as
 * relays share their listeners: each accepts (non-blocking; the kernel
 * hands a connection to one of them) and serves its clients from one
 * ppoll() loop, with the policy and the error replies a relay's requests
 * get (ca_handle above, the same code).
 *
 * Who may connect (SO_PEERCRED, read once, at accept): the peer's uid is
 * in `uids` (the "allow user" users and the members of the "allow group"
 * groups, both resolved by the parent before we were forked), or the
 * peer's gid (its effective gid when it connected) is in `gids` (the
 * "allow group" groups).  The peer's supplementary groups are not looked
 * at.  Anyone else is closed at once, and logged (rate-limited) with its
 * uid, gid and pid.
 *
 * Bounds: KS_MAX_CLIENTS connections; one beyond is accepted and closed
 * (and logged).  A client's replies go out with non-blocking sends; when
 * its socket is full the one reply waits and its requests are not read
 * until it went out; a client whose socket stays full KS_STALL_MS is
 * dropped.  A client that hangs up is dropped.  SIGTERM ends the ca at
 * once, whatever it does; SIGUSR1 (a reload retiring this generation)
 * makes it stop accepting and end once its last client is gone.
 */
#if defined(__OpenBSD__)
#define ucred		sockpeercred	/* uid, gid, pid: the same fields */
#endif

#define KS_MAX_CLIENTS	1024
#define KS_STALL_MS	2000		/* a full socket this long: dropped */
#define KS_READS	16		/* frames read from a client at once */
#define KS_ACCEPTS	64		/* connections accepted at once */
#define KS_PAUSE_MS	100		/* no descriptor left: accept later */

struct ks_client {
	int		 fd;
	pid_t		 pid;
	uid_t		 uid;
	gid_t		 gid;
	int		 pending;	/* reply waits for room */
	size_t		 plen;
	struct timespec	 since;		/* ... since */
	uint8_t		 reply[PPS_FRAME_MAX];
};

struct ks {
	struct ks_client clients[KS_MAX_CLIENTS];
	struct pollfd	 pfd[KS_MAX_CLIENTS + 1];
	uint8_t		 req[PPS_FRAME_MAX + 1];
	int		 nclients;
	int		 lfd;
	struct timespec	 paused;	/* out of descriptors: accept again */
	int		 pause;		/* ... once KS_PAUSE_MS passed */
	const uint32_t	*uids, *gids;
	int		 nuids, ngids;
};

static volatile sig_atomic_t ks_draining;

static void
ks_sigusr1(int signo)
{
	(void)signo;
	ks_draining = 1;
}

static int
ks_allowed(const struct ks *ks, uid_t uid, gid_t gid)
{
	int i;

	for (i = 0; i < ks->nuids; i++)
		if (ks->uids[i] == uid)
			return 1;
	for (i = 0; i < ks->ngids; i++)
		if (ks->gids[i] == gid)
			return 1;
	return 0;
}

static void
ks_drop(struct pps_ca *ca, struct ks_client *c, const char *why)
{
	if (why != NULL)
		pps_log(LOG_INFO, "client pid %d uid %u: %s, dropped",
		    (int)c->pid, (unsigned)c->uid, why);
	else
		pps_log(LOG_DEBUG, "client pid %d uid %u hung up", (int)c->pid,
		    (unsigned)c->uid);
	(void)ca;
	close(c->fd);
	c->fd = -1;
}

static void
ks_accept(struct pps_ca *ca, struct ks *ks)
{
	struct ucred cred;
	socklen_t len;
	int i, fd;

	for (i = 0; i < KS_ACCEPTS; i++) {
		if ((fd = accept4(ks->lfd, NULL, NULL,
		    SOCK_NONBLOCK | SOCK_CLOEXEC)) == -1) {
			/* the waiting connection stays readable: polling it
			 * again at once would spin */
			if (errno == EMFILE || errno == ENFILE ||
			    errno == ENOBUFS || errno == ENOMEM) {
				ks->pause = 1;
				clock_gettime(CLOCK_MONOTONIC, &ks->paused);
			}
			if (errno != EAGAIN && errno != EWOULDBLOCK &&
			    errno != EINTR && errno != ECONNABORTED &&
			    may_log(ca))
				pps_log(LOG_WARNING, "accept: %s",
				    strerror(errno));
			return;
		}
		len = sizeof(cred);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) ==
		    -1 || len != sizeof(cred)) {
			if (may_log(ca))
				pps_log(LOG_WARNING, "refused connection: no "
				    "peer credentials: %s", strerror(errno));
			close(fd);
			continue;
		}
		if (!ks_allowed(ks, cred.uid, cred.gid)) {
			if (may_log(ca))
				pps_log(LOG_WARNING, "refused connection from "
				    "uid %u gid %u pid %d: not allowed",
				    (unsigned)cred.uid, (unsigned)cred.gid,
				    (int)cred.pid);
			close(fd);
			continue;
		}
		if (ks->nclients == KS_MAX_CLIENTS) {
			if (may_log(ca))
				pps_log(LOG_WARNING, "refused connection from "
				    "uid %u gid %u pid %d: %d clients already",
				    (unsigned)cred.uid, (unsigned)cred.gid,
				    (int)cred.pid, KS_MAX_CLIENTS);
			close(fd);
			continue;
		}
		ks->clients[ks->nclients].fd = fd;
		ks->clients[ks->nclients].pid = cred.pid;
		ks->clients[ks->nclients].uid = cred.uid;
		ks->clients[ks->nclients].gid = cred.gid;
		ks->clients[ks->nclients].pending = 0;
		ks->nclients++;
		pps_log(LOG_DEBUG, "client pid %d uid %u gid %u connected",
		    (int)cred.pid, (unsigned)cred.uid, (unsigned)cred.gid);
	}
}

/* Send c's waiting reply: 1 sent, 0 no room yet, -1 the client is gone. */
static int
ks_send(struct ks_client *c)
{
	if (send(c->fd, c->reply, c->plen, MSG_DONTWAIT | MSG_NOSIGNAL) !=
	    -1) {
		c->pending = 0;
		return 1;
	}
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS ||
	    errno == EINTR) {
		if (!c->pending)
			clock_gettime(CLOCK_MONOTONIC, &c->since);
		c->pending = 1;
		return 0;
	}
	return -1;
}

/* Read and answer what c sent, a few frames at most (fairness). */
static void
ks_serve_client(struct pps_ca *ca, struct ks *ks, struct ks_client *c)
{
	ssize_t n;
	int i;

	for (i = 0; i < KS_READS && !c->pending && !ca_stopping; i++) {
		n = recv(c->fd, ks->req, sizeof(ks->req), MSG_DONTWAIT);
		if (n == -1) {
			if (errno != EAGAIN && errno != EWOULDBLOCK &&
			    errno != EINTR)
				ks_drop(ca, c, strerror(errno));
			return;
		}
		/* no bytes: a malformed frame, unless the client hung up */
		if (n == 0 && hung_up(c->fd)) {
			ks_drop(ca, c, NULL);
			return;
		}
		snprintf(ca->who, sizeof(ca->who), "client pid %d uid %u",
		    (int)c->pid, (unsigned)c->uid);
		c->plen = ca_handle(ca, ks->req, n, c->reply);
		if (ks_send(c) == -1) {
			ks_drop(ca, c, NULL);
			return;
		}
	}
}

static int
ks_loop(struct pps_ca *ca, struct ks *ks, struct ca_io *io)
{
	int i, r, saved, n, base, timeout_ms, pending;

	for (;;) {
		if (ks_draining && ks->lfd != -1) {
			close(ks->lfd);		/* the new generation accepts */
			ks->lfd = -1;
			pps_log(LOG_INFO, "draining: %d clients", ks->nclients);
		}
		if (ks->lfd == -1 && ks->nclients == 0)
			return IO_STOP;
		if (ks->pause && ns_since(&ks->paused) >
		    (int64_t)KS_PAUSE_MS * 1000000)
			ks->pause = 0;
		base = ks->lfd != -1 && !ks->pause;
		n = 0;
		if (base) {
			ks->pfd[n].fd = ks->lfd;
			ks->pfd[n++].events = POLLIN;
		}
		pending = 0;
		for (i = 0; i < ks->nclients; i++) {
			ks->pfd[n].fd = ks->clients[i].fd;
			ks->pfd[n++].events = ks->clients[i].pending ? POLLOUT :
			    POLLIN;
			pending |= ks->clients[i].pending;
		}
		for (i = 0; i < n; i++)
			ks->pfd[i].revents = 0;
		timeout_ms = pending || ks->pause ? 100 :
		    ca->suppressed > 0 ? 1000 : -1;
		r = ca_stopping || ks_draining != (ks->lfd == -1) ? 0 :
		    ca_ppoll(io, ks->pfd, n, timeout_ms);
		saved = errno;
		if (ca_stopping)
			return IO_STOP;
		if (r == -1 && saved != EINTR)
			return pps_seterr("ppoll: %s", strerror(saved));
		if (r == 0 && ca->suppressed > 0)
			log_summary(ca);
		if (r <= 0 && !pending)
			continue;		/* (a pause ends at the top) */
		/* clients first: ks_accept() appends to the array */
		for (i = 0; i < ks->nclients; i++) {
			struct ks_client *c = &ks->clients[i];
			short rev = r > 0 ? ks->pfd[base + i].revents : 0;

			if (c->pending) {
				if (rev & (POLLERR | POLLHUP | POLLNVAL))
					ks_drop(ca, c, NULL);
				else if ((rev & POLLOUT) && ks_send(c) == -1)
					ks_drop(ca, c, NULL);
				else if (c->pending && ns_since(&c->since) >
				    (int64_t)KS_STALL_MS * 1000000)
					ks_drop(ca, c, "does not read its "
					    "replies");
				continue;
			}
			if (rev & (POLLIN | POLLHUP | POLLERR))
				ks_serve_client(ca, ks, c);
			else if (rev & POLLNVAL)
				ks_drop(ca, c, "invalid descriptor");
		}
		for (i = 0; i < ks->nclients; ) {	/* forget the dropped */
			if (ks->clients[i].fd == -1)
				ks->clients[i] = ks->clients[--ks->nclients];
			else
				i++;
		}
		if (ca_stopping)
			return IO_STOP;
		if (base && r > 0 && (ks->pfd[0].revents & POLLIN))
			ks_accept(ca, ks);
	}
}

/*
 * Serve a key service's clients on the listening socket lfd until SIGTERM
 * (0), or a failure (-1); see the comment above for who may connect.
 */
int
pps_ca_serve_service(struct pps_ca *ca, int lfd, const uint32_t *uids,
    int nuids, const uint32_t *gids, int ngids)
{
	static struct ca_io io;
	static struct ks ks;		/* 1 MB of replies: not on the stack */
	struct sigaction sa, oldterm, oldusr1;
	sigset_t mask;
	int r, i;

	memset(&ks, 0, sizeof(ks));
	ks.lfd = lfd;
	ks.uids = uids;
	ks.nuids = nuids;
	ks.gids = gids;
	ks.ngids = ngids;
	sigemptyset(&io.term);
	sigaddset(&io.term, SIGTERM);
	sigaddset(&io.term, SIGUSR1);
	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;		/* no SA_RESTART: ppoll() must return */
	ca_stopping = 0;
	ks_draining = 0;
	sa.sa_handler = ca_sigterm;
	if (sigaction(SIGTERM, &sa, &oldterm) == -1)
		return pps_seterr("sigaction: %s", strerror(errno));
	sa.sa_handler = ks_sigusr1;
	if (sigaction(SIGUSR1, &sa, &oldusr1) == -1) {
		sigaction(SIGTERM, &oldterm, NULL);
		return pps_seterr("sigaction: %s", strerror(errno));
	}
	if (ca_block_term(&io, &mask) == -1) {
		sigaction(SIGUSR1, &oldusr1, NULL);
		sigaction(SIGTERM, &oldterm, NULL);
		return -1;
	}
	sigdelset(&io.waitmask, SIGTERM);
	sigdelset(&io.waitmask, SIGUSR1);
	r = ks_loop(ca, &ks, &io);
	for (i = 0; i < ks.nclients; i++)
		close(ks.clients[i].fd);
	sigprocmask(SIG_SETMASK, &mask, NULL);
	sigaction(SIGUSR1, &oldusr1, NULL);
	sigaction(SIGTERM, &oldterm, NULL);
	return r == IO_STOP ? 0 : -1;
}
