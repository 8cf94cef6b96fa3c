#!/usr/bin/env bash
# Builds and caches Tandem's tiny test guest from Debian packages:
#   - the Debian cloud kernel (linux-image-*-cloud-amd64), unpacked, never installed;
#   - a busybox-static initramfs whose init loads the virtio network and block modules,
#     configures its network (the address given on the kernel command line as
#     `tandem.ip=ADDR/PREFIX` [`tandem.gw=GATEWAY`], else QEMU user-mode networking's
#     10.0.2.15) and serves HTTP on port 80 with the VM's name;
#   - when the guest has a disk (/dev/vda), `seqwriter` (scripts/guest/seqwriter.c, linked
#     statically) appending a sequence number to it with O_DIRECT|O_DSYNC every few ms and
#     serving the last acknowledged number at /seq ("LAST RECOVERED WRITES");
#   - when the VM has a guest-agent channel, `qga` (scripts/guest/qga.c): guest-sync,
#     guest-ping and guest-shutdown of the QEMU guest agent's protocol;
#   - with `tandem.dirty=MIB` on the kernel command line, a loop that rewrites MIB of memory
#     (random bytes, in tmpfs) every 2 ms: a guest whose live migration cannot converge.
# Output: $OUT/vmlinuz and $OUT/initrd.img (default OUT=.cache/guest). Re-running is a no-op
# when both exist and were built by this version of the script. Needs root for apt-get
# (installs cpio, busybox-static and a C compiler with static libc if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$here/.cache/guest}
# Raised whenever what the guest does changes, so a cached older guest is rebuilt.
GUEST_VERSION=10
if [[ -s $OUT/vmlinuz && -s $OUT/initrd.img && $(cat "$OUT/version" 2>/dev/null) == "$GUEST_VERSION" ]]; then
  echo "guest cached in $OUT"
  exit 0
fi
need=()
command -v cpio >/dev/null || need+=(cpio)
[[ -x /bin/busybox ]] || need+=(busybox-static)
command -v gcc >/dev/null || need+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || need+=(libc6-dev)
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
gcc -static -Os -Wall -Wextra -o "$root/bin/seqwriter" "$here/scripts/guest/seqwriter.c"
gcc -static -Os -Wall -Wextra -o "$root/bin/qga" "$here/scripts/guest/qga.c"
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net virtio_blk virtio_console evdev button; do
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
dirty=
addr=10.0.2.15/24
gw=10.0.2.2
for arg in $(cat /proc/cmdline); do
  case $arg in
    tandem.vm=*) name=${arg#tandem.vm=} ;;
    tandem.ip=*) addr=${arg#tandem.ip=}; gw= ;;
    tandem.gw=*) gw=${arg#tandem.gw=} ;;
    tandem.dirty=*) dirty=${arg#tandem.dirty=} ;;
  esac
done
hostname "$name"
ip link set lo up
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up 2>/dev/null
ip addr add "$addr" dev eth0 2>/dev/null
[ -n "$gw" ] && ip route add default via "$gw" 2>/dev/null
# On a bridge, say where this address now lives (as a guest that moved or rebooted on another
# host should): the bridges learn the new port at once.
[ "$addr" != 10.0.2.15/24 ] && arping -q -U -c 2 -I eth0 "${addr%/*}" 2>/dev/null &
echo "tandem guest $name" > /www/index.html
echo "booted" > /www/health
# GET /cgi-bin/poweroff: the guest shuts itself down (as an operator inside it would), for the
# tests of a guest's own shutdown.
mkdir -p /www/cgi-bin
printf '#!/bin/busybox sh\nprintf "Content-Type: text/plain\\r\\n\\r\\npowering off\\n"\n(sleep 0.2; sync; poweroff -f) >/dev/null 2>&1 &\n' > /www/cgi-bin/poweroff
chmod +x /www/cgi-bin/poweroff
if [ -b /dev/vda ]; then
  seqwriter /dev/vda /www/seq 5 &
fi
if [ -n "$dirty" ]; then
  mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
  dd if=/dev/urandom of=/dev/shm/src bs=1M count="$dirty" 2>/dev/null
  (while :; do cp /dev/shm/src /dev/shm/dst; usleep 2000; done) &
fi
httpd -p 80 -h /www
# The guest agent, when the VM has its channel (it exits at once otherwise).
qga &
# The ACPI power button (QEMU's system_powerdown) ends the guest cleanly, as a real guest's
# acpid does: busybox acpid runs /etc/acpi/PWRF/00000080 on it.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/busybox sh\necho "TANDEM-GUEST-POWER-BUTTON" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
# acpid opens the input devices present when it starts: wait for the power button's (the
# button driver registers it a moment after it is loaded), then for acpid to listen on it.
# Ready means listening: an emulated guest on a loaded machine can take seconds for either, and
# a button pressed before is lost (the guest is then killed after the stop timeout). The waits
# are bounded (60 s each); a guest without a button says so instead of ready.
button=no
for i in $(seq 1 1200); do
  grep -qs "Power Button" /sys/class/input/input*/name && { button=yes; break; }
  sleep 0.05
done
acpid -l /tmp/acpid.log
for i in $(seq 1 1200); do
  [ $button = yes ] || break
  ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q /dev/input/event && break
  sleep 0.05
done
if [ $button = yes ]; then
  echo "TANDEM-GUEST-READY $name"
else
  echo "TANDEM-GUEST-NO-POWER-BUTTON $name"
fi
# Ctrl-Alt-Del (SIGINT to init) and SIGTERM/SIGUSR2 end it too.
trap 'poweroff -f' TERM USR2 INT
while true; do sleep 1; done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initrd.img.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$GUEST_VERSION" > "$OUT/version"
echo "guest built in $OUT ($kver)"
