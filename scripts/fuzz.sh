#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo fuzz with libFuzzer on nightly) for a
# bounded time, growing its corpus in fuzz/corpus/<target>/ (commit what it
# adds; fuzz/tests/corpus_replay.rs replays every corpus file on stable). A
# crash stops the run with the reproducer in fuzz/artifacts/<target>/: copy
# it into the target's corpus, fix the code, and it is a regression test.
#
#   scripts/fuzz.sh               30 s per target (FUZZ_SECONDS to change)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-30}
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd fuzz
for t in $(cargo +nightly fuzz list); do
    echo "fuzz: $t for ${secs} s" >&2
    cargo +nightly fuzz run --features fuzzing "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 \
        | grep -E '^(#[0-9]+.*(DONE|pulse)|Done|INFO: seed|==[0-9]+==|SUMMARY|.*panicked)' || true
    if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
        echo "fuzz: $t found a crash: $(ls "artifacts/$t")" >&2
        exit 1
    fi
done
echo "fuzz: all targets ran ${secs} s without a crash" >&2
