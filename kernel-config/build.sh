#!/usr/bin/env bash
# Build runvm's guest kernel (an uncompressed x86_64 vmlinux with a PVH entry) from
# Debian's linux-source-6.1, the fragment runvm.config and the patches in patches/.
#
# The result is cached outside the source tree, keyed by a hash of every input
# (this script, the fragment, the patches, the kernel source package version and
# the compiler version), so a machine that built it once skips the build.
#
#   kernel-config/build.sh            build (or reuse) and print the vmlinux path last
#                                     (a bzImage of the same kernel lies next to it)
#   RUNVM_CACHE_DIR=DIR build.sh      cache root (default: $XDG_CACHE_HOME/runvm or ~/.cache/runvm)
#   RUNVM_KERNEL_JOBS=N build.sh      parallel make jobs (default: nproc)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${RUNVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runvm}
jobs=${RUNVM_KERNEL_JOBS:-$(nproc)}
src_pkg=linux-source-6.1
src_tar=/usr/src/linux-source-6.1.tar.xz

log() { echo "kernel: $*" >&2; }
die() { echo "kernel: error: $*" >&2; exit 1; }

install_missing() {
    local missing=()
    dpkg-query -W -f='${Status}' "$src_pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$src_pkg")
    local tool pkg
    for tool in gcc:gcc make:make flex:flex bison:bison bc:bc xz:xz-utils perl:perl; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
    done
    dpkg-query -W -f='${Status}' libelf-dev 2>/dev/null | grep -q "install ok installed" || missing+=(libelf-dev)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || { "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; } \
        || die "could not install ${missing[*]}"
}

install_missing
[ -f "$src_tar" ] || die "$src_tar is missing although $src_pkg is installed"

src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")
key=$( {
    echo "source $src_pkg $src_version"
    gcc --version | head -n1
    sha256sum "$here/build.sh" "$here/runvm.config"
    for p in "$here"/patches/*.patch; do [ -e "$p" ] && sha256sum "$p"; done
} | sed "s#$here/##" | sha256sum | cut -c1-16)

out_dir=$cache_root/kernel/$key
if [ -s "$out_dir/vmlinux" ]; then
    log "cached build $key"
    echo "$out_dir/vmlinux"
    exit 0
fi

mkdir -p "$cache_root/kernel"
work=$(mktemp -d "$cache_root/kernel/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "building $key from $src_pkg $src_version with $jobs jobs (log: $work/build.log while it runs)"
log "unpacking source"
tar -xf "$src_tar" -C "$work"
tree=$work/linux-source-6.1
for p in "$here"/patches/*.patch; do
    [ -e "$p" ] || continue
    log "applying $(basename "$p")"
    patch -d "$tree" -p1 --batch --forward --quiet < "$p" || die "patch $(basename "$p") does not apply"
done

log "configuring (tinyconfig + runvm.config)"
make -C "$tree" -s tinyconfig >"$work/build.log" 2>&1
# Kconfig takes the last assignment of a symbol: appending the fragment overrides tinyconfig.
cat "$here/runvm.config" >> "$tree/.config"
make -C "$tree" -s olddefconfig >>"$work/build.log" 2>&1

# Every option the fragment asks for must be in the result: Kconfig drops options
# whose dependencies are not met without a word.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) want=$line ;;
        "# CONFIG_"*" is not set") want=$line ;;
        *) continue ;;
    esac
    opt=${want#\# }; opt=${opt%%[= ]*}
    if [[ "$want" == "#"* ]]; then
        grep -q "^$opt=" "$tree/.config" && { log "asked $want, got $(grep "^$opt=" "$tree/.config")"; bad=1; }
    else
        grep -qx "$want" "$tree/.config" || { log "asked $want, got $(grep -E "^(# )?$opt[= ]" "$tree/.config" || echo nothing)"; bad=1; }
    fi
done < "$here/runvm.config"
[ $bad -eq 0 ] || die "the fragment's options did not all survive olddefconfig (see above)"

log "compiling vmlinux and bzImage"
set +o pipefail
make -C "$tree" -j"$jobs" vmlinux bzImage 2>&1 | tee -a "$work/build.log" | awk '
    /^  (CC|AS|LD|AR)/ { n++; if (n % 200 == 0) { printf "kernel:   %d objects\n", n > "/dev/stderr"; fflush("/dev/stderr") } }'
status=${PIPESTATUS[0]}
set -o pipefail
if [ "$status" -ne 0 ]; then
    grep -E "error|Error" "$work/build.log" | head -n 20 >&2
    die "make vmlinux bzImage failed (exit $status)"
fi

mkdir -p "$work/out"
cp "$tree/vmlinux" "$work/out/vmlinux"
cp "$tree/arch/x86/boot/bzImage" "$work/out/bzImage"
cp "$tree/.config" "$work/out/config"
rm -rf "$out_dir"
mv "$work/out" "$out_dir"
log "done: $(du -h "$out_dir/vmlinux" | cut -f1) vmlinux"
echo "$out_dir/vmlinux"
