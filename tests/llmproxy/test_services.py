"""llmproxy.services: model rules and one request run end to end against the
loopback upstream, without a WebSocket (frames go to a list)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from channels.db import database_sync_to_async

from llmproxy import services
from llmproxy.models import LLMOutcome, LLMRequestLog
from llmproxy.selectors import llm_stats_today
from nodes.protocol import ProtocolError
from quotas.limiter import tokens_today
from quotas.models import QuotaPolicy
from tests.llm_server import COMPLETION_TOKENS, PROMPT_TOKENS, REPLY_CHUNKS, REPLY_TEXT
from tests.llmproxy.conftest import eventually

UPSTREAM_TOTAL = PROMPT_TOKENS + COMPLETION_TOKENS


class Frames:
    """Stands in for the node connection: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.first_chunk = asyncio.Event()

    async def __call__(self, message_type: str, data: dict) -> None:
        self.sent.append((message_type, data))
        if message_type == "llm_response_stream":
            self.first_chunk.set()

    def of(self, message_type: str) -> list[dict]:
        return [data for kind, data in self.sent if kind == message_type]


def make_call(text: str, *, model: str = "openai/test-model", stream: bool = False, node_id=None, **extra):
    return services.LLMCall(
        request_id=extra.pop("request_id", f"r-{uuid.uuid4().hex[:8]}"),
        node_id=node_id or f"node-{uuid.uuid4().hex[:8]}",
        node_type=extra.pop("node_type", "worker"),
        node_tags=extra.pop("node_tags", []),
        connection_id=extra.pop("connection_id", "c-test"),
        model=model,
        messages=[{"role": "user", "content": text}],
        params=extra.pop("params", {}),
        stream=stream,
    )


def logs(**filters) -> list[LLMRequestLog]:
    return list(LLMRequestLog.objects.filter(**filters))


# --- configuration ---------------------------------------------------------------------------
def test_llm_available_only_with_a_model(settings):
    assert services.llm_available() is True
    settings.APEXBRIDGE_LLM_MODEL = None
    assert services.llm_available() is False
    settings.APEXBRIDGE_LLM_MODELS = ["openai/a", "openai/b"]
    assert services.llm_available() is True
    assert services.llm_resolve_model(None) == "openai/a"


def test_model_defaults_and_allowlist(settings):
    assert services.llm_resolve_model(None) == "openai/test-model"
    assert services.llm_resolve_model("openai/other") == "openai/other"  # no allowlist: any model
    settings.APEXBRIDGE_LLM_MODELS = ["openai/test-model", "openai/small"]
    assert services.llm_resolve_model("openai/small") == "openai/small"
    with pytest.raises(ProtocolError) as caught:
        services.llm_resolve_model("openai/expensive")
    assert caught.value.code == "model_not_allowed"


def test_no_model_means_llm_unavailable(settings):
    settings.APEXBRIDGE_LLM_MODEL = None
    with pytest.raises(ProtocolError) as caught:
        services.llm_resolve_model("openai/test-model")
    assert caught.value.code == "llm_unavailable"


# --- one request -------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
async def test_plain_request_answers_once_and_is_counted(marker, admin_events):
    call = make_call(marker())
    frames = Frames()
    await services.llm_call_run(call, frames)

    assert [kind for kind, _ in frames.sent] == ["llm_response"]
    reply = frames.of("llm_response")[0]
    assert reply["success"] is True
    assert reply["requestId"] == call.request_id and reply["nodeId"] == call.node_id
    assert reply["content"] == REPLY_TEXT
    assert reply["usage"] == {
        "promptTokens": PROMPT_TOKENS,
        "completionTokens": COMPLETION_TOKENS,
        "totalTokens": UPSTREAM_TOTAL,
    }
    assert reply["model"] == "openai/test-model" and reply["stream"] is False
    assert isinstance(reply["timestamp"], int)

    (row,) = await database_sync_to_async(logs)(node_id=call.node_id)
    assert (row.outcome, row.total_tokens, row.usage_estimated) == (
        LLMOutcome.SUCCEEDED,
        UPSTREAM_TOTAL,
        False,
    )
    assert row.latency_ms is not None
    assert await database_sync_to_async(tokens_today)(call.node_id) == UPSTREAM_TOTAL

    requested = await admin_events.next_of("llm_proxy_request")
    assert requested["requestId"] == call.request_id and requested["model"] == "openai/test-model"
    completed = await admin_events.next_of("llm_proxy_completed")
    assert completed["nodeId"] == call.node_id
    assert completed["usage"]["totalTokens"] == UPSTREAM_TOTAL
    assert isinstance(completed["timestamp"], int)


