#!/usr/bin/env python3
"""Gateway benchmarks of issue 12 (the gateway as a pooler), against the same PostgreSQL
instance in one run, next to PgBouncer.

What is measured (pgbench on the default tables, `pgbench -i -s 1`; `-S` select-only, -j 2):

  (a) pgbench -S -C -c 16 through the gateway with the DSN as handed out (`sqlrs --json dsn`:
      TLS, sslmode=verify-full, sslrootcert=<the home's CA>)           target >= 3x direct
  (b) pgbench -S -C -c 16 through the gateway, sslmode=disable         target >= 5x direct
  (c) pgbench -S -c 16, sslmode=disable          target >= PgBouncer's ratio and >= 0.75
  (d) pgbench -S -c 1, sslmode=disable                                 (no target; extra row)

  "Direct" is straight to the instance's PostgreSQL with its own credentials (SCRAM, no TLS),
  asked of the controller's resolve API. PgBouncer runs in session mode in front of the same
  instance; its client side is always auth_type=trust without TLS (in (a) too), so it pays
  neither a TLS handshake nor a SCRAM exchange per connection.

  For each workload, rounds alternate direct, gateway, PgBouncer, and the medians over rounds
  are compared (this machine's throughput drifts by 2x within a minute; a drift must hit every
  side alike). Every round is printed. For the -C workloads the script also counts, from the
  `client connected ... reused=true|false` lines of `taidon local`'s log, how many of the
  gateway's connections were served by a pooled backend session, and it prints the log lines
  of failed connections.

  Also kept from issue 4: hot Resolve latency (as the gateway timed it in-process, and over the
  controller's HTTP API), and the resident memory of a separate `taidon gateway` (its
  controller a stub in this script) holding 1,000 idle client connections: target < 64 MiB.

How: (a)-(d) run against `taidon local` in a fresh home (TAIDON_LOG=info) and an instance made
by `sqlrs prepare:psql`; the memory part starts its own server with max_connections=1100.
Everything lives in a temporary directory under /tmp (mode 0711, as PostgreSQL runs as
`postgres` when we are root), and the daemon, PgBouncer and the servers are stopped at the end.

Usage:
  cargo build --release --bins
  python3 bench/gateway.py [--seconds 8] [--rounds 5] [--idle 1000] [--bin target/release]
Needs pgbench, psycopg (pip install psycopg[binary]) and, for the reference column, pgbouncer
(apt-get install -y pgbouncer).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IDLE_TARGET_MIB = 64
BOUNCER_NOTE = "PgBouncer's client side: auth_type=trust, no TLS (in every row)"


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    clients: int
    connect_each: bool
    tls: bool  # the gateway is reached with the DSN as handed out (verify-full)
    target: float | None  # gateway / direct, at least
    beat_bouncer: bool = False  # and at least PgBouncer's ratio


WORKLOADS = [
    Workload("a", "-S -C -c 16, DSN as handed out (TLS)", 16, True, True, 3.0),
    Workload("b", "-S -C -c 16, sslmode=disable", 16, True, False, 5.0),
    Workload("c", "-S -c 16, sslmode=disable", 16, False, False, 0.75, beat_bouncer=True),
    Workload("d", "-S -c 1, sslmode=disable", 1, False, False, None),
]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin():
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return bins[-1].parent


def clean_env(**extra):
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PG") or k == "DATABASE_URL":
            del env[k]
    env.update(extra)
    return env


@dataclass
class Run:
    tps: float
    conn_ms: float | None  # pgbench's "average connection time" (-C runs)
    errors: list[str]  # pgbench's error lines; non-empty when a client aborted


def pgbench(conninfo: str, password: str | None, seconds: int, clients: int, connect_each: bool) -> Run:
    """One pgbench -S run against `conninfo` (a libpq URI or key=value string)."""
    env = clean_env(**({"PGPASSWORD": password} if password else {}))
    args = ["pgbench", "-n", "-S", "-T", str(seconds), "-c", str(clients), "-j", str(min(clients, 2))]
    if connect_each:
        args.append("-C")
    p = subprocess.run(args + [conninfo], capture_output=True, text=True, env=env)
    m = re.search(r"tps = ([0-9.]+) \(", p.stdout)
    c = re.search(r"average connection time = ([0-9.]+) ms", p.stdout)
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower() or "abort" in line.lower()]
    if p.returncode != 0 and not errors:
        errors = [f"pgbench exited {p.returncode}: {p.stderr.strip()[-300:]}"]
    return Run(float(m.group(1)) if m else 0.0, float(c.group(1)) if c else None, errors)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


class Local:
    """`taidon local` in a fresh home, through sqlrs."""

    def __init__(self, root: Path, bin_dir: Path):
        self.bin = bin_dir
        self.home = root / "home"
        # The log is read by offset (log_since): it must not rotate under the run.
        self.env = clean_env(SQLRS_HOME=str(self.home), TAIDON_BIN=str(bin_dir / "taidon"), TAIDON_LOG="info",
                             TAIDON_LOG_MAX_MB="0")
        self.log = self.home / "logs" / "taidon.log"

    def sqlrs(self, *args):
        return sh(str(self.bin / "sqlrs"), *args, env=self.env)

    def api(self, method, path, body=None):
        info = json.loads((self.home / "daemon.json").read_text())
        token = (self.home / "api.token").read_text().strip()
        host, port = info["api_url"].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port))
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        return conn, json.loads(conn.getresponse().read())

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int, until: int | None = None) -> str:
        with open(self.log, "rb") as f:
            f.seek(offset)
            data = f.read() if until is None else f.read(until - offset)
        return data.decode(errors="replace")

    def shutdown(self):
        subprocess.run([str(self.bin / "sqlrs"), "shutdown"], env=self.env, capture_output=True)


def start_pgbouncer(root: Path, host, port, user, password):
    """PgBouncer in session mode on a free port in front of host:port: (process, port), or None."""
    exe = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if not exe:
        print("*** PgBouncer is NOT INSTALLED (apt-get install -y pgbouncer): no reference column, and "
              "(c)'s 'at least PgBouncer's ratio' target cannot be judged ***")
        return None
    d = root / "pgbouncer"
    d.mkdir()
    listen = free_port()
    (d / "pgbouncer.ini").write_text(f"""[databases]
