"""Admin of the quota policies, and a read-only view of the daily token totals."""

from __future__ import annotations

from django.contrib import admin

from quotas.models import DailyTokenUsage, QuotaPolicy


@admin.register(QuotaPolicy)
class QuotaPolicyAdmin(admin.ModelAdmin):
    list_display = (
        "scope",
        "target",
        "max_requests_per_minute",
        "burst_multiplier",
        "max_tokens_per_day",
        "max_concurrent_streams",
        "note",
        "updated_at",
    )
    list_filter = ("scope",)
    search_fields = ("target", "note")
    fieldsets = (
        (None, {"fields": ("scope", "target", "note")}),
        (
            "Limits (empty = inherited: node > tag > node type > settings)",
            {
                "fields": (
                    "max_requests_per_minute",
                    "burst_multiplier",
                    "max_tokens_per_day",
                    "max_concurrent_streams",
                )
            },
        ),
    )


@admin.register(DailyTokenUsage)
class DailyTokenUsageAdmin(admin.ModelAdmin):
    list_display = ("day", "node_id", "tokens", "updated_at")
    list_filter = ("day",)
    search_fields = ("node_id",)
    readonly_fields = ("node_id", "day", "tokens", "updated_at")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
