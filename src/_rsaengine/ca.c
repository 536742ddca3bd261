/*
 * The ca's request path: one frame in, one reply out, with no Python on
 * the way.  Python (pyprivsep/ca.py) loads the keys, hardens the process
 * and hands them here; pps_ca_serve() then answers the relay until the
 * channel closes or a signal wants Python's attention.
 *
 * The policy -- what TLS needs of a key and nothing more, so that a relay
 * in an attacker's hands cannot use its ca as an RSA oracle:
 *   RSA, PPS_PAD_NONE:  the block must be a well-formed EMSA-PSS encoding
 *       (RFC 8017 9.1) for the key's modulus with SHA-256/384/512, MGF1 of
 *       the same hash and a salt as long as the hash;
 *   RSA, PPS_PAD_PKCS1: a DigestInfo of SHA-256/384/512 (SHA-1 only when
 *       allowed) with a digest of exactly that length;
 *   ECDSA: a digest of 20 to 64 bytes;
 *   anything else, RSA decryption always, is refused.
 * Each check needs only the public key's size.
 */
#ifdef __linux__
#define _GNU_SOURCE		/* recvmmsg, sendmmsg */
#endif
#include <errno.h>
#include <poll.h>
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
#define CA_BATCH	32		/* requests read (and answered) at once */

struct ca_key {
	uint8_t			 id[PPS_KEYID_LEN];
	struct pps_cakey	*key;
	int			 allow_sha1;
	char			 name[96];
};

struct pps_ca {
	int		 index;
	int		 delay_ms;		/* tests only */
	int		 nkeys;
	struct ca_key	 keys[PPS_CA_MAX_KEYS];
	time_t		 second;		/* refusal log rate limit */
	int		 logged, suppressed;
};

/* ---- the policy ---- */

static const struct digestinfo {
	uint8_t		 prefix[19];
	size_t		 len;			/* of the prefix */
	size_t		 digest;		/* bytes after it */
	int		 sha1;
} digestinfos[] = {
	{ { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	    0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 }, 19, 32, 0 },
	{ { 0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	    0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30 }, 19, 48, 0 },
	{ { 0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	    0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40 }, 19, 64, 0 },
	{ { 0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a,
	    0x05, 0x00, 0x04, 0x14 }, 15, 20, 1 },
};

static int
refuse(int status, const char *why)
{
	pps_seterr("%s", why);
	return status;
}

