/*
 * Readiness notification: epoll on Linux, kqueue on the BSDs (and on
 * Linux through libkqueue: make POLLER=kqueue, poller.h).  An event
 * source asks for PPS_IN and/or PPS_OUT.  Level triggered by default, the
 * loop changing that mask as its needs change; PPS_POLL_EDGE sources (a
 * connection's sockets) are reported when they become ready (EPOLLET,
 * EV_CLEAR) and keep their mask, their owner remembering what it found
 * ready, so that a connection costs no mask changes.  Listening sockets
 * shared by every relay process are registered PPS_POLL_EXCLUSIVE so that
 * one connection wakes one process (EPOLLEXCLUSIVE).  kqueue has no such
 * flag: a connection may wake every relay's kqueue, and all but the one
 * that accepts it find accept() EAGAIN (relay.c, on_listen).
 *
 * kqueue reports a source that is readable and writable as two events,
 * one per filter, where epoll reports one with both bits: poller_wait
 * merges them into one.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "poller.h"

#if defined(PPS_POLLER_EPOLL)	/* poller.h: build_ffi.py's choice */
#include <sys/epoll.h>

static int pfd = -1;

const char *
pps_poller(void)
{
	return "epoll";
}

int
poller_init(void)
{
	if (pfd == -1 && (pfd = epoll_create1(EPOLL_CLOEXEC)) == -1)
		return pps_seterr("epoll_create1: %s", strerror(errno));
	return 0;
}

static uint32_t
to_epoll(unsigned mask, unsigned flags)
{
	return (mask & PPS_IN ? EPOLLIN : 0) | (mask & PPS_OUT ? EPOLLOUT : 0) |
	    (flags & PPS_POLL_EDGE ? EPOLLET : 0);
}

int
poller_add(struct evsrc *src, unsigned mask, unsigned flags)
{
	struct epoll_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.events = to_epoll(mask, flags) |
	    (flags & PPS_POLL_EXCLUSIVE ? EPOLLEXCLUSIVE : 0);
	ev.data.ptr = src;
	if (epoll_ctl(pfd, EPOLL_CTL_ADD, src->fd, &ev) == -1)
		return pps_seterr("epoll_ctl add: %s", strerror(errno));
	src->mask = mask;
	src->flags = flags;
	return 0;
}

int
poller_set(struct evsrc *src, unsigned mask)
{
	struct epoll_event ev;

	if (src->mask == mask)
		return 0;
	memset(&ev, 0, sizeof(ev));
	ev.events = to_epoll(mask, src->flags);
	ev.data.ptr = src;
	if (epoll_ctl(pfd, EPOLL_CTL_MOD, src->fd, &ev) == -1)
		return pps_seterr("epoll_ctl mod: %s", strerror(errno));
	src->mask = mask;
	return 0;
}

void
poller_del(struct evsrc *src)
{
	(void)epoll_ctl(pfd, EPOLL_CTL_DEL, src->fd, NULL);
	src->mask = 0;
}

/* Closing the only descriptor of a socket takes it out of the epoll set. */
void
poller_close(struct evsrc *src)
{
	(void)close(src->fd);
	src->fd = -1;
	src->mask = 0;
}

int
poller_wait(struct pps_event *out, int max, int timeout_ms)
{
	struct epoll_event evs[256];
	int i, n;

	if (max > 256)
		max = 256;
	n = epoll_wait(pfd, evs, max, timeout_ms);
	for (i = 0; i < n; i++) {
		out[i].src = evs[i].data.ptr;
		out[i].events = (evs[i].events & EPOLLIN ? PPS_IN : 0) |
		    (evs[i].events & EPOLLOUT ? PPS_OUT : 0) |
		    (evs[i].events & (EPOLLERR | EPOLLHUP) ? PPS_ERR : 0);
	}
	return n;
}

/* epoll leaves a socket's error where it is, for SO_ERROR to read. */
int
poller_sockerr(const struct evsrc *src)
{
	(void)src;
	return 0;
}

#else /* PPS_POLLER_KQUEUE */
#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>

static int kq = -1;

/*
 * A socket error comes with EV_EOF, in fflags.  libkqueue (kqueue on
 * Linux) has read it with getsockopt(SO_ERROR), which clears it: after a
 * refused connect the relay's own SO_ERROR finds 0 and it would log no
 * "Connection refused" (epoll leaves the error for SO_ERROR).  The errors
 * of the events poller_wait returned last are kept here, for the handlers
 * of those events to ask (relay.c, conn_connected).
 */
