"""The LLM proxy's work (PROTOCOL §4): which model a request may use, admitting it
against the node's quotas, running it upstream (plain or streaming) and
recording what it cost.

``llm_call_run`` is the async driver of one request, run as its own asyncio task
by the node consumer; the sync services below it are its units of database work
(each one ``database_sync_to_async`` call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction

from apexbridge.db.hops import database_sync_to_async
from llmproxy import client
from llmproxy.models import LLMOutcome, LLMRequestLog
from llmproxy.protocol import (
    LLMErrorCode,
    Usage,
    event_data,
    quota_error,
    response_data,
    stream_chunk_data,
    stream_done_data,
)
from nodes.events import apublish
from nodes.protocol import ErrorCode, ProtocolError, failure_data
from quotas import services as quota_services
from quotas.limiter import Refusal

logger = logging.getLogger(__name__)

SendFrame = Callable[[str, dict[str, Any]], Awaitable[None]]


# --- configuration -----------------------------------------------------------------------
def llm_default_model() -> str | None:
    if settings.APEXBRIDGE_LLM_MODEL:
        return settings.APEXBRIDGE_LLM_MODEL
    allowed = list(settings.APEXBRIDGE_LLM_MODELS or [])
    return allowed[0] if allowed else None


def llm_available() -> bool:
    """True when a model is configured (``hubInfo.llmAvailable``)."""
    return llm_default_model() is not None


def llm_resolve_model(requested: str | None) -> str:
    """The model a request runs on, or the ProtocolError that refuses it."""
    default = llm_default_model()
    if default is None:
        raise ProtocolError(LLMErrorCode.LLM_UNAVAILABLE, "The LLM proxy is not configured on this hub")
    if not requested:
        return default
    allowed = list(settings.APEXBRIDGE_LLM_MODELS or [])
    if allowed and requested not in allowed and requested != default:
        raise ProtocolError(
            LLMErrorCode.MODEL_NOT_ALLOWED,
            f"Model {requested!r} is not allowed on this hub (allowed: {', '.join(allowed)})",
        )
    return requested


# --- one request -------------------------------------------------------------------------
@dataclass
class LLMCall:
    request_id: str
    node_id: str
    node_type: str
    node_tags: list[str]
    connection_id: str
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    stream: bool
    # Filled in while the call runs.
    content_parts: list[str] = field(default_factory=list)
    upstream_started: bool = False

    @property
    def echo(self) -> dict[str, Any]:
        """The request fields a failure reply echoes."""
        return {"requestId": self.request_id, "nodeId": self.node_id}

    @property
    def content(self) -> str:
        return "".join(self.content_parts)


def llm_request_admit(*, call: LLMCall) -> Refusal | None:
    """Check the node's quotas and take a request token (and a stream slot)."""
    refusal = quota_services.quota_acquire(
        node_id=call.node_id,
        node_type=call.node_type,
        node_tags=call.node_tags,
        stream=call.stream,
        connection_id=call.connection_id,
        request_id=call.request_id,
    )
    if refusal is not None:
        _llm_request_log_create(
            call=call,
            outcome=LLMOutcome.RATE_LIMITED,
            error_code=LLMErrorCode.QUOTA_EXCEEDED,
            error_message=refusal.limit,
        )
    return refusal


def llm_request_finish(
    *,
    call: LLMCall,
    outcome: str,
    usage: Usage,
    usage_estimated: bool,
    latency_ms: int,
    error: ProtocolError | None,
) -> None:
    """Free the stream slot, count the tokens and log the request, all or nothing."""
    with transaction.atomic():
        quota_services.quota_record_tokens(node_id=call.node_id, tokens=usage.total_tokens)
        _llm_request_log_create(
            call=call,
            outcome=outcome,
            usage=usage,
            usage_estimated=usage_estimated,
            latency_ms=latency_ms,
            error_code=error.code if error else "",
            error_message=error.message[:2000] if error else "",
        )
    # Outside the transaction: with Redis the slot is not in the database.
    if call.stream:
        quota_services.quota_release_stream(
            node_id=call.node_id, connection_id=call.connection_id, request_id=call.request_id
        )


def _llm_request_log_create(
    *,
    call: LLMCall,
    outcome: str,
    usage: Usage | None = None,
    usage_estimated: bool = False,
    latency_ms: int | None = None,
    error_code: str = "",
    error_message: str = "",
) -> LLMRequestLog:
    """The request's one log row. A request refused before it ran used no tokens
    and has no latency (left empty, not 0)."""
    if usage is None:
        usage = Usage()
    return LLMRequestLog.objects.create(
        node_id=call.node_id,
        request_id=call.request_id,
        model=call.model,
        stream=call.stream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        usage_estimated=usage_estimated,
        latency_ms=latency_ms,
        outcome=outcome,
        error_code=error_code,
        error_message=error_message,
    )


def llm_stream_renew(*, call: LLMCall) -> None:
    quota_services.quota_renew_stream(
        node_id=call.node_id, connection_id=call.connection_id, request_id=call.request_id
    )


