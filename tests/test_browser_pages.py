"""The pages in a real browser (Playwright on Debian's chromium), for everyone who uses them:

* the status truth table: each state `Backend.status` decides, seen at once on the backends page
  (the browser), in the admin and in the API (over HTTP, with the same session);
* the backends page updating its rows while a job runs on a real worker, with and without Redis;
* a fresh portal syncing its galleries when its worker starts, showing a gallery it cannot reach,
  and the sync button;
* a phone (390 x 844): no horizontal scroll on any page, sign-out reachable and working;
* a skip link, buttons named for screen readers, a live region, and a dark scheme that follows
  the browser's.
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from backends_app.models import (
    Backend,
    BackendState,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    UpgradeJob,
)
from tests import test_browser
from tests.conftest import live_version
from tests.helpers.processes import free_port
from tests.test_admin_actions import install_row
from tests.test_browser import PASSWORD, Portal, redis_url_or_skip, sign_in

pytestmark = [pytest.mark.single_pass]

# test_browser's fixtures, found by pytest under these names and used through the two below.
browser = test_browser.browser
demo = test_browser.demo

PHONE = {"width": 390, "height": 844}
DEADLINE = 60  # seconds, for anything a worker does on a loaded 2-core machine


@pytest.fixture
def operator(transactional_db: Any) -> Any:
    Gallery.objects.all().delete()  # the seeded gallery (on GitHub) is no part of these tests
    return get_user_model().objects.create_user(
        "operator", password=PASSWORD, is_staff=True, is_superuser=True
    )


@pytest.fixture
def chromium(request: pytest.FixtureRequest) -> Any:
    """test_browser's `browser`: Debian's chromium through Playwright."""
    return request.getfixturevalue("browser")


@pytest.fixture
def flagged(request: pytest.FixtureRequest) -> dict[str, Any]:
    """test_browser's `demo`: cpu-demo v1 installed through a throttling proxy, v2 pushed and flagged."""
    return request.getfixturevalue("demo")


