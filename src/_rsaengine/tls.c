/*
 * TLS contexts: one SSL_CTX per keypair of a relay block, the first one
 * the default and the others chosen by SNI; session tickets sealed with
 * keys that the parent gives every relay process, so that a session
 * resumes on any of them; OCSP responses stapled per keypair; client
 * certificates verified per relay block.
 */
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ocsp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#if !defined(LIBRESSL_VERSION_NUMBER) && OPENSSL_VERSION_NUMBER >= 0x30000000L
#include <openssl/core_names.h>
#define PPS_TICKET_EVP	1
#else
#include <openssl/hmac.h>
#endif

#include "engine.h"

/* Static RSA key exchange and anything without forward secrecy stay off. */
#define PPS_CIPHERS_DEFAULT	"HIGH:!aNULL"
#define PPS_CIPHERS_FORCED	":!kRSA:!kDHE:!PSK:!SRP:!aNULL:!eNULL"

struct ticket_key {
	uint8_t	name[16];
	uint8_t	hmac[32];
	uint8_t	aes[32];
};

static struct ticket_key tickets[PPS_MAX_TICKET_KEYS];
static int ntickets;
static const EVP_CIPHER *ticket_cipher;	/* AES-256-CBC, see ticket_init() */

/* The parent's keys (PPS_CTL_TICKET_KEYS, or Python before the loop). */
int
pps_ticket_keys(const uint8_t *keys, size_t len)
{
	size_t i, n = len / PPS_TICKET_KEY_LEN;

	if (len % PPS_TICKET_KEY_LEN != 0 || n == 0 || n > PPS_MAX_TICKET_KEYS)
		return pps_seterr("ticket keys: bad length %zu", len);
	for (i = 0; i < n; i++)
		memcpy(&tickets[i], keys + i * PPS_TICKET_KEY_LEN,
		    PPS_TICKET_KEY_LEN);
	OPENSSL_cleanse(&tickets[n], sizeof(tickets) - n * sizeof(tickets[0]));
	ntickets = n;
	return 0;
}

static const struct ticket_key *
ticket_find(const uint8_t *name)
{
	int i;

	for (i = 0; i < ntickets; i++)
		if (memcmp(tickets[i].name, name, sizeof(tickets[i].name)) == 0)
			return &tickets[i];
	return NULL;
}

/*
 * The ticket cipher, once per process: on OpenSSL 3 EVP_aes_256_cbc() is a
 * legacy object that makes every EVP_CipherInit_ex() fetch the provider's
 * implementation again (locks and a property query per ticket); a cipher
 * fetched here is used as it is.
 */
static int
ticket_init(void)
{
	if (ticket_cipher != NULL)
		return 0;
#ifdef PPS_TICKET_EVP
	ticket_cipher = EVP_CIPHER_fetch(NULL, "AES-256-CBC", NULL);
#else
	ticket_cipher = EVP_aes_256_cbc();
#endif
	return ticket_cipher != NULL ? 0 : pps_seterr_ssl("AES-256-CBC");
}

/*
 * The one difference between the two ticket callbacks: how the MAC gets
 * its key.  OpenSSL 3 hands us an EVP_MAC_CTX (HMAC) made for this ticket,
 * so the digest is named on each one: the API takes a name, not an EVP_MD.
 * LibreSSL hands us an HMAC_CTX.
 */
#ifdef PPS_TICKET_EVP
typedef EVP_MAC_CTX	ticket_mac;

static int
ticket_mac_init(EVP_MAC_CTX *mctx, const struct ticket_key *k)
{
	OSSL_PARAM params[3];

	params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY,
	    (void *)k->hmac, sizeof(k->hmac));
	params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
	    (char *)"SHA256", 0);
	params[2] = OSSL_PARAM_construct_end();
	return EVP_MAC_CTX_set_params(mctx, params);
}
#else
typedef HMAC_CTX	ticket_mac;

