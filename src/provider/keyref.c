/*
 * The key reference (docs/protocol.md, "Key references") and the key
 * object the decoder makes of it:
 *
 *   PyprivsepKeyReference ::= SEQUENCE {
 *       version    INTEGER (1),
 *       socket     UTF8String,          -- the ca's AF_UNIX SOCK_SEQPACKET path
 *       keyId      OCTET STRING (SIZE (32)), -- SHA-256 of publicKey's DER
 *       publicKey  SubjectPublicKeyInfo }
 *
 * or a PKCS#8 PrivateKeyInfo { 0, { our OID }, OCTET STRING { that } } for
 * readers that only know "BEGIN PRIVATE KEY".
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/x509.h>

#include "provider.h"

const unsigned char pps_ref_oid_der[] = {
	0x69, 0x82, 0xdb, 0xbd, 0xbd, 0xc1, 0xd6, 0xb7, 0xe2, 0x8a, 0xa1,
	0x87, 0x8a, 0xe3, 0xaa, 0x8b, 0xed, 0x98, 0x9d, 0x25, 0x01
};
const size_t pps_ref_oid_der_len = sizeof(pps_ref_oid_der);

/* One DER TLV at *p (at most end): its tag, contents and length; *p moves
 * past it.  0 if malformed. */
static int
tlv(const unsigned char **p, const unsigned char *end, int tag,
    const unsigned char **val, size_t *len)
{
	const unsigned char *q = *p;
	size_t n, i, nb;

	if (end - q < 2 || q[0] != tag)
		return 0;
	n = q[1];
	q += 2;
	if (n & 0x80) {
		nb = n & 0x7f;
		if (nb == 0 || nb > 3 || (size_t)(end - q) < nb)
			return 0;
		for (n = 0, i = 0; i < nb; i++)
			n = (n << 8) | *q++;
	}
	if ((size_t)(end - q) < n)
		return 0;
	*val = q;
	*len = n;
	*p = q + n;
	return 1;
}

static struct pps_key *
parse_reference(struct pps_provctx *prov, const unsigned char *der,
    size_t derlen)
{
	const unsigned char *p = der, *end = der + derlen, *seq, *v, *spki;
	size_t seqlen, vlen, spkilen;
	char path[PPS_SOCKPATH_MAX + 1];
	unsigned char keyid[PPS_KEYID_LEN], md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	const unsigned char *pp;
	EVP_PKEY *pub = NULL;
	EVP_MD *sha256 = NULL;
	struct pps_key *key = NULL;
	int type;

	if (!tlv(&p, end, 0x30, &seq, &seqlen) || p != end)
		goto malformed;
	p = seq;
	end = seq + seqlen;
	if (!tlv(&p, end, 0x02, &v, &vlen) || vlen != 1 ||
	    v[0] != PPS_REF_VERSION)
		goto malformed;
	if (!tlv(&p, end, 0x0c, &v, &vlen))
		goto malformed;
	if (vlen == 0 || vlen > PPS_SOCKPATH_MAX || memchr(v, 0, vlen) != NULL) {
		pps_raise(PPS_R_BAD_REFERENCE, "bad socket path");
		return NULL;
	}
	memcpy(path, v, vlen);
	path[vlen] = '\0';
	if (!tlv(&p, end, 0x04, &v, &vlen) || vlen != PPS_KEYID_LEN)
		goto malformed;
	memcpy(keyid, v, vlen);
	spki = p;
	if (!tlv(&p, end, 0x30, &v, &vlen) || p != end)
		goto malformed;
	spkilen = (size_t)(p - spki);

	/* the key id names this public key, or the reference is corrupt */
	if ((sha256 = EVP_MD_fetch(prov->libctx, "SHA256",
	    PPS_PROPQ_DEFAULT)) == NULL ||
	    !EVP_Digest(spki, spkilen, md, &mdlen, sha256, NULL) ||
	    mdlen != PPS_KEYID_LEN ||
	    CRYPTO_memcmp(md, keyid, PPS_KEYID_LEN) != 0) {
		pps_raise(PPS_R_BAD_REFERENCE,
		    "key id is not the public key's SHA-256");
		goto out;
	}
	pp = spki;
	if ((pub = d2i_PUBKEY_ex(NULL, &pp, (long)spkilen, prov->libctx,
	    PPS_PROPQ_DEFAULT)) == NULL) {
		pps_raise(PPS_R_BAD_REFERENCE, "bad public key");
		goto out;
	}
	if (EVP_PKEY_is_a(pub, "RSA"))
		type = EVP_PKEY_RSA;
	else if (EVP_PKEY_is_a(pub, "EC"))
		type = EVP_PKEY_EC;
	else {
		pps_raise(PPS_R_BAD_REFERENCE, "neither an RSA nor an EC key");
		goto out;
	}
	if ((key = pps_key_new(prov, type)) == NULL)
		goto out;
	memcpy(key->keyid, keyid, PPS_KEYID_LEN);
	key->pub = pub;
	pub = NULL;
	if ((key->conn = pps_conn_new(path, prov->timeout_ms)) == NULL) {
		pps_key_free(key);
		key = NULL;
	}
out:
	EVP_PKEY_free(pub);
	EVP_MD_free(sha256);
	return key;
malformed:
	pps_raise(PPS_R_BAD_REFERENCE, "malformed key reference");
	return NULL;
}

