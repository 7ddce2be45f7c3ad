#!/usr/bin/env python3
"""Issue 16, parts 1 and 2: load through the gateway, with faults, and nothing lost.

Per scenario, a fresh home (under a temporary directory, mode 0711) and fresh servers:

  none             `taidon local`, no fault
  kill-daemon      `taidon local` SIGKILLed mid-run, started again (it adopts its instances)
  kill-controller  standalone `taidon controller` + `taidon gateway`; the controller is
                   SIGKILLed mid-run and started again after --outage-s
  kill-postmaster  `taidon local`; one random rw instance's postmaster is SIGKILLed
  stop-controller  standalone controller + gateway; the controller is SIGSTOPped for
                   --outage-s (10) seconds, then SIGCONTed

Load: --states states (one `create table t(id uuid primary key, client int, n int)` step and a
`select <k>` step that makes each id distinct), --rw-per-state rw instances each, with
--clients-per-rw clients on each, plus --ro-per-state clients per state on the state's shared
read-only instance (`sqlrs dsn STATE --scope ro`). Half the rw clients keep one session, half
connect for each transaction (so connect latency has samples); every --tls-every-th client
connects with the DSN as handed out (TLS, verify-full), the rest with `dsn_plain`. An rw client
inserts 1-3 rows with client-made uuids per transaction and records an id as committed only
after COMMIT returned; an error during COMMIT makes its ids "unknown". ro clients count rows and
look up a random id.

Afterwards every rw instance is read through the gateway: committed ids missing, or ids present
that were never committed (nor unknown), are failures. Errors are classed expected (inside the
fault's window: from the fault until recovery plus --grace-s, and for kill-postmaster only on
the killed instance) or unexpected; any unexpected error fails the run. For stop-controller,
every connection attempt must end (either way) within the gateway's bounded Resolve wait
(handshake_timeout, 10 s, crates/gateway/src/lib.rs) plus --bound-margin-s.

Usage (cargo build --release -p taidon -p sqlrs first):
  python3 bench/reliability/load.py --scenario all --bin target/release
  python3 bench/reliability/load.py --scenario none --states 50 --rw-per-state 2 \
      --clients-per-rw 4 --ro-per-state 2 --seconds 60        # the issue's 500 connections
Exit status 1 if any check fails.
"""

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent.parent
SCENARIOS = ["none", "kill-daemon", "kill-controller", "kill-postmaster", "stop-controller"]
# The gateway's bounded wait for one Resolve (GatewayConfig::handshake_timeout).
RESOLVE_BOUND_S = 10.0
KNOWN_MESSAGES = [
    (re.compile(r"starting up|not reachable right now"), "57P03"),
    (re.compile(r"too many connections"), "53300"),
    (re.compile(r"terminating connection|server closed the connection|connection .*closed|"
                r"consuming input failed|EOF|lost synchronization"), "08006"),
    (re.compile(r"Connection refused|connection refused"), "08001-refused"),
]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in ("DATABASE_URL", "SQLRS_SERVER", "SQLRS_TOKEN")}
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def postmaster_of(iid):
    """The pid of the postmaster whose data directory names the instance id."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(b"postgres") or b"-D" not in args:
            continue
        i = args.index(b"-D")
        if i + 1 < len(args) and iid.encode() in args[i + 1]:
            return int(p)
    return None


class Servers:
    """`taidon local`, or a standalone controller and gateway, on one home."""

    def __init__(self, root: Path, bin_dir: Path, split: bool, args):
        self.root, self.bin, self.split = root, bin_dir, split
        self.home = root / "home"
        self.home.mkdir(mode=0o711)
        n_inst = args.states * (args.rw_per_state + 1) + 8
        (self.home / "config.toml").write_text(
            "[instances]\n"
            f"max = {n_inst}\n"
            f"memory_budget_mb = {n_inst * 128}\n"
            "idle_timeout_s = 3600\n"
            "[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n")
        self.env = clean_env(SQLRS_HOME=str(self.home), TAIDON_BIN=str(bin_dir / "taidon"),
                             TAIDON_LOG="info")
        self.gw_port = free_port()
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.local = self.controller = self.gateway = None
        self.starts = 0

    def _spawn(self, name, argv):
        self.starts += 1
        log = open(self.root / f"{name}.log", "ab")
        log.write(f"==== start {self.starts} at {time.time():.3f}: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                                start_new_session=True)

    def _wait_daemon_json(self, proc, name):
        deadline = time.monotonic() + 120
        while not (self.home / "daemon.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log_tail(name)}")
            time.sleep(0.05)

    def _wait_port(self, port, proc, name):
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} does not listen on {port}: {self.log_tail(name)}")
                time.sleep(0.05)

    def log_tail(self, name, n=3000):
        try:
            text = (self.root / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        # A connection's success is one line each: only the rest tells what went wrong.
        return "".join(l for l in text.splitlines(keepends=True) if "client connected" not in l)[-n:]

    def start(self):
        self.start_controller()
        if self.split:
            self.start_gateway()

    def start_controller(self):
        (self.home / "daemon.json").unlink(missing_ok=True)
        if self.split:
            self.controller = self._spawn("controller", [
                str(self.bin / "taidon"), "controller", "--home", str(self.home),
                "--gateway-addr", f"127.0.0.1:{self.gw_port}",
                "--api-listen", f"127.0.0.1:{self.api_port}"])
            self._wait_daemon_json(self.controller, "controller")
        else:
            self.local = self._spawn("local", [
                str(self.bin / "taidon"), "local", "--home", str(self.home),
                "--gateway-listen", f"127.0.0.1:{self.gw_port}"])
            self._wait_daemon_json(self.local, "local")
            self._wait_port(self.gw_port, self.local, "local")

    def start_gateway(self):
        url = json.loads((self.home / "daemon.json").read_text())["api_url"]
        self.gateway = self._spawn("gateway", [
            str(self.bin / "taidon"), "gateway", "--home", str(self.home), "--controller", url,
            "--listen", f"127.0.0.1:{self.gw_port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}"])
        self._wait_port(self.gw_port, self.gateway, "gateway")

    def handshake_buckets(self):
        """The gateway's taidon_gateway_handshake_seconds histogram: {le: cumulative count}."""
        import urllib.request
        try:
            if self.split:
                req = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics")
            else:
                url = json.loads((self.home / "daemon.json").read_text())["api_url"]
                token = (self.home / "api.token").read_text().strip()
                req = urllib.request.Request(url.rstrip("/") + "/metrics",
                                             headers={"Authorization": f"Bearer {token}"})
            body = urllib.request.urlopen(req, timeout=10).read().decode()
        except Exception:  # noqa: BLE001 - a figure, not a check
            return None
        out = {}
        for m in re.finditer(r'^taidon_gateway_handshake_seconds_bucket\{le="([^"]+)"\} (\S+)', body, re.M):
            out[float(m.group(1))] = float(m.group(2))
        return out or None

    def gateway_pid(self):
        p = self.gateway if self.split else self.local
        return p.pid if p and p.poll() is None else None

    def controller_pid(self):
        p = self.controller if self.split else None
        return p.pid if p and p.poll() is None else None

    def daemon_proc(self):
        return self.controller if self.split else self.local

    def sqlrs(self, *args):
        p = subprocess.run([str(self.bin / "sqlrs"), *args], capture_output=True, text=True,
                           env=self.env, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"sqlrs {' '.join(args)}: exit {p.returncode}: {p.stderr[-2000:]}")
        return p.stdout

    def stop(self):
        procs = [p for p in (self.gateway, self.controller, self.local) if p and p.poll() is None]
        if self.gateway and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGINT)
        try:
            subprocess.run([str(self.bin / "sqlrs"), "shutdown"], env=self.env, capture_output=True,
                           timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Servers the daemon left (a split controller leaves its instances by design).
        for _ in range(2):
            left = []
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                except OSError:
                    continue
                if args and args[0].endswith(b"postgres") and b"-D" in args:
                    i = args.index(b"-D")
                    if i + 1 < len(args) and args[i + 1].startswith(str(self.root).encode()):
                        left.append(int(pid))
            for pid in left:
                try:
                    os.kill(pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
            if not left:
                break
            time.sleep(2)


@dataclass
class Target:
    state: str
    iid: str | None  # None for the ro target of a state
    dsn_plain: str
    dsn_tls: str
    acked: set = field(default_factory=set)
    unknown: set = field(default_factory=set)
    attempted: set = field(default_factory=set)


@dataclass
class Attempt:
    t0: float
    secs: float
    ok: bool
    target: str


@dataclass
class Err:
    t: float
    cls: str
    phase: str  # connect, insert, commit, read
    target: str
    msg: str


class Run:
    def __init__(self, scenario, args):
        self.scenario, self.args = scenario, args
        self.attempts: list[Attempt] = []
        self.errors: list[Err] = []
        self.commits = 0
        self.reads = 0
        self.stop = False
        self.fault_t = None          # when the fault was injected
        self.fault_end_t = None      # when the fault was undone (restart, SIGCONT)
        self.recovered_t = None      # first successful new connection after fault_end_t
        self.victim = None           # kill-postmaster: the instance id
        self.notes: list[str] = []
        self.rss_gw = 0
        self.rss_ctl = 0
        self.start_t = time.monotonic()

    def classify(self, e: Exception):
        code = getattr(e, "sqlstate", None)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not code:
            for rx, c in KNOWN_MESSAGES:
                if rx.search(str(e)):
                    code = c
                    break
        return code or type(e).__name__, msg[:160]

    def record_error(self, e, phase, target):
        cls, msg = self.classify(e)
        self.errors.append(Err(time.monotonic(), cls, phase, target, msg))

    async def connect(self, t: Target, tls: bool):
        t0 = time.monotonic()
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(t.dsn_tls if tls else t.dsn_plain, autocommit=True),
                timeout=self.args.hang_s)
        except Exception as e:  # noqa: BLE001 - every failure is a figure
            self.attempts.append(Attempt(t0, time.monotonic() - t0, False, t.iid or t.state))
            if isinstance(e, asyncio.TimeoutError):
                e = RuntimeError(f"connect hung for {self.args.hang_s} s")
            self.record_error(e, "connect", t.iid or t.state)
            return None
        now = time.monotonic()
        self.attempts.append(Attempt(t0, now - t0, True, t.iid or t.state))
        if (self.fault_end_t is not None and self.recovered_t is None and t0 >= self.fault_end_t
                and (self.victim is None or t.iid == self.victim)):
            self.recovered_t = now
        return conn

    async def rw_client(self, cid: int, t: Target, long_session: bool, tls: bool):
        conn = None
        n = 0
        while not self.stop:
            if conn is None:
                conn = await self.connect(t, tls)
                if conn is None:
                    await asyncio.sleep(0.2 + random.random() * 0.3)
                    continue
            ids = [uuid.uuid4() for _ in range(random.randint(1, 3))]
            phase = "insert"
            try:
                await conn.execute("begin")
                for i in ids:
                    t.attempted.add(i)
                    n += 1
                    await conn.execute("insert into t(id, client, n) values (%s, %s, %s)", (i, cid, n))
                phase = "commit"
                await conn.execute("commit")
                t.acked.update(ids)
                self.commits += 1
            except Exception as e:  # noqa: BLE001
                if phase == "commit":
                    t.unknown.update(ids)
                self.record_error(e, phase, t.iid)
                await close_quietly(conn)
                conn = None
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            if not long_session:
                await close_quietly(conn)
                conn = None
            await asyncio.sleep(self.args.think_ms / 1000 * random.random() * 2)
        await close_quietly(conn)

    async def ro_client(self, t: Target, rw: Target, tls: bool):
        conn = None
        while not self.stop:
            if conn is None:
                conn = await self.connect(t, tls)
                if conn is None:
                    await asyncio.sleep(0.2 + random.random() * 0.3)
                    continue
            try:
                await (await conn.execute("select count(*) from t")).fetchone()
                # A snapshot's table is empty (writes go to rw instances): a lookup of an id
                # from an rw instance exercises the index and must find nothing.
                probe = next(iter(rw.acked), uuid.uuid4())
                row = await (await conn.execute("select count(*) from t where id = %s", (probe,))).fetchone()
                if row[0] != 0:
                    self.errors.append(Err(time.monotonic(), "RO-SAW-RW-ROW", "read", t.state, str(probe)))
                self.reads += 1
            except Exception as e:  # noqa: BLE001
                self.record_error(e, "read", t.state)
                await close_quietly(conn)
                conn = None
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            await asyncio.sleep(self.args.think_ms / 1000 * random.random() * 2)
        await close_quietly(conn)


async def close_quietly(conn):
    if conn is not None:
        try:
            await asyncio.wait_for(conn.close(), timeout=5)
        except Exception:  # noqa: BLE001
            pass


def setup_targets(srv: Servers, args):
    """States and their instances; DSNs of each."""
    def make_state(k):
        base = ["--json", "prepare:psql", "--",
                "-c", "create table t(id uuid primary key, client int, n int)", "-c", f"select {k}"]
        rws = []
        sid = None
        for _ in range(args.rw_per_state):
            made = json.loads(srv.sqlrs(*base))
            sid = made.get("state_id") or sid
            iid = made["instance_id"]
            d = json.loads(srv.sqlrs("--json", "dsn", iid))
            rws.append(Target(sid, iid, d["dsn_plain"], d["dsn"]))
        ro = None
        if args.ro_per_state:
            d = json.loads(srv.sqlrs("--json", "dsn", sid, "--scope", "ro"))
            ro = Target(sid, None, d["dsn_plain"], d["dsn"])
        return rws, ro

    with ThreadPoolExecutor(max_workers=args.setup_parallel) as ex:
        states = list(ex.map(make_state, range(args.states)))
    # The first ro connection starts the state's shared ro instance: done here, not in the
    # load, so that start is not counted as connect latency.
    for _, ro in states:
        if ro:
            with psycopg.connect(ro.dsn_plain, connect_timeout=120) as c:
                c.execute("select 1")
    return states


async def sampler(run: Run, srv: Servers):
    while not run.stop:
        g, c = srv.gateway_pid(), srv.controller_pid()
        if g:
            run.rss_gw = max(run.rss_gw, rss_kib(g) or 0)
        if c:
            run.rss_ctl = max(run.rss_ctl, rss_kib(c) or 0)
        await asyncio.sleep(1)


async def inject(run: Run, srv: Servers, rws: list[Target], args):
    await asyncio.sleep(args.seconds * args.fault_at)
    loop = asyncio.get_running_loop()
    sc = run.scenario
    if sc == "kill-daemon":
        run.notes.append(f"SIGKILL taidon local pid {srv.local.pid}")
        run.fault_t = time.monotonic()
        srv.local.send_signal(signal.SIGKILL)
        await loop.run_in_executor(None, srv.local.wait)
        await asyncio.sleep(args.outage_s)
        run.fault_end_t = time.monotonic()
        await loop.run_in_executor(None, srv.start_controller)
        run.notes.append(f"taidon local restarted in {time.monotonic() - run.fault_end_t:.2f} s")
    elif sc == "kill-controller":
        run.notes.append(f"SIGKILL taidon controller pid {srv.controller.pid}")
        run.fault_t = time.monotonic()
        srv.controller.send_signal(signal.SIGKILL)
        await loop.run_in_executor(None, srv.controller.wait)
        await asyncio.sleep(args.outage_s)
        run.fault_end_t = time.monotonic()
        await loop.run_in_executor(None, srv.start_controller)
        run.notes.append(f"controller restarted in {time.monotonic() - run.fault_end_t:.2f} s")
    elif sc == "kill-postmaster":
        victim = random.choice(rws)
        pid = postmaster_of(victim.iid)
        if pid is None:
            run.errors.append(Err(time.monotonic(), "SETUP", "fault", victim.iid, "no postmaster found"))
            return
        run.victim = victim.iid
        run.notes.append(f"SIGKILL postmaster pid {pid} of instance {victim.iid}")
        run.fault_t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        run.fault_end_t = run.fault_t
    elif sc == "stop-controller":
        run.notes.append(f"SIGSTOP controller pid {srv.controller.pid} for {args.outage_s} s")
        run.fault_t = time.monotonic()
        srv.controller.send_signal(signal.SIGSTOP)
        await asyncio.sleep(args.outage_s)
        srv.controller.send_signal(signal.SIGCONT)
        run.fault_end_t = time.monotonic()


async def drive(run: Run, srv: Servers, states, args):
    tasks = []
    cid = 0
    rws = [t for rw, _ in states for t in rw]
    for rw, ro in states:
        for t in rw:
            for j in range(args.clients_per_rw):
                cid += 1
                tasks.append(asyncio.create_task(
                    run.rw_client(cid, t, long_session=(cid % 2 == 0), tls=(cid % args.tls_every == 0))))
        if ro:
            for j in range(args.ro_per_state):
                cid += 1
                tasks.append(asyncio.create_task(run.ro_client(ro, rw[j % len(rw)], tls=(cid % args.tls_every == 0))))
    loop = asyncio.get_running_loop()
    run.hs_before = await loop.run_in_executor(None, srv.handshake_buckets)
    cpu0 = os.times()
    samp = asyncio.create_task(sampler(run, srv))
    start = run.start_t = time.monotonic()
    fault = asyncio.create_task(inject(run, srv, rws, args)) if run.scenario != "none" else None
    await asyncio.sleep(args.seconds)
    if fault:
        await fault
        # The load goes on until recovery (or a bound), so recovery is measured under load.
        deadline = time.monotonic() + args.recovery_timeout_s
        while run.recovered_t is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if run.recovered_t is None:
            run.notes.append(f"no successful new connection within {args.recovery_timeout_s} s of the fault's end")
        else:
            await asyncio.sleep(max(0.0, run.recovered_t + args.grace_s + 2 - time.monotonic()))
    run.elapsed = time.monotonic() - start
    cpu1 = os.times()
    run.client_cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / run.elapsed
    run.hs_after = await loop.run_in_executor(None, srv.handshake_buckets)
    run.stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    samp.cancel()
    return len(tasks)


async def verify(rws: list[Target], args):
    """Every acknowledged id is there; nothing that was not committed (or unknown) is."""
    out = {"instances": 0, "rows": 0, "missing": 0, "phantom": 0, "unknown_present": 0,
           "unknown_absent": 0, "unreadable": 0, "details": []}
    for t in rws:
        ids = None
        deadline = time.monotonic() + 60
        last = None
        while time.monotonic() < deadline:
            try:
                conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(t.dsn_plain, autocommit=True), 30)
                ids = {r[0] for r in await (await conn.execute("select id from t")).fetchall()}
                await conn.close()
                break
            except Exception as e:  # noqa: BLE001
                last = e
                await asyncio.sleep(1)
        out["instances"] += 1
        if ids is None:
            out["unreadable"] += 1
            out["details"].append(f"instance {t.iid}: cannot read: {last}")
            continue
        out["rows"] += len(ids)
        missing = t.acked - ids
        phantom = ids - t.acked - t.unknown
        out["missing"] += len(missing)
        out["phantom"] += len(phantom)
        out["unknown_present"] += len(t.unknown & ids)
        out["unknown_absent"] += len(t.unknown - ids)
        if missing:
            out["details"].append(f"instance {t.iid}: {len(missing)} committed ids missing, e.g. {next(iter(missing))}")
        if phantom:
            never = phantom - t.attempted
            out["details"].append(f"instance {t.iid}: {len(phantom)} ids present but not committed"
                                  f" ({len(never)} never attempted), e.g. {next(iter(phantom))}")
    return out


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def scenario(name, args, bin_dir):
    root = Path(tempfile.mkdtemp(prefix=f"taidon-load-{name}-"))
    os.chmod(root, 0o711)
    split = name in ("kill-controller", "stop-controller")
    srv = Servers(root, bin_dir, split, args)
    res = {"scenario": name, "ok": False, "failures": []}
    try:
        srv.start()
        t0 = time.monotonic()
        states = setup_targets(srv, args)
        setup_s = time.monotonic() - t0
        rws = [t for rw, _ in states for t in rw]
        run = Run(name, args)
        clients = asyncio.run(drive(run, srv, states, args))
        ver = asyncio.run(verify(rws, args))
        res.update(evaluate(run, ver, args, clients, setup_s, len(states), len(rws)))
        print_block(res)
        if not res["ok"]:
            for n in ("local", "controller", "gateway"):
                tail = srv.log_tail(n, 4000)
                if tail:
                    print(f"--- end of {n}.log ---\n{tail}")
    except Exception as e:  # noqa: BLE001
        res["failures"].append(f"{type(e).__name__}: {e}")
        print(f"== {name}: FAILED: {e}")
        for n in ("local", "controller", "gateway"):
            tail = srv.log_tail(n, 3000)
            if tail:
                print(f"--- end of {n}.log ---\n{tail}")
    finally:
        srv.stop()
        if args.keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return res


