/*
 * The public half of a ca-held key, for a keymgmt: see pubhalf.h.  Built
 * into pyprivsep-provider.so and, for Ed25519/Ed448 keys, into the relay
 * (build_ffi.py); nothing of it with LibreSSL, which has no providers.
 */
#include <openssl/opensslv.h>

#if !defined(LIBRESSL_VERSION_NUMBER) && OPENSSL_VERSION_NUMBER >= 0x30000000L
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "pubhalf.h"

int
pps_pub_import(OSSL_LIB_CTX *libctx, const char *type,
    const OSSL_PARAM params[], EVP_PKEY **pub)
{
	EVP_PKEY_CTX *ctx;
	EVP_PKEY *key = NULL;
	int ok;

	if (OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_D) != NULL ||
	    OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_PRIV_KEY) != NULL)
		return -1;
	if ((ctx = EVP_PKEY_CTX_new_from_name(libctx, type,
	    PPS_PROPQ_DEFAULT)) == NULL)
		return 0;
	ok = EVP_PKEY_fromdata_init(ctx) > 0 &&
	    EVP_PKEY_fromdata(ctx, &key, EVP_PKEY_PUBLIC_KEY,
	    (OSSL_PARAM *)params) > 0;
	EVP_PKEY_CTX_free(ctx);
	if (!ok)
		return 0;
	EVP_PKEY_free(*pub);
	*pub = key;
	return 1;
}

int
pps_pub_export(EVP_PKEY *pub, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
	if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 || pub == NULL)
		return 0;
	return EVP_PKEY_export(pub, selection, cb, cbarg);
}

int
pps_pub_has(const EVP_PKEY *pub, int private_reachable, int selection)
{
	if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0 && pub == NULL)
		return 0;
	/* the private half is there, in the ca, if we know how to reach it */
	return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0 ||
	    private_reachable;
}

int
pps_pub_match(const EVP_PKEY *a, const EVP_PKEY *b)
{
	return a != NULL && b != NULL && EVP_PKEY_eq(a, b) == 1;
}
#endif
