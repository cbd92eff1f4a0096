"""Node registration services (PROTOCOL §2.1): a ``node_register`` (or a VCP node's
first ``register_tools``) creates the node's row or takes it over for the new
connection. A registration storm after a hub restart is applied in batches
(``node_register_many``, fed by ``nodes.batching.registrations``), one transaction
per batch; every registration still gets its own outcome.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from nodes import events
from nodes.auth import KeyIdentity
from nodes.models import Node, NodeLog, NodeProtocol, NodeStatus
from nodes.node_rows import node_rows
from nodes.protocol import ErrorCode, NodeRegisterPayload, ProtocolError, node_info_data
from nodes.services import check_key_allows, publish_status, requeue_attempts

logger = logging.getLogger(__name__)


@dataclass
class Connection:
    """Where a node is connected: identifies the socket across hub processes."""

    connection_id: str
    channel_name: str
    process_id: str


@dataclass
class RegistrationResult:
    node: Node
    created: bool
    replaced_channel_name: str  # the older connection to close with 4000, if any


def new_node_id() -> str:
    return f"node-{uuid.uuid4().hex[:12]}"


@dataclass
class NodeRegistration:
    """One ``node_register`` (or a VCP node's first ``register_tools``) to apply."""

    payload: NodeRegisterPayload
    connection: Connection
    identity: KeyIdentity
    protocol: str = NodeProtocol.ABP
    tool_manifests: list[dict[str, Any]] | None = None
    node_id: str = field(init=False)  # the payload's, else the key's, else a new one

    def __post_init__(self) -> None:
        self.node_id = self.payload.node_id or self.identity.node_id or new_node_id()


def node_register(
    *,
    payload: NodeRegisterPayload,
    connection: Connection,
    identity: KeyIdentity,
    protocol: str = NodeProtocol.ABP,
    tool_manifests: list[dict[str, Any]] | None = None,
) -> RegistrationResult:
    """Register (or take over) a node on this connection (PROTOCOL §2.1)."""
    registration = NodeRegistration(payload, connection, identity, protocol, tool_manifests)
    (outcome,) = node_register_many(registrations=[registration])
    if isinstance(outcome, ProtocolError):
        raise outcome
    return outcome


@transaction.atomic
def node_register_many(*, registrations: list[NodeRegistration]) -> list[RegistrationResult | ProtocolError]:
    """Apply registrations of distinct node ids in one transaction (a registration
    storm after a hub restart costs a few queries per batch, not five per node).

    Returns one outcome per registration, in order: its result, or the
    ``ProtocolError`` that refused it (a refused one changes nothing). Any other
    error rolls back the whole batch and is raised."""
    node_ids = [registration.node_id for registration in registrations]
    if len(set(node_ids)) != len(node_ids):
        raise ValueError("node_register_many: node ids must be distinct")
    now = timezone.now()
    # Locked in node-id order, as task results lock nodes: two processes' batches
    # cannot deadlock.
    existing = {
        node.node_id: node for node in Node.objects.select_for_update().filter(pk__in=node_ids).order_by("pk")
    }
    node_count: int | None = None
    outcomes: list[RegistrationResult | ProtocolError] = []
    applied: list[tuple[NodeRegistration, RegistrationResult, str, str]] = []
    for registration in registrations:
        node_id = registration.node_id
        try:
            check_key_allows(registration.identity, node_id, registration.payload.capabilities)
            node = existing.get(node_id)
            if node is None:
                if node_count is None:
                    _serialize_node_admission()
                    node_count = Node.objects.count()
                if node_count >= settings.APEXBRIDGE_MAX_NODES:
                    raise ProtocolError(
                        ErrorCode.NODE_LIMIT_REACHED,
                        f"The hub already has {settings.APEXBRIDGE_MAX_NODES} registered nodes",
                    )
                node_count += 1
        except ProtocolError as refusal:
            outcomes.append(refusal)
            continue
        created = node is None
        connection_id = registration.connection.connection_id
        if created:
            node = Node(node_id=node_id, registered_at=now)
            old_status, previous_connection, replaced_channel = NodeStatus.OFFLINE, "", ""
        else:
            old_status, previous_connection = node.status, node.connection_id
            replaced_channel = (
                node.channel_name if node.connection_id and node.connection_id != connection_id else ""
            )
        _apply_registration(node, registration, created=created, now=now)
        result = RegistrationResult(node=node, created=created, replaced_channel_name=replaced_channel)
        outcomes.append(result)
        applied.append((registration, result, old_status, previous_connection))
    Node.objects.bulk_create([result.node for _, result, _, _ in applied if result.created])
    # Rows this transaction holds (select_for_update above): one upsert statement
    # updates them all (a save() per row cost twice as much as the whole batch).
    Node.objects.bulk_create(
        [result.node for _, result, _, _ in applied if not result.created],
        update_conflicts=True,
        unique_fields=["node_id"],
        update_fields=REGISTRATION_FIELDS,
    )
    NodeLog.objects.bulk_create(
        NodeLog(
            node_id=result.node.node_id,
            event="node_registered",
            message=f"registered ({'new' if result.created else 'reconnected'}) "
            f"with {registration.identity.describe()}",
            context={
                "connectionId": registration.connection.connection_id,
                "protocol": registration.protocol,
            },
        )
        for registration, result, _, _ in applied
    )
    if applied:
        node_rows.drop()  # new candidates for the dispatch pass
    for registration, result, old_status, previous_connection in applied:
        node_id, connection_id = result.node.node_id, registration.connection.connection_id
        if previous_connection and previous_connection != connection_id:
            # The older socket's attempts will never be answered there: hand them back.
            requeue_attempts(node_id, connection_id=previous_connection, reason="node_replaced")
        events.publish("node_registered", {"node": node_info_data(result.node)})
        publish_status(node_id, old_status, NodeStatus.ONLINE)
        logger.info(
            "node %s registered (%s, %s) on %s",
            node_id,
            "new" if result.created else "takeover",
            registration.protocol,
            connection_id,
        )
    return outcomes


# Any fixed number: the lock only has to be the same in every hub process.
NODE_ADMISSION_LOCK = 0x4142_4E4F


def _serialize_node_admission() -> None:
    """Hold, until this transaction ends, the right to admit new nodes, so the count
    checked against ``APEXBRIDGE_MAX_NODES`` includes what another hub process is
    admitting at the same moment (without it, two processes' batches could each
    count the other's nodes out and overshoot the limit). PostgreSQL: a
    transaction-scoped advisory lock; SQLite's ``BEGIN IMMEDIATE`` already lets one
    writer in at a time."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [NODE_ADMISSION_LOCK])


# What a registration sets on an existing row (hub-kept statistics and the admin's
# draining flag stay).
REGISTRATION_FIELDS = [
    "name", "type", "version", "protocol", "capabilities", "tools", "tool_manifests", "personality",
    "endpoint", "max_concurrent_tasks", "resources", "metadata", "tags", "status", "last_heartbeat",
    "last_seen", "connection_id", "channel_name", "process_id", "connected_at", "key", "dispatch_changed_at",
]  # fmt: skip


def _apply_registration(node: Node, registration: NodeRegistration, *, created: bool, now: datetime) -> None:
    payload, connection = registration.payload, registration.connection
    config = payload.config
    node.name = payload.name
    node.type = payload.type
    node.version = payload.version or ""
    node.protocol = registration.protocol
    node.capabilities = list(dict.fromkeys(payload.capabilities))
    if payload.tools is not None:
        node.tools = list(dict.fromkeys(payload.tools))
    elif created:
        node.tools = []
    if registration.tool_manifests is not None:
        node.tool_manifests = registration.tool_manifests
    node.personality = payload.personality
    node.endpoint = payload.endpoint or ""
    node.max_concurrent_tasks = payload.max_concurrent_tasks
    node.resources = config.resources.model_dump(exclude_none=True) if config and config.resources else {}
    node.metadata = (config.metadata if config and config.metadata is not None else {}) or {}
    node.tags = list(dict.fromkeys(config.tags)) if config and config.tags else []
    node.status = NodeStatus.ONLINE
    node.last_heartbeat = now
    node.last_seen = now
    node.connection_id = connection.connection_id
    node.channel_name = connection.channel_name
    node.process_id = connection.process_id
    node.connected_at = now
    # A candidate for tasks (node_rows: passes of other processes). The time now, not
    # the batch's: the batch may have waited for its locks.
    node.dispatch_changed_at = timezone.now()
    node.key_id = registration.identity.key_id
