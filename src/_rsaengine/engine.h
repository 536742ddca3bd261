/*
 * Internal declarations of the relay engine.  Not seen by Python: the
 * Python side sees api.h only.
 */
#ifndef PPS_ENGINE_H
#define PPS_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <sys/socket.h>

#include <openssl/ssl.h>

#include "protocol.h"
#include "api.h"
#include "proxy.h"

#define PPS_MAX_RELAYS		64
#define PPS_MAX_KEYPAIRS	32	/* per relay block */
#define PPS_MAX_LISTENERS	64	/* per process */
#define PPS_BUFSZ		16384	/* one TLS record */
/* `tls alpn`: at most 16 names of at most 255 bytes, in the wire format
 * (a length byte before each name) */
#define PPS_ALPN_MAX_NAMES	16
#define PPS_ALPN_MAX		(PPS_ALPN_MAX_NAMES * 256)
#define PPS_FRAME_MAX		(sizeof(struct pps_hdr) + PPS_MAX_PAYLOAD)

#if !defined(__GNUC__)
#define __attribute__(x)
#endif

/* What an event source is; the loop dispatches on it. */
enum ev_kind { EV_LISTEN, EV_CLIENT, EV_BACKEND, EV_CA, EV_CTL, EV_NKINDS };

struct evsrc {
	enum ev_kind	 kind;
	int		 fd;
	unsigned	 mask;		/* PPS_IN | PPS_OUT, as registered */
	unsigned	 flags;		/* PPS_POLL_*, as registered */
};

#define PPS_IN		0x1
#define PPS_OUT		0x2
#define PPS_ERR		0x4		/* only reported, never asked for */

/* poller_add() flags */
#define PPS_POLL_EXCLUSIVE	0x1	/* one waiter woken (shared listeners) */
#define PPS_POLL_EDGE		0x2	/* reported when it becomes ready */

/* wbuf.c: a connection's TLS output, written out once a step is over */
int	wbuf_init(void);
int	wbuf_attach(SSL *, int fd);
int	wbuf_flush(SSL *);
int	wbuf_pending(SSL *);

/* poller.c: epoll on Linux, kqueue on the BSDs */
struct pps_event {
	struct evsrc	*src;
	unsigned	 events;
};
int	poller_init(void);
int	poller_add(struct evsrc *, unsigned mask, unsigned flags);
int	poller_set(struct evsrc *, unsigned mask);
void	poller_del(struct evsrc *);
void	poller_close(struct evsrc *);
int	poller_wait(struct pps_event *, int max, int timeout_ms);
int	poller_sockerr(const struct evsrc *);	/* see poller.c */

/*
 * cakey.c: the ca's keys.  ca.c decodes a request once, checks it against
 * the policy and names the one operation to perform; cakey.c performs
 * exactly that, nothing derived from the request again.
 */
enum pps_signop {
	PPS_SIGN_RSA_RAW,	/* raw private operation on a checked PSS block */
	PPS_SIGN_RSA_PKCS1,	/* PKCS#1 v1.5 type 1 over a checked DigestInfo */
	PPS_SIGN_ECDSA,		/* ECDSA over a digest; DER ECDSA-Sig-Value out */
	PPS_SIGN_EDDSA		/* Ed25519/Ed448 over a checked TLS message */
};
int	pps_cakey_sign(struct pps_cakey *, enum pps_signop, const uint8_t *in,
	    size_t inlen, uint8_t *out, size_t outsize);
int	pps_cakey_type(const struct pps_cakey *);
int	pps_cakey_bits(const struct pps_cakey *);
int	pps_cakey_pss(const struct pps_cakey *, int *md, int *mgf1_md,
	    int *saltlen);
int	pps_cakey_eddsa(const struct pps_cakey *);	/* Ed25519, Ed448 */
int	pps_eddsa_policy(const uint8_t *, size_t);	/* edpolicy.c */

/* p11.c: keys in a PKCS#11 token, signed with there (ca processes only) */
struct pps_p11key;
int	pps_p11_sign(struct pps_p11key *, enum pps_signop, const uint8_t *in,
	    size_t inlen, uint8_t *out, size_t outsize);
void	pps_p11key_free(struct pps_p11key *);
struct pps_cakey *pps_cakey_wrap_p11(const char *cert_pem, size_t cert_len,
	    struct pps_p11key *);
struct pps_p11key *pps_cakey_p11(struct pps_cakey *);
EVP_PKEY *pps_cakey_pub(struct pps_cakey *);

/* A private key that lives in the ca: what the shim sends with a request. */
struct keyref {
	uint8_t		 id[PPS_KEYID_LEN];
	int		 timeout_ms;
};

struct keypair {
	SSL_CTX		*ctx;
	X509		*cert;		/* leaf, for SNI matching */
	struct keyref	 ref;
	unsigned char	*ocsp;		/* DER OCSP response to staple, or NULL */
	size_t		 ocsp_len;
	time_t		 ocsp_from;	/* staple from then ... */
	time_t		 ocsp_until;	/* ... until then; 0: no end */
	int		 ocsp_stale;	/* said once that it is out of date */
};

