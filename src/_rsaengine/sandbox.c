/*
 * The last step of a child's setup: confine what it may still ask of the
 * kernel.  A relay parses TLS from the network; a ca answers whatever its
 * relay sends.  Either may one day be owned by an attacker, and that
 * attacker must get nothing more than the process already has: no signals
 * to other processes, no ptrace, no rlimits of others, no new programs or
 * processes, no files, no new kinds of sockets.
 *
 * Linux: PR_SET_NO_NEW_PRIVS and a seccomp-BPF filter, written by hand
 * below (OpenSSH's sandbox-seccomp-filter.c is the model).  Everything
 * not listed kills the whole process (SECCOMP_RET_KILL_PROCESS), so a
 * missing entry shows as a relay or ca "killed by signal 31" in the
 * parent's log and a "type=1326" audit line in the kernel log, never as a
 * silent failure.  File opens return EACCES instead: libraries probe files
 * (OpenSSL's configuration, glibc's time zone, Python's linecache for a
 * traceback) and must see an ordinary failure.
 *
 * kqueue on Linux (make POLLER=kqueue, through libkqueue; poller.h): the
 * relay's filter also allows the ioctl()s libkqueue reads a socket's queue
 * sizes with and the select() its signal thread waits in, and the filter
 * is installed on every thread (TSYNC), since libkqueue runs threads of
 * its own.  The epoll build is left as it was.
 *
 * OpenBSD: pledge(2), relay and hce "stdio inet", ca "stdio", keyservice ca
 * "stdio unix" (accept, getsockopt SO_PEERCRED).
 *
 * Both: the ca (either kind) also gets no core dumps and is not dumpable (no ptrace or
 * /proc/PID/mem, even by its own uid).
 *
 * Call once, after keys are loaded, chroot and setuid (setuid resets the
 * dumpable flag), right before the role's loop.
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/resource.h>

#ifdef __linux__
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/sockios.h>
#endif

#include "engine.h"
#include "poller.h"

/* gcc says __SANITIZE_ADDRESS__, clang __has_feature(address_sanitizer) */
#if defined(__SANITIZE_ADDRESS__)
#define PPS_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PPS_SANITIZED 1
#endif
#endif

/* ---- the ca's own hardening (both systems) ---- */

static int
no_core_dumps(void)
{
	struct rlimit rl = { 0, 0 };

	if (setrlimit(RLIMIT_CORE, &rl) == -1)
		return pps_seterr("setrlimit(RLIMIT_CORE): %s", strerror(errno));
#ifdef __linux__
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == -1)
		return pps_seterr("prctl(PR_SET_DUMPABLE): %s", strerror(errno));
#endif
	return 0;
}

/* ---- Linux: seccomp-BPF (not in a sanitizer build, see pps_sandbox) ---- */

#if defined(__linux__) && !defined(PPS_SANITIZED)

#if defined(__x86_64__)
#define PPS_AUDIT_ARCH	AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define PPS_AUDIT_ARCH	AUDIT_ARCH_AARCH64
#endif

#ifndef SECCOMP_RET_KILL_PROCESS	/* headers older than Linux 4.14 */
#define SECCOMP_RET_KILL_PROCESS	0x80000000U
#endif
#ifndef __X32_SYSCALL_BIT
#define __X32_SYSCALL_BIT		0x40000000U
#endif

#define RET_ERRNO(e)	(SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))

/* Where the low 32 bits of argument n are in struct seccomp_data. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ARG_LO(n)	(offsetof(struct seccomp_data, args[n]))
#else
#define ARG_LO(n)	(offsetof(struct seccomp_data, args[n]) + 4)
#endif

/*
 * What both roles call once their loop runs: the loop itself (C), the
 * allocator, OpenSSL, glibc's syslog, and Python between and after the C
 * calls (signal handlers, logging, logging.shutdown(), os._exit()).
 * -1 ends the list; a name this architecture lacks (aarch64 has no open,
 * poll or epoll_wait, only their *at / p* forms) is left out by #ifdef.
 */
