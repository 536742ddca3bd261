/*
 * The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt): the
 * header a relay writes to its backend before any byte of the client's,
 * so that the backend learns the client's address and port, the address
 * and port the client connected to, and (v2) the TLS session's ALPN
 * protocol, server name (SNI), version and cipher.  Every constant of the format is here;
 * proxy.c builds the header.
 */
#ifndef PPS_PROXY_H
#define PPS_PROXY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* `forward to ... proxy protocol v1|v2` (struct relay.proxy) */
#define PPS_PROXY_NONE		0
#define PPS_PROXY_V1		1
#define PPS_PROXY_V2		2

/* v1: "PROXY TCP4 src dst sport dport\r\n", 107 bytes at most */
#define PP1_PREFIX		"PROXY "
#define PP1_TCP4		"TCP4"
#define PP1_TCP6		"TCP6"
#define PP1_UNKNOWN		"UNKNOWN"
#define PP1_MAX_LEN		107

/* v2: 12-byte signature, version|command, family|transport, length (big
 * endian: the bytes after these 16), addresses, TLVs */
#define PP2_SIGNATURE		"\r\n\r\n\0\r\nQUIT\n"
#define PP2_SIGNATURE_LEN	12
#define PP2_HEADER_LEN		16
#define PP2_VERSION		0x20
#define PP2_CMD_LOCAL		0x00
#define PP2_CMD_PROXY		0x01
#define PP2_FAM_UNSPEC		0x00
#define PP2_FAM_INET		0x10
#define PP2_FAM_INET6		0x20
#define PP2_TRANS_STREAM	0x01
#define PP2_ADDR_LEN_INET	12	/* src, dst (4 each), sport, dport */
#define PP2_ADDR_LEN_INET6	36	/* src, dst (16 each), sport, dport */

/* v2 TLVs: type (1), length (2, big endian), value */
#define PP2_TLV_HEADER_LEN	3
#define PP2_TYPE_ALPN		0x01
#define PP2_TYPE_AUTHORITY	0x02
#define PP2_TYPE_SSL		0x20
#define PP2_SUBTYPE_SSL_VERSION	0x21
#define PP2_SUBTYPE_SSL_CN	0x22
#define PP2_SUBTYPE_SSL_CIPHER	0x23
/* PP2_TYPE_SSL's value: client (1), verify (4, big endian), sub-TLVs */
#define PP2_SSL_HEADER_LEN	5
#define PP2_CLIENT_SSL		0x01	/* the client connected over TLS */
#define PP2_CLIENT_CERT_CONN	0x02	/* ... with a certificate, on this
					 * connection */
#define PP2_CLIENT_CERT_SESS	0x04	/* ... in this session */

/* The largest header proxy_header() makes: v2, IPv6, an ALPN protocol
 * and a server name (255 bytes at most each: a longer name is left
 * out), the SSL TLV with a version and a cipher name (each cut to
 * PP2_SSL_STR_MAX). */
#define PP2_SSL_STR_MAX		64
#define PP2_AUTHORITY_MAX	255
#define PPS_PROXY_MAX		(PP2_HEADER_LEN + PP2_ADDR_LEN_INET6 + \
	    PP2_TLV_HEADER_LEN + 255 + \
	    PP2_TLV_HEADER_LEN + PP2_AUTHORITY_MAX + PP2_TLV_HEADER_LEN + \
	    PP2_SSL_HEADER_LEN + 2 * (PP2_TLV_HEADER_LEN + PP2_SSL_STR_MAX))

/* What the header says about a connection. */
struct proxy_info {
	const struct sockaddr_storage *src;	/* the client */
	const struct sockaddr_storage *dst;	/* where it connected to */
	const uint8_t	*alpn;		/* the protocol chosen, or NULL */
	size_t		 alpn_len;
	const char	*authority;	/* the client's SNI host name, or NULL */
	const char	*tls_version;	/* "TLSv1.3"; NULL: no SSL TLV */
	const char	*tls_cipher;
};

/* The header of the given version in out; its length, or -1 if out is
 * too small (PPS_PROXY_MAX always is large enough). */
int	proxy_header(int version, const struct proxy_info *, uint8_t *out,
	    size_t outsize);

#endif
