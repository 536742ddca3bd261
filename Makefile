# pyprivsep: `make run` starts the demo relay, `make test` runs the tests.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOURCES := setup.py pyproject.toml build_ffi.py $(wildcard src/_rsaengine/*.[ch])
CFLAGS_STRICT := -std=gnu11 -Wall -Wextra -Werror -fsyntax-only

.PHONY: all build run test bench asan warnings sysdeps clean

all: build

# What the machine needs besides PyPI: a C compiler, OpenSSL's headers, and
# the openssl and curl tools the tests drive.  Installed only when missing.
sysdeps:
	@missing=""; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	[ -f /usr/include/openssl/ssl.h ] || [ -n "$$OPENSSL_PREFIX" ] || missing="$$missing libssl-dev"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $$missing; \
		else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

$(STAMP): $(SOURCES) | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

build: $(STAMP)

run: build
	$(PY) -m pyprivsep.demo

test: build
	$(PY) -m pytest -q

bench: build
	sh bench/bench.sh $(BENCH_ARGS)

# The C sources must compile without a warning.
warnings:
	@for f in src/_rsaengine/*.c; do \
		cc $(CFLAGS_STRICT) $$(pkg-config --cflags openssl 2>/dev/null) \
		    $$( [ -n "$$OPENSSL_PREFIX" ] && echo -I$$OPENSSL_PREFIX/include ) \
		    -Isrc/_rsaengine $$f || exit 1; \
	done; echo "no warnings"

# The whole test suite with the extension built with AddressSanitizer, in a
# copy of the tree under build/asan.  Each relay process runs LeakSanitizer
# before it exits; that needs /proc and a dumpable process, so the test
# daemons' children stay root in chroot "/" and the privilege tests skip.
# Any memory error, or a leak allocated by our C code, fails the target
# (tests/asan_report.py).
ASAN_DIR := build/asan
asan: build
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)/reports
	git ls-files -z | xargs -0 cp --parents -t $(ASAN_DIR)
	cd $(ASAN_DIR) && CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" \
	    LDFLAGS="-fsanitize=address" ../../$(PY) build_ffi.py >/dev/null
	cd $(ASAN_DIR) && PYPRIVSEP_DAEMON_PRELOAD=$$(cc -print-file-name=libasan.so) \
	    PYPRIVSEP_ASAN_REPORTS=$(CURDIR)/$(ASAN_DIR)/reports \
	    ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=exitcode=0:leak_check_at_exit=0 \
	    ../../$(PY) -m pytest -q -p no:cacheprovider tests
	$(PY) tests/asan_report.py $(ASAN_DIR)/reports

clean:
	rm -rf build $(VENV) pyprivsep/_rsaengine*.so pyprivsep/*.o *.egg-info
