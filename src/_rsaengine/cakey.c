/*
 * The ca side: a private key loaded into OpenSSL, and the one operation a
 * ca performs with it.  The policy (what may be signed) is decided in
 * ca.c, which names the operation; this file only performs it, with
 * OpenSSL's blinded, constant-time code through EVP_PKEY_sign():
 *   PPS_SIGN_RSA_PKCS1: PKCS#1 v1.5 type 1 padding over the DigestInfo
 *   PPS_SIGN_RSA_RAW:   the raw private operation on a full block
 *   PPS_SIGN_ECDSA:     ECDSA over the digest, DER ECDSA-Sig-Value out
 * An RSA-PSS key (id-RSASSA-PSS) signs with PPS_SIGN_RSA_RAW only: OpenSSL
 * allows nothing but PSS padding on such a key, so its private half is
 * imported once into a plain RSA key for the raw operation, and its PSS
 * parameter restrictions (if any) are kept for the policy (ca.c).
 */
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "engine.h"

/* RSA-PSS keys need OpenSSL 3's key import (OSSL_PARAM); not LibreSSL */
#if !defined(LIBRESSL_VERSION_NUMBER) && OPENSSL_VERSION_NUMBER >= 0x30000000L
#define PPS_RSA_PSS_KEYS 1
#include <openssl/core_names.h>
#include <openssl/params.h>
#endif

struct pps_cakey {
	EVP_PKEY	*pkey;
	EVP_PKEY_CTX	*ctx;		/* initialised for signing once */
	int		 type;		/* EVP_PKEY_RSA, _RSA_PSS or _EC */
	int		 bits;
	int		 pss_md;	/* RSA-PSS restriction: NID or NID_undef */
	int		 pss_mgf1_md;
	int		 pss_saltlen;	/* minimum salt length, -1: none */
	struct pps_p11key *p11;		/* in a PKCS#11 token (p11.c): pkey
					 * is the certificate's public key */
};

int
pps_cakey_pss(const struct pps_cakey *k, int *md, int *mgf1_md, int *saltlen)
{
	*md = k->pss_md;
	*mgf1_md = k->pss_mgf1_md;
	*saltlen = k->pss_saltlen;
	return k->type == EVP_PKEY_RSA_PSS;
}

#ifdef PPS_RSA_PSS_KEYS
static int
md_nid(const OSSL_PARAM *p)
{
	const char *name;
	EVP_MD *md;
	int nid;

	if (p == NULL)
		return NID_undef;
	if (!OSSL_PARAM_get_utf8_string_ptr(p, &name))
		return -1;
	if ((md = EVP_MD_fetch(NULL, name, NULL)) == NULL)
		return -1;
	nid = EVP_MD_type(md);
	EVP_MD_free(md);
	return nid;
}

/*
 * An RSA-PSS key: its restrictions into k, and a plain RSA key of the same
 * numbers into *raw (the numbers stay in this process).
 */
static int
pss_import(struct pps_cakey *k, EVP_PKEY *pkey, EVP_PKEY **raw)
{
	OSSL_PARAM *params = NULL, numbers[40];
	const OSSL_PARAM *p;
	EVP_PKEY_CTX *ctx = NULL;
	size_t n;
	int ok = 0;

	*raw = NULL;
	k->pss_md = k->pss_mgf1_md = NID_undef;
	k->pss_saltlen = -1;
	if (EVP_PKEY_todata(pkey, EVP_PKEY_KEYPAIR, &params) <= 0) {
		pps_seterr_ssl("RSA-PSS key");
		goto done;
	}
	k->pss_md = md_nid(OSSL_PARAM_locate_const(params,
	    OSSL_PKEY_PARAM_RSA_DIGEST));
	k->pss_mgf1_md = md_nid(OSSL_PARAM_locate_const(params,
	    OSSL_PKEY_PARAM_RSA_MGF1_DIGEST));
	if ((p = OSSL_PARAM_locate_const(params,
	    OSSL_PKEY_PARAM_RSA_PSS_SALTLEN)) != NULL &&
	    !OSSL_PARAM_get_int(p, &k->pss_saltlen))
		k->pss_saltlen = -2;
	if (k->pss_md == -1 || k->pss_mgf1_md == -1 || k->pss_saltlen < -1) {
		pps_seterr("RSA-PSS key: unreadable parameter restrictions");
		goto done;
	}
	/* the numbers only: a plain RSA key takes no PSS parameters */
	for (n = 0, p = params; p->key != NULL; p++)
		if ((strcmp(p->key, "n") == 0 || strcmp(p->key, "e") == 0 ||
		    strcmp(p->key, "d") == 0 || strncmp(p->key, "rsa-", 4) == 0)
		    && n < sizeof(numbers) / sizeof(numbers[0]) - 1)
			numbers[n++] = *p;
	numbers[n] = OSSL_PARAM_construct_end();
	if ((ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL)) == NULL ||
	    EVP_PKEY_fromdata_init(ctx) <= 0 ||
	    EVP_PKEY_fromdata(ctx, raw, EVP_PKEY_KEYPAIR, numbers) <= 0) {
		pps_seterr_ssl("RSA-PSS key: RSA import");
		goto done;
	}
	ok = 1;
