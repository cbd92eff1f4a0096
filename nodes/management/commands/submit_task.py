"""``python manage.py submit_task TOOL --args JSON …``: queue a task from a shell and
print it (or, with ``--wait``, its outcome) as JSON.

Exit codes: 0 the task is queued, running or succeeded; 1 bad arguments (nothing
queued); 2 the task ended failed, timed out or cancelled; 3 ``--wait`` ran out
before the task ended.
"""

from __future__ import annotations

import json
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from nodes import selectors, task_services
from nodes.api.task_serializers import MAX_WAIT_SECONDS, TaskSubmitSerializer
from nodes.models import TaskStatus
from nodes.protocol import task_data

EXIT_TASK_FAILED = 2
EXIT_STILL_RUNNING = 3


def _describe(errors) -> str:
    if isinstance(errors, dict):
        return "; ".join(f"{field}: {_describe(value)}" for field, value in errors.items())
    if isinstance(errors, list):
        return " ".join(_describe(item) for item in errors)
    return str(errors)


class Command(BaseCommand):
    help = "Submit a task to the hub's queue and print it as JSON (exit 2 when it failed)."

    def add_arguments(self, parser):
        parser.add_argument("tool", help="Tool name, e.g. echo")
        parser.add_argument(
            "--args", dest="tool_args", default="{}", help="Tool arguments as a JSON object (default {})"
        )
        parser.add_argument("--capability", default=None, help="Capability the node must have")
        parser.add_argument("--node", default=None, help="Pin the task to this node id")
        parser.add_argument("--priority", type=int, default=5, help="0..10, higher runs first (default 5)")
        parser.add_argument("--timeout", type=int, default=None, help="Attempt time-out in ms")
        parser.add_argument("--max-retries", type=int, default=None, help="Retries after the first attempt")
        parser.add_argument("--idempotency-key", default=None, help="Returns the earlier task with this key")
        parser.add_argument(
            "--depends-on", action="append", default=[], help="Task id to wait for (repeatable)"
        )
        parser.add_argument(
            "--wait", type=float, default=0, help=f"Seconds (at most {MAX_WAIT_SECONDS}) to wait for the end"
        )

    def handle(self, *args, **options):
        try:
            tool_args = json.loads(options["tool_args"])
        except ValueError as error:
            raise CommandError(f"--args is not valid JSON: {error}") from None
        if not 0 <= options["wait"] <= MAX_WAIT_SECONDS:
            raise CommandError(f"--wait must be between 0 and {MAX_WAIT_SECONDS} seconds")
        body = {
            "toolName": options["tool"],
            "toolArgs": tool_args,
            "capability": options["capability"],
            "nodeId": options["node"],
            "priority": options["priority"],
            "timeout": options["timeout"],
            "maxRetries": options["max_retries"],
            "idempotencyKey": options["idempotency_key"],
            "dependsOn": options["depends_on"],
        }
        serializer = TaskSubmitSerializer(data=body)
        if not serializer.is_valid():
            raise CommandError(_describe(serializer.errors))
        try:
            submitted = task_services.task_submit(**serializer.service_kwargs(), created_by="submit_task")
        except task_services.TaskValidationError as error:
            raise CommandError(error.message) from None
        task = submitted.task
        deadline = time.monotonic() + options["wait"]
        while True:
            task = selectors.task_get(task_id=task.task_id) or task
            if task.is_final or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        self.stdout.write(json.dumps(task_data(task), indent=2, default=str))
        if task.is_final and task.status != TaskStatus.SUCCEEDED:
            sys.exit(EXIT_TASK_FAILED)
        if options["wait"] and not task.is_final:
            sys.exit(EXIT_STILL_RUNNING)