postgres = host={host} port={port} user={user} password={password}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {d}/users.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
""")
    (d / "users.txt").write_text(f'"{user}" "x"\n')
    cmd = [exe, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:
        shutil.chown(d, "postgres")
        for f in d.iterdir():
            shutil.chown(f, "postgres")
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
            return proc, str(listen)
        except OSError:
            time.sleep(0.05)
    stop(proc)
    print(f"*** PgBouncer ({exe}) did not start: no reference column; see {d}/pgbouncer.log ***")
    return None


def stop(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def conninfo(host, port, user):
    return f"host={host} port={port} user={user} dbname=postgres sslmode=disable"


@dataclass
class Pooling:
    """The gateway's `client connected` lines of some rounds."""
    connected: int = 0
    reused: int = 0
    failed: list[str] | None = None

    def add(self, log: str):
        for line in log.splitlines():
            if "client connected" in line:
                self.connected += 1
                self.reused += " reused=true" in line
            elif "connection failed" in line or " ERROR " in line or " WARN " in line:
                self.failed = (self.failed or []) + [line]

    def __str__(self):
        share = f" ({100.0 * self.reused / self.connected:.1f}%)" if self.connected else ""
        return f"{self.reused} of {self.connected} connections reused a pooled session{share}"


@dataclass
class Row:
    w: Workload
    direct: float
    gateway: float
    bouncer: float | None
    pooling: Pooling
    errors: list[str]


def throughput(local: Local, dsn: dict, d: tuple, bouncer, seconds: int, rounds: int) -> list[Row]:
    """Every workload, rounds alternating direct, gateway, PgBouncer; medians over rounds."""
    d_host, d_port, d_user, d_pw = d
    rows = []
    for w in WORKLOADS:
        print(f"({w.key}) pgbench {w.label}, {rounds} rounds of {seconds} s")
        sides = {"direct": [], "gateway": [], "pgbouncer": []}
        pooling = Pooling()
        errors = []
        for r in range(rounds):
            runs = {"direct": pgbench(conninfo(d_host, d_port, d_user), d_pw, seconds, w.clients, w.connect_each)}
            before = local.log_size()
            runs["gateway"] = pgbench(dsn["dsn"] if w.tls else dsn["dsn_plain"], None, seconds, w.clients,
                                      w.connect_each)
            time.sleep(0.2)  # the last sessions' log lines
            round_pool = Pooling()
            round_pool.add(local.log_since(before))
            if bouncer:
                runs["pgbouncer"] = pgbench(conninfo("127.0.0.1", bouncer[1], d_user), None, seconds, w.clients,
                                            w.connect_each)
            parts = []
            for side, run in runs.items():
                sides[side].append(run.tps)
                conn = f" ({run.conn_ms:.2f} ms/conn)" if run.conn_ms is not None else ""
                parts.append(f"{side} {run.tps:.0f} tps{conn}")
                errors += [f"round {r + 1}, {side}: {e}" for e in run.errors]
            pool_note = f"; gateway: {round_pool}" if w.connect_each else ""
            if round_pool.failed:
                pool_note += f"; {len(round_pool.failed)} failure line(s) in the gateway log"
            print(f"  round {r + 1}: " + ", ".join(parts) + pool_note, flush=True)
            pooling.connected += round_pool.connected
            pooling.reused += round_pool.reused
            if round_pool.failed:
                pooling.failed = (pooling.failed or []) + round_pool.failed
        rows.append(Row(w, statistics.median(sides["direct"]), statistics.median(sides["gateway"]),
                        statistics.median(sides["pgbouncer"]) if sides["pgbouncer"] else None, pooling, errors))
    return rows


