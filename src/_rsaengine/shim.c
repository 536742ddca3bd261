/*
 * The key shim: an EVP_PKEY that holds only the public half of a
 * certificate's key, with an RSA_METHOD / EC_KEY_METHOD whose private
 * operations become requests to this relay's ca process.
 *
 * RSA_METHOD and EC_KEY_METHOD are deprecated in OpenSSL 3 (and still the
 * only hook that works on OpenSSL 3.0-4.0 and LibreSSL alike, see
 * shared NOTES-openssl.md), hence the local suppression.
 *
 * Until key operations become asynchronous, a request blocks this relay
 * process until the ca answers or the relay's keyop timeout passes, as
 * relayd does.  Every request carries an id; a reply with any other id is
 * a late answer to a request that already timed out and is dropped.
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "engine.h"

static RSA_METHOD	*rsa_meth;
static EC_KEY_METHOD	*ec_meth;
static int		 rsa_idx = -1, ec_idx = -1;
static uint32_t		 next_id;

int
shim_ca_fd(void)
{
	return pps_conf.ca_fd;
}

static const char *
ca_status(unsigned arg)
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
 * Check a frame from the ca: a whole header, a known version, a reply, and
 * a length field that matches the bytes received (so at most
 * PPS_MAX_PAYLOAD).  On success *hdr is the header and *payload points into
 * frame.  Exposed (api.h) for the fuzz test.
 */
