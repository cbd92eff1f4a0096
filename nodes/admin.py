"""Django admin of the nodes app: nodes, node keys, tasks, node logs, hub processes.

Everything the hub owns (status, liveness, connection, statistics, task state) is
read-only here; staff change things only through actions that call the same
services as the admin API (``nodes.admin_services``, ``nodes.task_services``,
``nodes.auth``). A key's plain value is shown once, on the page that answers its
creation, and never again; its hash is never shown.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.views.decorators.cache import never_cache

from nodes import admin_services, selectors
from nodes.auth import node_key_create, node_key_revoke
from nodes.models import HubProcess, Node, NodeKey, NodeLog, Task

admin.site.site_header = "ApexBridge hub"
admin.site.site_title = "ApexBridge hub"
admin.site.index_title = "Administration"

STATUS_COLOURS = {
    "online": "#1f9d55",
    "busy": "#d97706",
    "offline": "#6b7280",
    "unknown": "#9ca3af",
    "queued": "#2563eb",
    "assigned": "#d97706",
    "succeeded": "#1f9d55",
    "failed": "#dc2626",
    "timed_out": "#b45309",
    "cancelled": "#6b7280",
    "debug": "#9ca3af",
    "info": "#2563eb",
    "warn": "#d97706",
    "error": "#dc2626",
}


def badge(value: str, *, node_id: str | None = None):
    colour = STATUS_COLOURS.get(value, "#6b7280")
    if node_id is not None:
        return format_html(
            '<span class="ab-badge" data-live-status="{}" style="background:{}">{}</span>',
            node_id,
            colour,
            value,
        )
    return format_html('<span class="ab-badge" style="background:{}">{}</span>', colour, value)


def _plain_list(values) -> str:
    return ", ".join(str(value) for value in values or []) or "—"


# --- nodes -----------------------------------------------------------------------------
class ConnectedFilter(admin.SimpleListFilter):
    title = "connection"
    parameter_name = "connected"

    def lookups(self, request, model_admin):
        return [("yes", "connected"), ("no", "disconnected")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(connection_id="")
        if self.value() == "no":
            return queryset.filter(connection_id="")
        return queryset


def _control_action(action_name: str, description: str):
    def run(modeladmin, request, queryset):
        done, skipped = [], []
        for node in queryset:
            try:
                admin_services.node_control(
                    node_id=node.node_id,
                    action=action_name,
                    reason=f"{action_name} from the admin",
                    actor=request.user.get_username(),
                )
                done.append(node.node_id)
            except (admin_services.NodeNotFoundError, admin_services.NodeNotConnectedError):
                skipped.append(node.node_id)
        if done:
            modeladmin.message_user(request, f"{action_name}: sent to {', '.join(done)}.", messages.SUCCESS)
        if skipped:
            modeladmin.message_user(
                request, f"{action_name}: skipped {', '.join(skipped)} (not connected).", messages.WARNING
            )

    run.__name__ = f"{action_name}_nodes"
    return admin.action(description=description, permissions=["change"])(run)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    change_form_template = "admin/nodes/node/change_form.html"
    list_display = (
        "node_id",
        "name",
        "type",
        "status_badge",
        "connected",
        "draining",
        "capability_list",
        "tag_list",
        "last_heartbeat",
        "completed_tasks",
        "failed_tasks",
    )
    list_display_links = ("node_id", "name")
    list_filter = ("status", "type", "protocol", "draining", ConnectedFilter)
    search_fields = ("node_id", "name", "endpoint", "version")
    ordering = ("node_id",)
    actions = [
        _control_action("drain", "Drain selected nodes (no new tasks)"),
        _control_action("resume", "Resume selected nodes"),
        _control_action("restart", "Restart selected nodes"),
        _control_action("shutdown", "Shut down selected nodes"),
        "unregister_nodes",
    ]
    fieldsets = (
        (None, {"fields": ("node_id", "name", "type", "version", "protocol", "live_status", "draining")}),
        (
            "Connection",
            {"fields": ("connected", "connected_at", "last_heartbeat", "last_seen", "registered_at", "key")},
        ),
        (
            "Capabilities",
            {
                "fields": (
                    "capability_list",
                    "tool_list",
                    "tag_list",
                    "max_concurrent_tasks",
                    "endpoint",
                    "ips",
                )
            },
        ),
        (
            "Statistics",
            {"fields": ("total_tasks", "completed_tasks", "failed_tasks", "average_response", "reported")},
        ),
        ("LLM usage today", {"fields": ("llm_usage",)}),
        ("Recent tasks", {"fields": ("recent_tasks",)}),
        ("Log", {"fields": ("recent_log",)}),
    )

    class Media:
        css = {"all": ["apexbridge/admin.css"]}
        js = ["apexbridge/admin_live.js"]

    def get_readonly_fields(self, request, obj=None):
        # The hub owns every field of a node: staff act through the actions.
        return [field for fieldset in self.fieldsets for field in fieldset[1]["fields"]]

    def has_add_permission(self, request) -> bool:
        return False

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # deleting a row would skip the unregistration
        return actions

    # --- columns and read-only fields -----------------------------------------------------
    @admin.display(description="status", ordering="status")
    def status_badge(self, node: Node):
        return badge(node.status)

    @admin.display(description="live status")
    def live_status(self, node: Node):
        return badge(node.status, node_id=node.node_id)

    @admin.display(boolean=True, description="connected")
    def connected(self, node: Node) -> bool:
        return node.is_connected

    @admin.display(description="capabilities")
    def capability_list(self, node: Node) -> str:
        return _plain_list(node.capabilities)

    @admin.display(description="tools")
    def tool_list(self, node: Node) -> str:
        return _plain_list(node.tools)

    @admin.display(description="tags")
    def tag_list(self, node: Node) -> str:
        return _plain_list(node.tags)

    @admin.display(description="average response (ms)")
    def average_response(self, node: Node):
        return round(node.total_response_time_ms / node.completed_tasks, 1) if node.completed_tasks else "—"

    @admin.display(description="reported by the node")
    def reported(self, node: Node):
        return format_html(
            "stats: {}<br>resources: {}", node.reported_stats or "—", node.reported_resources or "—"
        )

    @admin.display(description="")
    def recent_tasks(self, node: Node):
        tasks = selectors.node_recent_tasks(node_id=node.node_id, limit=10)
        if not tasks:
            return "No tasks yet."
        rows = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse("admin:nodes_task_change", args=[quote(task.task_id)]),
                    task.task_id,
                    task.tool_name,
                    badge(task.status),
                    task.attempts,
                    task.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                )
                for task in tasks
            ),
        )
        link = reverse("admin:nodes_task_changelist") + f"?assigned_node_id={node.node_id}"
        return format_html(
            '<table class="ab-table"><thead><tr><th>task</th><th>tool</th><th>status</th><th>attempts</th>'
            "<th>created (UTC)</th></tr></thead><tbody>{}</tbody></table>"
            '<p><a href="{}">All tasks of this node</a></p>',
            rows,
            link,
        )

    @admin.display(description="")
    def recent_log(self, node: Node):
        entries = selectors.node_log_list(node_id=node.node_id, limit=20)
        if not entries:
            return "Nothing logged yet."
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
                    badge(entry.level),
                    entry.event,
                    entry.message,
                )
                for entry in entries
            ),
        )
        link = reverse("admin:nodes_nodelog_changelist") + f"?node_id={node.node_id}"
        return format_html(
            '<table class="ab-table"><thead><tr><th>time (UTC)</th><th>level</th><th>event</th>'
            '<th>message</th></tr></thead><tbody>{}</tbody></table><p><a href="{}">Whole log</a></p>',
            rows,
            link,
        )

    @admin.display(description="")
    def llm_usage(self, node: Node):
        usage = selectors.node_llm_usage_today(node_id=node.node_id)
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    row.created_at.strftime("%H:%M:%S"),
                    row.model or "—",
                    badge("succeeded" if row.outcome == "succeeded" else "failed") if row.outcome else "",
                    row.total_tokens,
                    row.latency_ms if row.latency_ms is not None else "—",
                )
                for row in usage["recent"]
            ),
        )
        table = (
            format_html(
                '<table class="ab-table"><thead><tr><th>time (UTC)</th><th>model</th><th>outcome</th>'
                "<th>tokens</th><th>latency (ms)</th></tr></thead><tbody>{}</tbody></table>",
                rows,
            )
            if usage["recent"]
            else ""
        )
        return format_html(
            "<p><strong>{}</strong> requests, <strong>{}</strong> tokens since 00:00 UTC.</p>{}",
            usage["requests"],
            usage["tokens"],
            table,
        )

    # --- actions --------------------------------------------------------------------------
    @admin.action(description="Unregister and disconnect selected nodes", permissions=["delete"])
    def unregister_nodes(self, request, queryset):
        removed = []
        for node in queryset:
            try:
                admin_services.node_delete(
                    node_id=node.node_id, reason=f"unregistered by {request.user.get_username()}"
                )
                removed.append(node.node_id)
            except admin_services.NodeNotFoundError:
                continue
        self.message_user(
            request, f"Unregistered {len(removed)} node(s): {', '.join(removed)}.", messages.SUCCESS
        )

    def delete_model(self, request, obj: Node) -> None:
        try:
            admin_services.node_delete(
                node_id=obj.node_id, reason=f"unregistered by {request.user.get_username()}"
            )
        except admin_services.NodeNotFoundError:
            pass  # gone already: what the user asked for

    def delete_queryset(self, request, queryset) -> None:
        for node in queryset:
            self.delete_model(request, node)

    # --- buttons on the change page ---------------------------------------------------------
    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/control/<str:action>/",
                self.admin_site.admin_view(self.control_view),
                name="{}_{}_control".format(*info),
            ),
            path(
                "<path:object_id>/heartbeat-check/",
                self.admin_site.admin_view(self.heartbeat_check_view),
                name="{}_{}_heartbeat_check".format(*info),
            ),
            *super().get_urls(),
        ]

    def _change_url(self, node_id: str) -> str:
        return reverse("admin:nodes_node_change", args=[quote(node_id)])

    def control_view(self, request, object_id: str, action: str):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        node = get_object_or_404(Node, pk=unquote(object_id))
        if not self.has_change_permission(request, node) or action not in admin_services.CONTROL_ACTIONS:
            return HttpResponseRedirect(self._change_url(node.node_id))
        try:
            admin_services.node_control(
                node_id=node.node_id,
                action=action,
                reason=request.POST.get("reason", "")[:512] or f"{action} from the admin",
                actor=request.user.get_username(),
            )
            self.message_user(request, f"{action}: sent to {node.node_id}.", messages.SUCCESS)
        except admin_services.NodeNotConnectedError:
            self.message_user(request, f"{node.node_id} is not connected: cannot {action}.", messages.ERROR)
        except admin_services.NodeNotFoundError:
            self.message_user(request, f"{node.node_id} is no longer registered.", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:nodes_node_changelist"))
        return HttpResponseRedirect(self._change_url(node.node_id))

    def heartbeat_check_view(self, request, object_id: str):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        node = get_object_or_404(Node, pk=unquote(object_id))
        try:
            node = admin_services.node_heartbeat_check(node_id=node.node_id).node
        except admin_services.NodeNotFoundError:
            return HttpResponseRedirect(reverse("admin:nodes_node_changelist"))
        self.message_user(request, f"Heartbeat check: {node.node_id} is {node.status}.", messages.INFO)
        return HttpResponseRedirect(self._change_url(node.node_id))

    def render_change_form(self, request, context, *args, **kwargs):
        context["control_actions"] = admin_services.CONTROL_ACTIONS
        return super().render_change_form(request, context, *args, **kwargs)


# --- node keys ------------------------------------------------------------------------------
class NodeKeyForm(forms.ModelForm):
    capabilities = forms.CharField(
        required=False,
        help_text="Comma-separated. If not empty, the key may only register these capabilities.",
    )

    class Meta:
        model = NodeKey
        fields = ("name", "node_id", "capabilities")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["capabilities"] = ", ".join(self.instance.capabilities or [])

    def clean_capabilities(self) -> list[str]:
        raw = self.cleaned_data.get("capabilities") or ""
        return list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))


@admin.register(NodeKey)
class NodeKeyAdmin(admin.ModelAdmin):
    form = NodeKeyForm
    list_display = ("name", "prefix", "node_id", "capability_list", "created_at", "last_used_at", "revoked")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("name", "prefix", "node_id")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke_keys"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("name", "node_id", "capabilities")
        return ("name", "prefix", "node_id", "capabilities", "created_at", "last_used_at", "revoked_at")

    @admin.display(description="capabilities")
    def capability_list(self, key: NodeKey) -> str:
        return _plain_list(key.capabilities) if key.capabilities else "any"

    @admin.display(boolean=True, description="revoked", ordering="revoked_at")
    def revoked(self, key: NodeKey) -> bool:
        return key.is_revoked

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request, queryset):
        revoked = [key.name for key in queryset if node_key_revoke(key=key)]
        self.message_user(request, f"Revoked {len(revoked)} key(s).", messages.SUCCESS)

    def save_model(self, request, obj: NodeKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, plain = node_key_create(
            name=obj.name, node_id=obj.node_id, capabilities=form.cleaned_data.get("capabilities") or []
        )
        # The admin goes on with ``obj`` (log entry, redirect): make it the created row.
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = key.pk, key.prefix, key.key_hash, key.created_at
        obj._state.adding = False
        obj._state.db = key._state.db
        request._apexbridge_plain_key = plain

    @method_decorator(never_cache)
    def add_view(self, request, form_url="", extra_context=None):
        return super().add_view(request, form_url, extra_context)

    def response_add(self, request, obj: NodeKey, post_url_continue=None):
        plain = getattr(request, "_apexbridge_plain_key", None)
        if plain is None:
            return super().response_add(request, obj, post_url_continue)
        host = request.get_host()
        scheme = "wss" if request.is_secure() else "ws"
        response = TemplateResponse(
            request,
            "admin/nodes/nodekey/created.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "key": obj,
                "plain_key": plain,
                "ws_url": f"{scheme}://{host}/abp-distributed-server/VCP_Key={plain}",
                "title": "Node key created",
            },
        )
        response["Cache-Control"] = "no-store"
        return response


# --- tasks ----------------------------------------------------------------------------------
@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = (
        "task_id",
        "tool_name",
        "status_badge",
        "assigned_node_id",
        "node_id",
        "priority",
        "attempts",
        "created_at",
        "finished_at",
        "execution_time_ms",
    )
    list_filter = ("status", "tool_name", "priority")
    search_fields = ("task_id", "tool_name", "node_id", "assigned_node_id", "idempotency_key", "capability")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    actions = ["cancel_tasks", "requeue_tasks"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False  # tasks are submitted through /api/tasks or submit_task

    @admin.display(description="status", ordering="status")
    def status_badge(self, task: Task):
        return badge(task.status)

    def _run(self, request, queryset, verb: str, service) -> None:
        from nodes.task_services import TaskError

        done, refused = [], []
        for task in queryset:
            try:
                service(task)
                done.append(task.task_id)
            except (TaskError, Task.DoesNotExist) as error:
                refused.append(f"{task.task_id} ({error})")
        if done:
            self.message_user(request, f"{verb} {len(done)} task(s).", messages.SUCCESS)
        if refused:
            self.message_user(request, f"Not {verb.lower()}: {'; '.join(refused)}", messages.WARNING)

    @admin.action(description="Cancel selected tasks", permissions=["change"])
    def cancel_tasks(self, request, queryset):
        from nodes.task_services import task_cancel

        reason = f"cancelled by {request.user.get_username()}"
        self._run(
            request, queryset, "Cancelled", lambda task: task_cancel(task_id=task.task_id, reason=reason)
        )

    @admin.action(
        description="Re-queue selected tasks (failed, timed out or cancelled)", permissions=["change"]
    )
    def requeue_tasks(self, request, queryset):
        from nodes.task_services import task_requeue

        self._run(request, queryset, "Re-queued", lambda task: task_requeue(task_id=task.task_id))


# --- node logs and hub processes -------------------------------------------------------------
@admin.register(NodeLog)
class NodeLogAdmin(admin.ModelAdmin):
    list_display = ("timestamp", "node_id", "level_badge", "event", "short_message")
    list_filter = ("level", "event")
    search_fields = ("node_id", "message", "event")
    date_hierarchy = "timestamp"
    ordering = ("-timestamp", "-id")

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="level", ordering="level")
    def level_badge(self, entry: NodeLog):
        return badge(entry.level)

    @admin.display(description="message")
    def short_message(self, entry: NodeLog) -> str:
        return entry.message if len(entry.message) <= 140 else entry.message[:139] + "…"


@admin.register(HubProcess)
class HubProcessAdmin(admin.ModelAdmin):
    list_display = ("process_id", "hostname", "pid", "started_at", "last_beat_at", "stopped_at", "running")
    list_filter = (("stopped_at", admin.EmptyFieldListFilter),)
    search_fields = ("process_id", "hostname")
    ordering = ("-last_beat_at",)

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(boolean=True, description="running")
    def running(self, process: HubProcess) -> bool:
        return process.stopped_at is None
