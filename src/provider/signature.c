/*
 * Signatures by the ca: RSA-PSS (we build the EMSA-PSS block, RFC 8017
 * 9.1.1, and the ca checks it before its raw private operation), RSA
 * PKCS#1 v1.5 (we build the DigestInfo) and ECDSA (we send the digest).
 * Messages are hashed here with the default provider's digests.  SHA-1 and
 * any digest the ca would refuse are refused at init, so libssl, which
 * asks (EVP_PKEY_digestsign_supports_digest), never picks them.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include "provider.h"

struct sigctx {
	struct pps_provctx	*prov;
	int			 ecdsa;
	struct pps_key		*key;		/* borrowed: the EVP_PKEY's */
	EVP_MD			*md;
	EVP_MD_CTX		*mdctx;		/* digest_sign_* only */
	int			 pad;		/* RSA_PKCS1_(PSS_)PADDING */
	int			 saltlen;	/* RSA_PSS_SALTLEN_DIGEST or bytes */
	char			 mgf1[32];	/* "" = the message digest */
};

static OSSL_FUNC_signature_newctx_fn		rsa_newctx, ecdsa_newctx;
static OSSL_FUNC_signature_freectx_fn		freectx;
static OSSL_FUNC_signature_dupctx_fn		dupctx;
static OSSL_FUNC_signature_sign_init_fn		sign_init;
static OSSL_FUNC_signature_sign_fn		sign;
static OSSL_FUNC_signature_digest_sign_init_fn	digest_sign_init;
static OSSL_FUNC_signature_digest_sign_update_fn digest_sign_update;
static OSSL_FUNC_signature_digest_sign_final_fn	digest_sign_final;
static OSSL_FUNC_signature_get_ctx_params_fn	get_ctx_params;
static OSSL_FUNC_signature_gettable_ctx_params_fn gettable_ctx_params;
static OSSL_FUNC_signature_set_ctx_params_fn	set_ctx_params;
static OSSL_FUNC_signature_settable_ctx_params_fn settable_ctx_params;

static void *
newctx(void *provctx, int ecdsa)
{
	struct sigctx *ctx;

	if ((ctx = calloc(1, sizeof(*ctx))) == NULL)
		return NULL;
	ctx->prov = provctx;
	ctx->ecdsa = ecdsa;
	ctx->pad = RSA_PKCS1_PADDING;
	ctx->saltlen = RSA_PSS_SALTLEN_DIGEST;
	return ctx;
}

static void *
rsa_newctx(void *provctx, const char *propq)
{
	(void)propq;
	return newctx(provctx, 0);
}

static void *
ecdsa_newctx(void *provctx, const char *propq)
{
	(void)propq;
	return newctx(provctx, 1);
}

static void
freectx(void *vctx)
{
	struct sigctx *ctx = vctx;

	if (ctx == NULL)
		return;
	EVP_MD_CTX_free(ctx->mdctx);
	EVP_MD_free(ctx->md);
	free(ctx);
}

static void *
dupctx(void *vctx)
{
	struct sigctx *src = vctx, *ctx;

	if ((ctx = malloc(sizeof(*ctx))) == NULL)
		return NULL;
	*ctx = *src;
	ctx->md = NULL;
	ctx->mdctx = NULL;
	if (src->md != NULL) {
		if (!EVP_MD_up_ref(src->md))
			goto fail;
		ctx->md = src->md;
	}
	if (src->mdctx != NULL) {
		if ((ctx->mdctx = EVP_MD_CTX_new()) == NULL ||
		    !EVP_MD_CTX_copy_ex(ctx->mdctx, src->mdctx))
			goto fail;
	}
	return ctx;
fail:
	freectx(ctx);
	return NULL;
}

/* The digests the ca signs with: SHA-2 (RSA: 256/384/512, as its policy). */
static int
digest_allowed(const struct sigctx *ctx, const EVP_MD *md)
{
	if (EVP_MD_is_a(md, "SHA256") || EVP_MD_is_a(md, "SHA384") ||
	    EVP_MD_is_a(md, "SHA512"))
		return 1;
	return ctx->ecdsa && EVP_MD_is_a(md, "SHA224");
}

