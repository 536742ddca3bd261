/*
 * Decoders: PEM "-----BEGIN PYPRIVSEP KEY REFERENCE-----" to DER, and DER
 * (the reference, or a PKCS#8 PrivateKeyInfo wrapping it under our OID) to
 * an RSA or EC key object of this provider.  Anything else is left, with
 * no error, to the other providers' decoders (a decoder that returns 1
 * without calling back means "not mine").
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include "provider.h"

#define PPS_DER_MAX	65536

struct decctx {
	struct pps_provctx	*prov;
	int			 type;	/* DER -> key: EVP_PKEY_RSA/EC */
};

static OSSL_FUNC_decoder_newctx_fn	pem2der_newctx, der2rsa_newctx,
					der2ec_newctx;
static OSSL_FUNC_decoder_freectx_fn	freectx;
static OSSL_FUNC_decoder_decode_fn	pem2der_decode, der2key_decode;
static OSSL_FUNC_decoder_does_selection_fn der2key_does_selection;

static void *
newctx(void *provctx, int type)
{
	struct decctx *ctx;

	if ((ctx = calloc(1, sizeof(*ctx))) == NULL)
		return NULL;
	ctx->prov = provctx;
	ctx->type = type;
	return ctx;
}

static void *
pem2der_newctx(void *provctx)
{
	return newctx(provctx, 0);
}

static void *
der2rsa_newctx(void *provctx)
{
	return newctx(provctx, EVP_PKEY_RSA);
}

static void *
der2ec_newctx(void *provctx)
{
	return newctx(provctx, EVP_PKEY_EC);
}

static void
freectx(void *vctx)
{
	free(vctx);
}

static int
pem2der_decode(void *vctx, OSSL_CORE_BIO *cin, int selection,
    OSSL_CALLBACK *data_cb, void *data_cbarg,
    OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
	struct decctx *ctx = vctx;
	char *name = NULL, *header = NULL;
	unsigned char *data = NULL;
	long len = 0;
	BIO *in;
	OSSL_PARAM params[2];
	int ok = 1;

	(void)selection;
	(void)pw_cb;
	(void)pw_cbarg;
	if ((in = BIO_new_from_core_bio(ctx->prov->libctx, cin)) == NULL)
		return 0;
	/* not PEM, or not ours: no error, let the others try */
	ERR_set_mark();
	if (PEM_read_bio(in, &name, &header, &data, &len) <= 0) {
		ERR_pop_to_mark();
		goto out;
	}
	ERR_clear_last_mark();
	if (strcmp(name, PPS_REF_PEM_LABEL) == 0) {
		params[0] = OSSL_PARAM_construct_octet_string(
		    OSSL_OBJECT_PARAM_DATA, data, (size_t)len);
		params[1] = OSSL_PARAM_construct_end();
		ok = data_cb(params, data_cbarg);
	}
out:
	OPENSSL_free(name);
	OPENSSL_free(header);
	OPENSSL_free(data);
	BIO_free(in);
	return ok;
}

static int
der2key_decode(void *vctx, OSSL_CORE_BIO *cin, int selection,
    OSSL_CALLBACK *data_cb, void *data_cbarg,
    OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
	struct decctx *ctx = vctx;
	unsigned char *buf = NULL;
	size_t len = 0, n;
	struct pps_key *key = NULL;
	OSSL_PARAM params[4];
	int objtype = OSSL_OBJECT_PKEY, ok = 1;
	BIO *in;

	(void)selection;
	(void)pw_cb;
	(void)pw_cbarg;
	if ((in = BIO_new_from_core_bio(ctx->prov->libctx, cin)) == NULL)
		return 0;
	if ((buf = malloc(PPS_DER_MAX)) == NULL)
		goto out;
	while (len < PPS_DER_MAX && BIO_read_ex(in, buf + len, PPS_DER_MAX - len,
	    &n) && n > 0)
		len += n;
	/* not a reference: not ours, no error; a bad reference of ours
	 * leaves its error (and the next decoders may still try) */
	if ((key = pps_key_from_der(ctx->prov, buf, len)) == NULL)
		goto out;
	if (key->type != ctx->type)
		goto out;		/* the other decoder's */
	params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &objtype);
	params[1] = OSSL_PARAM_construct_utf8_string(
	    OSSL_OBJECT_PARAM_DATA_TYPE, (char *)pps_key_type_name(key->type), 0);
	/* the keymgmt's load() takes the object and clears our pointer */
	params[2] = OSSL_PARAM_construct_octet_string(
	    OSSL_OBJECT_PARAM_REFERENCE, &key, sizeof(key));
	params[3] = OSSL_PARAM_construct_end();
	ok = data_cb(params, data_cbarg);
out:
	pps_key_free(key);
	free(buf);
	BIO_free(in);
	return ok;
}

static int
der2key_does_selection(void *provctx, int selection)
{
	(void)provctx;
	return selection == 0 ||
	    (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0;
}

const OSSL_DISPATCH pps_pem2der_decoder_functions[] = {
	{ OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))pem2der_newctx },
	{ OSSL_FUNC_DECODER_FREECTX, (void (*)(void))freectx },
	{ OSSL_FUNC_DECODER_DECODE, (void (*)(void))pem2der_decode },
	{ 0, NULL }
};

const OSSL_DISPATCH pps_der2rsa_decoder_functions[] = {
	{ OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))der2rsa_newctx },
	{ OSSL_FUNC_DECODER_FREECTX, (void (*)(void))freectx },
	{ OSSL_FUNC_DECODER_DOES_SELECTION,
	    (void (*)(void))der2key_does_selection },
	{ OSSL_FUNC_DECODER_DECODE, (void (*)(void))der2key_decode },
	{ 0, NULL }
};

const OSSL_DISPATCH pps_der2ec_decoder_functions[] = {
	{ OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))der2ec_newctx },
	{ OSSL_FUNC_DECODER_FREECTX, (void (*)(void))freectx },
	{ OSSL_FUNC_DECODER_DOES_SELECTION,
	    (void (*)(void))der2key_does_selection },
	{ OSSL_FUNC_DECODER_DECODE, (void (*)(void))der2key_decode },
	{ 0, NULL }
};
