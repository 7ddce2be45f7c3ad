#!/usr/bin/env python3
"""Issue-5 benchmark: handing out a pre-started standby instance vs starting an instance
cold (clone + start), side by side in one run against one daemon.

Both are timed as `POST /v1/instances {state}` on the controller's API (wall time at the
client). The hot state is warmed with `sqlrs warmup --hot` (it keeps one standby); the cold
state is warmed without, and busy states get no standby (`[policy.standby] busy = 0`), so each
of its instances is cloned and started on demand. Rounds alternate hot and cold.

Usage: python3 bench/lifecycle_handout.py [--runs N] [--bin DIR]  (cargo build --bins first)
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug"))
    args = ap.parse_args()
    bindir = Path(args.bin)
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-"))
    os.chmod(root, 0o711)
    home = root / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        "[lifecycle]\ntick_ms = 100\n[policy.standby]\nbusy = 0\n"
    )
    env = dict(os.environ, SQLRS_HOME=str(home), TAIDON_BIN=str(bindir / "taidon"))

    def sqlrs(*a):
        return subprocess.run([str(bindir / "sqlrs"), *a], env=env, cwd=root,
                              check=True, capture_output=True, text=True).stdout

    try:
        hot = json.loads(sqlrs("--json", "warmup", "--hot", "prepare:psql", "--", "-c",
                               "create table hot as select g from generate_series(1, 10000) g"))["state_id"]
        cold = json.loads(sqlrs("--json", "warmup", "prepare:psql", "--", "-c",
                                "create table cold as select g from generate_series(1, 10000) g"))["state_id"]
        daemon = json.loads((home / "daemon.json").read_text())
        token = (home / "api.token").read_text().strip()

        def api(method, path, body=None):
            req = urllib.request.Request(daemon["api_url"] + "/v1" + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                return json.loads(r.read() or b"{}")

        def standbys():
            return api("GET", "/status")["standby_instances"]

        def create(state):
            t = time.perf_counter()
            info = api("POST", "/instances", {"state": state})
            ms = (time.perf_counter() - t) * 1000.0
            api("DELETE", "/instances/" + info["instance_id"])
            return ms

        hot_ms, cold_ms = [], []
        for _ in range(args.runs):
            deadline = time.time() + 60
            while standbys() < 1:
                if time.time() > deadline:
                    raise SystemExit("the standby pool did not refill")
                time.sleep(0.05)
            hot_ms.append(create(hot))
            cold_ms.append(create(cold))
        status = api("GET", "/status")
        print(f"clone strategy: {status['clone_strategy']}, {status['engine_version']}, runs: {args.runs}")
        print("| instance of a WARM/HOT state | median ms | min ms | max ms |")
        print("|---|---|---|---|")
        for name, xs in (("standby hand-out (HOT, pool of 1)", hot_ms),
                         ("cold start (clone + start + password)", cold_ms)):
            print(f"| {name} | {statistics.median(xs):.1f} | {min(xs):.1f} | {max(xs):.1f} |")
        print(f"\nratio (median cold / median hand-out): {statistics.median(cold_ms) / statistics.median(hot_ms):.0f}x")
    finally:
        subprocess.run([str(bindir / "sqlrs"), "shutdown"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