done:
	OSSL_PARAM_free(params);	/* clears the private numbers */
	OPENSSL_cleanse(numbers, sizeof(numbers));	/* (pointers only) */
	EVP_PKEY_CTX_free(ctx);
	return ok;
}
#else
static int
pss_import(struct pps_cakey *k, EVP_PKEY *pkey, EVP_PKEY **raw)
{
	(void)k; (void)pkey;
	*raw = NULL;
	return pps_seterr("RSA-PSS keys need OpenSSL 3") + 1;
}
#endif

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
	    EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA_PSS &&
	    EVP_PKEY_base_id(pkey) != EVP_PKEY_EC) {
		pps_seterr("key type not supported (RSA, RSA-PSS and ECDSA "
		    "only)");
		goto fail;
	}
	if ((k = calloc(1, sizeof(*k))) == NULL)
		goto ssl_fail;
	k->pss_md = k->pss_mgf1_md = NID_undef;
	k->pss_saltlen = -1;
	k->type = EVP_PKEY_base_id(pkey);
	k->bits = EVP_PKEY_bits(pkey);
	if (k->type == EVP_PKEY_RSA_PSS) {
		EVP_PKEY *raw;

		if (!pss_import(k, pkey, &raw)) {
			free(k);
			k = NULL;
			goto fail;
		}
		EVP_PKEY_free(pkey);
		pkey = raw;
	}
	if ((k->ctx = EVP_PKEY_CTX_new(pkey, NULL)) == NULL ||
	    EVP_PKEY_sign_init(k->ctx) <= 0) {
		pps_seterr_ssl("EVP_PKEY_sign_init");
		EVP_PKEY_CTX_free(k->ctx);
		free(k);
		k = NULL;
		goto fail;
	}
	k->pkey = pkey;
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
	pps_p11key_free(k->p11);
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
	if (k->type != type && !(k->type == EVP_PKEY_RSA_PSS &&
	    how == PPS_SIGN_RSA_RAW))
		return pps_seterr("operation %d not for this key", (int)how);
	if (k->p11 != NULL)
		return pps_p11_sign(k->p11, how, in, inlen, out, outsize);
	ok = (pad == 0 || EVP_PKEY_CTX_set_rsa_padding(k->ctx, pad) > 0) &&
	    EVP_PKEY_sign(k->ctx, out, &outlen, in, inlen) > 0;
	if (!ok)
		return pps_seterr_ssl("sign");
	return (int)outlen;
}

/*
 * A key in a PKCS#11 token (p11.c): the certificate's public key stands
 * for it in the policy (type, bits); signing goes to the token.
 */
struct pps_cakey *
pps_cakey_wrap_p11(const char *cert_pem, size_t cert_len,
    struct pps_p11key *p11)
{
	struct pps_cakey *k;
	BIO *cb;
	X509 *cert = NULL;
	EVP_PKEY *pub = NULL;

	if (cert_len > INT32_MAX) {
		pps_seterr("PEM too large");
		return NULL;
	}
	if ((cb = BIO_new_mem_buf(cert_pem, (int)cert_len)) == NULL ||
	    (cert = PEM_read_bio_X509(cb, NULL, NULL, NULL)) == NULL ||
	    (pub = X509_get_pubkey(cert)) == NULL) {
		pps_seterr_ssl("cannot read certificate");
		goto fail;
	}
	if (EVP_PKEY_base_id(pub) != EVP_PKEY_RSA &&
	    EVP_PKEY_base_id(pub) != EVP_PKEY_EC) {
		pps_seterr("key type not supported in a PKCS#11 token (RSA and "
		    "ECDSA only)");
		goto fail;
	}
	if ((k = calloc(1, sizeof(*k))) == NULL) {
		pps_seterr("out of memory");
		goto fail;
	}
	k->pss_md = k->pss_mgf1_md = NID_undef;
	k->pss_saltlen = -1;
	k->type = EVP_PKEY_base_id(pub);
	k->bits = EVP_PKEY_bits(pub);
	k->pkey = pub;
	k->p11 = p11;
	X509_free(cert);
	BIO_free(cb);
	return k;
fail:
	EVP_PKEY_free(pub);
	X509_free(cert);
	BIO_free(cb);
	return NULL;
}

struct pps_p11key *
pps_cakey_p11(struct pps_cakey *k)
{
	return k->p11;
}

EVP_PKEY *
pps_cakey_pub(struct pps_cakey *k)
{
	return k->pkey;
}