static int
set_digest(struct sigctx *ctx, const char *mdname)
{
	EVP_MD *md;

	if ((md = EVP_MD_fetch(ctx->prov->libctx, mdname,
	    PPS_PROPQ_DEFAULT)) == NULL) {
		pps_raise(PPS_R_UNSUPPORTED_DIGEST, "%s", mdname);
		return 0;
	}
	if (!digest_allowed(ctx, md)) {
		pps_raise(PPS_R_UNSUPPORTED_DIGEST, "%s: not signed by the ca",
		    mdname);
		EVP_MD_free(md);
		return 0;
	}
	EVP_MD_free(ctx->md);
	ctx->md = md;
	return 1;
}

static int
init(struct sigctx *ctx, void *provkey, const OSSL_PARAM params[])
{
	struct pps_key *key = provkey;

	if (key != NULL) {
		if (key->conn == NULL || key->pub == NULL) {
			pps_raise(PPS_R_NO_PRIVATE_KEY, "no ca for this key");
			return 0;
		}
		if ((key->type == EVP_PKEY_EC) != ctx->ecdsa) {
			pps_raise(PPS_R_INTERNAL, "wrong key type");
			return 0;
		}
		ctx->key = key;
	}
	if (ctx->key == NULL) {
		pps_raise(PPS_R_NO_PRIVATE_KEY, "no key");
		return 0;
	}
	return set_ctx_params(ctx, params);
}

static int
sign_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
	return init(vctx, provkey, params);
}

static int
digest_sign_init(void *vctx, const char *mdname, void *provkey,
    const OSSL_PARAM params[])
{
	struct sigctx *ctx = vctx;

	if (!init(ctx, provkey, NULL))
		return 0;
	if (!set_digest(ctx, mdname != NULL ? mdname : "SHA256"))
		return 0;
	if (ctx->mdctx == NULL && (ctx->mdctx = EVP_MD_CTX_new()) == NULL)
		return 0;
	if (!EVP_DigestInit_ex2(ctx->mdctx, ctx->md, NULL))
		return 0;
	return set_ctx_params(ctx, params);
}

static int
digest_sign_update(void *vctx, const unsigned char *data, size_t datalen)
{
	struct sigctx *ctx = vctx;

	return ctx->mdctx != NULL &&
	    EVP_DigestUpdate(ctx->mdctx, data, datalen);
}

/* MGF1 (RFC 8017 B.2.1): mask ^= MGF1(seed) over masklen bytes */
static int
mgf1_xor(uint8_t *mask, size_t masklen, const uint8_t *seed, size_t seedlen,
    const EVP_MD *md)
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	uint8_t out[EVP_MAX_MD_SIZE], cnt[4];
	unsigned int outlen;
	size_t done = 0, i;
	uint32_t counter = 0;
	int ok = 0;

	if (c == NULL)
		return 0;
	while (done < masklen) {
		cnt[0] = (uint8_t)(counter >> 24);
		cnt[1] = (uint8_t)(counter >> 16);
		cnt[2] = (uint8_t)(counter >> 8);
		cnt[3] = (uint8_t)counter;
		if (!EVP_DigestInit_ex2(c, md, NULL) ||
		    !EVP_DigestUpdate(c, seed, seedlen) ||
		    !EVP_DigestUpdate(c, cnt, 4) ||
		    !EVP_DigestFinal_ex(c, out, &outlen))
			goto out;
		for (i = 0; i < outlen && done < masklen; i++)
			mask[done++] ^= out[i];
		counter++;
	}
	ok = 1;
out:
	EVP_MD_CTX_free(c);
	return ok;
}

/* EMSA-PSS-ENCODE (RFC 8017 9.1.1) into block, the full modulus length
 * (a leading 0 when modBits - 1 is a multiple of 8). */
