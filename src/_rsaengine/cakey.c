/*
 * The ca side: a private key loaded into OpenSSL, and the one operation a
 * ca performs with it.  The policy (what may be signed) is decided in
 * ca.c, which names the operation; this file only performs it, with
 * OpenSSL's blinded, constant-time code through EVP_PKEY_sign():
 *   PPS_SIGN_RSA_PKCS1: PKCS#1 v1.5 type 1 padding over the DigestInfo
 *   PPS_SIGN_RSA_RAW:   the raw private operation on a full block
 *   PPS_SIGN_ECDSA:     ECDSA over the digest, DER ECDSA-Sig-Value out
 */
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "engine.h"

struct pps_cakey {
	EVP_PKEY	*pkey;
	EVP_PKEY_CTX	*ctx;		/* initialised for signing once */
	int		 type;		/* EVP_PKEY_RSA or EVP_PKEY_EC */
	int		 bits;
};

int
pps_cakey_type(const struct pps_cakey *k)
{
	return k->type;
}

int
pps_cakey_bits(const struct pps_cakey *k)
{
	return k->bits;
}

struct pps_cakey *
pps_cakey_load(const char *key_pem, size_t key_len, const char *cert_pem,
    size_t cert_len)
{
	struct pps_cakey *k = NULL;
	BIO *kb = NULL, *cb = NULL;
	EVP_PKEY *pkey = NULL;
	X509 *cert = NULL;

	if (key_len > INT32_MAX || cert_len > INT32_MAX) {
		pps_seterr("PEM too large");
		return NULL;
	}
	if ((kb = BIO_new_mem_buf(key_pem, (int)key_len)) == NULL ||
	    (cb = BIO_new_mem_buf(cert_pem, (int)cert_len)) == NULL)
		goto ssl_fail;
	if ((pkey = PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL)) == NULL) {
		pps_seterr_ssl("cannot read private key");
		goto fail;
	}
	if ((cert = PEM_read_bio_X509(cb, NULL, NULL, NULL)) == NULL) {
		pps_seterr_ssl("cannot read certificate");
		goto fail;
	}
	if (!X509_check_private_key(cert, pkey)) {
		ERR_clear_error();
		pps_seterr("private key does not match the certificate");
		goto fail;
	}
	if (EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA &&
	    EVP_PKEY_base_id(pkey) != EVP_PKEY_EC) {
		pps_seterr("key type not supported (RSA and ECDSA only)");
		goto fail;
	}
	if ((k = calloc(1, sizeof(*k))) == NULL)
		goto ssl_fail;
	if ((k->ctx = EVP_PKEY_CTX_new(pkey, NULL)) == NULL ||
	    EVP_PKEY_sign_init(k->ctx) <= 0) {
		pps_seterr_ssl("EVP_PKEY_sign_init");
		EVP_PKEY_CTX_free(k->ctx);
		free(k);
		k = NULL;
		goto fail;
	}
	k->pkey = pkey;
	k->type = EVP_PKEY_base_id(pkey);
	k->bits = EVP_PKEY_bits(pkey);
	pkey = NULL;
	goto done;
ssl_fail:
	pps_seterr_ssl("out of memory");
fail:
	EVP_PKEY_free(pkey);
done:
	X509_free(cert);
	BIO_free(kb);
	BIO_free(cb);
	return k;
}

void
pps_cakey_free(struct pps_cakey *k)
{
	if (k == NULL)
		return;
	EVP_PKEY_CTX_free(k->ctx);
	EVP_PKEY_free(k->pkey);
	free(k);
}

int
pps_cakey_sign(struct pps_cakey *k, enum pps_signop how, const uint8_t *in,
    size_t inlen, uint8_t *out, size_t outsize)
{
	size_t outlen = outsize;
	int pad, type, ok;

	switch (how) {
	case PPS_SIGN_RSA_RAW:
		type = EVP_PKEY_RSA;
		pad = RSA_NO_PADDING;
		break;
	case PPS_SIGN_RSA_PKCS1:
		type = EVP_PKEY_RSA;
		pad = RSA_PKCS1_PADDING;
		break;
	case PPS_SIGN_ECDSA:
		type = EVP_PKEY_EC;
		pad = 0;
		break;
	default:
		return pps_seterr("unknown operation %d", (int)how);
	}
	/* the policy matched the key already; a mismatch is a bug, not a key */
	if (k->type != type)
		return pps_seterr("operation %d not for this key", (int)how);
	ok = (pad == 0 || EVP_PKEY_CTX_set_rsa_padding(k->ctx, pad) > 0) &&
	    EVP_PKEY_sign(k->ctx, out, &outlen, in, inlen) > 0;
	if (!ok)
		return pps_seterr_ssl("sign");
	return (int)outlen;
}