int
pps_reply_parse(const uint8_t *frame, size_t n, struct pps_hdr *hdr,
    const uint8_t **payload)
{
	if (n < sizeof(*hdr) || n > PPS_FRAME_MAX)
		return pps_seterr("frame of %zu bytes", n);
	memcpy(hdr, frame, sizeof(*hdr));
	if (hdr->version != PPS_PROTO_VERSION)
		return pps_seterr("version %u", hdr->version);
	if (hdr->type != PPS_OP_REPLY)
		return pps_seterr("type %u is not a reply", hdr->type);
	if (hdr->len != n - sizeof(*hdr))
		return pps_seterr("length field %u, %zu payload bytes", hdr->len,
		    n - sizeof(*hdr));
	*payload = frame + sizeof(*hdr);
	return 0;
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

/* The loop saw the ca socket readable with no request waiting: late replies. */
void
shim_ca_readable(void)
{
	struct pps_hdr hdr;
	uint8_t payload[PPS_MAX_PAYLOAD];
	int r;

	while ((r = ca_recv(&hdr, payload)) > 0)
		pps_log(LOG_DEBUG, "ca: late reply %u dropped", hdr.id);
}

/* Ask the ca; returns the reply's payload length in out, or -1. */
static int
ca_call(const struct keyref *k, int op, int arg, const uint8_t *in,
    size_t inlen, uint8_t *out, size_t outsize)
{
	uint8_t frame[PPS_FRAME_MAX];
	struct pps_hdr hdr, rep;
	uint8_t payload[PPS_MAX_PAYLOAD];
	struct pollfd pfd;
	uint64_t deadline, now;
	int r;

	if (pps_conf.ca_fd == -1 || inlen > PPS_MAX_PAYLOAD)
		return -1;
	memset(&hdr, 0, sizeof(hdr));
	hdr.version = PPS_PROTO_VERSION;
	hdr.type = op;
	hdr.arg = arg;
	hdr.id = ++next_id;
	hdr.len = inlen;
	memcpy(hdr.key, k->id, sizeof(hdr.key));
	memcpy(frame, &hdr, sizeof(hdr));
	memcpy(frame + sizeof(hdr), in, inlen);
	if (send(pps_conf.ca_fd, frame, sizeof(hdr) + inlen,
	    MSG_DONTWAIT | MSG_NOSIGNAL) == -1) {
		pps_log(LOG_WARNING, "ca: request %u not sent: %s", hdr.id,
		    strerror(errno));
		return -1;
	}

	deadline = pps_now_ms() + k->timeout_ms;
	pfd.fd = pps_conf.ca_fd;
	pfd.events = POLLIN;
	while ((now = pps_now_ms()) < deadline) {
		if (poll(&pfd, 1, (int)(deadline - now)) == -1 && errno != EINTR)
			return -1;
		while ((r = ca_recv(&rep, payload)) > 0) {
			if (rep.id != hdr.id) {
				pps_log(LOG_DEBUG, "ca: late reply %u dropped",
				    rep.id);
				continue;
			}
			if (rep.arg != PPS_OK) {
				pps_log(LOG_WARNING, "ca: request %u: %s",
				    rep.id, ca_status(rep.arg));
				return -1;
			}
			if (rep.len > outsize) {
				pps_log(LOG_WARNING, "ca: reply %u too long "
				    "(%u > %zu)", rep.id, rep.len, outsize);
				return -1;
			}
			memcpy(out, payload, rep.len);
			return rep.len;
		}
		if (r == -1) {
			pps_log(LOG_WARNING, "ca: channel closed");
			return -1;
		}
	}
	pps_log(LOG_WARNING, "ca: request %u timed out after %d ms", hdr.id,
	    k->timeout_ms);
	return -1;
}

static int
shim_rsa_priv_enc(int flen, const unsigned char *from, unsigned char *to,
    RSA *rsa, int padding)
{
	const struct keyref *k = RSA_get_ex_data(rsa, rsa_idx);
	int pad, n, size = RSA_size(rsa);

	switch (padding) {
	case RSA_PKCS1_PADDING:
		pad = PPS_PAD_PKCS1;
		break;
	case RSA_NO_PADDING:
		pad = PPS_PAD_NONE;
		break;
	default:
		pps_log(LOG_WARNING, "rsa: padding %d not supported", padding);
		return -1;
	}
	if (k == NULL || flen < 0)
		return -1;
	n = ca_call(k, PPS_OP_RSA_PRIV_ENC, pad, from, flen, to, size);
	if (n != size) {
		if (n >= 0)
			pps_log(LOG_WARNING, "ca: RSA reply of %d bytes, want %d",
			    n, size);
		return -1;
	}
	return n;
}

/* Decryption (static RSA key exchange) is never offered: refuse locally. */
static int
shim_rsa_priv_dec(int flen, const unsigned char *from, unsigned char *to,
    RSA *rsa, int padding)
{
	(void)flen; (void)from; (void)to; (void)rsa; (void)padding;
	return -1;
}

static int
shim_ec_sign(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
    unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *ec)
{
	const struct keyref *k = EC_KEY_get_ex_data(ec, ec_idx);
	int n;

	(void)type;
	if (k == NULL || kinv != NULL || r != NULL || dlen < 0)
		return 0;
	n = ca_call(k, PPS_OP_ECDSA_SIGN, 0, dgst, dlen, sig, ECDSA_size(ec));
	if (n <= 0)
		return 0;
	*siglen = n;
	return 1;
}

static ECDSA_SIG *
shim_ec_sign_sig(const unsigned char *dgst, int dlen, const BIGNUM *kinv,
    const BIGNUM *r, EC_KEY *ec)
{
	unsigned char der[256];
	const unsigned char *p = der;
	unsigned int len;

	if (!shim_ec_sign(0, dgst, dlen, der, &len, kinv, r, ec))
		return NULL;
	return d2i_ECDSA_SIG(NULL, &p, len);
}

int
shim_init(void)
{
	int (*sign)(int, const unsigned char *, int, unsigned char *,
	    unsigned int *, const BIGNUM *, const BIGNUM *, EC_KEY *);
	int (*setup)(EC_KEY *, BN_CTX *, BIGNUM **, BIGNUM **);
	ECDSA_SIG *(*sign_sig)(const unsigned char *, int, const BIGNUM *,
	    const BIGNUM *, EC_KEY *);

	if (rsa_meth != NULL)
		return 0;
	if (RAND_bytes((unsigned char *)&next_id, sizeof(next_id)) != 1)
		return pps_seterr_ssl("RAND_bytes");
	rsa_idx = RSA_get_ex_new_index(0, NULL, NULL, NULL, NULL);
	ec_idx = EC_KEY_get_ex_new_index(0, NULL, NULL, NULL, NULL);
	if (rsa_idx < 0 || ec_idx < 0)
		return pps_seterr_ssl("ex_data index");

	if ((rsa_meth = RSA_meth_dup(RSA_PKCS1_OpenSSL())) == NULL ||
	    !RSA_meth_set1_name(rsa_meth, "pyprivsep ca") ||
	    !RSA_meth_set_priv_enc(rsa_meth, shim_rsa_priv_enc) ||
	    !RSA_meth_set_priv_dec(rsa_meth, shim_rsa_priv_dec))
		return pps_seterr_ssl("RSA_METHOD");

	if ((ec_meth = EC_KEY_METHOD_new(EC_KEY_OpenSSL())) == NULL)
		return pps_seterr_ssl("EC_KEY_METHOD");
	EC_KEY_METHOD_get_sign(ec_meth, &sign, &setup, &sign_sig);
	EC_KEY_METHOD_set_sign(ec_meth, shim_ec_sign, setup, shim_ec_sign_sig);
	return 0;
}

static EVP_PKEY *
shim_rsa(const RSA *pub, const struct keyref *k)
{
	const BIGNUM *n, *e;
	BIGNUM *n2 = NULL, *e2 = NULL;
	EVP_PKEY *pkey = NULL;
	RSA *rsa;

	RSA_get0_key(pub, &n, &e, NULL);
	/* the method goes on first: OpenSSL 3 decides "foreign key" on assign */
	if ((rsa = RSA_new()) == NULL || !RSA_set_method(rsa, rsa_meth) ||
	    (n2 = BN_dup(n)) == NULL || (e2 = BN_dup(e)) == NULL ||
	    !RSA_set0_key(rsa, n2, e2, NULL))
		goto fail;
	n2 = e2 = NULL;
	if (!RSA_set_ex_data(rsa, rsa_idx, (void *)k) ||
	    (pkey = EVP_PKEY_new()) == NULL || !EVP_PKEY_assign_RSA(pkey, rsa))
		goto fail;
	return pkey;
fail:
	pps_seterr_ssl("RSA shim key");
	BN_free(n2);
	BN_free(e2);
	RSA_free(rsa);
	EVP_PKEY_free(pkey);
	return NULL;
}

static EVP_PKEY *
shim_ec(const EC_KEY *pub, const struct keyref *k)
{
	EVP_PKEY *pkey = NULL;
	EC_KEY *ec;

	if ((ec = EC_KEY_new()) == NULL || !EC_KEY_set_method(ec, ec_meth) ||
	    !EC_KEY_set_group(ec, EC_KEY_get0_group(pub)) ||
	    !EC_KEY_set_public_key(ec, EC_KEY_get0_public_key(pub)) ||
	    !EC_KEY_set_ex_data(ec, ec_idx, (void *)k) ||
	    (pkey = EVP_PKEY_new()) == NULL || !EVP_PKEY_assign_EC_KEY(pkey, ec))
		goto fail;
	return pkey;
fail:
	pps_seterr_ssl("EC shim key");
	EC_KEY_free(ec);
	EVP_PKEY_free(pkey);
	return NULL;
}

/* A key for SSL_CTX_use_PrivateKey whose private half is in the ca. */
EVP_PKEY *
shim_pkey(X509 *cert, const struct keyref *k)
{
	EVP_PKEY *pub = X509_get0_pubkey(cert);

	if (shim_init() == -1)
		return NULL;
	if (pub == NULL) {
		pps_seterr_ssl("certificate public key");
		return NULL;
	}
	switch (EVP_PKEY_base_id(pub)) {
	case EVP_PKEY_RSA:
		return shim_rsa(EVP_PKEY_get0_RSA(pub), k);
	case EVP_PKEY_EC:
		return shim_ec(EVP_PKEY_get0_EC_KEY(pub), k);
	default:
		pps_seterr("certificate key type %d not supported (RSA and "
		    "ECDSA only)", EVP_PKEY_base_id(pub));
		return NULL;
	}
}
