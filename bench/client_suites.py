#!/usr/bin/env python3
"""Issue 12: client libraries' own test suites, run straight at an instance and through the
gateway, and every test whose outcome differs listed with its first error line.

The run:
  1. starts `taidon local` in a fresh home under /tmp through `sqlrs` (as bench/gateway.py
     does), makes an instance with `sqlrs prepare:psql -- -c 'select 1'`, mints a DSN for it
     and asks the controller for the instance's own address and credentials (POST
     /v1/resolve, held while the direct run lasts so the instance is not idle, then released);
  2. gives each run a database of its own on that instance (`<suite>_direct`,
     `<suite>_gateway`), so what one run leaves behind cannot fail the other;
  3. runs each suite twice against that instance: direct (the instance's host, port, user and
     password) and through the gateway (user `sqlrs`, the token as the password), both with
     sslmode=disable, every test file in its own process group with a timeout;
  4. prints both runs' counts and each test that passed one way and not the other;
     `--json FILE` writes every outcome.

Suites (their code never enters this repository: the script takes the path of a checkout or of
a bare git directory, exports it into a temporary directory and installs its dependencies
there from the package registry):

  --node-postgres PATH   brianc/node-postgres: packages/pg/test/integration/**/*-tests.js, pure
                         JavaScript (pg-native is not installed), one `node` process a file, as
                         its `make test-integration` runs them. pg's dependencies (pg-protocol,
                         pg-pool, ...) come from npm at the versions packages/pg/package.json
                         asks for. A small preloaded hook records each test's outcome and,
                         where the suite's Suite class would exit at a file's first failure,
                         goes on with the file's next test, so one difference does not hide
                         the next (a test that hangs still ends its file). The SCRAM tests
                         run with the run's own login (CI makes a `scram_test` role, which
                         the gateway cannot log in as).
  --psycopg PATH         psycopg/psycopg: its tests/ with `pytest --test-dsn DSN`, psycopg
                         installed from that checkout (pure Python implementation) into a
                         virtualenv; per-test outcomes from pytest's JUnit XML.

Usage (build first: cargo build --release --bins):
  python3 bench/client_suites.py --node-postgres ~/src/node-postgres [--psycopg ~/src/psycopg]
      [--bin target/release] [--timeout 120] [--only PATTERN] [--json results.json]
"""

import argparse
import fnmatch
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PASS, FAIL, SKIP, TIMEOUT, NOT_RUN = "pass", "fail", "skip", "timeout", "not run"


def sh(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


@dataclass
class Target:
    """Where a run connects: the instance itself, or the gateway in front of it."""

    name: str
    host: str
    port: int
    user: str
    password: str

    def libpq_env(self, dbname: str) -> dict:
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password, "PGDATABASE": dbname, "PGSSLMODE": "disable"}

    def dsn(self, dbname: str) -> str:
        return (f"host={self.host} port={self.port} user={self.user} password={self.password} "
                f"dbname={dbname} sslmode=disable")


@dataclass
class Outcome:
    status: str
    error: str = ""


@dataclass
class Run:
    """One suite's outcomes against one target: per file, and per test where it has tests."""

    files: dict[str, Outcome] = field(default_factory=dict)
    tests: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0


def clean_env() -> dict:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PG") or k in ("DATABASE_URL", "SQLRS_HOME"):
            del env[k]
    return env