static int
pss_encode(const struct sigctx *ctx, const uint8_t *mhash, size_t hlen,
    uint8_t *block, size_t klen)
{
	static const uint8_t zeros[8];
	int modbits = EVP_PKEY_get_bits(ctx->key->pub);
	size_t embits = (size_t)modbits - 1, emlen = (embits + 7) / 8, dblen;
	uint8_t salt[EVP_MAX_MD_SIZE], *em, *h;
	unsigned int l;
	EVP_MD_CTX *c;
	int ok;

	if (modbits <= 0 || emlen > klen || emlen < 2 * hlen + 2)
		return 0;
	memset(block, 0, klen);
	em = block + (klen - emlen);
	dblen = emlen - hlen - 1;
	h = em + dblen;
	if (RAND_bytes_ex(ctx->prov->libctx, salt, hlen, 0) <= 0)
		return 0;
	if ((c = EVP_MD_CTX_new()) == NULL)
		return 0;
	ok = EVP_DigestInit_ex2(c, ctx->md, NULL) &&
	    EVP_DigestUpdate(c, zeros, sizeof(zeros)) &&
	    EVP_DigestUpdate(c, mhash, hlen) &&
	    EVP_DigestUpdate(c, salt, hlen) &&
	    EVP_DigestFinal_ex(c, h, &l) && l == hlen;
	EVP_MD_CTX_free(c);
	if (!ok)
		return 0;
	/* DB = PS || 0x01 || salt, then masked */
	em[dblen - hlen - 1] = 0x01;
	memcpy(em + dblen - hlen, salt, hlen);
	if (!mgf1_xor(em, dblen, h, hlen, ctx->md))
		return 0;
	em[0] &= (uint8_t)(0xff >> (8 * emlen - embits));
	em[emlen - 1] = 0xbc;
	OPENSSL_cleanse(salt, sizeof(salt));
	return 1;
}

static const uint8_t di_sha256[] = { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09,
	0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
	0x04, 0x20 };
static const uint8_t di_sha384[] = { 0x30, 0x41, 0x30, 0x0d, 0x06, 0x09,
	0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00,
	0x04, 0x30 };
static const uint8_t di_sha512[] = { 0x30, 0x51, 0x30, 0x0d, 0x06, 0x09,
	0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00,
	0x04, 0x40 };

/* Sign a digest of the context's hash (sign() without a digest set: the
 * SHA-2 of that length). */
