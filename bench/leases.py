#!/usr/bin/env python3
"""Issue-14 benchmark: a fresh copy of pagila per test, by lease, against pgtestdb's template
way on a plain server of the same PostgreSQL, side by side in one run.

1. Sustained: N sequential cycles of (get a fresh copy, connect, one query, give it back).
   - lease (database): POST /v1/leases on the daemon's API, connect with the DSN as handed
     out (through the gateway, TLS verify-full), `select count(*) from film`, DELETE.
   - lease (instance): the same with isolation=instance.
   - template way (pgtestdb): on a plain server with pgtestdb's recommended settings (fsync,
     full_page_writes and synchronous_commit off), over one kept admin session:
     `CREATE DATABASE … TEMPLATE pagila` (the default strategy, as pgtestdb does), connect
     over TCP, the same query, `DROP DATABASE`. Also with `STRATEGY FILE_COPY` ("tuned").
   Rounds alternate the ways; each way's rate is its cycles over its own time.
2. Hand-out latency while demand stays under the refill rate: leases paced at --paced-rate
   per second; the time of POST /v1/leases at the client.
3. pytest-xdist: --tests tests on -n 8 workers, each test taking a fresh copy (the
   pytest-taidon plugin's `taidon_db`, or a fixture doing the template way) and running one
   query; the wall time of each suite and the summed fixture setup time.

Each part runs on an ext4 home (/tmp) and, as root with mkfs.xfs, on a loop-mounted reflink
XFS (the plain server's data directory on the same file system).

Usage: python3 bench/leases.py [--cycles 200] [--rounds 4] [--tests 400] [--bin DIR]
       (cargo build --release --bins first, then --bin target/release)
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PAGILA = Path(os.environ.get("PAGILA", ROOT.parent / "shared" / "fixtures" / "pagila"))
QUERY = "select count(*) from film"


def pg_bindir():
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    d = Path(out.stdout.strip())
    if out.returncode == 0 and (d / "postgres").exists():
        return d
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not dirs:
        raise SystemExit("no PostgreSQL server found")
    return dirs[-1].parent


def as_postgres(cmd, **kw):
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class PlainServer:
    """A plain PostgreSQL with pagila as a template database: what pgtestdb runs against."""

    def __init__(self, root: Path, port: int):
        self.bindir = pg_bindir()
        self.dir = root / "plain"
        self.dir.mkdir()
        os.chmod(self.dir, 0o777)
        self.data = self.dir / "data"
        self.port = port
        as_postgres([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])
        as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start", "-o",
                     f"-p {port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                     "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200"])
        self.admin_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            c.execute("create database pagila")
        for f in ("pagila-schema.sql", "pagila-data.sql"):
            subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U",
                            "postgres", "-d", "pagila", "-f", str(PAGILA / f)], check=True, capture_output=True)
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            c.execute("alter database pagila is_template true")
            c.execute("checkpoint")

    def stop(self):
        as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])


class Daemon:
    def __init__(self, root: Path, bindir: Path, config: str = ""):
        self.home = root / "home"
        self.home.mkdir()
        (self.home / "config.toml").write_text("[lifecycle]\ntick_ms = 200\n" + config)
        self.work = root / "work"
        self.work.mkdir()
        for f in ("pagila-schema.sql", "pagila-data.sql"):
            shutil.copy(PAGILA / f, self.work / f)
        (self.work / "sqlrs.toml").write_text(
            '[recipes.pagila]\nprepare = ["psql", "-f", "pagila-schema.sql", "-f", "pagila-data.sql"]\n')
        self.bindir = bindir
        self.env = dict(os.environ, SQLRS_HOME=str(self.home), TAIDON_BIN=str(bindir / "taidon"),
                        SQLRS_BIN=str(bindir / "sqlrs"))
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL"):
            self.env.pop(k, None)
        out = self.sqlrs("--json", "warmup", "prepare:psql", "--", "-f", "pagila-schema.sql", "-f", "pagila-data.sql")
        self.state = json.loads(out)["state_id"]
        daemon = json.loads((self.home / "daemon.json").read_text())
        self.api_url = daemon["api_url"]
        self.token = (self.home / "api.token").read_text().strip()

    def sqlrs(self, *a):
        return subprocess.run([str(self.bindir / "sqlrs"), *a], env=self.env, cwd=self.work, check=True,
                              capture_output=True, text=True).stdout

    def api(self, method, path, body=None):
        req = urllib.request.Request(self.api_url + "/v1" + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read() or b"{}")

    def lease(self, isolation="database"):
        return self.api("POST", "/leases", {"state": self.state, "isolation": isolation, "wait_s": 120})

    def release(self, lease):
        self.api("DELETE", "/leases/" + lease["lease"])

    def status(self):
        return self.api("GET", "/status")

    def stop(self):
        subprocess.run([str(self.bindir / "sqlrs"), "shutdown"], env=self.env, capture_output=True)


def lease_cycle(d: Daemon, isolation):
    lease = d.lease(isolation)
    with psycopg.connect(lease["dsn"]) as c:
        c.execute(QUERY).fetchone()
    d.release(lease)


class TemplateWay:
    def __init__(self, plain: PlainServer, strategy=""):
        self.plain = plain
        self.admin = psycopg.connect(plain.admin_dsn, autocommit=True)
        self.strategy = strategy
        self.n = 0

    def cycle(self):
        self.n += 1
        name = f"t_{os.getpid()}_{self.n}"
        self.admin.execute(f"create database {name} template pagila{self.strategy}")
        with psycopg.connect(f"host=127.0.0.1 port={self.plain.port} user=postgres dbname={name}") as c:
            c.execute(QUERY).fetchone()
        self.admin.execute(f"drop database {name}")


def sustained(d: Daemon, plain: PlainServer, cycles: int, rounds: int):
    ways = {
        "lease, isolation database": lambda: lease_cycle(d, "database"),
        "lease, isolation instance": lambda: lease_cycle(d, "instance"),
        "template way (pgtestdb)": TemplateWay(plain).cycle,
        "template way, STRATEGY FILE_COPY": TemplateWay(plain, " strategy file_copy").cycle,
    }
    per_round = max(1, cycles // rounds)
    spent = {k: 0.0 for k in ways}
    done = {k: 0 for k in ways}
    for f in ways.values():  # warm each way up once (the lease host starts here)
        f()
    time.sleep(2)
    for _ in range(rounds):
        for name, f in ways.items():
            t = time.perf_counter()
            for _ in range(per_round):
                f()
            spent[name] += time.perf_counter() - t
            done[name] += per_round
    return {k: done[k] / spent[k] for k in ways}, done


def one_block(d: Daemon, plain: PlainServer, cycles: int):
    """`cycles` consecutive cycles of each way, no pause between: past the ready pool, the
    lease rate is the refill rate."""
    out = {}
    for name, f in (("lease, isolation database", lambda: lease_cycle(d, "database")),
                    ("template way (pgtestdb)", TemplateWay(plain).cycle)):
        time.sleep(5)  # the pool back at rest
        t = time.perf_counter()
        for _ in range(cycles):
            f()
        out[name] = cycles / (time.perf_counter() - t)
    return out


def handout(d: Daemon, n: int, rate: float):
    times = []
    gap = 1.0 / rate
    next_at = time.perf_counter()
    for _ in range(n):
        now = time.perf_counter()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += gap
        t = time.perf_counter()
        lease = d.lease("database")
        times.append((time.perf_counter() - t) * 1000.0)
        with psycopg.connect(lease["dsn"]) as c:
            c.execute(QUERY).fetchone()
        d.release(lease)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))], max(times)


CONFTEST_TEMPLATE = '''
import os, time, psycopg, pytest

PORT = int(os.environ["BENCH_PLAIN_PORT"])
SETUP_LOG = os.environ["BENCH_SETUP_LOG"]

@pytest.fixture
def db():
    t = time.perf_counter()
    name = "x_%d_%d" % (os.getpid(), time.monotonic_ns())
    with psycopg.connect("host=127.0.0.1 port=%d user=postgres dbname=postgres" % PORT, autocommit=True) as a:
        a.execute("create database %s template pagila" % name)
    dsn = "host=127.0.0.1 port=%d user=postgres dbname=%s" % (PORT, name)
    with open(SETUP_LOG, "a") as f:
        f.write("%f\\n" % (time.perf_counter() - t))
    yield dsn
    with psycopg.connect("host=127.0.0.1 port=%d user=postgres dbname=postgres" % PORT, autocommit=True) as a:
        a.execute("drop database %s with (force)" % name)
'''

CONFTEST_TAIDON = '''
import os, time, pytest

SETUP_LOG = os.environ["BENCH_SETUP_LOG"]

@pytest.fixture
def db(taidon_db):
    yield taidon_db.dsn

@pytest.fixture(autouse=True)
def _time_setup(request):
    yield

def pytest_fixture_post_finalizer(fixturedef, request):
    pass

@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    t = time.perf_counter()
    yield
    if fixturedef.argname == "taidon_db":
        with open(SETUP_LOG, "a") as f:
            f.write("%f\\n" % (time.perf_counter() - t))
'''

TEST_BODY = '''
import psycopg

def make(i):
    def test(db):
        with psycopg.connect(db) as c:
            assert c.execute("select count(*) from film").fetchone()[0] == 1000
    test.__name__ = "test_%d" % i
    return test

for _i in range(NTESTS):
    globals()["test_%d" % _i] = make(_i)
'''


def xdist(d: Daemon, plain: PlainServer, root: Path, tests: int, workers: int):
    try:
        import pytest_taidon  # noqa: F401
        import xdist  # noqa: F401
    except ImportError as e:
        return {"skipped": f"pytest-taidon or pytest-xdist is not installed ({e}): run scripts/setup.sh"}
    out = {}
    for way, conftest in (("lease (pytest-taidon)", CONFTEST_TAIDON), ("template way", CONFTEST_TEMPLATE)):
        suite = root / ("suite-" + way.split()[0])
        suite.mkdir()
        (suite / "conftest.py").write_text(conftest)
        (suite / "test_many.py").write_text(TEST_BODY.replace("NTESTS", str(tests)))
        if way.startswith("lease"):
            shutil.copy(d.work / "sqlrs.toml", suite / "sqlrs.toml")
            for f in ("pagila-schema.sql", "pagila-data.sql"):
                shutil.copy(d.work / f, suite / f)
        log = root / f"setup-{suite.name}.log"
        env = dict(d.env, BENCH_PLAIN_PORT=str(plain.port), BENCH_SETUP_LOG=str(log))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), str(suite)]
        if way.startswith("lease"):
            cmd += ["--taidon-recipe", "pagila"]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            return {"failed": f"{way}: {r.stdout[-3000:]}\n{r.stderr[-2000:]}"}
        setups = [float(x) for x in log.read_text().split()]
        out[way] = (wall, sum(setups), statistics.median(setups) * 1000.0, len(setups))
    return out


def mount_xfs(root: Path):
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        return None
    img = root / "xfs.img"
    mnt = root / "xfs"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "6G", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    os.chmod(mnt, 0o711)
    return mnt


def run_on(fs: str, base: Path, bindir: Path, args, port: int):
    print(f"\n## {fs} ({base})", flush=True)
    plain = PlainServer(base, port)
    d = Daemon(base, bindir, args.config.replace("\\n", "\n"))
    try:
        status = d.status()
        print(f"{status.get('engine_version', '')}, clone strategy {status.get('clone_strategy', '')}, "
              f"{os.cpu_count()} cores", flush=True)
        rates, done = sustained(d, plain, args.cycles, args.rounds)
        base_rate = rates["template way (pgtestdb)"]
        print(f"\n1. sustained: {done['lease, isolation database']} sequential cycles per way "
              f"(get a copy, connect, `{QUERY}`, give it back), {args.rounds} alternating rounds")
        print("| way | copies/s | ms per cycle | vs template way |")
        print("|---|---:|---:|---:|")
        for name, r in rates.items():
            print(f"| {name} | {r:.1f} | {1000.0 / r:.0f} | {r / base_rate:.2f}x |")
        block = one_block(d, plain, args.cycles)
        print(f"\n1b. {args.cycles} consecutive cycles per way, no pause: lease (database) "
              f"{block['lease, isolation database']:.1f}/s, template way {block['template way (pgtestdb)']:.1f}/s: "
              f"{block['lease, isolation database'] / block['template way (pgtestdb)']:.2f}x")
        p50, p99, mx = handout(d, args.paced, args.paced_rate)
        print(f"\n2. hand-out (POST /v1/leases) at {args.paced_rate}/s, {args.paced} leases: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {mx:.1f} ms (target p99 <= 10 ms)")
        if args.tests:
            x = xdist(d, plain, base, args.tests, args.workers)
            print(f"\n3. pytest-xdist, -n {args.workers}, {args.tests} tests, one fresh copy each:")
            if "skipped" in x or "failed" in x:
                print("   " + (x.get("skipped") or x.get("failed")))
            else:
                print("| way | suite wall s | summed setup s | median setup ms | setups |")
                print("|---|---:|---:|---:|---:|")
                for name, (wall, setup, med, n) in x.items():
                    print(f"| {name} | {wall:.1f} | {setup:.1f} | {med:.0f} | {n} |")
                (lw, ls, _, _), (tw, ts, _, _) = x["lease (pytest-taidon)"], x["template way"]
                print(f"   ratio template/lease: wall {tw / lw:.2f}x, summed setup {ts / ls:.2f}x")
    finally:
        d.stop()
        plain.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--paced", type=int, default=100)
    ap.add_argument("--paced-rate", type=float, default=4.0)
    ap.add_argument("--tests", type=int, default=400)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    ap.add_argument("--no-xfs", action="store_true")
    ap.add_argument("--config", default="", help="more config.toml for the daemon, \\n for newlines")
    args = ap.parse_args()
    bindir = Path(args.bin).resolve()
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-"))
    os.chmod(root, 0o711)
    print(f"# leases vs the template way; bin {bindir}; {time.strftime('%Y-%m-%d %H:%M')}")
    xfs = None
    try:
        ext4 = root / "ext4"
        ext4.mkdir()
        os.chmod(ext4, 0o711)
        run_on("ext4", ext4, bindir, args, 55432)
        if not args.no_xfs:
            xfs = mount_xfs(root)
            if xfs is None:
                print("\n(reflink XFS skipped: needs root and mkfs.xfs)")
            else:
                run_on("reflink XFS", xfs, bindir, args, 55433)
    finally:
        if xfs is not None:
            subprocess.run(["umount", "-l", str(xfs)])
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
