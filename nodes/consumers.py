"""The node WebSocket consumer: ``NodeConsumer`` (the node endpoint, PROTOCOL §1–4).
The staff event stream is ``nodes.admin_consumers.AdminEventsConsumer``.

Consumers hold no business rules: they parse a frame, call one service through
``database_sync_to_async`` and render the reply. Every failure is a
``ProtocolError`` turned into its reply in ``reply_error``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import deque
from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from apexbridge.db.hops import database_sync_to_async
from llmproxy.consumer import LLMProxyConsumerMixin
from nodes import auth, registration_services, services
from nodes.batching import key_checks, registrations
from nodes.consumer_tasks import TaskConsumerMixin
from nodes.models import NodeProtocol, NodeStatus
from nodes.protocol import (
    PRE_REGISTRATION_TYPES,
    REPLY_TYPES,
    CloseCode,
    ErrorCode,
    HeartbeatPayload,
    NodeLogPayload,
    NodeRegisterPayload,
    NodeUnregisterPayload,
    ProtocolError,
    RegisterToolsPayload,
    ReportIpPayload,
    UnregisterToolsPayload,
    error_frame,
    failure_data,
    frame,
    now_ms,
    parse_envelope,
    validate,
)
from nodes.runtime import runtime
from nodes.service_health import (
    ResilientChannelReceiveMixin,
    database_health,
    is_database_outage,
    is_lock_conflict,
    layer_health,
)

logger = logging.getLogger(__name__)

# Input that counts towards APEXBRIDGE_MAX_PROTOCOL_ERRORS (bad messages, not refusals).
BAD_INPUT_CODES = frozenset(
    {
        ErrorCode.INVALID_JSON,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.INVALID_PAYLOAD,
        ErrorCode.NOT_REGISTERED,
        ErrorCode.NODE_MISMATCH,
    }
)
DATABASE_UNAVAILABLE = ProtocolError(
    ErrorCode.SERVICE_UNAVAILABLE,
    "The hub's database is unavailable; nothing was changed, send it again shortly",
)
DATABASE_CONFLICT = ProtocolError(
    ErrorCode.SERVICE_UNAVAILABLE,
    "The hub's database met a conflicting change; nothing was changed, send it again",
)
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")


def _llm_available() -> bool:
    try:
        from llmproxy.services import llm_available
    except ImportError:  # the LLM proxy is not installed in this build
        return False
    return llm_available()


class NoDatabaseHopPerMessageMixin:
    """Channels' ``AsyncConsumer.dispatch`` runs ``close_old_connections`` on the
    database thread before every message: one hop per heartbeat, queued behind
    whatever that single thread is doing (a heartbeat flush, a sweep, a task), which
    made a heartbeat's ack wait for unrelated database work and cost a quarter of
    the hub's CPU under heartbeat load (docs/BENCHMARKS.md). These consumers touch
    the database only through ``database_sync_to_async``, which closes old
    connections around each call itself, so the per-message hop is left out."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


