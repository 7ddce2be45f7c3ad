#!/usr/bin/env bash
# Kubernetes runtime benchmarks on the FAKE cluster (crates/testkit/src/kube.rs: an in-memory
# API server whose kubelet runs each pod's real command): a hand-out from a pre-started
# standby pod vs a cold pod start (restore of pagila from moto plus postgres start), and
# Resolve of a hot instance with 1,000 instances known to the controller. Each prints its
# figures; the ratios go to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --workspace --all-targets
cargo test -q -p sqlrs --test kube bench_standby_hand_out_vs_cold_pod_start -- --ignored --nocapture 2>/dev/null \
  | grep -E '^pagila instance'
cargo test -q -p taidon-controller --lib bench_resolve_with_a_thousand_instances -- --ignored --nocapture 2>/dev/null \
  | grep -E '^resolve with'
