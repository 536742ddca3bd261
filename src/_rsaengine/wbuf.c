/*
 * A connection's TLS output, gathered: the SSL's write BIO is this filter
 * in front of the socket, and the relay writes out what it gathered once
 * a step of the connection is over (wbuf_flush), so that what OpenSSL
 * writes and flushes record by record leaves in one write(): the two
 * TLS 1.3 session tickets, a response and its close_notify, or several
 * records of a download.  A packet on loopback costs its sender the
 * receiver's TCP processing too.
 *
 * BIO_flush() from the library is deferred to wbuf_flush(); past
 * WBUF_CAP bytes a write goes out at once (and can block: the SSL call
 * then says WANT_WRITE, as on the socket itself).
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>

#include "engine.h"

#define WBUF_CAP	(4 * (PPS_BUFSZ + 512))	/* four full records */

struct wbuf {
	size_t	 off, len;	/* unsent: data[off, off + len) */
	uint8_t	*data;		/* WBUF_CAP, only while something waits */
};

static BIO_METHOD *wbuf_method;
static int wbuf_type;

/* Write out what waits: 1 all gone, 0 the socket is full, -1 error. */
static int
wbuf_push(BIO *b, struct wbuf *w)
{
	BIO *next = BIO_next(b);
	int n;

	while (w->len > 0) {
		n = BIO_write(next, w->data + w->off, (int)w->len);
		if (n <= 0) {
			BIO_copy_next_retry(b);
			return BIO_should_retry(next) ? 0 : -1;
		}
		w->off += n;
		w->len -= n;
	}
	free(w->data);		/* idle connections hold no buffer */
	w->data = NULL;
	w->off = 0;
	return 1;
}

static int
wbuf_write(BIO *b, const char *in, int inl)
{
	struct wbuf *w = BIO_get_data(b);
	int r;

	BIO_clear_retry_flags(b);
	if (inl <= 0)
		return 0;
	if (w->len + (size_t)inl > WBUF_CAP - w->off) {
		if ((r = wbuf_push(b, w)) <= 0)
			return r == 0 ? -1 : r;		/* retry flags copied */
		if ((size_t)inl > WBUF_CAP) {
			r = BIO_write(BIO_next(b), in, inl);
			BIO_copy_next_retry(b);
			return r;
		}
	}
	if (w->data == NULL && (w->data = malloc(WBUF_CAP)) == NULL)
		return -1;
	memcpy(w->data + w->off + w->len, in, inl);
	w->len += inl;
	return inl;
}

static long
wbuf_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	struct wbuf *w = BIO_get_data(b);

	switch (cmd) {
	case BIO_CTRL_FLUSH:		/* wbuf_flush() does it */
		return 1;
	case BIO_CTRL_WPENDING:
		return (long)w->len + BIO_ctrl(BIO_next(b), cmd, num, ptr);
	default:
		return BIO_next(b) == NULL ? 0 :
		    BIO_ctrl(BIO_next(b), cmd, num, ptr);
	}
}

static int
wbuf_create(BIO *b)
{
	struct wbuf *w;

	if ((w = calloc(1, sizeof(*w))) == NULL)
		return 0;
	BIO_set_data(b, w);
	BIO_set_init(b, 1);
	return 1;
}

static int
wbuf_destroy(BIO *b)
{
	struct wbuf *w = BIO_get_data(b);

	if (w != NULL) {
		free(w->data);
		free(w);
	}
	BIO_set_data(b, NULL);
	return 1;
}

int
wbuf_init(void)
{
	if (wbuf_method != NULL)
		return 0;
	wbuf_type = BIO_get_new_index() | BIO_TYPE_FILTER;
	if ((wbuf_method = BIO_meth_new(wbuf_type,
	    "pyprivsep write buffer")) == NULL ||
	    !BIO_meth_set_write(wbuf_method, wbuf_write) ||
	    !BIO_meth_set_ctrl(wbuf_method, wbuf_ctrl) ||
	    !BIO_meth_set_create(wbuf_method, wbuf_create) ||
	    !BIO_meth_set_destroy(wbuf_method, wbuf_destroy))
		return pps_seterr_ssl("BIO_meth_new");
	return 0;
}

/* ssl reads from the socket fd and writes through a wbuf to it. */
int
wbuf_attach(SSL *ssl, int fd)
{
	BIO *sock, *wb;

	if ((sock = BIO_new_socket(fd, BIO_NOCLOSE)) == NULL)
		return -1;
	if ((wb = BIO_new(wbuf_method)) == NULL || !BIO_up_ref(sock)) {
		BIO_free(wb);
		BIO_free(sock);
		return -1;
	}
	BIO_push(wb, sock);
	SSL_set_bio(ssl, sock, wb);	/* owns one reference each */
	return 0;
}

/*
 * ssl's wbuf.  Not SSL_get_wbio() itself: LibreSSL's is its buffering BIO
 * in front of ours during a TLS 1.2 handshake, whose data is not a struct
 * wbuf (read as one, it sent the client whatever memory it pointed at).
 */
static BIO *
wbuf_bio(SSL *ssl)
{
	return BIO_find_type(SSL_get_wbio(ssl), wbuf_type);
}

/* What ssl gathered, written out: 1 all gone (or nothing waited), 0 the
 * socket is full (wait for it to be writable), -1 error. */
int
wbuf_flush(SSL *ssl)
{
	BIO *b = wbuf_bio(ssl);
	struct wbuf *w;

	if (b == NULL)
		return -1;
	w = BIO_get_data(b);
	return w->len == 0 ? 1 : wbuf_push(b, w);
}

int
wbuf_pending(SSL *ssl)
{
	BIO *b = wbuf_bio(ssl);

	return b != NULL && ((struct wbuf *)BIO_get_data(b))->len > 0;
}
