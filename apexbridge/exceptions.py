"""The API's error envelope: ``{"success": false, "error": {"code", "message"}}``."""

from __future__ import annotations

from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler

_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    429: "throttled",
}


class ApiError(APIException):
    """An API failure with our own code: ``raise ApiError(409, "conflict", "…")``."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_code = code


def _message(detail) -> str:
    if isinstance(detail, dict):
        parts = []
        for field, value in detail.items():
            text = _message(value)
            parts.append(text if field in ("detail", "non_field_errors") else f"{field}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return " ".join(_message(item) for item in detail)
    return str(detail)


def api_exception_handler(exc, context):
    response = exception_handler(exc, context)
    if response is None:
        return _service_unavailable(exc)
    code = getattr(exc, "error_code", None)
    if code is None:
        code = (
            "invalid_payload"
            if isinstance(exc, ValidationError)
            else _CODES.get(response.status_code, "error")
        )
    body = {"success": False, "error": {"code": code, "message": _message(getattr(exc, "detail", str(exc)))}}
    if response.status_code == status.HTTP_429_TOO_MANY_REQUESTS and getattr(exc, "wait", None):
        body["error"]["retryAfter"] = exc.wait
    return Response(body, status=response.status_code, headers=dict(response.headers.items()))


def _service_unavailable(exc) -> Response | None:
    """503 ``service_unavailable`` while the database cannot be reached (nothing was
    changed: the request's transaction, if any, never committed). Other errors stay
    500s."""
    from nodes.service_health import database_health, is_database_outage, is_lock_conflict

    if not is_database_outage(exc):
        return None
    database_health.failed(exc)
    message = (
        "The hub's database met a conflicting change; try again"
        if is_lock_conflict(exc)
        else "The hub's database is unavailable; try again shortly"
    )
    body = {"success": False, "error": {"code": "service_unavailable", "message": message}}
    return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"})