static int
check_digestinfo(const uint8_t *in, size_t len, int allow_sha1)
{
	size_t i;

	for (i = 0; i < sizeof(digestinfos) / sizeof(digestinfos[0]); i++) {
		const struct digestinfo *d = &digestinfos[i];

		if ((d->sha1 && !allow_sha1) || len != d->len + d->digest)
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

static int
check_pss(const uint8_t *block, size_t len, int bits)
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
		if (pss_db_ok(em, emlen, top, mds[i]))
			return PPS_OK;
	return refuse(PPS_ERR_POLICY, "not a PSS encoding with SHA-2 and a "
	    "digest-length salt");
}

int
pps_policy_check(int is_rsa, int bits, int allow_sha1, int op, int arg,
    const uint8_t *in, size_t len)
{
	if (op == PPS_OP_RSA_PRIV_ENC && is_rsa) {
		if (arg == PPS_PAD_NONE)
			return check_pss(in, len, bits);
		if (arg == PPS_PAD_PKCS1)
			return check_digestinfo(in, len, allow_sha1);
		return refuse(PPS_ERR_OP, "RSA padding not allowed");
	}
	if (op == PPS_OP_ECDSA_SIGN && !is_rsa) {
		if (arg != 0)
			return refuse(PPS_ERR_OP, "ECDSA takes no argument");
		if (len < 20 || len > 64) {
			pps_seterr("ECDSA digest of %zu bytes (20 to 64)", len);
			return PPS_ERR_POLICY;
		}
		return PPS_OK;
	}
	if (op == PPS_OP_RSA_PRIV_DEC)
		return refuse(PPS_ERR_OP, "RSA decryption is never performed");
	return refuse(PPS_ERR_OP, is_rsa ? "operation not allowed on an RSA key"
	    : "operation not allowed on an EC key");
}

/* ---- the keys ---- */

struct pps_ca *
pps_ca_new(int index, int delay_ms)
{
	struct pps_ca *ca;

	if ((ca = calloc(1, sizeof(*ca))) == NULL) {
		pps_seterr("out of memory");
		return NULL;
	}
	ca->index = index;
	ca->delay_ms = delay_ms;
	return ca;
}

void
pps_ca_free(struct pps_ca *ca)
{
	free(ca);	/* the keys belong to their Python owners */
}

int
pps_ca_add_key(struct pps_ca *ca, const uint8_t *keyid, struct pps_cakey *key,
    int allow_sha1, const char *name)
{
	struct ca_key *k;

	if (ca->nkeys == PPS_CA_MAX_KEYS)
		return pps_seterr("more than %d keys", PPS_CA_MAX_KEYS);
	k = &ca->keys[ca->nkeys++];
	memcpy(k->id, keyid, sizeof(k->id));
	k->key = key;
	k->allow_sha1 = allow_sha1;
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
	time_t now = time(NULL);
	char hex[17];
	int i;

	if (now != ca->second) {
		log_summary(ca);
		ca->second = now;
		ca->logged = 0;
	}
	if (ca->logged == REFUSALS_LOGGED) {
		ca->suppressed++;
		return;
	}
	ca->logged++;
	for (i = 0; i < 8; i++)
		snprintf(hex + 2 * i, 3, "%02x", keyid[i]);
	pps_log(LOG_WARNING, "refused request %u from relay %d, key %s: %s", id,
	    ca->index, k != NULL ? k->name : hex, why);
}

/* One request frame in, its reply out (always one); returns its length. */
size_t
pps_ca_handle(struct pps_ca *ca, const uint8_t *req, size_t n, uint8_t *reply,
    size_t replysize)
{
	struct pps_hdr hdr, rep;
	const struct ca_key *k = NULL;
	const uint8_t *payload = req + sizeof(hdr);
	int status, len = 0, is_rsa;

	memset(&rep, 0, sizeof(rep));
	memset(&hdr, 0, sizeof(hdr));
	if (replysize < PPS_FRAME_MAX)
		return 0;
	if (n >= sizeof(hdr)) {
		memcpy(&hdr, req, sizeof(hdr));
		rep.id = hdr.id;
		memcpy(rep.key, hdr.key, sizeof(rep.key));
	}
	if (n < sizeof(hdr))
		status = refuse(PPS_ERR_FRAME, "short frame");
	else if (n > PPS_FRAME_MAX)
		status = refuse(PPS_ERR_FRAME, "frame too long");
	else if (hdr.len != n - sizeof(hdr))
		status = refuse(PPS_ERR_FRAME, "length field does not match");
	else if (hdr.version != PPS_PROTO_VERSION) {
		pps_seterr("version %u", hdr.version);
		status = PPS_ERR_VERSION;
	}
	else if (hdr.type == PPS_OP_PING && hdr.len == 0)
		status = PPS_OK;
	else if ((k = find_key(ca, hdr.key)) == NULL)
		status = refuse(PPS_ERR_NOKEY, "unknown key");
	else {
		is_rsa = pps_cakey_type(k->key) == EVP_PKEY_RSA;
		status = pps_policy_check(is_rsa, pps_cakey_bits(k->key),
		    k->allow_sha1, hdr.type, hdr.arg, payload, hdr.len);
		if (status == PPS_OK && ca->delay_ms > 0)
			usleep(ca->delay_ms * 1000);
		if (status == PPS_OK && (len = pps_cakey_sign(k->key, hdr.type,
		    hdr.arg, payload, hdr.len, reply + sizeof(rep),
		    PPS_MAX_PAYLOAD)) < 0) {
			len = 0;
			status = PPS_ERR_CRYPTO;
		}
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

/*
 * With an async relay many requests wait at once: take up to CA_BATCH of
 * them in one recvmmsg() (waiting for the first only), answer them all,
 * send the answers in one sendmmsg().  Returns what serve_one() does.
 */
#if defined(__linux__)
static int
serve_batch(struct pps_ca *ca, int fd)
{
	static uint8_t req[CA_BATCH][PPS_FRAME_MAX + 1];
	static uint8_t reply[CA_BATCH][PPS_FRAME_MAX];
	struct mmsghdr in[CA_BATCH], out[CA_BATCH];
	struct iovec iin[CA_BATCH], iout[CA_BATCH];
	struct pollfd pfd = { fd, POLLIN, 0 };
	int i, n, sent, r;

	memset(in, 0, sizeof(in));
	memset(out, 0, sizeof(out));
	for (i = 0; i < CA_BATCH; i++) {
		iin[i].iov_base = req[i];
		iin[i].iov_len = sizeof(req[i]);
		in[i].msg_hdr.msg_iov = &iin[i];
		in[i].msg_hdr.msg_iovlen = 1;
	}
	if ((n = recvmmsg(fd, in, CA_BATCH, MSG_WAITFORONE, NULL)) == -1) {
		if (errno == EINTR)
			return 1;
		return pps_seterr("recvmmsg: %s", strerror(errno));
	}
	for (i = 0; i < n; i++) {
		/* no bytes: a malformed frame, unless the channel hung up */
		if (in[i].msg_len == 0 && poll(&pfd, 1, 0) == 1 &&
		    (pfd.revents & POLLHUP))
			return 0;
		iout[i].iov_base = reply[i];
		iout[i].iov_len = pps_ca_handle(ca, req[i], in[i].msg_len,
		    reply[i], sizeof(reply[i]));
		out[i].msg_hdr.msg_iov = &iout[i];
		out[i].msg_hdr.msg_iovlen = 1;
	}
	for (sent = 0; sent < n; sent += r) {
		if ((r = sendmmsg(fd, out + sent, n - sent, MSG_NOSIGNAL)) == -1) {
			if (errno == EINTR) {
				r = 0;
				continue;
			}
			return pps_seterr("sendmmsg: %s", strerror(errno));
		}
	}
	return 2;
}
#endif

/*
 * Answer until the channel closes (0), a signal interrupts (1: Python
 * runs its handler and calls again) or the channel fails (-1).  A message
 * of no bytes is a malformed frame, not the end: only POLLHUP is.
 */
int
pps_ca_serve(struct pps_ca *ca, int fd)
{
	struct pollfd pfd = { fd, POLLIN, 0 };
#if defined(__linux__)
	int r;
#else
	uint8_t req[PPS_FRAME_MAX + 1], reply[PPS_FRAME_MAX];
	ssize_t n;
	size_t m;
#endif

	for (;;) {
		if (ca->suppressed > 0) {	/* a flood's count, once over */
			switch (poll(&pfd, 1, 1000)) {
			case 0:
				log_summary(ca);
				break;
			case -1:
				if (errno == EINTR)
					return 1;
			}
		}
#if defined(__linux__)
		if ((r = serve_batch(ca, fd)) != 2)
			return r;
#else
		n = recv(fd, req, sizeof(req), 0);
		if (n == -1) {
			if (errno == EINTR)
				return 1;
			return pps_seterr("recv: %s", strerror(errno));
		}
		if (n == 0 && poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP))
			return 0;
		m = pps_ca_handle(ca, req, n, reply, sizeof(reply));
		while (send(fd, reply, m, MSG_NOSIGNAL) == -1) {
			if (errno != EINTR)
				return pps_seterr("send: %s", strerror(errno));
		}
#endif
	}
}
