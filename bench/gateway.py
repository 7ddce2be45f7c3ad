#!/usr/bin/env python3
"""Issue-4 gateway benchmarks, each pair measured side by side in one run against the same
PostgreSQL instance (read the ratios: the machine is noisy).

  1. pgbench select-only (-S), 1 and 16 clients: through the gateway vs straight to the server
  2. pgbench -S -C (a new connection per transaction): gateway vs direct
  3. Hot Resolve latency p50/p99: as the gateway measured it on every connection of (2)
     (in-process, `taidon local`), and over the controller's HTTP API (what `taidon gateway`
     pays when it runs apart)
  4. resident memory of a `taidon gateway` process holding 1,000 idle client sessions
  (1-2 also run through PgBouncer, session pooling, in front of the same instance when it is
  installed: a reference for what a userspace proxy costs on this machine)

(1)-(3) run against `taidon local` and an instance made by `sqlrs prepare`; the direct runs use
the instance's own address and credentials (asked of the controller's resolve API). (4) runs a
separate `taidon gateway` whose controller is a stub in this script, in front of a server this
script starts with max_connections=1100.

Usage: python3 bench/gateway.py [--seconds N] [--idle N]   (build first: cargo build --release --bins)
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
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin():
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return bins[-1].parent


def tps(out: str) -> float:
    m = re.search(r"tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)", out)
    return float(m.group(1))


def pgbench(host, port, user, password, seconds, clients, connect_each, sslmode="disable"):
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE=sslmode)
    args = ["pgbench", "-n", "-S", "-T", str(seconds), "-c", str(clients), "-j", str(min(clients, 2)),
            "-h", host, "-p", str(port), "-U", user]
    if connect_each:
        args.append("-C")
    return tps(sh(*args, "postgres", env=env).stdout)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


class Local:
    """`taidon local` in a fresh home, through sqlrs."""

    def __init__(self, root: Path):
        self.home = root / "home"
        self.env = dict(os.environ, SQLRS_HOME=str(self.home), TAIDON_BIN=str(BIN / "taidon"),
                        TAIDON_LOG="info")
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL"):
            self.env.pop(k, None)

    def sqlrs(self, *args):
        return sh(str(BIN / "sqlrs"), *args, env=self.env)

    def api(self, method, path, body=None):
        info = json.loads((self.home / "daemon.json").read_text())
        token = (self.home / "api.token").read_text().strip()
        host, port = info["api_url"].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port))
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        return conn, json.loads(conn.getresponse().read())

    def shutdown(self):
        subprocess.run([str(BIN / "sqlrs"), "shutdown"], env=self.env, capture_output=True)


def start_pgbouncer(root: Path, host, port, user, password):
    """PgBouncer in session mode on a free port in front of host:port, or None if not installed."""
    exe = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if not exe:
        print("(pgbouncer not installed: no reference column)")
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
    proc.terminate()
    print("(pgbouncer did not start: no reference column)")
    return None


def throughput_and_resolve(root: Path, seconds: int):
    local = Local(root)
    try:
        created = json.loads(local.sqlrs("--json", "prepare:psql", "--", "-c", "select 1").stdout)
        iid, sid = created["instance_id"], created["state_id"]
        dsn = json.loads(local.sqlrs("--json", "dsn", iid).stdout)
        token = dsn["dsn_plain"].split("sqlrs:", 1)[1].split("@", 1)[0]
        gw_host, gw_port = (local.home / "gateway.addr").read_text().strip().rsplit(":", 1)
        env = dict(os.environ, PGPASSWORD=token)
        sh("pgbench", "-i", "-s", "1", "-q", "-h", gw_host, "-p", gw_port, "-U", "sqlrs", "postgres", env=env)
        conn, answer = local.api("POST", "/v1/resolve", {"state_id": sid, "instance_id": iid, "scope": "rw"})
        target = answer
        local.api("POST", "/v1/release", {"instance_ids": [iid]})
        d_host, d_port, d_user, d_pw = target["host"], target["port"], target["user"], target["password"]

        # Rounds alternate direct and gateway, and the medians are compared: this machine's
        # throughput drifts by 2x over a minute, and a drift must hit both sides alike.
        # PgBouncer (session pooling, like the gateway) in front of the same instance, as a
        # reference for what a userspace proxy costs on this machine.
        bouncer = start_pgbouncer(root, d_host, d_port, d_user, d_pw)
        rows = []
        rounds = 5
        per_round = max(2, seconds // 2)
        for clients, each in ((1, False), (16, False), (4, True)):
            directs, vias, bounced = [], [], []
            for _ in range(rounds):
                directs.append(pgbench(d_host, d_port, d_user, d_pw, per_round, clients, each))
                vias.append(pgbench(gw_host, gw_port, "sqlrs", token, per_round, clients, each))
                if bouncer:
                    bounced.append(pgbench("127.0.0.1", bouncer[1], d_user, "x", per_round, clients, each))
            label = f"pgbench -S -c {clients}" + (" -C" if each else "")
            rows.append((label, statistics.median(directs), statistics.median(vias),
                         statistics.median(bounced) if bounced else None))
        if bouncer:
            bouncer[0].terminate()
            bouncer[0].wait()

        # Resolve as the gateway saw it on every connection (the -C runs dominate).
        log = (local.home / "logs" / "taidon.log").read_text(errors="replace")
        gw_us = [int(m) for m in re.findall(r"resolve_us=(\d+)", log)]
        # Resolve over HTTP, keep-alive, as a separate gateway process would ask it.
        info = json.loads((local.home / "daemon.json").read_text())
        api_token = (local.home / "api.token").read_text().strip()
        host, port = info["api_url"].removeprefix("http://").split(":")
        c = http.client.HTTPConnection(host, int(port))
        http_us = []
        body = json.dumps({"state_id": sid, "instance_id": iid, "scope": "rw"})
        rel = json.dumps({"instance_ids": [iid]})
        hdrs = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
        for _ in range(2000):
            t = time.perf_counter()
            c.request("POST", "/v1/resolve", body=body, headers=hdrs)
            c.getresponse().read()
            http_us.append((time.perf_counter() - t) * 1e6)
            c.request("POST", "/v1/release", body=rel, headers=hdrs)
            c.getresponse().read()
        return rows, gw_us, http_us
    finally:
        local.shutdown()


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


def idle_memory(root: Path, idle: int):
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
        gw = subprocess.Popen([str(BIN / "taidon"), "gateway", "--home", str(home), "--no-tls",
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
            gw.terminate()
            gw.wait()
        if stub:
            stub.shutdown()
        server.terminate()
        server.wait()


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--idle", type=int, default=1000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="taidon-gwbench-"))
    os.chmod(root, 0o711)
    try:
        (root / "a").mkdir()
        rows, gw_us, http_us = throughput_and_resolve(root / "a", args.seconds)
        print(f"{'workload':<24}{'direct tps':>12}{'gateway tps':>13}{'ratio':>8}  target   {'pgbouncer tps':>14}{'ratio':>8}")
        targets = {"pgbench -S -c 1": 0.90, "pgbench -S -c 16": 0.90, "pgbench -S -c 4 -C": 0.70}
        for label, direct, via, bounced in rows:
            ref = f"{bounced:>14.0f}{bounced / direct:>8.2f}" if bounced else ""
            print(f"{label:<24}{direct:>12.0f}{via:>13.0f}{via / direct:>8.2f}  >= {targets[label]:.2f}  {ref}")
        if gw_us:
            print(f"Hot Resolve in-process (gateway's own timing, {len(gw_us)} connections): "
                  f"p50 {pct(gw_us, 50)} us, p99 {pct(gw_us, 99)} us")
        print(f"Hot Resolve over HTTP keep-alive ({len(http_us)} calls): "
              f"p50 {pct(http_us, 50):.0f} us, p99 {pct(http_us, 99):.0f} us")
        (root / "b").mkdir()
        before, rss = idle_memory(root / "b", args.idle)
        print(f"taidon gateway RSS: {before / 1024:.1f} MiB at start, {rss / 1024:.1f} MiB with "
              f"{args.idle} idle sessions (target < 64 MiB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
