"""HTTP routes: the Django admin, the admin REST API and the task API (PROTOCOL §6)."""

from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.http import JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from nodes.views import dashboard_urlpatterns


@csrf_exempt  # it changes nothing; a CSRF refusal would answer an HTML 403 instead
def api_not_found(request, rest: str = "") -> JsonResponse:
    """Unknown paths under /api/ (a node id outside the id pattern, a typo) answer the
    API's JSON error envelope, not Django's HTML 404 page."""
    return JsonResponse(
        {"success": False, "error": {"code": "not_found", "message": "No such API endpoint"}}, status=404
    )


urlpatterns = [
    path("admin/dashboard/", include(dashboard_urlpatterns)),
    path("admin/", admin.site.urls),
    path("api/", include("nodes.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    re_path(r"^api/(?P<rest>[\s\S]*)$", api_not_found),  # [\s\S]: a %0A in the path too
    # Daphne serves no files: the admin's and the dashboard's assets (vendored, so the
    # hub works offline) come from the staticfiles finders, in production too.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]
