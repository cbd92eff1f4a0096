"""Read-only admin of the LLM request log."""

from __future__ import annotations

from django.contrib import admin

from llmproxy.models import LLMRequestLog


@admin.register(LLMRequestLog)
class LLMRequestLogAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "node_id",
        "request_id",
        "model",
        "stream",
        "outcome",
        "error_code",
        "total_tokens",
        "usage_estimated",
        "latency_ms",
    )
    list_filter = ("outcome", "stream", "usage_estimated", "model")
    search_fields = ("node_id", "request_id", "model", "error_code")
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