def run_group(args, cwd, env, timeout) -> tuple[int | None, str]:
    """Runs `args` in a process group of its own; on timeout the whole group is killed and
    the exit code is None."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        out = ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if code is None:
        out, _ = proc.communicate()
    return code, out


def export_source(src: Path, dest: Path, subdir: str | None = None):
    """Copies a checkout or a bare git directory's HEAD (only `subdir` when given) to `dest`."""
    dest.mkdir(parents=True)
    bare = (src / "HEAD").is_file() and (src / "objects").is_dir()
    if bare or (src / ".git").exists():
        git = ["git", f"--git-dir={src}"] if bare else ["git", "-C", str(src)]
        archive = subprocess.run(git + ["archive", "HEAD"] + ([subdir] if subdir else []),
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return sh(*git, "rev-parse", "--short", "HEAD").stdout.strip()
    shutil.copytree(src / subdir if subdir else src, dest / subdir if subdir else dest,
                    dirs_exist_ok=True, ignore=shutil.ignore_patterns("node_modules", ".venv", "__pycache__"))
    return "working tree"


def first_error_line(text: str) -> str:
    """The most telling line of a failure's output: an error's first line, else the last line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    markers = ("Error", "error:", "Message:", "AssertionError", "E   ", "did not complete")
    for line in lines:
        if any(m in line for m in markers) and not line.startswith("at "):
            return line[:240]
    return lines[-1][:240] if lines else ""


# --- node-postgres -------------------------------------------------------------------------

# Preloaded into each test file's process. It reports each Suite test's outcome as a JSON line
# to $TAIDON_SUITE_REPORT; hands the Suite no error, so that it goes on with the next test
# where it would exit; ends the file a second after its last test once one failed (a failed
# test may leave a connection open that would keep Node alive); and leaves out the tests
# named in $TAIDON_SKIP_TESTS, so a file that died inside a test can be run again from the
# test after it.
NODE_HOOK = r"""
'use strict'
const fs = require('fs')
const out = fs.openSync(process.env.TAIDON_SUITE_REPORT, 'a')
const emit = (o) => fs.writeSync(out, JSON.stringify(o) + '\n')
const summary = (e) => {
  const text = String((e && (e.stack || e.message)) || e)
  return text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('at ')).slice(0, 3).join(' | ').slice(0, 300)
}
const skip = new Set(JSON.parse(process.env.TAIDON_SKIP_TESTS || '[]'))
let failed = false
const Suite = require(process.env.TAIDON_SUITE_JS)
const test = Suite.prototype.test
Suite.prototype.test = function (name, cb) {
  if (!skip.has(name)) test.call(this, name, cb)
}
const run = Suite.prototype.run
Suite.prototype.run = function (test, cb) {
  if (!test.action) {
    emit({ test: test.name, status: 'skip' })
    return run.call(this, test, cb)
  }
  emit({ test: test.name, status: 'start' })
  const queue = this._queue
  const testRun = test.run
  test.run = function (done) {
    return testRun.call(this, (err) => {
      emit({ test: test.name, status: err ? 'fail' : 'pass', error: err ? summary(err) : '' })
      failed = failed || !!err
      done()
      if (failed) setTimeout(() => queue.idle() && process.exit(1), 1000).unref()
    })
  }
  return run.call(this, test, cb)
}
process.on('uncaughtException', (e) => emit({ uncaught: summary(e) }))
process.on('unhandledRejection', (e) => emit({ uncaught: summary(e) }))
"""


class NodePostgres:
    name = "node-postgres"
    short = "nodepg"

    def __init__(self, src: Path):
        self.src = src

    def prepare(self, work: Path) -> str:
        """Exports packages/pg and installs what its integration tests require; returns the
        source's revision."""
        self.dir = work / self.short
        rev = export_source(self.src, self.dir, "packages/pg")
        self.pg = self.dir / "packages" / "pg"
        meta = json.loads((self.pg / "package.json").read_text())
        wanted = dict(meta["dependencies"])
        # The devDependencies the integration tests require (not vitest, wrangler, typescript).
        for name in ("async", "bluebird", "co", "pg-copy-streams"):
            wanted[name] = meta["devDependencies"][name]
        # Installed at the export's root: Node finds them from packages/pg by walking up.
        (self.dir / "package.json").write_text('{"private": true}\n')
        sh("npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--ignore-scripts",
           "--legacy-peer-deps", *[f"{n}@{v}" for n, v in sorted(wanted.items())], cwd=self.dir)
        self.hook = self.dir / "taidon-report-hook.js"
        self.hook.write_text(NODE_HOOK)
        return rev

    def files(self) -> list[str]:
        base = self.pg / "test" / "integration"
        return sorted(str(p.relative_to(self.pg)) for p in base.rglob("*-tests.js"))

    def run(self, target: Target, dbname: str, timeout: float, only: str | None, log) -> Run:
        result = Run()
        start = time.monotonic()
        env = clean_env() | target.libpq_env(dbname) | {
            "SCRAM_TEST_PGUSER": target.user, "SCRAM_TEST_PGPASSWORD": target.password,
            "TAIDON_SUITE_JS": str(self.pg / "test" / "suite.js"),
            "TAIDON_SUITE_REPORT": str(self.dir / f"report-{target.name}.jsonl"),
        }
        for f in self.files():
            if only and not any(fnmatch.fnmatch(f, g) for g in only.split(",")):
                continue
            result.files[f] = self.run_file(f, env, timeout, result.tests)
            o = result.files[f]
            log(f"  {target.name:8} {o.status:8} {f}" + (f"  ({o.error})" if o.error else ""))
        result.seconds = time.monotonic() - start
        return result

    def run_file(self, f: str, env: dict, timeout: float, tests: dict[str, Outcome]) -> Outcome:
        """Runs one test file, its tests' outcomes into `tests`; a run that dies inside a test
        is run again without the tests done so far, until one gets to the end."""
        report = Path(env["TAIDON_SUITE_REPORT"])
        done: list[str] = []
        crash = None
        for _ in range(50):
            report.write_text("")
            code, out = run_group(["node", "-r", str(self.hook), f], self.pg,
                                  env | {"TAIDON_SKIP_TESTS": json.dumps(done)}, timeout)
            events = [json.loads(l) for l in report.read_text().splitlines() if l.strip()]
            uncaught = next((e["uncaught"] for e in events if "uncaught" in e), "")
            running = None
            for e in (e for e in events if "test" in e):
                if e["status"] == "start":
                    running = e["test"]
                else:
                    tests[f"{f} :: {e['test']}"] = Outcome(e["status"], e.get("error", ""))
                    done.append(e["test"])
                    running = None
            if code is None:
                why = Outcome(TIMEOUT, f"no exit after {timeout:.0f} s; {first_error_line(out)}")
            elif code != 0 and (running is not None or not any(
                    o.status == FAIL for k, o in tests.items() if k.startswith(f"{f} :: "))):
                why = Outcome(FAIL, uncaught or first_error_line(out) or f"exit {code}")
            else:
                why = None
            crash = crash or why
            if running is None or why is None:
                break
            # Died (or hung) inside `running`: that test failed; the rest are run again.
            tests[f"{f} :: {running}"] = Outcome(why.status, why.error)
            done.append(running)
        if crash:
            return crash
        failed = [o.error for k, o in tests.items() if k.startswith(f"{f} :: ") and o.status == FAIL]
        return Outcome(FAIL, failed[0]) if failed else Outcome(PASS)


