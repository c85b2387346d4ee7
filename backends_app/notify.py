"""Sending messages through Apprise: the one module that talks to it. Plain Python, no Django.

Apprise reaches a service by one URL each (``json://`` webhooks, ntfy, Slack, mail, Matrix, Gotify,
...). This module checks and masks such URLs, sends one message to several of them in one call (Apprise
sends to them in parallel), and says for each URL whether the message was delivered, failed (worth
trying again later), or may have arrived (a timeout: the request may have reached the receiver, so it
is not sent again, or the receiver could get it twice).

The URLs hold secrets (tokens in the path, passwords in the user part), so:

* only `masked(url)` is meant to be shown: scheme and host as Apprise masks them, nothing of the path
  or the query;
* Apprise's own log, which prints whole URLs at debug level, never reaches the portal's log: its logger
  stops propagating here (its messages are still read, per attempt, from Apprise's results); nor do
  urllib3's debug lines, which print request paths;
* error texts have every part of the URL that the mask hides replaced by ``****``;
* Apprise keeps nothing on disk (``storage_mode="memory"``).
"""

from __future__ import annotations

import enum
import logging
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import apprise

MAX_URL_LENGTH = 2000
MAX_DETAIL = 500
# What Apprise's requests-based plugins log when the receiver accepted the connection and the request
# but did not answer in time: the message may have been taken.
_READ_TIMEOUT = re.compile(r"read timed out|ReadTimeout", re.IGNORECASE)
_KINDS = {
    "info": apprise.NotifyType.INFO,
    "success": apprise.NotifyType.SUCCESS,
    "warning": apprise.NotifyType.WARNING,
    "failure": apprise.NotifyType.FAILURE,
}


def _keep_apprise_out_of_the_log() -> None:
    """Apprise logs whole URLs (secrets included) at debug level: its records stop at its own logger.

    The level stays at DEBUG so that each attempt's captured log (read below, never stored whole)
    still tells a read timeout from a refused connection.
    """
    logger = logging.getLogger("apprise")
    logger.propagate = False
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.DEBUG)
    # urllib3 (under requests, under Apprise's plugins) logs each request's path at debug level, and
    # webhook tokens live there: its debug lines stay out of the log whatever PORTAL_LOG_LEVEL says.
    http = logging.getLogger("urllib3")
    if http.level < logging.INFO:
        http.setLevel(logging.INFO)


_keep_apprise_out_of_the_log()


class NotifyError(ValueError):
    """A URL Apprise cannot use; the message says why without repeating the URL."""


