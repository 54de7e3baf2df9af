#!/usr/bin/env bash
# runvm demo: runs a busybox container in a runvm micro-VM with `runvm run`.
#   scripts/demo.sh /path/to/runvm
set -euo pipefail
runvm=${1:?usage: demo.sh RUNVM}
work=$(mktemp -d)
root=$work/state
trap 'rm -rf "$work"' EXIT
bundle=$work/bundle
rootfs=$bundle/rootfs
"$(dirname "$0")/busybox-bundle.sh" "$runvm" "$bundle" > /dev/null
# A non-interactive process: what the container sees, and a file it leaves in the bundle.
cat > "$rootfs/demo.sh" <<SCRIPT
echo "hello from a runvm container: \$(uname -sr) (the host runs $(uname -sr))"
echo "pid \$\$, hostname \$(hostname), \$(nproc) vCPU(s), \$(awk '/MemTotal/ {print int(\$2/1024)}' /proc/meminfo) MiB of memory"
echo "root file system:" \$(ls /)
echo "written in the VM" > /root/from-the-vm.txt
SCRIPT
sed -i 's/"terminal": true/"terminal": false/; s|^\( *\)"sh"$|\1"sh", "/demo.sh"|' "$bundle/config.json"

echo "demo: runvm run (the VM boots first: seconds on software-emulated KVM)"
start=$(date +%s%N)
"$runvm" --root "$root" run --bundle "$bundle" demo
end=$(date +%s%N)
echo "demo: the container exited 0 after $(( (end - start) / 1000000 )) ms"
echo "demo: on the host, the bundle now holds: $(cat "$rootfs/root/from-the-vm.txt")"
