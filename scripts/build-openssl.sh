#!/bin/sh
# Build an OpenSSL from Debian's source package into a prefix, for
# `make test OPENSSL_PREFIX=PREFIX`:
#
#     sh scripts/build-openssl.sh SUITE DEBVERSION PREFIX
#     sh scripts/build-openssl.sh experimental 4.0.2-1 /opt/openssl4
#
# SUITE is the Debian suite that has source package openssl DEBVERSION;
# only its upstream tarball is built, without Debian's patches, with
# `./Configure --prefix=PREFIX --libdir=lib shared -Wl,-rpath,PREFIX/lib`.
# Needs root (a temporary deb-src entry for SUITE, then /opt), a C compiler,
# perl and make; about 7 minutes of 2 cores, 12 to 16 when they are busy.
# Does nothing when PREFIX already holds that version.  When SUITE no longer
# has DEBVERSION it says so and lists the versions it has.
# scripts/build-openssl4.sh and build-openssl35.sh call it.
set -eu

if [ $# -ne 3 ]; then
	echo "usage: $0 SUITE DEBVERSION PREFIX (e.g. experimental 4.0.2-1 /opt/openssl4)" >&2
	exit 2
fi
SUITE=$1
DEBVERSION=$2
PREFIX=$3
# the upstream version: no epoch, no Debian revision
VERSION=${DEBVERSION#*:}
VERSION=${VERSION%-*}

if [ -x "$PREFIX/bin/openssl" ] && [ -f "$PREFIX/include/openssl/opensslv.h" ]; then
	have=$("$PREFIX/bin/openssl" version)
	case "$have" in
	"OpenSSL $VERSION "*)
		echo "$PREFIX: $have already installed"
		exit 0 ;;
	esac
	echo "$PREFIX holds $have, not OpenSSL $VERSION: remove it first" >&2
	exit 1
fi

if [ "$(id -u)" != 0 ]; then
	echo "$0: needs root (a temporary apt source for $SUITE, and $PREFIX);" \
	    "run it as root, or install OpenSSL $VERSION into $PREFIX yourself" >&2
	exit 1
fi
for tool in cc perl make apt-get; do
	if ! command -v $tool >/dev/null; then
		echo "$0: needs $tool" >&2
		exit 1
	fi
done

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
if [ -z "$MIRROR" ]; then
	echo "no Debian mirror in /etc/apt/sources.list*: set MIRROR" >&2
	exit 1
fi

list=/etc/apt/sources.list.d/tmp-openssl-$SUITE-src.list
work=
drop_source() {
	if [ -f "$list" ]; then
		rm -f "$list"
		apt-get update -q >/dev/null || true
	fi
}
cleanup() {
	drop_source
	if [ -n "$work" ]; then
		rm -rf "$work"
	fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP
work=$(mktemp -d "/tmp/openssl-$VERSION.XXXXXX")

# A temporary deb-src entry for SUITE, only for the download.
echo "deb-src $MIRROR $SUITE main" > "$list"
apt-get update -q
# The versions of source package openssl that SUITE has now.
available=$(apt-cache madison openssl |
    awk -F'|' -v suite="$SUITE" '
	{ v = $2; gsub(/ /, "", v) }
	$3 ~ "Sources" && $3 ~ (" " suite "/") { print v }' | sort -u)
if ! printf '%s\n' "$available" | grep -qxF "$DEBVERSION"; then
	echo "$0: Debian's $SUITE no longer has openssl $DEBVERSION;" \
	    "it has:" ${available:-nothing} >&2
	echo "change the version in the script that calls this one" >&2
	exit 1
fi
if ! (cd "$work" && apt-get source --download-only "openssl=$DEBVERSION"); then
	# listed, but the mirror has not (or no longer) its files
	echo "$0: could not download openssl $DEBVERSION from Debian's $SUITE" \
	    "(above); $SUITE lists:" $available >&2
	echo "try another of them in the script that calls this one" >&2
	exit 1
fi
drop_source

cd "$work"
for f in openssl_"$VERSION".orig.tar.*; do
	case "$f" in *.asc) ;; *) tar xf "$f" ;; esac
done
cd "openssl-$VERSION"
set -- --prefix="$PREFIX" --libdir=lib shared "-Wl,-rpath,$PREFIX/lib"
# A library with the sonames the system's has (libssl.so.3 for any 3.x)
# cannot be loaded beside it: in a process that has the system's already
# (Python's ssl and hashlib load it), the extension would get that one.
# Such a build gets a variant in its sonames, libssl-NAME.so.3 (Configure's
# shlib_variant, in a target of its own that inherits the detected one).
major=${VERSION%%.*}
if ldconfig -p | grep -q "^[[:space:]]*libssl\.so\.$major "; then
	target=$(./Configure "$@" | sed -n 's/^Configuring OpenSSL version .* for target //p')
	variant=-$(basename "$PREFIX")
	cat > pyprivsep.conf <<-EOF
	my %targets = (
	    "$target-pyprivsep" => {
	        inherit_from => [ "$target" ],
	        shlib_variant => "$variant",
	    },
	);
	EOF
	echo "the system has libssl.so.$major: sonames libssl$variant.so.$major," \
	    "libcrypto$variant.so.$major"
	set -- --config=pyprivsep.conf "$target-pyprivsep" "$@"
fi
./Configure "$@"
nice -n 19 make -j2
make install_sw
"$PREFIX/bin/openssl" version