def evaluate(run: Run, ver, args, clients, setup_s, n_states, n_rw):
    sc = run.scenario
    f = {"clients": clients, "states": n_states, "rw_instances": n_rw, "setup_s": setup_s,
         "elapsed_s": run.elapsed, "commits": run.commits, "reads": run.reads,
         "connects": len(run.attempts), "connects_ok": sum(a.ok for a in run.attempts)}
    ok_lat = [a.secs * 1000 for a in run.attempts if a.ok]
    f["p50_ms"], f["p99_ms"] = pct(ok_lat, 0.5), pct(ok_lat, 0.99)
    f["max_connect_s"] = max((a.secs for a in run.attempts), default=0.0)
    ref = run.fault_t if run.fault_t is not None else run.start_t
    f["longest"] = [f"{a.secs:.2f} s at t{'+' if a.t0 >= ref else '-'}{abs(a.t0 - ref):.1f} s "
                    f"({'fault' if run.fault_t is not None else 'load start'}) {'ok' if a.ok else 'failed'} {a.target}"
                    for a in sorted(run.attempts, key=lambda a: -a.secs)[:3]]
    f["rss_gw_mib"], f["rss_ctl_mib"] = run.rss_gw / 1024, run.rss_ctl / 1024
    f["verify"] = ver
    f["notes"] = run.notes
    f["client_cpu"] = run.client_cpu
    a, b = run.hs_after, run.hs_before
    f["gw_p50_ms"] = f["gw_p99_ms"] = None
    if a:
        since = "load"
        if b and sum(b.values()) <= sum(a.values()) and all(a.get(k, 0) >= v for k, v in b.items()):
            a = {k: v - b.get(k, 0) for k, v in a.items()}
        else:
            since = "the restart"
        total = a.get(float("inf"), max(a.values()))
        def q(p):
            for le in sorted(a):
                if a[le] >= p * total:
                    return le * 1000
            return float("nan")
        if total:
            f["gw_p50_ms"], f["gw_p99_ms"], f["gw_since"], f["gw_n"] = q(0.5), q(0.99), since, int(total)
    failures = []
    # The fault's window: from the fault until recovery (or the fault's end, whichever is
    # later) plus the grace for clients that were mid-backoff.
    win = None
    if run.fault_t is not None:
        end = max(filter(None, [run.fault_end_t, run.recovered_t])) + args.grace_s
        win = (run.fault_t - 0.05, end)

    def expected(e: Err):
        if win is None or not (win[0] <= e.t <= win[1]):
            return False
        if sc == "kill-postmaster":
            return e.target == run.victim
        if sc in ("kill-controller", "stop-controller"):
            # Sessions already open keep working while the controller is away, and after it
            # is back (it adopts the servers as they run): only new connections may fail.
            return e.phase == "connect" or args.lenient
        return True

    by_class = {}
    for e in run.errors:
        k = ("expected" if expected(e) else "UNEXPECTED", e.cls, e.phase)
        by_class.setdefault(k, [0, e.msg])[0] += 1
    f["errors"] = by_class
    unexpected = sum(v[0] for k, v in by_class.items() if k[0] == "UNEXPECTED")
    f["errors_expected"] = sum(v[0] for k, v in by_class.items() if k[0] == "expected")
    f["errors_unexpected"] = unexpected
    if unexpected:
        failures.append(f"{unexpected} unexpected errors")
    if run.fault_t is not None:
        f["recovery_s"] = (run.recovered_t - run.fault_t) if run.recovered_t else None
        if run.recovered_t is None:
            failures.append("no recovery: no new connection succeeded after the fault")
        f["57P03_in_window"] = sum(1 for e in run.errors if e.cls == "57P03" and win[0] <= e.t <= win[1])
        f["sessions_cut_on_return"] = sum(
            1 for e in run.errors if e.phase != "connect" and run.fault_end_t and e.t >= run.fault_end_t
            and e.t <= win[1])
        f["sessions_cut_while_away"] = sum(
            1 for e in run.errors if e.phase != "connect" and run.fault_t <= e.t < (run.fault_end_t or 0))
        during = [a for a in run.attempts if run.fault_t <= a.t0 <= (run.fault_end_t or run.fault_t)]
        f["connects_during_fault"] = len(during)
        f["connects_ok_during_fault"] = sum(a.ok for a in during)
        f["longest_connect_in_fault_s"] = max((a.secs for a in during), default=0.0)
    if sc == "stop-controller":
        bound = RESOLVE_BOUND_S + args.bound_margin_s
        if f["max_connect_s"] > bound:
            failures.append(f"a connect attempt took {f['max_connect_s']:.1f} s > {bound:.0f} s (bounded wait)")
    if f["max_connect_s"] >= args.hang_s:
        failures.append(f"a connect attempt hung for {args.hang_s} s")
    if ver["missing"] or ver["phantom"] or ver["unreadable"]:
        failures.append(f"verify: {ver['missing']} committed ids missing, {ver['phantom']} phantom ids, "
                        f"{ver['unreadable']} instances unreadable")
    if run.commits == 0:
        failures.append("no commits at all")
    f["failures"] = failures
    f["ok"] = not failures
    return f