static int
sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
    const unsigned char *tbs, size_t tbslen)
{
	struct sigctx *ctx = vctx;
	uint8_t payload[PPS_MAX_PAYLOAD];
	const uint8_t *prefix;
	size_t len, prefixlen, hlen, klen, outlen;
	uint16_t arg = 0;
	uint8_t op;
	int maxsize;

	if (ctx->key == NULL) {
		pps_raise(PPS_R_NO_PRIVATE_KEY, "no key");
		return 0;
	}
	maxsize = EVP_PKEY_get_size(ctx->key->pub);
	if (maxsize <= 0)
		return 0;
	if (sig == NULL) {
		*siglen = (size_t)maxsize;
		return 1;
	}
	if (ctx->md == NULL) {
		const char *name = tbslen == 32 ? "SHA256" : tbslen == 48 ?
		    "SHA384" : tbslen == 64 ? "SHA512" : tbslen == 28 &&
		    ctx->ecdsa ? "SHA224" : NULL;

		if (name == NULL || !set_digest(ctx, name)) {
			pps_raise(PPS_R_UNSUPPORTED_DIGEST, "digest length");
			return 0;
		}
	}
	hlen = (size_t)EVP_MD_get_size(ctx->md);
	if (tbslen != hlen) {
		pps_raise(PPS_R_INTERNAL, "digest length %zu", tbslen);
		return 0;
	}
	klen = (size_t)maxsize;
	if (ctx->ecdsa) {
		op = PPS_OP_ECDSA_SIGN;
		memcpy(payload, tbs, tbslen);
		len = tbslen;
	} else if (ctx->pad == RSA_PKCS1_PSS_PADDING) {
		if (ctx->mgf1[0] != '\0' && !EVP_MD_is_a(ctx->md, ctx->mgf1)) {
			pps_raise(PPS_R_UNSUPPORTED_PADDING,
			    "MGF1 must use the message digest");
			return 0;
		}
		if (ctx->saltlen != RSA_PSS_SALTLEN_DIGEST &&
		    ctx->saltlen != (int)hlen) {
			pps_raise(PPS_R_UNSUPPORTED_PADDING,
			    "salt length must be the digest length");
			return 0;
		}
		if (klen > sizeof(payload) ||
		    !pss_encode(ctx, tbs, hlen, payload, klen)) {
			pps_raise(PPS_R_INTERNAL, "PSS encoding");
			return 0;
		}
		op = PPS_OP_RSA_PRIV_ENC;
		arg = PPS_PAD_NONE;
		len = klen;
	} else if (ctx->pad == RSA_PKCS1_PADDING) {
		if (EVP_MD_is_a(ctx->md, "SHA256"))
			prefix = di_sha256, prefixlen = sizeof(di_sha256);
		else if (EVP_MD_is_a(ctx->md, "SHA384"))
			prefix = di_sha384, prefixlen = sizeof(di_sha384);
		else if (EVP_MD_is_a(ctx->md, "SHA512"))
			prefix = di_sha512, prefixlen = sizeof(di_sha512);
		else {
			pps_raise(PPS_R_UNSUPPORTED_DIGEST, "PKCS#1 digest");
			return 0;
		}
		memcpy(payload, prefix, prefixlen);
		memcpy(payload + prefixlen, tbs, tbslen);
		op = PPS_OP_RSA_PRIV_ENC;
		arg = PPS_PAD_PKCS1;
		len = prefixlen + tbslen;
	} else {
		pps_raise(PPS_R_UNSUPPORTED_PADDING, "padding %d", ctx->pad);
		return 0;
	}
	if (sigsize < klen) {
		pps_raise(PPS_R_BUFFER_TOO_SMALL, "%zu < %zu", sigsize, klen);
		return 0;
	}
	if (!pps_conn_call(ctx->key->conn, op, arg, ctx->key->keyid, payload,
	    len, sig, sigsize, &outlen))
		return 0;
	if (!ctx->ecdsa && outlen != klen) {
		pps_raise(PPS_R_CA_BAD_REPLY, "signature of %zu bytes", outlen);
		return 0;
	}
	*siglen = outlen;
	return 1;
}

static int
digest_sign_final(void *vctx, unsigned char *sig, size_t *siglen,
    size_t sigsize)
{
	struct sigctx *ctx = vctx;
	uint8_t digest[EVP_MAX_MD_SIZE];
	unsigned int dlen;

	if (ctx->mdctx == NULL)
		return 0;
	if (sig == NULL)
		return sign(ctx, NULL, siglen, 0, NULL, 0);
	if (!EVP_DigestFinal_ex(ctx->mdctx, digest, &dlen))
		return 0;
	return sign(ctx, sig, siglen, sigsize, digest, dlen);
}

static int
get_ctx_params(void *vctx, OSSL_PARAM params[])
{
	struct sigctx *ctx = vctx;
	OSSL_PARAM *p;

	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL &&
	    !OSSL_PARAM_set_utf8_string(p, ctx->md != NULL ?
	    EVP_MD_get0_name(ctx->md) : ""))
		return 0;
	if (ctx->ecdsa)
		return 1;
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL) {
		if (p->data_type == OSSL_PARAM_INTEGER) {
			if (!OSSL_PARAM_set_int(p, ctx->pad))
				return 0;
		} else if (!OSSL_PARAM_set_utf8_string(p,
		    ctx->pad == RSA_PKCS1_PSS_PADDING ? "pss" : "pkcs1"))
			return 0;
	}
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL) {
		if (p->data_type == OSSL_PARAM_INTEGER) {
			if (!OSSL_PARAM_set_int(p, ctx->saltlen))
				return 0;
		} else if (ctx->saltlen == RSA_PSS_SALTLEN_DIGEST) {
			if (!OSSL_PARAM_set_utf8_string(p, "digest"))
				return 0;
		} else {
			char buf[16];

			snprintf(buf, sizeof(buf), "%d", ctx->saltlen);
			if (!OSSL_PARAM_set_utf8_string(p, buf))
				return 0;
		}
	}
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST)) != NULL &&
	    !OSSL_PARAM_set_utf8_string(p, ctx->mgf1[0] != '\0' ? ctx->mgf1 :
	    ctx->md != NULL ? EVP_MD_get0_name(ctx->md) : ""))
		return 0;
	return 1;
}

