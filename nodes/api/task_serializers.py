"""Serializers of the task API (``/api/tasks``, PROTOCOL §6): the submission body and
the ``wait`` query, plus the response envelopes for the OpenAPI schema. The task
body itself is built by ``nodes.protocol.task_data``."""

from __future__ import annotations

import json
import re

from django.conf import settings
from rest_framework import serializers

from nodes.api.serializers import FieldsBuiltOnce, TaskSerializer

NODE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
MAX_WAIT_SECONDS = 60
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_DEPENDENCIES = 100
FRAME_HEADROOM_BYTES = 4096  # the task_assign envelope around toolArgs


class StrictCharField(serializers.CharField):
    """A string field that refuses numbers instead of turning them into text."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class TaskSubmitSerializer(FieldsBuiltOnce, serializers.Serializer):
    toolName = StrictCharField(max_length=128)  # noqa: N815
    toolArgs = serializers.DictField(required=False, default=dict)  # noqa: N815
    capability = StrictCharField(max_length=128, required=False, allow_blank=True, allow_null=True)
    nodeId = StrictCharField(  # noqa: N815
        required=False,
        allow_null=True,
        allow_blank=True,
        max_length=64,
        help_text="Pin the task to this node",
    )
    priority = serializers.IntegerField(min_value=0, max_value=10, default=5, help_text="10 runs first")
    timeout = serializers.IntegerField(
        min_value=1, max_value=MAX_TIMEOUT_MS, required=False, allow_null=True, help_text="ms per attempt"
    )
    maxRetries = serializers.IntegerField(min_value=0, max_value=100, required=False, allow_null=True)  # noqa: N815
    idempotencyKey = StrictCharField(max_length=128, required=False, allow_null=True, allow_blank=True)  # noqa: N815
    dependsOn = serializers.ListField(  # noqa: N815
        child=StrictCharField(max_length=64), required=False, max_length=MAX_DEPENDENCIES, default=list
    )

    def validate_toolArgs(self, value):  # noqa: N802 - DRF's name for the field's check
        # The arguments travel to the node in one frame, which has a size limit.
        limit = settings.APEXBRIDGE_MAX_FRAME_BYTES - FRAME_HEADROOM_BYTES
        if len(json.dumps(value, separators=(",", ":"), default=str).encode()) > limit:
            raise serializers.ValidationError(f"Too large: at most {limit} bytes of JSON.")
        return value

    def validate_nodeId(self, value):  # noqa: N802
        if value and not re.match(NODE_ID_PATTERN, value):
            raise serializers.ValidationError("Must match [A-Za-z0-9._:-]{1,64}.")
        return value

    def service_kwargs(self) -> dict:
        """The validated body as ``task_services.task_submit`` keyword arguments."""
        data = self.validated_data
        return {
            "tool_name": data["toolName"],
            "tool_args": data.get("toolArgs") or {},
            "capability": data.get("capability") or "",
            "node_id": data.get("nodeId") or "",
            "priority": data["priority"],
            "timeout_ms": data.get("timeout"),
            "max_retries": data.get("maxRetries"),
            "idempotency_key": data.get("idempotencyKey") or None,
            "depends_on": list(data.get("dependsOn") or []),
        }


class WaitQuerySerializer(FieldsBuiltOnce, serializers.Serializer):
    wait = serializers.FloatField(
        min_value=0,
        max_value=MAX_WAIT_SECONDS,
        default=0,
        help_text="Seconds (at most 60) to wait for the task to end before answering",
    )


class TaskCancelSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=512, required=False, allow_blank=True, default="")


class TaskResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    task = TaskSerializer()
