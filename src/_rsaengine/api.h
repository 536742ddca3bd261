/*
 * The C API the Python side sees: every function pyprivsep calls in the
 * extension is declared here, once.  build_ffi.py feeds this file (after
 * protocol.h) to cffi's cdef, so keep it free of preprocessor logic.
 *
 * A relay process builds one engine: pps_engine_init(), then per relay
 * block pps_relay_new() + pps_relay_table() + pps_relay_host() +
 * pps_relay_listen() + pps_relay_keypair(), then
 * pps_engine_run() until it is told to stop.  A ca process loads its
 * keys (pps_cakey_load()), hands them to pps_ca_new() + pps_ca_add_key()
 * and runs pps_ca_serve().  Failures return -1 (or NULL) and leave a
 * message in pps_error().
 */

struct pps_engine_conf {
	int		id;		/* relay process number, for logs */
	int		ca_fd;		/* SOCK_SEQPACKET to our ca; -1: keys in-process */
	int		ctl_fd;		/* SOCK_SEQPACKET to the parent */
	int		max_conns;	/* connections per relay process */
	int		handshake_timeout;	/* seconds */
	int		keyops_async;	/* handshakes in async jobs (OpenSSL) */
	int		log_conn;	/* a line for each connection closed */
	int		log_errors;	/* failed handshakes and their reason */
	int		ticket_lifetime;	/* seconds a session ticket is good */
	int		use_syslog;	/* else log to stderr */
	int		verbose;
};

int		 pps_engine_init(const struct pps_engine_conf *);
/* proxy: 0, or the PROXY protocol version (1, 2) sent to the backend;
 * alpn: NULL, or the protocols to choose from, "h2,http/1.1" */
int		 pps_relay_new(const char *name, const char *ciphers,
		    int keyop_timeout_ms, int idle_timeout, int proxy,
		    const char *alpn);
/* The relay's tables, in order (the first, then its fallback): a table
 * (its index) with a PPS_MODE_*, then its hosts: numeric address, port,
 * the parent's host id, up (1) or down (0) to begin with. */
int		 pps_relay_table(int relay, int mode);
int		 pps_relay_host(int relay, int table, uint32_t id,
		    const char *addr, int port, int up);
int		 pps_relay_listen(int relay, int fd);
int		 pps_relay_keypair(int relay, const char *chain_pem, size_t chain_len,
		    const uint8_t *keyid, const char *key_pem, size_t key_len);
/*
 * Client certificates: ask for one, verify it against the CA certificates
 * in pem; refuse a client without one unless optional.  Before the relay's
 * first keypair.
 */
int		 pps_relay_client_ca(int relay, const char *pem, size_t len,
		    int optional);
/*
 * The DER OCSP response to staple for the relay's last keypair, from
 * not_before to not_after (Unix seconds; not_after 0: no end).
 */
#define PPS_OCSP_MAX		65536
#define PPS_CLIENT_CA_MAX	4194304
int		 pps_relay_ocsp(int relay, const uint8_t *der, size_t len,
		    int64_t not_before, int64_t not_after);
int		 pps_ticket_keys(const uint8_t *keys, size_t len);
int		 pps_engine_run(void);

struct pps_cakey;
struct pps_cakey *pps_cakey_load(const char *key_pem, size_t key_len,
		    const char *cert_pem, size_t cert_len);
void		 pps_cakey_free(struct pps_cakey *);
/*
 * Keys in a PKCS#11 token (p11.c), ca processes only: load the module
 * once, then name each key by its token's label and its object's label
 * and/or id (NULL: not given); nothing touches the token until the first
 * signature, or pps_cakey_p11_check() (a test signature, verified with
 * the certificate's key).
 */
int		 pps_p11_init(const char *module, const uint8_t *pin,
		    size_t pinlen);
struct pps_cakey *pps_cakey_load_p11(const char *token, const uint8_t *label,
		    size_t labellen, const uint8_t *id, size_t idlen,
		    const char *cert_pem, size_t cert_len);
int		 pps_cakey_p11_check(struct pps_cakey *);

struct pps_ca;
struct pps_ca	*pps_ca_new(int index);
void		 pps_ca_free(struct pps_ca *);
int		 pps_ca_add_key(struct pps_ca *, const uint8_t *keyid,
		    struct pps_cakey *, const char *name);
int		 pps_ca_serve(struct pps_ca *, int fd);
/* A keyservice ca: accept on lfd, admit peers by SO_PEERCRED (ca.c). */
int		 pps_ca_serve_service(struct pps_ca *, int lfd,
		    const uint32_t *uids, int nuids, const uint32_t *gids,
		    int ngids);
void		 pps_log_setup(const char *prefix, int use_syslog, int verbose);

int		 pps_reply_parse(const uint8_t *frame, size_t n,
		    struct pps_hdr *hdr, const uint8_t **payload);

/*
 * The last step of a relay's or a ca's setup (sandbox.c): after keys,
 * chroot and setuid, before its loop.  Linux: no_new_privs and a seccomp
 * filter for the role; OpenBSD: pledge; a ca also loses core dumps and
 * dumpability.  A keyservice ca is a ca that may also accept its clients
 * and read their SO_PEERCRED.
 */
#define PPS_SANDBOX_RELAY	1
#define PPS_SANDBOX_CA		2
#define PPS_SANDBOX_KEYSERVICE	3
#define PPS_SANDBOX_HCE		4	/* health checks: connects, no accept */
#define PPS_SANDBOX_P11		256	/* or'ed to a ca's: a PKCS#11 module's needs */
int		 pps_sandbox(int role);

int		 pps_async_supported(void);
int64_t		 pps_lat_bound(int bucket);
void		 pps_leak_check(void);
const char	*pps_error(void);
const char	*pps_library_version(void);
const char	*pps_poller(void);	/* "epoll" or "kqueue": poller.c's build */
