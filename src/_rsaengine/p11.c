/*
 * Keys in a PKCS#11 token (`pkcs11 module ... pin ...` and a keypair's
 * `key "pkcs11:token=...;object=..."`), for the ca processes only: a
 * relay and the long-lived parent never load the module.
 *
 * The module is dlopen()ed by the ca (pps_p11_init()), which keeps its
 * PIN in this file's memory (the ca is not dumpable) and opens one session
 * per token it uses, lazily, at its first signature: C_Initialize,
 * C_OpenSession, C_Login.  Object handles are looked up again after every
 * reopening.  A call that fails because the token or the module's
 * connection went away (CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID,
 * CKR_TOKEN_NOT_PRESENT, ... and p11-kit-client's losing its server)
 * resets everything (C_Finalize) and is tried once more on a fresh
 * C_Initialize; if that fails too, that one operation fails (the relay
 * gets PPS_ERR_CRYPTO) and the next one tries again.  A PIN the token
 * refuses is never presented twice: a token that locks after a few wrong
 * PINs must not be locked by a busy relay.
 *
 * The policy (ca.c) decides first, on the same request as for a key in
 * memory, and names the operation; this file performs exactly that one:
 *   PPS_SIGN_RSA_PKCS1: CKM_RSA_PKCS over the checked DigestInfo
 *   PPS_SIGN_RSA_RAW:   CKM_RSA_X_509 (the raw private operation) over the
 *                       checked EMSA-PSS block, as for a key in memory: the
 *                       relay encodes PSS itself and the policy has decoded
 *                       the block with the public key.  CKM_RSA_PKCS_PSS is
 *                       not an option here: it takes mHash, and the block
 *                       carries only H = Hash(0^8 || mHash || salt).
 *   PPS_SIGN_ECDSA:     CKM_ECDSA over the digest; the token's r || s is
 *                       returned as a DER ECDSA-Sig-Value.
 * A token that refuses CKM_RSA_X_509 for an RSA key cannot sign PSS (TLS
 * 1.3): pps_cakey_p11_check() (pyprivsep -n) says so.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include <p11-kit/pkcs11.h>

#include "engine.h"

#define P11_MAX_TOKENS	8
#define P11_LABEL	32		/* CK_TOKEN_INFO.label: blank padded */
#define P11_MAX_SLOTS	64
#define P11_PIN_MAX	256
#define P11_ATTR_MAX	256		/* object label and id, decoded */
#define P11_RAW_MAX	1024		/* RSA-8192: 1024 bytes */

struct p11_token {
	char		 label[P11_LABEL + 1];	/* as written, unpadded */
	CK_SESSION_HANDLE session;
	int		 open;
};

static struct {
	void		*dl;
	CK_FUNCTION_LIST *f;
	int		 initialized;	/* C_Initialize succeeded */
	int		 pin_refused;	/* never present it again */
	unsigned char	 pin[P11_PIN_MAX];
	size_t		 pinlen;
	unsigned	 epoch;		/* bumped by each reset: handles stale */
	struct p11_token tok[P11_MAX_TOKENS];
	int		 ntok;
} p11;

struct pps_p11key {
	int		 tok;		/* index in p11.tok */
	unsigned char	 label[P11_ATTR_MAX];
	size_t		 labellen;	/* 0: not in the URI */
	unsigned char	 id[P11_ATTR_MAX];
	size_t		 idlen;		/* 0: not in the URI */
	int		 has_label, has_id;
	CK_OBJECT_HANDLE handle;
	unsigned	 epoch;		/* handle valid if == p11.epoch + 1 */
	CK_BBOOL	 always_auth;	/* CKA_ALWAYS_AUTHENTICATE: log in
					 * (context specific) for each C_Sign */
};

