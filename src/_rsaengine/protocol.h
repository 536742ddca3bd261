/*
 * The relay <-> ca wire protocol and the parent -> relay control messages.
 *
 * This is the one definition: the C side includes it, and build_ffi.py hands
 * it to cffi's cdef so that Python (pyprivsep/native.py) reads the same
 * constants and the same struct layout through the FFI.  Keep it to integer
 * #defines, structs and nothing else (no #if, no expressions in #defines).
 * An array size may name one of these #defines: cffi's cdef resolves an
 * integer constant defined in the cdef itself.
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
#define PPS_OP_PING		4	/* no key, no payload: is the ca serving? */
#define PPS_OP_EDDSA_SIGN	5	/* arg: 0; payload: the whole message
					 * (Ed25519, Ed448: no digest first) */
/* hdr.type: reply, ca -> relay; arg: PPS_OK or PPS_ERR_*; same id and key */
#define PPS_OP_REPLY		128
/* hdr.type: control, parent -> relay (and the relay's answers, same type) */
#define PPS_CTL_TICKET_KEYS	64	/* payload: n * PPS_TICKET_KEY_LEN, newest first */
#define PPS_CTL_STATS		65	/* answer: struct pps_stats */
#define PPS_CTL_SESSIONS	66	/* answers: struct pps_session[], arg 1 while more follow */
#define PPS_CTL_SESSIONS_MAX	64	/* sessions in one answer */
#define PPS_CTL_DRAIN		67	/* stop accepting; exit once every session ended */
#define PPS_CTL_VERBOSE		68	/* arg: 0 brief, 1 verbose logging */
#define PPS_CTL_HOST		69	/* payload: struct pps_host_state; no answer */

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
	uint8_t		key[PPS_KEYID_LEN];	/* key id */
};

/* Key operation latency histogram: upper bounds in microseconds, the last
 * bucket unbounded.  PPS_LAT_BUCKETS entries in pps_stats.keyop_lat. */
#define PPS_LAT_BUCKETS		12

/* A relay process's counters, since it started. */
struct pps_stats {
	uint64_t	accepted;	/* connections accepted */
	uint64_t	active;		/* connections open now */
	uint64_t	hs_full;	/* handshakes done, full */
	uint64_t	hs_resumed;	/* handshakes done, resumed */
	uint64_t	fail_client;	/* handshake failed: the client (alert, protocol) */
	uint64_t	fail_ca;	/* handshake failed: the ca (timeout, refusal) */
	uint64_t	fail_timeout;	/* handshake failed: handshake timeout */
	uint64_t	fail_backend;	/* backend refused or unreachable */
	uint64_t	keyops;		/* key operations asked of the ca */
	uint64_t	keyop_fail;	/* ... of which failed (incl. timeouts) */
	uint64_t	keyop_timeout;	/* ... of which timed out */
	uint64_t	keyop_lat_sum;	/* microseconds, answered operations */
	uint64_t	keyop_lat[PPS_LAT_BUCKETS];
	uint64_t	bytes_in;	/* client -> backend */
	uint64_t	bytes_out;	/* backend -> client */
	uint64_t	draining;	/* 1 once told to drain */
};

/* pps_session.state (the order of relay.c's enum conn_state) */
#define PPS_SESSION_HANDSHAKE	0
#define PPS_SESSION_CONNECTING	1
#define PPS_SESSION_RELAYING	2

/* One open connection, for `pyprivsep ctl show sessions`. */
struct pps_session {
	uint8_t		addr[16];	/* client address (IPv4 in the first 4) */
	uint8_t		family;		/* 4 or 6 */
	uint8_t		state;		/* PPS_SESSION_* */
	uint16_t	port;		/* client port */
	uint32_t	relay;		/* relay block index */
	uint32_t	age;		/* seconds since accepted */
	uint32_t	idle;		/* seconds since last traffic */
	uint64_t	bytes_in;
	uint64_t	bytes_out;
	uint8_t		backend[16];	/* the host chosen (IPv4 in the first 4) */
	uint8_t		backend_family;	/* 4, 6; 0: none chosen yet */
	uint8_t		pad;
	uint16_t	backend_port;
	uint32_t	backend_id;	/* its host id (PPS_CTL_HOST) */
};

/*
 * Tables: `forward to <table> port N mode M`, and a second `forward to`
 * used while every host of the first is down.  The parent numbers every
 * host of every forward (relay blocks in order, forwards, hosts): the
 * health checks (the hce) report by that id, and the parent tells the
 * relays with PPS_CTL_HOST.
 */
#define PPS_MAX_TABLES		2	/* per relay block: the table, its fallback */
#define PPS_MAX_HOSTS		64	/* per table */
#define PPS_CONNECT_TIMEOUT	5	/* seconds for a backend to answer a connect */

/* pps_relay_table() mode */
#define PPS_MODE_ROUNDROBIN	0	/* per relay process rotation */
#define PPS_MODE_LOADBALANCE	1	/* hash: client address, local address + port */
#define PPS_MODE_HASH		2	/* hash: local address + port */
#define PPS_MODE_SOURCEHASH	3	/* hash: client address */
#define PPS_MODE_RANDOM		4
#define PPS_MODE_LEASTSTATES	5	/* fewest connections of this process */

/* PPS_CTL_HOST: a host went up or down. */
struct pps_host_state {
	uint32_t	id;		/* host id, as given to pps_relay_host() */
	uint32_t	up;		/* 1 up, 0 down */
};
