#!/usr/bin/env bash
# Runs edgegate's test suite. Installs what the tests need from Debian when it is missing (mosquitto for the
# upstream broker the tests start and kill, mosquitto-clients for black-box tests, systemd-analyze to verify the
# unit, unshare). Run it as root: the disk-full tests mount a small tmpfs. Extra arguments go to
# `go test`, e.g. scripts/test.sh -race, scripts/test.sh -run TestOutage ./forward/.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "installing ${need[*]}" >&2
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	else
		echo "missing ${need[*]}: install them (Debian: apt-get install ${need[*]}); the tests that need them fail" >&2
	fi
fi

pkgs=()
args=()
for a in "$@"; do
	case "$a" in
	./*) pkgs+=("$a") ;;
	*) args+=("$a") ;;
	esac
done
[ ${#pkgs[@]} -gt 0 ] || pkgs=(./...)
exec go test -count=1 "${args[@]}" "${pkgs[@]}"
