"""Shared test setup: which database pass this is, and the real services the tests need."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

pytest_plugins = ["tests.registry"]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
LOCALAI_INDEX = FIXTURES / "localai-index.yaml"


def services_required() -> bool:
    """In CI a missing service fails the test; on a developer machine it skips with the reason."""
    return bool(os.environ.get("CI") or os.environ.get("PORTAL_REQUIRE_SERVICES"))


def missing_service(reason: str) -> None:
    if services_required():
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db-pass",
        choices=["all", "sqlite"],
        default="all",
        help="sqlite: run only the tests that use the database, on the embedded SQLite default",
    )


def pytest_configure(config: pytest.Config) -> None:
    # The web application imported in this process (tests of its ASGI layer) does not watch the
    # settings file (it reads it once, on import); the processes the tests start do.
    settings.PORTAL_CONFIG_POLL_INTERVAL = 0
    if config.getoption("--db-pass") == "sqlite" and settings.DATABASES["default"]["ENGINE"].endswith(
        "postgresql"
    ):
        raise pytest.UsageError("--db-pass=sqlite needs DATABASE_URL unset or sqlite://")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the SQLite pass, keep the tests that touch the database and do not need PostgreSQL."""
    if config.getoption("--db-pass") != "sqlite":
        return
    keep, drop = [], []
    for item in items:
        uses_db = "_django_db_helper" in getattr(item, "fixturenames", ()) or item.get_closest_marker(
            "django_db"
        )
        once = item.get_closest_marker("postgres") or item.get_closest_marker("single_pass")
        (keep if uses_db and not once else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") and not settings.DATABASES["default"]["ENGINE"].endswith(
        "postgresql"
    ):
        missing_service("this test needs PostgreSQL: set DATABASE_URL=postgres://...")


@pytest.fixture
def fast_password_hashing(settings: Any) -> None:
    """A million PBKDF2 rounds per user made is for real passwords, not for tests. Not for tests whose
    users sign in to a server process: it hashes with the settings' real hashers."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def portal_paths(tmp_path: Path, settings: Any) -> Path:
    """Every test gets its own backends and state directories."""
    settings.PORTAL_BACKENDS_PATH = tmp_path / "backends"
    settings.PORTAL_STATE_PATH = tmp_path / ".backends-portal"
    settings.PORTAL_CAPABILITY = "default"
    settings.PORTAL_NODE_NAME = "test-node"
    return tmp_path


@pytest.fixture
def gallery_factory(tmp_path: Path) -> Any:
    """Make and sync a gallery from entries: `gallery_factory([{"name": ..., "uri": ...}, ...])`."""
    import yaml

    from backends_app.models import Gallery

    def make(entries: list[dict[str, Any]], name: str = "test") -> Gallery:
        path = tmp_path / f"gallery-{name}.yaml"
        path.write_text(yaml.safe_dump(entries, sort_keys=False))
        gallery, _ = Gallery.objects.update_or_create(name=name, defaults={"url": path.as_uri()})
        result = gallery.sync(force=True)
        assert result.ok, result.error
        return gallery

    return make


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a `manage.py` child process that shares this test's database and paths."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("postgresql"):
        url = (
            f"postgres://{db['USER'] or 'root'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        )
    else:
        url = f"sqlite:///{db['NAME']}"
    inherited = dict(os.environ)
    if "PORTAL_DATA_DIR" in extra:
        # Set by this process's settings from its own data folder: a child with its own folder
        # keeps its metrics there, not in this process's (which it would empty when it starts).
        inherited.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {
        **inherited,
        "DATABASE_URL": url,
        "PORTAL_BACKENDS_PATH": str(settings.PORTAL_BACKENDS_PATH),
        "PORTAL_STATE_PATH": str(settings.PORTAL_STATE_PATH),
        "PORTAL_NODE_NAME": settings.PORTAL_NODE_NAME,
        "PORTAL_CAPABILITY": settings.PORTAL_CAPABILITY,
        **extra,
    }


def image(version: str, *, executable: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The files of a small backend image whose run.sh and lib/version.txt name `version`."""
    return {
        "run.sh": (f"#!/bin/sh\necho {version}\n", 0o755 if executable else 0o644),
        "lib/version.txt": version,
        **(extra or {}),
    }


def run_op(backend: Any, kind: str, **kwargs: Any) -> Any:
    """Ask for an operation and run it here, as the commands do; returns the finished job."""
    from backends_app import jobs

    job, created = backend.request(kind, queue=False, requested_by="test", **kwargs)
    assert created
    return jobs.run(job.pk)


def live_version(settings: Any, name: str) -> str:
    return (Path(settings.PORTAL_BACKENDS_PATH) / name / "lib" / "version.txt").read_text()


@pytest.fixture
def published(registry: Any, gallery_factory: Any) -> Any:
    """A backend `cpu-demo` in a gallery, its tag in the real registry; `.push(version)` moves the tag."""
    from backends_app.models import Backend

    class Published:
        repo = registry.unique_repo()
        ref = registry.ref(repo, "latest")
        digests: dict[str, str] = {}

        def push(self, version: str, **kwargs: Any) -> str:
            registry.push_image(image(version, **kwargs), repo=self.repo, tag="latest")
            with registry.client() as client:
                digest = client.head_digest(self.ref)
            self.digests[digest] = version
            return digest

    demo = Published()
    demo.first_digest = demo.push("v1")
    demo.gallery = gallery_factory([{"name": "cpu-demo", "uri": demo.ref, "alias": "demo"}])
    demo.backend = Backend.objects.lookup("cpu-demo")
    return demo