static const char *
rvname(CK_RV rv)
{
	static char buf[32];

	switch (rv) {
#define RV(x)	case x: return #x
	RV(CKR_OK);
	RV(CKR_GENERAL_ERROR);
	RV(CKR_FUNCTION_FAILED);
	RV(CKR_ARGUMENTS_BAD);
	RV(CKR_DEVICE_ERROR);
	RV(CKR_DEVICE_MEMORY);
	RV(CKR_DEVICE_REMOVED);
	RV(CKR_DATA_INVALID);
	RV(CKR_DATA_LEN_RANGE);
	RV(CKR_KEY_HANDLE_INVALID);
	RV(CKR_KEY_TYPE_INCONSISTENT);
	RV(CKR_KEY_FUNCTION_NOT_PERMITTED);
	RV(CKR_MECHANISM_INVALID);
	RV(CKR_MECHANISM_PARAM_INVALID);
	RV(CKR_OBJECT_HANDLE_INVALID);
	RV(CKR_OPERATION_ACTIVE);
	RV(CKR_PIN_INCORRECT);
	RV(CKR_PIN_INVALID);
	RV(CKR_PIN_LEN_RANGE);
	RV(CKR_PIN_EXPIRED);
	RV(CKR_PIN_LOCKED);
	RV(CKR_SESSION_CLOSED);
	RV(CKR_SESSION_HANDLE_INVALID);
	RV(CKR_TOKEN_NOT_PRESENT);
	RV(CKR_TOKEN_NOT_RECOGNIZED);
	RV(CKR_USER_NOT_LOGGED_IN);
	RV(CKR_USER_PIN_NOT_INITIALIZED);
	RV(CKR_BUFFER_TOO_SMALL);
	RV(CKR_CRYPTOKI_NOT_INITIALIZED);
	RV(CKR_HOST_MEMORY);
#undef RV
	}
	snprintf(buf, sizeof(buf), "CKR 0x%lx", (unsigned long)rv);
	return buf;
}

/* Failures after which a fresh C_Initialize and session may succeed. */
static int
gone(CK_RV rv)
{
	switch (rv) {
	case CKR_GENERAL_ERROR:
	case CKR_FUNCTION_FAILED:
	case CKR_DEVICE_ERROR:
	case CKR_DEVICE_REMOVED:
	case CKR_SESSION_CLOSED:
	case CKR_SESSION_HANDLE_INVALID:
	case CKR_TOKEN_NOT_PRESENT:
	case CKR_TOKEN_NOT_RECOGNIZED:
	case CKR_CRYPTOKI_NOT_INITIALIZED:
	case CKR_OBJECT_HANDLE_INVALID:
	case CKR_KEY_HANDLE_INVALID:
	case CKR_USER_NOT_LOGGED_IN:
		return 1;
	}
	return 0;
}

static int
pin_refused(CK_RV rv)
{
	return rv == CKR_PIN_INCORRECT || rv == CKR_PIN_INVALID ||
	    rv == CKR_PIN_LEN_RANGE || rv == CKR_PIN_EXPIRED ||
	    rv == CKR_PIN_LOCKED;
}

int
pps_p11_init(const char *module, const uint8_t *pin, size_t pinlen)
{
	CK_RV (*getlist)(CK_FUNCTION_LIST_PTR_PTR);
	CK_RV rv;

	if (p11.dl != NULL)
		return pps_seterr("PKCS#11: a module is loaded already (one "
		    "pkcs11 line)");
	if (pinlen > sizeof(p11.pin))
		return pps_seterr("PKCS#11: PIN longer than %zu bytes",
		    sizeof(p11.pin));
	if ((p11.dl = dlopen(module, RTLD_NOW | RTLD_LOCAL)) == NULL)
		return pps_seterr("PKCS#11 module %s: %s", module, dlerror());
	*(void **)&getlist = dlsym(p11.dl, "C_GetFunctionList");
	if (getlist == NULL) {
		dlclose(p11.dl);
		p11.dl = NULL;
		return pps_seterr("PKCS#11 module %s: no C_GetFunctionList",
		    module);
	}
	if ((rv = getlist(&p11.f)) != CKR_OK || p11.f == NULL) {
		dlclose(p11.dl);
		p11.dl = NULL;
		return pps_seterr("PKCS#11 module %s: C_GetFunctionList: %s",
		    module, rvname(rv));
	}
	memcpy(p11.pin, pin, pinlen);
	p11.pinlen = pinlen;
	return 0;
}

