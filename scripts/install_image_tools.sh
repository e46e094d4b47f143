#!/usr/bin/env bash
# Install what `make image-test` needs from Debian's packages: buildah (builds and runs the image: chroot isolation,
# no daemon), debootstrap (makes the stand-in base image) and iproute2 (brings loopback up in the test's empty
# network namespace). Idempotent; needs root only when something is missing.
set -euo pipefail

BINARIES=(buildah debootstrap ip unshare)
PACKAGES=(buildah debootstrap iproute2 util-linux)

missing=0
for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || missing=1; done
if [ "$missing" -eq 0 ]; then
    echo "install_image_tools: buildah, debootstrap and ip already installed; nothing to do."
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_image_tools: ERROR: ${PACKAGES[*]} are needed and this script is not running as root." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_image_tools: ERROR: apt-get not found; this script supports Debian/Ubuntu only." >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_image_tools: apt-get update"
apt-get update
echo "install_image_tools: apt-get install ${PACKAGES[*]}"
apt-get install -y --no-install-recommends "${PACKAGES[@]}"
echo "install_image_tools: done: $(buildah --version)"
