#!/bin/sh
# `make bench`: the microbenchmarks (bench/test_micro.py), then pyprivsep side
# by side with nginx, haproxy, hitch and h2o (bench/run.py).  Arguments go to
# bench/run.py (see `.venv/bin/python bench/run.py --help`); so do the
# BENCH_* environment variables:
#   BENCH_QUICK=1        1 s cells, 1 repeat, short microbenchmarks (~2 min)
#   BENCH_DURATION=S     seconds per cell (default 3)
#   BENCH_REPEATS=N      interleaved rounds, the median is shown (default 3)
#   BENCH_CLIENTS=N      client processes in parallel (default 2)
#   BENCH_RELAYS=a,b     pps-async,pps-blocking,pps-inprocess,nginx,nginx-keyservice,
#                        haproxy,hitch,h2o,pps-async-p1,pps-blocking-p1,
#                        pps-async-softhsm,pps-async-p11kit (the key in a SoftHSM
#                        token, loaded by the cas or through p11-kit server)
#   BENCH_CERTS=a,b      rsa2048,p256
#   BENCH_MEASURES=a,b   full,resumed,mib
#   BENCH_TLS=1.3|1.2|default   what the clients ask for (default 1.3; every
#                        relay is configured for TLS 1.2 and 1.3)
#   BENCH_LATENCY_TIME=S the latency cell: S seconds of round trips per relay
#                        and round (default 5, quick 2; 0 skips it)
#   BENCH_LATENCY_REQUESTS=N   at most N round trips per relay and round (2000)
#   BENCH_SYSCALL_TIME=S the system call table: S seconds of full, then S of
#                        resumed connections under strace per relay (default 1;
#                        0 skips it)
#   BENCH_MICRO=0        skip the microbenchmarks
#
# The method: the figure compared is the server's CPU time per operation
# (every process of the relay under test, from /proc).  With 2 CPUs or more
# the relay under test runs on CPU 1 (`taskset -c 1` at its start, so all
# its processes: pyprivsep's parent, relays and cas, nginx's master and
# workers, h2o and its neverbleed, ...; run.py checks every thread's
# affinity, moves back to CPU 1 what pinned itself elsewhere (hitch binds
# worker N to CPU N), and prints it) and this script's clients (openssl s_time, curl,
# the latency client, strace) and the HTTP backend on CPU 0; on one CPU
# nothing is pinned and the output says so.  The clients ask for TLS 1.3.
# Rounds are interleaved (every relay once, then again) and the median of
# the rounds is shown, with each relay's ratio to the best peer (nginx,
# haproxy, hitch, h2o).  Then:
#   - the latency cell: pyprivsep (prefork 1, keyops async) and nginx (1
#     worker) with an RSA-4096 certificate, 2 `s_time -new` clients flooding
#     full handshakes, while one TLS session sends small requests to the
#     backend one at a time: p50 and p99 of those round trips;
#   - system calls per connection: `strace -c -f` attached to every process
#     of each relay while s_time makes full, then resumed connections.
# The chart shows the CPU per operation and the latency cell.  Every loop
# is bounded in time; all traffic stays on 127.0.0.1.
#
# Run as root, it installs the Debian packages it needs (nginx,
# libnginx-mod-stream, haproxy, hitch, h2o, strace) when they are missing;
# a relay whose package is missing gets "n/a" rows.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# ---- Debian packages --------------------------------------------------------
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || missing="$missing libnginx-mod-stream"
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
command -v hitch >/dev/null 2>&1 || missing="$missing hitch"
command -v h2o >/dev/null 2>&1 || missing="$missing h2o"
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -n "$missing" ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		# the packages' own services must not start (nginx, h2o would take port 80)
		sh scripts/apt-install.sh $missing ||
			echo "bench: could not install:$missing (their rows will be n/a)" >&2
	else
		echo "bench: not installed:$missing (run as root to install; their rows will be n/a)" >&2
	fi
fi

# ---- Python packages, into the venv -------------------------------------------
if ! "$PY" -c 'import matplotlib, pytest_benchmark' 2>/dev/null; then
	echo "bench: installing matplotlib pytest-benchmark into $(dirname "$(dirname "$PY")")"
	"$PY" -m pip install -q matplotlib pytest-benchmark
fi

mkdir -p bench/results
stamp=$(date +%Y%m%d-%H%M%S)
status=0

# ---- microbenchmarks ------------------------------------------------------------
micro=""
if [ "${BENCH_MICRO:-1}" != 0 ]; then
	case "${BENCH_QUICK:-0}" in
	'' | 0) max_time=0.5 ;;
	*) max_time=0.1 ;;
	esac
	micro=bench/results/$stamp-micro.json
	echo "== microbenchmarks (bench/test_micro.py)"
	"$PY" -m pytest -q -p no:cacheprovider bench/test_micro.py \
		--benchmark-max-time="$max_time" --benchmark-columns=min,median,mean,rounds \
		--benchmark-sort=name --benchmark-json="$micro" || status=1
fi

# ---- relays side by side --------------------------------------------------------
echo "== relays side by side (bench/run.py)"
"$PY" bench/run.py --out "bench/results/$stamp.json" ${micro:+--micro-json "$micro"} "$@" || status=1
exit $status
