"""The plugin end to end: inner pytest sessions (pytester) lease copies from a real daemon,
started by the real `sqlrs` in a temporary home, and the outer tests check what they saw.

Binaries: SQLRS_BIN and TAIDON_BIN, else <repo>/target/debug/{sqlrs,taidon}.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PLUGIN_SRC = Path(__file__).resolve().parents[1] / "src"
# Settings that would send psql or psycopg somewhere other than the DSN says.
PG_VARS = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL")
SQLRS_TOML = '[recipes.tiny]\nprepare = ["psql", "-f", "schema.sql"]\n'
SCHEMA = "create table t(id int primary key, v text); insert into t values (1, 'seed');\n"
# An inner session that hangs fails the outer test rather than the whole run.
INNER_TIMEOUT_S = 600


def built_binary(env_var: str, name: str) -> Path:
    configured = os.environ.get(env_var)
    path = Path(configured) if configured else REPO / "target" / "debug" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        origin = f"${env_var}" if configured else f"the default (set {env_var} to change it)"
        pytest.fail(
            f"{name} is missing at {path} ({origin}): build it with "
            "`cargo build -p sqlrs -p taidon`",
            pytrace=False,
        )
    return path


def import_this_checkouts_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner sessions import this checkout's plugin, whichever copy pip installed."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGIN_SRC), os.environ.get("PYTHONPATH")]))
    )


def plugin_args() -> list[str]:
    """Loads the plugin in inner sessions when no installed entry point does."""
    installed = any(ep.name == "taidon" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_taidon.plugin"]


@dataclasses.dataclass
class Taidon:
    """One test's daemon home, and `sqlrs` run against it from the inner sessions' directory."""

    pytester: pytest.Pytester
    sqlrs: Path
    home: Path

    def sqlrs_run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.sqlrs), *args],
            cwd=self.pytester.path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )

    def sqlrs_json(self, *args: str):
        done = self.sqlrs_run("--json", *args)
        assert done.returncode == 0, self.describe(done)
        return json.loads(done.stdout)

    def describe(self, done: subprocess.CompletedProcess) -> str:
        return (
            f"$ {' '.join(map(str, done.args))}\nexit {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n{self.logs()}"
        )

    def logs(self) -> str:
        """The last lines of every log under the home, for failure messages."""
        out = []
        for path in sorted((self.home / "logs").rglob("*")):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-40:]
                out.append(f"=== {path}\n" + "\n".join(tail))
        return "\n".join(out)

    def pytest(self, *args: str) -> pytest.RunResult:
        """Runs an inner session in a fresh interpreter (as xdist workers need)."""
        return self.pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", *plugin_args(), *args, timeout=INNER_TIMEOUT_S
        )

    def explain(self, result: pytest.RunResult) -> str:
        return (
            f"--- inner stdout\n{result.stdout.str()}\n"
            f"--- inner stderr\n{result.stderr.str()}\n{self.logs()}"
        )


@pytest.fixture
def taidon(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Taidon]:
    """A temporary home (its daemon started by the first sqlrs command) and a project with
    the recipe `tiny`: one table, one seed row."""
    sqlrs = built_binary("SQLRS_BIN", "sqlrs")
    daemon = built_binary("TAIDON_BIN", "taidon")
    # The servers run as `postgres`, which must traverse the path to the home.
    root = Path(tempfile.mkdtemp(prefix="taidon-e2e-", dir="/tmp"))
    root.chmod(0o711)
    home = root / "home"
    monkeypatch.setenv("SQLRS_HOME", str(home))
    monkeypatch.setenv("SQLRS_BIN", str(sqlrs))
    monkeypatch.setenv("TAIDON_BIN", str(daemon))
    for var in PG_VARS:
        monkeypatch.delenv(var, raising=False)
    import_this_checkouts_plugin(monkeypatch)
    pytester.makefile(".toml", sqlrs=SQLRS_TOML)
    pytester.makefile(".sql", schema=SCHEMA)
    env = Taidon(pytester=pytester, sqlrs=sqlrs, home=home)
    try:
        yield env
    finally:
        env.sqlrs_run("shutdown")
        shutil.rmtree(root, ignore_errors=True)


ISOLATED_ROWS = """
import psycopg
import pytest

