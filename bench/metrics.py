#!/usr/bin/env python3
"""Issue-15 benchmark: what the metrics cost, side by side in one run.

1. Gateway overhead: two `taidon local` daemons on homes of their own, one with the gateway's
   metrics (the default) and one started with --no-metrics, each with its own instance of the
   same state and `pgbench -i -s 1` tables. pgbench runs through each gateway in turn
   (alternating, --rounds rounds of --seconds each), sslmode=disable:
     - `-S -c 16` (select-only, 16 clients, kept connections)      target: on/off >= 0.98
     - `-S -C -c 16` (a new connection per transaction: the handshake and its histograms)
   The ratio is the mean tps with metrics over the mean tps without.
2. `GET /metrics` with 10,000 states known: the daemon with metrics is stopped, 10,000 COLD
   states (metadata only, children of the real step) are added to its meta.db, and it is
   started again. Then --scrapes sequential scrapes with the API token, timed at the client
   (HTTP on loopback), against the same scrapes before the states were added.
                                                                 target: < 50 ms

Usage: python3 bench/metrics.py [--seconds 10] [--rounds 3] [--scrapes 50] [--bin DIR]
       (cargo build --release --bins first, then --bin target/release)
"""

import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(extra)
    return env


def pgbench(conninfo, seconds, connect_each):
    args = ["pgbench", "-n", "-S", "-T", str(seconds), "-c", "16", "-j", "2"]
    if connect_each:
        args.append("-C")
    p = subprocess.run(args + [conninfo], capture_output=True, text=True, env=clean_env())
    m = re.search(r"tps = ([0-9.]+) \(", p.stdout)
    if p.returncode != 0 or not m:
        raise SystemExit(f"pgbench failed ({p.returncode}): {p.stderr[-500:]}")
    return float(m.group(1))


class Daemon:
    """`taidon local` on a home of its own, started directly (sqlrs finds it there)."""

    def __init__(self, root: Path, bin_dir: Path, name: str, extra: list[str]):
        self.bin = bin_dir
        self.home = root / name
        self.extra = extra
        self.env = clean_env(SQLRS_HOME=str(self.home), TAIDON_BIN=str(bin_dir / "taidon"), TAIDON_LOG="warn")
        self.proc = None
        self.logfile = root / f"{name}.log"

    def start(self):
        (self.home / "daemon.json").unlink(missing_ok=True)
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen([str(self.bin / "taidon"), "local", "--home", str(self.home), *self.extra],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while not (self.home / "daemon.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"taidon local did not start: {self.logfile.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self):
        subprocess.run([str(self.bin / "sqlrs"), "shutdown"], env=self.env, capture_output=True)
        if self.proc:
            self.proc.wait(timeout=60)

    def sqlrs(self, *args):
        p = subprocess.run([str(self.bin / "sqlrs"), *args], capture_output=True, text=True, env=self.env)
        if p.returncode != 0:
            raise SystemExit(f"sqlrs {args}: {p.stderr}")
        return p.stdout

    def scrape(self):
        """One GET /metrics with the API token: (milliseconds, body)."""
        info = json.loads((self.home / "daemon.json").read_text())
        token = (self.home / "api.token").read_text().strip()
        host, port = info["api_url"].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port))
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - t0) * 1000
        conn.close()
        if resp.status != 200:
            raise SystemExit(f"GET /metrics: {resp.status} {body[:300]!r}")
        return ms, body.decode()


def add_cold_states(meta_db: Path, n: int):
    """Adds `n` COLD states (metadata only) as children of the newest real state."""
    db = sqlite3.connect(meta_db)
    parent, inputs, engine = db.execute(
        "SELECT state_id, inputs_fingerprint, engine_fingerprint FROM states "
        "WHERE parent IS NOT NULL ORDER BY created_ms DESC LIMIT 1").fetchone()
    now = int(time.time() * 1000)
    rows = [(secrets.token_hex(32), parent, f"bench state {i}", inputs, engine, "COLD", "bench",
             1_000_000 + i, 100 + i % 1000, 10, now - i, now - i, i % 7) for i in range(n)]
    db.executemany("INSERT INTO states (state_id, parent, label, inputs_fingerprint, engine_fingerprint, "
                   "status, status_reason, size_bytes, build_cost_ms, restore_cost_ms, created_ms, "
                   "last_access_ms, access_count) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()


def scrape_times(d: Daemon, n: int):
    d.scrape()  # the first one warms the store's usage count
    times = [d.scrape()[0] for _ in range(n)]
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))], times[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--states", type=int, default=10_000)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    args = ap.parse_args()
    bin_dir = Path(args.bin).resolve()
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-metrics-"))
    os.chmod(root, 0o711)
    on = Daemon(root, bin_dir, "on", [])
    off = Daemon(root, bin_dir, "off", ["--no-metrics"])
    try:
        dsns = {}
        for d in (on, off):
            d.start()
            made = json.loads(d.sqlrs("--json", "prepare:psql", "--", "-c", "create table t(x int)"))
            iid = made["instance_id"]
            dsn = json.loads(d.sqlrs("--json", "dsn", iid))["dsn_plain"]
            subprocess.run(["pgbench", "-i", "-s", "1", "-q", dsn], check=True, capture_output=True,
                           env=clean_env())
            dsns[d] = dsn
        print(f"gateway overhead: pgbench -S -c 16 -j 2, {args.rounds} alternating rounds of {args.seconds} s")
        for label, each in (("-S -c 16", False), ("-S -C -c 16", True)):
            tps = {on: [], off: []}
            for r in range(args.rounds):
                order = (on, off) if r % 2 == 0 else (off, on)
                for d in order:
                    tps[d].append(pgbench(dsns[d], args.seconds, each))
            a, b = statistics.mean(tps[on]), statistics.mean(tps[off])
            print(f"  {label:12} metrics on {a:9.0f} tps  off {b:9.0f} tps  on/off {a / b:.3f}"
                  f"   (rounds on {[round(x) for x in tps[on]]}, off {[round(x) for x in tps[off]]})")
        off.stop()

        p50, p99, worst = scrape_times(on, args.scrapes)
        body = on.scrape()[1]
        known = sum(int(float(m)) for m in re.findall(r'^taidon_states\{[^}]*\} (\S+)$', body, re.M))
        print(f"GET /metrics, {known} states known: p50 {p50:.2f} ms  p99 {p99:.2f} ms  max {worst:.2f} ms")
        on.stop()
        add_cold_states(on.home / "meta.db", args.states)
        on.start()
        big50, big99, bigworst = scrape_times(on, args.scrapes)
        body = on.scrape()[1]
        known = sum(int(float(m)) for m in re.findall(r'^taidon_states\{[^}]*\} (\S+)$', body, re.M))
        cold = re.search(r'^taidon_states\{presence="cold"\} (\S+)$', body, re.M)
        print(f"GET /metrics, {known} states known ({cold.group(1) if cold else '?'} cold): "
              f"p50 {big50:.2f} ms  p99 {big99:.2f} ms  max {bigworst:.2f} ms  "
              f"(p50 ratio to the small home {big50 / p50:.2f}x)   target < 50 ms")
        if known < args.states:
            raise SystemExit(f"only {known} states are counted after adding {args.states}")
    finally:
        for d in (on, off):
            try:
                d.stop()
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                print(f"stopping {d.home}: {e}")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
