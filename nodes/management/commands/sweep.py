"""``manage.py sweep``: one pass of the hub's liveness and task sweep, now.

The hub processes run this sweep on their own every APEXBRIDGE_HEARTBEAT_SWEEP_MS;
the command is for operators and cron jobs. It marks silent nodes offline, times
out overdue attempts, prunes node logs, LLM request logs and finished tasks past
their retention and, when the channel layer is shared (Redis), dispatches queued
tasks. With the in-memory layer it cannot reach the hub's sockets from this
process, so it leaves dispatch to the hub (a task assigned here would never reach
its node).
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.management.base import BaseCommand

from nodes import retention, services, task_services
from nodes.runtime import send_all


class Command(BaseCommand):
    help = "Run one liveness and task sweep now."

    def handle(self, *args, **options) -> None:
        shared_layer = bool(settings.REDIS_URL)
        # An id no hub process has: every live process is left alone, dead ones are reaped.
        reaped = services.process_reap(current_process_id="manage-sweep")
        marked = services.node_sweep_heartbeat_timeouts()
        outgoing = [
            (channel, {"type": "node.status", "nodeId": node_id, "status": "offline"})
            for node_id, channel in marked
            if channel
        ]
        timeouts = task_services.task_sweep_timeouts()
        outgoing.extend(timeouts)
        dispatched = task_services.task_dispatch_pending() if shared_layer else []
        outgoing.extend(dispatched)
        pruned = services.node_logs_prune()
        if shared_layer:
            async_to_sync(send_all)(outgoing)
        # After the sends: a long retention backlog must not delay the assignments.
        expired = retention.prune_expired()
        self.stdout.write(
            f"hub processes reaped: {len(reaped)}; nodes marked offline: {len(marked)}"
            + (f" ({', '.join(node_id for node_id, _ in marked)})" if marked else "")
        )
        self.stdout.write(
            f"node messages from task time-outs: {len(timeouts)}; log lines pruned: {pruned}; "
            f"LLM request logs pruned: {expired['llm_request_logs']}; "
            f"finished tasks pruned: {expired['tasks']}"
        )
        if shared_layer:
            self.stdout.write(f"tasks dispatched: {len(dispatched)}; messages sent: {len(outgoing)}")
        else:
            self.stdout.write(
                "dispatch left to the hub (no shared channel layer: set REDIS_URL to dispatch here)"
            )
