"""Effective quota limits (node > tag > type > settings, field by field) and the
status the admin API shows for a node."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from nodes.models import Node
from quotas import services
from quotas.models import QuotaPolicy
from quotas.selectors import quota_limits_effective, quota_status

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def defaults(settings):
    settings.REDIS_URL = None
    settings.APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE = 30
    settings.APEXBRIDGE_QUOTA_BURST_MULTIPLIER = 2
    settings.APEXBRIDGE_QUOTA_MAX_TOKENS_PER_DAY = 200000
    settings.APEXBRIDGE_QUOTA_MAX_CONCURRENT_STREAMS = 3


def effective(node_id="n1", node_type="worker", tags=()):
    return quota_limits_effective(node_id=node_id, node_type=node_type, node_tags=list(tags))


def test_settings_are_the_defaults():
    limits, sources = effective()
    assert (limits.max_requests_per_minute, limits.burst_multiplier) == (30, 2)
    assert (limits.max_tokens_per_day, limits.max_concurrent_streams) == (200000, 3)
    assert set(sources.values()) == {"settings"}


def test_most_specific_policy_wins_field_by_field():
    QuotaPolicy.objects.create(
        scope="type", target="worker", max_requests_per_minute=10, max_tokens_per_day=500
    )
    QuotaPolicy.objects.create(
        scope="tag", target="gpu", max_requests_per_minute=20, max_concurrent_streams=7
    )
    QuotaPolicy.objects.create(scope="node", target="n1", max_requests_per_minute=40)

    limits, sources = effective(tags=["gpu"])
    assert limits.max_requests_per_minute == 40  # node beats tag and type
    assert limits.max_concurrent_streams == 7  # tag; the node policy left it empty
    assert limits.max_tokens_per_day == 500  # type
    assert limits.burst_multiplier == 2  # nobody set it
    assert sources == {
        "max_requests_per_minute": "node:n1",
        "burst_multiplier": "settings",
        "max_tokens_per_day": "type:worker",
        "max_concurrent_streams": "tag:gpu",
    }


def test_policies_of_other_nodes_types_and_tags_do_not_apply():
    QuotaPolicy.objects.create(scope="type", target="companion", max_requests_per_minute=1)
    QuotaPolicy.objects.create(scope="tag", target="cheap", max_requests_per_minute=2)
    QuotaPolicy.objects.create(scope="node", target="n2", max_requests_per_minute=3)
    limits, _ = effective(node_id="n1", node_type="worker", tags=["gpu"])
    assert limits.max_requests_per_minute == 30


def test_with_several_tags_the_strictest_wins():
    QuotaPolicy.objects.create(scope="tag", target="gpu", max_tokens_per_day=1000)
    QuotaPolicy.objects.create(scope="tag", target="trial", max_tokens_per_day=100)
    limits, sources = effective(tags=["gpu", "trial"])
    assert limits.max_tokens_per_day == 100
    assert sources["max_tokens_per_day"] == "tag:trial"


def test_a_type_policy_must_name_a_node_type():
    with pytest.raises(ValidationError):
        QuotaPolicy(scope="type", target="robot").full_clean()
    QuotaPolicy(scope="type", target="companion").full_clean()
    with pytest.raises(ValidationError):
        QuotaPolicy(scope="node", target="n1", burst_multiplier=0.5).full_clean()


def test_quota_status_shows_limits_usage_and_sources():
    Node.objects.create(node_id="n1", name="n1", type="companion", tags=["gpu"])
    QuotaPolicy.objects.create(scope="tag", target="gpu", max_concurrent_streams=5)
    QuotaPolicy.objects.create(scope="node", target="n1", max_requests_per_minute=10, burst_multiplier=1)
    for request_id in ("a", "b"):
        services.quota_acquire(
            node_id="n1",
            node_type="companion",
            node_tags=["gpu"],
            stream=True,
            connection_id="c-1",
            request_id=request_id,
        )
    services.quota_record_tokens(node_id="n1", tokens=321)

    status = quota_status("n1")

    assert status["nodeId"] == "n1"
    assert status["limits"] == {
        "maxRequestsPerMinute": 10,
        "burstMultiplier": 1.0,
        "maxTokensPerDay": 200000,
        "maxConcurrentStreams": 5,
    }
    assert status["usage"]["tokensToday"] == 321
    assert status["usage"]["activeStreams"] == 2
    assert 7.9 < status["usage"]["requestTokensAvailable"] <= 8.1
    assert status["policySources"]["maxRequestsPerMinute"] == "node:n1"
    assert status["policySources"]["maxConcurrentStreams"] == "tag:gpu"
    assert status["policySources"]["maxTokensPerDay"] == "settings"


def test_quota_status_follows_usage_on_both_backends(backend):
    Node.objects.create(node_id="quiet", name="quiet")
    status = quota_status("quiet")
    assert status["usage"] == {"requestTokensAvailable": 60.0, "tokensToday": 0, "activeStreams": 0}

    services.quota_acquire(
        node_id="quiet", node_type="worker", node_tags=[], stream=True, connection_id="c-1", request_id="r"
    )
    usage = quota_status("quiet")["usage"]
    assert 58.9 < usage["requestTokensAvailable"] < 59.1
    assert usage["activeStreams"] == 1


def test_quota_status_of_an_unknown_node_raises_does_not_exist():
    with pytest.raises(Node.DoesNotExist):
        quota_status("nobody")