def resolve_over_http(local: Local, sid, iid, calls=2000):
    """Resolve over HTTP, keep-alive, as a separate gateway process would ask it."""
    info = json.loads((local.home / "daemon.json").read_text())
    api_token = (local.home / "api.token").read_text().strip()
    host, port = info["api_url"].removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port))
    http_us = []
    body = json.dumps({"state_id": sid, "instance_id": iid, "scope": "rw"})
    rel = json.dumps({"instance_ids": [iid]})
    hdrs = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
    for _ in range(calls):
        t = time.perf_counter()
        c.request("POST", "/v1/resolve", body=body, headers=hdrs)
        c.getresponse().read()
        http_us.append((time.perf_counter() - t) * 1e6)
        c.request("POST", "/v1/release", body=rel, headers=hdrs)
        c.getresponse().read()
    return http_us


def against_local(root: Path, bin_dir: Path, seconds: int, rounds: int):
    local = Local(root, bin_dir)
    bouncer = None
    try:
        created = json.loads(local.sqlrs("--json", "prepare:psql", "--", "-c", "select 1").stdout)
        iid, sid = created["instance_id"], created["state_id"]
        dsn = json.loads(local.sqlrs("--json", "dsn", iid).stdout)
        if "sslmode=verify-full" not in dsn["dsn"] or not dsn.get("sslrootcert"):
            raise SystemExit(f"the handed-out DSN is not verify-full with a root certificate: {dsn['dsn']}")
        print(f"DSN as handed out: {redact(dsn['dsn'])}")
        sh("pgbench", "-i", "-s", "1", "-q", dsn["dsn_plain"], env=clean_env())
        _, target = local.api("POST", "/v1/resolve", {"state_id": sid, "instance_id": iid, "scope": "rw"})
        local.api("POST", "/v1/release", {"instance_ids": [iid]})
        d = (target["host"], target["port"], target["user"], target["password"])
        bouncer = start_pgbouncer(root, *d)
        rows = throughput(local, dsn, d, bouncer, seconds, rounds)
        # Resolve as the gateway timed it on every connection (the -C runs dominate).
        gw_us = [int(m) for m in re.findall(r"resolve_us=(\d+)", local.log.read_text(errors="replace"))]
        http_us = resolve_over_http(local, sid, iid)
        return rows, gw_us, http_us, bouncer is not None
    finally:
        if bouncer:
            stop(bouncer[0])
        local.shutdown()


def redact(dsn: str) -> str:
    return re.sub(r"sqlrs:[^@]*@", "sqlrs:<token>@", dsn)


