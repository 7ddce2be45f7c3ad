#!/usr/bin/env python3
"""Liquibase prepares (issue 13): a generated changelog through `sqlrs prepare:lb`, and what
one Liquibase JVM start costs on this machine, in one run.

What is measured (wall time of the `sqlrs` command as the caller sees it):

  first      `sqlrs --json prepare:lb -- update --changelog-file db/changelog.xml` in a fresh
             home: the offline plan (`update-sql` against `offline:postgresql`, one JVM), the
             base state (initdb), one `update-count --count=1` per changeset (one JVM each) with
             a checkpoint after each, and an instance of the result
  unchanged  the same prepare again: every step cached, the plan too   target <= 1/20 of first
  edit       changeset 29's insert changed (1,000 -> 2,000 rows, so a new checksum), then the
             prepare: a new plan, changesets 29 and 30 rebuilt  target ~ 2/30 of first + one plan

  Each round runs in a fresh home (and a fresh client hash cache); the daemon is started with
  `sqlrs status` before the first prepare, outside the timing. Every prepare makes an instance;
  it is removed with `sqlrs rm` right after, outside the timing, so each prepare starts one.
  With `-v` the progress events (NDJSON on stderr) are timestamped as they arrive, which splits
  a prepare into planning, initdb, the steps and the instance start; each step's build-server
  log (`<home>/logs/builds/<state>.log`, from "ready to accept connections" to "fast shutdown
  request") gives the time Liquibase held the server: JVM start plus the changeset itself.

  The JVM alone, run directly (not through Taidon), each with Taidon's JAVA_OPTS
  (`-XX:TieredStopAtLevel=1 -XX:+UseSerialGC`, set by the controller when JAVA_OPTS is unset)
  and with the JVM's defaults, alternating A B B A so that drift hits both alike, medians of
  --jvm-runs each:
    - `liquibase --version`
    - the offline plan of the same changelog (`update-sql`, as the controller runs it)
    - one `update-count --count=1` against an empty instance (through the gateway,
      sslmode=disable), each run applying the next changeset of the same changelog
  and the "derived" cost of one JVM run in a first prepare: first / (changesets + 1).

Everything lives in a temporary directory under /tmp (mode 0711: PostgreSQL runs as `postgres`
when we are root); every daemon is stopped at the end with `sqlrs shutdown`.

Usage:
  cargo build --release --bins
  python3 bench/liquibase.py [--rounds 3] [--changesets 30] [--jvm-runs 5] [--bin target/release]
      [--liquibase tests/tools/node_modules/liquibase/dist/liquibase/liquibase]
Needs Java 17 and Liquibase (tests/tools: npm install), psql for the empty instance.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIDON_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
UNCHANGED_TARGET = 1 / 20
EDIT_SLACK = 1.25  # "~": the edit's wall time within 25% of (2/30 of first + one plan)

# The header of crates/sqlrs/tests/tools.rs's MASTER (Liquibase validates against the XSD).
HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.liquibase.org/xml/ns/dbchangelog http://www.liquibase.org/xml/ns/dbchangelog/dbchangelog-4.20.xsd">
"""
TABLES = ["customer", "product", "orders", "order_line", "payment", "audit_log"]


# --- the changelog ---------------------------------------------------------------------------

def sql_file(i, content):
    name = f"sql/{i:02d}.sql"
    return f'<sqlFile path="{name}" relativeToChangelogFile="true"/>', {name: content}


