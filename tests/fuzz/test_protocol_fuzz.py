"""Protocol fuzzing of the node socket (PROTOCOL §1.1), in-process for speed.

Hypothesis generates and mutates frames of every node message type (wrong types,
huge and deeply nested values, unicode edge cases, missing and extra fields, other
nodes' ids, replays, out-of-order messages) and sends them on one reused
connection. After every frame a ``ping`` marks the end of its replies. Properties:

- the hub never fails (no ``internal_error``, no traceback text in any frame);
- a frame gets exactly the replies §1.1 and DECISIONS.md say (one reply of the
  right type, or none for the messages without one);
- a refused frame changes no stored state (Node, Task and NodeLog rows).

``APEXBRIDGE_FUZZ_FRAMES`` sets how many frames are sent (CI: 300; ``make fuzz``:
100,000). The count actually sent is printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes import task_services
from nodes.models import Node, NodeLog, Task
from nodes.protocol import PRE_REGISTRATION_TYPES
from nodes.runtime import runtime
from tests.conftest import TEST_SHARED_KEY

pytestmark = pytest.mark.django_db(transaction=True)

FRAMES = int(os.environ.get("APEXBRIDGE_FUZZ_FRAMES", "300"))
FRAMES_PER_EXAMPLE = 10
FRAME_LIMIT_BYTES = 64 * 1024
NODE_PATH = f"/abp-distributed-server/VCP_Key={TEST_SHARED_KEY}"

# node -> hub messages and the reply each one gets when it is accepted (None: no reply).
SUCCESS_REPLY = {
    "node_register": "node_registered",
    "heartbeat": "heartbeat_ack",
    "node_unregister": "node_unregistered",
    "register_tools": "register_ack",
    "unregister_tools": "unregister_ack",
    "report_ip": None,
    "update_static_placeholders": None,
    "node_log": None,
    "task_result": "task_result_ack",
    "tool_result": None,
    "llm_request": "llm_response",
    "llm_cancel": None,
    "ping": "pong",
    "pong": None,
}
# Failures answered with the type's own reply (PROTOCOL §1.1); the rest get ``error``.
OWN_REPLY = {
    "node_register": "node_registered",
    "heartbeat": "heartbeat_ack",
    "node_unregister": "node_unregistered",
    "register_tools": "register_ack",
    "task_result": "task_result_ack",
    "llm_request": "llm_response",
}
# Frames the hub sends on its own (dispatch, control): never a reply to a fuzz frame.
HUB_INITIATED = {"task_assign", "execute_tool", "task_cancel", "node_control", "ping"}
OWN_ID = "fuzz-node"
OTHER_ID = "fuzz-other"

# --- strategies -----------------------------------------------------------------------------
EDGE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfff",
    "\ud83d\ude00",
    "\u202e\u200b\ufeff",
    "é" * 300,
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "'; DROP TABLE nodes_node; --",
    "%s%s%n",
    "x" * 70_000,
    OWN_ID,
    OTHER_ID,
    "vcp-" + OTHER_ID,
]
texts = st.one_of(st.text(max_size=40), st.sampled_from(EDGE_STRINGS))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**40, 1e308, -0.0, 1e-320]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def valid_data(message_type: str, rnd: random.Random, tasks: list[str]) -> dict:
    """A well-formed payload of this type (before mutation)."""
    node_id = rnd.choice([OWN_ID, OWN_ID, None, OTHER_ID, "fuzz-" + str(rnd.randint(0, 5))])
    task_id = rnd.choice(tasks + ["t-unknown", "t-" + "0" * 32]) if tasks or rnd.random() < 0.5 else "t-x"
    data: dict = {
        "node_register": {
            "nodeId": node_id,
            "name": "fuzz",
            "type": rnd.choice(["worker", "companion"]),
            "capabilities": rnd.choice([[], ["echo"], ["gpu", "echo"]]),
            "tools": ["echo"],
            "config": {"maxConcurrentTasks": rnd.randint(1, 4), "tags": ["t"], "tasks": {"maxConcurrent": 2}},
        },
        "heartbeat": {
            "nodeId": node_id,
            "status": rnd.choice(["online", "busy"]),
            "stats": {"activeTasks": 0, "completedTasks": 1},
            "resources": {"cpu": 0.5, "memory": 0.1},
        },
        "node_unregister": {"nodeId": node_id, "reason": "fuzz"},
        "register_tools": {
            "serverName": rnd.choice(["fuzzvcp", "fuzz vcp/../", OTHER_ID]),
            "tools": [{"name": "echo", "pluginSpecificEnvConfig": {"SECRET": "s3cr3t"}}, "sha256"],
        },
        "unregister_tools": {"tools": ["echo"]},
        "report_ip": {"serverName": "fuzz", "localIPs": ["10.0.0.1"], "publicIP": "1.2.3.4"},
        "update_static_placeholders": {"x": 1},
        "node_log": {"nodeId": node_id, "level": "info", "message": "fuzz", "context": {"a": 1}},
        "task_result": {
            "taskId": task_id,
            "nodeId": node_id,
            "success": rnd.random() < 0.7,
            "result": {"x": 1},
            "error": {"code": "tool_error", "message": "m", "retryable": rnd.random() < 0.5},
            "executionTime": 5,
        },
        "tool_result": {"requestId": task_id, "status": rnd.choice(["success", "error"]), "error": "boom"},
        "llm_request": {
            "requestId": f"r-{rnd.randint(0, 3)}",
            "messages": [{"role": "user", "content": "hi"}],
        },
        "llm_cancel": {"requestId": f"r-{rnd.randint(0, 3)}"},
        "ping": {},
        "pong": {},
    }[message_type]
    return {k: v for k, v in data.items() if v is not None}


def mutate(data: dict, rnd: random.Random, value) -> dict | object:
    kind = rnd.randrange(11)
    data = dict(data)
    if kind == 0 and data:
        data.pop(rnd.choice(list(data)))  # missing field
    elif kind == 1:
        data[rnd.choice(["extra", "api_key", "__proto__", "nodeId"])] = value  # extra or replaced field
    elif kind == 2 and data:
        data[rnd.choice(list(data))] = value  # wrong type / odd value
    elif kind == 3:
        return value  # data that is not an object
    elif kind == 4 and data:
        key = rnd.choice(list(data))
        data[key] = {"deep": _deep(rnd.choice([50, 400, 900]))}  # deep nesting
    elif kind == 5 and data:
        data[rnd.choice(list(data))] = rnd.choice(EDGE_STRINGS)
    return data  # 6-10: unchanged (valid)


def _deep(depth: int):
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def to_text(message_type, data, rnd: random.Random) -> str:
    """Serialise as a real client could: UTF-8 JSON text, non-ASCII escaped or not."""
    envelope = {"type": message_type, "data": data}
    try:
        text = json.dumps(envelope, ensure_ascii=True)
    except (RecursionError, ValueError):
        text = json.dumps({"type": message_type, "data": {}})
    cut = rnd.randrange(12)
    if cut == 0:
        return text[: rnd.randrange(len(text))]  # truncated
    if cut == 1:
        spot = rnd.randrange(len(text))
        return text[:spot] + rnd.choice(["}", '"', "\\", ",", "NaN", "\\u0000"]) + text[spot:]
    if cut == 2:
        return text.replace('"data"', '"data":{},"data"', 1)  # duplicate key
    return text


frame_specs = st.lists(
    st.tuples(
        st.sampled_from([*SUCCESS_REPLY, "task_assign", "handle_ping", "node_close", "", None, 7]),
        json_values,
        st.integers(0, 2**32),
        st.sampled_from(["typed", "typed", "typed", "typed", "raw", "replay"]),
    ),
    min_size=1,
    max_size=FRAMES_PER_EXAMPLE,
)


# --- the oracle -----------------------------------------------------------------------------
def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


# Nesting the hub's parser may refuse as too deep (invalid_json), depending on the
# stack it parses on; a shallower frame must never get that answer.
PARSER_DEPTH_MARGIN = 300


def expected_replies(text: str, registered: bool) -> tuple[set[str], bool]:
    """(acceptable reply kinds, whether a reply is required) for one frame.
    A kind is a reply type, or ``error:<code>`` for plain error frames."""
    kinds, required = _expected_replies(text, registered)
    try:
        if _depth(json.loads(text)) > PARSER_DEPTH_MARGIN:
            kinds = kinds | {"error:invalid_json"}
    except (ValueError, RecursionError):
        pass
    return kinds, required


def _expected_replies(text: str, registered: bool) -> tuple[set[str], bool]:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return {"error:invalid_json"}, True
    if not isinstance(message, dict) or not isinstance(message.get("type"), str) or not message["type"]:
        return {"error:invalid_message"}, True
    message_type = message["type"]
    if message_type not in SUCCESS_REPLY:
        return {"error:unknown_type"}, True
    if not registered and message_type not in PRE_REGISTRATION_TYPES:
        return {"error:not_registered"}, True
    success = SUCCESS_REPLY[message_type]
    own = OWN_REPLY.get(message_type)
    kinds = {k for k in (success, own) if k}
    # Plain error refusals of the messages without an own reply.
    refusals = {"invalid_payload", "node_mismatch", "not_registered", "unknown_task", "stale_result"}
    if own is None:
        kinds |= {f"error:{code}" for code in refusals}
    if message_type == "register_tools" and registered:
        kinds.add("error:not_registered")
    return kinds, success is not None


def kind_of(reply: dict) -> str:
    if reply.get("type") == "error":
        return f"error:{reply.get('data', {}).get('code')}"
    return str(reply.get("type"))


def failed(reply: dict) -> bool:
    data = reply.get("data") or {}
    return reply.get("type") == "error" or data.get("success") is False


def snapshot(ids: set[str]) -> str:
    nodes = list(Node.objects.filter(pk__in=ids).order_by("pk").values())
    tasks = list(Task.objects.order_by("pk").values())
    last_log = NodeLog.objects.order_by("-pk").values_list("pk", flat=True).first()
    return json.dumps([Node.objects.count(), nodes, tasks, NodeLog.objects.count(), last_log], default=str)


# --- the fuzz session ------------------------------------------------------------------------
class FuzzSession:
    def __init__(self) -> None:
        self.communicator: WebsocketCommunicator | None = None
        self.other: WebsocketCommunicator | None = None
        self.registered = False
        self.tasks: list[str] = []
        self.sent: list[str] = []
        self.frames = 0
        self.refused = 0
        self.closes = 0

    async def open(self) -> None:
        from apexbridge.asgi import application

        self.communicator = WebsocketCommunicator(application, NODE_PATH)
        connected, _ = await self.communicator.connect()
        assert connected
        assert json.loads(await self.communicator.receive_from())["type"] == "connection_ack"
        self.registered = False

    async def ensure_other(self) -> None:
        """Another node on its own connection, whose id the fuzz frames use."""
        if self.other is not None:
            return
        from apexbridge.asgi import application

        self.other = WebsocketCommunicator(application, NODE_PATH)
        await self.other.connect()
        await self.other.receive_from()
        await self.other.send_to(
            text_data=json.dumps(
                {"type": "node_register", "data": {"nodeId": OTHER_ID, "name": "o", "capabilities": []}}
            )
        )
        await self.other.receive_from()

    async def close(self) -> None:
        for communicator in (self.communicator, self.other):
            if communicator is not None:
                await communicator.disconnect()

    async def maybe_submit_task(self, rnd: random.Random) -> None:
        """Tasks pinned to the fuzz node, so task_result has real targets."""
        if self.registered and rnd.random() < 0.05 and len(self.tasks) < 200:
            result = await database_sync_to_async(task_services.task_submit)(
                tool_name="echo", node_id=OWN_ID, tool_args={"n": len(self.tasks)}, max_retries=0
            )
            self.tasks.append(result.task.task_id)

    async def exchange(self, text: str) -> tuple[list[dict], int | None]:
        """Send one frame and a ping; returns (replies before the pong, close code)."""
        # send_input: send_to() refuses an empty text frame, which a client can send.
        await self.communicator.send_input({"type": "websocket.receive", "text": text})
        await self.communicator.send_to(text_data='{"type":"ping","data":{}}')
        replies: list[dict] = []
        while True:
            output = await self.communicator.receive_output(timeout=60)  # generous: a loaded machine stalls
            if output["type"] == "websocket.close":
                return replies, output.get("code", 1000)
            raw = output.get("text", "")
            assert "Traceback" not in raw and 'File "' not in raw, raw[:500]
            reply = json.loads(raw)
            if reply["type"] == "pong" and not replies_pending(text, replies):
                return replies, None
            if reply["type"] == "task_assign":
                self.tasks.append(reply["data"]["taskId"])
            if reply["type"] not in HUB_INITIATED:
                replies.append(reply)

    async def run_frame(self, text: str) -> None:
        if self.communicator is None:
            await self.open()
        await self.ensure_other()
        ids = {OWN_ID, OTHER_ID}
        before = await database_sync_to_async(snapshot)(ids)
        kinds, required = expected_replies(text, self.registered)
        replies, close_code = await self.exchange(text)
        self.frames += 1
        for reply in replies:
            assert kind_of(reply) != "error:internal_error", (text[:300], reply)
        if close_code is not None:
            # Only an oversized frame may close the connection (4009).
            assert close_code == 4009 and wire_len(text) > FRAME_LIMIT_BYTES, (close_code, text[:200])
            self.closes += 1
            await self.communicator.disconnect()
            self.communicator = None
            self.registered = False
            return
        assert wire_len(text) <= FRAME_LIMIT_BYTES
        assert len(replies) <= 1, (text[:300], replies)
        if required:
            assert len(replies) == 1, (text[:300], kinds, replies)
        for reply in replies:
            assert kind_of(reply) in kinds, (text[:300], kinds, reply)
        if replies and failed(replies[0]):
            self.refused += 1
            after = await database_sync_to_async(snapshot)(ids)
            assert after == before, ("a refused frame changed stored state", text[:300], replies)
        self._track(replies)

    def _track(self, replies: list[dict]) -> None:
        if not replies or failed(replies[0]):
            return
        reply = replies[0]
        if reply["type"] in ("node_registered", "register_ack"):
            self.registered = True
        elif reply["type"] == "node_unregistered":
            self.registered = False


def wire_len(text: str) -> int:
    """Bytes of the frame in UTF-8 (a lone surrogate, which only an in-process test can
    send, counts as the three bytes it would take)."""
    return len(text.encode("utf-8", "surrogatepass"))


def replies_pending(text: str, replies: list[dict]) -> bool:
    """A ``ping`` fuzz frame gets its own pong before the marker's."""
    return _type_of(text) == "ping" and not replies


