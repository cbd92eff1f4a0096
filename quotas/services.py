"""Quota writes (PROTOCOL §4.3): admit an LLM request, free its stream slot,
count the tokens it used. Synchronous; async callers use ``database_sync_to_async``."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.conf import settings

from quotas.limiter import (
    TOKENS_PER_DAY,
    Refusal,
    add_tokens_today,
    get_limiter,
    ms_until_next_utc_day,
    slot_key,
    tokens_today,
)
from quotas.selectors import quota_limits_effective

logger = logging.getLogger(__name__)


def stream_lease_ms() -> int:
    """How long a stream slot is held without renewal (the stream renews it at a third)."""
    return max(60_000, 2 * settings.APEXBRIDGE_LLM_TIMEOUT_MS)


def quota_acquire(
    *,
    node_id: str,
    node_type: str,
    node_tags: Iterable[str],
    stream: bool,
    connection_id: str,
    request_id: str,
) -> Refusal | None:
    """Admit one LLM request of a node, or say which limit refuses it.

    An admitted request has taken one token of the node's bucket and, when
    ``stream``, one stream slot (free it with ``quota_release_stream``).
    """
    limits, _sources = quota_limits_effective(node_id=node_id, node_type=node_type, node_tags=node_tags)
    used_today = tokens_today(node_id)
    if used_today >= limits.max_tokens_per_day:
        refusal: Refusal | None = Refusal(
            TOKENS_PER_DAY, limits.max_tokens_per_day, used_today, ms_until_next_utc_day()
        )
    else:
        refusal = get_limiter().acquire(
            node_id,
            limits,
            stream=stream,
            key=slot_key(connection_id, request_id),
            connection_id=connection_id,
            lease_ms=stream_lease_ms(),
        )
    if refusal is not None:
        logger.warning(
            "[Quota] node %s exceeded %s (%s > %s)",
            node_id,
            refusal.limit,
            refusal.current,
            refusal.limit_value,
        )
    return refusal


def quota_renew_stream(*, node_id: str, connection_id: str, request_id: str) -> None:
    get_limiter().renew(node_id, slot_key(connection_id, request_id), stream_lease_ms())


def quota_release_stream(*, node_id: str, connection_id: str, request_id: str) -> None:
    """Free a stream slot. Safe to call for a slot that was never taken."""
    get_limiter().release(node_id, slot_key(connection_id, request_id))


def quota_release_connection(*, node_id: str, connection_id: str) -> int:
    """Free every stream slot a connection still holds; returns how many."""
    return get_limiter().release_connection(node_id, connection_id)


def quota_record_tokens(*, node_id: str, tokens: int) -> None:
    """Add tokens (prompt + completion) to the node's total of the UTC day."""
    add_tokens_today(node_id, tokens)
