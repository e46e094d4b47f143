#!/usr/bin/env bash
# Install the local S3-compatible test server: OpenStack Swift (proxy + account + container + object
# servers, with the s3api and tempauth middlewares that ship inside python3-swift) plus memcached.
#
# Idempotent: does nothing when everything is already installed. Never starts anything: the packages'
# maintainer scripts are prevented from starting daemons (policy-rc.d exit 101 during the install), and any
# swift/memcached/rsyslog/uwsgi process that nevertheless appeared during the install is stopped by PID.
# The servers are started per test run, under a private work directory, by scripts/s3_server.py.
#
# Usage: sudo scripts/install_s3_server.sh   (run as root; Debian 12 / bookworm packages)
set -euo pipefail

BINARIES=(swift-proxy-server swift-account-server swift-container-server swift-object-server
          swift-ring-builder memcached)
PACKAGES=(swift swift-proxy swift-account swift-container swift-object memcached
          python3-swift python3-lxml python3-xattr)

is_installed() {
    local b
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
    # s3api and tempauth are swift middlewares (swift.common.middleware.s3api / .tempauth); s3api needs lxml.
    /usr/bin/python3 -c 'import swift.common.middleware.s3api.s3api, swift.common.middleware.tempauth
import lxml.etree, xattr' >/dev/null 2>&1 || return 1
    return 0
}

if is_installed; then
    echo "install_s3_server: swift + s3api + memcached already installed; nothing to do."
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_s3_server: ERROR: swift/memcached are not installed and this script is not running as root." >&2
    echo "install_s3_server: re-run as root (e.g. 'sudo $0'), or install the Debian packages: ${PACKAGES[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_s3_server: ERROR: apt-get not found; this script supports Debian/Ubuntu only." >&2
    exit 1
fi

# PIDs of the daemons these packages could start, before the install, so we only stop new ones.
daemon_pids() {
    # Listing by name only to find candidates; each one is then stopped by its own PID below.
    pgrep -x memcached 2>/dev/null || true
    pgrep -f '^/usr/bin/python3 /usr/bin/swift-' 2>/dev/null || true
    pgrep -x rsyslogd 2>/dev/null || true
    pgrep -x uwsgi 2>/dev/null || true
}
BEFORE="$(daemon_pids | sort -u)"

# Keep maintainer scripts from starting services: a policy-rc.d answering 101 ("action forbidden").
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
POLICY_INSTALLED=0
restore_policy() {
    if [ "$POLICY_INSTALLED" -eq 1 ]; then
        if [ -n "$POLICY_BACKUP" ]; then
            mv -f "$POLICY_BACKUP" "$POLICY"
        else
            rm -f "$POLICY"
        fi
    fi
}
trap restore_policy EXIT
if [ -e "$POLICY" ]; then
    POLICY_BACKUP="$(mktemp /usr/sbin/policy-rc.d.bak.XXXXXX)"
    cp -p "$POLICY" "$POLICY_BACKUP"
fi
printf '#!/bin/sh\n# temporary, written by install_s3_server.sh\nexit 101\n' >"$POLICY"
chmod 755 "$POLICY"
POLICY_INSTALLED=1

export DEBIAN_FRONTEND=noninteractive
echo "install_s3_server: apt-get update"
apt-get update
echo "install_s3_server: apt-get install ${PACKAGES[*]}"
apt-get install -y --no-install-recommends "${PACKAGES[@]}"

restore_policy
POLICY_INSTALLED=0

# Stop anything a maintainer script managed to start anyway (by PID, only processes that are new).
AFTER="$(daemon_pids | sort -u)"
NEW="$(comm -13 <(printf '%s\n' "$BEFORE") <(printf '%s\n' "$AFTER") | grep -E '^[0-9]+$' || true)"
if [ -n "$NEW" ]; then
    echo "install_s3_server: stopping daemons started during install: ${NEW//$'\n'/ }"
    for pid in $NEW; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        alive=0
        for pid in $NEW; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in $NEW; do kill -KILL "$pid" 2>/dev/null || true; done
fi

if ! is_installed; then
    echo "install_s3_server: ERROR: install finished but swift/s3api/memcached are still not usable." >&2
    exit 1
fi
echo "install_s3_server: done: $(dpkg-query -W -f='${Package} ${Version}\n' python3-swift memcached | paste -sd ' ')"
