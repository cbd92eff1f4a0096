"""The LLM proxy over a node's WebSocket (PROTOCOL §4), against the loopback upstream."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from llmproxy.models import LLMOutcome, LLMRequestLog
from quotas.limiter import QuotaLimits, get_limiter
from quotas.models import QuotaPolicy
from tests.llm_server import REPLY_CHUNKS, REPLY_TEXT, LoopbackLLMServer
from tests.llmproxy.conftest import eventually

pytestmark = pytest.mark.django_db(transaction=True)


def llm_request(request_id: str, text: str, **fields) -> dict:
    options = fields.pop("options", {})
    data = {"requestId": request_id, "messages": [{"role": "user", "content": text}], "options": options}
    data.update(fields)
    return data


async def until_response(node, request_id: str, timeout: float = 15) -> tuple[list[dict], dict]:
    """Frames of one request: its stream frames, then its llm_response."""
    streamed = []
    while True:
        frame = await node.receive(timeout)
        if frame["data"].get("requestId") != request_id:
            continue
        if frame["type"] == "llm_response_stream":
            streamed.append(frame["data"])
        elif frame["type"] == "llm_response":
            return streamed, frame["data"]


async def registered(node_socket, node_id: str = "n1", **fields):
    node = await node_socket()
    reply = await node.register(node_id, **fields)
    assert reply["data"]["success"] is True
    return node, reply


def active_streams(node_id: str) -> int:
    return get_limiter().state(node_id, QuotaLimits(30, 2, 200000, 3)).active_streams


async def test_hub_info_says_whether_the_llm_proxy_is_available(node_socket, settings):
    _, reply = await registered(node_socket, "with-llm")
    assert reply["data"]["hubInfo"]["llmAvailable"] is True

    settings.APEXBRIDGE_LLM_MODEL = None
    _, reply = await registered(node_socket, "without-llm")
    assert reply["data"]["hubInfo"]["llmAvailable"] is False


async def test_plain_request_gets_one_response(node_socket, marker):
    node, _ = await registered(node_socket)
    await node.send("llm_request", llm_request("r-1", marker(), nodeId="n1"))
    streamed, reply = await until_response(node, "r-1")

    assert streamed == []
    assert reply["success"] is True and reply["nodeId"] == "n1"
    assert reply["content"] == REPLY_TEXT
    assert reply["usage"]["totalTokens"] > 0
    assert reply["stream"] is False


async def test_streaming_request_gets_chunks_done_and_the_whole_content(node_socket, marker):
    node, _ = await registered(node_socket)
    await node.send("llm_request", llm_request("r-s", marker(), options={"stream": True}))
    streamed, reply = await until_response(node, "r-s")

    assert [f["chunk"] for f in streamed if not f["done"]] == REPLY_CHUNKS
    assert streamed[-1]["done"] is True and streamed[-1]["usage"]["totalTokens"] > 0
    assert reply["success"] is True and reply["stream"] is True and reply["content"] == REPLY_TEXT


async def test_a_node_cannot_redirect_the_hubs_credentials(node_socket, marker, llm_server):
    evil = LoopbackLLMServer().start()
    try:
        node, _ = await registered(node_socket)
        text = marker()
        options = {
            "api_base": evil.api_base,
            "apiBase": evil.api_base,
            "base_url": evil.api_base,
            "baseUrl": evil.api_base,
            "api_key": "sk-node",
            "apiKey": "sk-node",
            "temperature": 0.5,
        }
        await node.send("llm_request", llm_request("r-1", text, options=options))
        _, reply = await until_response(node, "r-1")

        assert reply["success"] is True
        assert evil.requests == []
        (seen,) = llm_server.requests_for(text)
        assert seen.headers["Authorization"] == "Bearer sk-test"
        assert seen.body["temperature"] == 0.5
        assert not {"api_base", "base_url", "api_key"} & set(seen.body)
    finally:
        evil.stop()


async def test_upstream_error_reaches_the_node_with_its_code(node_socket, marker):
    node, _ = await registered(node_socket)
    await node.send("llm_request", llm_request("r-1", marker(), model="openai/too-long"))
    _, reply = await until_response(node, "r-1")
    assert reply["success"] is False
    assert reply["error"]["code"] == "context_window_exceeded"
    assert "maximum context length" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("setup", "data", "code"),
    [
        ("no_model", {}, "llm_unavailable"),
        ("allowlist", {"model": "openai/expensive"}, "model_not_allowed"),
        (None, {"messages": []}, "invalid_payload"),
        (None, {"nodeId": "someone-else"}, "node_mismatch"),
        (None, {"options": {"stream": "yes"}}, "invalid_payload"),
    ],
)
async def test_refused_requests_are_answered_and_never_reach_upstream(
    node_socket, settings, marker, llm_server, setup, data, code
):
    if setup == "no_model":
        settings.APEXBRIDGE_LLM_MODEL = None
    elif setup == "allowlist":
        settings.APEXBRIDGE_LLM_MODELS = ["openai/test-model"]
    node, _ = await registered(node_socket)
    text = marker()
    await node.send("llm_request", {**llm_request("r-1", text), **data})
    _, reply = await until_response(node, "r-1")
    assert reply["success"] is False and reply["error"]["code"] == code
    assert llm_server.requests_for(text) == []


async def test_llm_request_before_registration_is_refused(node_socket, marker):
    node = await node_socket()
    reply = await node.request("llm_request", llm_request("r-1", marker()))
    assert reply["type"] == "error" and reply["data"]["code"] == "not_registered"


async def test_duplicate_request_id_in_flight_is_refused(node_socket, marker, settings):
    # The cancel must reach the hub while "slow" still waits (30 s): on a loaded CI
    # machine (PostgreSQL + Redis) the replies before it took over the usual 10 s.
    settings.APEXBRIDGE_LLM_TIMEOUT_MS = 25_000
    node, _ = await registered(node_socket)
    await node.send("llm_request", llm_request("r-1", marker(), model="openai/slow"))
    await node.send("llm_request", llm_request("r-1", marker()))
    _, reply = await until_response(node, "r-1")
    assert reply["success"] is False and reply["error"]["code"] == "duplicate_request"

    await node.send("llm_cancel", {"requestId": "r-1"})
    _, reply = await until_response(node, "r-1")
    assert reply["error"]["code"] == "cancelled"
    # Once finished, the id may be used again.
    await node.send("llm_request", llm_request("r-1", marker()))
    _, reply = await until_response(node, "r-1")
    assert reply["success"] is True


async def test_a_long_request_does_not_block_the_connection(node_socket, marker, settings):
    settings.APEXBRIDGE_LLM_TIMEOUT_MS = 25_000  # as above: the cancel must beat the time-out
    node, _ = await registered(node_socket)
    await node.send("llm_request", llm_request("r-slow", marker(), model="openai/slow"))
    ack = await node.request("heartbeat", {"nodeId": "n1"})
    assert ack["type"] == "heartbeat_ack"
    await node.send("llm_request", llm_request("r-quick", marker()))
    _, reply = await until_response(node, "r-quick")
    assert reply["success"] is True
    await node.send("llm_cancel", {"requestId": "r-slow"})
    _, reply = await until_response(node, "r-slow")
    assert reply["error"]["code"] == "cancelled"


async def test_llm_cancel_closes_the_upstream_stream_and_frees_the_slot(node_socket, marker, llm_server):
    await database_sync_to_async(QuotaPolicy.objects.create)(
        scope="node", target="n1", max_concurrent_streams=1
    )
    node, _ = await registered(node_socket)
    text = marker()
    await node.send("llm_request", llm_request("r-1", text, model="openai/slow", options={"stream": True}))
    first = await node.receive_type("llm_response_stream")
    assert first["data"]["chunk"] == "tick "

    await node.send("llm_cancel", {"requestId": "r-1", "nodeId": "n1"})
    _, reply = await until_response(node, "r-1")

    assert reply["success"] is False and reply["error"]["code"] == "cancelled"
    assert await eventually(lambda: llm_server.saw_disconnect(text))
    # The slot is free: another stream is admitted at once.
    await node.send("llm_request", llm_request("r-2", marker(), options={"stream": True}))
    _, reply = await until_response(node, "r-2")
    assert reply["success"] is True
    row = await LLMRequestLog.objects.aget(node_id="n1", request_id="r-1")
    assert row.outcome == LLMOutcome.CANCELLED and row.total_tokens > 0


async def test_cancel_of_an_unknown_request_changes_nothing(node_socket):
    node, _ = await registered(node_socket)
    await node.send("llm_cancel", {"requestId": "never-sent"})
    assert await node.nothing_received()


async def test_disconnect_closes_upstream_calls_and_frees_slots(node_socket, marker, llm_server):
    node, _ = await registered(node_socket)
    stream_text, plain_text = marker("stream"), marker("plain")
    await node.send(
        "llm_request", llm_request("r-1", stream_text, model="openai/slow", options={"stream": True})
    )
    await node.receive_type("llm_response_stream")
    await node.send("llm_request", llm_request("r-2", plain_text, model="openai/slow"))
    assert await eventually(lambda: bool(llm_server.requests_for(plain_text)))
    assert await database_sync_to_async(active_streams)("n1") == 1

    await node.close()

    assert await eventually(lambda: llm_server.saw_disconnect(stream_text))
    assert await eventually(lambda: llm_server.saw_disconnect(plain_text))
    assert await database_sync_to_async(active_streams)("n1") == 0
    outcomes = {row.outcome async for row in LLMRequestLog.objects.filter(node_id="n1")}
    assert outcomes == {LLMOutcome.CANCELLED}


async def test_stream_quota_is_per_node(node_socket, marker):
    await database_sync_to_async(QuotaPolicy.objects.create)(
        scope="type", target="worker", max_concurrent_streams=1
    )
    first, _ = await registered(node_socket, "n1")
    second, _ = await registered(node_socket, "n2")
    await first.send(
        "llm_request", llm_request("r-1", marker(), model="openai/slow", options={"stream": True})
    )
    await first.receive_type("llm_response_stream")

    await first.send("llm_request", llm_request("r-2", marker(), options={"stream": True}))
    _, refused = await until_response(first, "r-2")
    assert refused["success"] is False and refused["error"]["code"] == "quota_exceeded"
    assert refused["error"]["details"]["limit"] == "maxConcurrentStreams"
    assert refused["error"]["details"]["limitValue"] == 1 and refused["error"]["details"]["current"] == 1
    assert refused["error"]["details"]["retryAfterMs"] > 0

    # Another node is not held back by n1's streams.
    await second.send("llm_request", llm_request("r-1", marker(), options={"stream": True}))
    _, reply = await until_response(second, "r-1")
    assert reply["success"] is True
    await first.send("llm_cancel", {"requestId": "r-1"})
    await until_response(first, "r-1")


async def test_twenty_requests_at_once_against_five_admit_exactly_five(node_socket, marker):
    await database_sync_to_async(QuotaPolicy.objects.create)(
        scope="node", target="n1", max_requests_per_minute=5, burst_multiplier=1
    )
    node, _ = await registered(node_socket)
    for i in range(20):
        await node.send("llm_request", llm_request(f"r-{i}", marker()))
    replies = []
    while len(replies) < 20:
        frame = await node.receive_type("llm_response", timeout=10)
        replies.append(frame["data"])

    assert sum(r["success"] for r in replies) == 5
    refused = [r for r in replies if not r["success"]]
    assert {r["error"]["code"] for r in refused} == {"quota_exceeded"}
    assert {r["error"]["details"]["limit"] for r in refused} == {"maxRequestsPerMinute"}
    assert sorted(r["requestId"] for r in replies) == sorted(f"r-{i}" for i in range(20))


async def test_daily_tokens_used_through_the_socket_are_enforced(node_socket, marker):
    await database_sync_to_async(QuotaPolicy.objects.create)(scope="node", target="n1", max_tokens_per_day=10)
    node, _ = await registered(node_socket)
    await node.send("llm_request", llm_request("r-1", marker()))
    _, reply = await until_response(node, "r-1")
    assert reply["success"] is True and reply["usage"]["totalTokens"] >= 10

    await node.send("llm_request", llm_request("r-2", marker()))
    _, reply = await until_response(node, "r-2")
    assert reply["error"]["code"] == "quota_exceeded"
    details = reply["error"]["details"]
    assert details["limit"] == "maxTokensPerDay"
    assert details["limitValue"] == 10 and details["current"] >= 10


async def test_requests_run_concurrently(node_socket, marker):
    node, _ = await registered(node_socket)
    await node.send(
        "llm_request", llm_request("slow-a", marker(), model="openai/slow", options={"stream": True})
    )
    await node.send(
        "llm_request", llm_request("slow-b", marker(), model="openai/slow", options={"stream": True})
    )
    seen = set()
    while seen != {"slow-a", "slow-b"}:
        frame = await node.receive_type("llm_response_stream")
        seen.add(frame["data"]["requestId"])
    for request_id in ("slow-a", "slow-b"):
        await node.send("llm_cancel", {"requestId": request_id})
    ended = {}
    while len(ended) < 2:
        frame = await node.receive_type("llm_response")
        ended[frame["data"]["requestId"]] = frame["data"]["error"]["code"]
    assert ended == {"slow-a": "cancelled", "slow-b": "cancelled"}