def _type_of(text: str):
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return message.get("type") if isinstance(message, dict) else None


@pytest.fixture
def fuzz_settings(settings):
    settings.APEXBRIDGE_MAX_FRAME_BYTES = FRAME_LIMIT_BYTES
    settings.APEXBRIDGE_MAX_PROTOCOL_ERRORS = 10**9
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS = 0
    runtime._buffer.clear()
    runtime.vcp_connections.clear()
    yield settings
    runtime._buffer.clear()
    runtime.vcp_connections.clear()


def test_protocol_fuzz(fuzz_settings):
    # Hypothesis runs sync examples: each runs on one event loop kept for the whole
    # test, so the connection (and the hub's per-connection state) carries over.
    loop = asyncio.new_event_loop()
    session = FuzzSession()
    # An example sends about three frames; examples past the frame count are skipped.
    examples = FRAMES // 2 + 10

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=os.environ.get("APEXBRIDGE_FUZZ_SEED") is None,
    )
    @given(frame_specs)
    def run(specs) -> None:
        loop.run_until_complete(run_specs(specs))

    async def run_specs(specs) -> None:
        for message_type, value, seed, how in specs:
            if session.frames >= FRAMES:
                return
            rnd = random.Random(seed)
            if not session.registered and rnd.random() < 0.3:
                register = valid_data("node_register", rnd, [])
                register["nodeId"] = OWN_ID
                await session.run_frame(json.dumps({"type": "node_register", "data": register}))
            await session.maybe_submit_task(rnd)
            if how == "replay" and session.sent:
                text = rnd.choice(session.sent)
            elif how == "raw":
                text = rnd.choice([json.dumps(value), str(value), "", "{", "[]" * 3, '{"type":null}'])
            elif message_type in SUCCESS_REPLY:
                data = mutate(valid_data(message_type, rnd, session.tasks), rnd, value)
                text = to_text(message_type, data, rnd)
            else:
                text = to_text(message_type, value, rnd)
            await session.run_frame(text)
            if len(session.sent) < 500 and len(text) < 4096:
                session.sent.append(text)

    try:
        run()
    finally:
        loop.run_until_complete(session.close())
        loop.close()
    print(
        f"\nprotocol fuzz: {session.frames} frames, {session.refused} refused, "
        f"{session.closes} closed for size, {len(session.tasks)} tasks"
    )
    assert session.frames >= min(FRAMES, 50) * 0.5
