"""The LLM proxy's wire format (PROTOCOL §4): ``llm_request`` / ``llm_cancel``
payloads, the option whitelist and its camelCase -> litellm mapping, the
``llm_response`` / ``llm_response_stream`` frames and the ``llm_proxy_*`` event data.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from nodes.protocol import ProtocolError, WireModel, now_ms
from quotas.limiter import Refusal


class LLMErrorCode:
    INVALID_PAYLOAD = "invalid_payload"
    LLM_UNAVAILABLE = "llm_unavailable"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    DUPLICATE_REQUEST = "duplicate_request"
    QUOTA_EXCEEDED = "quota_exceeded"
    CANCELLED = "cancelled"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_AUTH_ERROR = "upstream_auth_error"
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"
    UPSTREAM_BAD_REQUEST = "upstream_bad_request"
    UPSTREAM_ERROR = "upstream_error"


RequestIdStr = Annotated[str, StringConstraints(min_length=1, max_length=128)]


# --- node -> hub -------------------------------------------------------------------------
class ChatMessage(BaseModel):
    """One chat message, passed on as OpenAI's format has it."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    content: str | list[dict[str, Any]] | None = None
    name: Annotated[str, StringConstraints(max_length=128)] | None = None
    tool_call_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class LLMOptions(WireModel):
    """The only options a node may set (PROTOCOL §4.1). Anything else, such as
    ``api_base``, ``api_key`` or ``base_url``, is dropped here: a node must never be
    able to send the hub's credentials somewhere else."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: Annotated[str, StringConstraints(max_length=256)] | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False

    def upstream_params(self) -> dict[str, Any]:
        """The options as litellm's (snake_case) keyword arguments, ``stream`` aside."""
        return self.model_dump(exclude_none=True, exclude={"stream"})


class LLMRequestPayload(WireModel):
    request_id: RequestIdStr
    node_id: str | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    options: LLMOptions = Field(default_factory=LLMOptions)

    def upstream_messages(self) -> list[dict[str, Any]]:
        return [message.model_dump(exclude_none=True) for message in self.messages]


class LLMCancelPayload(WireModel):
    request_id: RequestIdStr
    node_id: str | None = None


# --- hub -> node -------------------------------------------------------------------------
class Usage(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def wire(self) -> dict[str, int]:
        return self.model_dump(by_alias=True)


class _Outgoing(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class LLMResponseData(_Outgoing):
    request_id: str
    node_id: str
    success: bool = True
    content: str
    usage: Usage
    model: str
    stream: bool
    timestamp: int = Field(default_factory=now_ms)


class StreamDelta(_Outgoing):
    role: str | None = None
    content: str | None = None


class LLMStreamData(_Outgoing):
    request_id: str
    node_id: str
    chunk: str
    delta: StreamDelta | None = None
    done: bool = False
    usage: Usage | None = None
    timestamp: int = Field(default_factory=now_ms)


def response_data(
    *, request_id: str, node_id: str, content: str, usage: Usage, model: str, stream: bool
) -> dict[str, Any]:
    return LLMResponseData(
        request_id=request_id, node_id=node_id, content=content, usage=usage, model=model, stream=stream
    ).wire()


def stream_chunk_data(*, request_id: str, node_id: str, content: str, role: str | None) -> dict[str, Any]:
    return LLMStreamData(
        request_id=request_id, node_id=node_id, chunk=content, delta=StreamDelta(role=role, content=content)
    ).wire()


def stream_done_data(*, request_id: str, node_id: str, usage: Usage) -> dict[str, Any]:
    return LLMStreamData(request_id=request_id, node_id=node_id, chunk="", done=True, usage=usage).wire()


def quota_error(refusal: Refusal) -> ProtocolError:
    return ProtocolError(
        LLMErrorCode.QUOTA_EXCEEDED,
        f"Quota exceeded: {refusal.limit} ({refusal.current} of {refusal.limit_value})",
        details={
            "limit": refusal.limit,
            "limitValue": refusal.limit_value,
            "current": refusal.current,
            "retryAfterMs": refusal.retry_after_ms,
        },
    )


# --- events (PROTOCOL §5) ------------------------------------------------------------------
def event_data(
    *,
    request_id: str,
    node_id: str,
    model: str,
    usage: Usage | None = None,
    error: ProtocolError | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"requestId": request_id, "nodeId": node_id, "model": model}
    if usage is not None:
        data["usage"] = usage.wire()
    if error is not None:
        data["error"] = error.as_error()
    data["timestamp"] = now_ms()
    return data
