/*
 * Ed25519 and Ed448 certificate keys whose private half is in the ca.
 *
 * OpenSSL has no RSA_METHOD / EC_KEY_METHOD for EdDSA (shim.c), so the
 * hook is an OpenSSL 3 provider built into the relay: a keymgmt that holds
 * the certificate's public key and the key's struct keyref, and a
 * signature whose one-shot digest_sign (EdDSA signs the whole message, no
 * digest first) sends the message to the ca through keyop_call(), exactly
 * as the shim's callbacks do, so that `keyops async` pauses the handshake's
 * ASYNC job while the ca signs.
 *
 * The provider lives in a library context of its own, so no fetch of the
 * relay's (the default context's certificate decoding, a client's Ed25519
 * certificate) ever finds it.  libssl signs with EVP_DigestSignInit_ex()
 * and a NULL digest in its own context: the signature it fetches there
 * (the default provider's) cannot take our key, whose export refuses the
 * private half, so OpenSSL falls back to the signature of the key's own
 * provider, ours.  SSL_CTX_use_PrivateKey() compares the key with the
 * certificate's by exporting the certificate's public key into our
 * keymgmt (import: public key only) and matching.
 *
 * What the provider is given is only public: the public key and the key
 * id.  The public half is a default-provider key in the default context.
 * LibreSSL has no providers and OpenSSL before 3 no provider API: there,
 * edkey_pkey() says so.  The key service provider (src/provider) is a
 * shared object for other programs, with a connection of its own to a ca;
 * this one's path to the ca is keyop.c, and what the two keymgmts share,
 * the handling of the public half, is src/provider/pubhalf.c.
 */
#include <string.h>
#include <syslog.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#include "engine.h"

int
pps_eddsa_keys(void)
{
#ifdef PPS_EDDSA_KEYS
	return 1;
#else
	return 0;
#endif
}

#ifndef PPS_EDDSA_KEYS

EVP_PKEY *
edkey_pkey(EVP_PKEY *pub, const struct keyref *k)
{
	(void)pub; (void)k;
	pps_seterr("Ed25519 and Ed448 certificate keys need OpenSSL 3");
	return NULL;
}

#else

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "../provider/pubhalf.h"

#define EDKEY_PROV		"pyprivsep-ca"
#define EDKEY_PROPS		"provider=" EDKEY_PROV
#define EDKEY_PARAM_REF		"pyprivsep-keyref"	/* struct keyref */

struct edkey {
	int		 nid;		/* EVP_PKEY_ED25519 or EVP_PKEY_ED448 */
	EVP_PKEY	*pub;		/* the public half; NULL: none yet */
	struct keyref	 ref;
	int		 has_ref;	/* the private half is in the ca */
};

static OSSL_LIB_CTX	*edkey_libctx;

static const char *
ed_name(int nid)
{
	return nid == EVP_PKEY_ED25519 ? "ED25519" : "ED448";
}

static size_t
ed_siglen(int nid)
{
	return nid == EVP_PKEY_ED25519 ? 64 : 114;
}

/* ---- key management: the public key and the reference ---- */

static struct edkey *
ed_new(int nid)
{
	struct edkey *key;

	if ((key = calloc(1, sizeof(*key))) != NULL)
		key->nid = nid;
	return key;
}

static void *
ed25519_new(void *provctx)
{
	(void)provctx;
	return ed_new(EVP_PKEY_ED25519);
}

static void *
ed448_new(void *provctx)
{
	(void)provctx;
	return ed_new(EVP_PKEY_ED448);
}

static void
ed_free(void *keydata)
{
	struct edkey *key = keydata;

	if (key == NULL)
		return;
	EVP_PKEY_free(key->pub);
	free(key);
}

static int
ed_has(const void *keydata, int selection)
{
	const struct edkey *key = keydata;

	return key != NULL && pps_pub_has(key->pub, key->has_ref, selection);
}

static int
ed_match(const void *a, const void *b, int selection)
{
	const struct edkey *k1 = a, *k2 = b;

	(void)selection;
	return k1->nid == k2->nid && pps_pub_match(k1->pub, k2->pub);
}

