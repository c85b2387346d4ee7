from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from backends_app.api import localai

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
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
