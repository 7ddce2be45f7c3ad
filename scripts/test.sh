#!/usr/bin/env bash
# The test command: set up, build once, run every test (unit and end-to-end, real PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The copy-on-write tests mount a loop XFS and btrfs: they need root. As root they must run.
if [ "$(id -u)" -eq 0 ]; then export TAIDON_REQUIRE_COW=1; fi
cargo build --workspace --all-targets
log=$(mktemp)
fuzzlog=$(mktemp)
trap 'rm -f "$log" "$fuzzlog"' EXIT
# The gateway's fuzz target builds at the lowest priority while the tests run (they wait on
# servers more than they compute), then fuzzes for 60 s after them.
nice -n 19 bash fuzz/run.sh --build > "$fuzzlog" 2>&1 &
fuzz_build=$!
set +e
# --no-fail-fast: a failing binary does not hide the results of the others.
cargo test --workspace --no-fail-fast -- --test-threads "${TEST_THREADS:-4}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
wait "$fuzz_build"
fuzz_status=$?
if [ "$fuzz_status" -eq 0 ]; then
  bash fuzz/run.sh "${FUZZ_SECONDS:-60}" > "$fuzzlog" 2>&1
  fuzz_status=$?
fi
set -e
if [ "$fuzz_status" -eq 0 ]; then
  echo "fuzz: $(sed -n 's/^stat::number_of_executed_units: *//p' "$fuzzlog") handshakes in ${FUZZ_SECONDS:-60} s, no crash"
else
  tail -n 40 "$fuzzlog"
  echo "fuzz: FAILED (exit $fuzz_status): see the output above and fuzz/artifacts/"
  [ "$status" -ne 0 ] || status=$fuzz_status
fi
# One closing line over every test binary (cargo prints one per binary, doc tests last).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
