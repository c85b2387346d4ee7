"""Shared test setup: which database pass this is, and the real services the tests need."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

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
        uses_db = "_django_db_helper" in getattr(item, "fixturenames", ())
        (keep if uses_db and not item.get_closest_marker("postgres") else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") and not settings.DATABASES["default"]["ENGINE"].endswith(
        "postgresql"
    ):
        missing_service("this test needs PostgreSQL: set DATABASE_URL=postgres://...")


@pytest.fixture(autouse=True)
def portal_paths(tmp_path: Path, settings: Any) -> Path:
    """Every test gets its own backends and state directories."""
    settings.PORTAL_BACKENDS_PATH = tmp_path / "backends"
    settings.PORTAL_STATE_PATH = tmp_path / ".backends-portal"
    settings.PORTAL_CAPABILITY = "default"
    settings.PORTAL_NODE_NAME = "test-node"
    return tmp_path
