"""The web pages' routes, at the site root (namespace `ui`). The websocket route is in live.py."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from backends_app import notification_views, views

app_name = "ui"

urlpatterns = [
    path("", views.backends_page, name="backends"),
    path("backends/<int:pk>/<str:operation>/", views.operate, name="operate"),
    path("backends/upgrade-all/", views.upgrade_all, name="upgrade-all"),
    path("check/", views.check_now, name="check"),
    path("galleries/sync/", views.sync_galleries, name="sync-galleries"),
    path("live/backends/", views.backends_live, name="backends-live"),
    path("jobs/<int:pk>/", views.job_page, name="job"),
    path("jobs/<int:pk>/cancel/", views.cancel_job, name="cancel-job"),
    path("settings/", views.settings_page, name="settings"),
    path("settings/notifications/", notification_views.add_target, name="notification-add"),
    path("settings/notifications/test/", notification_views.send_test, name="notification-test"),
    path(
        "settings/notifications/<int:pk>/remove/",
        notification_views.remove_target,
        name="notification-remove",
    ),
    path(
        "settings/notifications/<int:pk>/toggle/",
        notification_views.toggle_target,
        name="notification-toggle",
    ),
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="login.html", redirect_authenticated_user=True, next_page="ui:backends"
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="ui:login"), name="logout"),
]
