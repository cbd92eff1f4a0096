"""The OpenAPI 3 schema at /api/schema/ lists every admin path of PROTOCOL §6."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

ADMIN_PATHS = {
    "/api/admin/auth/login": {"post"},
    "/api/admin/nodes": {"get"},
    "/api/admin/nodes/{id}": {"get", "delete"},
    "/api/admin/nodes/{id}/stats": {"get"},
    "/api/admin/nodes/{id}/logs": {"get"},
    "/api/admin/nodes/{id}/tasks": {"get"},
    "/api/admin/nodes/{id}/heartbeat-check": {"post"},
    "/api/admin/nodes/{id}/control": {"post"},
    "/api/admin/stats": {"get"},
    "/api/admin/tasks": {"get"},
    "/api/admin/quotas/{node_id}": {"get"},
}


@pytest.fixture
def schema(staff_client) -> dict:
    response = staff_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def test_schema_is_openapi_3_with_every_admin_path(schema):
    assert schema["openapi"].startswith("3.")
    for path, methods in ADMIN_PATHS.items():
        assert path in schema["paths"], path
        assert methods <= set(schema["paths"][path]), (path, set(schema["paths"][path]))
    # each operation once: the trailing-slash twins are not listed
    assert not [path for path in schema["paths"] if path.startswith("/api/admin/") and path.endswith("/")]


def test_schema_documents_parameters_bodies_and_errors(schema):
    nodes = schema["paths"]["/api/admin/nodes"]["get"]
    names = {parameter["name"] for parameter in nodes["parameters"]}
    assert {"type", "status", "capability", "tag", "search", "limit", "offset"} <= names
    assert {"200", "400", "401", "403"} <= set(nodes["responses"])
    control = schema["paths"]["/api/admin/nodes/{id}/control"]["post"]
    assert "requestBody" in control and {"200", "404", "409"} <= set(control["responses"])
    body = schema["components"]["schemas"]["NodeControlRequest"]
    assert set(body["properties"]) == {"action", "reason"}
    logs = schema["paths"]["/api/admin/nodes/{id}/logs"]["get"]
    assert {"limit", "level"} <= {parameter["name"] for parameter in logs["parameters"]}
    tasks = schema["paths"]["/api/admin/tasks"]["get"]
    assert {"status", "nodeId", "toolName", "limit", "offset"} <= {p["name"] for p in tasks["parameters"]}
    assert "NodeInfo" in schema["components"]["schemas"]
    login = schema["paths"]["/api/admin/auth/login"]["post"]
    assert {"200", "401", "429"} <= set(login["responses"])


def test_docs_page_is_served(staff_user):
    client = APIClient()
    client.force_login(staff_user)
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_the_task_body_is_described_by_its_fields_not_by_how_they_are_built(schema):
    body = schema["components"]["schemas"]["TaskSubmit"]
    assert set(body["properties"]) >= {"toolName", "toolArgs", "priority", "dependsOn"}
    assert body["required"] == ["toolName"]
    assert "description" not in body  # a mixin's notes are not the API's documentation
