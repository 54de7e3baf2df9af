#!/usr/bin/env bash
# runvm benchmarks, each against a reference measured in the same run:
#   boot  - VMM start to the first /init line, and peak RSS: runvm vs QEMU microvm
#   agent - agent ready to first output byte, and stdout throughput: VM vs host agent vs pipe
# Installs QEMU when missing.
#   scripts/bench.sh RUNVM KERNEL AGENT TEST_BINS_DIR [boot|agent]...
set -euo pipefail
runvm=$1 kernel=$2 agent=$3 bins=$4
shift 4
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(boot agent)
if ! command -v qemu-system-x86_64 >/dev/null; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >&2
fi
for b in "${benches[@]}"; do
    RUNVM_BIN=$runvm RUNVM_KERNEL=$kernel RUNVM_AGENT=$agent RUNVM_TEST_BINS=$bins \
        cargo bench -q -p runvm-tests --bench "$b"
done
