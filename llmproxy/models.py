"""One row per LLM request a node made through the hub (dashboard, admin, stats)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class LLMOutcome(models.TextChoices):
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"
    RATE_LIMITED = "rate_limited", "rate limited"


class LLMRequestLog(models.Model):
    # A plain string, not a foreign key: the log outlives a node that unregisters.
    node_id = models.CharField(max_length=64, db_index=True)
    request_id = models.CharField(max_length=128)
    model = models.CharField(max_length=256, blank=True, default="")
    stream = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    usage_estimated = models.BooleanField(
        default=False,
        help_text="Counted by the hub (the upstream sent no usage, or the request ended early).",
    )
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=LLMOutcome.choices, db_index=True)
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "LLM request"
        indexes = [models.Index(fields=["node_id", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.node_id} {self.request_id} {self.outcome}"
