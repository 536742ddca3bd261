#!/bin/sh
# Build OpenSSL 4.0.2 into /opt/openssl4 for `make test OPENSSL_PREFIX=/opt/openssl4`.
#
# The source is Debian's (experimental suite, package openssl 4.0.2-1); only
# the upstream tarball is built, without Debian's patches.  Needs root (apt and
# /opt), a C compiler, perl and make.  Takes 12 to 16 minutes on 2 cores.
# Does nothing when /opt/openssl4 already holds a build.
set -eu

PREFIX=${PREFIX:-/opt/openssl4}
VERSION=4.0.2
DEBVERSION=$VERSION-1

# The Debian mirror this machine's apt already uses (deb822 or one-line
# sources), unless MIRROR says otherwise.
debian_mirror() {
	cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
	    /etc/apt/sources.list.d/*.list 2>/dev/null |
	awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }
	    $1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; break } }' |
	grep -v security | grep -m 1 '/debian/*$' || true
}
MIRROR=${MIRROR:-$(debian_mirror)}

if [ -x "$PREFIX/bin/openssl" ] && [ -f "$PREFIX/include/openssl/opensslv.h" ]; then
	echo "$PREFIX: $("$PREFIX/bin/openssl" version) already installed"
	exit 0
fi

if [ -z "$MIRROR" ]; then
	echo "no Debian mirror in /etc/apt/sources.list*: set MIRROR" >&2
	exit 1
fi

work=$(mktemp -d /tmp/openssl4.XXXXXX)
list=/etc/apt/sources.list.d/tmp-openssl4-src.list
cleanup() {
	if [ -f "$list" ]; then
		rm -f "$list"
		apt-get update -q >/dev/null || true
	fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# A temporary deb-src entry for experimental, only for the download.
echo "deb-src $MIRROR experimental main" > "$list"
apt-get update -q
(cd "$work" && apt-get source --download-only "openssl=$DEBVERSION")
cleanup

cd "$work"
tar xzf "openssl_$VERSION.orig.tar.gz"
cd "openssl-$VERSION"
./Configure --prefix="$PREFIX" --libdir=lib shared "-Wl,-rpath,$PREFIX/lib"
nice -n 19 make -j2
make install_sw
"$PREFIX/bin/openssl" version
rm -rf "$work"