# --- psycopg 3 -----------------------------------------------------------------------------


class Psycopg:
    name = "psycopg"
    short = "psycopg"

    def __init__(self, src: Path):
        self.src = src

    def prepare(self, work: Path) -> str:
        """Exports the repository and makes a virtualenv with psycopg (pure Python, from the
        export) and its test requirements."""
        self.dir = work / self.short
        rev = export_source(self.src, self.dir)
        venv = work / "psycopg-venv"
        sh(sys.executable, "-m", "venv", str(venv))
        self.python = venv / "bin" / "python"
        # Not editable, as its CI installs it: the tests run from the repository's root, whose
        # psycopg/ folder would otherwise shadow an editable install.
        sh(str(self.python), "-m", "pip", "install", "-q", f"{self.dir / 'psycopg'}[test]",
           str(self.dir / "psycopg_pool"), cwd=self.dir)
        return rev

    def files(self) -> list[str]:
        tests = self.dir / "tests"
        return sorted(str(p.relative_to(self.dir)) for p in tests.rglob("test_*.py"))

    def run(self, target: Target, dbname: str, timeout: float, only: str | None, log) -> Run:
        result = Run()
        start = time.monotonic()
        env = clean_env() | {"PSYCOPG_IMPL": "python"}
        for f in self.files():
            if only and not any(fnmatch.fnmatch(f, g) for g in only.split(",")):
                continue
            xml = self.dir / f"junit-{target.name}.xml"
            xml.unlink(missing_ok=True)
            code, out = run_group(
                # pytest-randomly off: both runs take the tests in the same order. The mypy
                # tests type-check examples without a server and take minutes each.
                [str(self.python), "-m", "pytest", f, "-q", "-p", "no:randomly", "-m", "not mypy",
                 f"--junitxml={xml}", "--test-dsn", target.dsn(dbname)],
                self.dir, env, timeout)
            tests = parse_junit(xml) if xml.exists() else {}
            for name, o in tests.items():
                result.tests[f"{f} :: {name}"] = o
            if code in (0, 5):  # 5: nothing collected (every test deselected)
                outcome = Outcome(PASS)
            elif code is None:
                outcome = Outcome(TIMEOUT, f"no exit after {timeout:.0f} s")
            else:
                failed = [o.error for o in tests.values() if o.status == FAIL]
                outcome = Outcome(FAIL, failed[0] if failed else first_error_line(out))
            result.files[f] = outcome
            counts = {s: sum(o.status == s for o in tests.values()) for s in (PASS, FAIL, SKIP)}
            log(f"  {target.name:8} {outcome.status:8} {f}  {counts}")
        result.seconds = time.monotonic() - start
        return result


