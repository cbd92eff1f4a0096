"""The node WebSocket wire format (PROTOCOL §1–3): message types, payload schemas,
error codes, close codes and the camelCase <-> snake_case edge.

Nothing else builds a wire frame by hand: use ``frame()`` and the ``*_data`` helpers.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel


def now_ms() -> int:
    return int(time.time() * 1000)


def dt_ms(value) -> int | None:
    """A datetime as integer milliseconds since the epoch (the wire's timestamp form)."""
    return None if value is None else int(value.timestamp() * 1000)


# --- codes -----------------------------------------------------------------------
class ErrorCode:
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_PAYLOAD = "invalid_payload"
    NOT_REGISTERED = "not_registered"
    NODE_MISMATCH = "node_mismatch"
    FORBIDDEN = "forbidden"
    NODE_LIMIT_REACHED = "node_limit_reached"
    UNKNOWN_TASK = "unknown_task"
    STALE_RESULT = "stale_result"
    INTERNAL_ERROR = "internal_error"
    # Hub extension (PROTOCOL is silent): the database is unreachable; send it again later.
    SERVICE_UNAVAILABLE = "service_unavailable"


class CloseCode:
    REPLACED = 4000
    UNREGISTERED_BY_ADMIN = 4003
    POLICY_VIOLATION = 4008
    MESSAGE_TOO_BIG = 4009
    # Hub extension: the key could not be checked (database unreachable); reconnect later.
    TRY_AGAIN_LATER = 4013


class ProtocolError(Exception):
    """A failure that becomes one reply frame (see ``NodeConsumer.reply_error``)."""

    def __init__(self, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def as_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error


# Messages whose failures are answered with their own reply type (PROTOCOL §1.1);
# the others are answered with a plain ``error`` frame.
REPLY_TYPES: dict[str, str] = {
    "node_register": "node_registered",
    "heartbeat": "heartbeat_ack",
    "node_unregister": "node_unregistered",
    "register_tools": "register_ack",
    "task_result": "task_result_ack",
    "llm_request": "llm_response",
}

# Fields echoed from the request into a failure reply, so the node can match it.
ECHO_FIELDS = ("nodeId", "taskId", "requestId")

# Messages a connection may send before ``node_register`` (VCP nodes never register).
PRE_REGISTRATION_TYPES = frozenset(
    {"node_register", "register_tools", "ping", "report_ip", "update_static_placeholders"}
)


def frame(message_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": message_type, "data": data}, separators=(",", ":"), default=str)


def error_frame(code: str, message: str) -> str:
    return frame("error", {"code": code, "message": message, "timestamp": now_ms()})


def failure_data(request: dict[str, Any] | None, error: ProtocolError) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if isinstance(request, dict):
        for name in ECHO_FIELDS:
            if isinstance(request.get(name), (str, int)):
                data[name] = request[name]
    data.update({"success": False, "error": error.as_error(), "timestamp": now_ms()})
    return data


# JSON text may still spell values no database column or JSON reader takes: NaN and
# Infinity (Python's json reads them), numbers that overflow to infinity (1e400), and
# the escapes \u0000 and lone surrogates (\ud800). Stored, they failed every write of
# the row (PostgreSQL jsonb and SQLite's JSON_VALID refuse them), so they are refused
# at the edge. The string walk runs only when the text holds such an escape.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def _has_bad_string(value: Any) -> bool:
    if isinstance(value, str):
        return _BAD_CHARS.search(value) is not None
    if isinstance(value, dict):
        return any(_has_bad_string(k) or _has_bad_string(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_string(item) for item in value)
    return False


def _loads_strict(text: str) -> tuple[Any, str | None]:
    """``json.loads`` that reports (instead of returning) non-finite numbers."""
    problems: list[str] = []

    def constant(name: str) -> None:
        problems.append(name)

    def finite_float(literal: str) -> float | None:
        value = float(literal)
        if math.isinf(value):
            problems.append(literal[:40])
            return None
        return value

    message = json.loads(text, parse_constant=constant, parse_float=finite_float)
    if problems:
        return message, f"numbers must be finite JSON numbers, not {problems[0]}"
    if _SUSPECT_ESCAPE.search(text) and _has_bad_string(message):
        return message, "strings must not contain NUL characters or unpaired surrogates"
    return message, None


def parse_envelope(text: str) -> tuple[str, dict[str, Any]]:
    """Parse a text frame into (type, data), raising ProtocolError as §1.1 says."""
    try:
        message, bad_value = _loads_strict(text)
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "Frame is nested too deeply to parse") from None
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "Frame is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Frame must be a JSON object")
    message_type = message.get("type")
    if not isinstance(message_type, str) or not message_type:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Frame needs a string 'type'")
    data = message.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict) or bad_value:
        error = ProtocolError(ErrorCode.INVALID_PAYLOAD, f"data: {bad_value or 'must be a JSON object'}")
        error.message_type = message_type  # answered with that type's own reply (§1.1)
        error.data = data if isinstance(data, dict) else None
        raise error
    return message_type, data


# --- payload schemas ---------------------------------------------------------------
NodeIdStr = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
ShortStr = Annotated[str, StringConstraints(max_length=256)]
NameStr = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python, strict types, unknown fields ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, strict=True, extra="ignore")