class Result(enum.StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    """Not delivered; trying again later may work."""
    UNKNOWN = "unknown"
    """Timed out after the request may have reached the receiver: not sent again."""
    INVALID = "invalid"
    """Apprise cannot use the URL: trying again will not help."""


@dataclass(frozen=True)
class Outcome:
    """What sending to one URL did."""

    result: Result
    detail: str = ""
    """Why, for people, with no secret in it."""
    tries: int = 1
    """HTTP attempts Apprise made (its own ``?retry=`` included)."""

    @property
    def ok(self) -> bool:
        return self.result is Result.DELIVERED


def _asset() -> apprise.AppriseAsset:
    return apprise.AppriseAsset(storage_mode="memory")


def check_url(url: str) -> str:
    """The URL without surrounding blanks; raises NotifyError when Apprise cannot use it."""
    text = url.strip()
    if not text:
        raise NotifyError("an Apprise URL is needed, e.g. json://host/path or ntfys://ntfy.sh/topic")
    if len(text) > MAX_URL_LENGTH:
        raise NotifyError(f"longer than {MAX_URL_LENGTH} characters")
    if any(character.isspace() for character in text):
        raise NotifyError("one URL per entry, without spaces")
    if "://" not in text:
        raise NotifyError("not a URL: it needs a scheme, e.g. json:// or ntfys://")
    if apprise.Apprise.instantiate(text, asset=_asset()) is None:
        scheme = text.partition("://")[0][:20]
        raise NotifyError(f"Apprise cannot use this {scheme}:// URL (unknown scheme or missing parts)")
    return text


def masked(url: str) -> str:
    """``scheme://host[:port]/****``: enough to tell URLs apart, none of their secrets.

    The host part is Apprise's own privacy form (it hides passwords, and tokens that sit where a host
    would, as Slack's and Telegram's do); the path and the query may hold tokens too, so they are hidden
    whole.
    """
    service = apprise.Apprise.instantiate(url, asset=_asset()) if url.strip() else None
    scheme = url.partition("://")[0][:20] if "://" in url else "?"
    if service is None:
        return f"{scheme}://****"
    parts = urllib.parse.urlsplit(service.url(privacy=True))
    hidden = "/****" if parts.path.strip("/") or parts.fragment else ""
    return f"{parts.scheme or scheme}://{parts.netloc}{hidden}"


def _secret_parts(url: str) -> list[str]:
    """The pieces of `url` that its mask hides (longest first), in raw and decoded forms."""
    shown = masked(url)
    pieces = set()
    for piece in re.split(r"[/:@?&=#,;+\s]+", url):
        for form in (piece, urllib.parse.unquote(piece)):
            if len(form) >= 4 and form not in shown:
                pieces.add(form)
    return sorted(pieces, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` with every secret part of `url` replaced by ``****``."""
    for piece in _secret_parts(url):
        text = text.replace(piece, "****")
    return text


def send(
    urls: Mapping[str, str], *, title: str, body: str, kind: str = "info", timeout: float = 30
) -> dict[str, Outcome]:
    """Send one message to every URL (keyed by the caller's ids); the outcome for each key.

    One Apprise call for all of them: Apprise sends in parallel, and `timeout` bounds the whole call.
    Never raises for a delivery problem; each key gets an outcome.
    """
    sender = apprise.Apprise(asset=_asset())
    outcomes: dict[str, Outcome] = {}
    tags: dict[str, str] = {}
    for index, (key, url) in enumerate(urls.items()):
        tag = f"portal-target-{index}"
        if sender.add(url, tag=tag):
            tags[tag] = key
        else:
            outcomes[key] = Outcome(Result.INVALID, "Apprise cannot use this URL", tries=0)
    if not tags:
        return outcomes
    with sender.notify(
        body=body,
        title=title,
        notify_type=_KINDS.get(kind, apprise.NotifyType.INFO),
        body_format=apprise.NotifyFormat.TEXT,
        tag=list(tags),
        timeout=timeout,
        log_level=logging.DEBUG,
    ) as result:
        for service in result:
            found = next((tags[tag] for tag in service.tag if tag in tags), None)
            if found is not None:
                outcomes[found] = _outcome(service, urls[found], timeout)
    for key in tags.values():
        outcomes.setdefault(key, Outcome(Result.UNKNOWN, "Apprise gave no result for this URL"))
    return outcomes


def _outcome(service: apprise.NotifyResult, url: str, timeout: float) -> Outcome:
    tries = len(service.attempts)
    if service.status == apprise.AppriseResultStatus.SUCCESS:
        return Outcome(Result.DELIVERED, tries=tries)
    entries = [entry for attempt in service.attempts for entry in attempt.logs]
    said = list(dict.fromkeys(e.message for e in entries if e.level in ("WARNING", "ERROR", "CRITICAL")))
    if service.status == apprise.AppriseResultStatus.TIMEOUT:
        return Outcome(
            Result.UNKNOWN,
            f"no answer within {timeout:g} s: it may have been delivered, so it is not sent again",
            tries=tries,
        )
    if any(_READ_TIMEOUT.search(entry.message) for entry in entries):
        return Outcome(
            Result.UNKNOWN,
            "the receiver took the request but did not answer in time: it may have been delivered, "
            "so it is not sent again",
            tries=tries,
        )
    detail = "; ".join(said) or f"Apprise reported {service.status.name.lower()}"
    return Outcome(Result.FAILED, scrub(detail, url)[:MAX_DETAIL], tries=tries)