static int
ticket_mac_init(HMAC_CTX *hctx, const struct ticket_key *k)
{
	return HMAC_Init_ex(hctx, k->hmac, sizeof(k->hmac), EVP_sha256(), NULL);
}
#endif

/*
 * Seal with the newest key; open with any key still held.  A fresh ticket
 * (return 2) for every TLS 1.3 session resumed, as a stock OpenSSL server
 * sends one: a TLS 1.3 ticket is meant for one use (RFC 8446, C.4), and a
 * client given none must reuse the old one or pay a full handshake.  TLS
 * 1.2 gets a fresh one only when the ticket's key is not the newest.  No
 * keys: no tickets.
 */
static int
ticket_cb(SSL *ssl, unsigned char *name, unsigned char *iv,
    EVP_CIPHER_CTX *cctx, ticket_mac *mctx, int enc)
{
	const struct ticket_key *k;

	if (enc) {
		if (ntickets == 0)
			return 0;
		k = &tickets[0];
		memcpy(name, k->name, sizeof(k->name));
		if (RAND_bytes(iv, 16) != 1)
			return -1;
	} else if ((k = ticket_find(name)) == NULL)
		return 0;
	if (!ticket_mac_init(mctx, k) ||
	    !EVP_CipherInit_ex(cctx, ticket_cipher, NULL, k->aes, iv, enc))
		return -1;
	return enc || (k == &tickets[0] && SSL_version(ssl) != TLS1_3_VERSION) ?
	    1 : 2;
}

/* SNI: switch to the first keypair whose certificate names the host. */
static int
sni_cb(SSL *ssl, int *alert, void *arg)
{
	struct relay *r = arg;
	const char *host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
	int i;

	(void)alert;
	if (host == NULL)
		return SSL_TLSEXT_ERR_NOACK;
	for (i = 0; i < r->nkp; i++) {
		if (X509_check_host(r->kp[i].cert, host, 0, 0, NULL) == 1) {
			if (i > 0 && SSL_set_SSL_CTX(ssl, r->kp[i].ctx) == NULL)
				return SSL_TLSEXT_ERR_ALERT_FATAL;
			return SSL_TLSEXT_ERR_OK;
		}
	}
	return SSL_TLSEXT_ERR_NOACK;	/* default certificate */
}

/*
 * ALPN: the first of our protocols (`tls alpn`, in our order of
 * preference) that the client offers.  None in common: the handshake goes
 * on without ALPN (NOACK), as haproxy does, where nginx's HTTP module
 * fails it (no_application_protocol): a client that offers only what the
 * relay does not name still reaches the backend, whose PROXY v2 header
 * then carries no ALPN TLV.  Our own loop rather than
 * SSL_select_next_proto(), whose no-overlap answer points into the
 * client's list (CVE-2024-5535 on an empty one).
 */
static int
alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
    const unsigned char *in, unsigned int inlen, void *arg)
{
	const struct relay *r = arg;
	size_t s, c;

	(void)ssl;
	for (s = 0; s < r->alpn_len; s += 1 + r->alpn[s]) {
		for (c = 0; c < inlen; c += 1 + in[c]) {
			if (in[c] == 0 || in[c] > inlen - c - 1)
				return SSL_TLSEXT_ERR_NOACK;	/* malformed */
			if (in[c] == r->alpn[s] &&
			    memcmp(in + c + 1, r->alpn + s + 1, in[c]) == 0) {
				*out = in + c + 1;
				*outlen = in[c];
				return SSL_TLSEXT_ERR_OK;
			}
		}
	}
	return SSL_TLSEXT_ERR_NOACK;
}

/*
 * Client certificates (tls client ca): the CAs to verify against, their
 * names in the CertificateRequest, and the verify mode.
 */
