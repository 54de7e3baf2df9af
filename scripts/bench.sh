#!/usr/bin/env bash
# runvm benchmarks, each against a reference measured in the same run:
#   boot      - VMM start to the first /init line, and peak RSS: runvm vs QEMU microvm
#   agent     - agent ready to first output byte, and stdout throughput: VM vs host agent vs pipe
#   lifecycle - create+start+delete and `run true`: runvm vs runc, same bundle
#   share     - sequential MiB/s and small-file create+stat/s: in the VM over virtio-fs vs the host
#   docker    - `docker run --rm IMAGE true`: runvm vs runc, same private dockerd
#   network   - TCP throughput and round trip, peer namespace <-> container: runvm vs runc
#   templates - `run true` and `docker run --rm true` cold vs from a template vs runc (latency,
#               peak RSS); 20 containers back to back from one template vs runc (wall, PSS)
# Installs QEMU when missing (docker.io, containerd and runc come with `make deps`).
#   scripts/bench.sh RUNVM KERNEL INITRD AGENT TEST_BINS_DIR [boot|agent|lifecycle|share|docker|network|templates]...
set -euo pipefail
runvm=$1 kernel=$2 initrd=$3 agent=$4 bins=$5
shift 5
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(boot agent lifecycle share docker network templates)
if ! command -v qemu-system-x86_64 >/dev/null; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >&2
fi
for b in "${benches[@]}"; do
    RUNVM_BIN=$runvm RUNVM_KERNEL=$kernel RUNVM_INITRD=$initrd RUNVM_AGENT=$agent RUNVM_TEST_BINS=$bins \
        cargo bench -q -p runvm-tests --bench "$b"
done
