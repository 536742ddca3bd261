/*
 * Key management for RSA and EC keys whose private half is in a ca.
 * Everything is answered from the public half (a default-provider key);
 * import and export move the public half only: an export that includes
 * the private key is refused, or OpenSSL would sign with the default
 * provider on a public-only copy.
 */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/params.h>

#include "provider.h"
#include "pubhalf.h"

static OSSL_FUNC_keymgmt_new_fn			rsa_new, ec_new;
static OSSL_FUNC_keymgmt_free_fn		km_free;
static OSSL_FUNC_keymgmt_load_fn		km_load;
static OSSL_FUNC_keymgmt_has_fn			km_has;
static OSSL_FUNC_keymgmt_match_fn		km_match;
static OSSL_FUNC_keymgmt_get_params_fn		km_get_params;
static OSSL_FUNC_keymgmt_gettable_params_fn	rsa_gettable, ec_gettable;
static OSSL_FUNC_keymgmt_import_fn		rsa_import, ec_import;
static OSSL_FUNC_keymgmt_import_types_fn	rsa_io_types, ec_io_types;
static OSSL_FUNC_keymgmt_export_fn		km_export;
static OSSL_FUNC_keymgmt_dup_fn			km_dup;
static OSSL_FUNC_keymgmt_query_operation_name_fn rsa_opname, ec_opname;

static void *
rsa_new(void *provctx)
{
	return pps_key_new(provctx, EVP_PKEY_RSA);
}

static void *
ec_new(void *provctx)
{
	return pps_key_new(provctx, EVP_PKEY_EC);
}

static void
km_free(void *keydata)
{
	pps_key_free(keydata);
}

/* The decoder hands over the key object it made: reference points at its
 * pointer, which we take (and clear, so the decoder does not free it). */
static void *
km_load(const void *reference, size_t reference_sz)
{
	struct pps_key **pkey = (struct pps_key **)reference, *key;

	if (reference == NULL || reference_sz != sizeof(*pkey))
		return NULL;
	key = *pkey;
	*pkey = NULL;
	return key;
}

static int
km_has(const void *keydata, int selection)
{
	const struct pps_key *key = keydata;

	return key != NULL && pps_pub_has(key->pub, key->conn != NULL,
	    selection);
}

static int
km_match(const void *a, const void *b, int selection)
{
	const struct pps_key *k1 = a, *k2 = b;

	(void)selection;
	return k1->type == k2->type && pps_pub_match(k1->pub, k2->pub);
}

static int
km_get_params(void *keydata, OSSL_PARAM params[])
{
	struct pps_key *key = keydata;

	if (key->pub == NULL)
		return 0;
	return EVP_PKEY_get_params(key->pub, params);
}

static const OSSL_PARAM *
rsa_gettable(void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
		OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
		OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
		OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
		OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
		OSSL_PARAM_END
	};

	(void)provctx;
	return params;
}

static const OSSL_PARAM *
ec_gettable(void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
		OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
		OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
		OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
		    NULL, 0),
		OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
		    NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
		OSSL_PARAM_END
	};

	(void)provctx;
	return params;
}

static const OSSL_PARAM *
rsa_io_types(int selection)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
		OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
		OSSL_PARAM_END
	};

	(void)selection;
	return params;
}

static const OSSL_PARAM *
ec_io_types(int selection)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
		OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
		OSSL_PARAM_END
	};

	(void)selection;
	return params;
}

/* The public half only: a private component in params is refused. */
static int
import(struct pps_key *key, int selection, const OSSL_PARAM params[])
{
	int r;

	(void)selection;
	r = pps_pub_import(key->prov->libctx, pps_key_type_name(key->type),
	    params, &key->pub);
	if (r == -1)
		pps_raise(PPS_R_NO_PRIVATE_KEY,
		    "this provider holds no private keys");
	return r == 1;
}

static int
rsa_import(void *keydata, int selection, const OSSL_PARAM params[])
{
	return import(keydata, selection, params);
}

static int
ec_import(void *keydata, int selection, const OSSL_PARAM params[])
{
	return import(keydata, selection, params);
}

static int
km_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
	struct pps_key *key = keydata;

	return pps_pub_export(key->pub, selection, cb, cbarg);
}

/* A copy without the private key (selection) cannot reach the ca. */
static void *
km_dup(const void *keydata, int selection)
{
	struct pps_key *key;

	if ((key = pps_key_dup(keydata)) == NULL)
		return NULL;
	if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0 &&
	    key->conn != NULL) {
		pps_conn_free(key->conn);
		key->conn = NULL;
	}
	return key;
}

static const char *
rsa_opname(int operation_id)
{
	return operation_id == OSSL_OP_SIGNATURE ? "RSA" : NULL;
}

static const char *
ec_opname(int operation_id)
{
	return operation_id == OSSL_OP_SIGNATURE ? "ECDSA" : NULL;
}

#define KM_COMMON \
	{ OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))km_free }, \
	{ OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))km_load }, \
	{ OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))km_has }, \
	{ OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))km_match }, \
	{ OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))km_get_params }, \
	{ OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))km_export }, \
	{ OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))km_dup }

const OSSL_DISPATCH pps_rsa_keymgmt_functions[] = {
	KM_COMMON,
	{ OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))rsa_new },
	{ OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))rsa_gettable },
	{ OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))rsa_import },
	{ OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))rsa_io_types },
	{ OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))rsa_io_types },
	{ OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))rsa_opname },
	{ 0, NULL }
};

const OSSL_DISPATCH pps_ec_keymgmt_functions[] = {
	KM_COMMON,
	{ OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))ec_new },
	{ OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))ec_gettable },
	{ OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))ec_import },
	{ OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))ec_io_types },
	{ OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))ec_io_types },
	{ OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))ec_opname },
	{ 0, NULL }
};
