"""Routes of the task API under ``/api/`` (PROTOCOL §6): ``tasks``, ``tasks/<id>``,
``tasks/<id>/cancel``. The trailing-slash twins are accepted but left out of the
OpenAPI schema so each operation is listed once."""

from django.urls import re_path

from nodes.api.task_views import TASK_ID_REGEX, TaskCancelView, TaskDetailView, TaskSubmitView


def _unlisted(view_class):
    return type(f"{view_class.__name__}Slash", (view_class,), {"schema": None})


VIEWS = [
    (r"tasks", TaskSubmitView, "tasks"),
    (rf"tasks/(?P<task_id>{TASK_ID_REGEX})", TaskDetailView, "task-detail"),
    (rf"tasks/(?P<task_id>{TASK_ID_REGEX})/cancel", TaskCancelView, "task-cancel"),
]

urlpatterns = [
    *(re_path(rf"^{pattern}$", view.as_view(), name=name) for pattern, view, name in VIEWS),
    *(re_path(rf"^{pattern}/$", _unlisted(view).as_view()) for pattern, view, _name in VIEWS),
]
