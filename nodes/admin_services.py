"""Staff actions on nodes (PROTOCOL §2.4, §6), shared by the admin API, the Django
admin and the management commands: control (drain / resume / restart / shutdown),
delete (unregister and disconnect) and the manual heartbeat check.

Each action does its database work through the registry services in one
transaction, then notifies the node's connection over the channel layer once the
transaction has committed (a node never hears about a change that was rolled
back). Channel messages are notifications: the database stays the truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from nodes import services
from nodes.models import Node
from nodes.protocol import CloseCode, frame, now_ms

logger = logging.getLogger(__name__)

CONTROL_ACTIONS = ("drain", "resume", "restart", "shutdown")
# Actions that only make sense for a node that can hear them right now.
CONNECTED_ONLY_ACTIONS = frozenset({"restart", "shutdown"})


class NodeNotFoundError(Exception):
    """The node is not registered (the API answers 404)."""


class NodeNotConnectedError(Exception):
    """The action needs a connected node (the API answers 409)."""


@dataclass
class ActionResult:
    node: Node | None
    outgoing: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _send_after_commit(outgoing: list[tuple[str, dict[str, Any]]]) -> None:
    if not outgoing:
        return
    from nodes.runtime import send_all

    transaction.on_commit(lambda: async_to_sync(send_all)(list(outgoing)))


def _dispatch_messages() -> list[tuple[str, dict[str, Any]]]:
    """Queued tasks a change may have made dispatchable (a node resumed, or left)."""
    from nodes import task_services

    return list(task_services.task_dispatch_pending())


def node_send_frame_message(
    node: Node, message_type: str, data: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    return (
        node.channel_name,
        {"type": "node.send", "nodeId": node.node_id, "frame": frame(message_type, data)},
    )


def node_control(*, node_id: str, action: str, reason: str = "", actor: str = "") -> ActionResult:
    """Record the hub side of a control action and send ``node_control`` to the node.

    ``drain`` / ``resume`` set the hub's draining flag (it survives reconnects, and is
    recorded even while the node is offline). ``shutdown`` also drains, so no new task
    reaches the node while it finishes; ``restart`` leaves the flag alone, so the node
    comes back accepting tasks. Both need a connected node.
    """
    if action not in CONTROL_ACTIONS:
        raise ValueError(f"unknown control action {action!r}")
    with transaction.atomic():
        node = Node.objects.select_for_update().filter(pk=node_id).first()
        if node is None:
            raise NodeNotFoundError(node_id)
        if action in CONNECTED_ONLY_ACTIONS and not node.is_connected:
            raise NodeNotConnectedError(node_id)
        if action in ("drain", "shutdown"):
            node = services.node_set_draining(node_id=node_id, draining=True)
        elif action == "resume":
            node = services.node_set_draining(node_id=node_id, draining=False)
        by = f" by {actor}" if actor else ""
        services.node_log_add(
            node_id=node_id,
            event="node_control",
            message=f"{action}{by}" + (f": {reason}" if reason else ""),
            context={"action": action, "reason": reason, "actor": actor},
        )
        outgoing = []
        if node.is_connected:
            outgoing.append(
                node_send_frame_message(node, "node_control", {"action": action, "reason": reason})
            )
        if action == "resume":
            outgoing.extend(_dispatch_messages())
        _send_after_commit(outgoing)
    logger.info("node %s: control %s%s", node_id, action, f" ({reason})" if reason else "")
    return ActionResult(node=node, outgoing=outgoing)


def node_delete(*, node_id: str, reason: str = "unregistered by admin") -> ActionResult:
    """Unregister a node (PROTOCOL §2.3) and close its connection with code 4003."""
    with transaction.atomic():
        node = services.node_unregister(node_id=node_id, reason=reason)
        if node is None:
            raise NodeNotFoundError(node_id)
        outgoing: list[tuple[str, dict[str, Any]]] = []
        if node.channel_name:
            outgoing.append(
                (node.channel_name, {"type": "node.close", "code": CloseCode.UNREGISTERED_BY_ADMIN})
            )
        # Its in-flight tasks went back to the queue: another node may take them now.
        outgoing.extend(_dispatch_messages())
        _send_after_commit(outgoing)
    return ActionResult(node=node, outgoing=outgoing)


def node_heartbeat_check(*, node_id: str) -> ActionResult:
    """Ping a connected node and apply the heartbeat timeout to it now.

    The node's ``pong`` counts as a heartbeat (seen by its connection), so a node that
    is alive but quiet stays online at the next check.
    """
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        raise NodeNotFoundError(node_id)
    outgoing: list[tuple[str, dict[str, Any]]] = []
    if node.is_connected:
        outgoing.append(node_send_frame_message(node, "ping", {"timestamp": now_ms()}))
    silent_ms = (
        None if node.last_heartbeat is None else (timezone.now() - node.last_heartbeat).total_seconds() * 1000
    )
    cutoff_passed = silent_ms is None or silent_ms > settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS
    if node.status in services.LIVE_STATUSES and cutoff_passed:
        for marked_id, channel_name in services.node_sweep_heartbeat_timeouts():
            if channel_name:
                outgoing.append(
                    (channel_name, {"type": "node.status", "nodeId": marked_id, "status": "offline"})
                )
    node = Node.objects.filter(pk=node_id).first()
    if node is None:  # unregistered meanwhile
        raise NodeNotFoundError(node_id)
    _send_after_commit(outgoing)
    return ActionResult(node=node, outgoing=outgoing)
