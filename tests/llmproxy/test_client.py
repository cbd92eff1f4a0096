"""llmproxy.client against the loopback OpenAI-compatible server (real HTTP through litellm)."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy import client
from llmproxy.protocol import LLMErrorCode
from tests.llm_server import COMPLETION_TOKENS, PROMPT_TOKENS, REPLY_CHUNKS, REPLY_TEXT
from tests.llmproxy.conftest import eventually


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_complete_returns_content_and_upstream_usage(llm_server, marker):
    text = marker()
    result = await client.complete(
        model="openai/test-model", messages=messages(text), params={"temperature": 0.2}
    )

    assert result.content == REPLY_TEXT
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    assert result.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    (seen,) = llm_server.requests_for(text)
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == "Bearer sk-test"
    assert seen.body["model"] == "test-model"
    assert seen.body["temperature"] == 0.2
    assert not seen.body.get("stream")


async def test_complete_without_upstream_usage_reports_none(marker):
    result = await client.complete(model="openai/no-usage", messages=messages(marker()), params={})
    assert result.content == REPLY_TEXT
    assert result.usage is None


async def test_stream_yields_chunks_in_order_then_upstream_usage(llm_server, marker):
    text = marker()
    async with client.open_stream(model="openai/test-model", messages=messages(text), params={}) as upstream:
        pieces = [piece async for piece in upstream]

    assert [p.content for p in pieces] == REPLY_CHUNKS
    assert pieces[0].role == "assistant"
    assert upstream.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    (seen,) = llm_server.requests_for(text)
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}


async def test_stream_without_upstream_usage_reports_none(marker):
    # litellm makes up a usage of its own here; the client must not pass it off as the upstream's.
    async with client.open_stream(
        model="openai/no-usage", messages=messages(marker()), params={}
    ) as upstream:
        pieces = [piece async for piece in upstream]
    assert "".join(p.content for p in pieces) == REPLY_TEXT
    assert upstream.usage is None


@pytest.mark.parametrize(
    ("model", "code", "upstream_message"),
    [
        ("rate-limited", LLMErrorCode.UPSTREAM_RATE_LIMITED, "Rate limit reached"),
        ("bad-key", LLMErrorCode.UPSTREAM_AUTH_ERROR, "Incorrect API key"),
        ("too-long", LLMErrorCode.CONTEXT_WINDOW_EXCEEDED, "maximum context length"),
        ("bad-request", LLMErrorCode.UPSTREAM_BAD_REQUEST, "Invalid value for 'temperature'"),
        ("broken", LLMErrorCode.UPSTREAM_ERROR, "The server had an error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_map_to_protocol_codes_after_one_call(
    llm_server, marker, model, code, upstream_message, stream
):
    text = marker()
    with pytest.raises(client.UpstreamError) as caught:
        if stream:
            async with client.open_stream(model=f"openai/{model}", messages=messages(text), params={}) as up:
                async for _ in up:
                    pass
        else:
            await client.complete(model=f"openai/{model}", messages=messages(text), params={})

    assert caught.value.code == code
    assert upstream_message in caught.value.message
    assert not caught.value.message.startswith("litellm.")
    # One node request is one upstream call: no silent retries.
    assert len(llm_server.requests_for(text)) == 1


async def test_retries_follow_the_setting(settings, llm_server, marker):
    settings.APEXBRIDGE_LLM_MAX_RETRIES = 1
    text = marker()
    with pytest.raises(client.UpstreamError):
        await client.complete(model="openai/broken", messages=messages(text), params={})
    assert len(llm_server.requests_for(text)) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_that_does_not_answer_times_out(settings, marker, stream):
    settings.APEXBRIDGE_LLM_TIMEOUT_MS = 300
    with pytest.raises(client.UpstreamError) as caught:
        if stream:
            async with client.open_stream(model="openai/hang", messages=messages(marker()), params={}) as up:
                async for _ in up:
                    pass
        else:
            await client.complete(model="openai/hang", messages=messages(marker()), params={})
    assert caught.value.code == LLMErrorCode.UPSTREAM_TIMEOUT


async def test_stream_cut_midway_is_an_upstream_error(marker):
    received = []
    with pytest.raises(client.UpstreamError) as caught:
        async with client.open_stream(model="openai/cut", messages=messages(marker()), params={}) as upstream:
            async for piece in upstream:
                received.append(piece.content)
    assert caught.value.code == LLMErrorCode.UPSTREAM_ERROR
    assert received == REPLY_CHUNKS[:2]


async def test_cancelling_the_reading_task_closes_the_upstream_stream(llm_server, marker):
    text = marker()
    first_piece = asyncio.Event()

    async def read():
        async with client.open_stream(model="openai/slow", messages=messages(text), params={}) as upstream:
            async for _ in upstream:
                first_piece.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(first_piece.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await eventually(lambda: llm_server.saw_disconnect(text))


async def test_cancelling_a_plain_completion_closes_the_upstream_connection(llm_server, marker):
    text = marker()
    task = asyncio.create_task(client.complete(model="openai/slow", messages=messages(text), params={}))
    assert await eventually(lambda: bool(llm_server.requests_for(text)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await eventually(lambda: llm_server.saw_disconnect(text))


def test_count_usage_counts_prompt_and_completion_locally():
    usage = client.count_usage(
        model="openai/test-model", messages=messages("hello there"), completion_text=REPLY_TEXT
    )
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (
        client.count_usage(model="openai/test-model", messages=[], completion_text="").completion_tokens == 0
    )


def test_a_hub_process_starts_without_importing_litellm():
    # litellm's import costs seconds of CPU; a hub imports it when a node first asks
    # for a model (in a worker thread), not at start-up.
    import subprocess
    import sys

    probe = (
        "import os, sys\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'apexbridge.settings')\n"
        "import django\n"
        "django.setup()\n"
        "import apexbridge.asgi\n"
        "from llmproxy import client\n"
        "assert 'litellm' not in sys.modules, 'imported at start-up'\n"
        "client.upstream_error(TimeoutError('slow'))\n"
        "assert 'litellm' not in sys.modules, 'imported to classify an error'\n"
        "import asyncio\n"
        "module = asyncio.run(client.load())\n"
        "assert module is sys.modules['litellm'] and module.suppress_debug_info\n"
        "assert client.count_usage(model='m', messages=[], completion_text='x').total_tokens >= 0\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_error_before_litellm_is_imported_still_gets_its_code(monkeypatch):
    monkeypatch.setattr(client, "_module", None)  # as before the first llm_request
    assert client.upstream_error(TimeoutError("slow")).code == LLMErrorCode.UPSTREAM_TIMEOUT
    assert client.upstream_error(ConnectionError("refused")).code == LLMErrorCode.UPSTREAM_ERROR
