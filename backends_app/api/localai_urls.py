"""LocalAI's routes, at the site root as LocalAI serves them (included before the pages).

LocalAI strips a trailing slash before routing, so each route answers with and without one; the
slashed form is left out of the OpenAPI schema. Fixed segments come before parameters, as LocalAI's
router matches them (`/api/backends/upgrades` is not a backend named "upgrades").
"""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, re_path

from backends_app.api import localai, localai_settings, localai_ui

NAME = r"(?P<{}>[^/]+)"


def route(pattern: str, view: Any, name: str) -> list[URLPattern]:
    """`pattern` (a regex without anchors) at `/pattern` and `/pattern/`."""
    return [
        re_path(rf"^{pattern}$", view.as_view(), name=name),
        re_path(rf"^{pattern}/$", view.as_view(schema=None)),
    ]


urlpatterns = [
    # The REST family (core/http/routes/localai.go).
    *route("backends", localai.LocalAIBackendsView, "localai-backends"),
    *route("backends/available", localai.LocalAIAvailableView, "localai-available"),
    *route("backends/known", localai.LocalAIKnownView, "localai-known"),
    *route("backends/galleries", localai.LocalAIGalleriesView, "localai-galleries"),
    *route("backends/apply", localai.LocalAIApplyView, "localai-apply"),
    *route("backends/delete/" + NAME.format("name"), localai.LocalAIDeleteView, "localai-delete"),
    *route("backends/jobs/" + NAME.format("uuid"), localai.LocalAIJobStatusView, "localai-job-status"),
    *route("backends/upgrades", localai.LocalAIUpgradesView, "localai-upgrades"),
    *route("backends/upgrades/check", localai.LocalAICheckUpgradesView, "localai-check"),
    *route("backends/upgrade/" + NAME.format("name"), localai.LocalAIUpgradeBackendView, "localai-upgrade"),
    # The web UI's family (core/http/routes/ui_api.go).
    *route("api/settings", localai_settings.LocalAISettingsView, "localai-settings"),
    *route("api/backends", localai_ui.CatalogView, "localai-ui-backends"),
    *route("api/backends/install-external", localai_ui.InstallExternalView, "localai-ui-install-external"),
    *route("api/backends/install/" + NAME.format("id"), localai_ui.InstallView, "localai-ui-install"),
    *route("api/backends/delete/" + NAME.format("id"), localai_ui.DeleteView, "localai-ui-delete"),
    *route(
        "api/backends/system/delete/" + NAME.format("name"),
        localai_ui.SystemDeleteView,
        "localai-ui-system-delete",
    ),
    *route("api/backends/job/" + NAME.format("uid"), localai_ui.JobView, "localai-ui-job"),
    *route("api/backends/upgrades", localai_ui.UpgradesView, "localai-ui-upgrades"),
    *route("api/backends/usecases", localai_ui.UsecasesView, "localai-ui-usecases"),
    *route("api/backends/upgrades/check", localai_ui.CheckUpgradesView, "localai-ui-check"),
    *route("api/backends/upgrade/" + NAME.format("name"), localai_ui.UpgradeView, "localai-ui-upgrade"),
    *route("api/operations", localai_ui.OperationsView, "localai-ui-operations"),
    *route("api/operations/history", localai_ui.OperationHistoryView, "localai-ui-history"),
    *route(
        f"api/operations/{NAME.format('job_id')}/cancel", localai_ui.OperationCancelView, "localai-ui-cancel"
    ),
    *route(
        f"api/operations/{NAME.format('job_id')}/pause", localai_ui.OperationPauseView, "localai-ui-pause"
    ),
    *route(
        f"api/operations/{NAME.format('job_id')}/dismiss",
        localai_ui.OperationDismissView,
        "localai-ui-dismiss",
    ),
]
