#!/usr/bin/env python3
"""Issue-3 benchmarks, each pair measured side by side in one run (the machine is noisy: read
the ratios, not the absolute times).

  1. first prepare of pagila (schema, then data) vs the cache hit (both create an instance)
  2. `sqlrs prepare … run -- true` on a cached state vs `psql -c 'select 1'` straight to a
     running server
  (1-3 run with the standby pool off, so every instance is a fresh clone and start; 1 runs
  again with the default pool, where a hit hands out a pre-started instance)
  3. clone+start of an instance (the controller's own clone_ms + start_ms) vs a bare
     `pg_ctl start -w` of a copy of the same data directory, on the home's file system: ext4
     (plain copy) and a loop-mounted reflink XFS (needs root and mkfs.xfs)

Usage: python3 bench/bench.py [--runs N] [--no-xfs]    (build first: cargo build --release --bins)
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
PAGILA = Path(os.environ.get("PAGILA", ROOT.parent / "shared" / "fixtures" / "pagila"))


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1000.0, out


class Home:
    def __init__(self, path: Path):
        self.path = path
        self.env = dict(os.environ, SQLRS_HOME=str(path), TAIDON_BIN=str(BIN / "taidon"))
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL"):
            self.env.pop(k, None)

    def sqlrs(self, *args):
        return sh(str(BIN / "sqlrs"), *args, env=self.env, cwd=str(PAGILA))

    def json(self, *args):
        return json.loads(self.sqlrs("--json", *args).stdout)

    def shutdown(self):
        subprocess.run([str(BIN / "sqlrs"), "shutdown"], env=self.env, capture_output=True)


PREPARE = ["prepare:psql", "--", "-f", "pagila-schema.sql", "-f", "pagila-data.sql"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def bare_start(bin_dir: Path, data: Path, scratch: Path, runs: int):
    """pg_ctl start -w of a copy of `data` (on the same file system), timed."""
    work = scratch / "bare"
    starts = []
    for i in range(runs):
        if work.exists():
            shutil.rmtree(work)
        sh("cp", "-a", str(data), str(work))
        sock = work / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(sock, "postgres", "postgres")
        port = free_port()
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        ms, _ = timed(lambda: sh(*as_server_user([str(bin_dir / "pg_ctl"), "-D", str(work), "-o", opts, "-w", "-l", str(work / "log"), "start"])))
        starts.append(ms)
        last = (port, sock)
        if i != runs - 1:
            sh(*as_server_user([str(bin_dir / "pg_ctl"), "-D", str(work), "-m", "fast", "-w", "stop"]))
    return starts, work, last


def clone_and_start(home: Home, runs: int):
    """The controller's clone_ms + start_ms for `runs` instances of the cached state, 2 s apart."""
    out = []
    for _ in range(runs):
        time.sleep(2)
        v = home.json(*PREPARE)
        inst = next(i for i in home.json("ls")["instances"] if i["instance_id"] == v["instance_id"])
        out.append((inst["clone_ms"], inst["start_ms"]))
        home.sqlrs("rm", v["instance_id"])
    return out


def med(xs):
    return statistics.median(xs)


NO_STANDBY = "[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n"