/* Forget every session and the module's state; handles go stale. */
static void
reset(void)
{
	int i;

	if (!p11.initialized)
		return;
	for (i = 0; i < p11.ntok; i++) {
		if (p11.tok[i].open)
			(void)p11.f->C_CloseSession(p11.tok[i].session);
		p11.tok[i].open = 0;
	}
	(void)p11.f->C_Finalize(NULL);
	p11.initialized = 0;
	p11.epoch++;
}

static int
token_index(const char *label)
{
	int i;

	if (strlen(label) > P11_LABEL)
		return pps_seterr("PKCS#11 token label \"%s\": more than %d "
		    "bytes", label, P11_LABEL);
	for (i = 0; i < p11.ntok; i++)
		if (strcmp(p11.tok[i].label, label) == 0)
			return i;
	if (p11.ntok == P11_MAX_TOKENS)
		return pps_seterr("PKCS#11: more than %d tokens",
		    P11_MAX_TOKENS);
	snprintf(p11.tok[p11.ntok].label, sizeof(p11.tok[0].label), "%s",
	    label);
	return p11.ntok++;
}

/* The slot whose token's label is t's; CKR_TOKEN_NOT_PRESENT if none. */
static CK_RV
find_slot(struct p11_token *t, CK_SLOT_ID *slot)
{
	CK_SLOT_ID slots[P11_MAX_SLOTS];
	CK_ULONG n = P11_MAX_SLOTS, i;
	CK_TOKEN_INFO info;
	char want[P11_LABEL];
	size_t len = strlen(t->label);
	CK_RV rv;

	memset(want, ' ', sizeof(want));
	memcpy(want, t->label, len);
	if ((rv = p11.f->C_GetSlotList(CK_TRUE, slots, &n)) != CKR_OK)
		return rv;
	for (i = 0; i < n && i < P11_MAX_SLOTS; i++) {
		if (p11.f->C_GetTokenInfo(slots[i], &info) != CKR_OK)
			continue;
		if (memcmp(info.label, want, sizeof(want)) == 0) {
			*slot = slots[i];
			return CKR_OK;
		}
	}
	return CKR_TOKEN_NOT_PRESENT;
}

/* Initialise, open t's session and log in, as far as not done yet. */
static CK_RV
open_token(struct p11_token *t, const char **what)
{
	CK_SLOT_ID slot;
	CK_RV rv;

	if (!p11.initialized) {
		*what = "C_Initialize";
		rv = p11.f->C_Initialize(NULL);
		if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
			return rv;
		p11.initialized = 1;
	}
	if (t->open)
		return CKR_OK;
	if (p11.pin_refused) {
		*what = "C_Login";
		return CKR_PIN_INCORRECT;
	}
	*what = "finding the token";
	if ((rv = find_slot(t, &slot)) != CKR_OK)
		return rv;
	*what = "C_OpenSession";
	if ((rv = p11.f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL,
	    &t->session)) != CKR_OK)
		return rv;
	t->open = 1;
	*what = "C_Login";
	rv = p11.f->C_Login(t->session, CKU_USER, p11.pin, p11.pinlen);
	if (rv == CKR_USER_ALREADY_LOGGED_IN)
		rv = CKR_OK;
	if (pin_refused(rv))
		p11.pin_refused = 1;
	if (rv != CKR_OK) {
		(void)p11.f->C_CloseSession(t->session);
		t->open = 0;
	}
	return rv;
}

