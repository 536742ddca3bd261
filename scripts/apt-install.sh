#!/bin/sh
# Install Debian packages without letting them start their services:
#
#     sh scripts/apt-install.sh PACKAGE...
#
# Used by `make testdeps` (the servers the tests drive: nginx, postfix,
# dovecot, haproxy) and by bench/bench.sh.  Root only; the caller decides
# what is missing.  During the install:
#   - /usr/sbin/policy-rc.d exits 101, so that no postinst starts a service
#     (nginx would take port 80, postfix 25, dovecot 143/993); an existing
#     policy-rc.d is moved aside and put back afterwards, ours is removed;
#   - DEBIAN_FRONTEND=noninteractive, and postfix is preseeded to
#     "No configuration" (no main.cf, no question asked);
#   - apt waits up to 10 minutes for a dpkg lock another install holds.
# Afterwards, should one of the packages' daemons listen anyway (a machine
# whose init ignores policy-rc.d), it is stopped, and the script says so.
set -eu

if [ $# = 0 ]; then
	echo "usage: $0 PACKAGE..." >&2
	exit 2
fi
if [ "$(id -u)" != 0 ]; then
	echo "apt-install: run as root to install: $*" >&2
	exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "apt-install: no apt-get here; please install: $*" >&2
	exit 1
fi

POLICY=/usr/sbin/policy-rc.d
saved=""
restore() {
	rm -f "$POLICY"
	if [ -n "$saved" ]; then mv -f "$saved" "$POLICY"; fi
}
if [ -e "$POLICY" ]; then
	saved=$(mktemp "$POLICY.saved.XXXXXX")
	cp -p "$POLICY" "$saved"
fi
trap restore EXIT
trap 'exit 1' INT TERM HUP
printf '#!/bin/sh\n# scripts/apt-install.sh: no service starts during the install\nexit 101\n' \
	>"$POLICY.new"
chmod 755 "$POLICY.new"
mv -f "$POLICY.new" "$POLICY"

export DEBIAN_FRONTEND=noninteractive
case " $* " in
*" postfix "*)
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	;;
esac

echo "apt-install: installing: $*"
lock="-o DPkg::Lock::Timeout=600"
# shellcheck disable=SC2086
apt-get $lock update -q >/dev/null
# shellcheck disable=SC2086
apt-get $lock install -y -q --no-install-recommends "$@" >/dev/null

restore
trap - EXIT

# Nothing of theirs may be left listening (policy-rc.d should have seen to it).
if command -v ss >/dev/null 2>&1; then
	for svc in nginx postfix dovecot haproxy hitch h2o; do
		case " $* " in *" $svc"*) ;; *) continue ;; esac
		name=$svc
		[ "$svc" = postfix ] && name=master # postfix's daemon is "master"
		if ss -ltnpH | grep -q "((\"$name\""; then
			echo "apt-install: $svc started despite $POLICY; stopping it" >&2
			if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
				systemctl stop "$svc" || true
				systemctl disable "$svc" || true
			else
				service "$svc" stop || true
			fi
		fi
	done
fi
exit 0
