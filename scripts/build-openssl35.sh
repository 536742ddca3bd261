#!/bin/sh
# OpenSSL 3.5 (Debian 13 trixie's) into /opt/openssl35 (or PREFIX), for
# `make test-openssl35`: see build-openssl.sh.
exec sh "$(dirname "$0")/build-openssl.sh" trixie 3.5.7-1~deb13u2 "${PREFIX:-/opt/openssl35}"
