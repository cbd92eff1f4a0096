"""The node side of the wire (PROTOCOL §1–4): frame encoding, the hub URL, and keeping
the node key out of logs.

``nodes/protocol.py`` owns the hub's side; it needs Django and pydantic, and this package
must import with only the standard library and ``websockets``, so the few frames a node
sends are built here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

RECOMMENDED_PATH = "/abp-distributed-server/VCP_Key="
REDACTED = "***"
# Keys are redacted wherever they appear; shorter strings only inside a key path segment
# (replacing every "abc" in every log line would garble the logs and protect little).
MIN_SECRET_LENGTH = 8
KEY_IN_PATH = re.compile(r"((?:VCP|ABP)_Key=)[^/\s\"'?#]+")

# snake_case option names accepted by ``Node.llm`` and their wire spelling (PROTOCOL §4.1).
LLM_OPTION_NAMES = {
    "temperature": "temperature",
    "max_tokens": "maxTokens",
    "top_p": "topP",
    "stop": "stop",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "seed": "seed",
    "response_format": "responseFormat",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def encode(message_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": message_type, "data": data}, separators=(",", ":"), default=str)


def decode(text: str | bytes) -> tuple[str, dict[str, Any]] | None:
    """(type, data) of a frame, or None for anything that is not a well-formed envelope."""
    if isinstance(text, bytes):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    data = message.get("data")
    return message["type"], data if isinstance(data, dict) else {}


def hub_url(hub: str, key: str) -> str:
    """``ws://host:port`` (or http/https, or with a reverse-proxy prefix) plus the
    recommended node path carrying the key."""
    parts = urlsplit(hub if "://" in hub else f"ws://{hub}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"hub URL must start with ws:// or wss:// (got {parts.scheme}://)")
    if not parts.netloc:
        raise ValueError("hub URL needs a host, e.g. ws://127.0.0.1:8000")
    path = parts.path.rstrip("/") + RECOMMENDED_PATH + quote(key, safe="")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def llm_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options for ``llm_request``: snake_case names converted, camelCase passed as is."""
    wire: dict[str, Any] = {}
    for name, value in options.items():
        if value is not None:
            wire[LLM_OPTION_NAMES.get(name, name)] = value
    return wire


class SecretRedactor(logging.Filter):
    """Replaces registered secrets (node keys) in log records by ``***``.

    Attached to the client's loggers and, by the CLI, to the output handlers, so that
    neither our messages nor websockets' debug lines (which print the request path) can
    reveal a key."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if len(secret) >= MIN_SECRET_LENGTH:
            self._secrets.add(secret)
            encoded = quote(secret, safe="")
            if encoded != secret:
                self._secrets.add(encoded)

    def discard(self, secret: str) -> None:
        self._secrets.discard(secret)
        self._secrets.discard(quote(secret, safe=""))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return KEY_IN_PATH.sub(r"\g<1>" + REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


redactor = SecretRedactor()
