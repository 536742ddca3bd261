/*
 * The public half of a key whose private half is in a ca, as a keymgmt
 * answers for it: shared by the key service provider (keymgmt.c) and the
 * relay's built-in EdDSA provider (../_rsaengine/edkey.c, which compiles
 * pubhalf.c into the relay).  The public half is an ordinary key of the
 * default provider; nothing here ever sees a private key: importing one
 * is refused, and so is any export that asks for one (or OpenSSL would
 * move the key to a provider that signs without the ca).
 */
#ifndef PPS_PUBHALF_H
#define PPS_PUBHALF_H

#include <openssl/core.h>
#include <openssl/evp.h>

/* where the public halves come from */
#define PPS_PROPQ_DEFAULT	"provider=default"

/* An import's public key into *pub (replacing it): 1; 0 failed; -1 the
 * params hold a private key (refused). */
int	pps_pub_import(OSSL_LIB_CTX *, const char *type, const OSSL_PARAM[],
	    EVP_PKEY **pub);
/* keymgmt export: the public half, never the private (0). */
int	pps_pub_export(EVP_PKEY *pub, int selection, OSSL_CALLBACK *, void *);
/* keymgmt has: private_reachable says whether the ca can be asked. */
int	pps_pub_has(const EVP_PKEY *pub, int private_reachable, int selection);
/* keymgmt match: both public halves there and equal. */
int	pps_pub_match(const EVP_PKEY *, const EVP_PKEY *);

#endif
