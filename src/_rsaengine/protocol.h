/*
 * The relay <-> ca wire protocol and the parent -> relay control messages.
 *
 * This is the one definition: the C side includes it, and build_ffi.py hands
 * it to cffi's cdef so that Python (pyprivsep/native.py) reads the same
 * constants and the same struct layout through the FFI.  Keep it to integer
 * #defines, structs and nothing else (no #if, no expressions in #defines).
 *
 * Transport: an AF_UNIX SOCK_SEQPACKET socketpair, so one frame is one
 * message and a frame can never be split or merged.  A frame is a
 * struct pps_hdr followed by hdr.len payload bytes, in host byte order
 * (both ends run on the same machine, as with OpenBSD's imsg).
 * See docs/protocol.md.
 */

#define PPS_PROTO_VERSION	1

#define PPS_KEYID_LEN		32	/* SHA-256 of the DER SubjectPublicKeyInfo */
#define PPS_MAX_PAYLOAD		1024	/* RSA-8192 block; ECDSA digests are <= 64 */

/* hdr.type: requests, relay -> ca */
#define PPS_OP_RSA_PRIV_ENC	1	/* arg: PPS_PAD_*; payload: the block */
#define PPS_OP_RSA_PRIV_DEC	2	/* defined to be refused: never performed */
#define PPS_OP_ECDSA_SIGN	3	/* arg: 0; payload: the digest */
/* hdr.type: reply, ca -> relay; arg: PPS_OK or PPS_ERR_*; same id and key */
#define PPS_OP_REPLY		128
/* hdr.type: control, parent -> relay */
#define PPS_CTL_TICKET_KEYS	64	/* payload: n * PPS_TICKET_KEY_LEN, newest first */

/* hdr.arg of PPS_OP_RSA_PRIV_ENC */
#define PPS_PAD_PKCS1		1	/* payload is a DigestInfo, PKCS#1 v1.5 type 1 */
#define PPS_PAD_NONE		3	/* payload is a full block (a PSS encoding) */

/* hdr.arg of PPS_OP_REPLY */
#define PPS_OK			0
#define PPS_ERR_FRAME		1	/* malformed frame: bad size or length */
#define PPS_ERR_VERSION		2	/* unknown protocol version */
#define PPS_ERR_OP		3	/* unknown or forbidden operation */
#define PPS_ERR_NOKEY		4	/* this ca holds no such key */
#define PPS_ERR_POLICY		5	/* request refused by the policy */
#define PPS_ERR_CRYPTO		6	/* the operation itself failed */

/* Session ticket keys: 16 name, 32 HMAC-SHA256 key, 32 AES-256 key. */
#define PPS_TICKET_KEY_LEN	80
#define PPS_MAX_TICKET_KEYS	8

struct pps_hdr {
	uint8_t		version;	/* PPS_PROTO_VERSION */
	uint8_t		type;		/* PPS_OP_* or PPS_CTL_* */
	uint16_t	arg;		/* per type, see above */
	uint32_t	id;		/* request id, echoed in the reply */
	uint32_t	len;		/* payload bytes after the header */
	uint8_t		key[32];	/* key id (PPS_KEYID_LEN) */
};
