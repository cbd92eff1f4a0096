"""Reads of the quota state: the effective limits of a node (its ``QuotaPolicy``
rows over the settings defaults) and its current usage
(``GET /api/admin/quotas/<nodeId>``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db.models import Q

from quotas.limiter import QuotaLimits, get_limiter, tokens_today
from quotas.models import QuotaPolicy, QuotaScope

# Model field -> wire name, in the order the limits are reported.
LIMIT_FIELDS: dict[str, str] = {
    "max_requests_per_minute": "maxRequestsPerMinute",
    "burst_multiplier": "burstMultiplier",
    "max_tokens_per_day": "maxTokensPerDay",
    "max_concurrent_streams": "maxConcurrentStreams",
}


def quota_defaults() -> dict[str, Any]:
    return {
        "max_requests_per_minute": settings.APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE,
        "burst_multiplier": settings.APEXBRIDGE_QUOTA_BURST_MULTIPLIER,
        "max_tokens_per_day": settings.APEXBRIDGE_QUOTA_MAX_TOKENS_PER_DAY,
        "max_concurrent_streams": settings.APEXBRIDGE_QUOTA_MAX_CONCURRENT_STREAMS,
    }


def quota_limits_effective(
    *, node_id: str, node_type: str, node_tags: Iterable[str]
) -> tuple[QuotaLimits, dict[str, str]]:
    """The limits that apply to a node, and where each one comes from.

    The most specific policy wins (node > tag > type > settings), field by field: a
    field left empty inherits. When several tags of the node have a policy for the
    same field, the strictest (smallest) value wins, so adding a tag can never
    loosen a limit another tag sets.
    """
    tags = [tag for tag in node_tags if tag]
    policies = list(
        QuotaPolicy.objects.filter(
            Q(scope=QuotaScope.NODE, target=node_id)
            | Q(scope=QuotaScope.NODE_TYPE, target=node_type)
            | Q(scope=QuotaScope.TAG, target__in=tags)
        )
    )
    by_scope: dict[str, list[QuotaPolicy]] = {scope: [] for scope in QuotaScope.values}
    for policy in policies:
        by_scope[policy.scope].append(policy)

    values = quota_defaults()
    sources = dict.fromkeys(values, "settings")
    for scope in (QuotaScope.NODE_TYPE, QuotaScope.TAG, QuotaScope.NODE):
        for field in values:
            candidates = [
                (getattr(p, field), p.target) for p in by_scope[scope] if getattr(p, field) is not None
            ]
            if candidates:
                value, target = min(candidates, key=lambda item: item[0])
                values[field] = value
                sources[field] = f"{scope}:{target}"
    limits = QuotaLimits(
        max_requests_per_minute=int(values["max_requests_per_minute"]),
        burst_multiplier=float(values["burst_multiplier"]),
        max_tokens_per_day=int(values["max_tokens_per_day"]),
        max_concurrent_streams=int(values["max_concurrent_streams"]),
    )
    return limits, sources


def quota_status(node_id: str) -> dict[str, Any]:
    """Effective limits and current usage of a registered node, ready for the wire.

    Raises ``nodes.models.Node.DoesNotExist`` for a node that is not registered.
    """
    from nodes.models import Node

    node = Node.objects.only("node_id", "type", "tags").get(node_id=node_id)
    limits, sources = quota_limits_effective(
        node_id=node.node_id, node_type=node.type, node_tags=node.tags or []
    )
    state = get_limiter().state(node.node_id, limits)
    return {
        "nodeId": node.node_id,
        "limits": {
            "maxRequestsPerMinute": limits.max_requests_per_minute,
            "burstMultiplier": limits.burst_multiplier,
            "maxTokensPerDay": limits.max_tokens_per_day,
            "maxConcurrentStreams": limits.max_concurrent_streams,
        },
        "usage": {
            "requestTokensAvailable": round(state.request_tokens_available, 3),
            "tokensToday": tokens_today(node.node_id),
            "activeStreams": state.active_streams,
        },
        "policySources": {LIMIT_FIELDS[field]: source for field, source in sources.items()},
    }
