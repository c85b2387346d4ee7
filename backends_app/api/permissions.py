"""Who may do what: reading needs a signed-in user; every change needs staff or an explicit permission."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

OPERATE_BACKEND = "backends_app.operate_backend"


class PortalPermission(BasePermission):
    """Signed-in users read; staff, or users holding the view's write permission, change things.

    A view names the permission its writes need with `write_permission` (a string), or decides per
    request with `get_write_permission(request)`. A view naming none accepts writes from staff only.
    """

    message = "You do not have permission to do this: it needs staff status or the permission {perm}."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if request.method in SAFE_METHODS or user.is_staff:
            return True
        getter = getattr(view, "get_write_permission", None)
        perm = getter(request) if getter else getattr(view, "write_permission", None)
        if perm and user.has_perm(perm):
            return True
        self.message = PortalPermission.message.format(perm=perm or "(staff only)")
        return False
