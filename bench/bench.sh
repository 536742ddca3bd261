#!/bin/sh
# `make bench`: the microbenchmarks (bench/test_micro.py), then pyprivsep side
# by side with nginx, haproxy and hitch (bench/run.py).  Arguments go to
# bench/run.py (see `.venv/bin/python bench/run.py --help`); so do the
# BENCH_* environment variables:
#   BENCH_QUICK=1        1 s cells, 1 repeat, short microbenchmarks (~2 min)
#   BENCH_DURATION=S     seconds per cell (default 3)
#   BENCH_REPEATS=N      runs per cell, the median is shown (default 3)
#   BENCH_CLIENTS=N      client processes in parallel (default 2)
#   BENCH_RELAYS=a,b     pps-async,pps-blocking,pps-inprocess,nginx,nginx-keyservice,
#                        haproxy,hitch,pps-async-p1,pps-blocking-p1
#   BENCH_CERTS=a,b      rsa2048,p256
#   BENCH_MEASURES=a,b   full,resumed,mib
#   BENCH_TLS=1.2|1.3    client TLS version (default: the highest)
#   BENCH_MICRO=0        skip the microbenchmarks
# Run as root, it installs the Debian packages it needs (nginx,
# libnginx-mod-stream, haproxy, hitch) when they are missing; a relay whose
# package is missing gets "n/a" rows.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# ---- Debian packages --------------------------------------------------------
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || missing="$missing libnginx-mod-stream"
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
command -v hitch >/dev/null 2>&1 || missing="$missing hitch"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -n "$missing" ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		# the packages' own services must not start (nginx would take port 80)
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
