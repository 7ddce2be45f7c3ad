#!/usr/bin/env bash
# Fuzzes the gateway's startup and authentication handling (fuzz_targets/handshake.rs) with
# libFuzzer for a fixed budget.
#   bash fuzz/run.sh [SECONDS]     build if needed, then fuzz (default 60 s)
#   bash fuzz/run.sh --build       build only (scripts/test.sh builds it while the tests run)
# It builds with the coverage instrumentation cargo-fuzz would add, on the installed stable
# toolchain and without a sanitizer: the gateway is safe Rust, so what the fuzzer looks for is
# a panic (overflow checks and debug assertions are on), a hang (-timeout) or runaway memory
# (-rss_limit_mb). A finding is saved under fuzz/artifacts/; replay it with
#   fuzz/target/x86_64-unknown-linux-gnu/release/handshake fuzz/artifacts/crash-…
set -euo pipefail
cd "$(dirname "$0")"
target="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# --target keeps these flags off build scripts and proc macros.
cargo build --quiet --release --target "$target" --bin handshake
[ "${1:-}" = "--build" ] && exit 0
budget="${1:-60}"
mkdir -p corpus/handshake artifacts
# Seeds: an SSLRequest, a GSSENCRequest, a StartupMessage with a password, a CancelRequest.
printf '\x00\x00\x00\x08\x04\xd2\x16\x2f' > corpus/handshake/ssl
printf '\x00\x00\x00\x08\x04\xd2\x16\x30' > corpus/handshake/gss
printf '\x00\x00\x00\x14\x00\x03\x00\x00user\x00sqlrs\x00\x00p\x00\x00\x00\x08abc\x00' > corpus/handshake/login
printf '\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00\x00\x02' > corpus/handshake/cancel
exec "target/$target/release/handshake" corpus/handshake -artifact_prefix=artifacts/ \
  -max_total_time="$budget" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