static int
ed_get_params(void *keydata, OSSL_PARAM params[])
{
	struct edkey *key = keydata;

	return key->pub != NULL && EVP_PKEY_get_params(key->pub, params);
}

static const OSSL_PARAM *
ed_gettable(void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
		OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
		OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_MANDATORY_DIGEST, NULL, 0),
		OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
		OSSL_PARAM_END
	};

	(void)provctx;
	return params;
}

static const OSSL_PARAM *
ed_io_types(int selection)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
		OSSL_PARAM_octet_string(EDKEY_PARAM_REF, NULL, 0),
		OSSL_PARAM_END
	};

	(void)selection;
	return params;
}

/* The public key (a default-provider key in the default context), and
 * the reference if given; a private key is refused. */
static int
ed_import(void *keydata, int selection, const OSSL_PARAM params[])
{
	struct edkey *key = keydata;
	const OSSL_PARAM *p;
	const void *buf;
	size_t len;

	(void)selection;
	if ((p = OSSL_PARAM_locate_const(params, EDKEY_PARAM_REF)) != NULL &&
	    (!OSSL_PARAM_get_octet_string_ptr(p, &buf, &len) ||
	    len != sizeof(key->ref)))
		return 0;
	if (pps_pub_import(NULL, ed_name(key->nid), params, &key->pub) != 1)
		return 0;
	if (p != NULL) {
		memcpy(&key->ref, buf, sizeof(key->ref));
		key->has_ref = 1;
	}
	return 1;
}

static int
ed_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
	return pps_pub_export(((struct edkey *)keydata)->pub, selection, cb,
	    cbarg);
}

static void *
ed_dup(const void *keydata, int selection)
{
	const struct edkey *src = keydata;
	struct edkey *key;

	if ((key = ed_new(src->nid)) == NULL)
		return NULL;
	if (src->pub != NULL && EVP_PKEY_up_ref(src->pub))
		key->pub = src->pub;
	if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0) {
		key->ref = src->ref;
		key->has_ref = src->has_ref;
	}
	return key;
}

static const char *
ed25519_opname(int operation_id)
{
	return operation_id == OSSL_OP_SIGNATURE ? "ED25519" : NULL;
}

static const char *
ed448_opname(int operation_id)
{
	return operation_id == OSSL_OP_SIGNATURE ? "ED448" : NULL;
}

#define ED_KEYMGMT(new, opname) { \
	{ OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))new }, \
	{ OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))ed_free }, \
	{ OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))ed_has }, \
	{ OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))ed_match }, \
	{ OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))ed_get_params }, \
	{ OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))ed_gettable }, \
	{ OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))ed_import }, \
	{ OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))ed_io_types }, \
	{ OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))ed_export }, \
	{ OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))ed_io_types }, \
	{ OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))ed_dup }, \
	{ OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))opname }, \
	{ 0, NULL } }

static const OSSL_DISPATCH ed25519_keymgmt[] =
    ED_KEYMGMT(ed25519_new, ed25519_opname);
static const OSSL_DISPATCH ed448_keymgmt[] =
    ED_KEYMGMT(ed448_new, ed448_opname);

/* ---- signature: the whole message to the ca ---- */

struct edsig {
	const struct edkey *key;
};

static void *
sig_newctx(void *provctx, const char *propq)
{
	(void)provctx; (void)propq;
	return calloc(1, sizeof(struct edsig));
}

static void
sig_freectx(void *ctx)
{
	free(ctx);
}

static void *
sig_dupctx(void *ctx)
{
	struct edsig *dup;

	if ((dup = malloc(sizeof(*dup))) != NULL)
		*dup = *(struct edsig *)ctx;
	return dup;
}

/* EdDSA (pure) takes no digest: mdname NULL or "" (libssl passes NULL). */
static int
sig_init(void *ctx, const char *mdname, void *provkey,
    const OSSL_PARAM params[])
{
	struct edsig *sig = ctx;
	const struct edkey *key = provkey;

	(void)params;
	if (mdname != NULL && mdname[0] != '\0')
		return 0;
	if (key == NULL || !key->has_ref)
		return 0;
	sig->key = key;
	return 1;
}

