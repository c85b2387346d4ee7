"""`manage.py ensure_admin`: make sure a superuser exists, for the one-command start."""

from __future__ import annotations

import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Create the admin account if no superuser exists. The password comes from PORTAL_ADMIN_PASSWORD, "
        "else one is generated and printed once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default=os.environ.get("PORTAL_ADMIN_USER", "admin"))

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            self.stdout.write("an admin account exists")
            return
        password = os.environ.get("PORTAL_ADMIN_PASSWORD", "")
        users.objects.create_superuser(username=username, email="", password=password or None)
        if password:
            self.stdout.write(f"created admin account {username!r} (password from PORTAL_ADMIN_PASSWORD)")
            return
        generated = secrets.token_urlsafe(12)
        user = users.objects.get(username=username)
        user.set_password(generated)
        user.save(update_fields=["password"])
        self.stdout.write(f"created admin account {username!r} with password: {generated}")
        self.stdout.write("(shown once; set PORTAL_ADMIN_PASSWORD to choose it)")
