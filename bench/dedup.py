#!/usr/bin/env python3
"""Issue-10 benchmark, the local tier (item 6): bytes a chain of checkpoints takes on ext4
(no reflink: every snapshot a copy), now that a snapshot shares its unchanged files with its
parent by hard link, against full copies (the sum of the snapshots' logical sizes, what the
store took before).

Two chains, each in a fresh home on /tmp (ext4):
- pagila's schema and data, then 28 one-row steps (30 steps over a ~38 MB database);
- a 10-step chain where each step changes one table of ten.

Usage: python3 bench/dedup.py [--pagila DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"


def run(env, cwd, *args):
    r = subprocess.run([str(BIN / "sqlrs"), *args], cwd=cwd, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"sqlrs {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def measure(name, steps, files):
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-dedup-"))
    os.chmod(root, 0o711)
    work = root / "work"
    work.mkdir()
    for fname, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, work / fname)
        else:
            (work / fname).write_text(content)
    home = root / "home"
    home.mkdir()
    # No standbys: only snapshots are counted, and nothing else runs.
    (home / "config.toml").write_text("[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n")
    env = dict(os.environ, SQLRS_HOME=str(home), TAIDON_BIN=str(BIN / "taidon"),
               SQLRS_CACHE_DIR=str(root / "cache"))
    try:
        v = json.loads(run(env, work, "--json", "prepare:psql", *steps))
        run(env, work, "rm", v["instance_id"])
        ls = json.loads(run(env, work, "--json", "ls"))
        status = json.loads(run(env, work, "--json", "status"))
        logical = sum(s["size_bytes"] for s in ls["states"])
        stored = status["store_bytes"]
        strategy = status["clone_strategy"]
        n = len(ls["states"]) - 1
        print(f"| {name} | {n} | {strategy} | {logical / 2**20:.1f} MiB | "
              f"{stored / 2**20:.1f} MiB | {stored / logical:.3f} |")
    finally:
        subprocess.run([str(BIN / "sqlrs"), "shutdown"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pagila", default=str(ROOT.parent / "shared" / "fixtures" / "pagila"))
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=ROOT, check=True)
    pagila = Path(args.pagila)
    print("| chain | steps | clone strategy | full copies (sum of snapshot sizes) | stored | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    steps = ["-f", "pagila-schema.sql", "-f", "pagila-data.sql"]
    for i in range(28):
        steps += ["-c", f"insert into actor (first_name, last_name) values ('a{i}', 'b{i}')"]
    measure("pagila + 28 one-row steps", steps, {
        "pagila-schema.sql": pagila / "pagila-schema.sql",
        "pagila-data.sql": pagila / "pagila-data.sql",
    })
    tables = "".join(
        f"create table t{i} (x int, pad text); "
        f"insert into t{i} select g, repeat('x', 200) from generate_series(1, 20000) g;\n"
        for i in range(10))
    steps = ["-f", "tables.sql"]
    for i in range(10):
        steps += ["-c", f"update t{i} set x = x + 1"]
    measure("ten tables, one changed per step", steps, {"tables.sql": tables})


if __name__ == "__main__":
    main()
