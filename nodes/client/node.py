"""``Node``: one connection to the hub (PROTOCOL §1–2), kept alive across hub restarts
and network trouble, carrying tasks (§3) and LLM requests (§4).

Life of a connection: connect on the recommended path → ``connection_ack`` (heartbeat
interval) → ``node_register`` / ``node_registered`` → send what was queued while
disconnected → heartbeats and messages until the connection drops → reconnect after an
exponential back-off with jitter, and register again (tools included).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import state
from .errors import HubUnavailable, LLMConnectionError, NodeRemoved, RegistrationError
from .llm import CONNECTION_LOST, LLMResult, LLMStream
from .outbox import Outbox
from .runner import TaskRunner
from .tools import Tool
from .wire import decode, encode, hub_url, now_ms, redactor

__version__ = "0.1.0"

logger = logging.getLogger("apexbridge.node")
# websockets logs the request line (which holds the key) at debug level: route it
# through a logger that redacts.
ws_logger = logging.getLogger("apexbridge.node.websockets")
for _logger in (logger, ws_logger):
    if redactor not in _logger.filters:
        _logger.addFilter(redactor)

# Close codes after which reconnecting would undo what the hub (or staff) decided.
SERVICE_UNAVAILABLE = "service_unavailable"
RESULT_RETRY_S = 5.0
FINAL_CLOSE_CODES = {
    4000: "another process registered this node id (close code 4000, replaced)",
    4003: "the node was removed by staff (close code 4003)",
}

# Outcomes of ``Node.run()``.
SHUTDOWN, RESTART, REMOVED = "shutdown", "restart", "removed"


class Node:
    def __init__(
        self,
        name: str,
        *,
        key: str,
        hub: str = "ws://127.0.0.1:8000",
        node_id: str | None = None,
        node_type: str = "worker",
        capabilities: list[str] | tuple[str, ...] = (),
        max_concurrent: int = 1,
        tags: list[str] | tuple[str, ...] = (),
        metadata: dict[str, Any] | None = None,
        state_file: str | Path | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        outbox_limit: int = 1000,
        shutdown_grace: float = 30.0,
        llm_timeout: float = 180.0,
        connect_timeout: float = 15.0,
        heartbeat_interval: float = 30.0,
    ) -> None:
        if node_type not in ("worker", "companion"):
            raise ValueError("node_type must be 'worker' or 'companion'")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.name = name
        self.node_type = node_type
        self.capabilities = list(capabilities)
        self.max_concurrent = max_concurrent
        self.tags = list(tags)
        self.metadata = metadata or {}
        self.url = hub_url(hub, key)
        self._key = key
        redactor.add(key)
        self.state_file = Path(state_file).expanduser() if state_file else state.default_state_file(name)
        self.node_id = node_id or state.load_node_id(self.state_file)
        if node_id:
            state.save_node_id(self.state_file, node_id)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.shutdown_grace = shutdown_grace
        self.llm_timeout = llm_timeout
        self.connect_timeout = connect_timeout
        self.heartbeat_interval = heartbeat_interval
        self.tools: dict[str, Tool] = {}
        self.runner = TaskRunner(
            tools=self.tools, max_concurrent=max_concurrent, send_result=self._send_result
        )
        self.connections = 0
        self._ws: ClientConnection | None = None
        self._registered = asyncio.Event()
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._unregistered = asyncio.Event()
        self._stop_reason = SHUTDOWN
        self.outbox = Outbox(outbox_limit)
        self._llm_queues: dict[str, asyncio.Queue] = {}

    # --- tools --------------------------------------------------------------------
    def tool(
        self, name: str | None = None, *, raw_args: bool = False, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a function as a tool: ``@node.tool("add")`` over ``def add(a, b)``."""

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            self.add_tool(name or function.__name__, function, raw_args=raw_args, description=description)
            return function

        return register

    def add_tool(
        self,
        name: str,
        function: Callable[..., Any],
        *,
        raw_args: bool = False,
        description: str | None = None,
    ) -> None:
        self.tools[name] = Tool(name=name, function=function, raw_args=raw_args, description=description)

    # --- state --------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._registered.is_set()

    @property
    def draining(self) -> bool:
        return self.runner.draining

    async def wait_registered(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._registered.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def request_stop(self, reason: str = SHUTDOWN) -> None:
        """Begin a graceful stop (``shutdown``: unregister and end; ``restart``: end
        without unregistering). A second request skips the grace period."""
        if self._stopping.is_set():
            logger.warning("Stop requested again: not waiting for running tasks any longer")
            self._forced.set()
            return
        self._stop_reason = reason
        self.runner.accepting = False
        logger.info("Stopping (%s): taking no new tasks", reason)
        self._stopping.set()

    # --- main loop ----------------------------------------------------------------
    async def run(self) -> str:
        """Connect and serve until stopped. Returns ``"shutdown"``, ``"restart"`` or
        ``"removed"``; raises ``RegistrationError`` when the hub refuses the node."""
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    await self._session_unless_stopped()
                    failures = 0
                except NodeRemoved as exc:
                    logger.error("Not reconnecting: %s", exc)
                    return REMOVED
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    if status in (401, 403):
                        raise RegistrationError(
                            "forbidden", f"the hub refused the node key (HTTP {status}); check --key"
                        ) from None
                    logger.warning("Hub answered the handshake with HTTP %s", status)
                except InvalidURI as exc:
                    raise ValueError(redactor.redact(str(exc))) from None
                except HubUnavailable as exc:
                    logger.warning("The hub cannot register the node now: %s", exc)
                except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
                    logger.warning(
                        "Connection to the hub failed: %s", redactor.redact(str(exc)) or type(exc).__name__
                    )
                if self._stopping.is_set():
                    break
                delay = self.backoff_delay(failures)
                failures += 1
                logger.info("Reconnecting in %.1fs", delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
            if self.runner.running:
                # Stopped while disconnected: still let running tasks end (or hand them back).
                await self.runner.finish(self.shutdown_grace, self._forced)
            if self.outbox:
                logger.warning("Exiting with %d undelivered frame(s) (hub unreachable)", len(self.outbox))
            return self._stop_reason
        finally:
            self.runner.abort()
            self._fail_llm_requests()

    async def _session_unless_stopped(self) -> None:
        """One connection; a stop that comes while still connecting (a hub that does not
        answer) ends it at once instead of after the connect timeout."""
        session = asyncio.create_task(self._connect_once(), name="hub-session")
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not session.done() and not self._registered.is_set():
                session.cancel()
                await asyncio.wait({session})
                return
            await session
        finally:
            stopper.cancel()
            session.cancel()

    def backoff_delay(self, failures: int) -> float:
        """Exponential back-off with "equal jitter": half the delay is fixed, half random,
        so nodes that lost the same hub do not all come back in the same instant."""
        ceiling = min(self.backoff_max, self.backoff_initial * (2**failures))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _connect_once(self) -> None:
        logger.info("Connecting to %s", redactor.redact(self.url))
        async with connect(
            self.url,
            open_timeout=self.connect_timeout,
            close_timeout=3,
            max_size=2**20,
            logger=ws_logger,
        ) as ws:
            self.connections += 1
            heartbeat_interval = await self._receive_ack(ws)
            await self._register(ws)
            reader = asyncio.create_task(self._read(ws), name="hub-reader")
            heartbeat = stopper = None
            try:
                await self.outbox.flush(ws, self.node_id)
                self._ws = ws
                self._registered.set()
                heartbeat = asyncio.create_task(self._heartbeat(heartbeat_interval), name="heartbeat")
                stopper = asyncio.create_task(self._stopping.wait())
                await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if self._stopping.is_set() and not reader.done():
                    await self._leave(ws)
            finally:
                self._ws = None
                self._registered.clear()
                for task in (reader, heartbeat, stopper):
                    if task is not None:
                        task.cancel()
                self._fail_llm_requests()
                self.outbox.requeue_unacked()
            code = ws.close_code
        if code in FINAL_CLOSE_CODES and not self._stopping.is_set():
            raise NodeRemoved(code, FINAL_CLOSE_CODES[code])
        if not self._stopping.is_set():
            logger.warning("Connection to the hub closed (code %s)", code)

    async def _receive_ack(self, ws: ClientConnection) -> float:
        message = decode(await asyncio.wait_for(ws.recv(), self.connect_timeout))
        if message is None or message[0] != "connection_ack":
            logger.warning("Hub sent no connection_ack; heartbeating every %.0fs", self.heartbeat_interval)
            return self.heartbeat_interval
        data = message[1]
        if data.get("deprecated"):
            logger.warning("The hub marks this connection path as deprecated")
        interval_ms = data.get("heartbeatInterval")
        if isinstance(interval_ms, int | float) and interval_ms > 0:
            return interval_ms / 1000
        return self.heartbeat_interval

    def registration_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "name": self.name,
            "type": self.node_type,
            "version": __version__,
            "capabilities": self.capabilities,
            "tools": sorted(self.tools),
            "config": {
                "maxConcurrentTasks": self.max_concurrent,
                "resources": {"cpu": os.cpu_count() or 1},
                "metadata": {"hostname": socket.gethostname(), "pid": os.getpid(), **self.metadata},
                "tags": self.tags,
            },
        }
        if self.node_id:
            payload["nodeId"] = self.node_id
        return payload

    async def _register(self, ws: ClientConnection) -> None:
        await ws.send(encode("node_register", self.registration_payload()))
        async with asyncio.timeout(self.connect_timeout):
            while True:
                message = decode(await ws.recv())
                if message is None:
                    continue
                message_type, data = message
                if message_type == "error":
                    logger.warning("Hub error before registration: %s", data.get("message"))
                if message_type == "node_registered":
                    break
        if not data.get("success"):
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            if error.get("code") == SERVICE_UNAVAILABLE:
                raise HubUnavailable(str(error.get("message", "service unavailable")))
            raise RegistrationError(str(error.get("code", "refused")), str(error.get("message", data)))
        node_id = data.get("nodeId") or self.node_id
        if node_id != self.node_id:
            self.node_id = node_id
            state.save_node_id(self.state_file, node_id)
        if self.runner.draining:
            logger.info("Reconnected: the hub decides about draining now; accepting tasks again")
            self.runner.draining = False
        logger.info(
            "Registered as %s (%s, %s) with tools: %s",
            self.node_id,
            self.name,
            self.node_type,
            ", ".join(sorted(self.tools)) or "none",
        )

    async def _leave(self, ws: ClientConnection) -> None:
        await self.runner.finish(self.shutdown_grace, self._forced)
        if self._stop_reason == SHUTDOWN:
            self._unregistered.clear()
            await self._send("node_unregister", {"nodeId": self.node_id, "reason": "shutdown"})
            try:
                await asyncio.wait_for(self._unregistered.wait(), 5)
                logger.info("Unregistered %s from the hub", self.node_id)
            except TimeoutError:
                logger.warning("Hub did not confirm node_unregister; closing anyway")
        await ws.close()

    # --- receiving ----------------------------------------------------------------
    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for text in ws:
                message = decode(text)
                if message is None:
                    logger.warning("Ignoring a frame that is not a JSON envelope")
                    continue
                try:
                    self._dispatch(*message)
                except Exception:
                    logger.exception("Failed to handle %s", message[0])
        except ConnectionClosed:
            pass

    def _dispatch(self, message_type: str, data: dict[str, Any]) -> None:
        if message_type == "task_assign":
            self.runner.assign(data)
        elif message_type == "task_cancel":
            self.runner.cancel(data.get("taskId"), data.get("reason"))
        elif message_type == "task_result_ack":
            result = self.outbox.acked(data.get("taskId"))
            error = data.get("error") or {}
            if not data.get("success") and error.get("code") == SERVICE_UNAVAILABLE and result:
                # The hub could not store it (its database is down): keep it, send it again.
                delay = RESULT_RETRY_S * random.uniform(0.75, 1.25)
                logger.warning(
                    "Hub cannot store the result of task %s now; again in %.0fs", result["taskId"], delay
                )
                asyncio.get_running_loop().call_later(
                    delay, lambda: asyncio.ensure_future(self._send("task_result", result, durable=True))
                )
            elif not data.get("success"):
                logger.info(
                    "Hub did not take the result of task %s: %s", data.get("taskId"), error.get("code")
                )
        elif message_type in ("llm_response", "llm_response_stream"):
            queue = self._llm_queues.get(data.get("requestId"))
            if queue is not None:
                queue.put_nowait((message_type, data))
        elif message_type == "node_control":
            self._control(data)
        elif message_type == "node_unregistered":
            self._unregistered.set()
        elif message_type == "ping":
            # The hub's liveness check (admin "heartbeat-check") expects a pong.
            asyncio.ensure_future(self._send("pong", {"nodeId": self.node_id, "timestamp": now_ms()}))
        elif message_type == "error":
            logger.warning("Hub reported an error: %s (%s)", data.get("message"), data.get("code"))
        elif message_type not in ("heartbeat_ack", "connection_ack", "node_registered", "pong"):
            logger.debug("Ignoring message type %s", message_type)

    def _control(self, data: dict[str, Any]) -> None:
        action, reason = data.get("action"), data.get("reason") or "no reason given"
        if action == "drain":
            self.runner.draining = True
            logger.info(
                "Draining (%s): finishing %d running task(s), taking no new ones", reason, self.runner.active
            )
        elif action == "resume":
            self.runner.draining = False
            logger.info("Resumed (%s): taking tasks again", reason)
        elif action in (RESTART, SHUTDOWN):
            logger.info("Hub asked for %s (%s)", action, reason)
            self.request_stop(action)
        else:
            logger.info("Ignoring unknown node_control action %r", action)

    # --- sending ------------------------------------------------------------------
    async def _send(self, message_type: str, data: dict[str, Any], *, durable: bool = False) -> bool:
        ws = self._ws
        if ws is not None:
            try:
                await ws.send(encode(message_type, data))
                self.outbox.sent(message_type, data)
                return True
            except ConnectionClosed:
                pass
        if durable:
            self.outbox.put(message_type, data)
        return False

    async def _send_result(self, data: dict[str, Any]) -> None:
        await self._send("task_result", {**data, "nodeId": self.node_id}, durable=True)

    def _heartbeat_data(self) -> dict[str, Any]:
        busy = self.runner.active >= self.max_concurrent
        return {"nodeId": self.node_id, "status": "busy" if busy else "online", "stats": self.runner.stats()}

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._send("heartbeat", self._heartbeat_data())

    # --- LLM proxy ------------------------------------------------------------------
    async def llm(
        self, messages: Any, model: str | None = None, *, timeout: float | None = None, **options: Any
    ) -> LLMResult:
        """Ask the hub's model; returns an ``LLMResult`` (``str()`` of it is the text).
        Raises ``QuotaExceeded`` (see ``retry_after``) and other ``LLMError`` subclasses."""
        call = LLMStream(self, messages, model, options, stream=False, timeout=timeout or self.llm_timeout)
        return await call.collect()

    def llm_stream(
        self, messages: Any, model: str | None = None, *, timeout: float | None = None, **options: Any
    ) -> LLMStream:
        """``async for chunk in node.llm_stream(messages)``; ``timeout`` is per frame."""
        return LLMStream(self, messages, model, options, stream=True, timeout=timeout or self.llm_timeout)

    async def llm_cancel(self, request_id: str) -> None:
        """Cancel a request in flight; its caller gets ``LLMCancelled``."""
        await self._send("llm_cancel", {"requestId": request_id, "nodeId": self.node_id})

    async def _llm_cancel_quietly(self, request_id: str) -> None:
        try:
            await self.llm_cancel(request_id)
        except Exception:
            logger.debug("Could not cancel LLM request %s", request_id, exc_info=True)

    async def _llm_open(self, request: dict[str, Any]) -> asyncio.Queue:
        if not await self.wait_registered(self.connect_timeout):
            raise LLMConnectionError("not_connected", "not connected to the hub")
        request_id = request["requestId"]
        queue: asyncio.Queue = asyncio.Queue()
        self._llm_queues[request_id] = queue
        if not await self._send("llm_request", {**request, "nodeId": self.node_id}):
            self._llm_queues.pop(request_id, None)
            raise LLMConnectionError("connection_lost", "connection to the hub was lost")
        return queue

    def _llm_close(self, request_id: str) -> None:
        self._llm_queues.pop(request_id, None)

    def _fail_llm_requests(self) -> None:
        for queue in self._llm_queues.values():
            queue.put_nowait((CONNECTION_LOST, {}))
        self._llm_queues.clear()