def wait_for(condition: Any, what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {deadline} s: {what}")


# --- the status truth table -------------------------------------------------------------------------

NOW = object()  # stands for the time the test runs

# name -> (fields written on the backend after installing v1, or None to leave it uninstalled;
#          the state; text the detail must hold)
TRUTH_TABLE: dict[str, tuple[dict[str, Any] | None, str, str]] = {
    "absent": (None, BackendState.NOT_INSTALLED, ""),
    "fresh": ({}, BackendState.NOT_CHECKED, ""),
    "current": ({"last_checked_at": NOW}, BackendState.UP_TO_DATE, ""),
    "rebuilt": (
        {"last_checked_at": NOW, "check_note": "rebuilt in the registry: new digest sha256:abc.. under 1.0"},
        BackendState.UP_TO_DATE,
        "rebuilt in the registry",
    ),
    "newer": (
        {
            "last_checked_at": NOW,
            "upgrade_available": True,
            "available_version": "v2",
            "upgrade_reason": "version v1 -> v2",
        },
        BackendState.UPGRADE_AVAILABLE,
        "version v1 -> v2",
    ),
    "pinned": (
        {
            "last_checked_at": NOW,
            "pinned": True,
            "available_version": "v2",
            "upgrade_reason": "pinned: version v1 -> v2",
        },
        BackendState.PINNED,
        "version v1 -> v2",
    ),
    "held": (
        {
            "last_checked_at": NOW,
            "pinned": True,
            "held_version": "1.1.0",
            "held_reason": "rolled back by job 7",
            "available_version": "1.1.0",
            "latest_digest": "sha256:" + "b" * 64,
            "upgrade_reason": "held: 1.1.0 (rolled back by job 7)",
        },
        BackendState.HELD,
        "1.1.0: rolled back by job 7",
    ),
    "broken": (
        {"last_checked_at": NOW, "last_error": "quay.io unreachable after 4 attempts"},
        BackendState.ERROR,
        "quay.io unreachable after 4 attempts",
    ),
}


@pytest.mark.django_db(transaction=True)
def test_each_state_is_the_same_on_the_page_in_the_admin_and_in_the_api(
    chromium: Any, live_server: Any, operator: Any, gallery_factory: Any
) -> None:
    gallery_factory([{"name": name, "uri": f"127.0.0.1:9/demo/{name}:latest"} for name in TRUTH_TABLE])
    for name, (fields, _, _) in TRUTH_TABLE.items():
        if fields is None:
            continue
        backend = Backend.objects.get(name=name)
        install_row(backend, "v1")
        values = {key: timezone.now() if value is NOW else value for key, value in fields.items()}
        Backend.objects.filter(pk=backend.pk).update(**values)

    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    sign_in(page, live_server.url)
    page.goto(f"{live_server.url}/?capability=any")
    admin = page.context.request.get(f"{live_server.url}/admin/backends_app/backend/").text()

    for name, (_, state, detail) in TRUTH_TABLE.items():
        expected = label_of(state)
        # The page, as the browser shows it.
        if state == BackendState.NOT_INSTALLED:
            row = page.locator(f'#gallery tr[data-backend="{name}"]')
            assert row.get_attribute("data-state") == state
            assert row.locator('button[data-action="install"]').is_visible()
        else:
            row = page.locator(f'#installed tr[data-backend="{name}"]')
            badge = row.locator(f".badge.state-{state}")
            assert badge.is_visible(), name
            assert badge.inner_text() == expected[0].upper() + expected[1:], name
            if detail:
                assert detail in row.locator(".reason").inner_text(), name
            assert "Up to date" not in row.inner_text() or state == BackendState.UP_TO_DATE, name
        # The API.
        status = page.context.request.get(f"{live_server.url}/api/v1/backends/{name}/").json()["status"]
        assert (status["state"], status["label"]) == (state, expected), name
        assert detail in status["detail"], name
        # The admin's list.
        admin_row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*?>{name}</a>.*?</tr>", admin, re.S)
        assert admin_row, f"{name} not in the admin's list"
        admin_text = html.unescape(" ".join(re.sub(r"<[^>]*>", " ", admin_row.group(0)).split()))
        assert expected in admin_text and detail in admin_text, (name, admin_text)

    held = page.locator('#installed tr[data-backend="held"]')
    assert held.locator(".badge.pinned").is_visible()  # held and pinned, both said
    assert held.locator('button[data-action="rollback"]').count() == 0


def label_of(state: str) -> str:
    return BackendState(state).label


# --- live rows while a job runs ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.registry
@pytest.mark.parametrize("layer", ["redis", "in-memory"])
def test_the_backends_page_follows_a_running_upgrade_without_reloading(
    layer: str, chromium: Any, flagged: dict[str, Any], settings: Any, tmp_path: Path
) -> None:
    redis_url = redis_url_or_skip() if layer == "redis" else ""
    Gallery.objects.exclude(name="test").delete()
    get_user_model().objects.create_user("operator", password=PASSWORD, is_staff=True, is_superuser=True)
    portal = Portal(tmp_path / "portal", redis_url)
    # This process queues the job: the worker must read what it signs.
    portal.env["PORTAL_SECRET_KEY"] = settings.SECRET_KEY
    portal.start()
    try:
        page = chromium.new_page(viewport={"width": 1280, "height": 860})
        sign_in(page, portal.url)
        row = page.locator('#installed tr[data-backend="cpu-demo"]')
        assert "Upgrade available" in row.inner_text()
        upgrade = row.locator('button[data-action="upgrade"]')
        assert upgrade.get_attribute("aria-label") == "Upgrade cpu-demo on test-node to v2"

        # Started elsewhere (the API, the admin, the schedule): the page learns of it by itself.
        # A download of about six seconds, so the page's polls see it under way.
        flagged["proxy"].rate = 1024 * 1024
        job, created = flagged["backend"].request(JobKind.UPGRADE, requested_by="test:elsewhere")
        assert created
        page.evaluate("window.sameDocument = true")
        seen: list[str] = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            text = " ".join(row.inner_text().split())
            if not seen or seen[-1] != text:
                seen.append(text)
            if "Up to date" in text:
                break
            page.wait_for_timeout(50)
        else:
            raise AssertionError(f"the row never showed the end of the upgrade; it showed {seen}")
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED, job.error
        assert live_version(settings, "cpu-demo") == "v2"
        running = [text for text in seen if "Upgrade running" in text]
        assert running, seen
        percents = [int(m.group(1)) for text in running if (m := re.search(r"Upgrade running (\d+)%", text))]
        assert any(0 < p < 100 for p in percents), seen
        final = seen[-1]
        assert "v2" in final and "Up to date" in final and "Upgrade available" not in final
        assert page.evaluate("window.sameDocument") is True  # no reload
        assert "cpu-demo on test-node" in page.inner_text("#announcer")
        assert page.locator("#upgradable").inner_text() == "0"
        assert page.evaluate("window.backendsLive.polls") >= 2
    except Exception:
        print(portal.log_tail())
        raise
    finally:
        portal.stop()


# --- a fresh portal's galleries ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_fresh_portal_syncs_its_galleries_and_shows_the_one_it_cannot_reach(
    chromium: Any, operator: Any, tmp_path: Path
) -> None:
    index = tmp_path / "index.yaml"
    index.write_text(
        "- name: cpu-piper\n  uri: quay.io/x/b:latest-cpu-piper\n  description: text to speech\n"
    )
    Gallery.objects.create(name="mine", url=index.as_uri())
    Gallery.objects.create(name="offline", url=f"http://127.0.0.1:{free_port()}/index.yaml")
    portal = Portal(tmp_path / "portal", "").start()
    try:
        page = chromium.new_page(viewport={"width": 1280, "height": 860})
        sign_in(page, portal.url)
        # Synced when the worker started (the page reloads itself once the sync is over).
        page.wait_for_selector('#gallery tr[data-backend="cpu-piper"]', timeout=DEADLINE * 1000)
        error = page.locator('.gallery-error[data-gallery="offline"]')
        error.wait_for(timeout=DEADLINE * 1000)
        assert "Gallery offline could not be synced" in error.inner_text()
        assert "mine" not in " ".join(page.locator(".gallery-error").all_inner_texts())

        # A new entry, and the button.
        index.write_text(index.read_text() + "- name: cpu-kokoro\n  uri: quay.io/x/b:latest-cpu-kokoro\n")
        page.click("#sync-galleries")
        page.wait_for_selector('#gallery tr[data-backend="cpu-kokoro"]', timeout=DEADLINE * 1000)
        assert Backend.objects.filter(gallery__name="mine", name="cpu-kokoro").exists()
    except Exception:
        print(portal.log_tail())
        raise
    finally:
        portal.stop()


