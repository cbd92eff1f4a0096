"""Storage for the node registry, node keys, node logs, tasks and hub processes.

Node ids and task ids are plain strings on purpose (not foreign keys): a node that
unregisters leaves the registry, but its finished task history and logs stay.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class NodeType(models.TextChoices):
    WORKER = "worker", "worker"
    COMPANION = "companion", "companion"


class NodeStatus(models.TextChoices):
    ONLINE = "online", "online"
    BUSY = "busy", "busy"
    OFFLINE = "offline", "offline"
    UNKNOWN = "unknown", "unknown"


class NodeProtocol(models.TextChoices):
    ABP = "abp", "abp"
    VCP = "vcp", "vcp"


class HubProcess(models.Model):
    """One running hub process; its periodic beat tells the others it is alive."""

    process_id = models.CharField(max_length=64, primary_key=True)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(default=0)
    started_at = models.DateTimeField(default=timezone.now)
    last_beat_at = models.DateTimeField(default=timezone.now, db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "hub process"
        verbose_name_plural = "hub processes"

    def __str__(self) -> str:
        return self.process_id


class NodeKey(models.Model):
    """A per-node key. Only a SHA-256 hash of the secret is stored."""

    name = models.CharField(max_length=128)
    prefix = models.CharField(max_length=16, unique=True, help_text="Public part, used to find the key.")
    key_hash = models.CharField(max_length=64)
    node_id = models.CharField(
        max_length=64, blank=True, default="", help_text="If set, the key may only register this node id."
    )
    capabilities = models.JSONField(
        default=list, blank=True, help_text="If not empty, the key may only register these capabilities."
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


# The node fields the dispatch pass decides by (nodes/dispatch.py), but for the
# round-robin time it keeps itself.
DISPATCH_FIELDS = frozenset(
    {"status", "connection_id", "capabilities", "tools", "draining", "max_concurrent_tasks"}
)


class Node(models.Model):
    node_id = models.CharField(max_length=64, primary_key=True)
    name = models.CharField(max_length=128)
    type = models.CharField(max_length=16, choices=NodeType.choices, default=NodeType.WORKER)
    version = models.CharField(max_length=64, blank=True, default="")
    protocol = models.CharField(max_length=8, choices=NodeProtocol.choices, default=NodeProtocol.ABP)
    status = models.CharField(
        max_length=16, choices=NodeStatus.choices, default=NodeStatus.UNKNOWN, db_index=True
    )
    registered_at = models.DateTimeField(default=timezone.now)
    last_heartbeat = models.DateTimeField(null=True, blank=True, db_index=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    capabilities = models.JSONField(default=list, blank=True)
    tools = models.JSONField(default=list, blank=True)
    tool_manifests = models.JSONField(default=list, blank=True)
    personality = models.JSONField(null=True, blank=True)
    endpoint = models.CharField(max_length=512, blank=True, default="")
    ips = models.JSONField(default=dict, blank=True)
    resources = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    tags = models.JSONField(default=list, blank=True)
    max_concurrent_tasks = models.PositiveIntegerField(default=1)
    draining = models.BooleanField(default=False)
    # Latest figures the node reported in its heartbeat (its own view).
    reported_stats = models.JSONField(default=dict, blank=True)
    reported_resources = models.JSONField(default=dict, blank=True)
    # Where the node is connected now; empty when disconnected.
    connection_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    channel_name = models.CharField(max_length=255, blank=True, default="")
    process_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    connected_at = models.DateTimeField(null=True, blank=True)
    key = models.ForeignKey(NodeKey, null=True, blank=True, on_delete=models.SET_NULL)
    # Hub-kept statistics.
    total_tasks = models.PositiveIntegerField(default=0)
    completed_tasks = models.PositiveIntegerField(default=0)
    failed_tasks = models.PositiveIntegerField(default=0)
    total_response_time_ms = models.BigIntegerField(default=0)
    # Round-robin tie breaking: the least recently assigned node wins a tie.
    last_assigned_at = models.DateTimeField(null=True, blank=True)
    # When a field the dispatch pass decides by (DISPATCH_FIELDS: connected or not,
    # status, draining, tools, capabilities, limit) was last written, by any process.
    # Dispatch passes that start from node rows kept in memory read the rows changed
    # since instead of every row (nodes/node_rows.py).
    dispatch_changed_at = models.DateTimeField(null=True, blank=True, db_index=True, editable=False)

    class Meta:
        ordering = ["node_id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.node_id})"

    def save(self, *args, **kwargs) -> None:
        """Stamps ``dispatch_changed_at`` when the save writes any of
        ``DISPATCH_FIELDS`` (writers that use ``update()`` stamp it themselves)."""
        update_fields = kwargs.get("update_fields")
        if update_fields is None:
            self.dispatch_changed_at = timezone.now()
        else:
            update_fields = kwargs["update_fields"] = list(update_fields)  # may be read once only
            if DISPATCH_FIELDS.intersection(update_fields):
                self.dispatch_changed_at = timezone.now()
                update_fields.append("dispatch_changed_at")
        super().save(*args, **kwargs)

    @property
    def is_connected(self) -> bool:
        return bool(self.connection_id)


class NodeLog(models.Model):
    LEVELS = [("debug", "debug"), ("info", "info"), ("warn", "warn"), ("error", "error")]

    node_id = models.CharField(max_length=64, db_index=True)
    timestamp = models.DateTimeField(default=timezone.now, db_index=True)
    level = models.CharField(max_length=8, choices=LEVELS, default="info")
    event = models.CharField(max_length=64, default="node_log")
    message = models.TextField(blank=True, default="")
    context = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-timestamp", "-id"]
        indexes = [models.Index(fields=["node_id", "-timestamp"])]

    def __str__(self) -> str:
        return f"[{self.level}] {self.node_id}: {self.message[:60]}"


class TaskStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    ASSIGNED = "assigned", "assigned"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    TIMED_OUT = "timed_out", "timed_out"
    CANCELLED = "cancelled", "cancelled"


FINAL_TASK_STATUSES = (
    TaskStatus.SUCCEEDED,
    TaskStatus.FAILED,
    TaskStatus.TIMED_OUT,
    TaskStatus.CANCELLED,
)


class Task(models.Model):
    task_id = models.CharField(max_length=64, primary_key=True)
    tool_name = models.CharField(max_length=128, db_index=True)
    tool_args = models.JSONField(default=dict, blank=True)
    capability = models.CharField(max_length=128, blank=True, default="")
    node_id = models.CharField(max_length=64, blank=True, default="", help_text="Pinned target node.")
    priority = models.PositiveSmallIntegerField(default=5)
    timeout_ms = models.PositiveIntegerField(default=60000)
    max_retries = models.PositiveIntegerField(default=3)
    attempts = models.PositiveIntegerField(default=0)
    status = models.CharField(
        max_length=16, choices=TaskStatus.choices, default=TaskStatus.QUEUED, db_index=True
    )
    assigned_node_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    assigned_connection_id = models.CharField(max_length=64, blank=True, default="")
    # Nodes that already had an attempt: a retry prefers another one.
    tried_node_ids = models.JSONField(default=list, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    execution_time_ms = models.PositiveIntegerField(null=True, blank=True)
    waiting_reason = models.CharField(max_length=255, blank=True, default="")
    idempotency_key = models.CharField(max_length=128, null=True, blank=True, unique=True)
    depends_on = models.JSONField(default=list, blank=True)
    # True while some of ``depends_on`` have not succeeded yet: dispatch skips the task,
    # and only these few rows are re-checked when other tasks end.
    dependencies_pending = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    assigned_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True, db_index=True)
    not_before = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.CharField(max_length=150, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "-priority", "created_at"]),
            models.Index(fields=["assigned_node_id", "status"]),
            models.Index(fields=["status", "dependencies_pending"]),
        ]
        permissions = []

    def __str__(self) -> str:
        return f"{self.task_id} {self.tool_name} [{self.status}]"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_TASK_STATUSES