@pytest.mark.django_db(transaction=True)
async def test_stream_sends_chunks_then_done_then_whole_response(llm_server, marker, admin_events):
    text = marker()
    call = make_call(text, stream=True)
    frames = Frames()
    await services.llm_call_run(call, frames)

    kinds = [kind for kind, _ in frames.sent]
    assert kinds == ["llm_response_stream"] * (len(REPLY_CHUNKS) + 1) + ["llm_response"]
    chunks = frames.of("llm_response_stream")
    assert [c["chunk"] for c in chunks[:-1]] == REPLY_CHUNKS
    assert chunks[0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert all(c["done"] is False and c["requestId"] == call.request_id for c in chunks[:-1])
    done = chunks[-1]
    assert done["done"] is True and done["chunk"] == ""
    assert done["usage"]["totalTokens"] == UPSTREAM_TOTAL
    final = frames.of("llm_response")[0]
    assert final["success"] is True and final["stream"] is True
    assert final["content"] == REPLY_TEXT
    assert final["usage"] == done["usage"]
    assert llm_server.requests_for(text)[0].body["stream_options"] == {"include_usage": True}

    completed = await admin_events.next_of("llm_proxy_stream_completed")
    assert completed["usage"]["totalTokens"] == UPSTREAM_TOTAL
    assert await database_sync_to_async(tokens_today)(call.node_id) == UPSTREAM_TOTAL


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stream", [False, True])
async def test_missing_upstream_usage_is_counted_locally_and_logged(marker, caplog, stream):
    call = make_call(marker(), model="openai/no-usage", stream=stream)
    frames = Frames()
    with caplog.at_level(logging.INFO, logger="llmproxy.services"):
        await services.llm_call_run(call, frames)

    usage = frames.of("llm_response")[0]["usage"]
    assert usage["promptTokens"] > 0 and usage["completionTokens"] > 0
    assert usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"]
    assert "reported no usage" in caplog.text
    (row,) = await database_sync_to_async(logs)(node_id=call.node_id)
    assert row.usage_estimated is True
    assert await database_sync_to_async(tokens_today)(call.node_id) == usage["totalTokens"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("rate-limited", "upstream_rate_limited"),
        ("bad-key", "upstream_auth_error"),
        ("too-long", "context_window_exceeded"),
        ("bad-request", "upstream_bad_request"),
        ("broken", "upstream_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failure_is_one_failed_response(marker, admin_events, model, code, stream):
    call = make_call(marker(), model=f"openai/{model}", stream=stream)
    frames = Frames()
    await services.llm_call_run(call, frames)

    assert [kind for kind, _ in frames.sent] == ["llm_response"]  # no done frame
    reply = frames.of("llm_response")[0]
    assert reply["success"] is False
    assert reply["requestId"] == call.request_id
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    failed = await admin_events.next_of("llm_proxy_failed")
    assert failed["error"]["code"] == code
    (row,) = await database_sync_to_async(logs)(node_id=call.node_id)
    assert (row.outcome, row.error_code, row.total_tokens) == (LLMOutcome.FAILED, code, 0)
    # A failed stream gives its slot back.
    assert await database_sync_to_async(_active_streams)(call.node_id) == 0


@pytest.mark.django_db(transaction=True)
async def test_upstream_timeout(settings, marker):
    settings.APEXBRIDGE_LLM_TIMEOUT_MS = 300
    frames = Frames()
    await services.llm_call_run(make_call(marker(), model="openai/hang"), frames)
    assert frames.of("llm_response")[0]["error"]["code"] == "upstream_timeout"


@pytest.mark.django_db(transaction=True)
async def test_cancelled_stream_closes_upstream_frees_slot_and_counts_tokens(
    llm_server, marker, admin_events
):
    text = marker()
    call = make_call(text, model="openai/slow", stream=True)
    frames = Frames()
    task = asyncio.create_task(services.llm_call_run(call, frames))
    await asyncio.wait_for(frames.first_chunk.wait(), 5)
    assert await database_sync_to_async(_active_streams)(call.node_id) == 1

    task.cancel()
    await task  # the run answers the cancellation itself

    assert await eventually(lambda: llm_server.saw_disconnect(text))
    reply = frames.of("llm_response")[-1]
    assert reply["success"] is False and reply["error"]["code"] == "cancelled"
    assert not [c for c in frames.of("llm_response_stream") if c["done"]]
    assert await database_sync_to_async(_active_streams)(call.node_id) == 0
    (row,) = await database_sync_to_async(logs)(node_id=call.node_id)
    assert row.outcome == LLMOutcome.CANCELLED and row.usage_estimated is True
    assert row.prompt_tokens > 0 and row.completion_tokens > 0
    assert await database_sync_to_async(tokens_today)(call.node_id) == row.total_tokens
    failed = await admin_events.next_of("llm_proxy_failed")
    assert failed["error"]["code"] == "cancelled"


@pytest.mark.django_db(transaction=True)
async def test_cancelled_plain_request_closes_upstream(llm_server, marker):
    text = marker()
    call = make_call(text, model="openai/slow")
    frames = Frames()
    task = asyncio.create_task(services.llm_call_run(call, frames))
    assert await eventually(lambda: bool(llm_server.requests_for(text)))
    task.cancel()
    await task
    assert await eventually(lambda: llm_server.saw_disconnect(text))
    assert frames.of("llm_response")[-1]["error"]["code"] == "cancelled"


@pytest.mark.django_db(transaction=True)
async def test_refused_request_never_reaches_upstream(llm_server, marker, admin_events, caplog):
    node_id = f"node-{uuid.uuid4().hex[:8]}"
    await database_sync_to_async(QuotaPolicy.objects.create)(
        scope="node", target=node_id, max_requests_per_minute=1, burst_multiplier=1
    )
    first, second = marker(), marker()
    frames = Frames()
    await services.llm_call_run(make_call(first, node_id=node_id), frames)
    with caplog.at_level(logging.WARNING, logger="quotas.services"):
        await services.llm_call_run(make_call(second, node_id=node_id, request_id="r-2"), frames)

    refused = frames.of("llm_response")[-1]
    assert refused["success"] is False and refused["requestId"] == "r-2"
    assert refused["error"]["code"] == "quota_exceeded"
    details = refused["error"]["details"]
    assert details["limit"] == "maxRequestsPerMinute" and details["limitValue"] == 1
    assert details["current"] == 1 and 0 < details["retryAfterMs"] <= 60_000
    assert f"[Quota] node {node_id} exceeded maxRequestsPerMinute (1 > 1)" in caplog.text
    assert llm_server.requests_for(first) and not llm_server.requests_for(second)
    limited = await admin_events.next_of("llm_proxy_rate_limited")
    assert limited["requestId"] == "r-2" and limited["error"]["code"] == "quota_exceeded"
    outcomes = sorted(row.outcome for row in await database_sync_to_async(logs)(node_id=node_id))
    assert outcomes == [LLMOutcome.RATE_LIMITED, LLMOutcome.SUCCEEDED]


@pytest.mark.django_db(transaction=True)
async def test_stats_today_add_up_requests_and_tokens(marker):
    before = await database_sync_to_async(llm_stats_today)()
    await services.llm_call_run(make_call(marker()), Frames())
    await services.llm_call_run(make_call(marker(), model="openai/broken"), Frames())
    after = await database_sync_to_async(llm_stats_today)()
    assert after["requests"] - before["requests"] == 2
    assert after["succeeded"] - before["succeeded"] == 1
    assert after["failed"] - before["failed"] == 1
    assert after["tokens"] - before["tokens"] == UPSTREAM_TOTAL


def _active_streams(node_id: str) -> int:
    from quotas.limiter import QuotaLimits, get_limiter

    return get_limiter().state(node_id, QuotaLimits(30, 2, 200000, 3)).active_streams
