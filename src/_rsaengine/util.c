/* Errors, logging and process hardening shared by every role. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "engine.h"

static char errbuf[512];
static char log_prefix[32] = "pyprivsep";

const char *
pps_error(void)
{
	return errbuf;
}

int
pps_seterr(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
	return -1;
}

/* "what: <first OpenSSL error>", and the OpenSSL error queue cleared. */
int
pps_seterr_ssl(const char *what)
{
	unsigned long e = ERR_get_error();
	char ebuf[256] = "unknown error";

	if (e != 0)
		ERR_error_string_n(e, ebuf, sizeof(ebuf));
	ERR_clear_error();
	return pps_seterr("%s: %s", what, ebuf);
}

void
pps_log(int prio, const char *fmt, ...)
{
	va_list ap;
	char msg[512];

	if (prio == LOG_DEBUG && !pps_conf.verbose)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (pps_conf.use_syslog)
		syslog(prio, "%s: %s", log_prefix, msg);
	else
		fprintf(stderr, "%s: %s\n", log_prefix, msg);
}

/* Who is talking ("relay 1", "ca 1") and where to; before any chroot. */
void
pps_log_setup(const char *prefix, int use_syslog, int verbose)
{
	snprintf(log_prefix, sizeof(log_prefix), "%s", prefix);
	pps_conf.use_syslog = use_syslog;
	pps_conf.verbose = verbose;
	if (use_syslog)		/* now: no /dev/log after chroot */
		openlog("pyprivsep", LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

/*
 * Check a frame of n bytes received from another process, before anything
 * of it is used: a whole header, at most max bytes in all, a length field
 * that matches the bytes after the header (so hdr->len <= max - header),
 * and our protocol version.  Returns 0, or the first PPS_FRAME_* that
 * applies with a message in pps_error().  *hdr is the header whenever the
 * frame holds one, even a bad frame's, so that an answer can echo its id
 * and key; zeroes otherwise.  The relay (ca replies, parent's control
 * messages) and the ca (requests) all read frames through here.
 */
int
pps_frame_check(const uint8_t *frame, size_t n, size_t max,
    struct pps_hdr *hdr)
{
	if (n < sizeof(*hdr)) {
		memset(hdr, 0, sizeof(*hdr));
		pps_seterr("short frame: %zu bytes", n);
		return PPS_FRAME_SHORT;
	}
	memcpy(hdr, frame, sizeof(*hdr));
	if (n > max) {
		pps_seterr("frame too long: %zu bytes", n);
		return PPS_FRAME_LONG;
	}
	if (hdr->len != n - sizeof(*hdr)) {
		pps_seterr("length field %u does not match %zu payload bytes",
		    hdr->len, n - sizeof(*hdr));
		return PPS_FRAME_LENGTH;
	}
	if (hdr->version != PPS_PROTO_VERSION) {
		pps_seterr("version %u", hdr->version);
		return PPS_FRAME_VERSION;
	}
	return 0;
}

/*
 * The one clock: monotonic microseconds (deadlines must not jump with the
 * wall clock).  The loop's seconds and milliseconds and the key operations'
 * deadlines and latencies all derive from it.
 */
uint64_t
pps_clock_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

#if defined(__SANITIZE_ADDRESS__)
void	__lsan_do_leak_check(void);
#endif

/*
 * In an AddressSanitizer build, report leaks now: the children leave by
 * _exit().  LeakSanitizer needs /proc and ptrace of itself, so a process
 * that is not dumpable (the ca) is skipped.
 */
void
pps_leak_check(void)
{
#if defined(__SANITIZE_ADDRESS__)
#ifdef __linux__
	if (prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 1)
		return;
#endif
	__lsan_do_leak_check();
#endif
}

int
pps_async_supported(void)
{
#ifdef OPENSSL_NO_ASYNC
	return 0;
#else
	return 1;
#endif
}

const char *
pps_library_version(void)
{
	return OpenSSL_version(OPENSSL_VERSION);
}