# --- for everyone ----------------------------------------------------------------------------------------


@pytest.fixture
def furnished(operator: Any, gallery_factory: Any) -> dict[str, Any]:
    """Long names, a flagged upgrade, a held build, a job, many gallery entries: what stretches a page."""
    long = "cuda13-nvidia-l4t-arm64-faster-whisper-development-with-a-very-long-name"
    gallery_factory(
        [
            {"name": long, "uri": f"127.0.0.1:9/demo/{long}:latest", "description": "x " * 300},
            {"name": "cpu-demo", "uri": "127.0.0.1:9/demo/cpu-demo:latest", "tags": ["TTS"]},
            *({"name": f"cpu-b{i:02}", "uri": f"127.0.0.1:9/demo/b{i}:latest"} for i in range(30)),
        ]
    )
    backend = Backend.objects.get(name="cpu-demo")
    install_row(backend, "v1.0.0-with-a-long-build-suffix")
    install_row(backend, "v0.9.0", state=InstalledVersion.State.KEPT)
    Backend.objects.filter(pk=backend.pk).update(
        upgrade_available=True,
        available_version="v2.0.0-with-a-long-build-suffix",
        upgrade_reason="version v1.0.0-with-a-long-build-suffix -> v2.0.0-with-a-long-build-suffix " * 2,
        last_checked_at=timezone.now(),
    )
    install_row(Backend.objects.get(name=long), "v1")
    job = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE, backend=backend, node=Node.local(), requested_by="t", message="y" * 200
    )
    return {"job": job}


@pytest.mark.django_db(transaction=True)
def test_every_page_fits_a_phone_and_sign_out_works_there(
    chromium: Any, live_server: Any, furnished: dict[str, Any]
) -> None:
    context = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()

    def fits(path: str) -> None:
        page.goto(f"{live_server.url}{path}")
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= PHONE["width"], f"{path}: {width} px wide"

    fits("/login/")
    sign_in(page, live_server.url)
    for path in (
        "/",
        "/?capability=any&dev=1",
        "/settings/",
        f"/jobs/{furnished['job'].pk}/",
        "/no-such-page/",
    ):
        fits(path)
        assert page.locator("#sign-out").is_visible(), path
    page.goto(f"{live_server.url}/")
    page.locator("#sign-out").click()
    page.wait_for_url(f"{live_server.url}/login/")
    page.goto(f"{live_server.url}/")
    assert page.url.startswith(f"{live_server.url}/login/")  # signed out for real
    context.close()


@pytest.mark.django_db(transaction=True)
def test_skip_link_named_buttons_and_live_region(
    chromium: Any, live_server: Any, furnished: dict[str, Any]
) -> None:
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    sign_in(page, live_server.url)
    page.keyboard.press("Tab")
    skip = page.locator(".skip-link")
    assert page.evaluate("document.activeElement.className") == "skip-link" and skip.is_visible()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    install = page.locator('#gallery tr[data-backend="cpu-b00"] button[data-action="install"]')
    assert install.get_attribute("aria-label") == "Install cpu-b00"
    link = page.locator('#installed tr[data-backend="cpu-demo"] a.job-link')
    assert link.get_attribute("aria-label") == "Upgrade of cpu-demo on test-node: queued"
    region = page.locator("#announcer")
    assert (region.get_attribute("role"), region.get_attribute("aria-live")) == ("status", "polite")


@pytest.mark.django_db(transaction=True)
def test_the_dark_scheme_follows_the_browser(chromium: Any, live_server: Any, operator: Any) -> None:
    colours = {}
    for scheme in ("light", "dark"):
        context = chromium.new_context(color_scheme=scheme)
        page = context.new_page()
        sign_in(page, live_server.url)
        colours[scheme] = page.evaluate(
            "() => [getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color]"
        )
        context.close()

    def luminance(css: str) -> float:
        r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255

    (light_bg, _), (dark_bg, dark_ink) = colours["light"], colours["dark"]
    assert light_bg != dark_bg, colours
    assert luminance(light_bg) > 0.8 and luminance(dark_bg) < 0.2, colours
    assert luminance(dark_ink) > 0.7, colours  # light text on the dark background