class NodeConsumer(
    NoDatabaseHopPerMessageMixin,
    ResilientChannelReceiveMixin,
    TaskConsumerMixin,
    LLMProxyConsumerMixin,
    AsyncWebsocketConsumer,
):
    """One node connection. After ``node_register`` it acts only as that node."""

    node_id: str | None = None

    async def connect(self) -> None:
        self.connection_id = f"c-{uuid.uuid4().hex}"
        self.node_id = None
        self.node_type = "worker"
        self.node_tags: list[str] = []
        self.current_status = NodeStatus.OFFLINE
        self.pending_ips: dict[str, Any] | None = None
        self.protocol_errors: deque[float] = deque()
        kwargs = self.scope.get("url_route", {}).get("kwargs", {})
        self.deprecated_path = kwargs.get("prefix") == "vcp-distributed-server"
        presented = kwargs.get("key") or self._bearer_key()
        client = self.scope.get("client") or ["?", 0]
        try:
            # The shared key needs no database, nor does refusing what cannot be a key;
            # per-node keys are checked in batches (a reconnect storm's handshakes
            # queue on the one database thread).
            identity = auth.authenticate_shared_key(presented)
            if identity is None and auth.node_key_prefix(presented):
                identity = await key_checks.submit(presented)
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            database_health.failed(exc)
            # Not a 403: the key may well be right. The node reconnects later.
            await self.accept()
            await self.close(code=CloseCode.TRY_AGAIN_LATER)
            return
        if identity is None:
            logger.warning(
                "refused node handshake from %s on /%s/: %s key",
                client[0],
                kwargs.get("prefix"),
                "missing" if not presented else "wrong or revoked",
            )
            await self.close()  # before accept: the client gets HTTP 403
            return
        self.identity = identity
        await self.accept()
        runtime.ensure_started()
        logger.info("node connection %s from %s with %s", self.connection_id, client[0], identity.describe())
        await self.send_frame(
            "connection_ack",
            {
                "connectionId": self.connection_id,
                "serverId": self.connection_id,
                "hubVersion": settings.HUB_VERSION,
                "serverTime": now_ms(),
                "heartbeatInterval": settings.APEXBRIDGE_HEARTBEAT_INTERVAL_MS,
                "heartbeatTimeout": settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS,
                "deprecated": self.deprecated_path,
                "message": "Connected to Apex Bridge",
            },
        )

    def _bearer_key(self) -> str | None:
        for name, value in self.scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip()
        return None

    async def disconnect(self, code: int) -> None:
        await self.llm_on_disconnect()
        if self.node_id is None:
            return
        node_id, self.node_id = self.node_id, None
        runtime.forget(node_id, self.connection_id)
        await database_sync_to_async(services.node_disconnected)(
            node_id=node_id, connection_id=self.connection_id
        )
        await runtime.dispatch()

    # --- framing ------------------------------------------------------------------------
    async def send_frame(self, message_type: str, data: dict[str, Any]) -> None:
        await self.send(text_data=frame(message_type, data))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self.reply_error(
                None, None, ProtocolError(ErrorCode.INVALID_MESSAGE, "Binary frames are not accepted")
            )
            return
        limit = settings.APEXBRIDGE_MAX_FRAME_BYTES
        if len(text_data) > limit or (
            len(text_data) * 4 > limit and len(text_data.encode("utf-8", "surrogatepass")) > limit
        ):
            logger.warning("closing %s: frame over %d bytes", self.connection_id, limit)
            await self.close(code=CloseCode.MESSAGE_TOO_BIG)
            return
        message_type: str | None = None
        data: dict[str, Any] | None = None
        try:
            payload_error: ProtocolError | None = None
            try:
                message_type, data = parse_envelope(text_data)
            except ProtocolError as error:
                if getattr(error, "message_type", None) is None:
                    raise
                # Bad data of a typed frame: an unknown type or a missing registration
                # is still answered first, as for any other frame (§1.1).
                message_type, data, payload_error = error.message_type, error.data, error
            handler = getattr(self, f"handle_{message_type}", None)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"Unknown message type {message_type!r}")
            if self.node_id is None and message_type not in PRE_REGISTRATION_TYPES:
                raise ProtocolError(ErrorCode.NOT_REGISTERED, "Send node_register first")
            if payload_error is not None:
                raise payload_error
            await handler(data)
        except ProtocolError as error:
            await self.reply_error(message_type, data, error)
        except Exception as exc:
            if is_database_outage(exc):
                database_health.failed(exc)
                conflict = is_lock_conflict(exc)
                await self.reply_error(
                    message_type, data, DATABASE_CONFLICT if conflict else DATABASE_UNAVAILABLE
                )
                return
            logger.exception("error handling %s from %s", message_type, self.node_id or self.connection_id)
            await self.send(
                text_data=error_frame(ErrorCode.INTERNAL_ERROR, "The hub failed to handle this message")
            )

    async def reply_error(self, message_type: str | None, data: dict | None, error: ProtocolError) -> None:
        reply_type = REPLY_TYPES.get(message_type or "")
        if reply_type and error.code not in (ErrorCode.NOT_REGISTERED, ErrorCode.UNKNOWN_TYPE):
            await self.send_frame(reply_type, failure_data(data, error))
        else:
            await self.send(text_data=error_frame(error.code, error.message))
        if error.code in BAD_INPUT_CODES:
            await self._count_protocol_error()

    async def _count_protocol_error(self) -> None:
        now = time.monotonic()
        self.protocol_errors.append(now)
        while self.protocol_errors and self.protocol_errors[0] < now - 60:
            self.protocol_errors.popleft()
        if len(self.protocol_errors) > settings.APEXBRIDGE_MAX_PROTOCOL_ERRORS:
            logger.warning("closing %s (%s): too many bad messages", self.connection_id, self.node_id)
            await self.close(code=CloseCode.POLICY_VIOLATION)

    def require_node(self, data: dict[str, Any] | None) -> str:
        """The node id this connection registered; refuses another one."""
        if self.node_id is None:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, "Send node_register first")
        claimed = (data or {}).get("nodeId")
        if claimed is not None and claimed != self.node_id:
            raise ProtocolError(
                ErrorCode.NODE_MISMATCH, f"This connection is registered as {self.node_id!r}, not {claimed!r}"
            )
        return self.node_id

    def _services_connection(self) -> registration_services.Connection:
        return registration_services.Connection(
            connection_id=self.connection_id, channel_name=self.channel_name, process_id=runtime.process_id
        )

    # --- registry messages ----------------------------------------------------------------
    async def handle_node_register(self, data: dict[str, Any]) -> None:
        payload = validate(NodeRegisterPayload, data)
        if self.node_id is not None:
            if payload.node_id not in (None, self.node_id):
                raise ProtocolError(
                    ErrorCode.NODE_MISMATCH,
                    f"This connection is registered as {self.node_id!r}; unregister it first",
                )
            payload.node_id = self.node_id
        await self._register(payload, NodeProtocol.ABP, None)
        await self.send_frame(
            "node_registered",
            {
                "nodeId": self.node_id,
                "success": True,
                "message": "Node registered",
                "hubInfo": {
                    "version": settings.HUB_VERSION,
                    "llmAvailable": _llm_available(),  # settings only: no database hop
                    "heartbeatInterval": settings.APEXBRIDGE_HEARTBEAT_INTERVAL_MS,
                    "heartbeatTimeout": settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS,
                },
            },
        )
        await runtime.dispatch()

    async def _register(self, payload: NodeRegisterPayload, protocol: str, manifests) -> None:
        registration = registration_services.NodeRegistration(
            payload, self._services_connection(), self.identity, protocol, tool_manifests=manifests
        )
        result = await registrations.submit(registration)
        node = result.node
        self.node_id = node.node_id
        self.node_type = node.type
        self.node_tags = list(node.tags)
        self.current_status = node.status
        if result.replaced_channel_name:
            try:
                await self.channel_layer.send(
                    result.replaced_channel_name, {"type": "node.close", "code": CloseCode.REPLACED}
                )
            except Exception as exc:
                # The registration stands; the old socket's results are refused as stale.
                layer_health.failed(exc)
        if self.pending_ips is not None:
            await database_sync_to_async(services.node_set_ips)(
                node_id=self.node_id, connection_id=self.connection_id, ips=self.pending_ips
            )
            self.pending_ips = None
        if protocol == NodeProtocol.VCP:
            runtime.vcp_connections[self.node_id] = self.connection_id

    async def handle_heartbeat(self, data: dict[str, Any]) -> None:
        node_id = self.require_node(data)
        payload = validate(HeartbeatPayload, data)
        wanted = payload.status or (
            self.current_status
            if self.current_status in (NodeStatus.ONLINE, NodeStatus.BUSY)
            else NodeStatus.ONLINE
        )
        stats = payload.stats.model_dump(by_alias=True, exclude_none=True) if payload.stats else None
        resources = payload.resources.model_dump(exclude_none=True) if payload.resources else None
        if wanted != self.current_status:
            # A status change is written at once; plain heartbeats are only buffered.
            previous = await database_sync_to_async(services.node_set_status)(
                node_id=node_id, connection_id=self.connection_id, status=wanted
            )
            if previous is None:
                raise ProtocolError(
                    ErrorCode.NOT_REGISTERED, "This node was taken over or removed; register again"
                )
            self.current_status = wanted
            if previous == NodeStatus.OFFLINE or wanted == NodeStatus.ONLINE:
                await runtime.dispatch()
        runtime.record_heartbeat(node_id, self.connection_id, stats, resources)
        await self.send_frame(
            "heartbeat_ack",
            {"nodeId": node_id, "success": True, "status": self.current_status, "timestamp": now_ms()},
        )

    async def handle_node_unregister(self, data: dict[str, Any]) -> None:
        node_id = self.require_node(data)
        payload = validate(NodeUnregisterPayload, data)
        await database_sync_to_async(services.node_unregister)(
            node_id=node_id, reason=payload.reason or "unregistered by node", connection_id=self.connection_id
        )
        runtime.forget(node_id, self.connection_id)
        self.node_id = None
        self.current_status = NodeStatus.OFFLINE
        await self.send_frame(
            "node_unregistered", {"nodeId": node_id, "success": True, "timestamp": now_ms()}
        )
        await runtime.dispatch()

    async def handle_register_tools(self, data: dict[str, Any]) -> None:
        payload = validate(RegisterToolsPayload, data)
        manifests = payload.manifests()
        names = list(dict.fromkeys(m["name"] for m in manifests))
        if self.node_id is None:
            if not payload.serverName:
                raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "serverName: required to register a VCP node")
            node_id = ("vcp-" + _UNSAFE_ID_CHARS.sub("-", payload.serverName))[:64]
            await self._register(
                NodeRegisterPayload(
                    node_id=node_id,
                    name=payload.serverName[:128] or node_id,
                    type="worker",
                    capabilities=names,
                    tools=names,
                ),
                NodeProtocol.VCP,
                manifests,
            )
        else:
            node = await database_sync_to_async(services.node_set_tools)(
                node_id=self.node_id,
                connection_id=self.connection_id,
                tools=names,
                manifests=manifests,
                identity=self.identity,
            )
            if node is None:
                raise ProtocolError(
                    ErrorCode.NOT_REGISTERED, "This node was taken over or removed; register again"
                )
        await self.send_frame(
            "register_ack", {"success": True, "nodeId": self.node_id, "tools": names, "count": len(names)}
        )
        await runtime.dispatch()

    async def handle_unregister_tools(self, data: dict[str, Any]) -> None:
        self.require_node(data)
        payload = validate(UnregisterToolsPayload, data)
        node = await database_sync_to_async(services.node_remove_tools)(
            node_id=self.node_id, connection_id=self.connection_id, tools=payload.tools
        )
        tools = list(node.tools) if node else []
        await self.send_frame("unregister_ack", {"success": True, "tools": tools, "count": len(tools)})

    async def handle_report_ip(self, data: dict[str, Any]) -> None:
        payload = validate(ReportIpPayload, data)
        ips = {"localIPs": payload.localIPs or [], "publicIP": payload.publicIP}
        if self.node_id is None:
            self.pending_ips = ips  # applied when the node registers
            return
        await database_sync_to_async(services.node_set_ips)(
            node_id=self.node_id, connection_id=self.connection_id, ips=ips
        )

    async def handle_update_static_placeholders(self, data: dict[str, Any]) -> None:
        """Accepted and ignored (PROTOCOL §2.5)."""

    async def handle_node_log(self, data: dict[str, Any]) -> None:
        node_id = self.require_node(data)
        payload = validate(NodeLogPayload, data)
        level = "warn" if payload.level == "warning" else payload.level
        await database_sync_to_async(services.node_log_add)(
            node_id=node_id, level=level, event="node_log", message=payload.message, context=payload.context
        )

    async def handle_ping(self, data: dict[str, Any]) -> None:
        await self.send_frame("pong", {"timestamp": now_ms()})

    async def handle_pong(self, data: dict[str, Any]) -> None:
        """Answer to the hub's ``ping`` (admin heartbeat-check): the node is alive."""
        runtime.record_heartbeat(self.node_id, self.connection_id)

    # --- channel-layer messages from services and other processes -----------------------
    async def node_close(self, event: dict[str, Any]) -> None:
        await self.close(code=event.get("code", 1000))

    async def node_status(self, event: dict[str, Any]) -> None:
        if event.get("nodeId") == self.node_id:
            self.current_status = event["status"]

    async def node_send(self, event: dict[str, Any]) -> None:
        """Send a frame built by a service (task_assign, task_cancel, node_control, ping)."""
        if event.get("nodeId") not in (None, self.node_id):
            return  # meant for a node this connection no longer is
        await self.send(text_data=event["frame"])
