"""LLM proxy messages of the node connection (PROTOCOL §4): ``llm_request`` and
``llm_cancel``. Mixed into ``nodes.consumers.NodeConsumer``.

Each request runs in its own asyncio task (``llmproxy.services.llm_call_run``) so
a long completion never blocks the connection's receive loop; the tasks are kept
by ``requestId`` so ``llm_cancel`` and a disconnect can cancel them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from apexbridge.db.hops import database_sync_to_async
from llmproxy import services
from llmproxy.protocol import LLMCancelPayload, LLMErrorCode, LLMRequestPayload
from nodes.protocol import ProtocolError, validate
from quotas.services import quota_release_connection

logger = logging.getLogger(__name__)

# How long a closing connection waits for its requests to free their slots.
DISCONNECT_CLEANUP_TIMEOUT_S = 10.0


class LLMProxyConsumerMixin:
    _llm_tasks: dict[str, asyncio.Task]
    _llm_closing: bool = False

    def _llm_requests(self) -> dict[str, asyncio.Task]:
        if "_llm_tasks" not in self.__dict__:
            self._llm_tasks = {}
        return self._llm_tasks

    async def handle_llm_request(self, data: dict[str, Any]) -> None:
        node_id = self.require_node(data)
        payload = validate(LLMRequestPayload, data)
        model = services.llm_resolve_model(payload.model)
        requests = self._llm_requests()
        if payload.request_id in requests:
            raise ProtocolError(
                LLMErrorCode.DUPLICATE_REQUEST, f"Request {payload.request_id!r} is already in flight"
            )
        call = services.LLMCall(
            request_id=payload.request_id,
            node_id=node_id,
            node_type=self.node_type,
            node_tags=list(self.node_tags or []),
            connection_id=self.connection_id,
            model=model,
            messages=payload.upstream_messages(),
            params=payload.options.upstream_params(),
            stream=payload.options.stream,
        )
        task = asyncio.create_task(self._llm_run(call), name=f"llm:{node_id}:{payload.request_id}")
        requests[payload.request_id] = task

    async def _llm_run(self, call: services.LLMCall) -> None:
        try:
            await services.llm_call_run(call, self._llm_send)
        except asyncio.CancelledError:
            pass  # cancelled again while it cleaned up; the disconnect sweep frees the rest
        except Exception:
            logger.exception("LLM request %s of node %s crashed", call.request_id, call.node_id)
        finally:
            requests = self._llm_requests()
            if requests.get(call.request_id) is asyncio.current_task():
                del requests[call.request_id]

    async def _llm_send(self, message_type: str, data: dict[str, Any]) -> None:
        if self._llm_closing:
            return  # nobody to tell: the connection is gone
        if message_type == "llm_response":
            # The final reply: its slot and tokens are already settled, and the node may
            # reuse the requestId the moment it reads this, so it is no longer in flight.
            requests = self._llm_requests()
            if requests.get(data.get("requestId")) is asyncio.current_task():
                del requests[data["requestId"]]
        try:
            await self.send_frame(message_type, data)
        except Exception:
            logger.debug("could not send %s to a closing connection", message_type, exc_info=True)

    async def handle_llm_cancel(self, data: dict[str, Any]) -> None:
        node_id = self.require_node(data)
        payload = validate(LLMCancelPayload, data)
        task = self._llm_requests().get(payload.request_id)
        if task is None:
            # Already finished (its llm_response is on its way) or never existed.
            logger.debug("llm_cancel of %s from %s: no such request in flight", payload.request_id, node_id)
            return
        task.cancel()

    async def llm_on_disconnect(self) -> None:
        """Cancel this connection's upstream calls and free its stream slots."""
        self._llm_closing = True
        tasks = list(self._llm_requests().values())
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=DISCONNECT_CLEANUP_TIMEOUT_S)
            if pending:
                logger.warning("%d LLM requests of %s did not finish cleaning up", len(pending), self.node_id)
        if tasks and self.node_id:
            # Whatever a task could not free itself (cancelled twice, timed out).
            await database_sync_to_async(quota_release_connection)(
                node_id=self.node_id, connection_id=self.connection_id
            )
