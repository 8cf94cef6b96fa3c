#!/usr/bin/env bash
# Builds and caches Tandem's tiny test guest from Debian packages:
#   - the Debian cloud kernel (linux-image-*-cloud-amd64), unpacked, never installed;
#   - a busybox-static initramfs whose init loads the virtio network modules, configures
#     QEMU user-mode networking and serves HTTP on port 80 with the VM's name.
# Output: $OUT/vmlinuz and $OUT/initrd.img (default OUT=.cache/guest). Re-running is a no-op
# when both exist. Needs root for apt-get (installs cpio and busybox-static if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$here/.cache/guest}
if [[ -s $OUT/vmlinuz && -s $OUT/initrd.img ]]; then
  echo "guest cached in $OUT"
  exit 0
fi
need=()
command -v cpio >/dev/null || need+=(cpio)
[[ -x /bin/busybox ]] || need+=(busybox-static)
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [[ -z $pkg ]]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
echo "fetching $pkg"
apt-get download -qq "$pkg"
dpkg-deb -x ./*.deb kernel
kver=${pkg#linux-image-}
mkdir -p "$OUT"
cp kernel/boot/vmlinuz-"$kver" "$OUT/vmlinuz.tmp"

root=$work/initramfs
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc,www,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
  f=$(find kernel/lib/modules/"$kver" -name "$m.ko*" | head -n1)
  if [[ -n $f ]]; then
    case $f in
      *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
      *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
      *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$root/lib/modules/order"
  fi
done
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
name=unknown
for arg in $(cat /proc/cmdline); do
  case $arg in tandem.vm=*) name=${arg#tandem.vm=} ;; esac
done
hostname "$name"
ip link set lo up
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up 2>/dev/null
ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
ip route add default via 10.0.2.2 2>/dev/null
echo "tandem guest $name" > /www/index.html
echo "booted" > /www/health
httpd -p 80 -h /www
echo "TANDEM-GUEST-READY $name"
# Power button (ACPI) or Ctrl-Alt-Del ends the guest cleanly.
trap 'poweroff -f' TERM USR2 INT
while true; do sleep 1; done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initrd.img.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "guest built in $OUT ($kver)"
