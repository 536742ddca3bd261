/*
 * OpenBSD's <sys/event.h>, the part poller.c uses, with OpenBSD's types
 * and values (kqueue(2)); see openbsd.h.  glibc has no <sys/event.h>.
 */
#ifndef PPS_OPENBSD_STUB_SYS_EVENT_H
#define PPS_OPENBSD_STUB_SYS_EVENT_H

#include <stdint.h>
#include <time.h>

#define EVFILT_READ	(-1)
#define EVFILT_WRITE	(-2)

#define EV_ADD		0x0001
#define EV_DELETE	0x0002
#define EV_CLEAR	0x0020
#define EV_ERROR	0x4000
#define EV_EOF		0x8000

struct kevent {
	uintptr_t	ident;
	short		filter;
	unsigned short	flags;
	unsigned int	fflags;
	int64_t		data;
	void		*udata;
};

#define EV_SET(kevp, a, b, c, d, e, f) do {	\
	struct kevent *__kevp = (kevp);		\
	(__kevp)->ident = (a);			\
	(__kevp)->filter = (b);			\
	(__kevp)->flags = (c);			\
	(__kevp)->fflags = (d);			\
	(__kevp)->data = (e);			\
	(__kevp)->udata = (f);			\
} while (0)

int	kqueue(void);
int	kevent(int kq, const struct kevent *changelist, int nchanges,
	    struct kevent *eventlist, int nevents,
	    const struct timespec *timeout);

#endif
