#!/bin/sh
# OpenSSL 4.0.2 into /opt/openssl4 (or PREFIX), from Debian's experimental
# suite, for `make test-openssl4`: see build-openssl.sh.
exec sh "$(dirname "$0")/build-openssl.sh" experimental 4.0.2-1 "${PREFIX:-/opt/openssl4}"
