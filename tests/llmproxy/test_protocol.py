"""The llm_request payload: the option whitelist and its mapping to litellm's names."""

from __future__ import annotations

import pytest

from llmproxy.protocol import LLMRequestPayload, quota_error
from nodes.protocol import ProtocolError, validate
from quotas.limiter import Refusal


def request(**options) -> dict:
    return {"requestId": "r-1", "messages": [{"role": "user", "content": "hi"}], "options": options}


def test_whitelisted_options_are_mapped_to_snake_case():
    payload = validate(
        LLMRequestPayload,
        request(
            temperature=0.7,
            maxTokens=256,
            topP=1,
            stop=["\n"],
            presencePenalty=0.5,
            frequencyPenalty=-0.5,
            seed=7,
            responseFormat={"type": "json_object"},
            stream=True,
        ),
    )
    assert payload.options.stream is True
    assert payload.options.upstream_params() == {
        "temperature": 0.7,
        "max_tokens": 256,
        "top_p": 1,
        "stop": ["\n"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 7,
        "response_format": {"type": "json_object"},
    }


def test_credentials_and_unknown_options_never_pass():
    payload = validate(
        LLMRequestPayload,
        request(
            api_base="http://evil.example/v1",
            apiBase="http://evil.example/v1",
            base_url="http://evil.example/v1",
            api_key="sk-stolen",
            custom_llm_provider="openai",
            metadata={"x": 1},
            maxTokens=5,
        ),
    )
    assert payload.options.upstream_params() == {"max_tokens": 5}


def test_messages_keep_only_chat_fields():
    payload = validate(
        LLMRequestPayload,
        {
            "requestId": "r-1",
            "messages": [{"role": "user", "content": "hi", "api_key": "sk-x", "name": "bob"}],
        },
    )
    assert payload.upstream_messages() == [{"role": "user", "content": "hi", "name": "bob"}]
    assert payload.options.stream is False


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "requestId"),
        ({"requestId": "r", "messages": []}, "messages"),
        ({"requestId": "r"}, "messages"),
        ({"requestId": "r", "messages": [{"content": "hi"}]}, "role"),
        ({"requestId": "r", "messages": [{"role": "user"}], "options": {"stream": "yes"}}, "stream"),
        ({"requestId": "r", "messages": [{"role": "user"}], "options": {"temperature": 9}}, "temperature"),
        ({"requestId": "r", "messages": [{"role": "user"}], "options": {"maxTokens": "many"}}, "maxTokens"),
    ],
)
def test_bad_requests_are_invalid_payload_naming_the_field(data, field):
    with pytest.raises(ProtocolError) as caught:
        validate(LLMRequestPayload, data)
    assert caught.value.code == "invalid_payload"
    assert field in caught.value.message


def test_quota_error_carries_the_details_nodes_rely_on():
    error = quota_error(Refusal("maxRequestsPerMinute", 30, 60, 1500))
    assert error.code == "quota_exceeded"
    assert error.as_error()["details"] == {
        "limit": "maxRequestsPerMinute",
        "limitValue": 30,
        "current": 60,
        "retryAfterMs": 1500,
    }