/* k's private key object in its token's open session. */
static CK_RV
find_object(struct pps_p11key *k, const char **what)
{
	struct p11_token *t = &p11.tok[k->tok];
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE tmpl[3];
	CK_OBJECT_HANDLE found[2];
	CK_ULONG n = 0, nt = 0;
	CK_RV rv;

	if (k->epoch == p11.epoch + 1)
		return CKR_OK;
	tmpl[nt].type = CKA_CLASS;
	tmpl[nt].pValue = &cls;
	tmpl[nt++].ulValueLen = sizeof(cls);
	if (k->has_label) {
		tmpl[nt].type = CKA_LABEL;
		tmpl[nt].pValue = k->label;
		tmpl[nt++].ulValueLen = k->labellen;
	}
	if (k->has_id) {
		tmpl[nt].type = CKA_ID;
		tmpl[nt].pValue = k->id;
		tmpl[nt++].ulValueLen = k->idlen;
	}
	*what = "C_FindObjects";
	if ((rv = p11.f->C_FindObjectsInit(t->session, tmpl, nt)) != CKR_OK)
		return rv;
	rv = p11.f->C_FindObjects(t->session, found, 2, &n);
	(void)p11.f->C_FindObjectsFinal(t->session);
	if (rv != CKR_OK)
		return rv;
	if (n != 1) {
		*what = n == 0 ? "no such private key in the token" :
		    "more than one private key in the token matches";
		return CKR_ARGUMENTS_BAD;	/* reported by *what alone */
	}
	k->handle = found[0];
	k->always_auth = CK_FALSE;
	tmpl[0].type = CKA_ALWAYS_AUTHENTICATE;
	tmpl[0].pValue = &k->always_auth;
	tmpl[0].ulValueLen = sizeof(k->always_auth);
	if (p11.f->C_GetAttributeValue(t->session, k->handle, tmpl, 1) !=
	    CKR_OK)
		k->always_auth = CK_FALSE;	/* not a PKCS#11 2.20+ token */
	k->epoch = p11.epoch + 1;
	return CKR_OK;
}

static CK_RV
sign_once(struct pps_p11key *k, CK_MECHANISM_TYPE mech, const uint8_t *in,
    size_t inlen, uint8_t *out, CK_ULONG *outlen, const char **what)
{
	struct p11_token *t = &p11.tok[k->tok];
	CK_MECHANISM m = { mech, NULL, 0 };
	CK_RV rv;

	if ((rv = open_token(t, what)) != CKR_OK ||
	    (rv = find_object(k, what)) != CKR_OK)
		return rv;
	*what = "C_SignInit";
	if ((rv = p11.f->C_SignInit(t->session, &m, k->handle)) != CKR_OK)
		return rv;
	if (k->always_auth) {
		*what = "C_Login (context specific)";
		rv = p11.f->C_Login(t->session, CKU_CONTEXT_SPECIFIC, p11.pin,
		    p11.pinlen);
		if (pin_refused(rv))
			p11.pin_refused = 1;
		if (rv != CKR_OK) {
			/* the signing operation stays active: end it */
			(void)p11.f->C_CloseSession(t->session);
			t->open = 0;
			return rv;
		}
	}
	*what = "C_Sign";
	return p11.f->C_Sign(t->session, (CK_BYTE_PTR)in, inlen, out, outlen);
}

