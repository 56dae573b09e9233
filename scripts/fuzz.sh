#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets, bodies in daemon/src/fuzzing.rs) for a
# bounded time and prints the executions and findings of each.
#
#   scripts/fuzz.sh                 # 60 s per target
#   SECS=600 TARGETS="frame gguf" scripts/fuzz.sh
#
# Needs the nightly toolchain and cargo-fuzz (installed here if missing). The seed
# corpus is generated from real inputs (daemon/tests/fuzz_corpus.rs); what the fuzzer
# finds interesting is kept in fuzz/corpus/<target>/ (not committed), crashes in
# fuzz/artifacts/<target>/. A crash, once fixed, goes to fuzz/regressions/<target>/
# (committed): the test suite replays the seeds, fuzz/corpus and fuzz/regressions.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-60}
TARGETS=${TARGETS:-"frame control gguf config request"}
RSS_MB=${RSS_MB:-2048}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
seeds="$PWD/target/fuzz-seeds"
rm -rf "$seeds"
# the seeds come from the test build (target/, warm after the tests); the fuzz
# targets have their own sanitized build in target/fuzz
EXO_FUZZ_SEEDS="$seeds" cargo test --release -q -p exo --test fuzz_corpus -- \
    --ignored write_seed_corpus >/dev/null
# the gguf target renders chat templates in this exo's sandbox, as exo serve does (a
# template that builds a huge string ends that child, not the fuzzer)
cargo build --release -q -p exo --bin exo
export EXO_FUZZ_TEMPLATE_SANDBOX="$PWD/target/release/exo"
export CARGO_TARGET_DIR="$PWD/target/fuzz"
(cd fuzz && cargo +nightly fuzz build -O)

summary=()
found=0
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="target/fuzz-$t.log"
    set +e
    (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" "$seeds/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb="$RSS_MB" -timeout=10 \
        -print_final_stats=1) >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    [ "$rc" -ne 0 ] && found=1
    summary+=("$(printf '%-8s %12s %8s %8s %4s' "$t" "$execs" "$corpus" "$crashes" "$rc")")
done
printf '%-8s %12s %8s %8s %4s\n' target executions corpus crashes rc
printf '%s\n' "${summary[@]}"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); ${SECS}s per target"
if [ "$found" -ne 0 ]; then
    echo "a target failed: see target/fuzz-<target>.log and fuzz/artifacts/" >&2
    exit 1
fi
