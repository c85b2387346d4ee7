"""Users, API clients and fixture rows shared by the API tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from backends_app.models import Backend, Gallery, InstalledVersion, Node

User = get_user_model()

OPERATE = "backends_app.operate_backend"


def make_user(
    username: str, *, staff: bool = False, superuser: bool = False, perms: tuple[str, ...] = ()
) -> Any:
    # No password: hashing one costs half a second; tests sign in with a token or force_login.
    user = User.objects.create(username=username, is_staff=staff or superuser, is_superuser=superuser)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def client_for(user: Any | None = None, *, keyword: str = "Token") -> APIClient:
    """A client authenticated the way a script is: with the user's API token in the header."""
    client = APIClient()
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"{keyword} {token.key}")
    return client


def make_gallery(name: str = "main", url: str = "") -> Gallery:
    """A gallery row; its URL is never fetched unless a test syncs it (then pass a file:// URL)."""
    return Gallery.objects.create(name=name, url=url or f"https://galleries.invalid/{name}/index.yaml")


def make_backend(gallery: Gallery, name: str, **fields: Any) -> Backend:
    values = {"uri": f"quay.io/example/backends:{name}", "version": "1.0", **fields}
    return Backend.objects.create(gallery=gallery, name=name, **values)


def install(
    backend: Backend,
    node: Node | None = None,
    *,
    version: str = "1.0",
    digest: str = "sha256:" + "a" * 64,
    kept: int = 0,
) -> InstalledVersion:
    """Record `backend` as installed on `node` (default the local one), with `kept` older versions."""
    node = node or Node.local()
    now = timezone.now()
    for index in range(kept):
        InstalledVersion.objects.create(
            node=node,
            backend=backend,
            name=backend.name,
            state=InstalledVersion.State.KEPT,
            version=f"0.{index}",
            digest="sha256:" + f"{index}" * 64,
            installed_at=now - dt.timedelta(days=index + 1),
            path=f"{node.state_path}/kept/{backend.name}-{index}",
        )
    return InstalledVersion.objects.create(
        node=node,
        backend=backend,
        name=backend.name,
        version=version,
        digest=digest,
        uri=backend.uri,
        installed_at=now,
        path=f"{node.backends_path}/{backend.name}",
    )


def flag_upgrade(backend: Backend, *, version: str = "2.0", digest: str = "sha256:" + "b" * 64) -> Backend:
    backend.available_version, backend.latest_digest = version, digest
    backend.upgrade_available, backend.upgrade_reason = True, f"version {backend.version} -> {version}"
    backend.save()
    return backend
