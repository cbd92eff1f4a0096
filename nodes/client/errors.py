"""Exceptions the node client raises: registration failures, tool errors and the typed
LLM proxy errors (PROTOCOL §4.2 error codes)."""

from __future__ import annotations

from typing import Any


class NodeClientError(Exception):
    """Base class of the client's own errors."""


class RegistrationError(NodeClientError):
    """The hub refused the node: a wrong or revoked key (HTTP 403 on the handshake) or
    ``node_registered`` with ``success:false``. Retrying would not help, so the client stops."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HubUnavailable(NodeClientError):  # noqa: N818 (public API name)
    """The hub cannot take the node now (``service_unavailable``: its database is
    down). The client reconnects with back-off, as after a lost connection."""


class NodeRemoved(NodeClientError):  # noqa: N818 (public API name)
    """The hub closed the connection for good (replaced by another process with the same
    node id, or the node was deleted by staff); reconnecting would undo that."""

    def __init__(self, close_code: int, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code


class ToolError(Exception):
    """Raise from a tool to report a failure with your own code.

    ``retryable=True`` lets the hub retry the task (on another node if it can)."""

    def __init__(
        self, message: str, *, code: str = "tool_error", retryable: bool = False, details: Any = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = details


class LLMError(NodeClientError):
    """A failed ``llm_request``. ``code`` is the hub's error code (PROTOCOL §4.2) or one of
    the client's own: ``not_connected``, ``connection_lost``, ``timeout``."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class QuotaExceeded(LLMError):  # noqa: N818 (public API name)
    """The node's LLM quota is used up; try again after ``retry_after`` seconds."""

    @property
    def retry_after(self) -> float | None:
        value = self.details.get("retryAfterMs")
        return value / 1000 if isinstance(value, int | float) else None

    @property
    def limit(self) -> str | None:
        return self.details.get("limit")


class LLMUnavailable(LLMError):  # noqa: N818 (public API name)
    """The hub has no model configured (``llm_unavailable``) or is not reachable."""


class LLMCancelled(LLMError):  # noqa: N818 (public API name)
    """The request was cancelled (``llm_cancel``)."""


class ModelNotAllowed(LLMError):  # noqa: N818 (public API name)
    """The hub does not allow the requested model."""


class LLMInvalidRequest(LLMError):  # noqa: N818 (public API name)
    """The hub refused the request as malformed (``invalid_payload``, ``duplicate_request``)."""


class UpstreamError(LLMError):
    """The model provider failed (``upstream_*``, ``context_window_exceeded``)."""


class LLMConnectionError(LLMUnavailable):
    """The connection to the hub is down or dropped while the request was in flight."""


class LLMTimeout(LLMError):  # noqa: N818 (public API name)
    """No answer from the hub within the client's timeout (the request was cancelled)."""


_ERROR_CLASSES: dict[str, type[LLMError]] = {
    "quota_exceeded": QuotaExceeded,
    "llm_unavailable": LLMUnavailable,
    "cancelled": LLMCancelled,
    "model_not_allowed": ModelNotAllowed,
    "invalid_payload": LLMInvalidRequest,
    "duplicate_request": LLMInvalidRequest,
    "context_window_exceeded": UpstreamError,
    "not_connected": LLMConnectionError,
    "connection_lost": LLMConnectionError,
    "timeout": LLMTimeout,
}


def llm_error_from(error: Any) -> LLMError:
    """Build the typed exception for a wire ``error`` object."""
    if not isinstance(error, dict):
        return LLMError("upstream_error", str(error))
    code = str(error.get("code") or "upstream_error")
    message = str(error.get("message") or code)
    details = error.get("details") if isinstance(error.get("details"), dict) else {}
    cls = _ERROR_CLASSES.get(code)
    if cls is None:
        cls = UpstreamError if code.startswith("upstream_") else LLMError
    return cls(code, message, details)