# The fifth changeset of each table.
FIFTH = {
    "customer": lambda i, t: sql_file(i, f"update {t} set note = 'every tenth', status = 'flagged' where id % 10 = 0;\n"
                                         f"insert into {t} (id, name, amount, ref_id) values (-{i}, 'from sqlFile', 0, 1);\n"
                                         f"analyze {t};\n"),
    "product": lambda i, t: (f'<createView viewName="{t}_summary">select status, count(*) as n, sum(amount) as total '
                             f'from {t} group by status</createView>', {}),
    "orders": lambda i, t: sql_file(i, f"update {t} set status = 'paid' where id % 3 = 0;\n"
                                       f"insert into {t} (id, name, amount, ref_id) select -g, 'refund ' || g, -g, 1 "
                                       f"from generate_series(1, 50) g;\n"),
    "order_line": lambda i, t: ('<addForeignKeyConstraint baseTableName="order_line" baseColumnNames="ref_id" '
                                'constraintName="order_line_orders_fk" referencedTableName="orders" '
                                'referencedColumnNames="id"/>', {}),
    "payment": lambda i, t: (f"<sql>update {t} set status = 'settled', note = 'batch ' || (id / 100) "
                             f"where amount > 100</sql>", {}),
    "audit_log": lambda i, t: sql_file(i, f"create view {t}_recent as select * from {t} "
                                          f"where created_at > now() - interval '1 day';\n"
                                          f"update {t} set status = 'archived' where id % 7 = 0;\n"),
}


def changeset_body(i: int, edit: int | None) -> tuple[str, dict[str, str]]:
    """Changeset i (1-based) and the sqlFile files it needs. Each table gets five: createTable,
    addColumn, createIndex, an insert of 1,000 rows, and one of sqlFile / createView /
    addForeignKeyConstraint / an update (FIFTH)."""
    t = TABLES[((i - 1) // 5) % len(TABLES)]
    kind = (i - 1) % 5
    files = {}
    if kind == 0:
        body = f"""<createTable tableName="{t}">
      <column name="id" type="bigint"><constraints primaryKey="true"/></column>
      <column name="name" type="varchar(100)"><constraints nullable="false"/></column>
      <column name="amount" type="numeric(10,2)"/>
      <column name="ref_id" type="int"/>
      <column name="created_at" type="timestamp" defaultValueComputed="now()"/>
    </createTable>"""
    elif kind == 1:
        body = f"""<addColumn tableName="{t}">
      <column name="note" type="text"/>
      <column name="status" type="varchar(20)" defaultValue="new"/>
    </addColumn>"""
    elif kind == 2:
        body = f"""<createIndex tableName="{t}" indexName="{t}_ref_idx">
      <column name="ref_id"/>
      <column name="created_at"/>
    </createIndex>"""
    elif kind == 3:
        rows = 2000 if i == edit else 1000
        body = (f"<sql>insert into {t} (id, name, amount, ref_id) select g, '{t} ' || g, "
                f"(g % 500) * 1.25, (g % 100) + 1 from generate_series(1, {rows}) g</sql>")
    else:
        body, files = FIFTH[t](i, t)
    if i == edit and kind != 3:
        body += "\n    <sql>select 1</sql>"  # any other change: a new checksum
    return f'  <changeSet id="{i}" author="bench">\n    {body}\n  </changeSet>\n', files


def write_changelog(project: Path, n: int, edit: int | None = None):
    """db/changelog.xml and db/sql/NN.sql under `project`."""
    db = project / "db"
    (db / "sql").mkdir(parents=True, exist_ok=True)
    text = HEADER
    for i in range(1, n + 1):
        body, files = changeset_body(i, edit)
        text += body
        for name, content in files.items():
            (db / name).write_text(content)
    (db / "changelog.xml").write_text(text + "</databaseChangeLog>\n")


# --- sqlrs and its daemon --------------------------------------------------------------------

class Failure(Exception):
    pass


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("PG") or k.startswith("LIQUIBASE_") or k in ("DATABASE_URL", "JAVA_OPTS"))}
    env.update(extra)
    return env


@dataclass
class Prepare:
    """One timed `sqlrs --json -v prepare:lb`."""
    wall: float
    out: dict
    events: list  # (seconds since start, event)
    planned: bool = False  # Liquibase planned (a "planning ..." notice came)
    plan_s: float | None = None  # inputs (or start) -> the plan event
    initdb_s: float | None = None
    steps: list = field(default_factory=list)  # (label, state_id, elapsed_s)
    instance_s: float | None = None  # instance_starting -> done

    def event(self, kind):
        return next((e for _, e in self.events if e.get("event") == kind), None)

    def at(self, kind):
        return next((t for t, e in self.events if e.get("event") == kind), None)


