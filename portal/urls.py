from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path

from backends_app.api import localai, localai_settings, schema

# Under /api/ and on LocalAI's routes, errors raised outside a view answer JSON in the route's shape.
handler400 = "backends_app.api.errors.bad_request"
handler403 = "backends_app.api.errors.permission_denied"
handler404 = "backends_app.api.errors.page_not_found"
handler500 = "backends_app.api.errors.server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", schema.SchemaView.as_view(), name="schema"),
    path("api/docs/", schema.DocsView.as_view(url_name="schema"), name="api-docs"),
    # LocalAI's settings route (its web UI calls it without the trailing slash); before the portal's
    # own API, whose `/api/settings/` is another route with the portal's shape.
    path("api/settings", localai_settings.LocalAISettingsView.as_view(), name="localai-settings"),
    path("api/", include("backends_app.api.urls")),
    # LocalAI's own paths, at the root as LocalAI serves them.
    path("backends/upgrades", localai.LocalAIUpgradesView.as_view(), name="localai-upgrades"),
    path("backends/upgrades/check", localai.LocalAICheckUpgradesView.as_view(), name="localai-check"),
    re_path(
        r"^backends/upgrade/(?P<name>[^/]+)$",
        localai.LocalAIUpgradeBackendView.as_view(),
        name="localai-upgrade",
    ),
    re_path(
        r"^backends/jobs/(?P<job_id>[^/]+)$",
        localai.LocalAIJobStatusView.as_view(),
        name="localai-job-status",
    ),
    path("", include("backends_app.urls")),  # the web pages
]