/* The parameters a context has, to get and to set alike. */
static const OSSL_PARAM ctx_params[] = {
	OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
	OSSL_PARAM_END
};

static const OSSL_PARAM *
gettable_ctx_params(void *vctx, void *provctx)
{
	(void)vctx;
	(void)provctx;
	return ctx_params;
}

static int
set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
	struct sigctx *ctx = vctx;
	const OSSL_PARAM *p;
	const char *s;
	int n;

	if (params == NULL)
		return 1;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL) {
		if (!OSSL_PARAM_get_utf8_string_ptr(p, &s) || !set_digest(ctx, s))
			return 0;
		if (ctx->mdctx != NULL &&
		    !EVP_DigestInit_ex2(ctx->mdctx, ctx->md, NULL))
			return 0;
	}
	if (ctx->ecdsa)
		return 1;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL) {
		if (p->data_type == OSSL_PARAM_INTEGER) {
			if (!OSSL_PARAM_get_int(p, &n))
				return 0;
		} else if (OSSL_PARAM_get_utf8_string_ptr(p, &s)) {
			n = strcmp(s, "pss") == 0 ? RSA_PKCS1_PSS_PADDING :
			    strcmp(s, "pkcs1") == 0 ? RSA_PKCS1_PADDING : -1;
		} else
			return 0;
		if (n != RSA_PKCS1_PADDING && n != RSA_PKCS1_PSS_PADDING) {
			pps_raise(PPS_R_UNSUPPORTED_PADDING, "padding mode");
			return 0;
		}
		ctx->pad = n;
	}
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL) {
		if (p->data_type == OSSL_PARAM_INTEGER) {
			if (!OSSL_PARAM_get_int(p, &n))
				return 0;
		} else if (OSSL_PARAM_get_utf8_string_ptr(p, &s)) {
			n = strcmp(s, "digest") == 0 ? RSA_PSS_SALTLEN_DIGEST :
			    strcmp(s, "max") == 0 ? RSA_PSS_SALTLEN_MAX :
			    strcmp(s, "auto") == 0 ? RSA_PSS_SALTLEN_AUTO :
			    atoi(s);
		} else
			return 0;
		/* the ca signs with salt = hash length only */
		if (n != RSA_PSS_SALTLEN_DIGEST && (n < 0 || (ctx->md != NULL &&
		    n != EVP_MD_get_size(ctx->md)))) {
			pps_raise(PPS_R_UNSUPPORTED_PADDING,
			    "salt length must be the digest length");
			return 0;
		}
		ctx->saltlen = n;
	}
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST)) != NULL) {
		if (!OSSL_PARAM_get_utf8_string_ptr(p, &s) ||
		    strlen(s) >= sizeof(ctx->mgf1))
			return 0;
		strcpy(ctx->mgf1, s);
	}
	return 1;
}

static const OSSL_PARAM *
settable_ctx_params(void *vctx, void *provctx)
{
	(void)vctx;
	(void)provctx;
	return ctx_params;
}

#define SIG_COMMON \
	{ OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))freectx }, \
	{ OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))dupctx }, \
	{ OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sign_init }, \
	{ OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sign }, \
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))digest_sign_init }, \
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))digest_sign_update }, \
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))digest_sign_final }, \
	{ OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))get_ctx_params }, \
	{ OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))gettable_ctx_params }, \
	{ OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))set_ctx_params }, \
	{ OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))settable_ctx_params }

const OSSL_DISPATCH pps_rsa_signature_functions[] = {
	{ OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))rsa_newctx },
	SIG_COMMON,
	{ 0, NULL }
};

const OSSL_DISPATCH pps_ecdsa_signature_functions[] = {
	{ OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))ecdsa_newctx },
	SIG_COMMON,
	{ 0, NULL }
};
