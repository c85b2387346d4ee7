"""django-q2 tasks: thin adapters that pass ids and call the models and the procedure."""

from __future__ import annotations

from backends_app.models import Gallery


def sync_galleries(names: list[str] | None = None) -> list[str]:
    """Sync the named galleries (default every enabled one); returns one summary line each."""
    galleries = Gallery.objects.filter(name__in=names) if names else Gallery.objects.filter(enabled=True)
    return [gallery.sync().summary() for gallery in galleries]
