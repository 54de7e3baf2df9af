#!/usr/bin/env bash
# Makes an OCI bundle at DIR whose rootfs is the static busybox and its applets, with
# runvm's default config.json:   scripts/busybox-bundle.sh RUNVM DIR
# (used by demo.sh and soak.sh).
set -euo pipefail
runvm=${1:?usage: busybox-bundle.sh RUNVM DIR}
bundle=${2:?usage: busybox-bundle.sh RUNVM DIR}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "$busybox missing (apt-get install busybox-static)" >&2; exit 1; }
rootfs=$bundle/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list-full); do
    [ "$applet" = bin/busybox ] || [ -e "$rootfs/$applet" ] || ln -s /bin/busybox "$rootfs/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"
"$runvm" spec --bundle "$bundle"