static const int common_calls[] = {
	/* descriptors we hold: sockets, stderr */
	__NR_read, __NR_write, __NR_readv, __NR_writev, __NR_close,
#ifdef __NR_lseek
	__NR_lseek,		/* Python's stderr text layer asks where it is */
#endif
	__NR_fcntl,
#ifdef __NR_fstat
	__NR_fstat,
#endif
#ifdef __NR_newfstatat
	/* fstat() in glibc >= 2.33; paths lead only into the empty chroot */
	__NR_newfstatat,
#endif
	__NR_recvfrom, __NR_sendto, __NR_recvmsg, __NR_sendmsg,
	__NR_recvmmsg, __NR_sendmmsg,
#ifdef __NR_poll
	__NR_poll,
#endif
	__NR_ppoll,
	/* memory: malloc, malloc_trim, OpenSSL's ASYNC stacks, Python */
	__NR_brk, __NR_mmap, __NR_munmap, __NR_mremap, __NR_mprotect,
	__NR_madvise,
	__NR_futex,
	/* time, where the vDSO cannot answer; nothing sleeps: loops wait in
	 * epoll or ppoll */
	__NR_clock_gettime, __NR_clock_getres, __NR_gettimeofday,
	/* OpenSSL: fork detection and its random generator */
	__NR_getpid, __NR_gettid, __NR_getrandom,
	/*
	 * signals: handlers return; swapcontext() (OpenSSL ASYNC jobs) sets
	 * the mask; the ca installs its SIGTERM handler (ca.c) and puts
	 * Python's back when its loop returns
	 */
	__NR_rt_sigreturn, __NR_rt_sigprocmask, __NR_rt_sigaction,
	__NR_restart_syscall, __NR_sched_yield,
	__NR_exit, __NR_exit_group,
	-1
};

/* A relay: the event loop, clients, backends. */
static const int relay_calls[] = {
#ifdef __NR_epoll_wait
	__NR_epoll_wait,
#endif
	__NR_epoll_pwait,
#ifdef __NR_epoll_pwait2
	__NR_epoll_pwait2,
#endif
	__NR_epoll_ctl,
#ifdef __NR_accept
	__NR_accept,
#endif
	__NR_accept4, __NR_connect, __NR_shutdown,
	__NR_setsockopt, __NR_getsockopt, __NR_getsockname, __NR_getpeername,
	-1
};

#if defined(PPS_POLLER_KQUEUE)
/*
 * A relay built with kqueue on Linux: libkqueue's signal thread waits in
 * select() on its signalfd.  It blocks every signal, but a stop and a
 * continue (SIGSTOP, the cgroup freezer, ptrace) restart the call it
 * waits in, and a restarted call meets the filter again: without these
 * the relay dies on its first thaw.  (Its other thread waits in
 * epoll_wait, already listed.)
 */
static const int kqueue_calls[] = {
#ifdef __NR_select
	__NR_select,
#endif
	__NR_pselect6,
	-1
};
#endif

/*
 * The health checks (hce.py): Python connects to the hosts (with a
 * timeout: non-blocking connect, poll, SO_ERROR), speaks TLS to some, and
 * waits for its next check in epoll.  No accept, no listen, no bind.
 * ioctl is FIONBIO only (Python's setblocking), filtered in build().
 */
static const int hce_calls[] = {
#ifdef __NR_epoll_wait
	__NR_epoll_wait,
#endif
	__NR_epoll_pwait,
	__NR_epoll_ctl,
	__NR_connect, __NR_shutdown,
	__NR_setsockopt, __NR_getsockopt, __NR_getsockname, __NR_getpeername,
	-1
};

/* A ca: its SOCK_SEQPACKET, stderr or syslog; the common list is enough. */
static const int ca_calls[] = {
	-1
};

