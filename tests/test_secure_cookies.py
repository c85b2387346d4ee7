"""Behind a TLS-terminating proxy: `PORTAL_SECURE_COOKIES` marks the session and CSRF cookies Secure,
and `PORTAL_SECURE_PROXY_SSL_HEADER` makes the proxy's header say a request came over HTTPS; neither
happens unless configured (a client could otherwise claim HTTPS by sending the header).

Real daphne processes started with each configuration, signed in to over HTTP as a proxy would
forward the browser's requests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token

from tests.conftest import REPO, subprocess_env
from tests.helpers.processes import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.single_pass]

PASSWORD = "a-long-enough-password"
DEADLINE = 90.0


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a web server with extra environment; answers its base URL once it serves the sign-in page."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> str:
        port = free_port()
        log = (tmp_path / f"web-{port}.log").open("ab")
        command = [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "portal.asgi:application",
        ]
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=subprocess_env(PORTAL_LOG_LEVEL="WARNING", **env),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            assert process.poll() is None, (tmp_path / f"web-{port}.log").read_text()
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/login/", timeout=30).status_code == 200:
                    return url
            time.sleep(0.2)
        raise AssertionError(f"the web server did not answer within {DEADLINE:.0f} s")

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def set_cookies(response: requests.Response) -> dict[str, str]:
    """Each cookie the answer sets, by name, with its whole Set-Cookie line."""
    lines = response.raw.headers.getlist("Set-Cookie")
    return {line.split("=", 1)[0]: line for line in lines}


def is_secure_flagged(line: str) -> bool:
    return any(part.strip().lower() == "secure" for part in line.split(";"))


def sign_in(url: str, *, forwarded_https: bool) -> dict[str, str]:
    """Sign in through the sign-in page as a browser behind the proxy would; the Set-Cookie lines of
    both steps. Cookies are sent by hand: a client would not send a Secure cookie back over HTTP."""
    proxy = {"X-Forwarded-Proto": "https"} if forwarded_https else {}
    page = requests.get(f"{url}/login/", headers=proxy, timeout=60)
    cookies = set_cookies(page)
    csrf = re.search(r"csrftoken=([^;]+)", cookies["csrftoken"]).group(1)
    form_token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    origin = url.replace("http://", "https://") if forwarded_https else url
    answer = requests.post(
        f"{url}/login/",
        data={"username": "ops", "password": PASSWORD, "csrfmiddlewaretoken": form_token},
        headers={**proxy, "Cookie": f"csrftoken={csrf}", "Origin": origin},
        allow_redirects=False,
        timeout=60,
    )
    assert answer.status_code == 302, answer.text[:500]
    return {**cookies, **set_cookies(answer)}


def api_root_scheme(url: str, token: str, headers: dict[str, str]) -> str:
    """The scheme of the links the API writes: what `request.is_secure()` decided."""
    answer = requests.get(
        f"{url}/api/v1/", headers={"Authorization": f"Token {token}", **headers}, timeout=60
    )
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()["backends"].split("://")[0]


@pytest.fixture
def operator() -> Any:
    user = get_user_model().objects.create_user("ops", password=PASSWORD)
    user.user_permissions.add(Permission.objects.get(codename="operate_backend"))
    return Token.objects.create(user=user).key


def test_by_default_cookies_are_not_secure_and_the_proxy_header_is_ignored(
    web: Callable[..., str], operator: str
) -> None:
    url = web(PORTAL_SECURE_COOKIES="", PORTAL_SECURE_PROXY_SSL_HEADER="")

    cookies = sign_in(url, forwarded_https=False)

    assert not is_secure_flagged(cookies["csrftoken"]) and not is_secure_flagged(cookies["sessionid"])
    assert api_root_scheme(url, operator, {"X-Forwarded-Proto": "https"}) == "http"


def test_behind_a_tls_proxy_cookies_are_secure_and_https_follows_the_proxy_header(
    web: Callable[..., str], operator: str
) -> None:
    url = web(PORTAL_SECURE_COOKIES="1", PORTAL_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")

    cookies = sign_in(url, forwarded_https=True)

    assert is_secure_flagged(cookies["csrftoken"]) and is_secure_flagged(cookies["sessionid"])
    assert api_root_scheme(url, operator, {"X-Forwarded-Proto": "https"}) == "https"
    assert api_root_scheme(url, operator, {"X-Forwarded-Proto": "http"}) == "http"
    assert api_root_scheme(url, operator, {}) == "http"


def test_a_malformed_proxy_header_setting_is_a_check_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PORTAL_DATA_DIR": str(tmp_path),
        "DATABASE_URL": "",
        "PORTAL_SECURE_PROXY_SSL_HEADER": "X Forwarded Proto",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode != 0
    assert "PORTAL_SECURE_PROXY_SSL_HEADER='X Forwarded Proto' is not a header name" in done.stderr
