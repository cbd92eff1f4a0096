"""A node calls a model through a real hub process: node client -> hub process -> litellm ->
the loopback OpenAI-compatible server, over real sockets and HTTP."""

import asyncio

import pytest

from nodes.client import Node, QuotaExceeded
from tests.e2e.harness import SHARED_KEY
from tests.llm_server import REPLY_CHUNKS, REPLY_TEXT, LoopbackLLMServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def llm_server():
    server = LoopbackLLMServer().start()
    yield server
    server.stop()


def llm_env(server: LoopbackLLMServer, **extra: str) -> dict[str, str]:
    env = {
        "APEXBRIDGE_LLM_MODEL": "openai/test-model",
        "APEXBRIDGE_LLM_API_BASE": server.api_base,
        "APEXBRIDGE_LLM_API_KEY": "sk-hub-secret-key",
    }
    env.update(extra)
    return env


async def start_node(hub, tmp_path, name: str) -> tuple[Node, asyncio.Task]:
    node = Node(name, key=SHARED_KEY, hub=hub.ws_base, state_file=tmp_path / f"{name}.json")
    runner = asyncio.create_task(node.run())
    assert await node.wait_registered(15)
    return node, runner


async def stop_node(node: Node, runner: asyncio.Task) -> None:
    node.request_stop()
    await asyncio.wait_for(runner, 20)


@pytest.mark.parametrize("backend", ["embedded", "services"])
async def test_node_streams_a_completion_through_the_hub(make_hub, llm_server, tmp_path, backend):
    # Given a hub configured with a model behind the loopback server, and a node
    hub = make_hub(backend, env=llm_env(llm_server))
    node, runner = await start_node(hub, tmp_path, "llm-node")
    try:
        # When the node streams a completion, passing an api_base of its own
        stream = node.llm_stream(
            [{"role": "user", "content": "stream-e2e-1"}], api_base="http://127.0.0.1:9/evil", temperature=0.1
        )
        chunks = [chunk async for chunk in stream]
        # Then it receives the upstream's chunks in order, the whole text and the usage
        assert "".join(chunks) == REPLY_TEXT
        assert [c for c in chunks if c] == REPLY_CHUNKS
        assert stream.content == REPLY_TEXT
        assert stream.usage["totalTokens"] > 0
        # and the upstream saw exactly one call, with the hub's key, not the node's api_base
        (request,) = llm_server.requests_for("stream-e2e-1")
        assert request.headers.get("Authorization") == "Bearer sk-hub-secret-key"
        assert request.body["stream"] is True and request.body["temperature"] == 0.1

        result = await node.llm([{"role": "user", "content": "plain-e2e-1"}])
        assert result.content == REPLY_TEXT
    finally:
        await stop_node(node, runner)

    # The hub counted both requests and their tokens.
    status, body = await hub.aapi("GET", "/api/admin/stats")
    assert status == 200, body
    assert body["llm"]["requests"] == 2
    assert body["llm"]["tokens"] > 0


async def test_quota_refusal_reaches_the_node(make_hub, llm_server, tmp_path):
    hub = make_hub(
        "embedded",
        env=llm_env(
            llm_server, APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE="1", APEXBRIDGE_QUOTA_BURST_MULTIPLIER="1"
        ),
    )
    node, runner = await start_node(hub, tmp_path, "quota-node")
    try:
        await node.llm([{"role": "user", "content": "quota-e2e-1"}])
        with pytest.raises(QuotaExceeded) as refused:
            await node.llm([{"role": "user", "content": "quota-e2e-2"}])
        assert refused.value.retry_after and refused.value.retry_after > 0
        assert llm_server.requests_for("quota-e2e-2") == []
    finally:
        await stop_node(node, runner)
