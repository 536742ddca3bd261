/*
 * The connection to a ca (docs/protocol.md): an AF_UNIX SOCK_SEQPACKET
 * socket to the path in the key reference, one frame per message.
 *
 * - Lazy: connected at the first operation, not when the key is loaded.
 * - Per process: a connection made before fork() belongs to the parent
 *   (nginx loads keys in its master, then forks workers); a process whose
 *   pid is not the one that connected closes its copy and connects anew.
 * - A ca that closed the connection (it was restarted): the operation is
 *   tried once more on a fresh connection.
 * - Each attempt waits the provider's timeout at most (poll; 2 s unless
 *   the config section sets "timeout" in ms); then that
 *   operation fails with an error raised and the connection stays, its
 *   late reply dropped by request id when the next operation reads.
 * - Threads: one mutex per connection serialises its operations (a
 *   request and its reply); threads using different references do not
 *   wait for each other.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "provider.h"

struct pps_conn {
	pthread_mutex_t	 mu;
	int		 refs;		/* under mu */
	int		 fd;
	pid_t		 pid;		/* the process that connected fd */
	uint32_t	 next_id;
	int		 timeout_ms;
	char		 path[PPS_SOCKPATH_MAX + 1];
};

struct pps_conn *
pps_conn_new(const char *path, int timeout_ms)
{
	struct pps_conn *c;

	if (strlen(path) > PPS_SOCKPATH_MAX || (c = calloc(1, sizeof(*c))) == NULL)
		return NULL;
	if (pthread_mutex_init(&c->mu, NULL) != 0) {
		free(c);
		return NULL;
	}
	c->refs = 1;
	c->fd = -1;
	c->timeout_ms = timeout_ms;
	strcpy(c->path, path);
	return c;
}

void
pps_conn_ref(struct pps_conn *c)
{
	pthread_mutex_lock(&c->mu);
	c->refs++;
	pthread_mutex_unlock(&c->mu);
}

void
pps_conn_free(struct pps_conn *c)
{
	int last;

	pthread_mutex_lock(&c->mu);
	last = --c->refs == 0;
	pthread_mutex_unlock(&c->mu);
	if (!last)
		return;
	if (c->fd >= 0 && c->pid == getpid())
		close(c->fd);
	pthread_mutex_destroy(&c->mu);
	free(c);
}

static void
disconnect(struct pps_conn *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

static int
connect_ca(struct pps_conn *c)
{
	struct sockaddr_un sun;
	int fd;

	if (c->fd >= 0 && c->pid != getpid()) {
		/* inherited across fork(): the parent's; close our copy only */
		close(c->fd);
		c->fd = -1;
	}
	if (c->fd >= 0)
		return 1;
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	memcpy(sun.sun_path, c->path, strlen(c->path));
	if ((fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0)) == -1) {
		pps_raise(PPS_R_CA_UNREACHABLE, "socket: %s", strerror(errno));
		return 0;
	}
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == -1) {
		pps_raise(PPS_R_CA_UNREACHABLE, "%s: %s", c->path,
		    strerror(errno));
		close(fd);
		return 0;
	}
	c->fd = fd;
	c->pid = getpid();
	return 1;
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

enum { OK, GONE, FAILED };

/* One attempt on the connected socket. */
static int
attempt(struct pps_conn *c, const uint8_t *req, size_t reqlen, uint32_t id,
    uint8_t *out, size_t outsize, size_t *outlen, int *status)
{
	uint8_t buf[sizeof(struct pps_hdr) + PPS_MAX_PAYLOAD + 1];
	struct pps_hdr h;
	struct pollfd pfd;
	int64_t deadline = now_ms() + c->timeout_ms, left;
	ssize_t n;

	do
		n = send(c->fd, req, reqlen, MSG_NOSIGNAL);
	while (n == -1 && errno == EINTR);
	if (n == -1) {
		if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN)
			return GONE;
		pps_raise(PPS_R_CA_UNREACHABLE, "send: %s", strerror(errno));
		return FAILED;
	}
	for (;;) {
		if ((left = deadline - now_ms()) <= 0) {
			pps_raise(PPS_R_CA_TIMEOUT, "no reply from %s in %d ms",
			    c->path, c->timeout_ms);
			return FAILED;
		}
		pfd.fd = c->fd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, (int)left) == -1) {
			if (errno == EINTR)
				continue;
			pps_raise(PPS_R_INTERNAL, "poll: %s", strerror(errno));
			return FAILED;
		}
		if (pfd.revents == 0)
			continue;
		n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n == -1 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n == 0 || (n == -1 && errno == ECONNRESET))
			return GONE;
		if (n == -1) {
			pps_raise(PPS_R_CA_UNREACHABLE, "recv: %s",
			    strerror(errno));
			return FAILED;
		}
		if ((size_t)n < sizeof(h))
			continue;	/* not a frame: dropped */
		memcpy(&h, buf, sizeof(h));
		if (h.version != PPS_PROTO_VERSION || h.type != PPS_OP_REPLY ||
		    h.len != (size_t)n - sizeof(h) || h.id != id)
			continue;	/* malformed, or a late reply: dropped */
		if (h.arg != PPS_OK) {
			*status = h.arg;
			pps_raise(PPS_R_CA_REFUSED, "ca status %u", h.arg);
			return FAILED;
		}
		if (h.len > outsize) {
			pps_raise(PPS_R_CA_BAD_REPLY, "reply of %u bytes", h.len);
			return FAILED;
		}
		memcpy(out, buf + sizeof(h), h.len);
		*outlen = h.len;
		return OK;
	}
}

int
pps_conn_call(struct pps_conn *c, uint8_t type, uint16_t arg,
    const uint8_t keyid[PPS_KEYID_LEN], const uint8_t *payload, size_t len,
    uint8_t *out, size_t outsize, size_t *outlen)
{
	uint8_t req[sizeof(struct pps_hdr) + PPS_MAX_PAYLOAD];
	struct pps_hdr h;
	int tries, r = FAILED, status = 0;

	if (len > PPS_MAX_PAYLOAD) {
		pps_raise(PPS_R_INTERNAL, "request too long");
		return 0;
	}
	pthread_mutex_lock(&c->mu);
	memset(&h, 0, sizeof(h));
	h.version = PPS_PROTO_VERSION;
	h.type = type;
	h.arg = arg;
	h.len = (uint32_t)len;
	if (keyid != NULL)
		memcpy(h.key, keyid, PPS_KEYID_LEN);
	for (tries = 0; tries < 2; tries++) {
		if (!connect_ca(c))
			break;
		h.id = ++c->next_id;
		memcpy(req, &h, sizeof(h));
		if (len > 0)
			memcpy(req + sizeof(h), payload, len);
		r = attempt(c, req, sizeof(h) + len, h.id, out, outsize,
		    outlen, &status);
		if (r != GONE)
			break;
		/* the ca closed the connection: once more, on a new one */
		disconnect(c);
	}
	if (r == GONE)
		pps_raise(PPS_R_CA_UNREACHABLE, "%s closed the connection",
		    c->path);
	pthread_mutex_unlock(&c->mu);
	(void)status;
	return r == OK;
}