static int
sig_sign(void *ctx, unsigned char *out, size_t *outlen, size_t outsize,
    const unsigned char *tbs, size_t tbslen)
{
	const struct edkey *key = ((struct edsig *)ctx)->key;
	size_t want;
	int n;

	if (key == NULL)
		return 0;
	want = ed_siglen(key->nid);
	if (out == NULL) {
		*outlen = want;
		return 1;
	}
	if (outsize < want || tbslen > PPS_MAX_PAYLOAD)
		return 0;
	n = keyop_call(&key->ref, PPS_OP_EDDSA_SIGN, 0, tbs, tbslen, out,
	    want);
	if (n < 0 || (size_t)n != want) {
		if (n >= 0)
			pps_log(LOG_WARNING, "ca: EdDSA reply of %d bytes, "
			    "want %zu", n, want);
		return 0;
	}
	*outlen = want;
	return 1;
}

static const OSSL_DISPATCH ed_signature[] = {
	{ OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))sig_newctx },
	{ OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx },
	{ OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_init },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_sign },
	{ 0, NULL }
};

/* ---- the provider ---- */

static const OSSL_ALGORITHM keymgmts[] = {
	{ "ED25519:1.3.101.112", EDKEY_PROPS, ed25519_keymgmt, NULL },
	{ "ED448:1.3.101.113", EDKEY_PROPS, ed448_keymgmt, NULL },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM signatures[] = {
	{ "ED25519:1.3.101.112", EDKEY_PROPS, ed_signature, NULL },
	{ "ED448:1.3.101.113", EDKEY_PROPS, ed_signature, NULL },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM *
prov_query(void *provctx, int operation_id, int *no_cache)
{
	(void)provctx;
	*no_cache = 0;
	switch (operation_id) {
	case OSSL_OP_KEYMGMT:
		return keymgmts;
	case OSSL_OP_SIGNATURE:
		return signatures;
	default:
		return NULL;
	}
}

static const OSSL_DISPATCH prov_functions[] = {
	{ OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))prov_query },
	{ 0, NULL }
};

static int
prov_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
    const OSSL_DISPATCH **out, void **provctx)
{
	(void)in;
	*out = prov_functions;
	*provctx = (void *)handle;
	return 1;
}

static int
edkey_init(void)
{
	if (edkey_libctx != NULL)
		return 0;
	if ((edkey_libctx = OSSL_LIB_CTX_new()) == NULL ||
	    !OSSL_PROVIDER_add_builtin(edkey_libctx, EDKEY_PROV, prov_init) ||
	    OSSL_PROVIDER_load(edkey_libctx, EDKEY_PROV) == NULL) {
		OSSL_LIB_CTX_free(edkey_libctx);
		edkey_libctx = NULL;
		return pps_seterr_ssl("EdDSA key provider");
	}
	return 0;
}

/* A key for SSL_CTX_use_PrivateKey: pub's public key, signing in the ca. */
EVP_PKEY *
edkey_pkey(EVP_PKEY *pub, const struct keyref *k)
{
	unsigned char raw[64];
	size_t len = sizeof(raw);
	OSSL_PARAM params[3];
	EVP_PKEY_CTX *ctx = NULL;
	EVP_PKEY *pkey = NULL;
	struct keyref ref = *k;

	if (edkey_init() == -1)
		return NULL;
	if (!EVP_PKEY_get_raw_public_key(pub, raw, &len))
		goto fail;
	params[0] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
	    raw, len);
	params[1] = OSSL_PARAM_construct_octet_string(EDKEY_PARAM_REF, &ref,
	    sizeof(ref));
	params[2] = OSSL_PARAM_construct_end();
	if ((ctx = EVP_PKEY_CTX_new_from_name(edkey_libctx,
	    EVP_PKEY_base_id(pub) == EVP_PKEY_ED25519 ? "ED25519" : "ED448",
	    EDKEY_PROPS)) == NULL ||
	    EVP_PKEY_fromdata_init(ctx) <= 0 ||
	    EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_KEYPAIR, params) <= 0)
		goto fail;
	EVP_PKEY_CTX_free(ctx);
	return pkey;
fail:
	pps_seterr_ssl("EdDSA shim key");
	EVP_PKEY_CTX_free(ctx);
	return NULL;
}

#endif /* PPS_EDDSA_KEYS */
