/*
 * The key shim: an EVP_PKEY that holds only the public half of a
 * certificate's key, with an RSA_METHOD / EC_KEY_METHOD whose private
 * operations become requests to this relay's ca process.
 *
 * RSA_METHOD and EC_KEY_METHOD are deprecated in OpenSSL 3, hence the local
 * suppression, but they are the only private-key hook that works on OpenSSL
 * 3.0 to 4.0 and on LibreSSL alike: ENGINE is gone from OpenSSL 4.0 and
 * LibreSSL, and LibreSSL has no providers.  OpenSSL 3 treats a key as
 * "foreign" (and calls our method rather than its provider) only if the
 * method is set before EVP_PKEY_assign_*(), so shim_rsa() and shim_ec() set
 * it first.
 *
 * How a request travels to the ca and its answer back: keyop.c.
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include <string.h>
#include <syslog.h>

#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "engine.h"

static RSA_METHOD	*rsa_meth;
static EC_KEY_METHOD	*ec_meth;
static int		 rsa_idx = -1, ec_idx = -1;

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
	n = keyop_call(k, PPS_OP_RSA_PRIV_ENC, pad, from, flen, to, size);
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
	n = keyop_call(k, PPS_OP_ECDSA_SIGN, 0, dgst, dlen, sig, ECDSA_size(ec));
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

/*
 * An RSA-PSS (id-RSASSA-PSS) certificate key: an EVP_PKEY_RSA_PSS whose RSA
 * has our method and the certificate's PSS restrictions, so that libssl
 * offers rsa_pss_pss_* (only the restricted hash, if any) and OpenSSL
 * PSS-encodes before calling shim_rsa_priv_enc() with RSA_NO_PADDING, as
 * for rsa_pss_rsae_*.  The RSA is decoded afresh from the public key's DER
 * (it is the one way to carry the restrictions over with the public API),
 * so the certificate's own key is untouched.
 */
static EVP_PKEY *
shim_rsa_pss(EVP_PKEY *pub, const struct keyref *k)
{
#if defined(LIBRESSL_VERSION_NUMBER) || OPENSSL_VERSION_NUMBER < 0x30000000L
	(void)pub; (void)k;
	pps_seterr("RSA-PSS certificate keys need OpenSSL 3");
	return NULL;
#else
	unsigned char *der = NULL;
	const unsigned char *p;
	EVP_PKEY *pkey = NULL;
	RSA *rsa = NULL;
	int len;

	if ((len = i2d_PUBKEY(pub, &der)) <= 0)
		goto fail;
	p = der;
	if ((rsa = d2i_RSA_PUBKEY(NULL, &p, len)) == NULL ||
	    !RSA_set_method(rsa, rsa_meth) ||
	    !RSA_set_ex_data(rsa, rsa_idx, (void *)k) ||
	    (pkey = EVP_PKEY_new()) == NULL ||
	    !EVP_PKEY_assign(pkey, EVP_PKEY_RSA_PSS, rsa))
		goto fail;
	OPENSSL_free(der);
	return pkey;
fail:
	pps_seterr_ssl("RSA-PSS shim key");
	OPENSSL_free(der);
	RSA_free(rsa);
	EVP_PKEY_free(pkey);
	return NULL;
#endif
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
	case EVP_PKEY_RSA_PSS:
		return shim_rsa_pss(pub, k);
	case EVP_PKEY_EC:
		return shim_ec(EVP_PKEY_get0_EC_KEY(pub), k);
#ifdef EVP_PKEY_ED25519
	case EVP_PKEY_ED25519:
#endif
#ifdef EVP_PKEY_ED448
	case EVP_PKEY_ED448:
#endif
		return edkey_pkey(pub, k);	/* a provider: edkey.c */
	default:
		pps_seterr("certificate key type %d not supported (RSA, "
		    "RSA-PSS, ECDSA, Ed25519 and Ed448 only)",
		    EVP_PKEY_base_id(pub));
		return NULL;
	}
}
