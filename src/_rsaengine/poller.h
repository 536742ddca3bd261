/*
 * Which poller poller.c is built with: epoll on Linux, kqueue on the BSDs.
 * build_ffi.py defines PPS_POLLER_EPOLL or PPS_POLLER_KQUEUE when asked
 * for one (make POLLER=kqueue: kqueue on Linux through libkqueue);
 * otherwise the system's own, here.  poller.c and sandbox.c (whose seccomp
 * filter allows what libkqueue calls) read it.
 */
#ifndef PPS_POLLER_H
#define PPS_POLLER_H

#if defined(PPS_POLLER_EPOLL) && defined(PPS_POLLER_KQUEUE)
#error "PPS_POLLER_EPOLL and PPS_POLLER_KQUEUE: one poller only"
#elif !defined(PPS_POLLER_EPOLL) && !defined(PPS_POLLER_KQUEUE)
#ifdef __linux__
#define PPS_POLLER_EPOLL	1
#else
#define PPS_POLLER_KQUEUE	1
#endif
#endif

#endif
