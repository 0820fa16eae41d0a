#!/usr/bin/env bash
# Builds every fuzz target on the stable toolchain and runs each briefly on its
# seed corpus (fuzz/README.md). Exits non-zero if a build fails or any target
# crashes, hangs or runs out of memory; the input that did it is kept in
# fuzz/artifacts/<target>/. The seed corpus in the repo is never written to.
#
#   bash fuzz/ci.sh                 # every target, FUZZ_SECONDS (5) each
#   bash fuzz/ci.sh http_head       # only these targets
#   FUZZ_SECONDS=60 bash fuzz/ci.sh
#
# Needs only cargo and a C++ compiler (libfuzzer-sys builds libFuzzer with cc).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-5}
runs=${FUZZ_RUNS:-5000000}

# What `cargo fuzz build -s none` passes, minus its `-Ccodegen-units=1`
# (a slower build for a little speed): sanitizer-coverage for libFuzzer, and
# `--cfg fuzzing`. No -Z flag, so stable builds it. The profile in
# fuzz/Cargo.toml adds debug assertions and overflow checks.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
-Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')

all=()
for f in fuzz_targets/*.rs; do
  all+=("$(basename "$f" .rs)")
done
targets=("${@:-${all[@]}}")

started=$SECONDS
cargo build --release --locked --target "$host" --bins
echo "fuzz: built ${#all[@]} targets in $((SECONDS - started)) s"

bin="${CARGO_TARGET_DIR:-target}/$host/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
printf '%-18s %10s %9s %6s %6s %s\n' target execs exec/s cov ft result
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  status=0
  # New inputs go to the scratch directory; the seeds are only read.
  "$bin/$t" "$work/$t" "corpus/$t" \
    -max_total_time="$seconds" -runs="$runs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=20000 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
    >"$work/$t.log" 2>&1 || status=$?
  stat() { sed -n "s/^stat::$1: *//p" "$work/$t.log" | tail -1; }
  # A crash on a seed leaves no cov/ft lines: no match must not end the script
  # (pipefail) before the log below is shown.
  cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -1 | cut -d' ' -f2 || true)
  ft=$(grep -o 'ft: [0-9]*' "$work/$t.log" | tail -1 | cut -d' ' -f2 || true)
  if [ "$status" = 0 ]; then
    result=ok
  else
    result="FAILED (exit $status)"
    failed+=("$t")
    tail -40 "$work/$t.log"
  fi
  printf '%-18s %10s %9s %6s %6s %s\n' "$t" "$(stat number_of_executed_units)" \
    "$(stat average_exec_per_sec)" "${cov:--}" "${ft:--}" "$result"
done
echo "fuzz: ${#targets[@]} targets in $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
