"""Routes of the admin REST API under ``/api/admin/`` (PROTOCOL §6).

The paths are exactly the protocol's, without a trailing slash. The same paths with
a trailing slash are accepted too; they are left out of the OpenAPI schema so each
operation is listed once.
"""

from django.urls import re_path
from rest_framework.routers import SimpleRouter

from nodes.api.admin_views import NODE_ID_REGEX, HubStatsView, NodeAdminViewSet, QuotaView, TaskAdminListView
from nodes.api.auth_views import LoginView


def _unlisted(view_class):
    """The same view, hidden from the schema (for the trailing-slash twin of a path)."""
    return type(f"{view_class.__name__}Slash", (view_class,), {"schema": None})


VIEWS = [
    (r"auth/login", LoginView, "admin-auth-login"),
    (r"stats", HubStatsView, "admin-stats"),
    (r"tasks", TaskAdminListView, "admin-tasks"),
    (rf"quotas/(?P<node_id>{NODE_ID_REGEX})", QuotaView, "admin-quotas"),
]

router = SimpleRouter(trailing_slash="")
router.register("nodes", NodeAdminViewSet, basename="admin-nodes")
slash_router = SimpleRouter(trailing_slash="/")
slash_router.register("nodes", _unlisted(NodeAdminViewSet), basename="admin-nodes-slash")

urlpatterns = [
    *(re_path(rf"^{pattern}$", view.as_view(), name=name) for pattern, view, name in VIEWS),
    *(re_path(rf"^{pattern}/$", _unlisted(view).as_view()) for pattern, view, _name in VIEWS),
    *router.urls,
    *slash_router.urls,
]
