/*
 * The ca's policy for Ed25519 and Ed448 keys (PPS_OP_EDDSA_SIGN).  EdDSA
 * signs the whole message, not a digest, so the ca sees what it signs and
 * allows exactly the two messages a TLS server signs with such a key:
 *
 *   TLS 1.3 CertificateVerify (RFC 8446 4.4.3): 64 bytes 0x20, the
 *       context string "TLS 1.3, server CertificateVerify", a 0 byte, and
 *       a transcript hash of 32 (SHA-256) or 48 (SHA-384) bytes.  The
 *       client's context string is refused: a relay is a server, and a
 *       key that signed as a client could be used to log in elsewhere.
 *
 *   TLS 1.2 ServerKeyExchange (RFC 8422 5.4, RFC 4492): client_random
 *       (32) || server_random (32) || ServerECDHParams: curve_type 3
 *       (named_curve), a group the relay offers (x25519, x448, P-256,
 *       P-384, P-521), a 1-byte length that is that group's share length,
 *       the share (an uncompressed point for the NIST curves), and
 *       nothing after it.  Ed25519 certificates authenticate ECDHE_ECDSA
 *       suites only, so no DHE parameters.
 *
 * Everything else is refused with PPS_ERR_POLICY.
 */
#include <string.h>

#include "engine.h"

#define TLS13_PAD	64
static const char tls13_server[] = "TLS 1.3, server CertificateVerify";

static const struct {
	uint16_t	 id;		/* NamedGroup */
	uint8_t		 len;		/* its key share */
	uint8_t		 point;		/* an uncompressed X9.62 point */
} ske_groups[] = {
	{ 29, 32, 0 },		/* x25519 */
	{ 30, 56, 0 },		/* x448 */
	{ 23, 65, 1 },		/* secp256r1 */
	{ 24, 97, 1 },		/* secp384r1 */
	{ 25, 133, 1 },		/* secp521r1 */
};

static int
tls13_ok(const uint8_t *in, size_t len)
{
	size_t ctxlen = sizeof(tls13_server);	/* with its 0 byte */
	size_t i, hash = len - TLS13_PAD - ctxlen;

	if (len <= TLS13_PAD + ctxlen || (hash != 32 && hash != 48))
		return 0;
	for (i = 0; i < TLS13_PAD; i++)
		if (in[i] != 0x20)
			return 0;
	return memcmp(in + TLS13_PAD, tls13_server, ctxlen) == 0;
}

static int
tls12_ok(const uint8_t *in, size_t len)
{
	const uint8_t *p = in + 64;	/* past client_random, server_random */
	uint16_t group;
	size_t i;

	if (len < 64 + 4 || p[0] != 3)
		return 0;
	group = (uint16_t)(p[1] << 8 | p[2]);
	for (i = 0; i < sizeof(ske_groups) / sizeof(ske_groups[0]); i++)
		if (ske_groups[i].id == group)
			return p[3] == ske_groups[i].len &&
			    len == 64 + 4 + (size_t)p[3] &&
			    (!ske_groups[i].point || p[4] == 0x04);
	return 0;
}

/* PPS_OK, or PPS_ERR_POLICY with the reason set. */
int
pps_eddsa_policy(const uint8_t *in, size_t len)
{
	if (tls13_ok(in, len) || tls12_ok(in, len))
		return PPS_OK;
	pps_seterr("EdDSA message of %zu bytes is neither a TLS 1.3 server "
	    "CertificateVerify nor a TLS 1.2 ServerKeyExchange", len);
	return PPS_ERR_POLICY;
}
