"""The OpenAPI schema: valid, served to anyone, true to the API (checked by generated requests)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from backends_app.models import Gallery, JobKind, JobStatus, Node, UpgradeJob
from tests.helpers.api import flag_upgrade, install, make_backend, make_gallery, make_user

# Where JSON Schema cannot say what is valid: a supported gallery URL form, a complete verification
# block, a maintenance window whose two ends differ, a node that exists. There a schema-valid body may
# rightly get a 400.
BUSINESS_RULES = {
    "POST /api/v1/galleries/",
    "POST /api/v1/notification-targets/",
    "PATCH /api/v1/notification-targets/{id}/",
    "PATCH /api/v1/galleries/{name}/",
    "PATCH /api/v1/settings/",
    "POST /api/settings",
    "POST /api/v1/upgrades/apply/",
    *(f"POST /api/v1/backends/{{name}}/{verb}/" for verb in ("install", "upgrade", "rollback", "uninstall")),
    # A source the portal can install from (an image needs a name); a job still under way (LocalAI
    # answers 400 for any other id, which a client cannot tell from a valid one).
    "POST /api/backends/install-external",
    "POST /api/operations/{job_id}/cancel",
    "POST /api/operations/{job_id}/pause",
}
INDEX = "- name: cpu-llama-cpp\n  uri: quay.io/example/backends:cpu-llama-cpp\n"


def test_the_schema_is_valid_openapi_and_covers_every_endpoint() -> None:
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/json").json()

    validate_schema(schema)
    paths = set(schema["paths"])
    assert {
        "/api/v1/backends/",
        "/api/v1/backends/{name}/",
        "/api/v1/backends/{name}/install/",
        "/api/v1/backends/{name}/upgrade/",
        "/api/v1/backends/{name}/rollback/",
        "/api/v1/backends/{name}/uninstall/",
        "/api/v1/backends/{name}/pin/",
        "/api/v1/backends/{name}/unpin/",
        "/api/v1/upgrades/",
        "/api/v1/upgrades/check/",
        "/api/v1/upgrades/apply/",
        "/api/v1/jobs/",
        "/api/v1/jobs/{id}/",
        "/api/v1/jobs/{id}/cancel/",
        "/api/v1/settings/",
        "/api/v1/galleries/",
        "/api/v1/galleries/{name}/",
        "/api/v1/galleries/{name}/sync/",
        "/api/v1/notification-targets/",
        "/api/v1/notification-targets/{id}/",
        "/api/v1/notification-targets/test/",
        "/api/v1/notification-targets/{id}/test/",
        "/backends",
        "/backends/available",
        "/backends/known",
        "/backends/galleries",
        "/backends/apply",
        "/backends/delete/{name}",
        "/backends/upgrades",
        "/backends/upgrades/check",
        "/backends/upgrade/{name}",
        "/backends/jobs/{uuid}",
        "/api/backends",
        "/api/backends/install/{id}",
        "/api/backends/delete/{id}",
        "/api/backends/system/delete/{name}",
        "/api/backends/install-external",
        "/api/backends/job/{uid}",
        "/api/backends/upgrades",
        "/api/backends/upgrades/check",
        "/api/backends/upgrade/{name}",
        "/api/operations",
        "/api/operations/{job_id}/cancel",
        "/api/operations/{job_id}/pause",
        "/api/operations/{job_id}/dismiss",
        "/api/operations/history",
        "/api/settings",
    } <= paths
    # Each route once: the trailing-slash twins LocalAI's routes also answer are not listed.
    assert not [path for path in paths if path.endswith("/") and not path.startswith("/api/v1/")]
    tags = {
        path: {tag for op in item.values() for tag in op.get("tags", [])}
        for path, item in schema["paths"].items()
    }
    assert tags["/backends/upgrades"] == {"localai"} and tags["/api/backends/upgrades"] == {"localai-ui"}
    upgrade = schema["paths"]["/api/v1/backends/{name}/upgrade/"]["post"]["responses"]
    assert {"202", "400", "401", "403", "404", "409"} <= set(upgrade)


def test_the_docs_page_works_offline_from_our_own_static_files() -> None:
    client = APIClient()

    page = client.get("/api/docs/").content.decode()

    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    scripts = [a for a in assets if a.endswith(".js")]
    assert scripts and all(a.startswith("/static/drf_spectacular_sidecar/") for a in scripts), assets
    assert "cdn" not in page.lower()
    bundle = next(a for a in scripts if "swagger-ui-bundle" in a)
    served = client.get(bundle)
    assert served.status_code == 200
    assert b"SwaggerUI" in b"".join(served.streaming_content if served.streaming else [served.content])


@pytest.fixture
def superuser_token(db: Any) -> str:
    return Token.objects.create(user=make_user("fuzzer", superuser=True)).key


@pytest.fixture
def api_rows(db: Any, tmp_path: Path, settings: Any) -> None:
    """Rows for generated requests to find; the one gallery is a local file, so no sync leaves the machine."""
    settings.PORTAL_GALLERY_TIMEOUT = 2
    Gallery.objects.all().delete()
    index = tmp_path / "index.yaml"
    index.write_text(INDEX)
    # Named as the schema's examples, so the examples phase reaches real rows.
    gallery = make_gallery("localai", url=index.as_uri())
    install(flag_upgrade(make_backend(gallery, "cpu-llama-cpp")), kept=1)
    make_backend(gallery, "piper")
    UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=make_backend(gallery, "busy"), node=Node.local())
    UpgradeJob.objects.create(kind=JobKind.CHECK, status=JobStatus.SUCCEEDED)


# Loaded at import, through the WSGI application itself: generating the schema touches no database.
# (schemathesis.pytest.from_fixture would load it per test, but fails under pytest 9.)
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())


@pytest.fixture
def one_connection() -> Iterator[None]:
    """Keep the test's connection (and its transaction) across requests, as Django's test client does:
    the WSGI handler would otherwise close it when each generated request ends."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.mark.django_db
@schema.parametrize()
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_no_server_error_and_answers_match_the_schema(
    case: Any, api_rows: None, superuser_token: str, one_connection: None
) -> None:
    excluded = [positive_data_acceptance] if case.operation.label in BUSINESS_RULES else []
    case.call_and_validate(headers={"Authorization": f"Token {superuser_token}"}, excluded_checks=excluded)
