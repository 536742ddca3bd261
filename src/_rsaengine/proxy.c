/*
 * The PROXY protocol header a relay sends its backend first (proxy.h).
 * Built once per connection, when the backend connection is made, into
 * the front of the client-to-backend buffer: it leaves with the first
 * send(), together with whatever the client has sent by then.
 */
#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "proxy.h"

/* Both ends' family: AF_INET, AF_INET6, or AF_UNSPEC when they differ
 * or are neither (v1 says UNKNOWN then, v2 AF_UNSPEC). */
static int
proxy_family(const struct proxy_info *pi)
{
	int f = pi->src->ss_family;

	if (f != pi->dst->ss_family || (f != AF_INET && f != AF_INET6))
		return AF_UNSPEC;
	return f;
}

static int
proxy_v1(const struct proxy_info *pi, uint8_t *out, size_t outsize)
{
	const struct sockaddr_in *s4 = (const struct sockaddr_in *)pi->src;
	const struct sockaddr_in *d4 = (const struct sockaddr_in *)pi->dst;
	const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)pi->src;
	const struct sockaddr_in6 *d6 = (const struct sockaddr_in6 *)pi->dst;
	char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
	unsigned sport, dport;
	int n;

	switch (proxy_family(pi)) {
	case AF_INET:
		if (inet_ntop(AF_INET, &s4->sin_addr, src, sizeof(src)) == NULL ||
		    inet_ntop(AF_INET, &d4->sin_addr, dst, sizeof(dst)) == NULL)
			return -1;
		sport = ntohs(s4->sin_port);
		dport = ntohs(d4->sin_port);
		n = snprintf((char *)out, outsize, PP1_PREFIX PP1_TCP4
		    " %s %s %u %u\r\n", src, dst, sport, dport);
		break;
	case AF_INET6:
		if (inet_ntop(AF_INET6, &s6->sin6_addr, src, sizeof(src)) == NULL ||
		    inet_ntop(AF_INET6, &d6->sin6_addr, dst, sizeof(dst)) == NULL)
			return -1;
		sport = ntohs(s6->sin6_port);
		dport = ntohs(d6->sin6_port);
		n = snprintf((char *)out, outsize, PP1_PREFIX PP1_TCP6
		    " %s %s %u %u\r\n", src, dst, sport, dport);
		break;
	default:
		n = snprintf((char *)out, outsize, PP1_PREFIX PP1_UNKNOWN "\r\n");
		break;
	}
	/* snprintf's NUL is not sent; the line itself must fit */
	if (n < 0 || (size_t)n >= outsize || n > PP1_MAX_LEN)
		return -1;
	return n;
}

/* One TLV at out + *off, if it fits below end; 0, or -1 if it does not. */
static int
tlv_put(uint8_t *out, size_t *off, size_t end, uint8_t type,
    const void *value, size_t len)
{
	if (len > 0xffff || end < *off || end - *off < PP2_TLV_HEADER_LEN + len)
		return -1;
	out[*off] = type;
	out[*off + 1] = (uint8_t)(len >> 8);
	out[*off + 2] = (uint8_t)len;
	if (len > 0)
		memcpy(out + *off + PP2_TLV_HEADER_LEN, value, len);
	*off += PP2_TLV_HEADER_LEN + len;
	return 0;
}

static size_t
bounded_len(const char *s)
{
	size_t n = strlen(s);

	return n > PP2_SSL_STR_MAX ? PP2_SSL_STR_MAX : n;
}

static int
proxy_v2(const struct proxy_info *pi, uint8_t *out, size_t outsize)
{
	const struct sockaddr_in *s4 = (const struct sockaddr_in *)pi->src;
	const struct sockaddr_in *d4 = (const struct sockaddr_in *)pi->dst;
	const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)pi->src;
	const struct sockaddr_in6 *d6 = (const struct sockaddr_in6 *)pi->dst;
	size_t off = PP2_HEADER_LEN, ssl, len;
	uint8_t fam;

	if (outsize < PP2_HEADER_LEN + PP2_ADDR_LEN_INET6)
		return -1;
	memcpy(out, PP2_SIGNATURE, PP2_SIGNATURE_LEN);
	out[12] = PP2_VERSION | PP2_CMD_PROXY;
	switch (proxy_family(pi)) {
	case AF_INET:
		fam = PP2_FAM_INET | PP2_TRANS_STREAM;
		memcpy(out + off, &s4->sin_addr, 4);
		memcpy(out + off + 4, &d4->sin_addr, 4);
		memcpy(out + off + 8, &s4->sin_port, 2);	/* network order */
		memcpy(out + off + 10, &d4->sin_port, 2);
		off += PP2_ADDR_LEN_INET;
		break;
	case AF_INET6:
		fam = PP2_FAM_INET6 | PP2_TRANS_STREAM;
		memcpy(out + off, &s6->sin6_addr, 16);
		memcpy(out + off + 16, &d6->sin6_addr, 16);
		memcpy(out + off + 32, &s6->sin6_port, 2);
		memcpy(out + off + 34, &d6->sin6_port, 2);
		off += PP2_ADDR_LEN_INET6;
		break;
	default:
		fam = PP2_FAM_UNSPEC;	/* no addresses: the backend uses its own */
		break;
	}
	out[13] = fam;
	if (pi->alpn != NULL && pi->alpn_len > 0 &&
	    tlv_put(out, &off, outsize, PP2_TYPE_ALPN, pi->alpn,
	    pi->alpn_len) == -1)
		return -1;
	if (pi->authority != NULL && strlen(pi->authority) > 0 &&
	    strlen(pi->authority) <= PP2_AUTHORITY_MAX &&
	    tlv_put(out, &off, outsize, PP2_TYPE_AUTHORITY, pi->authority,
	    strlen(pi->authority)) == -1)
		return -1;
	if (pi->tls_version != NULL) {
		/* PP2_TYPE_SSL: client bits, verify, then its sub-TLVs; no
		 * client certificate is asked for, so none was verified:
		 * verify is non-zero, as the format says it is then */
		ssl = off;
		if (outsize < off || outsize - off <
		    PP2_TLV_HEADER_LEN + PP2_SSL_HEADER_LEN)
			return -1;
		off += PP2_TLV_HEADER_LEN;
		out[off] = PP2_CLIENT_SSL;
		out[off + 1] = out[off + 2] = out[off + 3] = 0;
		out[off + 4] = 1;
		off += PP2_SSL_HEADER_LEN;
		if (tlv_put(out, &off, outsize, PP2_SUBTYPE_SSL_VERSION,
		    pi->tls_version, bounded_len(pi->tls_version)) == -1 ||
		    (pi->tls_cipher != NULL && tlv_put(out, &off, outsize,
		    PP2_SUBTYPE_SSL_CIPHER, pi->tls_cipher,
		    bounded_len(pi->tls_cipher)) == -1))
			return -1;
		len = off - ssl - PP2_TLV_HEADER_LEN;
		out[ssl] = PP2_TYPE_SSL;
		out[ssl + 1] = (uint8_t)(len >> 8);
		out[ssl + 2] = (uint8_t)len;
	}
	len = off - PP2_HEADER_LEN;
	if (len > 0xffff)
		return -1;
	out[14] = (uint8_t)(len >> 8);
	out[15] = (uint8_t)len;
	return (int)off;
}

int
proxy_header(int version, const struct proxy_info *pi, uint8_t *out,
    size_t outsize)
{
	switch (version) {
	case PPS_PROXY_V1:
		return proxy_v1(pi, out, outsize);
	case PPS_PROXY_V2:
		return proxy_v2(pi, out, outsize);
	default:
		return -1;
	}
}