/*
 * A keyservice ca: a ca that accepts its clients on the listening socket
 * it inherited and reads each one's SO_PEERCRED (ca.c).  getsockopt is
 * not narrowed to SO_PEERCRED: every other option of a socket the ca
 * already holds tells it nothing it could abuse.
 */
static const int keyservice_calls[] = {
#ifdef __NR_accept
	__NR_accept,
#endif
	__NR_accept4, __NR_getsockopt,
	-1
};

/*
 * A ca (or keyservice ca) whose keys are in a PKCS#11 token
 * (PPS_SANDBOX_P11): the module runs in the ca and, at every reopening
 * of its session, reads files (SoftHSM: its configuration and token
 * directory, with locks) or connects a UNIX socket (p11-kit-client: its
 * p11-kit server).  So such a ca may open files (as its own user, out of
 * the chroot) and make AF_UNIX sockets and connect them; still no new
 * processes, no signals to others, no ptrace, no IPv4/IPv6 sockets, no
 * exec.  The key is in the token: what an owned ca gains is the use of
 * the token's key while it lives, which it had anyway.  The list is what
 * strace showed SoftHSM 2.6 and p11-kit-client 0.25 call in a ca while
 * signing, after the token went away and came back, and reconnecting to
 * a restarted p11-kit server; another vendor's module may need more, and
 * a call missing here kills the ca loudly (signal 31, as above).
 */
static const int p11_calls[] = {
	/* SoftHSM: its configuration, token directory and object files,
	 * locked with fcntl (in the common list) and truncated on update */
#ifdef __NR_open
	__NR_open,
#endif
	__NR_openat,
#ifdef __NR_stat
	__NR_stat, __NR_lstat,		/* older glibc's stat(), lstat() */
#endif
#ifdef __NR_access
	__NR_access,
#endif
	__NR_faccessat, __NR_getdents64, __NR_ftruncate, __NR_fsync,
	__NR_fdatasync,
	/* p11-kit-client: its server's socket (socket() is AF_UNIX only) */
	__NR_connect,
	-1
};

/* Answered EACCES, not killed: probes by libraries, which cope. */
static const int eacces_calls[] = {
#ifdef __NR_open
	__NR_open,
#endif
	__NR_openat,
#ifdef __NR_openat2
	__NR_openat2,
#endif
	-1
};

#define PROG_MAX	256	/* far more than the lists above need */

struct prog {
	struct sock_filter	ins[PROG_MAX];
	unsigned		n;
	int			overflow;
};

static void
emit(struct prog *p, struct sock_filter ins)
{
	if (p->n == PROG_MAX) {
		p->overflow = 1;
		return;
	}
	p->ins[p->n++] = ins;
}

/* if (nr == list[i]) return ret; for each entry.  The nr is in A. */
static void
emit_list(struct prog *p, const int *list, uint32_t ret)
{
	for (; *list != -1; list++) {
		emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
		    (uint32_t)*list, 0, 1));
		emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, ret));
	}
}

/*
 * if (nr == call) { if (low 32 bits of args[arg] is one of vals[0..n))
 * return ALLOW; else return *other, or with other NULL, go on to the next
 * test (nr reloaded) }.  The nr is in A.  The kernel reads an ioctl
 * request or a socket family as an int: the low 32 bits decide.
 */
static void
emit_arg_in(struct prog *p, int call, int arg, const uint32_t *vals,
    unsigned n, const uint32_t *other)
{
	unsigned i;

	emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
	    (uint32_t)call, 0, n + 3));
	emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
	    ARG_LO(arg)));
	for (i = 0; i < n; i++)
		emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
		    vals[i], n - 1 - i, i == n - 1 ? 1 : 0));
	emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K,
	    SECCOMP_RET_ALLOW));
	if (other != NULL)
		emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, *other));
	else
		emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
		    offsetof(struct seccomp_data, nr)));
}

