#!/usr/bin/env bash
# Boot benchmark (runvm vs QEMU microvm): installs QEMU when missing, then runs the bench.
#   scripts/bench-boot.sh RUNVM KERNEL TEST_INIT
set -euo pipefail
if ! command -v qemu-system-x86_64 >/dev/null; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >&2
fi
RUNVM_BIN=$1 RUNVM_KERNEL=$2 RUNVM_TEST_INIT=$3 cargo bench -q -p runvm-tests --bench boot
