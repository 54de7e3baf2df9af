#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (default 60) on the
# nightly toolchain, from fuzz/seeds/<target> and the growing fuzz/corpus/<target>.
# A crash leaves its input under fuzz/artifacts/<target>/: once fixed, keep it in
# fuzz/regressions/<target>/, which tests/tests/fuzz_smoke.rs replays in every `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-frames translate mmio_vsock mmio_fs}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz: cargo-fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --help >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo +nightly install --locked cargo-fuzz
fi
for t in $targets; do
    mkdir -p "fuzz/corpus/$t"
    echo "== fuzz $t for ${secs}s" >&2
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10
done
