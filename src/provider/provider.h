/*
 * pyprivsep's OpenSSL 3 provider: keys whose private half lives in a
 * pyprivsep ca, reached over the wire protocol of ../_rsaengine/protocol.h.
 *
 *   provider.c   entry point, algorithm tables, errors
 *   decoder.c    PEM -> DER (our label), DER -> RSA / EC key (the reference,
 *                bare or inside a PKCS#8 PrivateKeyInfo under our OID)
 *   keyref.c     the key reference's DER (docs/protocol.md) and the key object
 *   keymgmt.c    RSA and EC key management: public half only
 *   signature.c  RSA (PSS, PKCS#1 v1.5) and ECDSA: hash here, sign in the ca
 *   caclient.c   the connection to the ca: lazy, per-process, one mutex
 *
 * No file here ever holds private key material: there is none to hold.
 */
#ifndef PPS_PROVIDER_H
#define PPS_PROVIDER_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include "protocol.h"
#include "pubhalf.h"

#define PPS_PROV_NAME		"pyprivsep"
#define PPS_REF_PEM_LABEL	"PYPRIVSEP KEY REFERENCE"
#define PPS_REF_VERSION		1
#define PPS_SOCKPATH_MAX	107	/* sun_path less its NUL */
#define PPS_OP_TIMEOUT_MS	2000	/* one key operation, each attempt;
					 * "timeout" in the config section */
#define PPS_OP_TIMEOUT_MAX	60000

/* The PKCS#8 algorithm OID: 2.25.230940282644351790577104895185602875045.1
 * (an OID made from a UUID, ITU-T X.667: no registration needed). */
extern const unsigned char pps_ref_oid_der[];
extern const size_t pps_ref_oid_der_len;

/* reason codes of ERR_LIB_PROV-style errors this provider raises */
enum {
	PPS_R_BAD_REFERENCE = 1,
	PPS_R_CA_UNREACHABLE,
	PPS_R_CA_TIMEOUT,
	PPS_R_CA_REFUSED,
	PPS_R_CA_BAD_REPLY,
	PPS_R_UNSUPPORTED_DIGEST,
	PPS_R_UNSUPPORTED_PADDING,
	PPS_R_NO_PRIVATE_KEY,
	PPS_R_BUFFER_TOO_SMALL,
	PPS_R_INTERNAL,
};

struct pps_provctx {
	const OSSL_CORE_HANDLE	*handle;
	OSSL_LIB_CTX		*libctx;	/* a child of the application's */
	int			 timeout_ms;	/* per attempt of a key operation */
};

void pps_raise(int reason, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void pps_errors_init(const OSSL_CORE_HANDLE *, const OSSL_DISPATCH *);
extern const OSSL_ITEM pps_reason_strings[];

/* caclient.c: one connection to a ca socket, shared by the key objects
 * decoded from the same reference (refcounted); a mutex serialises its
 * operations, so threads may share it. */
struct pps_conn;
struct pps_conn *pps_conn_new(const char *path, int timeout_ms);
void pps_conn_ref(struct pps_conn *);
void pps_conn_free(struct pps_conn *);
/* One request; 1 and the reply payload in out/outlen, or 0 with an error
 * raised. */
int pps_conn_call(struct pps_conn *, uint8_t type, uint16_t arg,
    const uint8_t keyid[PPS_KEYID_LEN], const uint8_t *payload, size_t len,
    uint8_t *out, size_t outsize, size_t *outlen);

/* keyref.c: the key object */
struct pps_key {
	struct pps_provctx	*prov;
	int			 type;		/* EVP_PKEY_RSA or EVP_PKEY_EC */
	EVP_PKEY		*pub;		/* the public half, default provider */
	struct pps_conn		*conn;		/* NULL: public only (imported) */
	uint8_t			 keyid[PPS_KEYID_LEN];
};

struct pps_key *pps_key_new(struct pps_provctx *, int type);
void pps_key_free(struct pps_key *);
struct pps_key *pps_key_dup(const struct pps_key *);
/* DER: a bare reference or a PrivateKeyInfo wrapping one under our OID.
 * NULL (no error raised) if it is neither. */
struct pps_key *pps_key_from_der(struct pps_provctx *, const unsigned char *,
    size_t);
const char *pps_key_type_name(int type);

/* algorithm tables */
extern const OSSL_DISPATCH pps_rsa_keymgmt_functions[];
extern const OSSL_DISPATCH pps_ec_keymgmt_functions[];
extern const OSSL_DISPATCH pps_rsa_signature_functions[];
extern const OSSL_DISPATCH pps_ecdsa_signature_functions[];
extern const OSSL_DISPATCH pps_pem2der_decoder_functions[];
extern const OSSL_DISPATCH pps_der2rsa_decoder_functions[];
extern const OSSL_DISPATCH pps_der2ec_decoder_functions[];

#endif