/* r || s (two halves of equal length) to DER ECDSA-Sig-Value */
static int
ecdsa_der(const uint8_t *rs, size_t len, uint8_t *out, size_t outsize)
{
	ECDSA_SIG *sig;
	BIGNUM *r, *s;
	unsigned char *p = out;
	int n;

	if (len == 0 || len % 2 != 0)
		return pps_seterr("PKCS#11 CKM_ECDSA: %zu bytes, not r || s",
		    len);
	r = BN_bin2bn(rs, (int)(len / 2), NULL);
	s = BN_bin2bn(rs + len / 2, (int)(len / 2), NULL);
	if ((sig = ECDSA_SIG_new()) == NULL || r == NULL || s == NULL ||
	    !ECDSA_SIG_set0(sig, r, s)) {
		ECDSA_SIG_free(sig);
		BN_free(r);
		BN_free(s);
		return pps_seterr_ssl("ECDSA_SIG");
	}
	n = i2d_ECDSA_SIG(sig, NULL);
	if (n <= 0 || (size_t)n > outsize) {
		ECDSA_SIG_free(sig);
		return pps_seterr("ECDSA-Sig-Value of %d bytes", n);
	}
	n = i2d_ECDSA_SIG(sig, &p);
	ECDSA_SIG_free(sig);
	return n;
}

int
pps_p11_sign(struct pps_p11key *k, enum pps_signop how, const uint8_t *in,
    size_t inlen, uint8_t *out, size_t outsize)
{
	uint8_t rs[2 * 66 + 2];		/* P-521: two 66-byte halves */
	CK_MECHANISM_TYPE mech;
	CK_ULONG outlen;
	const char *what = "";
	uint8_t *buf;
	int attempt, reopened = 0;
	CK_RV rv = CKR_GENERAL_ERROR;

	if (p11.f == NULL)
		return pps_seterr("PKCS#11: no module loaded");
	switch (how) {
	case PPS_SIGN_RSA_PKCS1:
		mech = CKM_RSA_PKCS;
		break;
	case PPS_SIGN_RSA_RAW:
		mech = CKM_RSA_X_509;
		break;
	case PPS_SIGN_ECDSA:
		mech = CKM_ECDSA;
		break;
	default:
		return pps_seterr("unknown operation %d", (int)how);
	}
	buf = how == PPS_SIGN_ECDSA ? rs : out;
	for (attempt = 0; attempt < 2; attempt++) {
		outlen = how == PPS_SIGN_ECDSA ? sizeof(rs) : outsize;
		rv = sign_once(k, mech, in, inlen, buf, &outlen, &what);
		if (rv == CKR_OK || !gone(rv) || p11.pin_refused)
			break;
		reset();
		reopened = 1;
	}
	if (rv != CKR_OK) {
		if (rv == CKR_ARGUMENTS_BAD && strncmp(what, "C_", 2) != 0)
			return pps_seterr("PKCS#11 token \"%s\": %s",
			    p11.tok[k->tok].label, what);
		return pps_seterr("PKCS#11 token \"%s\": %s: %s%s",
		    p11.tok[k->tok].label, what, rvname(rv),
		    p11.pin_refused ? " (the PIN is not tried again until a "
		    "restart or reload)" : "");
	}
	if (reopened)
		pps_log(LOG_NOTICE, "PKCS#11 token \"%s\": session reopened",
		    p11.tok[k->tok].label);
	if (how == PPS_SIGN_ECDSA)
		return ecdsa_der(rs, outlen, out, outsize);
	if (outlen > outsize)
		return pps_seterr("PKCS#11 C_Sign: %lu bytes",
		    (unsigned long)outlen);
	return (int)outlen;
}

struct pps_cakey *
pps_cakey_load_p11(const char *token, const uint8_t *label, size_t labellen,
    const uint8_t *id, size_t idlen, const char *cert_pem, size_t cert_len)
{
	struct pps_p11key *k;
	struct pps_cakey *ck;
	int tok;

	if (labellen > P11_ATTR_MAX || idlen > P11_ATTR_MAX) {
		pps_seterr("PKCS#11 object or id longer than %d bytes",
		    P11_ATTR_MAX);
		return NULL;
	}
	if (label == NULL && id == NULL) {
		pps_seterr("PKCS#11 key: neither object nor id");
		return NULL;
	}
	if ((tok = token_index(token)) < 0)
		return NULL;
	if ((k = calloc(1, sizeof(*k))) == NULL) {
		pps_seterr("out of memory");
		return NULL;
	}
	k->tok = tok;
	if ((k->has_label = label != NULL))
		memcpy(k->label, label, (k->labellen = labellen));
	if ((k->has_id = id != NULL))
		memcpy(k->id, id, (k->idlen = idlen));
	if ((ck = pps_cakey_wrap_p11(cert_pem, cert_len, k)) == NULL)
		free(k);
	return ck;
}

