"""The task API for scripts (``/api/tasks``, PROTOCOL §6): submit, follow, cancel.

Staff, or users with the ``nodes.add_task`` permission, by DRF token or session.
``wait=<seconds>`` polls the database (the truth; several hub processes may share
it) until the task ends. Every request runs in a thread of its own (apexbridge/asgi.py:
a pool that starts a thread whenever all are busy), so a waiting request holds only
that thread, never the consumers' nor another request's.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from apexbridge.exceptions import ApiError
from nodes import selectors, task_services, task_waiters
from nodes.api.serializers import ErrorResponseSerializer
from nodes.api.task_serializers import (
    TaskCancelSerializer,
    TaskResponseSerializer,
    TaskSubmitSerializer,
    WaitQuerySerializer,
)
from nodes.models import Task
from nodes.protocol import task_data

TASK_ID_REGEX = r"[A-Za-z0-9._:-]{1,64}"

ERRORS = {
    400: OpenApiResponse(ErrorResponseSerializer, description="Bad input; nothing was created or changed"),
    401: OpenApiResponse(ErrorResponseSerializer, description="Not authenticated"),
    403: OpenApiResponse(ErrorResponseSerializer, description="Neither staff nor allowed nodes.add_task"),
}
NOT_FOUND = {404: OpenApiResponse(ErrorResponseSerializer, description="Unknown task")}
TASK_ID_PARAM = OpenApiParameter("task_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="Task id")


class CanSubmitTasks(BasePermission):
    """Staff, or a user holding ``nodes.add_task``."""

    message = "Submitting tasks needs a staff account or the nodes.add_task permission."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active):
            return False
        return bool(user.is_staff or user.has_perm("nodes.add_task"))


def _wait_seconds(request) -> float:
    query = WaitQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    return query.validated_data["wait"]


def _task_or_404(task_id: str) -> Task:
    task = selectors.task_get(task_id=task_id)
    if task is None:
        raise ApiError(404, "task_not_found", f"No task {task_id!r}")
    return task


def _wait_for_end(task: Task, wait_s: float) -> Task:
    if task.is_final or wait_s <= 0:
        return task
    return task_waiters.wait_until_final(
        task.task_id,
        wait_s,
        load=lambda: selectors.task_get(task_id=task.task_id) or task,
        is_final=lambda current: current.is_final,
    )


def _envelope(task: Task) -> dict:
    return {"success": True, "task": task_data(task)}


class TaskSubmitView(APIView):
    permission_classes = [CanSubmitTasks]

    @extend_schema(
        operation_id="tasks_create",
        summary="Submit a task",
        description=(
            "Queues a task and dispatches it at once when a node is eligible. With "
            "`wait`, answers when the task ends (200) or when `wait` runs out (201). A "
            "known `idempotencyKey` returns the first task (200) and creates nothing."
        ),
        parameters=[WaitQuerySerializer],
        request=TaskSubmitSerializer,
        responses={
            201: OpenApiResponse(TaskResponseSerializer, description="Queued (or running)"),
            200: OpenApiResponse(
                TaskResponseSerializer,
                description="Ended within `wait`, or the earlier task of this idempotencyKey",
            ),
            **ERRORS,
        },
    )
    def post(self, request):
        wait_s = _wait_seconds(request)
        body = TaskSubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            submitted = task_services.task_submit(
                **body.service_kwargs(), created_by=request.user.get_username()
            )
        except task_services.TaskValidationError as error:
            raise ApiError(400, error.code, error.message) from None
        if wait_s > 0:  # the wait reads the task first
            task = _wait_for_end(submitted.task, wait_s)
        else:  # as it is now: the dispatch pass after the commit may have assigned it
            task = selectors.task_get(task_id=submitted.task.task_id) or submitted.task
        ended_while_waiting = wait_s > 0 and task.is_final
        status = 201 if submitted.created and not ended_while_waiting else 200
        return Response(_envelope(task), status=status)


class TaskDetailView(APIView):
    permission_classes = [CanSubmitTasks]

    @extend_schema(
        operation_id="tasks_retrieve",
        summary="A task; with `wait`, answers as soon as it ends or `wait` runs out",
        parameters=[TASK_ID_PARAM, WaitQuerySerializer],
        responses={200: TaskResponseSerializer, **ERRORS, **NOT_FOUND},
    )
    def get(self, request, task_id: str):
        wait_s = _wait_seconds(request)
        if wait_s <= 0:
            return Response(_envelope(_task_or_404(task_id)))
        # One read per wake-up, the first one included: the waiter registers before it
        # reads, so the first read is already the one a task that ends meanwhile wakes.
        last: list[Task] = []

        def load() -> Task:
            task = selectors.task_get(task_id=task_id)
            if task is None:
                if not last:
                    raise ApiError(404, "task_not_found", f"No task {task_id!r}")
                return last[0]  # pruned while waited for: its last state
            last[:] = [task]
            return task

        task = task_waiters.wait_until_final(
            task_id, wait_s, load=load, is_final=lambda current: current.is_final
        )
        return Response(_envelope(task))


class TaskCancelView(APIView):
    permission_classes = [CanSubmitTasks]

    @extend_schema(
        operation_id="tasks_cancel",
        summary="Cancel a queued or running task (the node gets task_cancel)",
        parameters=[TASK_ID_PARAM],
        request=TaskCancelSerializer,
        responses={
            200: TaskResponseSerializer,
            **ERRORS,
            **NOT_FOUND,
            409: OpenApiResponse(ErrorResponseSerializer, description="The task already ended"),
        },
    )
    def post(self, request, task_id: str):
        body = TaskCancelSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        reason = body.validated_data["reason"] or f"cancelled by {request.user.get_username()}"
        try:
            task = task_services.task_cancel(task_id=task_id, reason=reason)
        except Task.DoesNotExist:
            raise ApiError(404, "task_not_found", f"No task {task_id!r}") from None
        except task_services.TaskStateError as error:
            raise ApiError(409, error.code, error.message) from None
        return Response(_envelope(task))