class Resources(WireModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, strict=False, extra="allow")
    cpu: float | None = None
    memory: float | None = None
    disk: float | None = None


class TasksConfig(WireModel):
    max_concurrent: int | None = Field(default=None, ge=1, le=10000)


class NodeConfig(WireModel):
    max_concurrent_tasks: int | None = Field(default=None, ge=1, le=10000)
    tasks: TasksConfig | None = None
    resources: Resources | None = None
    metadata: dict[str, Any] | None = None
    tags: list[ShortStr] | None = Field(default=None, max_length=64)


class NodeRegisterPayload(WireModel):
    node_id: NodeIdStr | None = None
    name: NameStr
    type: Literal["worker", "companion"] = "worker"
    version: ShortStr | None = None
    # As many as tools: a VCP node's capabilities are its tool names.
    capabilities: list[ShortStr] = Field(max_length=5000)
    tools: list[ShortStr] | None = Field(default=None, max_length=5000)
    personality: dict[str, Any] | None = None
    endpoint: Annotated[str, StringConstraints(max_length=512)] | None = None
    config: NodeConfig | None = None

    @property
    def max_concurrent_tasks(self) -> int:
        if self.config is None:
            return 1
        if self.config.max_concurrent_tasks is not None:
            return self.config.max_concurrent_tasks
        if self.config.tasks is not None and self.config.tasks.max_concurrent is not None:
            return self.config.tasks.max_concurrent
        return 1


class HeartbeatStats(WireModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, strict=False, extra="allow")
    active_tasks: int | None = None
    completed_tasks: int | None = None
    failed_tasks: int | None = None


class HeartbeatPayload(WireModel):
    node_id: str | None = None
    status: Literal["online", "busy"] | None = None
    stats: HeartbeatStats | None = None
    resources: Resources | None = None


class NodeUnregisterPayload(WireModel):
    node_id: str | None = None
    reason: Annotated[str, StringConstraints(max_length=512)] | None = None


