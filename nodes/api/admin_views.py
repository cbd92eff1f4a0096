"""Views of the admin REST API (PROTOCOL §6), staff only (token or admin session).

They parse the query or body with a serializer, call one selector or service and
render the envelope ``{"success": true, …}``; failures are ``ApiError`` and become
``{"success": false, "error": {"code", "message"}}`` in ``apexbridge.exceptions``.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from apexbridge.exceptions import ApiError
from llmproxy.selectors import llm_stats_today
from nodes import admin_services, selectors
from nodes.api import serializers as s
from nodes.models import Node
from nodes.protocol import dt_ms, node_info_data, now_ms, task_data
from quotas.selectors import quota_status

NODE_ID_REGEX = r"[A-Za-z0-9._:-]{1,64}"

ERRORS = {
    400: OpenApiResponse(s.ErrorResponseSerializer, description="Bad parameter"),
    401: OpenApiResponse(s.ErrorResponseSerializer, description="Not authenticated"),
    403: OpenApiResponse(s.ErrorResponseSerializer, description="Not staff"),
}
NOT_FOUND = {404: OpenApiResponse(s.ErrorResponseSerializer, description="Unknown node")}
NODE_ID_PARAM = OpenApiParameter("id", OpenApiTypes.STR, OpenApiParameter.PATH, description="Node id")


def _query(serializer_class, request) -> dict[str, Any]:
    serializer = serializer_class(data=request.query_params)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _node_or_404(node_id: str) -> Node:
    node = selectors.node_get(node_id=node_id)
    if node is None:
        raise ApiError(404, "node_not_found", f"Node {node_id!r} is not registered")
    return node


def _page(queryset, params: dict[str, Any]) -> tuple[list, int]:
    total = queryset.count()
    offset = params.get("offset", 0)
    return list(queryset[offset : offset + params["limit"]]), total


@extend_schema_view(
    list=extend_schema(
        operation_id="admin_nodes_list",
        summary="List registered nodes",
        parameters=[s.NodeListQuerySerializer],
        responses={200: s.NodeListResponseSerializer, **ERRORS},
    ),
    retrieve=extend_schema(
        operation_id="admin_nodes_retrieve",
        summary="One node",
        parameters=[NODE_ID_PARAM],
        responses={200: s.NodeResponseSerializer, **ERRORS, **NOT_FOUND},
    ),
    destroy=extend_schema(
        operation_id="admin_nodes_delete",
        summary="Unregister a node (a connected node is closed with code 4003)",
        parameters=[NODE_ID_PARAM],
        responses={200: s.MessageResponseSerializer, **ERRORS, **NOT_FOUND},
    ),
)
class NodeAdminViewSet(viewsets.ViewSet):
    """``/api/admin/nodes…``"""

    lookup_field = "id"
    lookup_value_regex = NODE_ID_REGEX

    def list(self, request):
        params = _query(s.NodeListQuerySerializer, request)
        queryset = selectors.node_list(
            type=params.get("type"),
            status=params.get("status"),
            capability=params.get("capability"),
            tag=params.get("tag"),
            search=params.get("search"),
        )
        nodes, total = _page(queryset, params)
        return Response({"success": True, "nodes": [node_info_data(node) for node in nodes], "total": total})

    def retrieve(self, request, id: str):  # noqa: A002 - the route's lookup name
        return Response({"success": True, "node": node_info_data(_node_or_404(id))})

    def destroy(self, request, id: str):  # noqa: A002
        try:
            admin_services.node_delete(node_id=id, reason=f"unregistered by {request.user.get_username()}")
        except admin_services.NodeNotFoundError:
            raise ApiError(404, "node_not_found", f"Node {id!r} is not registered") from None
        return Response({"success": True, "message": "Node unregistered successfully"})

    @extend_schema(
        operation_id="admin_nodes_stats",
        summary="A node's task statistics and uptime",
        parameters=[NODE_ID_PARAM],
        responses={200: s.NodeStatsResponseSerializer, **ERRORS, **NOT_FOUND},
    )
    @action(detail=True, methods=["get"])
    def stats(self, request, id: str):  # noqa: A002
        return Response({"success": True, "stats": selectors.node_stats(node=_node_or_404(id))})

    @extend_schema(
        operation_id="admin_nodes_logs",
        summary="A node's log, newest first",
        parameters=[NODE_ID_PARAM, s.NodeLogQuerySerializer],
        responses={200: s.NodeLogsResponseSerializer, **ERRORS, **NOT_FOUND},
    )
    @action(detail=True, methods=["get"])
    def logs(self, request, id: str):  # noqa: A002
        params = _query(s.NodeLogQuerySerializer, request)
        node = _node_or_404(id)
        entries = selectors.node_log_list(
            node_id=node.node_id, limit=params["limit"], level=params.get("level")
        )
        return Response({"success": True, "logs": [selectors.node_log_data(entry) for entry in entries]})

    @extend_schema(
        operation_id="admin_nodes_tasks",
        summary="Tasks that ran on (or are pinned to) a node, newest first",
        parameters=[NODE_ID_PARAM, s.NodeTaskQuerySerializer],
        responses={200: s.TaskListResponseSerializer, **ERRORS, **NOT_FOUND},
    )
    @action(detail=True, methods=["get"])
    def tasks(self, request, id: str):  # noqa: A002
        params = _query(s.NodeTaskQuerySerializer, request)
        node = _node_or_404(id)
        tasks, total = _page(selectors.task_list(node_id=node.node_id, status=params.get("status")), params)
        return Response({"success": True, "tasks": [task_data(task) for task in tasks], "total": total})

    @extend_schema(
        operation_id="admin_nodes_heartbeat_check",
        summary="Ping the node and apply the heartbeat timeout now",
        parameters=[NODE_ID_PARAM],
        request=None,
        responses={200: s.HeartbeatCheckResponseSerializer, **ERRORS, **NOT_FOUND},
    )
    @action(detail=True, methods=["post"], url_path="heartbeat-check")
    def heartbeat_check(self, request, id: str):  # noqa: A002
        try:
            node = admin_services.node_heartbeat_check(node_id=id).node
        except admin_services.NodeNotFoundError:
            raise ApiError(404, "node_not_found", f"Node {id!r} is not registered") from None
        return Response({"success": True, "status": node.status, "lastHeartbeat": dt_ms(node.last_heartbeat)})

    @extend_schema(
        operation_id="admin_nodes_control",
        summary="Drain, resume, restart or shut down a node (sends node_control)",
        parameters=[NODE_ID_PARAM],
        request=s.NodeControlRequestSerializer,
        responses={
            200: s.NodeResponseSerializer,
            **ERRORS,
            **NOT_FOUND,
            409: OpenApiResponse(
                s.ErrorResponseSerializer, description="restart/shutdown of a disconnected node"
            ),
        },
    )
    @action(detail=True, methods=["post"])
    def control(self, request, id: str):  # noqa: A002
        body = s.NodeControlRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            result = admin_services.node_control(
                node_id=id,
                action=body.validated_data["action"],
                reason=body.validated_data["reason"],
                actor=request.user.get_username(),
            )
        except admin_services.NodeNotFoundError:
            raise ApiError(404, "node_not_found", f"Node {id!r} is not registered") from None
        except admin_services.NodeNotConnectedError:
            raise ApiError(
                409,
                "node_not_connected",
                f"Node {id!r} is not connected: it cannot {body.validated_data['action']}",
            ) from None
        return Response({"success": True, "node": node_info_data(result.node)})


# --- hub-wide -------------------------------------------------------------------------
def _task_counts() -> dict[str, int]:
    counts = selectors.task_counts_by_status()
    return {**counts, "total": sum(counts.values())}


class HubStatsView(APIView):
    @extend_schema(
        operation_id="admin_stats",
        summary="Hub-wide counts: nodes and tasks by status, LLM requests and tokens today",
        responses={200: s.HubStatsResponseSerializer, **ERRORS},
    )
    def get(self, request):
        return Response(
            {
                "success": True,
                "nodes": selectors.node_counts_by_status(),
                "tasks": _task_counts(),
                "llm": llm_stats_today(),
                "timestamp": now_ms(),
            }
        )


class TaskAdminListView(APIView):
    @extend_schema(
        operation_id="admin_tasks_list",
        summary="All tasks, newest first",
        parameters=[s.TaskListQuerySerializer],
        responses={200: s.TaskListResponseSerializer, **ERRORS},
    )
    def get(self, request):
        params = _query(s.TaskListQuerySerializer, request)
        queryset = selectors.task_list(
            status=params.get("status"), node_id=params.get("nodeId"), tool_name=params.get("toolName")
        )
        tasks, total = _page(queryset, params)
        return Response({"success": True, "tasks": [task_data(task) for task in tasks], "total": total})


class QuotaView(APIView):
    @extend_schema(
        operation_id="admin_quotas_retrieve",
        summary="A node's effective LLM quota limits and current usage",
        parameters=[
            OpenApiParameter("node_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="Node id")
        ],
        responses={200: s.QuotaResponseSerializer, **ERRORS, **NOT_FOUND},
    )
    def get(self, request, node_id: str):
        try:
            status = quota_status(node_id)
        except Node.DoesNotExist:
            raise ApiError(404, "node_not_found", f"Node {node_id!r} is not registered") from None
        return Response({"success": True, **status})
