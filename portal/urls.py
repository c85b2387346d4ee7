from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from backends_app import metrics
from backends_app.api import schema

# Under /api/ and on LocalAI's routes, errors raised outside a view answer JSON in the route's shape
# (backends_app/api/errors.py decides which).
handler400 = "backends_app.api.errors.bad_request"
handler403 = "backends_app.api.errors.permission_denied"
handler404 = "backends_app.api.errors.page_not_found"
handler500 = "backends_app.api.errors.server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics.metrics_view, name="metrics"),  # Prometheus; docs/monitoring.md
    path("api/schema/", schema.SchemaView.as_view(), name="schema"),
    path("api/docs/", schema.DocsView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include("backends_app.api.urls")),  # the portal's own API
    path("", include("backends_app.api.localai_urls")),  # LocalAI's routes, before the pages
    path("", include("backends_app.urls")),  # the web pages
]
