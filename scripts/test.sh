#!/usr/bin/env bash
# The test command: set up, build once, run every test (unit and end-to-end, real PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The copy-on-write tests mount a loop XFS and btrfs: they need root. As root they must run.
if [ "$(id -u)" -eq 0 ]; then export TAIDON_REQUIRE_COW=1; fi
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads "${TEST_THREADS:-4}"