struct pps_key *
pps_key_from_der(struct pps_provctx *prov, const unsigned char *der,
    size_t derlen)
{
	const unsigned char *p = der, *end = der + derlen, *seq, *v, *alg;
	size_t seqlen, vlen, alglen;

	if (derlen > 0 && der[0] == 0x30) {
		/* bare: SEQUENCE { INTEGER 1, UTF8String ... } (an EC private
		 * key, RFC 5915, has an OCTET STRING after its INTEGER 1) */
		p = der;
		if (tlv(&p, end, 0x30, &seq, &seqlen) && seqlen > 4 &&
		    seq[0] == 0x02 && seq[1] == 1 && seq[2] == PPS_REF_VERSION &&
		    seq[3] == 0x0c)
			return parse_reference(prov, der, derlen);
	}
	/* PrivateKeyInfo { INTEGER 0, SEQUENCE { OID ours }, OCTET STRING } */
	p = der;
	if (!tlv(&p, end, 0x30, &seq, &seqlen) || p != end)
		return NULL;
	p = seq;
	end = seq + seqlen;
	if (!tlv(&p, end, 0x02, &v, &vlen) || vlen != 1 || v[0] != 0)
		return NULL;
	if (!tlv(&p, end, 0x30, &alg, &alglen))
		return NULL;
	if (!tlv(&alg, alg + alglen, 0x06, &v, &vlen) ||
	    vlen != pps_ref_oid_der_len ||
	    memcmp(v, pps_ref_oid_der, vlen) != 0)
		return NULL;	/* somebody else's PKCS#8: not ours */
	if (!tlv(&p, end, 0x04, &v, &vlen)) {
		pps_raise(PPS_R_BAD_REFERENCE, "PKCS#8 reference without key");
		return NULL;
	}
	return parse_reference(prov, v, vlen);
}

const char *
pps_key_type_name(int type)
{
	return type == EVP_PKEY_RSA ? "RSA" : "EC";
}

struct pps_key *
pps_key_new(struct pps_provctx *prov, int type)
{
	struct pps_key *key;

	if ((key = calloc(1, sizeof(*key))) == NULL)
		return NULL;
	key->prov = prov;
	key->type = type;
	return key;
}

void
pps_key_free(struct pps_key *key)
{
	if (key == NULL)
		return;
	EVP_PKEY_free(key->pub);
	if (key->conn != NULL)
		pps_conn_free(key->conn);
	free(key);
}

struct pps_key *
pps_key_dup(const struct pps_key *src)
{
	struct pps_key *key;

	if ((key = pps_key_new(src->prov, src->type)) == NULL)
		return NULL;
	memcpy(key->keyid, src->keyid, PPS_KEYID_LEN);
	if (src->pub != NULL) {
		if (!EVP_PKEY_up_ref(src->pub)) {
			free(key);
			return NULL;
		}
		key->pub = src->pub;
	}
	if (src->conn != NULL) {
		pps_conn_ref(src->conn);
		key->conn = src->conn;
	}
	return key;
}
