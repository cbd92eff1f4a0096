"""Node keys: creation, hashing and constant-time checking (PROTOCOL §1).

A per-node key looks like ``abk_<prefix>_<secret>``: URL-safe, so nodes can put it
in the WebSocket path unescaped. Only the SHA-256 of the whole key is stored (the
secret is 256 random bits, so a slow password hash buys nothing); the prefix finds
the row. The shared ``APEXBRIDGE_VCP_KEY`` is compared in constant time too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from nodes.models import NodeKey

logger = logging.getLogger(__name__)

KEY_PREFIX = "abk"
_DUMMY_HASH = hashlib.sha256(b"apexbridge-no-such-key").hexdigest()


@dataclass(frozen=True)
class KeyIdentity:
    """Who a connection authenticated as, and what the key allows it to register."""

    kind: str  # "shared" or "node"
    key_id: int | None = None
    name: str = ""
    node_id: str = ""
    capabilities: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        return "shared key" if self.kind == "shared" else f"node key {self.name!r} (#{self.key_id})"


# ``=`` may arrive percent-encoded (uvicorn logs the quoted path: ``VCP_Key%3D…``).
_SECRET_IN_PATH = re.compile(r"((?:VCP_Key|ABP_Key|token)(?:=|%3[dD]))[^/?#&\s\"]*")


def redact_keys(text: str) -> str:
    """A request path (or log line) with every key or token value in it hidden."""
    return _SECRET_IN_PATH.sub(r"\1***", text)


class RedactKeysFilter(logging.Filter):
    """A logging filter that hides key and token values in the record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format is the handler's to report, as usual
            return True
        redacted = redact_keys(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# Loggers of the other ASGI servers that print request paths (docs/DEPLOYMENT.md).
SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access", "granian.access", "_granian", "granian")


def hide_keys_in_server_logs() -> None:
    """Nodes put their key in the WebSocket path, and servers log paths: daphne's
    access log is patched; uvicorn's and granian's loggers get a redacting filter."""
    hide_keys_in_daphne_access_log()
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeysFilter) for f in logger.filters):
            logger.addFilter(RedactKeysFilter())


def hide_keys_in_daphne_access_log() -> None:
    """Nodes put their key in the WebSocket path, and daphne's access log (on by
    default) prints every path: hide the keys there, however daphne was started."""
    from daphne.access import AccessLogGenerator

    original = AccessLogGenerator.__call__
    if getattr(original, "hides_keys", False):
        return

    def log_action(self, protocol, action, details):
        if isinstance(details.get("path"), str):
            details = {**details, "path": redact_keys(details["path"])}
        return original(self, protocol, action, details)

    log_action.hides_keys = True
    AccessLogGenerator.__call__ = log_action


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def node_key_create(
    *, name: str, node_id: str = "", capabilities: list[str] | None = None
) -> tuple[NodeKey, str]:
    """Create a key; returns the row and the plain key, which is never stored."""
    prefix = secrets.token_hex(4)
    while NodeKey.objects.filter(prefix=prefix).exists():
        prefix = secrets.token_hex(4)
    plain = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    key = NodeKey.objects.create(
        name=name, prefix=prefix, key_hash=hash_key(plain), node_id=node_id, capabilities=capabilities or []
    )
    logger.info("created node key %r (prefix %s)", name, prefix)
    return key, plain


def node_key_revoke(*, key: NodeKey) -> bool:
    """Revoke a key; returns False when it was already revoked."""
    updated = NodeKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    if updated:
        logger.info("revoked node key %r (prefix %s)", key.name, key.prefix)
    return bool(updated)


def authenticate_shared_key(presented: str | None) -> KeyIdentity | None:
    """The shared key's identity if ``presented`` is it (no database needed), else None."""
    shared = settings.APEXBRIDGE_VCP_KEY
    if presented and shared and hmac.compare_digest(presented.encode(), shared.encode()):
        return KeyIdentity(kind="shared", name="shared")
    return None


def node_key_prefix(presented: str | None) -> str | None:
    """The prefix by which a per-node key is looked up, or None if ``presented`` does
    not have a per-node key's form (such a key is refused without the database)."""
    if not presented or len(presented) > 512:
        return None
    parts = presented.split("_", 2)
    return parts[1] or None if len(parts) == 3 and parts[0] == KEY_PREFIX else None


def authenticate_key(presented: str | None) -> KeyIdentity | None:
    """Return the identity for a presented key, or None. Never logs the key."""
    return authenticate_keys([presented])[0]


def authenticate_keys(presented_keys: list[str | None]) -> list[KeyIdentity | None]:
    """``authenticate_key`` for many handshakes at once (a reconnect storm): one
    SELECT of the keys' rows and one UPDATE of their ``last_used_at``."""
    identities: list[KeyIdentity | None] = [None] * len(presented_keys)
    prefixes: dict[int, str | None] = {}  # index -> the key's prefix, if it has the form
    for index, presented in enumerate(presented_keys):
        if not presented or len(presented) > 512:
            continue
        identities[index] = authenticate_shared_key(presented)
        if identities[index] is None:
            prefixes[index] = node_key_prefix(presented)
    wanted = {prefix for prefix in prefixes.values() if prefix}
    rows = {row.prefix: row for row in NodeKey.objects.filter(prefix__in=wanted)} if wanted else {}
    used: list[int] = []
    for index, prefix in prefixes.items():
        row = rows.get(prefix) if prefix else None
        # Compare even when no row matched, so timing does not tell which prefixes exist.
        stored = row.key_hash if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(hash_key(presented_keys[index]), stored)
        if row is None or not matches or row.revoked_at is not None:
            continue
        used.append(row.pk)
        identities[index] = KeyIdentity(
            kind="node",
            key_id=row.pk,
            name=row.name,
            node_id=row.node_id,
            capabilities=tuple(row.capabilities or ()),
        )
    if used:
        NodeKey.objects.filter(pk__in=used).update(last_used_at=timezone.now())
    return identities
