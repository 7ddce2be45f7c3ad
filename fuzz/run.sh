#!/usr/bin/env bash
# Fuzzes the gateway's startup and authentication handling for a fixed budget.
#   bash fuzz/run.sh [SECONDS]      (default 60; installs cargo-fuzz if missing)
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address): with no nightly toolchain, the
# stable one takes them under RUSTC_BOOTSTRAP=1 (its sanitizer runtimes ship with it).
set -euo pipefail
cd "$(dirname "$0")"
budget="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
mkdir -p corpus/handshake
# Seeds: an SSLRequest, a GSSENCRequest, a StartupMessage, a CancelRequest.
printf '\x00\x00\x00\x08\x04\xd2\x16\x2f' > corpus/handshake/ssl
printf '\x00\x00\x00\x08\x04\xd2\x16\x30' > corpus/handshake/gss
printf '\x00\x00\x00\x14\x00\x03\x00\x00user\x00sqlrs\x00\x00p\x00\x00\x00\x08abc\x00' > corpus/handshake/login
printf '\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00\x00\x02' > corpus/handshake/cancel
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  exec cargo +nightly fuzz run handshake corpus/handshake -- -max_total_time="$budget" -timeout=5 -rss_limit_mb=2048
fi
RUSTC_BOOTSTRAP=1 exec cargo fuzz run handshake corpus/handshake -- -max_total_time="$budget" -timeout=5 -rss_limit_mb=2048
