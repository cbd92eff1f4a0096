#!/usr/bin/env bash
# The whole suite, as `make test` runs it.
#   pass 1: everything on the embedded defaults (SQLite, in-memory channel layer);
#           end-to-end tests that ask for PostgreSQL + Redis start hubs on them.
#   pass 2: the database and channel-layer tests again on PostgreSQL + Redis.
# Without PostgreSQL/Redis pass 2 is skipped, unless APEXBRIDGE_REQUIRE_SERVICES=1,
# which makes any skipped service or browser test a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_OFFLINE_MODE=true
unset DATABASE_URL REDIS_URL

port_open() { "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; }

status=0
# Pass 1 runs on pytest-xdist workers: most end-to-end tests wait on sockets and
# time-outs, not on the CPU. Each worker has its own SQLite test file, PostgreSQL
# databases and Redis database (see tests/e2e/harness.py).
WORKERS="${APEXBRIDGE_TEST_WORKERS:-3}"
echo "== pass 1: embedded defaults (SQLite + in-memory channel layer), $WORKERS workers"
"$PY" -m pytest -n "$WORKERS" "$@" || status=1

if port_open 5432 && port_open 6379; then
  # The test databases (test_apexbridge_<pid>_gw<N>) and the Redis key prefixes
  # (test<pid>-gw<N>, settings.py) are this run's and this worker's own, so workers and
  # two runs on one machine (or one left behind by a killed run) never share state.
  # One process by default (-n 0): on 2 cores, two workers plus PostgreSQL and Redis
  # starve the timing-sensitive LLM consumer tests (a reply 10 s late was seen).
  WORKERS2="${APEXBRIDGE_TEST_WORKERS_PASS2:-0}"
  echo "== pass 2: database and channel-layer tests on PostgreSQL + Redis, -n $WORKERS2"
  DATABASE_URL="${APEXBRIDGE_TEST_DATABASE_URL:-postgres://root@127.0.0.1:5432/apexbridge_$$}" \
  REDIS_URL="${APEXBRIDGE_TEST_REDIS_LAYER_URL:-redis://127.0.0.1:6379/0}" \
  APEXBRIDGE_REDIS_PREFIX="test$$" \
    "$PY" -m pytest -n "$WORKERS2" -m "not e2e and not browser" --ignore=tests/e2e --ignore=tests/browser \
      --ignore=tests/client --ignore=tests/fuzz/test_protocol_fuzz.py "$@" || status=1
elif [ "${APEXBRIDGE_REQUIRE_SERVICES:-0}" = 1 ]; then
  echo "FAILED: PostgreSQL (5432) or Redis (6379) is not reachable and APEXBRIDGE_REQUIRE_SERVICES=1"
  status=1
else
  echo "== pass 2 skipped: PostgreSQL or Redis not reachable on 127.0.0.1"
fi
exit $status