static int
tls_ctx_client_ca(SSL_CTX *ctx, struct relay *r)
{
	X509_STORE *store = SSL_CTX_get_cert_store(ctx);
	X509 *x;
	int i;

	for (i = 0; i < sk_X509_num(r->client_ca); i++) {
		x = sk_X509_value(r->client_ca, i);
		if (!X509_STORE_add_cert(store, x) ||
		    !SSL_CTX_add_client_CA(ctx, x))
			return pps_seterr_ssl("client CA");
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (r->client_optional ? 0 :
	    SSL_VERIFY_FAIL_IF_NO_PEER_CERT), NULL);
	return 0;
}

/* Both sides' options: no compression, no renegotiation, and a peer that
 * closes without close_notify has ended (as a plain one does with its
 * FIN); the protocol inside sees any truncation. */
long
tls_options(void)
{
	long opts = SSL_OP_NO_COMPRESSION;

#ifdef SSL_OP_NO_RENEGOTIATION
	opts |= SSL_OP_NO_RENEGOTIATION;
#endif
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
	opts |= SSL_OP_IGNORE_UNEXPECTED_EOF;
#endif
	return opts;
}

static SSL_CTX *
tls_ctx(struct relay *r)
{
	char ciphers[1024];
	const char *base = r->ciphers != NULL ? r->ciphers : PPS_CIPHERS_DEFAULT;
	SSL_CTX *ctx;
	long opts = tls_options() | SSL_OP_CIPHER_SERVER_PREFERENCE;

	if ((size_t)snprintf(ciphers, sizeof(ciphers), "%s%s", base,
	    PPS_CIPHERS_FORCED) >= sizeof(ciphers)) {
		pps_seterr("cipher list too long");
		return NULL;
	}
	if (ticket_init() == -1)
		return NULL;
	if ((ctx = SSL_CTX_new(TLS_server_method())) == NULL) {
		pps_seterr_ssl("SSL_CTX_new");
		return NULL;
	}
	SSL_CTX_set_options(ctx, opts);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
	    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
	/* whole records and what follows them in one read(), not a header
	 * then a body */
	SSL_CTX_set_read_ahead(ctx, 1);
	if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
	    !SSL_CTX_set_cipher_list(ctx, ciphers)) {
		pps_seterr_ssl("cipher list");
		SSL_CTX_free(ctx);
		return NULL;
	}
	/* no per-process cache: tickets carry sessions across relay processes */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	if (r->sid_ctx_len > 0)
		SSL_CTX_set_session_id_context(ctx, r->sid_ctx, r->sid_ctx_len);
	else
		SSL_CTX_set_session_id_context(ctx,
		    (const unsigned char *)r->name, strlen(r->name));
	if (r->client_ca != NULL && tls_ctx_client_ca(ctx, r) == -1) {
		SSL_CTX_free(ctx);
		return NULL;
	}
	SSL_CTX_set_timeout(ctx, pps_conf.ticket_lifetime);
#ifdef PPS_TICKET_EVP
	SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb);
#else
	SSL_CTX_set_tlsext_ticket_key_cb(ctx, ticket_cb);
#endif
	SSL_CTX_set_tlsext_servername_callback(ctx, sni_cb);
	SSL_CTX_set_tlsext_servername_arg(ctx, r);
	if (r->alpn != NULL)
		SSL_CTX_set_alpn_select_cb(ctx, alpn_cb, r);
	return ctx;
}

/* A relay block's TLS settings, checked before any keypair is added. */
int
tls_check_relay(struct relay *r)
{
	SSL_CTX *ctx = tls_ctx(r);

	if (ctx == NULL)
		return -1;
	SSL_CTX_free(ctx);
	return 0;
}

