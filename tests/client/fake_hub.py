"""A small stand-in for the hub: a real ``websockets`` server on 127.0.0.1 that speaks
enough of PROTOCOL §1–4 for the node client, records every frame it receives, and lets a
test push frames (task_assign, node_control, …) or drop connections."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

KEY = "fake-hub-key-Zq9xW3"
# The fake hub's own websockets logs (they print request paths, keys included) go here,
# apart from the client's logs that the tests inspect.
server_logger = logging.getLogger("tests.fake_hub")

LLMHandler = Callable[["HubConnection", dict[str, Any]], Awaitable[None]]


@dataclass
class Frame:
    connection: int
    type: str
    data: dict[str, Any]


@dataclass
class HubConnection:
    index: int
    ws: ServerConnection
    path: str
    node_id: str | None = None
    frames: list[Frame] = field(default_factory=list)

    async def send(self, message_type: str, data: dict[str, Any]) -> None:
        await self.ws.send(json.dumps({"type": message_type, "data": data}))


class FakeHub:
    def __init__(
        self,
        *,
        heartbeat_interval_ms: int = 30000,
        key: str = KEY,
        register_error: dict[str, str] | None = None,
        llm_handler: LLMHandler | None = None,
        ack_results: bool = True,
        result_error: dict[str, str] | None = None,
    ) -> None:
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.key = key
        self.register_error = register_error
        self.llm_handler = llm_handler
        self.ack_results = ack_results
        self.result_error = result_error
        self.connections: list[HubConnection] = []
        self.frames: list[Frame] = []
        self.refused_handshakes = 0
        self._server: Server | None = None
        self._new_frame = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeHub:
        self._server = await serve(
            self._handle, "127.0.0.1", port, process_request=self._check_key, logger=server_logger
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def drop_connections(self, code: int = 1011, reason: str = "going away") -> None:
        for connection in self.connections:
            await connection.ws.close(code, reason)

    @property
    def current(self) -> HubConnection:
        return self.connections[-1]

    async def send(self, message_type: str, data: dict[str, Any]) -> None:
        """Send to the newest connection."""
        await self.current.send(message_type, data)

    def of_type(self, message_type: str) -> list[Frame]:
        return [frame for frame in self.frames if frame.type == message_type]

    async def wait_for(
        self,
        message_type: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda data: True,
        *,
        count: int = 1,
        timeout: float = 10,
    ) -> list[Frame]:
        """The first ``count`` received frames of this type matching ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                matches = [f for f in self.of_type(message_type) if predicate(f.data)]
                if len(matches) >= count:
                    return matches[:count]
                self._new_frame.clear()
                await self._new_frame.wait()

    async def wait_connections(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while len(self.connections) < count:
                self._new_frame.clear()
                await self._new_frame.wait()

    # --- server side ------------------------------------------------------------
    def _check_key(self, connection: ServerConnection, request):
        if not request.path.endswith(f"/abp-distributed-server/VCP_Key={self.key}"):
            self.refused_handshakes += 1
            self._new_frame.set()
            return connection.respond(HTTPStatus.FORBIDDEN, "bad key\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        connection = HubConnection(index=len(self.connections), ws=ws, path=ws.request.path)
        self.connections.append(connection)
        self._new_frame.set()
        await connection.send(
            "connection_ack",
            {
                "connectionId": f"c-{connection.index}",
                "serverId": f"c-{connection.index}",
                "hubVersion": "fake",
                "serverTime": int(time.time() * 1000),
                "heartbeatInterval": self.heartbeat_interval_ms,
                "heartbeatTimeout": self.heartbeat_interval_ms * 3,
                "deprecated": False,
                "message": "Connected to Apex Bridge",
            },
        )
        try:
            async for text in ws:
                message = json.loads(text)
                frame = Frame(connection.index, message["type"], message.get("data") or {})
                connection.frames.append(frame)
                self.frames.append(frame)
                self._new_frame.set()
                await self._reply(connection, frame)
        except ConnectionClosed:
            pass

    async def _reply(self, connection: HubConnection, frame: Frame) -> None:
        data = frame.data
        if frame.type == "node_register":
            if self.register_error:
                await connection.send("node_registered", {"success": False, "error": self.register_error})
                return
            connection.node_id = data.get("nodeId") or "hub-generated-1"
            await connection.send(
                "node_registered",
                {
                    "nodeId": connection.node_id,
                    "success": True,
                    "message": "registered",
                    "hubInfo": {"version": "fake", "llmAvailable": True},
                },
            )
        elif frame.type == "heartbeat":
            await connection.send("heartbeat_ack", {"nodeId": connection.node_id, "success": True})
        elif frame.type == "task_result" and self.ack_results and self.result_error:
            await connection.send(
                "task_result_ack",
                {"taskId": data.get("taskId"), "success": False, "error": self.result_error},
            )
        elif frame.type == "task_result" and self.ack_results:
            await connection.send("task_result_ack", {"taskId": data.get("taskId"), "success": True})
        elif frame.type == "node_unregister":
            await connection.send("node_unregistered", {"nodeId": connection.node_id, "success": True})
        elif frame.type == "llm_request" and self.llm_handler is not None:
            await self.llm_handler(connection, data)