class Stub(BaseHTTPRequestHandler):
    target = None

    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        if self.path == "/v1/resolve":
            body = json.dumps(dict(status="ready", **Stub.target)).encode()
        else:
            body = b"{}"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def idle_memory(root: Path, bin_dir: Path, idle: int):
    import psycopg  # noqa: F401  (pip install psycopg[binary])

    data = root / "pg"
    os.chmod(root, 0o711)
    # initdb (as postgres) creates the data directory here.
    shutil.chown(root, "postgres", "postgres")
    pw = "bench-password"
    (root / "pw").write_text(pw)
    shutil.chown(root / "pw", "postgres")
    sh("runuser", "-u", "postgres", "--", str(pg_bin() / "initdb"), "-D", str(data), "-U", "postgres",
       "--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={root / 'pw'}")
    port = free_port()
    sock = root / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres")
    server = subprocess.Popen(
        [str(pg_bin() / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
         "-c", "listen_addresses=127.0.0.1", "-c", f"max_connections={idle + 100}", "-c", "fsync=off"],
        user="postgres", group="postgres", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    home = root / "gwhome"
    home.mkdir()
    gw = None
    stub = None
    try:
        for _ in range(100):
            if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        Stub.target = {"instance_id": "00" * 8, "host": "127.0.0.1", "port": port, "user": "postgres", "password": pw}
        stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        secret = os.urandom(32)
        (home / "api.token").write_text("stub")
        (home / "keyset.json").write_text(json.dumps({
            "audience": "bench", "current": "hs-bench",
            "keys": [{"kid": "hs-bench", "alg": "HS256", "secret_hex": secret.hex()}]}))
        gw_port = free_port()
        gw = subprocess.Popen([str(bin_dir / "taidon"), "gateway", "--home", str(home), "--no-tls",
                               "--controller", f"http://127.0.0.1:{stub.server_address[1]}",
                               "--listen", f"127.0.0.1:{gw_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, TAIDON_LOG="warn"))
        token = hs256({"sid": "00" * 32, "iid": "00" * 8, "exp": int(time.time()) + 3600,
                       "iat": int(time.time()), "aud": "bench", "scope": "rw", "sub": "bench"}, secret)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", gw_port)).close()
                break
            except OSError:
                time.sleep(0.1)
        rss_before = rss_kib(gw.pid)
        conns = []
        for _ in range(idle):
            conns.append(psycopg.connect(host="127.0.0.1", port=gw_port, user="sqlrs", password=token,
                                         dbname="postgres", sslmode="disable", autocommit=True))
        conns[0].execute("select 1")
        time.sleep(1)
        rss = rss_kib(gw.pid)
        for c in conns:
            c.close()
        return rss_before, rss
    finally:
        if gw:
            stop(gw)
        if stub:
            stub.shutdown()
        stop(server)


def b64(b: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256(claims: dict, secret: bytes) -> str:
    import hashlib
    import hmac
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "hs-bench"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def verdict(row: Row) -> tuple[str, str]:
    """(target text, PASS/MISS) of a row."""
    w = row.w
    if w.target is None:
        return "-", ""
    ratio = row.gateway / row.direct
    if not w.beat_bouncer:
        return f">= {w.target:.2f}", "PASS" if ratio >= w.target else "MISS"
    if row.bouncer is None:
        return f">= {w.target:.2f}, >= PgB", ("PASS" if ratio >= w.target else "MISS") + " (PgB not judged)"
    need = max(w.target, row.bouncer / row.direct)
    return f">= {w.target:.2f}, >= PgB", "PASS" if ratio >= need else "MISS"


def report(rows: list[Row], have_bouncer: bool):
    print()
    head = (f"{'workload (pgbench, median tps)':<40}{'direct':>9}{'gateway':>9}{'ratio':>7}  {'target':<17}"
            f"{'':<6}{'PgBouncer':>10}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for row in rows:
        target, mark = verdict(row)
        ref = f"{row.bouncer:>10.0f}{row.bouncer / row.direct:>7.2f}" if row.bouncer is not None else f"{'-':>10}{'-':>7}"
        print(f"({row.w.key}) {row.w.label:<36}{row.direct:>9.0f}{row.gateway:>9.0f}"
              f"{row.gateway / row.direct:>7.2f}  {target:<17}{mark:<6}{ref}")
    print("(" + (BOUNCER_NOTE if have_bouncer else "PgBouncer not installed: no reference column") + ")")
    for row in rows:
        if row.w.connect_each:
            print(f"({row.w.key}) gateway pool: {row.pooling}")
    for row in rows:
        for e in row.errors[:5]:
            print(f"({row.w.key}) pgbench error: {e}")
        if len(row.errors) > 5:
            print(f"({row.w.key}) ... {len(row.errors) - 5} more pgbench error lines")
        for line in (row.pooling.failed or [])[:5]:
            print(f"({row.w.key}) gateway log: {line}")
        if row.pooling.failed and len(row.pooling.failed) > 5:
            print(f"({row.w.key}) ... {len(row.pooling.failed) - 5} more failure lines in the gateway log")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=8, help="length of each pgbench run")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per workload (medians are compared)")
    ap.add_argument("--idle", type=int, default=1000, help="idle client connections for the memory figure")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release", help="directory with taidon and sqlrs")
    args = ap.parse_args()
    bin_dir = args.bin.resolve()
    for exe in ("taidon", "sqlrs"):
        if not (bin_dir / exe).exists():
            raise SystemExit(f"no {bin_dir / exe}: build first (cargo build --release --bins) or pass --bin")
    root = Path(tempfile.mkdtemp(prefix="taidon-gwbench-"))
    os.chmod(root, 0o711)
    try:
        (root / "a").mkdir()
        rows, gw_us, http_us, have_bouncer = against_local(root / "a", bin_dir, args.seconds, args.rounds)
        (root / "b").mkdir()
        before, rss = idle_memory(root / "b", bin_dir, args.idle)
        report(rows, have_bouncer)
        mib = rss / 1024
        print(f"taidon gateway RSS: {before / 1024:.1f} MiB at start, {mib:.1f} MiB with {args.idle} idle "
              f"client connections (target < {IDLE_TARGET_MIB} MiB): {'PASS' if mib < IDLE_TARGET_MIB else 'MISS'}")
        if gw_us:
            print(f"Hot Resolve in-process (gateway's own timing, {len(gw_us)} connections): "
                  f"p50 {pct(gw_us, 50)} us, p99 {pct(gw_us, 99)} us")
        print(f"Hot Resolve over HTTP keep-alive ({len(http_us)} calls): "
              f"p50 {pct(http_us, 50):.0f} us, p99 {pct(http_us, 99):.0f} us")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
