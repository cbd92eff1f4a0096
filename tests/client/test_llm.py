"""``node.llm()`` / ``node.llm_stream()`` against the fake hub's LLM proxy (PROTOCOL §4)."""

from __future__ import annotations

import asyncio

import pytest

from nodes.client import (
    LLMCancelled,
    LLMConnectionError,
    LLMError,
    LLMUnavailable,
    QuotaExceeded,
    UpstreamError,
)
from tests.client.fake_hub import FakeHub, HubConnection

USAGE = {"promptTokens": 3, "completionTokens": 2, "totalTokens": 5}


def response(request: dict, **fields) -> dict:
    return {"requestId": request["requestId"], "nodeId": request.get("nodeId"), **fields}


async def answer(connection: HubConnection, request: dict) -> None:
    """Answers "echo: <last message>", streamed in words when asked to."""
    text = f"echo: {request['messages'][-1]['content']}"
    if request["options"].get("stream"):
        for word in text.split(" "):
            await connection.send("llm_response_stream", response(request, chunk=word + " ", done=False))
        await connection.send("llm_response_stream", response(request, chunk="", done=True, usage=USAGE))
        text = text + " "
    await connection.send(
        "llm_response",
        response(request, success=True, content=text, usage=USAGE, model="fake-model", stream=False),
    )


def refuse(code: str, details: dict | None = None):
    async def handler(connection: HubConnection, request: dict) -> None:
        error = {"code": code, "message": f"refused: {code}", "details": details or {}}
        await connection.send("llm_response", response(request, success=False, error=error))

    return handler


@pytest.fixture
async def llm_hub():
    hub = await FakeHub().start()
    yield hub
    await hub.stop()


@pytest.fixture
async def node(llm_hub, make_node):
    node = make_node(llm_hub, node_id="llm-node")
    await node.wait_registered(5)
    return node


async def test_llm_returns_the_answer_and_sends_a_well_formed_request(llm_hub, node):
    llm_hub.llm_handler = answer
    result = await node.llm([{"role": "user", "content": "hi"}], model="m1", max_tokens=20, temperature=0.1)

    assert result.content == "echo: hi" and str(result) == "echo: hi"
    assert result.usage == USAGE and result.model == "fake-model"
    [frame] = llm_hub.of_type("llm_request")
    assert frame.data["nodeId"] == "llm-node"
    assert frame.data["model"] == "m1"
    assert frame.data["messages"] == [{"role": "user", "content": "hi"}]
    assert frame.data["options"] == {"maxTokens": 20, "temperature": 0.1, "stream": False}
    assert frame.data["requestId"] == result.request_id


async def test_concurrent_requests_are_matched_by_request_id(llm_hub, node):
    async def answer_in_reverse(connection: HubConnection, request: dict) -> None:
        if len(llm_hub.of_type("llm_request")) < 3:
            return
        for frame in reversed(llm_hub.of_type("llm_request")):
            await answer(connection, frame.data)

    llm_hub.llm_handler = answer_in_reverse
    results = await asyncio.gather(*(node.llm(f"q{n}") for n in range(3)))
    assert [r.content for r in results] == ["echo: q0", "echo: q1", "echo: q2"]
    assert len({r.request_id for r in results}) == 3


async def test_stream_yields_chunks_and_aggregates_them(llm_hub, node):
    llm_hub.llm_handler = answer
    stream = node.llm_stream("tell me more")
    chunks = [chunk async for chunk in stream]

    assert chunks == ["echo: ", "tell ", "me ", "more "]
    assert stream.content == "echo: tell me more "
    assert stream.usage == USAGE
    assert stream.result is not None and stream.result.content == stream.content
    [frame] = llm_hub.of_type("llm_request")
    assert frame.data["options"]["stream"] is True


async def test_quota_exceeded_says_when_to_retry(llm_hub, node):
    llm_hub.llm_handler = refuse(
        "quota_exceeded",
        {"limit": "maxRequestsPerMinute", "limitValue": 30, "current": 30, "retryAfterMs": 1500},
    )
    with pytest.raises(QuotaExceeded) as raised:
        await node.llm("hi")
    assert raised.value.retry_after == 1.5
    assert raised.value.limit == "maxRequestsPerMinute"
    assert isinstance(raised.value, LLMError) and raised.value.code == "quota_exceeded"

    # A stream refused before it starts raises the same way
    with pytest.raises(QuotaExceeded):
        async for _chunk in node.llm_stream("hi"):
            pass


@pytest.mark.parametrize(
    ("code", "error_class"),
    [("llm_unavailable", LLMUnavailable), ("upstream_timeout", UpstreamError), ("cancelled", LLMCancelled)],
)
async def test_hub_errors_are_typed(llm_hub, node, code, error_class):
    llm_hub.llm_handler = refuse(code)
    with pytest.raises(error_class) as raised:
        await node.llm("hi")
    assert raised.value.code == code and "refused" in raised.value.message


async def test_llm_cancel_ends_the_request_with_cancelled(llm_hub, node):
    async def wait_for_cancel(connection: HubConnection, request: dict) -> None:
        return None  # answered when the cancel arrives, below

    llm_hub.llm_handler = wait_for_cancel
    call = asyncio.create_task(node.llm("long question"))
    [request] = await llm_hub.wait_for("llm_request")

    await node.llm_cancel(request.data["requestId"])
    [cancel] = await llm_hub.wait_for("llm_cancel")
    assert cancel.data["requestId"] == request.data["requestId"]
    error = {"code": "cancelled", "message": "cancelled by the node"}
    await llm_hub.send("llm_response", response(request.data, success=False, error=error))

    with pytest.raises(LLMCancelled):
        await call


async def test_leaving_a_stream_early_cancels_it_at_the_hub(llm_hub, node):
    async def endless(connection: HubConnection, request: dict) -> None:
        for n in range(3):
            await connection.send("llm_response_stream", response(request, chunk=f"c{n}", done=False))

    llm_hub.llm_handler = endless
    async for chunk in node.llm_stream("go"):
        assert chunk == "c0"
        break
    [request] = llm_hub.of_type("llm_request")
    [cancel] = await llm_hub.wait_for("llm_cancel")
    assert cancel.data["requestId"] == request.data["requestId"]


async def test_connection_lost_fails_requests_in_flight(llm_hub, node):
    async def never(connection: HubConnection, request: dict) -> None:
        return None

    llm_hub.llm_handler = never
    call = asyncio.create_task(node.llm("anyone?"))
    await llm_hub.wait_for("llm_request")
    await llm_hub.drop_connections()
    with pytest.raises(LLMConnectionError) as raised:
        await call
    assert raised.value.code == "connection_lost"
