"""pytest fixtures that lease fresh PostgreSQL databases from Taidon through the `sqlrs` CLI.

A lease is one `sqlrs lease … --json` process. Its release is one `sqlrs release` process
started at teardown and not waited for there, so destroying the copy stays off the test's
critical path; every release is waited for before the session ends. Each pytest process
(each pytest-xdist worker too) keeps its own state: workers share nothing but the daemon.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

MARKER = "taidon"
ISOLATIONS = ("database", "instance")
SCOPES = ("function", "class", "module", "package", "session")
# The keyword arguments `@pytest.mark.taidon(...)` takes; others are typos, reported as such.
MARKER_KEYS = ("recipe", "isolation", "ttl", "wait")
# `sqlrs` exits 2 for bad input or something not found, 1 for other failures.
EXIT_NOT_FOUND = 2
# Releases not finished this long after the session's end are reported, not waited for.
RELEASE_TIMEOUT_S = 120


class TaidonError(Exception):
    """A lease could not be taken: the message says why (with what `sqlrs` said, if it ran)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class Lease:
    """A fresh, isolated copy of a database state, yours until it is released."""

    lease: str
    state_id: str
    isolation: str
    # The DSN's password is a token for this copy: keep it out of reprs and failure reports.
    dsn: str = dataclasses.field(repr=False)
    instance_id: str
    database: str
    waited_ms: int
    created_ms: int
    expires_ms: int
    owner: str

    @classmethod
    def from_json(cls, obj: dict) -> Lease:
        """The lease `sqlrs lease --json` printed."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in obj]
        if missing:
            raise TaidonError(f"sqlrs lease printed no {', '.join(missing)}: {sorted(obj)}")
        return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class LeaseRequest:
    """What to lease: a recipe of sqlrs.toml (or a state id) and how."""

    recipe: str
    isolation: str
    ttl: str | None = None
    wait: str | None = None


class Sqlrs:
    """The `sqlrs` CLI as one pytest process uses it: leases, and the releases still running."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        # Where sqlrs looks for sqlrs.toml (there or above), as it would in a terminal there.
        self._project_dir = Path(config.invocation_params.dir)
        # Resolved at the first lease, so that suites that lease nothing need no sqlrs.
        self._binary: str | None = None
        # recipe -> the state its first lease got. Later leases name the state, which spares
        # sqlrs re-hashing the recipe's files; edits to them during a session are not seen.
        self._state_ids: dict[str, str] = {}
        self._releasing: list[tuple[str, subprocess.Popen]] = []
        self._failed_releases: list[str] = []

    def binary(self) -> str:
        if self._binary is None:
            self._binary = self._find_binary()
        return self._binary

    def _find_binary(self) -> str:
        for source, value in (
            ("--taidon-sqlrs", self._config.getoption("taidon_sqlrs")),
            ("taidon_sqlrs in the ini file", self._config.getini("taidon_sqlrs")),
            ("SQLRS_BIN", os.environ.get("SQLRS_BIN")),
        ):
            if value:
                found = shutil.which(str(value))
                if found is None:
                    raise TaidonError(f"sqlrs not found at {value} (from {source})")
                return found
        found = shutil.which("sqlrs")
        if found is None:
            raise TaidonError(
                "sqlrs not found on PATH: install it, or point --taidon-sqlrs, "
                "taidon_sqlrs in the ini file, or SQLRS_BIN at it"
            )
        return found

    def lease(self, request: LeaseRequest) -> Lease:
        """Leases a fresh copy; raises TaidonError with sqlrs's message if it cannot."""
        state_id = self._state_ids.get(request.recipe)
        if state_id is not None:
            try:
                return self._run_lease(state_id, request)
            except TaidonError as e:
                if e.exit_code != EXIT_NOT_FOUND:
                    raise
                # The state is gone (removed, or evicted since): the recipe builds it again.
                del self._state_ids[request.recipe]
        leased = self._run_lease(request.recipe, request)
        self._state_ids[request.recipe] = leased.state_id
        return leased

    def _run_lease(self, what: str, request: LeaseRequest) -> Lease:
        argv = [self.binary(), "lease", what, "--isolation", request.isolation, "--json"]
        if request.ttl is not None:
            argv += ["--ttl", str(request.ttl)]
        if request.wait is not None:
            argv += ["--wait", str(request.wait)]
        command = " ".join(argv[1:])
        try:
            done = subprocess.run(
                argv,
                cwd=self._project_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
        except OSError as e:
            raise TaidonError(f"cannot run {argv[0]}: {e}") from e
        if done.returncode != 0:
            said = done.stderr.strip() or done.stdout.strip() or "(no output)"
            where = self._project_dir
            raise TaidonError(
                f"`sqlrs {command}` failed (exit {done.returncode}) in {where}:\n{said}",
                exit_code=done.returncode,
            )
        try:
            return Lease.from_json(json.loads(done.stdout))
        except (ValueError, TypeError) as e:
            raise TaidonError(
                f"`sqlrs {command}` printed no lease ({e}):\n{done.stdout}{done.stderr}"
            ) from e

    def release_in_background(self, lease_id: str) -> None:
        """Starts `sqlrs release LEASE` and returns; `finish` waits for it."""
        self._reap_finished()
        try:
            proc = subprocess.Popen(
                [self.binary(), "release", lease_id],
                cwd=self._project_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as e:
            self._failed_releases.append(f"{lease_id}: cannot run sqlrs: {e}")
            return
        self._releasing.append((lease_id, proc))

    def _reap_finished(self) -> None:
        """Collects the releases that have ended, so a long session does not pile them up."""
        running = []
        for lease_id, proc in self._releasing:
            if proc.poll() is None:
                running.append((lease_id, proc))
            else:
                self._collect(lease_id, proc, deadline=time.monotonic())
        self._releasing = running

    def _collect(self, lease_id: str, proc: subprocess.Popen, deadline: float) -> None:
        # At least a moment to read what an ended release said, however late.
        timeout = max(1.0, deadline - time.monotonic())
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self._failed_releases.append(
                f"{lease_id}: `sqlrs release` had not ended {RELEASE_TIMEOUT_S} s after the tests"
            )
            return
        if proc.returncode != 0:
            said = stderr.strip() or "(no output)"
            self._failed_releases.append(f"{lease_id}: exit {proc.returncode}: {said}")

    def finish(self) -> list[str]:
        """Waits for every release; returns those that failed (once)."""
        releasing, self._releasing = self._releasing, []
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        for lease_id, proc in releasing:
            self._collect(lease_id, proc, deadline)
        failed, self._failed_releases = self._failed_releases, []
        return failed


SQLRS = pytest.StashKey[Sqlrs]()
# Releases that failed, as "LEASE: why", for the terminal summary.
UNRELEASED = pytest.StashKey[list[str]]()
WORKEROUTPUT_KEY = "taidon_unreleased"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("taidon", "fresh PostgreSQL databases from Taidon (sqlrs)")
    group.addoption(
        "--taidon-recipe",
        dest="taidon_recipe",
        metavar="NAME",
        help="the recipe of sqlrs.toml (or a state id) to lease for tests whose "
        "taidon marker names none (ini: taidon_recipe)",
    )
    group.addoption(
        "--taidon-isolation",
        dest="taidon_isolation",
        choices=ISOLATIONS,
        help="database: a database of its own in a shared instance (the default); "
        "instance: an instance of its own (ini: taidon_isolation)",
    )
    group.addoption(
        "--taidon-sqlrs",
        dest="taidon_sqlrs",
        metavar="PATH",
        help="the sqlrs CLI (default: $SQLRS_BIN, else sqlrs on PATH) (ini: taidon_sqlrs)",
    )
    parser.addini("taidon_recipe", "the recipe taidon_db leases when the marker names none")
    parser.addini("taidon_isolation", "database (default) or instance", default="database")
    parser.addini("taidon_sqlrs", "the sqlrs CLI (default: $SQLRS_BIN, else sqlrs on PATH)")
    parser.addini(
        "taidon_scope",
        "the scope of taidon_db: function (default), class, module, package or session",
        default="function",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(recipe=NAME, isolation='database'|'instance', ttl='10m', wait='30s'): "
        "what taidon_db and taidon_lease lease for this test",
    )
    # Here rather than in the scope function, whose errors pytest reports as its own.
    scope = config.getini("taidon_scope")
    if scope not in SCOPES:
        raise pytest.UsageError(f"taidon_scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    config.stash[SQLRS] = Sqlrs(config)
    config.stash[UNRELEASED] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    sqlrs = config.stash.get(SQLRS, None)
    if sqlrs is None:
        return
    unreleased = config.stash[UNRELEASED]
    unreleased.extend(sqlrs.finish())
    # An xdist worker's terminal is not shown: its controller reports for it. Workers send
    # workeroutput after this hook.
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKEROUTPUT_KEY] = list(unreleased)
        unreleased.clear()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist's controller: what a worker could not release."""
    node.config.stash[UNRELEASED].extend(node.workeroutput.get(WORKEROUTPUT_KEY, []))


def pytest_terminal_summary(terminalreporter) -> None:
    unreleased = terminalreporter.config.stash.get(UNRELEASED, [])
    if not unreleased:
        return
    # A lease nobody released is reclaimed when its TTL ends: worth a word, not a failed run.
    terminalreporter.section("taidon", sep="-", yellow=True)
    terminalreporter.write_line(f"{len(unreleased)} lease(s) were not released:")
    for line in unreleased:
        terminalreporter.write_line(f"  {line}")


def pytest_unconfigure(config: pytest.Config) -> None:
    # For a session that ended before pytest_sessionfinish (a crash, an exit): the terminal
    # summary is over, stderr is what is left.
    sqlrs = config.stash.get(SQLRS, None)
    failed = sqlrs.finish() if sqlrs is not None else []
    if failed:
        lines = [f"taidon: {len(failed)} lease(s) were not released:"] + [f"  {f}" for f in failed]
        sys.stderr.write("\n".join(lines) + "\n")


def lease_request(
    request: pytest.FixtureRequest,
    recipe: str | None = None,
    isolation: str | None = None,
    ttl: str | None = None,
    wait: str | None = None,
) -> LeaseRequest:
    """What to lease for `request`: arguments first, then the taidon marker, then the command
    line, then the ini file."""
    marked = _marker_settings(request)
    config = request.config
    recipe = (
        recipe
        or marked.get("recipe")
        or config.getoption("taidon_recipe")
        or config.getini("taidon_recipe")
    )
    if not recipe:
        raise TaidonError(
            f"no recipe to lease for {request.node.nodeid}: mark the test with "
            f'@pytest.mark.{MARKER}(recipe="NAME"), pass --taidon-recipe NAME, '
            "or set taidon_recipe in the ini file (NAME: a recipe of sqlrs.toml)"
        )
    isolation = (
        isolation
        or marked.get("isolation")
        or config.getoption("taidon_isolation")
        or config.getini("taidon_isolation")
    )
    if isolation not in ISOLATIONS:
        raise TaidonError(f"isolation must be database or instance, not {isolation!r}")
    return LeaseRequest(
        recipe=str(recipe),
        isolation=isolation,
        ttl=ttl if ttl is not None else marked.get("ttl"),
        wait=wait if wait is not None else marked.get("wait"),
    )


def _marker_settings(request: pytest.FixtureRequest) -> dict:
    """The closest taidon marker's settings (the test's, else its class's or module's)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    unknown = sorted(set(marker.kwargs) - set(MARKER_KEYS))
    if unknown:
        raise TaidonError(
            f"@pytest.mark.{MARKER} takes {', '.join(MARKER_KEYS)}, not {', '.join(unknown)}"
        )
    settings = dict(marker.kwargs)
    if marker.args:
        # `@pytest.mark.taidon("pagila")` names the recipe too.
        if len(marker.args) > 1 or "recipe" in settings:
            raise TaidonError(
                f"@pytest.mark.{MARKER} takes one recipe: {marker.args} {marker.kwargs}"
            )
        settings["recipe"] = marker.args[0]
    return settings


def _taidon_db_scope(fixture_name: str, config: pytest.Config) -> str:
    return config.getini("taidon_scope")


@pytest.fixture(scope=_taidon_db_scope)
def taidon_db(request: pytest.FixtureRequest) -> Iterator[Lease]:
    """A fresh, isolated copy of the marked (or configured) recipe's database, released at
    teardown."""
    sqlrs = request.config.stash[SQLRS]
    try:
        leased = sqlrs.lease(lease_request(request))
    except TaidonError as e:
        failure = str(e)
    else:
        failure = None
    if failure is not None:
        # Outside the except block, so that pytest shows the message once, with no traceback
        # through the plugin: the message says it all.
        pytest.fail(f"taidon_db: {failure}", pytrace=False)
    try:
        yield leased
    finally:
        sqlrs.release_in_background(leased.lease)


@pytest.fixture
def taidon_lease(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lease]]:
    """A function that leases a fresh copy each time it is called:
    `lease(recipe=None, *, isolation=None, ttl=None, wait=None)`. Unset arguments come from
    the taidon marker, the command line or the ini file. Every copy is released at teardown;
    a copy that cannot be leased raises TaidonError."""
    sqlrs = request.config.stash[SQLRS]
    taken: list[Lease] = []

    def lease(
        recipe: str | None = None,
        *,
        isolation: str | None = None,
        ttl: str | None = None,
        wait: str | None = None,
    ) -> Lease:
        leased = sqlrs.lease(lease_request(request, recipe, isolation, ttl, wait))
        taken.append(leased)
        return leased

    try:
        yield lease
    finally:
        for leased in reversed(taken):
            sqlrs.release_in_background(leased.lease)
