"""Fixtures that start real hub processes.

- ``hub``: one hub process (uvicorn; ``APEXBRIDGE_TEST_SERVER`` picks another) on the
  embedded defaults (SQLite, in-memory layer).
- ``services_hub``: one hub process on PostgreSQL + Redis (skipped without them,
  a failure under APEXBRIDGE_REQUIRE_SERVICES=1).
- ``hub_any``: the same test on both backends.
- ``make_hub``: build your own (several processes sharing one database, custom env).
"""

from __future__ import annotations

import pytest

from tests.conftest import skip_or_fail
from tests.e2e.harness import Databases, HubServer, base_env, redis_url_for_test, services_available


@pytest.fixture(scope="session")
def e2e_databases(tmp_path_factory):
    databases = Databases(tmp_path_factory.mktemp("e2e-db"))
    yield databases
    databases.cleanup()


@pytest.fixture
def make_hub(e2e_databases, tmp_path):
    """make_hub(backend="embedded"|"services", env={...}, database_url=None, redis_url=None)."""
    started: list[HubServer] = []

    def make(
        backend: str = "embedded",
        env: dict | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
        start: bool = True,
        name: str = "hub",
    ) -> HubServer:
        extra = dict(env or {})
        if backend == "services":
            if not services_available():
                skip_or_fail("PostgreSQL and Redis are not reachable on 127.0.0.1")
            extra["DATABASE_URL"] = database_url or e2e_databases.postgres_url()
            extra["REDIS_URL"] = redis_url or redis_url_for_test()
        else:
            extra["DATABASE_URL"] = database_url or e2e_databases.sqlite_url()
        hub = HubServer(base_env(**extra), tmp_path, name=f"{name}{len(started)}")
        started.append(hub)
        if start:
            hub.start()
        return hub

    yield make
    for hub in started:
        hub.stop()


@pytest.fixture
def hub(make_hub):
    return make_hub("embedded")


@pytest.fixture
def services_hub(make_hub):
    return make_hub("services")


@pytest.fixture(params=["embedded", "services"])
def hub_any(request, make_hub):
    return make_hub(request.param)