struct conn;
struct connlist {
	struct conn	*head, *tail;	/* oldest deadline first */
};

/* A backend of a table; nconns: this process's connections to it. */
struct host {
	uint32_t	 id;		/* the parent's (PPS_CTL_HOST) */
	int		 up;
	int		 nconns;
	struct sockaddr_storage addr;
	socklen_t	 addrlen;
	int		 tls;		/* forward with tls: a TLS client to it */
	SSL_SESSION	*session;	/* tls: to resume with it, or NULL */
};

struct table {
	int		 mode;		/* PPS_MODE_* */
	int		 tls;		/* forward with tls (its hosts' too) */
	unsigned	 rr;		/* roundrobin: the next one */
	int		 nhosts;
	struct host	 hosts[PPS_MAX_HOSTS];
};

struct relay {
	int		 index;
	char		 name[64];
	struct table	 tables[PPS_MAX_TABLES];	/* the first, its fallback */
	int		 ntables;
	char		*ciphers;
	int		 keyop_timeout_ms;
	int		 idle_timeout;
	int		 proxy;		/* PPS_PROXY_*: header to the backend */
	uint8_t		*alpn;		/* wire format, server's order; NULL: no ALPN */
	size_t		 alpn_len;
	struct keypair	 kp[PPS_MAX_KEYPAIRS];
	int		 nkp;
	STACK_OF(X509)	*client_ca;	/* tls client ca; NULL: none asked */
	int		 client_optional;
	unsigned char	 sid_ctx[32];	/* the session id context */
	unsigned int	 sid_ctx_len;
	SSL_CTX		*backend_ctx;	/* forward with tls: client side */
	char		*backend_name;	/* SNI, and the name verified; or NULL */
	struct connlist	 handshaking;	/* deadline: handshake timeout */
	struct connlist	 connecting;	/* deadline: PPS_CONNECT_TIMEOUT */
	struct connlist	 established;	/* deadline: idle timeout */
};

/* relay.c */
extern struct pps_engine_conf pps_conf;
extern time_t	pps_now;		/* monotonic seconds, per loop turn */

/* tls.c */
long	tls_options(void);
int	tls_keypair(struct relay *, const char *, size_t, const uint8_t *,
	    const char *, size_t);
int	tls_check_relay(struct relay *);
int	tls_client_ca(struct relay *, const char *, size_t, int);
int	tls_ocsp(struct relay *, const uint8_t *, size_t, int64_t, int64_t);

/* backend.c: forward with tls, the relay a TLS client of its backends */
int	backend_tls_ctx(struct relay *, const char *, size_t, const char *);
SSL	*backend_tls_new(struct relay *, struct host *, int fd);
void	backend_tls_failed(struct host *);
const char *backend_tls_why(SSL *, int);

/* shim.c */
int	shim_init(void);
EVP_PKEY *shim_pkey(X509 *, const struct keyref *);

/* edkey.c: Ed25519 and Ed448 keys, through a provider (OpenSSL 3 only) */
#if !defined(LIBRESSL_VERSION_NUMBER) && OPENSSL_VERSION_NUMBER >= 0x30000000L
#define PPS_EDDSA_KEYS	1
#endif
EVP_PKEY *edkey_pkey(EVP_PKEY *, const struct keyref *);

/*
 * keyop.c: a connection's key operations.  relay.c keeps a keyop_ctx in
 * each connection and runs its handshake through keyop_handshake(); keyop.c
 * fills the keyop_ctx in.  The path of one operation: top of keyop.c.
 */
struct keyop;
struct keyop_ctx {
	struct keyop	*op;		/* in flight: the handshake waits (async) */
	const char	*failed;	/* why this handshake step's key
					 * operation failed; NULL: none did */
};

int	keyop_init(void);
int	keyop_start(void);
int	keyop_handshake(SSL *, struct keyop_ctx *);
void	keyop_abandon(SSL *, struct keyop_ctx *);
int	keyop_call(const struct keyref *, int, int, const uint8_t *, size_t,
	    uint8_t *, size_t);
void	keyop_ca_event(unsigned);
int	keyop_next_timeout(uint64_t);
void	keyop_expire(uint64_t);
int	keyop_ping(int);
void	keyop_stats(struct pps_stats *);
void	relay_keyop_done(struct keyop_ctx *);	/* relay.c: resume it */

/* util.c */
void	pps_log(int prio, const char *, ...)
	    __attribute__((format(printf, 2, 3)));
int	pps_seterr(const char *, ...)
	    __attribute__((format(printf, 1, 2)));
int	pps_seterr_ssl(const char *);
uint64_t pps_clock_us(void);
int	pps_frame_check(const uint8_t *, size_t, size_t, struct pps_hdr *);

/* pps_frame_check(): what is wrong with a frame, in the order it checks */
#define PPS_FRAME_SHORT		(-1)	/* less than a header */
#define PPS_FRAME_LONG		(-2)	/* more than the reader's maximum */
#define PPS_FRAME_LENGTH	(-3)	/* hdr.len is not the bytes after it */
#define PPS_FRAME_VERSION	(-4)	/* not PPS_PROTO_VERSION */

#endif