void
pps_p11key_free(struct pps_p11key *k)
{
	free(k);
}

/*
 * Sign a random SHA-256 digest with the token's key and verify it with
 * the certificate's: the PIN, the object, that it is the certificate's
 * key, and for RSA that the token allows the raw operation PSS needs.
 */
int
pps_cakey_p11_check(struct pps_cakey *ck)
{
	static const uint8_t sha256_info[] = {
		0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
		0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 };
	uint8_t in[sizeof(sha256_info) + 32], sig[P11_RAW_MAX], raw[P11_RAW_MAX],
	    em[P11_RAW_MAX];
	struct pps_p11key *k = pps_cakey_p11(ck);
	EVP_PKEY *pub = pps_cakey_pub(ck);
	EVP_PKEY_CTX *ctx = NULL;
	size_t modlen;
	int n, r, ok = -1, rsa = pps_cakey_type(ck) != EVP_PKEY_EC;

	if (k == NULL || pub == NULL)
		return pps_seterr("not a PKCS#11 key");
	memcpy(in, sha256_info, sizeof(sha256_info));
	if (RAND_bytes(in + sizeof(sha256_info), 32) != 1)
		return pps_seterr_ssl("RAND_bytes");
	if (rsa)
		n = pps_p11_sign(k, PPS_SIGN_RSA_PKCS1, in, sizeof(in), sig,
		    sizeof(sig));
	else
		n = pps_p11_sign(k, PPS_SIGN_ECDSA, in + sizeof(sha256_info),
		    32, sig, sizeof(sig));
	if (n < 0)
		return -1;
	if ((ctx = EVP_PKEY_CTX_new(pub, NULL)) == NULL ||
	    EVP_PKEY_verify_init(ctx) <= 0 ||
	    (rsa && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) <= 0) ||
	    EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) <= 0) {
		pps_seterr_ssl("verify");
		goto done;
	}
	r = EVP_PKEY_verify(ctx, sig, (size_t)n, in + sizeof(sha256_info), 32);
	ERR_clear_error();
	if (r != 1) {
		pps_seterr("the token's private key does not match the "
		    "certificate");
		goto done;
	}
	if (rsa) {
		/* the same signature through the raw operation, on the
		 * PKCS#1 block: 00 01 FF..FF 00 DigestInfo */
		modlen = (size_t)n;
		if (modlen < sizeof(in) + 11 || modlen > sizeof(em)) {
			pps_seterr("RSA signature of %zu bytes", modlen);
			goto done;
		}
		em[0] = 0;
		em[1] = 1;
		memset(em + 2, 0xff, modlen - sizeof(in) - 3);
		em[modlen - sizeof(in) - 1] = 0;
		memcpy(em + modlen - sizeof(in), in, sizeof(in));
		if ((n = pps_p11_sign(k, PPS_SIGN_RSA_RAW, em, modlen, raw,
		    sizeof(raw))) < 0) {
			pps_seterr("%s; RSA-PSS signatures (all of TLS 1.3) "
			    "need the raw RSA operation, CKM_RSA_X_509, on the "
			    "key", pps_error());
			goto done;
		}
		if ((size_t)n != modlen || memcmp(raw, sig, modlen) != 0) {
			pps_seterr("the token's CKM_RSA_X_509 does not agree "
			    "with its CKM_RSA_PKCS");
			goto done;
		}
	}
	ok = 0;
done:
	EVP_PKEY_CTX_free(ctx);
	return ok;
}