class ToolManifest(BaseModel):
    """A VCP tool manifest. Only these fields are kept: the rest (``basePath``,
    ``pluginSpecificEnvConfig``…) is local to the node and may hold secrets."""

    model_config = ConfigDict(extra="ignore", strict=False)
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    displayName: str | None = None  # noqa: N815 (VCP's own field name)
    description: str | None = None
    pluginType: str | None = None  # noqa: N815
    capabilities: Any = None
    invocationCommands: Any = None  # noqa: N815

    def kept(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        # VCP puts invocation commands under capabilities.invocationCommands.
        capabilities = data.pop("capabilities", None)
        if isinstance(capabilities, dict) and "invocationCommands" in capabilities:
            data.setdefault("invocationCommands", capabilities["invocationCommands"])
        return data


class RegisterToolsPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    serverName: Annotated[str, StringConstraints(max_length=128)] | None = None  # noqa: N815
    tools: list[ToolManifest | Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        max_length=5000
    )

    def manifests(self) -> list[dict[str, Any]]:
        result = []
        for tool in self.tools:
            result.append({"name": tool} if isinstance(tool, str) else tool.kept())
        return result


class UnregisterToolsPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    tools: list[str] = Field(max_length=5000)


class ReportIpPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    serverName: str | None = None  # noqa: N815
    localIPs: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(  # noqa: N815
        default=None, max_length=64
    )
    publicIP: Annotated[str, StringConstraints(max_length=64)] | None = None  # noqa: N815


class NodeLogPayload(WireModel):
    node_id: str | None = None
    level: Literal["debug", "info", "warn", "warning", "error"] = "info"
    message: Annotated[str, StringConstraints(max_length=10000)]
    context: dict[str, Any] | None = None


class TaskResultError(WireModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    code: str = "tool_error"
    message: str = ""
    details: Any = None
    retryable: bool = False


class TaskResultPayload(WireModel):
    task_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    node_id: str | None = None
    success: bool
    result: Any = None
    error: TaskResultError | None = None
    # Bounded: the columns are 32-bit integers (a larger value failed the write).
    execution_time: int | None = Field(default=None, ge=0, le=2_147_483_647)
    attempt: int | None = Field(default=None, ge=0, le=2_147_483_647)


class ToolResultPayload(BaseModel):
    """VCP's ``tool_result``: ``error`` may be a plain string."""

    model_config = ConfigDict(extra="ignore", strict=True)
    requestId: Annotated[str, StringConstraints(min_length=1, max_length=64)]  # noqa: N815
    status: Literal["success", "error"]
    result: Any = None
    error: Any = None


def validate(schema: type[BaseModel], data: dict[str, Any]):
    """Validate a payload, turning pydantic's errors into one ``invalid_payload``."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(part) for part in err["loc"]) or "data"
            problems.append(f"{where}: {err['msg']}")
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "; ".join(problems)) from None


# --- outgoing data ------------------------------------------------------------------
def node_info_data(node) -> dict[str, Any]:
    """NodeInfo (seed §2.1 + PROTOCOL §2) as sent in events and the admin API."""
    average = round(node.total_response_time_ms / node.completed_tasks, 1) if node.completed_tasks else 0
    return {
        "id": node.node_id,
        "nodeId": node.node_id,
        "name": node.name,
        "type": node.type,
        "version": node.version or None,
        "protocol": node.protocol,
        "status": node.status,
        "registeredAt": dt_ms(node.registered_at),
        "lastHeartbeat": dt_ms(node.last_heartbeat),
        "lastSeen": dt_ms(node.last_seen),
        "capabilities": list(node.capabilities or []),
        "tools": list(node.tools or []),
        "personality": node.personality,
        "endpoint": node.endpoint or None,
        "ips": node.ips or {},
        "config": {
            "maxConcurrentTasks": node.max_concurrent_tasks,
            "resources": node.resources or {},
            "metadata": node.metadata or {},
            "tags": list(node.tags or []),
        },
        "draining": node.draining,
        "connected": bool(node.connection_id),
        "stats": {
            "totalTasks": node.total_tasks,
            "completedTasks": node.completed_tasks,
            "failedTasks": node.failed_tasks,
            "averageResponseTime": average,
            "reported": node.reported_stats or {},
            "resources": node.reported_resources or {},
        },
    }


def task_data(task) -> dict[str, Any]:
    """A task as sent in events and the task API (PROTOCOL §3.1 names)."""
    return {
        "taskId": task.task_id,
        "toolName": task.tool_name,
        "toolArgs": task.tool_args,
        "capability": task.capability or None,
        "nodeId": task.node_id or None,
        "priority": task.priority,
        "timeout": task.timeout_ms,
        "maxRetries": task.max_retries,
        "attempts": task.attempts,
        "assignedNodeId": task.assigned_node_id or None,
        "status": task.status,
        "result": task.result,
        "error": task.error,
        "executionTime": task.execution_time_ms,
        "waitingReason": task.waiting_reason or None,
        "idempotencyKey": task.idempotency_key,
        "dependsOn": list(task.depends_on or []),
        "createdAt": dt_ms(task.created_at),
        "assignedAt": dt_ms(task.assigned_at),
        "finishedAt": dt_ms(task.finished_at),
    }


# --- task frames (hub -> node, PROTOCOL §3.2 and §2.5) -----------------------------------
def task_assign_data(task) -> dict[str, Any]:
    data: dict[str, Any] = {
        "taskId": task.task_id,
        "nodeId": task.assigned_node_id,
        "toolName": task.tool_name,
        "toolArgs": task.tool_args,
        "timeout": task.timeout_ms,
        "priority": task.priority,
        "attempt": task.attempts,
    }
    if task.capability:
        data["capability"] = task.capability
    return data


def execute_tool_data(task) -> dict[str, Any]:
    """What a VCP node gets instead of ``task_assign``."""
    return {"requestId": task.task_id, "toolName": task.tool_name, "toolArgs": task.tool_args}


def task_cancel_data(task_id: str, reason: str) -> dict[str, Any]:
    return {"taskId": task_id, "reason": reason}


def task_result_ack_data(task_id: str, node_id: str) -> dict[str, Any]:
    return {"taskId": task_id, "nodeId": node_id, "success": True, "timestamp": now_ms()}


def tool_result_error(error: Any) -> dict[str, Any]:
    """A VCP ``tool_result`` error (a plain string, an object or nothing) as a task error."""
    if isinstance(error, dict):
        message = error.get("message") or error.get("error") or json.dumps(error, default=str)[:2000]
        result: dict[str, Any] = {"code": str(error.get("code") or "tool_error"), "message": str(message)}
        if error.get("details") is not None:
            result["details"] = error["details"]
        return result
    if error is None or error == "":
        return {"code": "tool_error", "message": "The tool reported an error"}
    return {"code": "tool_error", "message": str(error)[:10000]}