class Home:
    """A fresh SQLRS_HOME with its own daemon, driven through sqlrs."""

    def __init__(self, root: Path, name: str, bin_dir: Path, liquibase: str):
        self.path = root / f"home-{name}"
        self.sqlrs_exe = str(bin_dir / "sqlrs")
        self.env = clean_env(SQLRS_HOME=str(self.path), SQLRS_CACHE_DIR=str(root / f"cache-{name}"),
                             TAIDON_BIN=str(bin_dir / "taidon"), SQLRS_LIQUIBASE=liquibase)

    def sqlrs(self, *args, cwd=None):
        p = subprocess.run([self.sqlrs_exe, *args], env=self.env, cwd=cwd, capture_output=True, text=True)
        if p.returncode != 0:
            raise Failure(f"sqlrs {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
        return p

    def prepare_lb(self, project: Path) -> Prepare:
        cmd = [self.sqlrs_exe, "--json", "-v", "prepare:lb", "--", "update", "--changelog-file", "db/changelog.xml"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        stdout = []
        reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()))
        reader.start()
        events, other = [], []
        for line in proc.stderr:
            t = time.perf_counter() - start
            try:
                events.append((t, json.loads(line)))
            except json.JSONDecodeError:
                other.append(line)
        proc.wait()
        wall = time.perf_counter() - start
        reader.join()
        if proc.returncode != 0:
            failed = [e for _, e in events if e.get("event") == "failed"]
            raise Failure(f"{' '.join(cmd)} (in {project}) exited {proc.returncode}\n--- stdout\n{stdout[0]}\n"
                          f"--- stderr\n{''.join(other)}{json.dumps(failed, indent=2) if failed else ''}")
        p = Prepare(wall, json.loads(stdout[0]), events)
        p.planned = any(e.get("event") == "notice" and "planning" in e.get("message", "") for _, e in events)
        t_plan = p.at("plan")
        if t_plan is not None:
            p.plan_s = t_plan - (p.at("inputs") or 0.0)
        t_init = p.at("initdb")
        t_first = p.at("step_started")
        if t_init is not None:
            p.initdb_s = (t_first if t_first is not None else p.at("instance_starting") or wall) - t_init
        labels = {e["state_id"]: e["label"] for _, e in events if e.get("event") == "step_started"}
        p.steps = [(labels.get(e["state_id"], "?"), e["state_id"], e["elapsed_ms"] / 1000.0)
                   for _, e in events if e.get("event") == "step_done"]
        t_inst, t_done = p.at("instance_starting"), p.at("done")
        if t_inst is not None and t_done is not None:
            p.instance_s = t_done - t_inst
        return p

    def rm(self, instance_id: str):
        self.sqlrs("rm", instance_id)

    def server_up_s(self, state_id: str) -> float | None:
        """How long the build server of a step was up: Liquibase's JVM start and its changeset."""
        log = self.path / "logs" / "builds" / f"{state_id}.log"
        if not log.exists():
            return None
        ready = down = None
        for line in log.read_text(errors="replace").splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)", line)
            if not m:
                continue
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            if "ready to accept connections" in line and ready is None:
                ready = ts
            elif "received fast shutdown request" in line or "received smart shutdown request" in line:
                down = ts
        return down - ready if ready is not None and down is not None else None

    def shutdown(self):
        subprocess.run([self.sqlrs_exe, "shutdown"], env=self.env, capture_output=True)


# --- one round -------------------------------------------------------------------------------

@dataclass
class Round:
    daemon_s: float
    first: Prepare
    again: Prepare
    edited: Prepare
    liquibase_s: list  # server-up time of each step of the first prepare
    checks: list  # what did not go as expected


def check(cond, what, checks):
    if not cond:
        checks.append(what)
        print(f"  UNEXPECTED: {what}", flush=True)


