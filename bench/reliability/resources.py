#!/usr/bin/env python3
"""Issue-16 resource bounds: the memory of the controller and of the gateway with 100 instances
known and 1,000 idle client connections, run apart (`taidon controller` + `taidon gateway`) so
each has its own figure; and the same in one `taidon local`.

For each mode:
  1. --instances instances of one small state are made (POST /v1/instances), all running.
  2. RSS (VmRSS) of each process: at rest, then with --clients idle client connections through
     the gateway (psycopg, asyncio; spread over the instances, each holding its session open and
     idle), then after they close. Peak VmHWM too.
  3. Every connection is checked to work (one `select 1` each) before it idles.

Targets (stated in README, Observability): with 100 instances and 1,000 idle clients the
controller stays under 128 MiB RSS and the gateway under 128 MiB; `taidon local` (both) under
256 MiB. The script prints PASS or FAIL per figure and exits 1 on a FAIL.

Usage: python3 bench/reliability/resources.py [--instances 100] [--clients 1000] [--bin target/release]
"""

import argparse
import asyncio
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from load import clean_env, free_port  # the load script beside this one

ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS_MIB = {"controller": 128, "gateway": 128, "local": 256}


def rss_mib(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Api:
    def __init__(self, home: Path):
        info = json.loads((home / "daemon.json").read_text())
        self.host, port = info["api_url"].removeprefix("http://").split(":")
        self.port = int(port)
        self.token = (home / "api.token").read_text().strip()

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if resp.status >= 300:
            raise SystemExit(f"{method} {path}: {resp.status} {data[:300]!r}")
        return data


def wait_file(path: Path, proc, log: Path):
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def start(cmd, log: Path, env):
    f = open(log, "ab")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, start_new_session=True)


async def hold_clients(dsns, n):
    """Opens n connections spread over dsns, checks each, and returns them open and idle."""
    sem = asyncio.Semaphore(32)

    async def one(i):
        async with sem:
            conn = await psycopg.AsyncConnection.connect(dsns[i % len(dsns)], autocommit=True)
            cur = await conn.execute("select 1")
            assert (await cur.fetchone())[0] == 1
            return conn

    return await asyncio.gather(*(one(i) for i in range(n)))


async def close_all(conns):
    await asyncio.gather(*(c.close() for c in conns))


def measure(label, procs, dsns, clients):
    """RSS of each process at rest, with `clients` idle connections, and after; figures."""
    rest = {name: rss_mib(p.pid) for name, p in procs.items()}
    loop = asyncio.new_event_loop()
    t0 = time.monotonic()
    conns = loop.run_until_complete(hold_clients(dsns, clients))
    opened_s = time.monotonic() - t0
    time.sleep(2)
    held = {name: rss_mib(p.pid) for name, p in procs.items()}
    loop.run_until_complete(close_all(conns))
    loop.close()
    time.sleep(3)
    after = {name: rss_mib(p.pid) for name, p in procs.items()}
    peak = {name: rss_mib(p.pid, "VmHWM") for name, p in procs.items()}
    print(f"{label}: {clients} idle clients opened and checked in {opened_s:.1f} s")
    failed = False
    for name in procs:
        per_client_kib = (held[name] - rest[name]) * 1024 / clients
        ok = peak[name] < TARGETS_MIB[name]
        failed |= not ok
        print(f"  {name:10} RSS at rest {rest[name]:6.1f} MiB, with the clients {held[name]:6.1f} MiB "
              f"({per_client_kib:5.1f} KiB a client), after {after[name]:6.1f} MiB, peak {peak[name]:6.1f} MiB"
              f"   target < {TARGETS_MIB[name]} MiB: {'PASS' if ok else 'FAIL'}")
    return failed


def make_instances(api: Api, bin_dir: Path, env, n, states=4):
    """`n` running instances over `states` states (the controller limits connections per state
    to 500), and their DSNs."""
    dsns = []
    t0 = time.monotonic()
    for k in range(states):
        made = json.loads(subprocess.run([str(bin_dir / "sqlrs"), "--json", "prepare:psql", "--", "-c",
                                          f"create table t{k}(x int)"], check=True, capture_output=True,
                                         text=True, env=env).stdout)
        dsns.append(made["dsn"])
        for _ in range(n // states - 1 + (1 if k < n % states else 0)):
            info = json.loads(api.call("POST", "/v1/instances", {"state": made["state_id"]}))
            dsns.append(info["dsn"])
    print(f"{len(dsns)} instances of {states} states in {time.monotonic() - t0:.1f} s")
    # The handed-out DSNs verify the home's CA; the clients here go plain (no TLS cost).
    return [d.split("?")[0] + "?sslmode=disable" for d in dsns]


def config(home: Path, n):
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        f"[instances]\nmax = {n + 8}\nmemory_budget_mb = {(n + 8) * 128}\nidle_timeout_s = 3600\n")


def run_apart(root: Path, bin_dir: Path, n, clients):
    home = root / "apart"
    config(home, n)
    gw_port = free_port()
    env = clean_env(SQLRS_HOME=str(home), TAIDON_BIN=str(bin_dir / "taidon"), TAIDON_LOG="warn")
    ctl = start([str(bin_dir / "taidon"), "controller", "--home", str(home), "--gateway-addr", f"127.0.0.1:{gw_port}"],
                root / "controller.log", env)
    gw = None
    try:
        wait_file(home / "daemon.json", ctl, root / "controller.log")
        api = Api(home)
        gw = start([str(bin_dir / "taidon"), "gateway", "--home", str(home), "--controller",
                    f"http://{api.host}:{api.port}", "--listen", f"127.0.0.1:{gw_port}"], root / "gateway.log", env)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", gw_port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        dsns = make_instances(api, bin_dir, env, n)
        return measure("controller and gateway apart", {"controller": ctl, "gateway": gw}, dsns, clients)
    finally:
        for p in (gw, ctl):
            if p:
                p.terminate()
                p.wait(timeout=60)
        # A controller that stops leaves its instances running for the next one: stop them.
        stop_servers(home)


def stop_servers(home: Path):
    """Stops the postgres servers whose data is under `home` (SIGQUIT to each postmaster)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/postgres") and b"-D" in args:
            data = args[args.index(b"-D") + 1].decode(errors="replace")
            if data.startswith(str(home)):
                try:
                    os.kill(int(proc.name), 3)
                except ProcessLookupError:
                    pass


def run_local(root: Path, bin_dir: Path, n, clients):
    home = root / "local"
    config(home, n)
    env = clean_env(SQLRS_HOME=str(home), TAIDON_BIN=str(bin_dir / "taidon"), TAIDON_LOG="warn")
    daemon = start([str(bin_dir / "taidon"), "local", "--home", str(home)], root / "local.log", env)
    try:
        wait_file(home / "daemon.json", daemon, root / "local.log")
        dsns = make_instances(Api(home), bin_dir, env, n)
        return measure("taidon local (both in one process)", {"local": daemon}, dsns, clients)
    finally:
        subprocess.run([str(bin_dir / "sqlrs"), "shutdown"], env=env, capture_output=True)
        daemon.wait(timeout=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    args = ap.parse_args()
    bin_dir = Path(args.bin).resolve()
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-resources-"))
    os.chmod(root, 0o711)
    try:
        failed = run_apart(root, bin_dir, args.instances, args.clients)
        failed |= run_local(root, bin_dir, args.instances, args.clients)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
