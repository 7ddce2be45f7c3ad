#!/usr/bin/env python3
"""Issue-8 benchmark: start-up time of `sqlrs --version` (and of a parse that fails, which
also builds the whole clap tree) for two builds side by side: this tree and a baseline
revision (by default the last commit before the CLI moved to clap).

Both binaries are release builds. Runs alternate between the two so that the machine's
noise falls on both alike; the figures are medians of wall time at the caller.

Usage: python3 bench/cli_startup.py [--runs N] [--baseline-rev REV] [--baseline-bin PATH]
"""

import argparse
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REV = "5a6546e"  # the hand-written parser, before `sqlrs on clap`


def build_baseline(rev):
    """A release `sqlrs` of `rev`, built in a worktree with a target dir of its own (sharing
    this tree's would mix up the two builds of the same path crates), and copied aside."""
    tree = Path("/tmp/taidon-bench-baseline-" + rev)
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
            check=True,
        )
    target = ROOT / "target" / "bench-baseline"
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "sqlrs", "--target-dir", str(target)],
        cwd=tree,
        check=True,
    )
    out = Path("/tmp/sqlrs-baseline-" + rev)
    out.write_bytes((target / "release" / "sqlrs").read_bytes())
    out.chmod(0o755)
    return out


def once(binary, args):
    t = time.perf_counter()
    subprocess.run(
        [str(binary), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return (time.perf_counter() - t) * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--baseline-bin")
    args = ap.parse_args()
    old = Path(args.baseline_bin) if args.baseline_bin else build_baseline(args.baseline_rev)
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "sqlrs"], cwd=ROOT, check=True
    )
    new = ROOT / "target" / "release" / "sqlrs"
    cases = [
        ("sqlrs --version", ["--version"]),
        ("sqlrs rm xyz (usage error, exit 2)", ["rm", "xyz"]),
    ]
    print(f"baseline: {old}\nthis tree: {new}\nruns: {args.runs} each, alternating\n")
    print("| command | baseline | this tree | difference | ratio |")
    print("|---|---:|---:|---:|---:|")
    for label, argv in cases:
        for _ in range(20):  # warm the page cache
            once(old, argv)
            once(new, argv)
        a, b = [], []
        for i in range(args.runs):
            if i % 2:
                a.append(once(old, argv))
                b.append(once(new, argv))
            else:
                b.append(once(new, argv))
                a.append(once(old, argv))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| `{label}` | {ma:.2f} ms | {mb:.2f} ms | {mb - ma:+.2f} ms | {mb / ma:.2f}× |")


if __name__ == "__main__":
    main()