static struct {
	const struct evsrc	*src;
	int			 err;
} errs[256];
static int nerrs;

int
poller_sockerr(const struct evsrc *src)
{
	int i;

	for (i = 0; i < nerrs; i++)
		if (errs[i].src == src)
			return errs[i].err;
	return 0;
}

/* An error kept for src belongs to the socket it had: forget it. */
static void
forget_err(const struct evsrc *src)
{
	int i;

	for (i = 0; i < nerrs; i++)
		if (errs[i].src == src)
			errs[i].src = NULL;
}

const char *
pps_poller(void)
{
	return "kqueue";
}

int
poller_init(void)
{
	if (kq == -1 && (kq = kqueue()) == -1)
		return pps_seterr("kqueue: %s", strerror(errno));
	return 0;
}

static int
kq_change(struct evsrc *src, unsigned mask)
{
	struct kevent ch[2];
	int n = 0;

	unsigned short add = EV_ADD |
	    (src->flags & PPS_POLL_EDGE ? EV_CLEAR : 0);

	if ((mask ^ src->mask) & PPS_IN)
		EV_SET(&ch[n++], src->fd, EVFILT_READ,
		    mask & PPS_IN ? add : EV_DELETE, 0, 0, src);
	if ((mask ^ src->mask) & PPS_OUT)
		EV_SET(&ch[n++], src->fd, EVFILT_WRITE,
		    mask & PPS_OUT ? add : EV_DELETE, 0, 0, src);
	if (n > 0 && kevent(kq, ch, n, NULL, 0, NULL) == -1)
		return pps_seterr("kevent: %s", strerror(errno));
	src->mask = mask;
	return 0;
}

int
poller_add(struct evsrc *src, unsigned mask, unsigned flags)
{
	src->mask = 0;
	src->flags = flags;
	return kq_change(src, mask);
}

int
poller_set(struct evsrc *src, unsigned mask)
{
	return kq_change(src, mask);
}

void
poller_del(struct evsrc *src)
{
	forget_err(src);
	(void)kq_change(src, 0);
}

/* close() drops a descriptor's kevents; libkqueue's bookkeeping on Linux
 * would not see it, so they go first. */
void
poller_close(struct evsrc *src)
{
	forget_err(src);
	(void)kq_change(src, 0);
	(void)close(src->fd);
	src->fd = -1;
}

int
poller_wait(struct pps_event *out, int max, int timeout_ms)
{
	struct kevent evs[256];
	struct timespec ts;
	int i, j, m, n;

	if (max > 256)
		max = 256;
	ts.tv_sec = timeout_ms / 1000;
	ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000;
	n = kevent(kq, NULL, 0, evs, max, timeout_ms < 0 ? NULL : &ts);
	nerrs = 0;
	for (i = 0, m = 0; i < n; i++) {
		unsigned events;
		/*
		 * PPS_ERR as epoll's EPOLLERR | EPOLLHUP: an error, or a
		 * socket that can take nothing more.  EV_EOF on a read
		 * filter alone is the peer's end of stream (half-close),
		 * which epoll reports as readable only: data may still be
		 * queued before it.
		 */
		events = (evs[i].filter == EVFILT_READ ? PPS_IN : 0) |
		    (evs[i].filter == EVFILT_WRITE ? PPS_OUT : 0) |
		    ((evs[i].flags & EV_ERROR) || ((evs[i].flags & EV_EOF) &&
		    (evs[i].fflags != 0 || evs[i].filter == EVFILT_WRITE)) ?
		    PPS_ERR : 0);
		if ((evs[i].flags & EV_EOF) && evs[i].fflags != 0) {
			errs[nerrs].src = evs[i].udata;
			errs[nerrs++].err = (int)evs[i].fflags;
		}
		/*
		 * One event a source, as epoll gives: kqueue reports a read
		 * and a write filter apart, and a handler that closes the
		 * source's socket and opens another on the same source (a
		 * refused backend, retried on another host) must not see
		 * the old socket's second event as the new one's.
		 */
		for (j = 0; j < m; j++)
			if (out[j].src == evs[i].udata)
				break;
		if (j < m)
			out[j].events |= events;
		else {
			out[m].src = evs[i].udata;
			out[m++].events = events;
		}
	}
	return m;
}
#endif
