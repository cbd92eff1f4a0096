"""Running tasks (PROTOCOL §3.2): ``task_assign`` in, ``task_result`` out, within the node's
concurrency limit, with cancel, de-duplication of re-delivered tasks and a graceful finish."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ToolError
from .tools import Tool

logger = logging.getLogger("apexbridge.node")

SendResult = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class RunningTask:
    task_id: str
    attempt: Any
    tool: Tool
    tool_args: Any
    timeout_ms: int | None
    task: asyncio.Task | None = None
    # Why it is being stopped, set before ``task.cancel()``: (code, message, retryable).
    stop: tuple[str, str, bool] | None = field(default=None)


def failure(code: str, message: str, *, retryable: bool = False, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "retryable": retryable}
    if details is not None:
        error["details"] = details
    return {"success": False, "error": error}


class TaskRunner:
    def __init__(
        self,
        *,
        tools: dict[str, Tool],
        max_concurrent: int,
        send_result: SendResult,
        result_cache_size: int = 1000,
    ) -> None:
        self.tools = tools
        self.max_concurrent = max_concurrent
        self._send_result = send_result
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running: dict[str, RunningTask] = {}
        # Final results by task id: a re-delivered task gets its result again instead of
        # running twice (delivery is at-least-once, PROTOCOL §3.4).
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._result_cache_size = result_cache_size
        self._background: set[asyncio.Task] = set()
        self.completed = 0
        self.failed = 0
        self.accepting = True
        self.draining = False

    @property
    def active(self) -> int:
        return len(self.running)

    def stats(self) -> dict[str, int]:
        return {"activeTasks": self.active, "completedTasks": self.completed, "failedTasks": self.failed}

    # --- hub messages -------------------------------------------------------------
    def assign(self, data: dict[str, Any]) -> None:
        task_id = data.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            logger.warning("Ignoring task_assign without a taskId")
            return
        attempt = data.get("attempt")
        tool_name = data.get("toolName")
        if task_id in self._results:
            logger.info("Task %s (attempt %s) already finished here: re-sending its result", task_id, attempt)
            self._spawn(self._send_result({**self._results[task_id], "attempt": attempt}))
            return
        if task_id in self.running:
            logger.info(
                "Task %s (attempt %s) is already running here: its result will follow", task_id, attempt
            )
            self.running[task_id].attempt = attempt
            return
        if not self.accepting:
            self._reject(
                task_id, attempt, failure("node_shutting_down", "node is shutting down", retryable=True)
            )
            return
        if self.draining:
            self._reject(task_id, attempt, failure("node_draining", "node is draining", retryable=True))
            return
        tool = self.tools.get(tool_name) if isinstance(tool_name, str) else None
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            self._reject(
                task_id,
                attempt,
                failure("unknown_tool", f"no tool named {tool_name!r} here (tools: {known})"),
            )
            return
        timeout = data.get("timeout")
        running = RunningTask(
            task_id=task_id,
            attempt=attempt,
            tool=tool,
            tool_args=data.get("toolArgs"),
            timeout_ms=timeout if isinstance(timeout, int) and timeout > 0 else None,
        )
        self.running[task_id] = running
        running.task = asyncio.create_task(self._execute(running), name=f"task-{task_id}")

    def cancel(self, task_id: Any, reason: Any) -> None:
        running = self.running.get(task_id) if isinstance(task_id, str) else None
        if running is None:
            logger.info("Hub cancelled task %s, which is not running here", task_id)
            return
        logger.info("Cancelling task %s (%s)", task_id, reason or "no reason given")
        self._stop(running, ("cancelled", f"cancelled by the hub: {reason or 'no reason given'}", False))

    # --- shutdown -----------------------------------------------------------------
    async def finish(self, grace_seconds: float, force: asyncio.Event) -> None:
        """Stop taking tasks, let running ones end within the grace period, then hand the
        rest back to the hub (a retryable failure, so it can run them elsewhere)."""
        self.accepting = False
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            logger.info("Waiting up to %.0fs for %d running task(s) to finish", grace_seconds, len(tasks))
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            forced = asyncio.ensure_future(force.wait())
            try:
                await asyncio.wait(
                    [all_done, forced], timeout=grace_seconds, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                all_done.cancel()  # cancels the waiting only, not the tasks
                forced.cancel()
        for running in list(self.running.values()):
            logger.warning("Task %s did not finish in time: handing it back to the hub", running.task_id)
            self._stop(running, ("node_shutdown", "node shut down before the task finished", True))
        pending = [r.task for r in self.running.values() if r.task is not None] + list(self._background)
        if pending:
            await asyncio.wait(pending, timeout=5)

    def abort(self) -> None:
        """Cancel everything without reporting (the client is going away)."""
        for running in self.running.values():
            if running.task is not None:
                running.task.cancel()
        for task in self._background:
            task.cancel()

    # --- internals ----------------------------------------------------------------
    def _stop(self, running: RunningTask, why: tuple[str, str, bool]) -> None:
        if running.stop is None and running.task is not None:
            running.stop = why
            running.task.cancel()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _reject(self, task_id: str, attempt: Any, outcome: dict[str, Any]) -> None:
        logger.warning("Task %s refused: %s", task_id, outcome["error"]["message"])
        self.failed += 1
        self._spawn(self._send_result({"taskId": task_id, "attempt": attempt, **outcome, "executionTime": 0}))

    async def _execute(self, running: RunningTask) -> None:
        started = time.monotonic()
        try:
            async with self._slots:
                started = time.monotonic()
                logger.info(
                    "Task %s started: %s (attempt %s)", running.task_id, running.tool.name, running.attempt
                )
                timeout = running.timeout_ms / 1000 if running.timeout_ms else None
                result = await asyncio.wait_for(running.tool.call(running.tool_args), timeout)
            outcome: dict[str, Any] = {"success": True, "result": result}
        except asyncio.CancelledError:
            if running.stop is None:
                raise  # the client itself is being torn down
            code, message, retryable = running.stop
            outcome = failure(code, message, retryable=retryable)
        except TimeoutError:
            outcome = failure(
                "timeout", f"tool ran longer than the task's {running.timeout_ms} ms", retryable=True
            )
        except ToolError as exc:
            outcome = failure(exc.code, exc.message, retryable=exc.retryable, details=exc.details)
        except Exception as exc:
            logger.warning("Task %s: tool %s raised", running.task_id, running.tool.name, exc_info=True)
            outcome = failure("tool_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.running.pop(running.task_id, None)
        if outcome["success"]:
            try:
                json.dumps(outcome["result"])
            except (TypeError, ValueError) as exc:
                outcome = failure("invalid_result", f"tool returned a value that is not JSON: {exc}")
        execution_ms = int((time.monotonic() - started) * 1000)
        data = {
            "taskId": running.task_id,
            "attempt": running.attempt,
            **outcome,
            "executionTime": execution_ms,
        }
        if outcome["success"]:
            self.completed += 1
            logger.info("Task %s finished: ok in %d ms", running.task_id, execution_ms)
        else:
            self.failed += 1
            error = outcome["error"]
            logger.info(
                "Task %s finished: failed (%s: %s) in %d ms",
                running.task_id,
                error["code"],
                error["message"],
                execution_ms,
            )
        if outcome["success"] or not (outcome["error"]["retryable"] or running.stop):
            self._remember(running.task_id, data)
        await self._send_result(data)

    def _remember(self, task_id: str, data: dict[str, Any]) -> None:
        self._results[task_id] = data
        while len(self._results) > self._result_cache_size:
            self._results.popitem(last=False)
