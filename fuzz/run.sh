#!/usr/bin/env bash
# Fuzzes the gateway's startup and authentication handling for a fixed budget.
#   bash fuzz/run.sh [SECONDS]      (default 60; needs the nightly toolchain and cargo-fuzz)
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
exec cargo +nightly fuzz run handshake corpus/handshake -- -max_total_time="$budget" -timeout=5 -rss_limit_mb=2048
