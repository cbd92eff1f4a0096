"""URL patterns of the admin REST API (``/api/admin/``) and the task API (``/api/tasks``)."""

from django.urls import include, path

urlpatterns = [
    path("admin/", include("nodes.api.admin_urls")),
    path("", include("nodes.api.task_urls")),
]