/* Certificate chain from PEM in memory: the leaf first, then the chain. */
static int
tls_use_chain(SSL_CTX *ctx, const char *pem, size_t len, X509 **leafp)
{
	BIO *bio;
	X509 *x;
	int ok = 0;

	if ((bio = BIO_new_mem_buf(pem, (int)len)) == NULL)
		return pps_seterr_ssl("BIO_new_mem_buf");
	if ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL ||
	    !SSL_CTX_use_certificate(ctx, x)) {
		pps_seterr_ssl("certificate");
		goto done;
	}
	*leafp = x;
	while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
		if (!SSL_CTX_add0_chain_cert(ctx, x)) {
			X509_free(x);
			pps_seterr_ssl("certificate chain");
			goto done;
		}
	}
	ERR_clear_error();	/* the end of the PEM stream */
	ok = 1;
done:
	BIO_free(bio);
	return ok ? 0 : -1;
}

static EVP_PKEY *
tls_inprocess_key(const char *pem, size_t len)
{
	BIO *bio;
	EVP_PKEY *pkey;

	if ((bio = BIO_new_mem_buf(pem, (int)len)) == NULL)
		return NULL;
	pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
	BIO_free(bio);
	if (pkey == NULL)
		pps_seterr_ssl("private key");
	return pkey;
}

int
tls_keypair(struct relay *r, const char *chain, size_t chain_len,
    const uint8_t *keyid, const char *key_pem, size_t key_len)
{
	struct keypair *kp;
	EVP_PKEY *pkey;

	if (r->nkp == PPS_MAX_KEYPAIRS)
		return pps_seterr("relay %s: more than %d keypairs", r->name,
		    PPS_MAX_KEYPAIRS);
	if (chain_len > INT32_MAX || key_len > INT32_MAX)
		return pps_seterr("relay %s: PEM too large", r->name);
	kp = &r->kp[r->nkp];
	memset(kp, 0, sizeof(*kp));
	memcpy(kp->ref.id, keyid, sizeof(kp->ref.id));
	kp->ref.timeout_ms = r->keyop_timeout_ms;
	if ((kp->ctx = tls_ctx(r)) == NULL ||
	    tls_use_chain(kp->ctx, chain, chain_len, &kp->cert) == -1)
		goto fail;
	pkey = key_pem != NULL ? tls_inprocess_key(key_pem, key_len) :
	    shim_pkey(kp->cert, &kp->ref);
	if (pkey == NULL)
		goto fail;
	if (!SSL_CTX_use_PrivateKey(kp->ctx, pkey)) {
		EVP_PKEY_free(pkey);
		pps_seterr_ssl("key does not match the certificate");
		goto fail;
	}
	EVP_PKEY_free(pkey);
	r->nkp++;
	return 0;
fail:
	SSL_CTX_free(kp->ctx);
	X509_free(kp->cert);
	memset(kp, 0, sizeof(*kp));
	return -1;
}

/*
 * tls client ca: the CA certificates (PEM) client certificates are
 * verified against, before any keypair (each keypair's SSL_CTX gets them).
 * The session id context becomes a digest of the relay's name, the mode
 * and the CAs: a session (a ticket) made under other client certificate
 * rules, e.g. before a reload changed them, does not resume.
 */
