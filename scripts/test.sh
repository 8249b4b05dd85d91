#!/usr/bin/env bash
# Runs edgegate's test suite. Installs what the tests need from Debian when it is missing (mosquitto for the
# upstream broker the tests start and kill, mosquitto-clients for black-box tests, systemd-analyze to verify the
# unit, unshare, nats-server for the NATS JetStream sink) and starts a NATS server with JetStream on
# 127.0.0.1:4222 when none answers there (one already running is left alone). Run it as root: the disk-full
# tests mount a small tmpfs. Extra arguments go to `go test`, e.g. scripts/test.sh -race,
# scripts/test.sh -run TestOutage ./forward/.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "installing ${need[*]}" >&2
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	else
		echo "missing ${need[*]}: install them (Debian: apt-get install ${need[*]}); the tests that need them fail" >&2
	fi
fi

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! up 4222 && [ -x /usr/sbin/nats-server ]; then
	echo "starting nats-server on 127.0.0.1:4222" >&2
	mkdir -p /var/lib/nats-server 2>/dev/null || true
	start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
		-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
	for _ in $(seq 1 50); do up 4222 && break; sleep 0.2; done
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
