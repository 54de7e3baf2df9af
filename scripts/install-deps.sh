#!/usr/bin/env bash
# Installs the Debian packages runvm's build, demo and tests use, when missing.
# (The guest kernel's own build dependencies are installed by kernel-config/build.sh.)
set -euo pipefail

# docker.io, containerd and runc: the client suite (tests/tests/clients.rs) and the reference runtime
# of the benchmarks; iproute2: the network namespaces of the network tests;
# containernetworking-plugins: the CNI plugins (/usr/lib/cni) of the `ctr run --cni` test.
want=(busybox-static cpio docker.io containerd runc libseccomp-dev pkg-config iproute2
      containernetworking-plugins)
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-deps: installing ${missing[*]}" >&2
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
# Package scripts must not start daemons (docker.io would start dockerd with its default
# network setup): a policy-rc.d that denies service starts, only for this install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" > /dev/null
    "${sudo[@]}" chmod 755 "$policy"
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || { "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
