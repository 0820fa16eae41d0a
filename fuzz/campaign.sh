#!/usr/bin/env bash
# One long campaign for one target (fuzz/README.md): nice 19, until RUNS
# executions or SECONDS seconds, whichever comes first. The growing corpus and
# any crash go to fuzz/runs/<target>/ (ignored by git); the seeds are only
# read. Build first with `bash fuzz/ci.sh <target>` (or FUZZ_SECONDS=0).
#
#   bash fuzz/campaign.sh config_yaml            # 10 million runs or 30 min
#   bash fuzz/campaign.sh config_yaml 3600 0     # an hour, no run limit
set -euo pipefail
cd "$(dirname "$0")"
t=${1:?target}
seconds=${2:-1800}
runs=${3:-10000000}
host=$(rustc -vV | sed -n 's/^host: //p')
bin="${CARGO_TARGET_DIR:-target}/$host/release/$t"
case $t in
  *_dialogue) max_len=20000 ;; # past the 8 KiB line limits
  http_head) max_len=12000 ;;  # past the 8 KiB head limit
  config_yaml) max_len=16384 ;;
  proxy_header) max_len=1024 ;;
  *) max_len=8192 ;;
esac
mkdir -p "runs/$t/corpus"
started=$(date +%s)
status=0
nice -n 19 "$bin" "runs/$t/corpus" "corpus/$t" -runs="$runs" -max_total_time="$seconds" \
  -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" -print_final_stats=1 \
  -artifact_prefix="runs/$t/" >"runs/$t/log" 2>&1 || status=$?
wall=$(($(date +%s) - started))
stat() { sed -n "s/^stat::$1: *//p" "runs/$t/log" | tail -1; }
cov=$(grep -o 'cov: [0-9]*' "runs/$t/log" | tail -1 | cut -d' ' -f2)
ft=$(grep -o 'ft: [0-9]*' "runs/$t/log" | tail -1 | cut -d' ' -f2)
execs=$(stat number_of_executed_units)
crashes=$(find "runs/$t" -maxdepth 1 \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
printf '%s execs=%s exec/s=%s wall=%ss cov=%s ft=%s corpus=%s crashes=%s exit=%s\n' \
  "$t" "$execs" "$((execs / (wall > 0 ? wall : 1)))" "$wall" "$cov" "$ft" \
  "$(find "runs/$t/corpus" -type f | wc -l)" "$crashes" "$status" | tee -a runs/summary.txt
exit "$status"
