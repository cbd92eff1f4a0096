"""The upstream model, through litellm. The only module that imports litellm.

Calls are async (``litellm.acompletion``; never the sync call on the event loop),
one node request is one upstream call (litellm's silent retries are off unless
``APEXBRIDGE_LLM_MAX_RETRIES`` says otherwise), and upstream failures come out as
one ``UpstreamError`` with a PROTOCOL §4.2 code and the upstream's message.

Closing a stream early: cancel the asyncio task that iterates ``UpstreamStream``.
The cancellation reaches httpx while it reads, which drops the HTTP connection;
with litellm 1.110, ``aclose()`` on the stream alone was seen not to. ``aclose()``
still runs on the way out (``UpstreamStream.__aexit__``) so litellm can tidy up.

litellm is imported on first use, not with this module: the import costs ~3.6 s of
CPU, which every hub process paid at start-up although many never call a model.
The async calls import it in a worker thread (``load``), so the first LLM request
of a process does not stall the event loop; until then a failure cannot be one of
litellm's, so ``upstream_error`` does not need it either.

settings.py sets ``LITELLM_LOCAL_MODEL_COST_MAP`` / ``LITELLM_OFFLINE_MODE`` before
litellm is imported: litellm never reaches the network at import.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from llmproxy.protocol import LLMErrorCode, Usage

logger = logging.getLogger(__name__)

_MESSAGE_PREFIX = re.compile(r"^(?:litellm\.)?\w*(?:Error|Exception|Timeout)\s*:\s*")
_MAX_MESSAGE_CHARS = 2000


_module: Any = None  # litellm, once its import has finished


def _litellm() -> Any:
    """The litellm module, imported now if no one has yet (waits for an import that
    another thread has started: Python's import lock)."""
    global _module
    if _module is None:
        module = importlib.import_module("litellm")
        module.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
        _module = module
    return _module


async def load() -> Any:
    """litellm, imported in a worker thread the first time (not on the event loop)."""
    return _module if _module is not None else await asyncio.to_thread(_litellm)


class UpstreamError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Completion:
    content: str
    usage: Usage | None  # None when the upstream reported none


@dataclass(frozen=True)
class StreamPiece:
    content: str
    role: str | None


def _call_kwargs(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(params)
    kwargs.update(
        model=model,
        messages=messages,
        timeout=settings.APEXBRIDGE_LLM_TIMEOUT_MS / 1000,
        num_retries=settings.APEXBRIDGE_LLM_MAX_RETRIES or 0,
        max_retries=0,  # the OpenAI SDK's own retries: retrying is num_retries' job
        drop_params=True,  # an option the provider lacks is dropped, not an error
    )
    # Unset: litellm's own environment variables (OPENAI_API_KEY, …) apply.
    if settings.APEXBRIDGE_LLM_API_BASE:
        kwargs["api_base"] = settings.APEXBRIDGE_LLM_API_BASE
    if settings.APEXBRIDGE_LLM_API_KEY:
        kwargs["api_key"] = settings.APEXBRIDGE_LLM_API_KEY
    return kwargs


async def complete(*, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> Completion:
    """One non-streaming completion."""
    litellm = await load()
    try:
        response = await litellm.acompletion(**_call_kwargs(model, messages, params))
    except Exception as exc:
        raise upstream_error(exc) from exc
    content = response.choices[0].message.content if response.choices else ""
    return Completion(content=content or "", usage=_usage(getattr(response, "usage", None)))


class UpstreamStream:
    """A streaming completion: ``async with open_stream(...) as s: async for piece in s``.

    After the iteration ends, ``usage`` holds the upstream's usage, or None when
    the upstream sent none.
    """

    def __init__(self, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> None:
        self._kwargs = _call_kwargs(model, messages, params)
        self._kwargs.update(stream=True, stream_options={"include_usage": True})
        self._response: Any = None
        self.usage: Usage | None = None

    async def __aenter__(self) -> UpstreamStream:
        litellm = await load()
        try:
            self._response = await litellm.acompletion(**self._kwargs)
        except Exception as exc:
            raise upstream_error(exc) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            try:
                await response.aclose()
            except Exception:  # closing is best effort; the task cancellation already cut the socket
                logger.debug("closing the upstream stream failed", exc_info=True)

    async def __aiter__(self):
        last_usage = None
        try:
            async for chunk in self._response:
                if getattr(chunk, "usage", None) is not None:
                    last_usage = chunk.usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                content = getattr(delta, "content", None)
                if content:
                    yield StreamPiece(content=content, role=getattr(delta, "role", None))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise upstream_error(exc) from exc
        # litellm fills in a usage of its own when the upstream sent none: only trust
        # it when one of the upstream's chunks carried usage.
        upstream_chunks = getattr(self._response, "chunks", None)
        if upstream_chunks is None or any(getattr(c, "usage", None) is not None for c in upstream_chunks):
            self.usage = _usage(last_usage)


def open_stream(*, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> UpstreamStream:
    return UpstreamStream(model, messages, params)


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    prompt = int(getattr(raw, "prompt_tokens", 0) or 0)
    completion = int(getattr(raw, "completion_tokens", 0) or 0)
    total = int(getattr(raw, "total_tokens", 0) or 0) or prompt + completion
    if total == 0:  # litellm reports zeros when the upstream sent no usage
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def count_usage(*, model: str, messages: list[dict[str, Any]], completion_text: str) -> Usage:
    """Count tokens locally (litellm's tokenizers) when the upstream did not say."""
    litellm = _module
    if litellm is None:  # every upstream call loads litellm first: none was made
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    try:
        prompt = litellm.token_counter(model=model, messages=messages)
    except Exception:
        logger.debug("token_counter failed on the prompt", exc_info=True)
        prompt = 0
    completion = 0
    if completion_text:
        try:
            completion = litellm.token_counter(model=model, text=completion_text, count_response_tokens=True)
        except Exception:
            logger.debug("token_counter failed on the completion", exc_info=True)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def upstream_error(exc: BaseException) -> UpstreamError:
    """Map a litellm / httpx failure to a PROTOCOL §4.2 code, keeping its message."""
    if isinstance(exc, UpstreamError):
        return exc
    code = _code_for(exc)
    # A mid-stream failure wraps what really happened.
    original = getattr(exc, "original_exception", None)
    if code == LLMErrorCode.UPSTREAM_ERROR and isinstance(original, BaseException) and original is not exc:
        code = _code_for(original)
    return UpstreamError(code, _clean_message(exc))


def _code_for(exc: BaseException) -> str:
    litellm = _module
    if litellm is None:  # not imported (yet): exc cannot be one of litellm's errors
        return _code_by_name(exc)
    if isinstance(exc, (litellm.Timeout, asyncio.TimeoutError, TimeoutError)):
        return LLMErrorCode.UPSTREAM_TIMEOUT
    if isinstance(exc, litellm.ContextWindowExceededError):
        return LLMErrorCode.CONTEXT_WINDOW_EXCEEDED
    if isinstance(exc, litellm.RateLimitError):
        return LLMErrorCode.UPSTREAM_RATE_LIMITED
    if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)):
        return LLMErrorCode.UPSTREAM_AUTH_ERROR
    if isinstance(
        exc,
        (
            litellm.BadRequestError,
            litellm.NotFoundError,
            litellm.UnprocessableEntityError,
            litellm.UnsupportedParamsError,
        ),
    ):
        return LLMErrorCode.UPSTREAM_BAD_REQUEST
    return _code_by_name(exc)


def _code_by_name(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return LLMErrorCode.UPSTREAM_TIMEOUT
    name = type(exc).__name__.lower()
    if "timeout" in name:  # httpx.ReadTimeout and friends, when litellm did not wrap them
        return LLMErrorCode.UPSTREAM_TIMEOUT
    return LLMErrorCode.UPSTREAM_ERROR


def _clean_message(exc: BaseException) -> str:
    message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
    previous = None
    while previous != message:
        previous, message = message, _MESSAGE_PREFIX.sub("", message, count=1)
    return message.strip()[:_MAX_MESSAGE_CHARS]
