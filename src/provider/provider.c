/*
 * The provider's entry point: OSSL_provider_init, the algorithms it offers
 * and its error reasons.  See provider.h for the files and their roles.
 */
#include <stdarg.h>
#include <stdlib.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include "provider.h"

static OSSL_FUNC_core_new_error_fn		*c_new_error;
static OSSL_FUNC_core_set_error_debug_fn	*c_set_error_debug;
static OSSL_FUNC_core_vset_error_fn		*c_vset_error;
static const OSSL_CORE_HANDLE			*err_handle;

const OSSL_ITEM pps_reason_strings[] = {
	{ PPS_R_BAD_REFERENCE,		"bad pyprivsep key reference" },
	{ PPS_R_CA_UNREACHABLE,		"pyprivsep ca unreachable" },
	{ PPS_R_CA_TIMEOUT,		"pyprivsep ca did not answer in time" },
	{ PPS_R_CA_REFUSED,		"pyprivsep ca refused the operation" },
	{ PPS_R_CA_BAD_REPLY,		"malformed reply from the pyprivsep ca" },
	{ PPS_R_UNSUPPORTED_DIGEST,	"digest not supported" },
	{ PPS_R_UNSUPPORTED_PADDING,	"padding not supported" },
	{ PPS_R_NO_PRIVATE_KEY,		"key has no ca (public half only)" },
	{ PPS_R_BUFFER_TOO_SMALL,	"signature buffer too small" },
	{ PPS_R_INTERNAL,		"internal error" },
	{ 0, NULL }
};

void
pps_errors_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in)
{
	err_handle = handle;
	for (; in->function_id != 0; in++) {
		switch (in->function_id) {
		case OSSL_FUNC_CORE_NEW_ERROR:
			c_new_error = OSSL_FUNC_core_new_error(in);
			break;
		case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
			c_set_error_debug = OSSL_FUNC_core_set_error_debug(in);
			break;
		case OSSL_FUNC_CORE_VSET_ERROR:
			c_vset_error = OSSL_FUNC_core_vset_error(in);
			break;
		}
	}
}

void
pps_raise(int reason, const char *fmt, ...)
{
	va_list ap;

	if (c_new_error == NULL || c_vset_error == NULL)
		return;
	c_new_error(err_handle);
	if (c_set_error_debug != NULL)
		c_set_error_debug(err_handle, OPENSSL_FILE, OPENSSL_LINE,
		    PPS_PROV_NAME);
	va_start(ap, fmt);
	c_vset_error(err_handle, (uint32_t)reason, fmt, ap);
	va_end(ap);
}

static const OSSL_ALGORITHM keymgmts[] = {
	{ "RSA:rsaEncryption", "", pps_rsa_keymgmt_functions,
	    "pyprivsep RSA key in a ca" },
	{ "EC:id-ecPublicKey", "", pps_ec_keymgmt_functions,
	    "pyprivsep EC key in a ca" },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM signatures[] = {
	{ "RSA:rsaEncryption", "", pps_rsa_signature_functions,
	    "RSA-PSS and PKCS#1 v1.5 signatures by a pyprivsep ca" },
	{ "ECDSA", "", pps_ecdsa_signature_functions,
	    "ECDSA signatures by a pyprivsep ca" },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM decoders[] = {
	{ "DER", "input=pem", pps_pem2der_decoder_functions,
	    "PEM " PPS_REF_PEM_LABEL " to DER" },
	{ "RSA:rsaEncryption", "input=der", pps_der2rsa_decoder_functions,
	    "pyprivsep key reference to an RSA key" },
	{ "EC:id-ecPublicKey", "input=der", pps_der2ec_decoder_functions,
	    "pyprivsep key reference to an EC key" },
	/* the same, for DER the decoder chain has labelled PrivateKeyInfo
	 * (PEM "PRIVATE KEY"): the chain offers such DER only to decoders of
	 * that structure; ours take the ones under our OID */
	{ "RSA:rsaEncryption", "input=der,structure=PrivateKeyInfo",
	    pps_der2rsa_decoder_functions,
	    "pyprivsep PKCS#8 key reference to an RSA key" },
	{ "EC:id-ecPublicKey", "input=der,structure=PrivateKeyInfo",
	    pps_der2ec_decoder_functions,
	    "pyprivsep PKCS#8 key reference to an EC key" },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM *
query(void *provctx, int operation_id, int *no_cache)
{
	(void)provctx;
	*no_cache = 0;
	switch (operation_id) {
	case OSSL_OP_KEYMGMT:
		return keymgmts;
	case OSSL_OP_SIGNATURE:
		return signatures;
	case OSSL_OP_DECODER:
		return decoders;
	}
	return NULL;
}

static const OSSL_PARAM *
gettable_params(void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR,
		    NULL, 0),
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR,
		    NULL, 0),
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER,
		    NULL, 0),
		OSSL_PARAM_END
	};

	(void)provctx;
	return params;
}