def bench_home(label: str, home_path: Path, runs: int, results: dict, full: bool, standby: bool):
    home = Home(home_path)
    if not standby:
        # Every instance is a fresh clone and start: what this benchmark is about.
        home_path.mkdir(parents=True, exist_ok=True)
        (home_path / "config.toml").write_text(NO_STANDBY)
    try:
        status = home.json("status")
        print(f"\n## {label}: home {home_path} (clone strategy: {status['clone_strategy']})")
        bin_dir = Path(status["engine_bin_dir"])

        first_ms, v = timed(lambda: home.json(*PREPARE))
        assert v["cache_hit"] is False, v
        home.sqlrs("rm", v["instance_id"])
        def hits(gap_s):
            out = []
            for _ in range(runs):
                time.sleep(gap_s)
                ms, v = timed(lambda: home.json(*PREPARE))
                assert v["cache_hit"] is True, v
                out.append(ms)
                home.sqlrs("rm", v["instance_id"])
            return med(out)

        # Back to back is the worst case on a copying store: the previous instance's spare
        # clone is still being copied. A gap like a short test run's lets it finish.
        tight, spaced = hits(0), hits(2)
        r, rs = tight / first_ms, spaced / first_ms
        print(f"1. first prepare of pagila {first_ms:8.0f} ms | cache hit, median of {runs}: back to back {tight:6.0f} ms (1/{1/r:.0f}), 2 s apart {spaced:6.0f} ms (1/{1/rs:.0f}) | target <= 1/20")
        results[label] = {"first_prepare_ms": first_ms, "hit_back_to_back_ms": tight, "hit_2s_apart_ms": spaced,
                          "hit_over_first_back_to_back": r, "hit_over_first_2s_apart": rs}

        cs = clone_and_start(home, runs)
        state = v["state_id"]
        data = home_path / "snapshots" / state / "data"
        # A scratch copy beside the home, on the same file system, outside the store.
        starts, work, (port, sock) = bare_start(bin_dir, data, home_path.parent, runs)
        ours = [c + s for c, s in cs]
        r3 = med(ours) / med(starts)
        print(f"3. clone+start {med(ours):6.0f} ms (clone {med([c for c, _ in cs]):.0f} + start {med([s for _, s in cs]):.0f}) | bare pg_ctl start -w {med(starts):6.0f} ms | ratio {r3:.2f}x")
        results[label].update({"clone_ms": med([c for c, _ in cs]), "start_ms": med([s for _, s in cs]), "bare_pg_ctl_start_ms": med(starts), "clone_start_over_bare": r3})

        if full:
            runs_ms = []
            for _ in range(runs):
                ms, _ = timed(lambda: home.sqlrs(*PREPARE, "run", "--", "true"))
                runs_ms.append(ms)
            direct = []
            psql = shutil.which("psql") or str(bin_dir / "psql")
            for _ in range(runs):
                # Over the server's Unix socket (trust): no password round trip to pay.
                ms, _ = timed(lambda: sh(psql, "-h", str(sock), "-p", str(port), "-U", "postgres", "-d", "postgres", "-c", "select 1"))
                direct.append(ms)
            r2 = med(runs_ms) / med(direct)
            print(f"2. sqlrs prepare … run -- true {med(runs_ms):6.0f} ms | psql -c 'select 1' straight to a running server {med(direct):6.0f} ms | ratio {r2:.1f}x")
            results[label].update({"run_true_ms": med(runs_ms), "psql_direct_ms": med(direct), "run_over_psql": r2})
        sh(*as_server_user([str(bin_dir / "pg_ctl"), "-D", str(work), "-m", "immediate", "-w", "stop"]))
        shutil.rmtree(work, ignore_errors=True)
    finally:
        home.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-xfs", action="store_true")
    args = ap.parse_args()
    for b in ("sqlrs", "taidon"):
        if not (BIN / b).exists():
            sys.exit(f"{BIN / b} is missing: cargo build --release --bins")
    results = {}
    with tempfile.TemporaryDirectory(prefix="taidon-bench-") as tmp:
        os.chmod(tmp, 0o711)
        bench_home("ext4 (copy), standbys off", Path(tmp) / "home", args.runs, results, full=True, standby=False)
        bench_home("ext4 (copy), default standby pool", Path(tmp) / "home2", args.runs, results, full=False, standby=True)
        if not args.no_xfs and os.geteuid() == 0 and shutil.which("mkfs.xfs"):
            img, mnt = Path(tmp) / "xfs.img", Path(tmp) / "xfs"
            mnt.mkdir()
            with open(img, "wb") as f:
                f.truncate(4 << 30)
            sh("mkfs.xfs", "-q", "-m", "reflink=1", str(img))
            sh("mount", "-o", "loop", str(img), str(mnt))
            try:
                os.chmod(mnt, 0o711)
                bench_home("XFS (reflink), standbys off", mnt / "home", args.runs, results, full=False, standby=False)
            finally:
                subprocess.run(["umount", str(mnt)])
        else:
            print("\n(skipping XFS: needs root and mkfs.xfs)")
    print("\n" + json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