def parse_junit(path: Path) -> dict[str, Outcome]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            text = problem.get("message") or problem.text or ""
            out[name] = Outcome(FAIL, text.strip().splitlines()[0][:240] if text.strip() else "")
        elif case.find("skipped") is not None:
            out[name] = Outcome(SKIP, (case.find("skipped").get("message") or "")[:240])
        else:
            out[name] = Outcome(PASS)
    return out


# --- taidon local --------------------------------------------------------------------------


class Local:
    """`taidon local` in a fresh home, driven through `sqlrs`."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root = root
        self.bin = bin_dir
        self.home = root / "home"
        self.env = clean_env() | {"SQLRS_HOME": str(self.home), "TAIDON_BIN": str(bin_dir / "taidon"),
                                  "TAIDON_LOG": "info"}

    def sqlrs(self, *args) -> dict:
        return json.loads(sh(str(self.bin / "sqlrs"), "--json", *args, env=self.env).stdout)

    def api(self, method: str, path: str, body=None) -> dict:
        info = json.loads((self.home / "daemon.json").read_text())
        token = (self.home / "api.token").read_text().strip()
        url = urllib.parse.urlsplit(info["api_url"])
        conn = http.client.HTTPConnection(url.hostname, url.port)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        answer = conn.getresponse().read()
        conn.close()
        return json.loads(answer) if answer else {}

    def instance(self) -> tuple[str, str, Target]:
        """A new instance's id, its state's id, and the gateway target with a fresh token."""
        created = self.sqlrs("prepare:psql", "--", "-c", "select 1")
        iid, sid = created["instance_id"], created["state_id"]
        dsn = urllib.parse.urlsplit(self.sqlrs("dsn", iid, "--plain", "--ttl", "12h")["dsn_plain"])
        host, port = (self.home / "gateway.addr").read_text().strip().rsplit(":", 1)
        gateway = Target("gateway", host, int(port), urllib.parse.unquote(dsn.username),
                         urllib.parse.unquote(dsn.password))
        return iid, sid, gateway

    def resolve(self, iid: str, sid: str) -> Target:
        """The instance's own address and credentials; counts as an open connection until
        `release`."""
        t = self.api("POST", "/v1/resolve", {"state_id": sid, "instance_id": iid, "scope": "rw"})
        return Target("direct", t["host"], int(t["port"]), t["user"], t["password"])

    def release(self, iid: str):
        self.api("POST", "/v1/release", {"instance_ids": [iid]})

    def shutdown(self):
        subprocess.run([str(self.bin / "sqlrs"), "shutdown"], env=self.env, capture_output=True)
        # Anything still running from this home (a server the shutdown missed) goes too.
        deadline = time.monotonic() + 10
        while (pids := pids_mentioning(str(self.root))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in pids_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
                print(f"(killed leftover process {pid})", file=sys.stderr)
            except ProcessLookupError:
                pass


def pids_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


# --- comparison ----------------------------------------------------------------------------


def counts(outcomes: dict[str, Outcome]) -> dict[str, int]:
    c = {}
    for o in outcomes.values():
        c[o.status] = c.get(o.status, 0) + 1
    return c


def differences(direct: dict[str, Outcome], gateway: dict[str, Outcome]) -> list[tuple[str, Outcome, Outcome]]:
    """Every key whose status differs (a key one run never reached counts as not run)."""
    rows = []
    for key in sorted(set(direct) | set(gateway)):
        d, g = direct.get(key, Outcome(NOT_RUN)), gateway.get(key, Outcome(NOT_RUN))
        if d.status != g.status:
            rows.append((key, d, g))
    return rows


def fmt_counts(c: dict[str, int]) -> str:
    order = [PASS, FAIL, TIMEOUT, SKIP, NOT_RUN]
    return ", ".join(f"{c[s]} {s}" for s in order if c.get(s))


def report(suite, rev: str, direct: Run, gateway: Run) -> dict:
    print(f"\n== {suite.name} ({rev}) ==")
    print(f"files  direct:  {fmt_counts(counts(direct.files))}   ({direct.seconds:.0f} s)")
    print(f"files  gateway: {fmt_counts(counts(gateway.files))}   ({gateway.seconds:.0f} s)")
    print(f"tests  direct:  {fmt_counts(counts(direct.tests))}")
    print(f"tests  gateway: {fmt_counts(counts(gateway.tests))}")
    file_diff = differences(direct.files, gateway.files)
    test_diff = differences(direct.tests, gateway.tests)
    for title, rows in (("files", file_diff), ("tests", test_diff)):
        print(f"\n{title} whose outcome differs ({len(rows)}):")
        for key, d, g in rows:
            print(f"  {key}\n      direct  {d.status:8} {d.error}\n      gateway {g.status:8} {g.error}")
    return {
        "suite": suite.name, "revision": rev,
        "direct": {"files": {k: asdict(v) for k, v in direct.files.items()},
                   "tests": {k: asdict(v) for k, v in direct.tests.items()}, "seconds": direct.seconds},
        "gateway": {"files": {k: asdict(v) for k, v in gateway.files.items()},
                    "tests": {k: asdict(v) for k, v in gateway.tests.items()}, "seconds": gateway.seconds},
        "differences": {"files": [k for k, _, _ in file_diff], "tests": [k for k, _, _ in test_diff]},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-postgres", type=Path, metavar="PATH",
                    help="node-postgres checkout or bare git directory")
    ap.add_argument("--psycopg", type=Path, metavar="PATH", help="psycopg checkout or bare git directory")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release",
                    help="directory holding taidon and sqlrs (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds a test file may take")
    ap.add_argument("--only", metavar="GLOB", help="run only the test files matching GLOB (several: comma-separated)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every outcome here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    suites = ([NodePostgres(args.node_postgres.resolve())] if args.node_postgres else []) + \
             ([Psycopg(args.psycopg.resolve())] if args.psycopg else [])
    if not suites:
        ap.error("name at least one suite: --node-postgres PATH and/or --psycopg PATH")
    for exe in ("taidon", "sqlrs"):
        if not (args.bin / exe).is_file():
            ap.error(f"{args.bin / exe} not found (cargo build --release --bins)")

    root = Path(tempfile.mkdtemp(prefix="taidon-suites-", dir="/tmp"))
    os.chmod(root, 0o711)  # PostgreSQL runs as `postgres` and must reach the home
    log = lambda line: print(line, flush=True)
    local = Local(root, args.bin.resolve())
    results = []
    try:
        revs = []
        for suite in suites:
            log(f"preparing {suite.name} from {suite.src}")
            revs.append(suite.prepare(root / "src"))
        iid, sid, gateway = local.instance()
        direct = local.resolve(iid, sid)
        log(f"instance {iid}: direct {direct.user}@{direct.host}:{direct.port}, "
            f"gateway {gateway.host}:{gateway.port}")
        runs = []
        for suite in suites:
            for t in (direct, gateway):
                sh("psql", "-X", "-q", "-c", f"create database {suite.short.replace('-', '_')}_{t.name}",
                   env=clean_env() | direct.libpq_env("postgres"))
        try:
            for suite in suites:
                log(f"{suite.name}: direct")
                runs.append([suite.run(direct, f"{suite.short}_direct", args.timeout, args.only, log)])
        finally:
            local.release(iid)
        for suite, r in zip(suites, runs):
            log(f"{suite.name}: through the gateway")
            r.append(suite.run(gateway, f"{suite.short}_gateway", args.timeout, args.only, log))
        for suite, rev, (d, g) in zip(suites, revs, runs):
            results.append(report(suite, rev, d, g))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        local.shutdown()
        if args.keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
