"""Reads of the LLM request log (the hub stats endpoint, the dashboard)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Count, Q, Sum

from llmproxy.models import LLMOutcome, LLMRequestLog


def _utc_day_start() -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    return dt.datetime.combine(now.date(), dt.time(), tzinfo=dt.UTC)


def llm_stats_today() -> dict[str, Any]:
    """Hub-wide LLM figures of the current UTC day, camelCase for the wire.

    ``requests`` counts every request a node made, refused ones included;
    ``tokens`` is prompt + completion tokens of all of them.
    """
    figures = LLMRequestLog.objects.filter(created_at__gte=_utc_day_start()).aggregate(
        requests=Count("id"),
        succeeded=Count("id", filter=Q(outcome=LLMOutcome.SUCCEEDED)),
        failed=Count("id", filter=Q(outcome=LLMOutcome.FAILED)),
        cancelled=Count("id", filter=Q(outcome=LLMOutcome.CANCELLED)),
        rate_limited=Count("id", filter=Q(outcome=LLMOutcome.RATE_LIMITED)),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        tokens=Sum("total_tokens"),
    )
    return {
        "requests": figures["requests"],
        "succeeded": figures["succeeded"],
        "failed": figures["failed"],
        "cancelled": figures["cancelled"],
        "rateLimited": figures["rate_limited"],
        "promptTokens": figures["prompt_tokens"] or 0,
        "completionTokens": figures["completion_tokens"] or 0,
        "tokens": figures["tokens"] or 0,
    }
