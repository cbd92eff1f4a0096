"""API fuzzing with schemathesis against ``/api/schema/`` (PROTOCOL §6).

Every operation of the schema, called in-process through Django's WSGI handler
with generated (valid and invalid) requests, as a staff user and without auth:
no response is a 5xx, and every response matches the schema (status code,
content type, body). ``APEXBRIDGE_API_FUZZ_EXAMPLES`` sets the examples per
operation and caller (CI: 8; ``make fuzz``: 300).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.contrib.auth import get_user_model
from django.core import signals
from django.core.cache import cache
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nodes.models import Node

EXAMPLES = int(os.environ.get("APEXBRIDGE_API_FUZZ_EXAMPLES", "8"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

pytestmark = pytest.mark.django_db


@pytest.fixture
def api_schema(db, _keep_the_test_connection):
    return schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())


@pytest.fixture(autouse=True)
def _keep_the_test_connection():
    """The WSGI handler closes the database connection after each request (as Django's
    test client does not): that would end the test's transaction on a file database."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


def operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


@pytest.fixture
def staff_token(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"login": "100000/min"},  # the fuzzer logs in a lot
    }
    user = get_user_model().objects.create_user("fuzz-staff", password="fuzz-password-1", is_staff=True)
    Node.objects.create(node_id="n1", name="n1", status="offline")
    cache.clear()
    return Token.objects.create(user=user).key


@pytest.mark.parametrize("auth", ["staff", "anonymous"])
def test_every_operation_matches_the_schema_and_never_fails(api_schema, staff_token, auth):
    headers = {"Authorization": f"Token {staff_token}"} if auth == "staff" else {}
    tried = []
    for operation in operations(api_schema):
        tried.append(operation.label)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case) -> None:
            # ``wait`` makes the task API sleep up to 60 s: keep it at zero here.
            if case.query and "wait" in case.query:
                case.query["wait"] = 0
            case.call_and_validate(headers=headers, checks=CHECKS)

        run()
    assert any("/api/tasks" in label for label in tried)
    assert any("/api/admin/nodes" in label for label in tried)


# --- regressions found by the API fuzzer ------------------------------------------------------
def test_node_list_is_documented_as_one_envelope_not_an_array(api_schema):
    operation = next(op for op in operations(api_schema) if op.label == "GET /api/admin/nodes")
    schema = operation.definition.raw["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema.get("type") != "array" and "$ref" in schema


@pytest.mark.parametrize("method", ["get", "post", "delete"])
def test_unknown_api_paths_answer_the_json_envelope(client, method):
    response = getattr(client, method)("/api/admin/nodes/%F1%A3%B2%AF")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "success": False,
        "error": {"code": "not_found", "message": "No such API endpoint"},
    }
