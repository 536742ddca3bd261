# pyprivsep: `make run` starts the demo relay, `make test` runs the tests.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOURCES := setup.py pyproject.toml build_ffi.py $(wildcard src/_rsaengine/*.[ch]) \
           $(wildcard src/provider/*.[ch])
CFLAGS_STRICT := -std=gnu11 -Wall -Wextra -Werror -O2 -c -o /dev/null

.PHONY: all build run test test-lib test-openssl4 test-kqueue bench asan fuzz warnings sysdeps testdeps users clean

# The event loop's poller: empty for the system's own (epoll on Linux,
# kqueue on the BSDs), or epoll or kqueue; build_ffi.py makes the choice
# from PYPRIVSEP_POLLER.  kqueue on Linux needs libkqueue: KQUEUE_PREFIX=/path
# where it is installed, or `pkg-config libkqueue`.  `make build
# POLLER=kqueue` builds .venv so (a change of POLLER rebuilds it); `make
# test POLLER=kqueue` runs the suite in a copy of the tree, build/kqueue
# (below), leaving .venv as it is.
POLLER        ?=
KQUEUE_PREFIX ?=
POLLER_ENV    := PYPRIVSEP_POLLER=$(POLLER) \
                 $(if $(strip $(KQUEUE_PREFIX)),KQUEUE_PREFIX=$(abspath $(KQUEUE_PREFIX)))
POLLER_STAMP  := $(VENV)/.poller-$(or $(strip $(POLLER)),default)

all: build

# What the machine needs besides PyPI: a C compiler, OpenSSL's headers, and
# the openssl and curl tools the tests drive.  Installed only when missing.
sysdeps:
	@missing=""; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	[ -f /usr/include/openssl/ssl.h ] || [ -n "$$OPENSSL_PREFIX" ] || missing="$$missing libssl-dev"; \
	pkg-config --exists p11-kit-1 2>/dev/null || [ -f /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || missing="$$missing libp11-kit-dev"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $$missing; \
		else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

# The servers tests/test_servers.py runs on loopback with our keys (and the
# integration tests with key references): nginx, postfix, dovecot (imapd),
# haproxy, and gdb (to read a server process's environment); SoftHSM2,
# p11-kit (server and client module) and opensc's pkcs11-tool for the
# PKCS#11 tests; iproute2's ip for the fleet's network namespaces.  Installed
# only when missing, as root, by scripts/apt-install.sh:
# none of their services starts (policy-rc.d), postfix gets "No
# configuration".  Not root: a note, and those tests skip saying why.
testdeps:
	@missing=""; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	[ -x /usr/sbin/postfix ] || missing="$$missing postfix"; \
	[ -x /usr/sbin/dovecot ] || missing="$$missing dovecot-core"; \
	[ -x /usr/lib/dovecot/imap-login ] || missing="$$missing dovecot-imapd"; \
	[ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	[ -f /usr/lib/softhsm/libsofthsm2.so ] || missing="$$missing softhsm2"; \
	command -v p11-kit >/dev/null || missing="$$missing p11-kit"; \
	[ -f /usr/lib/$$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/pkcs11/p11-kit-client.so ] || missing="$$missing p11-kit-modules"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then sh scripts/apt-install.sh $$missing; \
		else echo "not root, not installing:$$missing (their tests will skip)" >&2; fi; \
	fi

# The users the children run as (pyprivsep.conf(5) "user", "ca user"):
# relays and cas each their own, shared with no other daemon, so that an
# owned relay can signal or trace neither.  Created only when missing;
# root only (run by `make test` and `make run` when root).
PPS_USERS := _pyprivsep _pyprivsep_ca
users:
	@if [ "$$(id -u)" != 0 ]; then echo "make users: run as root" >&2; exit 1; fi; \
	for u in $(PPS_USERS); do \
		getent passwd $$u >/dev/null || { echo "creating user $$u"; \
		    useradd --system --user-group --no-create-home \
		    --home-dir /var/empty --shell /usr/sbin/nologin $$u || exit 1; }; \
	done

# `make test` and `make run` as root start daemons that setuid to them.
ifeq ($(shell id -u),0)
ROOT_DEPS := users
endif

$(STAMP): $(SOURCES) $(POLLER_STAMP) | sysdeps
	$(PYTHON) -m venv $(VENV)
	env -u OPENSSL_PREFIX $(POLLER_ENV) $(PY) -m pip install -q -e '.[test]'
	touch $@

# which poller .venv was built with: another one rebuilds it
$(POLLER_STAMP):
	mkdir -p $(VENV) && rm -f $(VENV)/.poller-* && touch $@

build: $(STAMP)

run: build $(ROOT_DEPS)
	$(PY) -m pyprivsep.demo

ifneq ($(strip $(OPENSSL_PREFIX)),)
test: test-lib
else ifeq ($(strip $(POLLER)),kqueue)
test: test-kqueue
else
test: build testdeps $(ROOT_DEPS)
	$(PY) -m pytest -q
endif

bench: build $(ROOT_DEPS)
	sh bench/bench.sh $(BENCH_ARGS)

# The C sources must compile without a warning: the extension's and the
# OpenSSL provider's (src/provider, not built against LibreSSL).  The
# headers are build_ffi.py's: OPENSSL_PREFIX's, else pkg-config's.  LibreSSL
# is told by its opensslv.h, not by a missing provider header: with
# OpenSSL's headers in /usr/include too, <openssl/core_dispatch.h> is found
# there and fails only by accident of the mix.
warnings:
	@if [ -n "$$OPENSSL_PREFIX" ]; then inc="-I$$OPENSSL_PREFIX/include"; \
	else inc="$$(pkg-config --cflags openssl 2>/dev/null)"; fi; \
	provider=src/provider/*.c; \
	if printf '#include <openssl/opensslv.h>\n' | cc -dM -E $$inc -x c - | \
	    grep -q '^#define LIBRESSL_VERSION_NUMBER'; then \
		echo "LibreSSL has no OpenSSL providers: src/provider skipped"; \
		provider=""; \
	fi; \
	for f in src/_rsaengine/*.c $$provider; do \
		cc $(CFLAGS_STRICT) $$inc $$(pkg-config --cflags p11-kit-1) -Isrc/_rsaengine -Isrc/provider $$f || exit 1; \
	done; echo "no warnings"

# The whole test suite with the extension built with AddressSanitizer, in a
# copy of the tree under build/asan.  The daemons run with the sanitizer's
# runtime preloaded; the test process, which loads the extension too, gets
# it as the extension's dependency (verify_asan_link_order=0).  Leaks are
# checked on demand only (exitcode=0: a report must not change a relay's
# exit status; reports are judged below): each relay process runs LeakSanitizer
# before it exits; that needs /proc and a dumpable process, so the test
# daemons' children stay root in chroot "/" and the privilege tests skip.
# Any memory error, or a leak allocated by our C code, fails the target
# (tests/asan_report.py).
ASAN_DIR := build/asan
asan: build testdeps
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)/reports
	git ls-files -z | xargs -0 cp --parents -t $(ASAN_DIR)
	cd $(ASAN_DIR) && CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" \
	    LDFLAGS="-fsanitize=address" ../../$(PY) build_ffi.py >/dev/null
	cd $(ASAN_DIR) && PYPRIVSEP_DAEMON_PRELOAD=$$(cc -print-file-name=libasan.so) \
	    PYPRIVSEP_ASAN_REPORTS=$(CURDIR)/$(ASAN_DIR)/reports \
	    ASAN_OPTIONS=detect_leaks=1:leak_check_at_exit=0:verify_asan_link_order=0:exitcode=0 \
	    ../../$(PY) -m pytest -q -p no:cacheprovider tests \
	    > $(CURDIR)/$(ASAN_DIR)/pytest.log 2>&1; rc=$$?; cat $(CURDIR)/$(ASAN_DIR)/pytest.log; exit $$rc
	grep -Eq '^[0-9]+ passed' $(ASAN_DIR)/pytest.log || \
	    { echo "make asan: the suite did not run to its end" >&2; exit 1; }
	$(PY) tests/asan_report.py $(ASAN_DIR)/reports

# The whole test suite against another OpenSSL or LibreSSL, installed under
# OPENSSL_PREFIX: `make test OPENSSL_PREFIX=/opt/openssl4`.  The extension is
# built against it in a copy of the tree, build/<last part of the prefix>,
# installed (editable) in a venv of its own, build/venv-<same>, and the
# suite runs in that copy, so the in-tree build and .venv stay as they are.
ifneq ($(strip $(OPENSSL_PREFIX)),)
LIB_NAME := $(notdir $(abspath $(OPENSSL_PREFIX)))
endif
LIB_DIR  := build/$(LIB_NAME)
LIB_VENV := build/venv-$(LIB_NAME)
LIB_PY   := $(CURDIR)/$(LIB_VENV)/bin/python
test-lib: sysdeps testdeps $(ROOT_DEPS)
	@if [ -z "$(LIB_NAME)" ]; then \
		echo "usage: make test OPENSSL_PREFIX=/path/to/an/installed/library" >&2; exit 2; fi
	@if [ ! -f "$(OPENSSL_PREFIX)/include/openssl/ssl.h" ]; then \
		echo "OPENSSL_PREFIX=$(OPENSSL_PREFIX): no include/openssl/ssl.h there" >&2; exit 2; fi
	rm -rf $(LIB_DIR) && mkdir -p $(LIB_DIR)
	git ls-files -z --cached --others --exclude-standard | \
	    tar -c --null -T - --ignore-failed-read -f - | tar -x -C $(LIB_DIR) -f -
	[ -x $(LIB_PY) ] || $(PYTHON) -m venv $(LIB_VENV)
	cd $(LIB_DIR) && OPENSSL_PREFIX=$(abspath $(OPENSSL_PREFIX)) \
	    $(LIB_PY) -m pip install -q -e '.[test]'
	cd $(LIB_DIR) && $(LIB_PY) -m pyprivsep -V
	cd $(LIB_DIR) && $(LIB_PY) -m pytest -q -rs -p no:cacheprovider tests

# The whole test suite with the kqueue poller: on Linux through libkqueue
# (KQUEUE_PREFIX=/path, or pkg-config libkqueue), which poller.c's kqueue
# side, written for OpenBSD, runs on.  Like test-lib: a copy of the tree,
# build/kqueue, installed in a venv of its own, build/venv-kqueue, against
# the system's OpenSSL; the in-tree build and .venv stay as they are.
KQ_DIR := build/kqueue
KQ_PY  := $(CURDIR)/build/venv-kqueue/bin/python
test-kqueue: sysdeps testdeps $(ROOT_DEPS)
	rm -rf $(KQ_DIR) && mkdir -p $(KQ_DIR)
	git ls-files -z --cached --others --exclude-standard | \
	    tar -c --null -T - --ignore-failed-read -f - | tar -x -C $(KQ_DIR) -f -
	[ -x $(KQ_PY) ] || $(PYTHON) -m venv build/venv-kqueue
	cd $(KQ_DIR) && env -u OPENSSL_PREFIX PYPRIVSEP_POLLER=kqueue \
	    $(if $(strip $(KQUEUE_PREFIX)),KQUEUE_PREFIX=$(abspath $(KQUEUE_PREFIX))) \
	    $(KQ_PY) -m pip install -v -e '.[test]' > pip.log 2>&1 || \
	    { cat pip.log; exit 1; }
	cd $(KQ_DIR) && grep 'build_ffi:' pip.log | sort -u
	cd $(KQ_DIR) && $(KQ_PY) -c 'from pyprivsep import native; \
	    p = native.poller(); print("poller:", p); assert p == "kqueue", p'
	cd $(KQ_DIR) && $(KQ_PY) -m pytest -q -rs -p no:cacheprovider tests

# OpenSSL 4.0, built into /opt/openssl4 when it is not there yet.
test-openssl4:
	sh scripts/build-openssl4.sh
	$(MAKE) test-lib OPENSSL_PREFIX=/opt/openssl4

# OpenSSL 3.5 (Debian 13's), the same way into /opt/openssl35, with sonames
# of its own beside the system's 3.0 (scripts/build-openssl.sh).
.PHONY: test-openssl35
test-openssl35:
	sh scripts/build-openssl35.sh
	$(MAKE) test-lib OPENSSL_PREFIX=/opt/openssl35

clean:
	rm -rf build $(VENV) pyprivsep/_rsaengine*.so pyprivsep/pyprivsep-provider.so pyprivsep/*.o *.egg-info

# A long fuzz run of the ca's frame handling and the relay's reply parser
# (make test runs a short one): FUZZ_EXAMPLES hypothesis examples a target.
FUZZ_EXAMPLES ?= 200000
fuzz: build
	PYPRIVSEP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py