@pytest.mark.parametrize("n", range(2, 26))
def test_sees_the_seed_and_only_its_own_row(taidon_db, n):
    assert taidon_db.isolation == "database"
    with psycopg.connect(taidon_db.dsn, autocommit=True) as conn:
        conn.execute("insert into t values (%s, %s)", (n, f"row {n}"))
        rows = conn.execute("select id, v from t order by id").fetchall()
    assert rows == [(1, "seed"), (n, f"row {n}")]
"""


def test_parallel_workers_get_isolated_copies_all_released(taidon: Taidon) -> None:
    taidon.pytester.makepyfile(test_rows=ISOLATED_ROWS)
    # Releases slower than the session's own end: the plugin must wait for them.
    slow = taidon.pytester.path / "slow-release-sqlrs"
    slow.write_text(
        f'#!/bin/sh\nif [ "$1" = release ]; then sleep 2; fi\nexec "{taidon.sqlrs}" "$@"\n'
    )
    slow.chmod(0o755)
    result = taidon.pytest("-n", "4", "--taidon-recipe", "tiny", "--taidon-sqlrs", str(slow))
    assert result.ret == 0, taidon.explain(result)
    result.assert_outcomes(passed=24)
    # Every release ended before the inner session did.
    assert taidon.sqlrs_json("leases") == []


def test_the_recipe_is_built_once_for_all_workers(taidon: Taidon) -> None:
    taidon.pytester.makeini("[pytest]\ntaidon_recipe = tiny\n")
    taidon.pytester.makepyfile(
        test_build="""
        import pytest

        @pytest.mark.parametrize("n", range(8))
        def test_leases(taidon_db, n):
            assert len(taidon_db.state_id) == 64
        """
    )
    result = taidon.pytest("-n", "4")
    assert result.ret == 0, taidon.explain(result)
    result.assert_outcomes(passed=8)
    # Two builds: the empty base state and the recipe's state, however many workers asked.
    built = [e for e in taidon.sqlrs_json("events") if e["kind"] == "built"]
    assert len(built) == 2, f"{json.dumps(built, indent=1)}\n{taidon.logs()}"


def test_instance_isolation_gives_each_test_an_instance(taidon: Taidon) -> None:
    taidon.pytester.makepyfile(
        test_instances="""
        import json
        import psycopg
        import pytest

        @pytest.mark.taidon(recipe="tiny", isolation="instance")
        @pytest.mark.parametrize("n", range(3))
        def test_instance(taidon_db, n):
            assert taidon_db.isolation == "instance"
            with psycopg.connect(taidon_db.dsn, autocommit=True) as conn:
                conn.execute("insert into t values (%s, 'mine')", (n + 2,))
                assert conn.execute("select count(*) from t").fetchone() == (2,)
            with open(f"instance-{n}.json", "w") as f:
                json.dump({"instance_id": taidon_db.instance_id, "lease": taidon_db.lease}, f)
        """
    )
    result = taidon.pytest("-n", "3")
    assert result.ret == 0, taidon.explain(result)
    result.assert_outcomes(passed=3)
    seen = [json.loads((taidon.pytester.path / f"instance-{n}.json").read_text()) for n in range(3)]
    assert len({s["instance_id"] for s in seen}) == 3, seen
    assert len({s["lease"] for s in seen}) == 3, seen
    assert taidon.sqlrs_json("leases") == []


def test_a_state_removed_during_the_session_is_built_again(taidon: Taidon) -> None:
    # The second lease names the first one's state, which is gone by then: the plugin falls
    # back to the recipe, which builds the state again. (Instance leases: the daemon keeps
    # handing out databases of a removed state's lease host, a daemon bug of its own.)
    taidon.pytester.makepyfile(
        test_removed="""
        import os
        import subprocess
        import psycopg
        import pytest

        pytestmark = pytest.mark.taidon(recipe="tiny", isolation="instance")

        def test_first(taidon_db):
            with open("state_id", "w") as f:
                f.write(taidon_db.state_id)

        def test_remove_the_state():
            with open("state_id") as f:
                state_id = f.read()
            done = subprocess.run(
                [os.environ["SQLRS_BIN"], "rm", "--force", state_id], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr

        def test_after(taidon_db):
            with open("state_id") as f:
                assert taidon_db.state_id == f.read()
            with psycopg.connect(taidon_db.dsn) as conn:
                assert conn.execute("select count(*) from t").fetchone() == (1,)
        """
    )
    result = taidon.pytest()
    assert result.ret == 0, taidon.explain(result)
    result.assert_outcomes(passed=3)
    state_id = (taidon.pytester.path / "state_id").read_text()
    built = [e for e in taidon.sqlrs_json("events") if e["kind"] == "built"]
    assert [e["state_id"] for e in built].count(state_id) == 2, json.dumps(built, indent=1)


def test_the_factory_leases_several_copies_and_releases_them(taidon: Taidon) -> None:
    taidon.pytester.makepyfile(
        test_factory="""
        import psycopg
        import pytest
        from pytest_taidon import TaidonError

        def test_two_copies(taidon_lease):
            a = taidon_lease("tiny")
            b = taidon_lease("tiny", isolation="instance", ttl="5m")
            assert (a.isolation, b.isolation) == ("database", "instance")
            assert a.state_id == b.state_id
            assert a.instance_id != b.instance_id
            with psycopg.connect(a.dsn, autocommit=True) as conn:
                conn.execute("insert into t values (2, 'a')")
            with psycopg.connect(b.dsn, autocommit=True) as conn:
                assert conn.execute("select count(*) from t").fetchone() == (1,)
            # The DSN carries a token: the repr, which reports and tracebacks show, leaves it out.
            assert a.dsn not in repr(a)

        def test_a_failed_lease_raises(taidon_lease):
            with pytest.raises(TaidonError, match="no_such_recipe"):
                taidon_lease("no_such_recipe")
        """
    )
    result = taidon.pytest()
    assert result.ret == 0, taidon.explain(result)
    result.assert_outcomes(passed=2)
    assert taidon.sqlrs_json("leases") == []


def test_an_unknown_recipe_errors_with_what_sqlrs_said(taidon: Taidon) -> None:
    taidon.pytester.makepyfile(
        test_unknown="""
        import pytest

        @pytest.mark.taidon(recipe="no_such_recipe")
        def test_unknown(taidon_db):
            pass
        """
    )
    result = taidon.pytest()
    result.assert_outcomes(errors=1)
    # The command, and what sqlrs said about the recipe.
    result.stdout.fnmatch_lines(
        [
            "*`sqlrs lease no_such_recipe * --json` failed (exit 2)*",
            "sqlrs: sqlrs.toml: no recipe 'no_such_recipe' (known: tiny)",
        ]
    )


def test_a_recipe_is_required(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    import_this_checkouts_plugin(monkeypatch)
    # No daemon and no sqlrs: these fail before either is needed.
    monkeypatch.setenv("SQLRS_BIN", "/nonexistent/sqlrs")
    pytester.makepyfile(
        test_none="""
        import pytest

        def test_no_recipe(taidon_db):
            pass

        @pytest.mark.taidon(recipes="tiny")
        def test_misspelt(taidon_db):
            pass

        @pytest.mark.taidon(recipe="tiny", isolation="cluster")
        def test_bad_isolation(taidon_db):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *plugin_args())
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*taidon_db: no recipe to lease for test_none.py::test_no_recipe: mark the test with "
            '@pytest.mark.taidon(recipe="NAME"), pass --taidon-recipe NAME, or set taidon_recipe*',
            "*taidon_db: @pytest.mark.taidon takes recipe, isolation, ttl, wait, not recipes*",
            "*taidon_db: isolation must be database or instance, not 'cluster'*",
        ],
        consecutive=False,
    )