static void
build(struct prog *p, int role, int p11)
{
	static const uint32_t fionbio[] = { FIONBIO };
	static const uint32_t unix_only[] = { AF_UNIX };
	static const uint32_t inet[] = { AF_INET, AF_INET6 };
#if defined(PPS_POLLER_KQUEUE)
	static const uint32_t queued[] = { SIOCINQ, SIOCOUTQ };
#endif
	const uint32_t kill = SECCOMP_RET_KILL_PROCESS;
	const uint32_t eacces = RET_ERRNO(EACCES);

	/* the architecture first: a syscall number means nothing without it */
	emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
	    offsetof(struct seccomp_data, arch)));
	emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
	    PPS_AUDIT_ARCH, 1, 0));
	emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K,
	    SECCOMP_RET_KILL_PROCESS));
	emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
	    offsetof(struct seccomp_data, nr)));
#if defined(__x86_64__)
	/*
	 * x32 calls arrive with AUDIT_ARCH_X86_64 and the x32 bit set in the
	 * number: they would bypass every test below.  Refuse them.
	 */
	emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K,
	    __X32_SYSCALL_BIT, 0, 1));
	emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K,
	    SECCOMP_RET_KILL_PROCESS));
#endif
	emit_list(p, common_calls, SECCOMP_RET_ALLOW);
	emit_list(p, role == PPS_SANDBOX_RELAY ? relay_calls :
	    role == PPS_SANDBOX_HCE ? hce_calls :
	    role == PPS_SANDBOX_KEYSERVICE ? keyservice_calls : ca_calls,
	    SECCOMP_RET_ALLOW);
	if (p11)
		emit_list(p, p11_calls, SECCOMP_RET_ALLOW);
	/* the hce: ioctl(fd, FIONBIO, ...) only */
	if (role == PPS_SANDBOX_HCE)
		emit_arg_in(p, __NR_ioctl, 1, fionbio, 1, &kill);
#if defined(PPS_POLLER_KQUEUE)
	if (role == PPS_SANDBOX_RELAY)
		emit_list(p, kqueue_calls, SECCOMP_RET_ALLOW);
	/*
	 * libkqueue's EVFILT_READ and EVFILT_WRITE fill in kevent.data with
	 * what a socket has queued: ioctl(SIOCINQ) (= FIONREAD, also for
	 * pipes) and ioctl(SIOCOUTQ), for each event.  Those two requests
	 * pass in a relay; any other ioctl kills it, as before.  The kernel
	 * reads the request as an unsigned int: the low 32 bits decide.
	 */
	if (role == PPS_SANDBOX_RELAY)
		emit_arg_in(p, __NR_ioctl, 1, queued, 2, &kill);
#endif
	emit_list(p, eacces_calls, RET_ERRNO(EACCES));
	/*
	 * socket(): a relay connects to its backends over IPv4 or IPv6, so
	 * those two families pass; any other (AF_UNIX: glibc's syslog
	 * reconnecting to /dev/log, AF_NETLINK, AF_PACKET...) and, in a ca,
	 * every family fails with EACCES, so a logger that tries survives.
	 * The kernel reads the family as an int: the low 32 bits decide.
	 */
	if (p11)	/* a PKCS#11 module's ca: AF_UNIX sockets too */
		emit_arg_in(p, __NR_socket, 0, unix_only, 1, NULL);
	if (role == PPS_SANDBOX_RELAY || role == PPS_SANDBOX_HCE)
		emit_arg_in(p, __NR_socket, 0, inet, 2, &eacces);
	else {
		emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
		    __NR_socket, 0, 1));
		emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, eacces));
	}
	/* everything else: kill, kill, ptrace, execve, clone, prlimit64... */
	emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K,
	    SECCOMP_RET_KILL_PROCESS));
}

