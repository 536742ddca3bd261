/*
 * Forced (-include) into each C file of src/_rsaengine by tests/test_openbsd.py,
 * compiled on Linux with -U__linux__ -D__OpenBSD__: what OpenBSD's headers
 * declare and glibc's do not, with OpenBSD's own prototypes (pledge(2),
 * unveil(2), getsockopt(2) SO_PEERCRED), so that the OpenBSD-only code
 * paths compile with -Wall -Wextra -Werror before anyone has an OpenBSD
 * machine.  A compile check only: nothing here runs.
 */
#ifndef PPS_OPENBSD_STUB_H
#define PPS_OPENBSD_STUB_H

/* OpenBSD's libc declares accept4, SOCK_NONBLOCK, ... by default
 * (__BSD_VISIBLE); glibc only with _GNU_SOURCE, which relay.c and ca.c
 * define on Linux alone */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sys/types.h>
#include <unistd.h>

/* <unistd.h> */
int	pledge(const char *promises, const char *execpromises);
int	unveil(const char *path, const char *permissions);

/* <sys/socket.h>: getsockopt(SO_PEERCRED) fills this on OpenBSD */
struct sockpeercred {
	uid_t	uid;
	gid_t	gid;
	pid_t	pid;
};

#endif
