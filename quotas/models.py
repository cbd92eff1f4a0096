"""Quota storage (PROTOCOL §4.3): the admin-editable ``QuotaPolicy`` and the
database side of the limiter (request buckets, stream slots, daily token totals).

With Redis configured the bucket and the stream slots live in Redis instead; the
daily token total always lives here, so it survives a hub restart.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class QuotaScope(models.TextChoices):
    NODE_TYPE = "type", "node type"
    TAG = "tag", "tag"
    NODE = "node", "node"


class QuotaPolicy(models.Model):
    """Overrides of the APEXBRIDGE_QUOTA_* defaults for one node type, tag or node.

    Each limit left empty is inherited from the next less specific level
    (node > tag > type > settings).
    """

    scope = models.CharField(max_length=8, choices=QuotaScope.choices)
    target = models.CharField(
        max_length=128, help_text="The node type (worker / companion), the tag or the node id."
    )
    max_requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Sustained LLM requests per minute (0 refuses all)."
    )
    burst_multiplier = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1.0)],
        help_text="Bucket capacity = requests per minute x this.",
    )
    max_tokens_per_day = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Prompt + completion tokens per UTC day."
    )
    max_concurrent_streams = models.PositiveIntegerField(
        null=True, blank=True, help_text="Streaming requests in flight at once."
    )
    note = models.CharField(max_length=255, blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["scope", "target"]
        verbose_name_plural = "quota policies"
        constraints = [models.UniqueConstraint(fields=["scope", "target"], name="quota_policy_scope_target")]

    def __str__(self) -> str:
        return f"{self.get_scope_display()} {self.target}"

    def clean(self) -> None:
        from nodes.models import NodeType

        if self.scope == QuotaScope.NODE_TYPE and self.target not in NodeType.values:
            raise ValidationError({"target": f"A node type is one of: {', '.join(NodeType.values)}."})


class RequestBucket(models.Model):
    """The token bucket of one node (database limiter)."""

    node_id = models.CharField(max_length=64, primary_key=True)
    tokens = models.FloatField()
    refilled_at = models.FloatField(help_text="Unix time (seconds) of the last refill.")

    def __str__(self) -> str:
        return f"{self.node_id}: {self.tokens:.2f}"


class StreamSlot(models.Model):
    """One streaming request in flight (database limiter). The lease is renewed
    while the stream runs, so the slot of a hub process that died expires."""

    node_id = models.CharField(max_length=64)
    slot_key = models.CharField(max_length=200, help_text="<connection id>:<request id>")
    connection_id = models.CharField(max_length=64, db_index=True)
    lease_expires_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node_id", "slot_key"], name="stream_slot_node_key")]
        indexes = [models.Index(fields=["node_id", "lease_expires_at"])]

    def __str__(self) -> str:
        return f"{self.node_id}: {self.slot_key}"


class DailyTokenUsage(models.Model):
    """Tokens (prompt + completion) a node used on one UTC day."""

    node_id = models.CharField(max_length=64)
    day = models.DateField()
    tokens = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-day", "node_id"]
        constraints = [models.UniqueConstraint(fields=["node_id", "day"], name="daily_tokens_node_day")]

    def __str__(self) -> str:
        return f"{self.node_id} {self.day}: {self.tokens}"