int
tls_client_ca(struct relay *r, const char *pem, size_t len, int optional)
{
	STACK_OF(X509) *sk;
	BIO *bio;
	X509 *x;
	EVP_MD_CTX *md = NULL;
	unsigned char mode = optional ? 1 : 0;
	unsigned int n = 0;
	int ok = 0;

	if (r->nkp > 0 || r->client_ca != NULL)
		return pps_seterr("relay %s: client CA after a keypair or twice",
		    r->name);
	if (len == 0 || len > PPS_CLIENT_CA_MAX)
		return pps_seterr("%zu bytes (1 to %d)", len, PPS_CLIENT_CA_MAX);
	if ((sk = sk_X509_new_null()) == NULL)
		return pps_seterr("out of memory");
	if ((bio = BIO_new_mem_buf(pem, (int)len)) == NULL) {
		sk_X509_free(sk);
		return pps_seterr_ssl("BIO_new_mem_buf");
	}
	while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
		if (!sk_X509_push(sk, x)) {
			X509_free(x);
			pps_seterr("out of memory");
			goto done;
		}
	}
	ERR_clear_error();	/* the end of the PEM stream */
	if (sk_X509_num(sk) == 0) {
		pps_seterr("no PEM certificate in it");
		goto done;
	}
	if ((md = EVP_MD_CTX_new()) == NULL ||
	    !EVP_DigestInit_ex(md, EVP_sha256(), NULL) ||
	    !EVP_DigestUpdate(md, r->name, strlen(r->name) + 1) ||
	    !EVP_DigestUpdate(md, &mode, 1) ||
	    !EVP_DigestUpdate(md, pem, len) ||
	    !EVP_DigestFinal_ex(md, r->sid_ctx, &n) || n != sizeof(r->sid_ctx)) {
		pps_seterr_ssl("session id context");
		goto done;
	}
	r->sid_ctx_len = n;
	r->client_ca = sk;
	r->client_optional = optional;
	ok = 1;
done:
	EVP_MD_CTX_free(md);
	BIO_free(bio);
	if (!ok)
		sk_X509_pop_free(sk, X509_free);
	return ok ? 0 : -1;
}

/* Staple the keypair's OCSP response when the client asks for one, while
 * it is in date; OpenSSL frees the copy with the connection. */
static int
status_cb(SSL *ssl, void *arg)
{
	struct keypair *kp = arg;
	unsigned char *copy;
	char subject[256];
	time_t now = time(NULL);

	if (kp->ocsp == NULL)
		return SSL_TLSEXT_ERR_NOACK;
	if (now < kp->ocsp_from || (kp->ocsp_until != 0 &&
	    now >= kp->ocsp_until)) {
		if (!kp->ocsp_stale) {
			kp->ocsp_stale = 1;
			X509_NAME_oneline(X509_get_subject_name(kp->cert),
			    subject, sizeof(subject));
			pps_log(LOG_WARNING, "OCSP response for %s %s: not "
			    "stapled", subject, now < kp->ocsp_from ?
			    "not valid yet" : "past its nextUpdate");
		}
		return SSL_TLSEXT_ERR_NOACK;
	}
	if ((copy = OPENSSL_malloc(kp->ocsp_len)) == NULL)
		return SSL_TLSEXT_ERR_NOACK;
	memcpy(copy, kp->ocsp, kp->ocsp_len);
	if (!SSL_set_tlsext_status_ocsp_resp(ssl, copy, (long)kp->ocsp_len)) {
		OPENSSL_free(copy);
		return SSL_TLSEXT_ERR_NOACK;
	}
	return SSL_TLSEXT_ERR_OK;
}

/* The issuer of the leaf among the chain's certificates (itself if
 * self-issued), or NULL. */
static X509 *
chain_issuer(SSL_CTX *ctx, X509 *leaf)
{
	STACK_OF(X509) *chain = NULL;
	int i;

	if (X509_check_issued(leaf, leaf) == X509_V_OK)
		return leaf;
	if (!SSL_CTX_get0_chain_certs(ctx, &chain) || chain == NULL)
		return NULL;
	for (i = 0; i < sk_X509_num(chain); i++)
		if (X509_check_issued(sk_X509_value(chain, i), leaf) ==
		    X509_V_OK)
			return sk_X509_value(chain, i);
	return NULL;
}

/*
 * Whether one single response of the basic response is for the leaf: the
 * whole cert id (issuer name and key hashes, serial) against the issuer
 * in the chain; without the issuer, the serial and the issuer name hash.
 */