FAKE_SQLRS = """#!/bin/sh
# A fake sqlrs: every lease is granted, every release refused.
case "$1" in
  lease) echo '{"lease": "'"lease-$$"'", "state_id": "s", "isolation": "database",
    "dsn": "postgres://u:token@h/db", "instance_id": "i", "database": "db",
    "created_ms": 1, "expires_ms": 2, "waited_ms": 0, "owner": "me"}';;
  release) echo "sqlrs: no lease $2: given back already, expired, or never made" >&2; exit 2;;
esac
"""


def test_failed_releases_are_reported_at_the_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_this_checkouts_plugin(monkeypatch)
    fake = pytester.path / "fake-sqlrs"
    fake.write_text(FAKE_SQLRS)
    fake.chmod(0o755)
    pytester.makepyfile(
        test_refused="""
        import pytest

        @pytest.mark.parametrize("n", range(3))
        def test_leases(taidon_db, n):
            pass
        """
    )
    # From xdist workers too: their controller reports.
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        *plugin_args(),
        "-n",
        "2",
        "--taidon-recipe",
        "tiny",
        "--taidon-sqlrs",
        str(fake),
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*- taidon -*",
            "3 lease(s) were not released:",
            "  lease-*: exit 2: sqlrs: no lease lease-*",
        ]
    )
