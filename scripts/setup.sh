#!/usr/bin/env bash
# Installs what Tandem's demo and tests need on a fresh Debian machine (run as root), then builds
# and caches the test guest. Safe to re-run: it only installs what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs=()
command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
[[ -x /bin/busybox ]] || pkgs+=(busybox-static)
command -v cpio >/dev/null || pkgs+=(cpio)
command -v ip >/dev/null || pkgs+=(iproute2)
command -v nft >/dev/null || pkgs+=(nftables)
command -v fusermount3 >/dev/null || pkgs+=(fuse3)
# The test guest's disk writer is a small static C program.
command -v gcc >/dev/null || pkgs+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || pkgs+=(libc6-dev)
if ((${#pkgs[@]})); then
  echo "installing: ${pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
"$here/scripts/build-guest.sh"
