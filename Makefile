# ApexBridge hub — `make run` and `make test` are the whole set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install browser lint format migrate clean bench fuzz soak

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

migrate: install
	$(PY) manage.py migrate --noinput

run: migrate
	$(PY) manage.py hub_setup --host $(HOST) --port $(PORT)
	$(PY) -m uvicorn --host $(HOST) --port $(PORT) --lifespan off --ws websockets-sansio --ws-max-size 16777216 \
		--ws-ping-interval 20 --ws-ping-timeout 30 apexbridge.asgi:application

# Debian's chromium + chromium-driver for the browser tests (root only; skipped otherwise).
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "could not install chromium: browser tests will be skipped"; \
	fi

test: install browser
	bash scripts/run-tests.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# A short run of every benchmark (small N; the full sizes: bench/run_all.py without --short).
bench: install
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) bench/run_all.py --short

clean:
	rm -rf $(VENV) db.sqlite3* var/ .pytest_cache artifacts/

# Long fuzz runs (issue 8): 100,000 protocol frames and 300 API examples per operation.
fuzz: install
	APEXBRIDGE_FUZZ_FRAMES=$${APEXBRIDGE_FUZZ_FRAMES:-100000} APEXBRIDGE_API_FUZZ_EXAMPLES=$${APEXBRIDGE_API_FUZZ_EXAMPLES:-300} \
		$(PY) -m pytest tests/fuzz -q -s -p no:cacheprovider --timeout 7200 2>&1 \
		| tee fuzz.log | grep -E "^protocol fuzz:|passed|failed"; test $${PIPESTATUS[0]} -eq 0

# Soak (issue 8, not part of CI): one hub, 1,000 nodes, tasks + LLM calls for 10 minutes;
# a table of RSS, fds, DB connections, Redis keys and row counts over time, then verdicts.
# e.g. make soak SOAK_ARGS="--minutes 1 --nodes 100" or SOAK_ARGS="--backend services".
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)