static int
seccomp_install(int role, int p11, const char *name)
{
#if !defined(PPS_AUDIT_ARCH)
	(void)role;
	(void)p11;
	pps_log(LOG_WARNING, "no seccomp filter for this architecture (%s)",
	    name);
	return 0;
#else
	static struct prog p;		/* 2 KB: not on a small stack */
	struct sock_fprog fprog;

	memset(&p, 0, sizeof(p));
	build(&p, role, p11);
	if (p.overflow)
		return pps_seterr("seccomp: filter longer than %d instructions",
		    PROG_MAX);
	fprog.len = (unsigned short)p.n;
	fprog.filter = p.ins;
	/* needed to install a filter without CAP_SYS_ADMIN; and no setuid
	 * program could give an owned process more than it has */
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1)
		return pps_seterr("prctl(PR_SET_NO_NEW_PRIVS): %s",
		    strerror(errno));
#if defined(PPS_POLLER_KQUEUE)
	/*
	 * prctl(PR_SET_SECCOMP) filters the calling thread only.  libkqueue's
	 * first kqueue() started a thread (it watches for the kqueue's
	 * descriptor being closed) before the sandbox: unfiltered, it would
	 * be a way out for whoever owns the relay.  TSYNC puts the same
	 * filter, and no_new_privs, on every thread of the process; a
	 * positive return is a thread that could not take it.
	 */
	{
		long r = syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER,
		    SECCOMP_FILTER_FLAG_TSYNC, &fprog);

		if (r == -1)
			return pps_seterr("seccomp(TSYNC): %s",
			    strerror(errno));
		if (r != 0)
			return pps_seterr("seccomp(TSYNC): thread %ld cannot "
			    "take the filter", r);
	}
#else
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0) == -1)
		return pps_seterr("prctl(PR_SET_SECCOMP): %s", strerror(errno));
#endif
	/* the log prefix already says which process; name the role's filter */
	pps_log(LOG_DEBUG, "seccomp filter for a %s%s: %u instructions", name,
	    p11 ? " with a PKCS#11 module" : "", p.n);
	return 0;
#endif
}

#endif /* __linux__ && !PPS_SANITIZED */

int
pps_sandbox(int role)
{
	const char *name;
	int p11 = (role & PPS_SANDBOX_P11) != 0;

	role &= ~PPS_SANDBOX_P11;
	if (p11 && role != PPS_SANDBOX_CA && role != PPS_SANDBOX_KEYSERVICE)
		return pps_seterr("sandbox: a PKCS#11 module in a ca only");
	if (role == PPS_SANDBOX_RELAY)
		name = "relay";
	else if (role == PPS_SANDBOX_CA)
		name = "ca";
	else if (role == PPS_SANDBOX_KEYSERVICE)
		name = "keyservice ca";
	else if (role == PPS_SANDBOX_HCE)
		name = "hce";
	else
		return pps_seterr("sandbox: unknown role %d", role);
	if ((role == PPS_SANDBOX_CA || role == PPS_SANDBOX_KEYSERVICE) &&
	    no_core_dumps() == -1)
		return -1;
#if defined(PPS_SANITIZED)
	/* LeakSanitizer stops the process with ptrace to scan it */
	pps_log(LOG_WARNING, "AddressSanitizer build: no seccomp filter, no "
	    "pledge for the %s", name);
	return 0;
#elif defined(__linux__)
	return seccomp_install(role, p11, name);
#elif defined(__OpenBSD__)
	if (pledge(p11 ? "stdio rpath wpath cpath flock unix" :
	    role == PPS_SANDBOX_RELAY || role == PPS_SANDBOX_HCE ?
	    "stdio inet" :
	    role == PPS_SANDBOX_KEYSERVICE ? "stdio unix" : "stdio",
	    NULL) == -1)
		return pps_seterr("%s: pledge: %s", name, strerror(errno));
	return 0;
#else
	(void)name;
	(void)p11;
	return 0;
#endif
}
