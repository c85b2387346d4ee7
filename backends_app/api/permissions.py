"""The API's side of the one rule in `backends_app.permissions`: signed-in users read, writes need the
action the view names."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from backends_app import permissions


class PortalPermission(BasePermission):
    """Signed-in users read; a write needs the permission of the view's action.

    A view names its writes' action with `write_action`, or decides per request with
    `get_write_action(request)`. A view naming none accepts writes from superusers only.
    """

    message = "You do not have permission to do this."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not permissions.can_read(user):
            return False
        if request.method in SAFE_METHODS:
            return True
        getter = getattr(view, "get_write_action", None)
        action = getter(request) if getter else getattr(view, "write_action", None)
        if action is None:
            if getattr(user, "is_superuser", False):
                return True
            self.message = "You do not have permission to do this: it needs superuser status."
            return False
        if permissions.can(user, action):
            return True
        self.message = (
            f"You do not have permission to do this: it needs {permissions.needs(action)} "
            "(superusers hold every permission; staff status alone grants none)."
        )
        return False
