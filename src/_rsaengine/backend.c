/*
 * forward with tls: the relay as a TLS client of its backends.  One
 * client SSL_CTX per relay block (no certificate, no private key: the
 * relay does not authenticate itself to its backends), made when the
 * relay's configuration says `forward with tls`:
 *
 *   - tls backend ca "FILE": the backend's chain is verified against the
 *     CA certificates of FILE, and a backend that fails it is a backend
 *     failure; `tls backend no verify` says, explicitly, that it is not
 *     (relayd's default without `tls ca file`); the parser wants one of
 *     the two;
 *   - tls backend name "NAME": sent as SNI and, when verifying, the name
 *     (or IP address) the certificate must carry.
 *
 * A session per backend host, for the next connection to resume (as
 * haproxy does): the newest one a host gave this relay process, dropped
 * when a handshake with that host fails.
 */
#include <errno.h>
#include <string.h>

#include <arpa/inet.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "engine.h"

#define BACKEND_RBUF	(4 * (PPS_BUFSZ + 512))	/* four TLS records */

/* The host an SSL of ours connects to (its app data): where its session
 * goes. */
static int
new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	struct host *h = SSL_get_app_data(ssl);

	if (h == NULL || !SSL_SESSION_is_resumable(sess))
		return 0;
	SSL_SESSION_free(h->session);
	h->session = sess;
	return 1;		/* ours now */
}

static int
ctx_ca(SSL_CTX *ctx, const char *pem, size_t len)
{
	X509_STORE *store = SSL_CTX_get_cert_store(ctx);
	BIO *bio;
	X509 *x;
	int n = 0;

	if (len == 0 || len > PPS_CLIENT_CA_MAX)
		return pps_seterr("%zu bytes (1 to %d)", len, PPS_CLIENT_CA_MAX);
	if ((bio = BIO_new_mem_buf(pem, (int)len)) == NULL)
		return pps_seterr_ssl("BIO_new_mem_buf");
	while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
		if (!X509_STORE_add_cert(store, x)) {
			X509_free(x);
			BIO_free(bio);
			return pps_seterr_ssl("backend CA");
		}
		X509_free(x);
		n++;
	}
	ERR_clear_error();	/* the end of the PEM stream */
	BIO_free(bio);
	if (n == 0)
		return pps_seterr("no PEM certificate in it");
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	return 0;
}

/* The name the certificate must carry: an IP address or a host name. */
static int
ctx_name(SSL_CTX *ctx, const char *name)
{
	X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
	unsigned char ip[16];

	if (inet_pton(AF_INET, name, ip) == 1 ||
	    inet_pton(AF_INET6, name, ip) == 1)
		return X509_VERIFY_PARAM_set1_ip_asc(param, name) ? 0 :
		    pps_seterr_ssl("backend name");
	X509_VERIFY_PARAM_set_hostflags(param,
	    X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
	return X509_VERIFY_PARAM_set1_host(param, name, 0) ? 0 :
	    pps_seterr_ssl("backend name");
}

/*
 * The relay's client SSL_CTX: ca_pem NULL, no verification; name NULL, no
 * SNI and no name verified.
 */
int
backend_tls_ctx(struct relay *r, const char *ca_pem, size_t ca_len,
    const char *name)
{
	SSL_CTX *ctx;
	long opts = tls_options();

	if (r->backend_ctx != NULL)
		return pps_seterr("relay %s: backend TLS set twice", r->name);
	if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL)
		return pps_seterr_ssl("SSL_CTX_new");
	SSL_CTX_set_options(ctx, opts);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
	    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
	/* read ahead: what the backend sent, four records a recv() (as the
	 * plain path's down buffer takes them), SSL_read() a record each */
	SSL_CTX_set_read_ahead(ctx, 1);
#ifndef LIBRESSL_VERSION_NUMBER
	SSL_CTX_set_default_read_buffer_len(ctx, BACKEND_RBUF);
#endif
	if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
	    !SSL_CTX_set_cipher_list(ctx, "HIGH:!aNULL:!kRSA:!PSK:!SRP")) {
		pps_seterr_ssl("backend ciphers");
		goto fail;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	if (ca_pem != NULL && ctx_ca(ctx, ca_pem, ca_len) == -1)
		goto fail;
	if (name != NULL) {
		if (*name == '\0' || strlen(name) > 253) {
			pps_seterr("bad backend name");
			goto fail;
		}
		if (ca_pem != NULL && ctx_name(ctx, name) == -1)
			goto fail;
		if ((r->backend_name = strdup(name)) == NULL) {
			pps_seterr("out of memory");
			goto fail;
		}
	}
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
	    SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
	r->backend_ctx = ctx;
	return 0;
fail:
	SSL_CTX_free(ctx);
	return -1;
}

/* A client SSL on fd (connected) to h, resuming h's last session; NULL
 * (pps_error set) if none could be made. */
SSL *
backend_tls_new(struct relay *r, struct host *h, int fd)
{
	SSL *ssl;
	unsigned char ip[16];
	const char *sni = r->backend_name;

	if ((ssl = SSL_new(r->backend_ctx)) == NULL ||
	    !SSL_set_fd(ssl, fd)) {
		SSL_free(ssl);
		pps_seterr_ssl("backend SSL");
		return NULL;
	}
	SSL_set_connect_state(ssl);
	SSL_set_app_data(ssl, h);
	/* SNI is a host name: an address is verified, not sent */
	if (sni != NULL && inet_pton(AF_INET, sni, ip) != 1 &&
	    inet_pton(AF_INET6, sni, ip) != 1 &&
	    !SSL_set_tlsext_host_name(ssl, sni)) {
		SSL_free(ssl);
		pps_seterr_ssl("backend SNI");
		return NULL;
	}
	if (h->session != NULL && !SSL_set_session(ssl, h->session)) {
		SSL_SESSION_free(h->session);	/* not for this one: forget it */
		h->session = NULL;
		ERR_clear_error();
	}
	return ssl;
}

/* The handshake with h failed: its session (if one was offered) goes. */
void
backend_tls_failed(struct host *h)
{
	SSL_SESSION_free(h->session);
	h->session = NULL;
}

/* Why a handshake failed: the certificate's fault first. */
const char *
backend_tls_why(SSL *ssl, int ret)
{
	static char buf[256];
	long verify = SSL_get_verify_result(ssl);
	unsigned long e = ERR_peek_last_error();
	int err = SSL_get_error(ssl, ret);

	if (verify != X509_V_OK)
		snprintf(buf, sizeof(buf), "certificate: %s",
		    X509_verify_cert_error_string(verify));
	else if (e != 0)
		ERR_error_string_n(e, buf, sizeof(buf));
	else if (err == SSL_ERROR_SYSCALL && errno != 0 && ret < 0)
		snprintf(buf, sizeof(buf), "%s", strerror(errno));
	else if (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN)
		snprintf(buf, sizeof(buf), "closed during the handshake");
	else
		snprintf(buf, sizeof(buf), "TLS error %d", err);
	ERR_clear_error();
	return buf;
}
