#!/usr/bin/env python3
"""Issue-9 benchmark: a cache hit from a client on another host against a shared server, vs
the same cache hit against the local daemon (`taidon local`), side by side in one run.

Hosts are network namespaces joined by a bridge (as root): the controller on one, a
standalone gateway on another, the client on a third. Each round is
`sqlrs prepare:psql -f schema.sql -f seed.sql run:psql -- -c 'select count(*) from t'`: a
cached state, a new instance (the standby pool's hand-out), psql through the gateway, the
instance removed. Rounds alternate remote and local; medians.

Usage: sudo python3 bench/remote.py [--runs N]   (builds the release binaries)
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
PREFIX = "10.251.7"
API, GW = 8443, 6432


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


class Net:
    def __init__(self, hosts):
        self.hosts = hosts
        self.bridge = "tbbench"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i, h in enumerate(hosts):
            ns = f"taidon-bench-{h}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"tbo{i}", "type", "veth", "peer", "name", f"tbi{i}")
            sh("ip", "link", "set", f"tbi{i}", "netns", ns)
            sh("ip", "link", "set", f"tbo{i}", "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{PREFIX}.{i + 1}/24", "dev", f"tbi{i}")
            sh("ip", "-n", ns, "link", "set", f"tbi{i}", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def addr(self, h):
        return f"{PREFIX}.{self.hosts.index(h) + 1}"

    def cmd(self, h, *args):
        return ["ip", "netns", "exec", f"taidon-bench-{h}", *args]

    def close(self):
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", f"taidon-bench-{h}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def wait_port(net, host, addr, port):
    deadline = time.time() + 60
    while time.time() < deadline:
        r = subprocess.run(net.cmd(host, "bash", "-c", f"exec 3<>/dev/tcp/{addr}/{port}"),
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"{addr}:{port} did not open")


def timed(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = (time.perf_counter() - t) * 1000
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    sh("cargo", "build", "--release", "-q", "--bins", cwd=ROOT)
    root = Path(tempfile.mkdtemp(prefix="taidon-bench-remote-"))
    os.chmod(root, 0o711)
    work = root / "work"
    work.mkdir()
    (work / "schema.sql").write_text("create table t (x int);\n")
    (work / "seed.sql").write_text("insert into t select generate_series(1, 10000);\n")
    net = Net(["ctl", "gw", "cli"])
    procs = []
    try:
        home = root / "server-home"
        ctl_log = open(root / "controller.log", "w")
        procs.append(subprocess.Popen(net.cmd(
            "ctl", str(BIN / "taidon"), "controller", "--home", str(home),
            "--api-listen", f"{net.addr('ctl')}:{API}", "--gateway-addr", f"{net.addr('gw')}:{GW}",
            "--instance-host", net.addr("ctl")), stdout=ctl_log, stderr=ctl_log))
        wait_port(net, "cli", net.addr("ctl"), API)
        gw_token = sh(str(BIN / "taidon"), "token", "create", "--home", str(home), "--sub", "gw",
                      "--gateway").stdout.strip()
        (root / "gw.token").write_text(gw_token)
        user = sh(str(BIN / "taidon"), "token", "create", "--home", str(home), "--sub",
                  "bench").stdout.strip()
        gw_log = open(root / "gateway.log", "w")
        procs.append(subprocess.Popen(net.cmd(
            "gw", str(BIN / "taidon"), "gateway", "--controller",
            f"https://{net.addr('ctl')}:{API}", "--ca", str(home / "tls" / "ca.pem"),
            "--token-file", str(root / "gw.token"), "--home", str(root / "gw-home"),
            "--listen", f"{net.addr('gw')}:{GW}"), stdout=gw_log, stderr=gw_log))
        wait_port(net, "cli", net.addr("gw"), GW)

        prepare = ["prepare:psql", "-f", "schema.sql", "-f", "seed.sql", "run:psql", "--",
                   "-c", "select count(*) from t"]
        remote_env = dict(os.environ, SQLRS_SERVER=f"https://{net.addr('ctl')}:{API}",
                          SQLRS_TOKEN=user, SQLRS_CA=str(home / "tls" / "ca.pem"),
                          SQLRS_HOME=str(root / "client-home"),
                          SQLRS_CACHE_DIR=str(root / "cache-remote"))
        remote = net.cmd("cli", str(BIN / "sqlrs"), "--ca", str(home / "tls" / "ca.pem"), *prepare)
        local_env = dict(os.environ, SQLRS_HOME=str(root / "local-home"),
                         TAIDON_BIN=str(BIN / "taidon"), SQLRS_CACHE_DIR=str(root / "cache-local"))
        local = [str(BIN / "sqlrs"), *prepare]
        # Build once on each side, and let each standby pool fill.
        timed(remote, cwd=work, env=remote_env)
        timed(local, cwd=work, env=local_env)
        for _ in range(3):
            timed(remote, cwd=work, env=remote_env)
            timed(local, cwd=work, env=local_env)
        time.sleep(2)
        r, l = [], []
        for i in range(args.runs):
            pair = [(remote, remote_env, r), (local, local_env, l)]
            if i % 2:
                pair.reverse()
            for cmd, env, out in pair:
                out.append(timed(cmd, cwd=work, env=env))
                time.sleep(0.5)
        mr, ml = statistics.median(r), statistics.median(l)
        print(f"runs: {args.runs} each, alternating; {ROOT.name} release build\n")
        print("| cache hit (prepare, instance hand-out, psql through the gateway, rm) | median | p90 |")
        print("|---|---:|---:|")
        q = lambda xs: sorted(xs)[int(len(xs) * 0.9) - 1]
        print(f"| local (`taidon local`, same host) | {ml:.0f} ms | {q(l):.0f} ms |")
        print(f"| remote (client, gateway and controller on three hosts, TLS API) | {mr:.0f} ms | {q(r):.0f} ms |")
        print(f"\nremote / local: {mr / ml:.2f}x (target <= 1.5x)")
    finally:
        subprocess.run([str(BIN / "sqlrs"), "shutdown"], env=dict(os.environ,
                       SQLRS_HOME=str(root / "local-home")), capture_output=True)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
        # The controller leaves its instances running for the next one: stop those of its home.
        for pid_dir in Path("/proc").iterdir():
            try:
                cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
            if cmdline.startswith("/") and "postgres -D " + str(home) in cmdline:
                try:
                    os.kill(int(pid_dir.name), 15)
                except (OSError, ValueError):
                    pass
        net.close()
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
