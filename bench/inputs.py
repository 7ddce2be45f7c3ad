#!/usr/bin/env python3
"""Issue-9 benchmark, inputs: (1) hashing the include closure of a chain of 1,000 files,
with an empty hash cache, with the cache, and after one file changed (release build of the
closure code, `cargo test --release ... --ignored`); (2) the bytes a prepare of pagila
uploads from a first client and from a second client with the same files elsewhere (same
daemon: the second finds every blob there).

Usage: python3 bench/inputs.py [--pagila DIR]   (as root or a user the daemon can serve)
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def closure_figures():
    out = subprocess.run(
        ["cargo", "test", "--release", "-q", "-p", "sqlrs", "--bin", "sqlrs",
         "bench_closure_of_a_thousand_includes", "--", "--ignored", "--nocapture"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    line = next(l for l in out.splitlines() if l.startswith("closure of"))
    print(line)


def uploads(pagila):
    subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=ROOT, check=True)
    bindir = ROOT / "target" / "release"
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-inputs-"))
    os.chmod(root, 0o711)
    env = dict(os.environ, SQLRS_HOME=str(root / "home"), TAIDON_BIN=str(bindir / "taidon"),
               SQLRS_CACHE_DIR=str(root / "cache"))
    files = ["pagila-schema.sql", "pagila-data.sql"]
    sizes = sum((Path(pagila) / f).stat().st_size for f in files)
    rows = []
    for client in ["client-a", "client-b"]:
        work = root / client
        work.mkdir()
        for f in files:
            shutil.copy(Path(pagila) / f, work / f)
        r = subprocess.run(
            [str(bindir / "sqlrs"), "--json", "prepare:psql", "-f", files[0], "-f", files[1]],
            cwd=work, env=env, check=True, capture_output=True, text=True,
        )
        v = json.loads(r.stdout)
        rows.append((client, v["uploaded_bytes"], v["cache_hit"]))
        subprocess.run([str(bindir / "sqlrs"), "rm", v["instance_id"]], cwd=work, env=env,
                       check=True, capture_output=True)
    subprocess.run([str(bindir / "sqlrs"), "shutdown"], env=env, check=True, capture_output=True)
    print(f"\npagila inputs: {len(files)} files, {sizes} bytes")
    print("| client | uploaded bytes | cache hit |")
    print("|---|---:|---|")
    for client, uploaded, hit in rows:
        print(f"| {client} | {uploaded} | {hit} |")
    shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pagila", default=str(ROOT.parent / "shared" / "fixtures" / "pagila"))
    args = ap.parse_args()
    closure_figures()
    uploads(args.pagila)


if __name__ == "__main__":
    main()
