"""Who may change what: the one rule the admin, the REST API and the pages all ask.

Reading needs a signed-in user. Each change is an action that needs one Django permission, granted
to a user or a group; an active superuser holds them all. Staff status alone grants nothing: it only
lets a user into the admin (Django's rule), where the same permissions decide again.

Setting the health-check command is a superuser's alone: the workers run it on every node, as the
portal's own user, after each install, so whoever sets it runs code everywhere.
"""

from __future__ import annotations

from typing import Any

OPERATE = "operate"
CHANGE_SETTINGS = "change_settings"
ADD_GALLERY = "add_gallery"
CHANGE_GALLERY = "change_gallery"
SET_HEALTH_CHECK_COMMAND = "set_health_check_command"

# The Django permission each action needs; None: superusers only.
PERMISSIONS: dict[str, str | None] = {
    OPERATE: "backends_app.operate_backend",
    CHANGE_SETTINGS: "backends_app.change_portalsettings",
    ADD_GALLERY: "backends_app.add_gallery",
    CHANGE_GALLERY: "backends_app.change_gallery",
    SET_HEALTH_CHECK_COMMAND: None,
}


def can_read(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


def can(user: Any, action: str) -> bool:
    """True when `user` may do `action` (one of this module's names)."""
    if not can_read(user):
        return False
    if user.is_superuser:
        return True
    needed = PERMISSIONS[action]
    return needed is not None and bool(user.has_perm(needed))


def needs(action: str) -> str:
    """What a refusal says is missing: the permission's name, or superuser status."""
    needed = PERMISSIONS[action]
    return f"the permission {needed}" if needed else "superuser status"


def template_context(request: Any) -> dict[str, bool]:
    """For every page's navigation: the settings link shows only to those who may open the page."""
    return {"can_change_settings": can(getattr(request, "user", None), CHANGE_SETTINGS)}