static int
ocsp_for_leaf(OCSP_BASICRESP *basic, X509 *leaf, X509 *issuer)
{
	const OCSP_CERTID *cid;
	OCSP_CERTID *mine;
	ASN1_OCTET_STRING *namehash;
	ASN1_OBJECT *alg;
	ASN1_INTEGER *serial;
	const EVP_MD *md;
	unsigned char buf[EVP_MAX_MD_SIZE];
	unsigned int n;
	int i, found = 0;

	for (i = 0; i < OCSP_resp_count(basic) && !found; i++) {
		cid = OCSP_SINGLERESP_get0_id(OCSP_resp_get0(basic, i));
		if (cid == NULL || !OCSP_id_get0_info(&namehash, &alg, NULL,
		    &serial, (OCSP_CERTID *)cid) ||
		    (md = EVP_get_digestbyobj(alg)) == NULL)
			continue;
		if (issuer != NULL) {
			if ((mine = OCSP_cert_to_id(md, leaf, issuer)) == NULL)
				continue;
			found = OCSP_id_cmp(mine, (OCSP_CERTID *)cid) == 0;
			OCSP_CERTID_free(mine);
			continue;
		}
		found = ASN1_INTEGER_cmp(serial,
		    X509_get0_serialNumber(leaf)) == 0 &&
		    X509_NAME_digest(X509_get_issuer_name(leaf), md, buf, &n) &&
		    (int)n == ASN1_STRING_length(namehash) &&
		    memcmp(buf, ASN1_STRING_get0_data(namehash), n) == 0;
	}
	ERR_clear_error();
	return found;
}

/*
 * tls ... ocsp: the response to staple for the relay's last keypair.
 * The parent checked it already (keys.load_staple: its status, its cert
 * id, its dates); here it is parsed again, by the library that will send
 * it, and matched to the certificate this SSL_CTX serves.
 */
int
tls_ocsp(struct relay *r, const uint8_t *der, size_t len, int64_t not_before,
    int64_t not_after)
{
	struct keypair *kp;
	const unsigned char *p = der;
	OCSP_RESPONSE *resp;
	OCSP_BASICRESP *basic = NULL;
	int status, ok = 0;

	if (r->nkp == 0)
		return pps_seterr("relay %s: an OCSP response but no keypair",
		    r->name);
	kp = &r->kp[r->nkp - 1];
	if (kp->ocsp != NULL)
		return pps_seterr("a second OCSP response for one keypair");
	if (len == 0 || len > PPS_OCSP_MAX)
		return pps_seterr("%zu bytes (1 to %d)", len, PPS_OCSP_MAX);
	if ((resp = d2i_OCSP_RESPONSE(NULL, &p, (long)len)) == NULL)
		return pps_seterr_ssl("not a DER OCSP response");
	if (p != der + len) {
		pps_seterr("%zu bytes after the OCSP response",
		    (size_t)(der + len - p));
		goto done;
	}
	status = OCSP_response_status(resp);
	if (status != OCSP_RESPONSE_STATUS_SUCCESSFUL) {
		pps_seterr("response status %s: nothing to staple",
		    OCSP_response_status_str(status));
		goto done;
	}
	if ((basic = OCSP_response_get1_basic(resp)) == NULL) {
		pps_seterr_ssl("no basic OCSP response");
		goto done;
	}
	if (!ocsp_for_leaf(basic, kp->cert, chain_issuer(kp->ctx, kp->cert))) {
		pps_seterr("not a response for this certificate");
		goto done;
	}
	if ((kp->ocsp = malloc(len)) == NULL) {
		pps_seterr("out of memory");
		goto done;
	}
	memcpy(kp->ocsp, der, len);
	kp->ocsp_len = len;
	kp->ocsp_from = (time_t)not_before;
	kp->ocsp_until = (time_t)not_after;
	kp->ocsp_stale = 0;
	SSL_CTX_set_tlsext_status_cb(kp->ctx, status_cb);
	SSL_CTX_set_tlsext_status_arg(kp->ctx, kp);
	ok = 1;
done:
	OCSP_BASICRESP_free(basic);
	OCSP_RESPONSE_free(resp);
	return ok ? 0 : -1;
}
