#!/usr/bin/env bash
# runvm soak (not part of `make test`): N create/start/kill/delete cycles of a busybox
# container, each with one random fault, then a list of what was left behind (processes,
# mounts, cgroups, state). It must print "nothing left" and exit 0.
#   scripts/soak.sh /path/to/runvm [N]        (SOAK_FAULTS="kill-booting ..." picks faults)
# Faults: none, SIGKILL of the VMM while create boots it, SIGKILL after create, SIGKILL
# after start, kill TERM right after start, delete --force of a running container.
set -euo pipefail
runvm=${1:?usage: soak.sh RUNVM [N]}
cycles=${2:-10}
work=$(mktemp -d)
root=$work/state
trap 'rm -rf "$work"' EXIT
bundle=$work/bundle
"$(dirname "$0")/busybox-bundle.sh" "$runvm" "$bundle" > /dev/null
sed -i 's/"terminal": true/"terminal": false/; s|^\( *\)"sh"$|\1"sh", "-c", "while true; do sleep 1; done"|' \
    "$bundle/config.json"

vmm_of() { # the pid of the VMM of container $1, from the process table
    pgrep -f -- "--root $root .*vmm-serve .* $1\$" | head -n1 || true
}

read -r -a faults <<< "${SOAK_FAULTS:-none kill-booting kill-created kill-running term-started force-delete}"
for i in $(seq 1 "$cycles"); do
    id=soak$i
    fault=${faults[RANDOM % ${#faults[@]}]}
    echo "soak: cycle $i: $fault" >&2
    case $fault in
        kill-booting)
            "$runvm" --root "$root" create --bundle "$bundle" "$id" > /dev/null 2>&1 &
            create=$!
            for _ in $(seq 1 200); do pid=$(vmm_of "$id"); [ -n "$pid" ] && break; sleep 0.05; done
            [ -n "${pid:-}" ] && kill -KILL "$pid"
            wait "$create" || true
            ;;
        *)
            "$runvm" --root "$root" create --bundle "$bundle" --pid-file "$work/$id.pid" "$id" > /dev/null
            pid=$(cat "$work/$id.pid")
            case $fault in
                kill-created) kill -KILL "$pid" ;;
                kill-running) "$runvm" --root "$root" start "$id"; kill -KILL "$pid" ;;
                term-started) "$runvm" --root "$root" start "$id"; "$runvm" --root "$root" kill "$id" TERM || true ;;
                force-delete) "$runvm" --root "$root" start "$id" ;;
                none) "$runvm" --root "$root" start "$id"; "$runvm" --root "$root" kill "$id" KILL ;;
            esac
            ;;
    esac
    "$runvm" --root "$root" delete --force "$id" || echo "soak: cycle $i: delete --force failed" >&2
done

left=0
report() { echo "soak: left: $*"; left=1; }
for p in $(pgrep -f -- "--root $root" || true); do report "process $p: $(tr '\0' ' ' < "/proc/$p/cmdline")"; done
grep -q "$root" /proc/self/mountinfo && report "mounts under $root"
for d in /sys/fs/cgroup/*/runvm-soak* /sys/fs/cgroup/runvm-soak*; do [ -e "$d" ] && report "cgroup $d"; done
[ -d "$root" ] && [ -n "$(ls -A "$root")" ] && report "state: $(ls -A "$root")"
[ "$left" -eq 0 ] && echo "soak: $cycles cycles, nothing left"
exit "$left"