def print_block(r):
    v = r["verify"]
    print(f"== {r['scenario']}: {'ok' if r['ok'] else 'FAILED'}")
    print(f"  {r['clients']} clients over {r['states']} states ({r['rw_instances']} rw instances); "
          f"setup {r['setup_s']:.1f} s; load {r['elapsed_s']:.1f} s")
    print(f"  connections {r['connects']} ({r['connects_ok']} ok)  commits {r['commits']}  reads {r['reads']}")
    print(f"  connect latency through the gateway: p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
          f"longest attempt {r['max_connect_s']:.2f} s")
    print(f"  client process CPU: {r['client_cpu'] * 100:.0f}% of a core (its latency includes its own waits)")
    if r["gw_p50_ms"] is not None:
        print(f"  gateway's own handshake histogram (accept -> first ReadyForQuery, {r['gw_n']} since {r['gw_since']}, "
              f"bucket upper bounds): p50 <= {r['gw_p50_ms']:.1f} ms  p99 <= {r['gw_p99_ms']:.1f} ms")
    print(f"  peak RSS: gateway {r['rss_gw_mib']:.1f} MiB" +
          (f"  controller {r['rss_ctl_mib']:.1f} MiB" if r['rss_ctl_mib'] else " (taidon local: controller + gateway)"))
    print(f"  longest connect attempts: {'; '.join(r['longest'])}")
    for n in r["notes"]:
        print(f"  fault: {n}")
    if "recovery_s" in r:
        rec = f"{r['recovery_s']:.2f} s" if r["recovery_s"] is not None else "never"
        print(f"  recovery (fault -> first new connection ok): {rec};  57P03 in the window: {r['57P03_in_window']};"
              f"  connects started during the fault: {r['connects_during_fault']} "
              f"({r['connects_ok_during_fault']} ok, longest {r['longest_connect_in_fault_s']:.2f} s)")
    if "sessions_cut_on_return" in r:
        print(f"  open sessions ended while the fault lasted: {r['sessions_cut_while_away']};"
              f"  after it was undone (restart/SIGCONT): {r['sessions_cut_on_return']}")
    print(f"  errors: {r['errors_expected']} expected, {r['errors_unexpected']} unexpected")
    for (kind, cls, phase), (n, msg) in sorted(r["errors"].items(), key=lambda kv: -kv[1][0]):
        print(f"    {kind:10} {cls:14} {phase:8} {n:6}  e.g. {msg}")
    print(f"  verify: {v['instances']} instances, {v['rows']} rows; committed missing {v['missing']}, "
          f"phantom {v['phantom']}, commit-unknown {v['unknown_present']} present / {v['unknown_absent']} absent")
    for d in v["details"][:10]:
        print(f"    {d}")
    for fl in r["failures"]:
        print(f"  FAILURE: {fl}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="all", choices=SCENARIOS + ["all"])
    ap.add_argument("--states", type=int, default=10)
    ap.add_argument("--rw-per-state", type=int, default=2)
    ap.add_argument("--clients-per-rw", type=int, default=2)
    ap.add_argument("--ro-per-state", type=int, default=1, help="ro clients per state (0: no ro instance)")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--fault-at", type=float, default=0.4, help="fraction of --seconds when the fault hits")
    ap.add_argument("--outage-s", type=float, default=10, help="SIGSTOP length, or time before a restart")
    ap.add_argument("--think-ms", type=float, default=20, help="mean pause between a client's transactions")
    ap.add_argument("--tls-every", type=int, default=4, help="every n-th client uses the TLS DSN")
    ap.add_argument("--grace-s", type=float, default=3.0)
    ap.add_argument("--bound-margin-s", type=float, default=3.0)
    ap.add_argument("--hang-s", type=float, default=60.0, help="a connect attempt this long is a hang")
    ap.add_argument("--recovery-timeout-s", type=float, default=60.0)
    ap.add_argument("--setup-parallel", type=int, default=2)
    ap.add_argument("--lenient", action="store_true",
                    help="count any error in a controller fault's window as expected")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    args = ap.parse_args()
    bin_dir = Path(args.bin).resolve()
    names = SCENARIOS if args.scenario == "all" else [args.scenario]
    results = [scenario(n, args, bin_dir) for n in names]
    print()
    print("| scenario | clients | connections | commits | errors exp./unexp. | p50 / p99 connect ms | "
          "gateway p50 / p99 ms | gateway RSS MiB | controller RSS MiB | recovery s | 57P03 | longest connect s | lost / phantom | result |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if "verify" not in r:
            print(f"| {r['scenario']} | | | | | | | | | | | | | FAILED: {'; '.join(r['failures'])} |")
            continue
        rec = r.get("recovery_s")
        gw = "" if r["gw_p50_ms"] is None else f"{r['gw_p50_ms']:.1f} / {r['gw_p99_ms']:.1f}"
        print(f"| {r['scenario']} | {r['clients']} | {r['connects']} | {r['commits']} | "
              f"{r['errors_expected']} / {r['errors_unexpected']} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
              f"{gw} | "
              f"{r['rss_gw_mib']:.0f} | {r['rss_ctl_mib']:.0f} | "
              f"{'' if 'recovery_s' not in r else ('never' if rec is None else f'{rec:.1f}')} | "
              f"{r.get('57P03_in_window', '')} | {r['max_connect_s']:.2f} | "
              f"{r['verify']['missing']} / {r['verify']['phantom']} | {'ok' if r['ok'] else 'FAILED'} |")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
