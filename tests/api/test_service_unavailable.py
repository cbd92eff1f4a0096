"""The API while the database is unreachable: 503 ``service_unavailable`` in the
envelope (tests/nodes/test_database_outage.py has the node socket's side)."""

from __future__ import annotations

import pytest

from nodes import selectors
from nodes.models import Node
from tests.conftest import database_refused as refused

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("database_recovers_after")]


def test_the_api_answers_503_in_its_envelope(staff_client, monkeypatch, caplog):
    monkeypatch.setattr(selectors, "node_list", refused)
    response = staff_client.get("/api/admin/nodes")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response.json() == {
        "success": False,
        "error": {
            "code": "service_unavailable",
            "message": "The hub's database is unavailable; try again shortly",
        },
    }
    assert "database unavailable" in caplog.text


def test_other_errors_stay_500s(staff_client, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(selectors, "node_list", broken)
    staff_client.raise_request_exception = False
    assert staff_client.get("/api/admin/nodes").status_code == 500
    assert Node.objects.count() == 0
