#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with libFuzzer (cargo-fuzz, nightly),
# starting from the seed corpora in fuzz/seeds/<target>. New inputs go to a scratch corpus,
# not into the repo; a crash leaves its input in fuzz/artifacts/<target>/ and stops the run
# (turn it into a regression test in the normal suite, then add it to the seeds).
#   cargo install cargo-fuzz; rustup toolchain install nightly
#   fuzz/run.sh 600              # ten minutes per target
#   FUZZ_TARGETS="frame host" fuzz/run.sh 60
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
targets="${FUZZ_TARGETS:-frame policy cloudevents host control_update}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
printf '%-16s %12s %10s %8s\n' target executions exec/s result
for target in $targets; do
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  if cargo +nightly fuzz run "$target" "$scratch/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
  fi
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  rate="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  printf '%-16s %12s %10s %8s\n' "$target" "$runs" "$rate" "$result"
  if [ "$result" != ok ]; then
    tail -40 "$log"
    exit 1
  fi
done