def one_round(root: Path, r: int, n: int, edit: int, bin_dir: Path, liquibase: str) -> Round:
    project = root / f"project-{r}"
    write_changelog(project, n)
    home = Home(root, str(r), bin_dir, liquibase)
    checks = []
    try:
        t = time.perf_counter()
        home.sqlrs("status")
        daemon_s = time.perf_counter() - t

        first = home.prepare_lb(project)
        home.rm(first.out["instance_id"])
        plan = first.event("plan") or {}
        check(plan.get("total") == n and plan.get("cached") == 0 and len(first.steps) == n and first.planned,
              f"first: plan {plan}, {len(first.steps)} steps built, planned={first.planned}", checks)
        liquibase_s = [home.server_up_s(sid) for _, sid, _ in first.steps]
        print(f"  first      {first.wall:7.2f} s  (plan {fmt(first.plan_s)}, initdb {fmt(first.initdb_s)}, "
              f"{len(first.steps)} steps {sum(s for *_, s in first.steps):.1f} s, instance {fmt(first.instance_s)}; "
              f"load {load()})", flush=True)

        again = home.prepare_lb(project)
        home.rm(again.out["instance_id"])
        plan = again.event("plan") or {}
        check(again.out.get("cache_hit") and again.out["state_id"] == first.out["state_id"] and not again.steps
              and not again.planned and plan.get("cached") == n,
              f"unchanged: cache_hit={again.out.get('cache_hit')}, plan {plan}, {len(again.steps)} steps built, "
              f"planned={again.planned}", checks)
        print(f"  unchanged  {again.wall:7.3f} s  (instance {fmt(again.instance_s)}; load {load()})", flush=True)

        write_changelog(project, n, edit=edit)
        edited = home.prepare_lb(project)
        home.rm(edited.out["instance_id"])
        plan = edited.event("plan") or {}
        built = [label for label, *_ in edited.steps]
        check(not edited.out.get("cache_hit") and edited.out["state_id"] != first.out["state_id"]
              and plan.get("cached") == n - 2 and len(built) == 2 and edited.planned,
              f"edit: plan {plan}, built {built}, planned={edited.planned}", checks)
        steps = ", ".join(f"{label.split('::')[1]}: {s:.1f} s" for label, _, s in edited.steps)
        print(f"  edit {edit:<5} {edited.wall:7.2f} s  (plan {fmt(edited.plan_s)}, steps {steps}, "
              f"instance {fmt(edited.instance_s)}; load {load()})", flush=True)
        return Round(daemon_s, first, again, edited, liquibase_s, checks)
    finally:
        home.shutdown()


def fmt(s):
    return "-" if s is None else f"{s:.2f} s"


def load():
    return f"{os.getloadavg()[0]:.1f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- the JVM alone ---------------------------------------------------------------------------

VARIANTS = [("Taidon's JAVA_OPTS", TAIDON_OPTS), ("JVM defaults", None)]


def jvm_env(opts):
    env = clean_env(LIQUIBASE_SHOW_BANNER="false")
    if opts:
        env["JAVA_OPTS"] = opts
    return env


