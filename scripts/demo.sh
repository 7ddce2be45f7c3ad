#!/usr/bin/env bash
# The demo: prepare the pagila sample database on the embedded default, query it through the
# gateway, then do it again and see the cache hit; a lease; the metrics and the status page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins -q
export PATH="$PWD/target/release:$PATH"
pagila="${PAGILA:-../shared/fixtures/pagila}"
echo "== first prepare: builds the schema and data checkpoints" >&2
time sqlrs prepare:psql -- -f "$pagila/pagila-schema.sql" -f "$pagila/pagila-data.sql" \
  run:psql -- -c 'select count(*) as rentals from rental'
echo "== second prepare: a cache hit, a fresh instance in milliseconds" >&2
time sqlrs prepare:psql -- -f "$pagila/pagila-schema.sql" -f "$pagila/pagila-data.sql" \
  run:psql -- -c 'select title from film order by title limit 3'
echo "== a lease: a fresh database of that state for one test, destroyed when given back" >&2
state=$(sqlrs --json warmup prepare:psql -- -f "$pagila/pagila-schema.sql" -f "$pagila/pagila-data.sql" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["state_id"])')
lease=$(sqlrs lease "$state")
time psql "$(echo "$lease" | sed -n 's/^DSN=//p')" -c 'delete from payment' -c 'select count(*) as payments from payment'
sqlrs leases
sqlrs release "$(echo "$lease" | sed -n 's/^LEASE=//p')"
sqlrs ls
sqlrs status
echo "== metrics: what Prometheus would scrape (GET /metrics, with the API token), and the status page" >&2
sqlrs --json status | python3 -c '
import json, sys, urllib.request
s = json.load(sys.stdin)
token = open(s["home"] + "/api.token").read().strip()
req = urllib.request.Request(s["api_url"] + "/metrics", headers={"Authorization": "Bearer " + token})
for line in urllib.request.urlopen(req).read().decode().splitlines():
    if line.startswith(("taidon_states{", "taidon_builds_total{", "taidon_gateway_connections_total{")):
        print(line)
print("status page: " + s["api_url"] + "/  (sign in with the token in " + s["home"] + "/api.token)")
'
