"""`manage.py gallery add|sync|list`: the galleries the portal follows."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backends_app import gallery as gallery_index
from backends_app.models import Gallery


class Command(BaseCommand):
    help = "Add, list and sync backend galleries."

    def add_arguments(self, parser: CommandParser) -> None:
        verbs = parser.add_subparsers(dest="verb", required=True)
        add = verbs.add_parser("add", help="Follow a gallery index.")
        add.add_argument("name")
        add.add_argument("url", help="https://..., file:///path or github:owner/repo/path@branch")
        add.add_argument("--sync", action="store_true", help="Sync it right away.")
        sync = verbs.add_parser("sync", help="Fetch and store gallery indexes.")
        sync.add_argument("names", nargs="*", help="Galleries to sync (default: every enabled one).")
        sync.add_argument("--force", action="store_true", help="Fetch even when the ETag says unchanged.")
        verbs.add_parser("list", help="Show the galleries and their last sync.")

    def handle(self, *args: Any, verb: str, **options: Any) -> None:
        getattr(self, f"handle_{verb}")(**options)

    def handle_add(self, name: str, url: str, sync: bool, **options: Any) -> None:
        try:
            gallery_index.resolve_url(url)
        except gallery_index.GalleryError as exc:
            raise CommandError(str(exc)) from exc
        # From the command line any file or host may be named: the fetch is not confined.
        source, created = Gallery.objects.update_or_create(
            name=name, defaults={"url": url, "set_through_web": False}
        )
        kept = " (credentials kept apart)" if source.has_credentials else ""
        self.stdout.write(f"{'added' if created else 'updated'} gallery {name}: {source.url}{kept}")
        if sync:
            self.handle_sync(names=[name], force=True)

    def handle_sync(self, names: list[str], force: bool = False, **options: Any) -> None:
        galleries = Gallery.objects.filter(name__in=names) if names else Gallery.objects.filter(enabled=True)
        missing = set(names) - {g.name for g in galleries}
        if missing:
            raise CommandError(f"no gallery named {', '.join(sorted(missing))}")
        failures = 0
        for gallery in galleries:
            result = gallery.sync(force=force)
            (self.stdout if result.ok else self.stderr).write(result.summary())
            failures += not result.ok
        if failures:
            raise CommandError(f"{failures} gallery sync(s) failed")

    def handle_list(self, **options: Any) -> None:
        for gallery in Gallery.objects.all():
            state = f"error: {gallery.last_error}" if gallery.last_error else "ok"
            synced = gallery.last_synced_at.isoformat() if gallery.last_synced_at else "never"
            enabled = "" if gallery.enabled else " (disabled)"
            entries = f"{gallery.entry_count} entries"
            self.stdout.write(f"{gallery.name}{enabled}\t{gallery.url}\t{entries}\tsynced {synced}\t{state}")
