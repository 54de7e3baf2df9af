#!/usr/bin/env bash
# runvm demo: boots a busybox guest in a runvm micro-VM and shows what it sees.
#   scripts/demo.sh /path/to/runvm
set -euo pipefail
runvm=${1:?usage: demo.sh RUNVM}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "demo: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,etc,tmp}
cp "$busybox" "$root/bin/busybox"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "hello from a runvm guest: $(/bin/busybox uname -sr), $(/bin/busybox nproc) vCPU(s), $(/bin/busybox awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
/bin/busybox reboot -f
INIT
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initrd.cpio"

echo "demo: booting a busybox guest (the first line of the guest appears once the kernel has booted)"
start=$(date +%s%N)
"$runvm" boot --initrd "$work/initrd.cpio"
end=$(date +%s%N)
echo "demo: VM ended cleanly after $(( (end - start) / 1000000 )) ms"