def timed_run(cmd, env, cwd):
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        raise Failure(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return elapsed


def abba(runs):
    """The order of the two variants: A B B A A B ..., `runs` of each."""
    order = []
    for i in range(runs):
        order += [0, 1] if i % 2 == 0 else [1, 0]
    return order


def jvm_costs(root: Path, n: int, runs: int, bin_dir: Path, liquibase: str) -> dict:
    """{variant: {measure: [seconds]}} for --version, the offline plan and update-count --count=1."""
    project = root / "project-jvm"
    write_changelog(project, n)
    times = {label: {"version": [], "plan": [], "update": []} for label, _ in VARIANTS}
    csv = root / "plan.csv"
    plan_cmd = [liquibase, f"--url=offline:postgresql?changeLogFile={csv}", "--changelog-file=db/changelog.xml",
                "--search-path=.", "update-sql"]
    for k in abba(runs):
        label, opts = VARIANTS[k]
        times[label]["version"].append(timed_run([liquibase, "--version"], jvm_env(opts), project))
    for k in abba(runs):
        label, opts = VARIANTS[k]
        csv.unlink(missing_ok=True)
        times[label]["plan"].append(timed_run(plan_cmd, jvm_env(opts), project))
        rows = sum(1 for line in csv.read_text().splitlines() if line.strip()) - 1 if csv.exists() else -1
        if rows != n:
            raise Failure(f"the offline plan wrote {rows} changeset rows to {csv}, not {n}")

    # An empty instance; each update-count applies the next changeset of the same changelog.
    home = Home(root, "jvm", bin_dir, liquibase)
    try:
        made = json.loads(home.sqlrs("--json", "prepare:psql", "--", "-c", "select 1", cwd=project).stdout)
        dsn = json.loads(home.sqlrs("--json", "dsn", made["instance_id"]).stdout)["dsn_plain"]
        u = urllib.parse.urlsplit(dsn)
        url = f"jdbc:postgresql://{u.hostname}:{u.port}{u.path}?sslmode=disable"
        for k in abba(runs):
            label, opts = VARIANTS[k]
            env = jvm_env(opts)
            env["LIQUIBASE_COMMAND_PASSWORD"] = urllib.parse.unquote(u.password)
            times[label]["update"].append(timed_run(
                [liquibase, f"--url={url}", f"--username={u.username}", "--changelog-file=db/changelog.xml",
                 "--search-path=.", "update-count", "--count=1"], env, project))
    finally:
        home.shutdown()
    for label, _ in VARIANTS:
        t = times[label]
        print(f"  {label:<19} --version {fmt(med(t['version']))}, offline plan {fmt(med(t['plan']))}, "
              f"update-count --count=1 {fmt(med(t['update']))}  "
              f"(runs: {' '.join(f'{x:.1f}' for x in t['version'] + t['plan'] + t['update'])})", flush=True)
    return times


# --- report ----------------------------------------------------------------------------------

def report(rounds: list[Round], jvm: dict, n: int, edit: int):
    first = med(r.first.wall for r in rounds)
    again = med(r.again.wall for r in rounds)
    edited = med(r.edited.wall for r in rounds)
    plan_first = med(r.first.plan_s for r in rounds)
    edit_target = first * 2 / n + plan_first
    per = lambda xs, f: " / ".join(f(x) for x in xs)  # noqa: E731

    print()
    print(f"medians of {len(rounds)} rounds, {n} changesets, a fresh home per round, instances removed after "
          f"each prepare:")
    print()
    print("| prepare | median wall | rounds | / first | target | |")
    print("|---|---:|---|---:|---|---|")
    print(f"| first: 1 plan + initdb + {n} applies | {first:.1f} s | "
          f"{per([r.first.wall for r in rounds], lambda x: f'{x:.1f}')} | 1 | | |")
    print(f"| unchanged | {again * 1000:.0f} ms | {per([r.again.wall for r in rounds], lambda x: f'{x * 1000:.0f}')} "
          f"| 1/{first / again:.0f} | <= 1/20 ({first * UNCHANGED_TARGET:.1f} s) | "
          f"{'met' if again <= first * UNCHANGED_TARGET else 'MISSED'} |")
    print(f"| edit of changeset {edit}: 1 plan + 2 applies | {edited:.1f} s | "
          f"{per([r.edited.wall for r in rounds], lambda x: f'{x:.1f}')} | {edited / first:.3f} | "
          f"~ 2/{n} x first + one plan = {edit_target:.1f} s ({edit_target / first:.3f}) | "
          f"{'met' if edited <= edit_target * EDIT_SLACK else 'MISSED'} ({edited / edit_target:.2f} x target) |")
    print()

    # Where the first prepare's time goes.
    steps = [s for r in rounds for *_, s in r.first.steps]
    lb = [x for r in rounds for x in r.liquibase_s if x is not None]
    step_sum = med(sum(s for *_, s in r.first.steps) for r in rounds)
    lb_sum = med(sum(x for x in r.liquibase_s if x is not None) for r in rounds)
    print(f"first prepare, medians over rounds: daemon start (outside) {fmt(med(r.daemon_s for r in rounds))}; "
          f"plan {fmt(plan_first)}; initdb {fmt(med(r.first.initdb_s for r in rounds))}; "
          f"{n} steps {step_sum:.1f} s (one step: median {med(steps):.2f} s, min {min(steps):.2f}, "
          f"max {max(steps):.2f}); instance start {fmt(med(r.first.instance_s for r in rounds))}")
    if lb:
        print(f"  of the steps, Liquibase held the build server {lb_sum:.1f} s ({100 * lb_sum / step_sum:.0f}%; "
              f"one changeset: median {med(lb):.2f} s); the rest, {step_sum - lb_sum:.1f} s, is clone, server "
              f"start/stop and snapshot ({(step_sum - lb_sum) / n:.2f} s a step)")
    print(f"edit, medians: plan {fmt(med(r.edited.plan_s for r in rounds))}; 2 steps "
          f"{med(sum(s for *_, s in r.edited.steps) for r in rounds):.1f} s; instance start "
          f"{fmt(med(r.edited.instance_s for r in rounds))}")
    print(f"unchanged, medians: plan event after {fmt(med(r.again.plan_s for r in rounds))}; instance start "
          f"{fmt(med(r.again.instance_s for r in rounds))}")
    print()
    print(f"| one Liquibase JVM run (median of {len(jvm[VARIANTS[0][0]]['version'])}) | "
          + " | ".join(label for label, _ in VARIANTS) + " |")
    print("|---|" + "---:|" * len(VARIANTS))
    for key, what in (("version", "`liquibase --version`"), ("plan", f"offline `update-sql` plan of {n} changesets"),
                      ("update", "`update-count --count=1` against an empty instance")):
        print(f"| {what} | " + " | ".join(f"{med(jvm[label][key]):.2f} s" for label, _ in VARIANTS) + " |")
    print(f"| derived from the first prepare: first / {n + 1} JVM runs | {first / (n + 1):.2f} s | |")
    if lb:
        print(f"| in the first prepare: build server up per changeset | {med(lb):.2f} s | |")
    problems = [f"round {i + 1}: {c}" for i, r in enumerate(rounds) for c in r.checks]
    if problems:
        print()
        print("UNEXPECTED:")
        for p in problems:
            print(f"  {p}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of first / unchanged / edit, each in a fresh home")
    ap.add_argument("--changesets", type=int, default=30, help="changesets in the generated changelog")
    ap.add_argument("--jvm-runs", type=int, default=5, help="runs of each JVM measure with and without JAVA_OPTS")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release", help="directory with taidon and sqlrs")
    ap.add_argument("--liquibase", default=str(ROOT / "tests/tools/node_modules/liquibase/dist/liquibase/liquibase"),
                    help="the Liquibase executable")
    args = ap.parse_args()
    bin_dir = args.bin.resolve()
    for exe in ("taidon", "sqlrs"):
        if not (bin_dir / exe).exists():
            raise SystemExit(f"no {bin_dir / exe}: build first (cargo build --release --bins) or pass --bin")
    liquibase = str(Path(args.liquibase).resolve())
    if not os.access(liquibase, os.X_OK):
        raise SystemExit(f"no Liquibase at {liquibase} (cd tests/tools && npm install) or pass --liquibase")
    n = args.changesets
    edit = n - 1
    if n < 5:
        raise SystemExit("--changesets: at least 5")

    root = Path(tempfile.mkdtemp(prefix="taidon-lbbench-", dir="/tmp"))
    os.chmod(root, 0o711)
    print(f"bin {bin_dir}; liquibase {liquibase}; {os.cpu_count()} CPUs; load {load()}")
    try:
        rounds = []
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            rounds.append(one_round(root, r, n, edit, bin_dir, liquibase))
        print(f"JVM alone, {args.jvm_runs} runs of each variant, A B B A (load {load()})", flush=True)
        jvm = jvm_costs(root, n, args.jvm_runs, bin_dir, liquibase)
        report(rounds, jvm, n, edit)
    except Failure as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