static int
get_params(void *provctx, OSSL_PARAM params[])
{
	OSSL_PARAM *p;

	(void)provctx;
	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME)) != NULL &&
	    !OSSL_PARAM_set_utf8_ptr(p, "pyprivsep key reference provider"))
		return 0;
	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION)) != NULL &&
	    !OSSL_PARAM_set_utf8_ptr(p, "0.1.0"))
		return 0;
	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS)) != NULL &&
	    !OSSL_PARAM_set_int(p, 1))
		return 0;
	return 1;
}

static const OSSL_ITEM *
get_reason_strings(void *provctx)
{
	(void)provctx;
	return pps_reason_strings;
}

static void
teardown(void *provctx)
{
	struct pps_provctx *ctx = provctx;

	OSSL_LIB_CTX_free(ctx->libctx);
	free(ctx);
}

static const OSSL_DISPATCH provider_functions[] = {
	{ OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))teardown },
	{ OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))query },
	{ OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))gettable_params },
	{ OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))get_params },
	{ OSSL_FUNC_PROVIDER_GET_REASON_STRINGS,
	    (void (*)(void))get_reason_strings },
	{ 0, NULL }
};

__attribute__((visibility("default")))
int OSSL_provider_init(const OSSL_CORE_HANDLE *, const OSSL_DISPATCH *,
    const OSSL_DISPATCH **, void **);

/* "timeout" (milliseconds) from the provider's config section, if set */
static int
config_timeout(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in)
{
	OSSL_FUNC_core_get_params_fn *get_params = NULL;
	char *value = NULL, *end;
	OSSL_PARAM params[2];
	long ms;

	for (; in->function_id != 0; in++)
		if (in->function_id == OSSL_FUNC_CORE_GET_PARAMS)
			get_params = OSSL_FUNC_core_get_params(in);
	if (get_params == NULL)
		return PPS_OP_TIMEOUT_MS;
	params[0] = OSSL_PARAM_construct_utf8_ptr("timeout", &value, 0);
	params[1] = OSSL_PARAM_construct_end();
	if (!get_params(handle, params) || value == NULL)
		return PPS_OP_TIMEOUT_MS;
	ms = strtol(value, &end, 10);
	if (end == value || *end != '\0' || ms < 1 || ms > PPS_OP_TIMEOUT_MAX) {
		pps_raise(PPS_R_INTERNAL, "timeout = %s: not 1 to %d ms", value,
		    PPS_OP_TIMEOUT_MAX);
		return -1;
	}
	return (int)ms;
}

int
OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
    const OSSL_DISPATCH **out, void **provctx)
{
	struct pps_provctx *ctx;
	int timeout;

	pps_errors_init(handle, in);
	if ((timeout = config_timeout(handle, in)) < 0)
		return 0;
	if ((ctx = calloc(1, sizeof(*ctx))) == NULL)
		return 0;
	ctx->handle = handle;
	ctx->timeout_ms = timeout;
	/* a child library context: the application's providers (default)
	 * for digests and public keys, and BIOs from the core */
	if ((ctx->libctx = OSSL_LIB_CTX_new_child(handle, in)) == NULL) {
		free(ctx);
		return 0;
	}
	*out = provider_functions;
	*provctx = ctx;
	return 1;
}
