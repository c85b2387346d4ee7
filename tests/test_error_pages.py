"""Errors on the pages come in the portal's layout with a way back; the API keeps its JSON errors."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from backends_app.models import PortalSettings
from tests.test_api_errors import drop_table

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


def in_layout(response: Any) -> str:
    page = response.content.decode()
    assert response["Content-Type"].startswith("text/html")
    assert '<link rel="stylesheet" href="/static/portal/portal.css">' in page
    assert 'class="skip-link" href="#main"' in page
    assert '<a href="/" class="way-back">' in page
    return page


@pytest.fixture
def member(client: Any) -> Any:
    client.force_login(get_user_model().objects.create_user("member", password="pw"))
    return client


@pytest.mark.parametrize("path", ["/nothing-here/", "/jobs/999999/"])
def test_a_page_that_does_not_exist_is_a_404_in_the_layout(member: Any, path: str) -> None:
    response = member.get(path)
    assert response.status_code == 404
    page = in_layout(response)
    assert "<h1>Not found</h1>" in page and f"<code>{path}</code>" in page
    assert 'id="sign-out"' in page  # still signed in, still able to leave


def test_a_page_the_user_may_not_open_is_a_403_in_the_layout(member: Any) -> None:
    response = member.get("/settings/")
    assert response.status_code == 403
    assert "<h1>Not allowed</h1>" in in_layout(response)


def test_a_server_error_on_a_page_is_a_500_in_the_layout(admin_client: Any) -> None:
    admin_client.raise_request_exception = False
    drop_table(PortalSettings)

    response = admin_client.get("/settings/")

    assert response.status_code == 500
    page = in_layout(response)
    assert "Something went wrong" in page and "portalsettings" not in page.lower()


def test_the_api_keeps_its_json_errors(admin_client: Any) -> None:
    response = admin_client.get("/api/v1/nothing-here/")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert "detail" in response.json()
    anonymous = Client().get("/api/v1/backends/")
    assert anonymous.status_code in (401, 403) and anonymous["Content-Type"] == "application/json"
