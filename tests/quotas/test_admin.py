"""Staff edit quota policies in the Django admin; the LLM request log is read-only there."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from llmproxy.models import LLMRequestLog
from quotas.models import QuotaPolicy

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw-Str0ng-enough")
    client.force_login(user)
    return client


def test_staff_can_add_a_policy_leaving_fields_to_inherit(staff_client):
    response = staff_client.post(
        "/admin/quotas/quotapolicy/add/",
        {
            "scope": "tag",
            "target": "gpu",
            "note": "GPU boxes",
            "max_requests_per_minute": "120",
            "burst_multiplier": "",
            "max_tokens_per_day": "",
            "max_concurrent_streams": "6",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    policy = QuotaPolicy.objects.get(scope="tag", target="gpu")
    assert (policy.max_requests_per_minute, policy.max_concurrent_streams) == (120, 6)
    assert policy.burst_multiplier is None and policy.max_tokens_per_day is None
    assert staff_client.get("/admin/quotas/quotapolicy/").status_code == 200


def test_a_second_policy_for_the_same_target_is_refused(staff_client):
    QuotaPolicy.objects.create(scope="node", target="n1", max_requests_per_minute=5)
    response = staff_client.post("/admin/quotas/quotapolicy/add/", {"scope": "node", "target": "n1"})
    assert response.status_code == 200  # the form again, with the error
    assert QuotaPolicy.objects.filter(scope="node", target="n1").count() == 1


def test_llm_request_log_is_listed_but_read_only(staff_client):
    row = LLMRequestLog.objects.create(node_id="n1", request_id="r-1", model="m", outcome="succeeded")
    listing = staff_client.get("/admin/llmproxy/llmrequestlog/")
    assert listing.status_code == 200 and b"r-1" in listing.content
    assert staff_client.get("/admin/llmproxy/llmrequestlog/add/").status_code == 403
    detail = staff_client.get(f"/admin/llmproxy/llmrequestlog/{row.pk}/change/")
    assert detail.status_code == 200
    assert b'name="node_id"' not in detail.content  # shown, not editable
    staff_client.post(f"/admin/llmproxy/llmrequestlog/{row.pk}/delete/", {"post": "yes"})
    assert LLMRequestLog.objects.filter(pk=row.pk).exists()
