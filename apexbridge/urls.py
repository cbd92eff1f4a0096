"""HTTP routes: the Django admin, the admin REST API and the task API (PROTOCOL §6)."""

from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from nodes.views import dashboard_urlpatterns

urlpatterns = [
    path("admin/dashboard/", include(dashboard_urlpatterns)),
    path("admin/", admin.site.urls),
    path("api/", include("nodes.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # Daphne serves no files: the admin's and the dashboard's assets (vendored, so the
    # hub works offline) come from the staticfiles finders, in production too.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]
