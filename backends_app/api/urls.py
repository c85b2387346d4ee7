"""URLs of the REST API, included under /api/ (namespace `api`)."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import DefaultRouter

from backends_app.api import notifications, schema, views

del schema  # imported to register its OpenAPI extension

app_name = "api"

router = DefaultRouter()
# Backend names hold dots: "foo.json" is a name, not a format suffix.
router.include_format_suffixes = False
router.register("backends", views.BackendViewSet, basename="backend")
router.register("upgrades", views.UpgradeViewSet, basename="upgrade")
router.register("jobs", views.UpgradeJobViewSet, basename="job")
router.register("galleries", views.GalleryViewSet, basename="gallery")
router.register(
    "notification-targets", notifications.NotificationTargetViewSet, basename="notification-target"
)

urlpatterns = [
    path("settings/", views.PortalSettingsView.as_view(), name="settings"),
    *router.urls,
]