async def _db(function: Callable[..., Any], **kwargs: Any) -> Any:
    """One unit of database work, carried to its end even when the calling task is
    cancelled meanwhile (a slot taken or tokens counted must never be half done).
    The cancellation is raised again once the work is done."""
    work = asyncio.ensure_future(database_sync_to_async(function)(**kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise


async def llm_call_run(call: LLMCall, send: SendFrame) -> None:
    """Run one admitted-or-refused request to its single final ``llm_response``.

    Cancelling the task that runs this (``llm_cancel``, disconnect) closes the
    upstream connection, frees the stream slot, counts the tokens already used and
    answers ``cancelled``.
    """
    admission = asyncio.ensure_future(database_sync_to_async(llm_request_admit)(call=call))
    cancelled_while_admitting = False
    try:
        await asyncio.shield(admission)
    except asyncio.CancelledError:
        cancelled_while_admitting = True  # the admission still decides what was taken
        await asyncio.wait([admission])
    except Exception:
        logger.exception("quota check of node %s failed", call.node_id)
    if admission.exception() is not None:
        error = ProtocolError(ErrorCode.INTERNAL_ERROR, "The hub failed to check the node's quota")
        await send("llm_response", failure_data(call.echo, error))
        return
    refusal = admission.result()
    if refusal is not None:
        error = quota_error(refusal)
        await send("llm_response", failure_data(call.echo, error))
        await apublish("llm_proxy_rate_limited", _event(call, error=error))
        return

    started = time.monotonic()
    usage: Usage | None = None
    error: ProtocolError | None = None
    try:
        if cancelled_while_admitting:
            raise asyncio.CancelledError
        await apublish("llm_proxy_request", _event(call))
        usage = await (_stream(call, send) if call.stream else _complete(call))
        outcome = LLMOutcome.SUCCEEDED
    except asyncio.CancelledError:
        outcome, error = (
            LLMOutcome.CANCELLED,
            ProtocolError(LLMErrorCode.CANCELLED, "The request was cancelled"),
        )
    except client.UpstreamError as exc:
        outcome, error = LLMOutcome.FAILED, ProtocolError(exc.code, exc.message)
    except Exception:
        logger.exception("LLM request %s of node %s failed", call.request_id, call.node_id)
        outcome = LLMOutcome.FAILED
        error = ProtocolError(LLMErrorCode.UPSTREAM_ERROR, "The hub failed to call the model")

    estimated = False
    if usage is None:
        usage = _count_used(call, outcome)
        estimated = usage.total_tokens > 0
    try:
        await _db(
            llm_request_finish,
            call=call,
            outcome=outcome,
            usage=usage,
            usage_estimated=estimated,
            latency_ms=int((time.monotonic() - started) * 1000),
            error=error,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        # The node still gets its answer; a slot left behind expires with its lease.
        logger.exception("could not record LLM request %s of node %s", call.request_id, call.node_id)

    if error is not None:
        logger.info("LLM request %s of node %s ended: %s", call.request_id, call.node_id, error.code)
        await send("llm_response", failure_data(call.echo, error))
        await apublish("llm_proxy_failed", _event(call, usage=usage, error=error))
        return
    if call.stream:
        await send(
            "llm_response_stream",
            stream_done_data(request_id=call.request_id, node_id=call.node_id, usage=usage),
        )
    await send(
        "llm_response",
        response_data(
            request_id=call.request_id,
            node_id=call.node_id,
            content=call.content,
            usage=usage,
            model=call.model,
            stream=call.stream,
        ),
    )
    event = "llm_proxy_stream_completed" if call.stream else "llm_proxy_completed"
    await apublish(event, _event(call, usage=usage))


async def _complete(call: LLMCall) -> Usage | None:
    call.upstream_started = True
    result = await client.complete(model=call.model, messages=call.messages, params=call.params)
    call.content_parts.append(result.content)
    return result.usage


async def _stream(call: LLMCall, send: SendFrame) -> Usage | None:
    renew_every_s = quota_services.stream_lease_ms() / 3000
    renewed_at = time.monotonic()
    call.upstream_started = True
    async with client.open_stream(model=call.model, messages=call.messages, params=call.params) as upstream:
        async for piece in upstream:
            call.content_parts.append(piece.content)
            await send(
                "llm_response_stream",
                stream_chunk_data(
                    request_id=call.request_id, node_id=call.node_id, content=piece.content, role=piece.role
                ),
            )
            if time.monotonic() - renewed_at > renew_every_s:
                await _db(llm_stream_renew, call=call)
                renewed_at = time.monotonic()
    return upstream.usage


def _count_used(call: LLMCall, outcome: str) -> Usage:
    """Tokens the upstream used when it did not report them: counted locally."""
    if not call.upstream_started or (outcome == LLMOutcome.FAILED and not call.content_parts):
        return Usage()  # never reached the model, or the model refused the request
    usage = client.count_usage(model=call.model, messages=call.messages, completion_text=call.content)
    logger.info(
        "LLM request %s of node %s: the upstream reported no usage (%s); counted %d tokens locally",
        call.request_id,
        call.node_id,
        outcome,
        usage.total_tokens,
    )
    return usage


def _event(
    call: LLMCall, *, usage: Usage | None = None, error: ProtocolError | None = None
) -> dict[str, Any]:
    return event_data(
        request_id=call.request_id, node_id=call.node_id, model=call.model, usage=usage, error=error
    )
