"""Serializers of the admin REST API (PROTOCOL §6).

Two kinds live here: *query / body* serializers validate what a client sends (a
bad value is a 400 with the error envelope), and *response* serializers describe
the bodies for the OpenAPI schema. The bodies themselves are built by
``nodes.protocol`` (``node_info_data``, ``task_data``), which owns the wire names.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_serializer
from rest_framework import serializers

from nodes.admin_services import CONTROL_ACTIONS
from nodes.models import NodeStatus, NodeType, TaskStatus
from nodes.selectors import NODE_LOG_LEVELS

MAX_PAGE = 1000
# An OFFSET past 64 bits makes the database fail (a 500): refuse absurd ones up front.
MAX_OFFSET = 2**31 - 1


# Build a serializer class's fields once, not per instance. DRF deep-copies the
# declared fields for every serializer instance, running each field's __init__ and
# its validators' again: for the task body, validated on every POST /api/tasks, that
# was ~6 % of a hub's CPU under the task benchmark. Plain fields keep no per-request
# state (errors and values live in locals) when the serializer is not partial and has
# no context, so the class binds one set to a template instance and every instance
# validates with it. Only for such serializers: no nested serializers, no
# context-dependent defaults, no per-instance changes to ``fields``; an instance made
# partial or with a context gets fields of its own, as DRF gives them. (A comment,
# not a docstring: drf-spectacular would show a mixin's docstring as the description
# of the serializers that use it.)
class FieldsBuiltOnce:
    @property
    def fields(self):
        if self.partial or self._context:
            own = self.__dict__.get("_own_fields")
            if own is None:
                own = self.__dict__["_own_fields"] = serializers.Serializer.fields.func(self)
            return own
        cls = type(self)
        shared = cls.__dict__.get("_fields_built_once")
        if shared is None:  # two threads may both build it: the same fields either way
            shared = serializers.Serializer.fields.func(cls())
            cls._fields_built_once = shared
        return shared


# --- requests ----------------------------------------------------------------------
class LoginRequestSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=4096, trim_whitespace=False, style={"input_type": "password"})


class PageQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=MAX_PAGE, default=100)
    offset = serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, default=0)


class NodeListQuerySerializer(PageQuerySerializer):
    # Without a limit every node up to 1000 is listed: the original API had no paging.
    limit = serializers.IntegerField(min_value=1, max_value=MAX_PAGE, default=MAX_PAGE)
    type = serializers.ChoiceField(choices=NodeType.values, required=False)
    status = serializers.ChoiceField(choices=NodeStatus.values, required=False)
    capability = serializers.CharField(max_length=256, required=False)
    tag = serializers.CharField(max_length=256, required=False)
    search = serializers.CharField(max_length=128, required=False)


class NodeLogQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=MAX_PAGE, default=100)
    level = serializers.ChoiceField(choices=[*NODE_LOG_LEVELS, "warning"], required=False)

    def validate_level(self, value: str) -> str:
        return "warn" if value == "warning" else value


class NodeTaskQuerySerializer(PageQuerySerializer):
    status = serializers.ChoiceField(choices=TaskStatus.values, required=False)


class TaskListQuerySerializer(PageQuerySerializer):
    status = serializers.ChoiceField(choices=TaskStatus.values, required=False)
    nodeId = serializers.CharField(max_length=64, required=False)  # noqa: N815 - wire name
    toolName = serializers.CharField(max_length=128, required=False)  # noqa: N815


class NodeControlRequestSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=CONTROL_ACTIONS)
    reason = serializers.CharField(max_length=512, required=False, allow_blank=True, default="")


# --- responses (schema) ----------------------------------------------------------------
class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ErrorResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField(default=False)
    error = ErrorDetailSerializer()


class LoginResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    token = serializers.CharField()


class NodeConfigSerializer(serializers.Serializer):
    maxConcurrentTasks = serializers.IntegerField()  # noqa: N815
    resources = serializers.DictField()
    metadata = serializers.DictField()
    tags = serializers.ListField(child=serializers.CharField())


class NodeInfoStatsSerializer(serializers.Serializer):
    totalTasks = serializers.IntegerField()  # noqa: N815
    completedTasks = serializers.IntegerField()  # noqa: N815
    failedTasks = serializers.IntegerField()  # noqa: N815
    averageResponseTime = serializers.FloatField()  # noqa: N815
    reported = serializers.DictField(help_text="The node's own figures from its last heartbeat.")
    resources = serializers.DictField(help_text="Resource use the node reported (fractions).")


class NodeInfoSerializer(serializers.Serializer):
    id = serializers.CharField()
    nodeId = serializers.CharField()  # noqa: N815
    name = serializers.CharField()
    type = serializers.ChoiceField(choices=NodeType.values)
    version = serializers.CharField(allow_null=True)
    protocol = serializers.ChoiceField(choices=["abp", "vcp"])
    status = serializers.ChoiceField(choices=NodeStatus.values)
    registeredAt = serializers.IntegerField(help_text="ms since the epoch")  # noqa: N815
    lastHeartbeat = serializers.IntegerField(allow_null=True, help_text="ms since the epoch")  # noqa: N815
    lastSeen = serializers.IntegerField(allow_null=True, help_text="ms since the epoch")  # noqa: N815
    capabilities = serializers.ListField(child=serializers.CharField())
    tools = serializers.ListField(child=serializers.CharField())
    personality = serializers.DictField(allow_null=True)
    endpoint = serializers.CharField(allow_null=True)
    ips = serializers.DictField()
    config = NodeConfigSerializer()
    draining = serializers.BooleanField()
    connected = serializers.BooleanField()
    stats = NodeInfoStatsSerializer()


# many=False: the list action answers one envelope object, not an array of them
# (without it the schema said `array`, and schemathesis found every answer wrong).
@extend_schema_serializer(many=False)
class NodeListResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    nodes = NodeInfoSerializer(many=True)
    total = serializers.IntegerField(help_text="Matching nodes before limit/offset.")


class NodeResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    node = NodeInfoSerializer()


class NodeStatsSerializer(serializers.Serializer):
    totalTasks = serializers.IntegerField()  # noqa: N815
    completedTasks = serializers.IntegerField()  # noqa: N815
    failedTasks = serializers.IntegerField()  # noqa: N815
    activeTasks = serializers.IntegerField()  # noqa: N815
    averageResponseTime = serializers.FloatField(help_text="ms")  # noqa: N815
    uptime = serializers.IntegerField(help_text="ms connected and live; 0 when offline")
    lastHeartbeat = serializers.IntegerField(allow_null=True, help_text="ms since the epoch")  # noqa: N815


class NodeStatsResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    stats = NodeStatsSerializer()


class LogEntrySerializer(serializers.Serializer):
    timestamp = serializers.IntegerField(help_text="ms since the epoch")
    level = serializers.ChoiceField(choices=NODE_LOG_LEVELS)
    event = serializers.CharField()
    message = serializers.CharField()
    context = serializers.DictField()


class NodeLogsResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    logs = LogEntrySerializer(many=True)


class TaskSerializer(serializers.Serializer):
    taskId = serializers.CharField()  # noqa: N815
    toolName = serializers.CharField()  # noqa: N815
    toolArgs = serializers.JSONField()  # noqa: N815
    capability = serializers.CharField(allow_null=True)
    nodeId = serializers.CharField(allow_null=True)  # noqa: N815
    priority = serializers.IntegerField()
    timeout = serializers.IntegerField(help_text="ms")
    maxRetries = serializers.IntegerField()  # noqa: N815
    attempts = serializers.IntegerField()
    assignedNodeId = serializers.CharField(allow_null=True)  # noqa: N815
    status = serializers.ChoiceField(choices=TaskStatus.values)
    result = serializers.JSONField(allow_null=True)
    error = serializers.JSONField(allow_null=True)
    executionTime = serializers.IntegerField(allow_null=True, help_text="ms")  # noqa: N815
    waitingReason = serializers.CharField(allow_null=True)  # noqa: N815
    idempotencyKey = serializers.CharField(allow_null=True)  # noqa: N815
    dependsOn = serializers.ListField(child=serializers.CharField())  # noqa: N815
    createdAt = serializers.IntegerField()  # noqa: N815
    assignedAt = serializers.IntegerField(allow_null=True)  # noqa: N815
    finishedAt = serializers.IntegerField(allow_null=True)  # noqa: N815


class TaskListResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    tasks = TaskSerializer(many=True)
    total = serializers.IntegerField(help_text="Matching tasks before limit/offset.")


class HeartbeatCheckResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    status = serializers.ChoiceField(choices=NodeStatus.values)
    lastHeartbeat = serializers.IntegerField(allow_null=True, help_text="ms since the epoch")  # noqa: N815


class MessageResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    message = serializers.CharField()


class NodeCountsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    online = serializers.IntegerField()
    busy = serializers.IntegerField()
    offline = serializers.IntegerField()
    unknown = serializers.IntegerField()
    connected = serializers.IntegerField()
    draining = serializers.IntegerField()


class TaskCountsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    queued = serializers.IntegerField()
    assigned = serializers.IntegerField()
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    timed_out = serializers.IntegerField()
    cancelled = serializers.IntegerField()


class LLMTodaySerializer(serializers.Serializer):
    requests = serializers.IntegerField(help_text="LLM requests since 00:00 UTC, refused ones included")
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()
    rateLimited = serializers.IntegerField()  # noqa: N815
    promptTokens = serializers.IntegerField()  # noqa: N815
    completionTokens = serializers.IntegerField()  # noqa: N815
    tokens = serializers.IntegerField(help_text="prompt + completion tokens since 00:00 UTC")


class HubStatsResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    nodes = NodeCountsSerializer()
    tasks = TaskCountsSerializer()
    llm = LLMTodaySerializer()
    timestamp = serializers.IntegerField(help_text="ms since the epoch")


class QuotaLimitsSerializer(serializers.Serializer):
    maxRequestsPerMinute = serializers.IntegerField()  # noqa: N815
    burstMultiplier = serializers.FloatField()  # noqa: N815
    maxTokensPerDay = serializers.IntegerField()  # noqa: N815
    maxConcurrentStreams = serializers.IntegerField()  # noqa: N815


class QuotaUsageSerializer(serializers.Serializer):
    requestTokensAvailable = serializers.FloatField(help_text="Requests the bucket admits now")  # noqa: N815
    tokensToday = serializers.IntegerField()  # noqa: N815
    activeStreams = serializers.IntegerField()  # noqa: N815


class QuotaResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    nodeId = serializers.CharField()  # noqa: N815
    limits = QuotaLimitsSerializer()
    usage = QuotaUsageSerializer()
    policySources = serializers.DictField(  # noqa: N815
        child=serializers.CharField(),
        help_text="Where each limit comes from (settings, type:…, tag:…, node:…).",
    )
