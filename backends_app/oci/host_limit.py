"""How many requests one registry host gets at a time, adapted to its rate limit.

A registry that rate-limits answers HTTP 429, often with ``Retry-After``. Retrying each such request
on its own, while the client's other threads keep firing, only earns more 429s. A :class:`HostLimit`
is shared by every thread talking to one host and reacts for all of them:

* A 429 halves the number of requests allowed in flight (at least 1), once per round: the 429s of
  requests sent before the last cut do not cut again, so a burst of 32 rejected requests halves the
  limit once, not 32 times.
* The whole host pauses: no request is sent before ``Retry-After`` (or, without it, a backoff that
  doubles with each cut since the last success) has passed.
* Every answer that is not a 429 is progress and grows the limit back by one per ``limit`` answers
  (additive increase), up to the ceiling.

A request that meets a 429 is sent again once the host lets it (no retry is counted). Requests give
up (:class:`RateLimitedTooLong`) only when the host has answered nothing but 429 for ``patience``
seconds, counting the pause ahead, so a registry that answers 429 forever ends every request within
about ``patience`` seconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RegistryUnavailable


class RateLimitedTooLong(RegistryUnavailable):
    """The host has answered nothing but HTTP 429 for longer than the client's patience."""


@dataclass(frozen=True)
class RateLimitStats:
    """What a host's rate limiting did to us so far (a snapshot)."""

    host: str
    throttled: int
    """HTTP 429 answers received."""
    ceiling: int
    """Requests allowed in flight before any 429 (the client's ``max_in_flight``)."""
    lowest: int
    """The fewest requests in flight the host was slowed to."""
    limit: int
    """Requests allowed in flight now."""
    waited: float
    """Seconds the host was paused for (``Retry-After`` or backoff), summed over the pauses."""
    gave_up: int
    """Requests that failed because the host made no progress for ``patience`` seconds."""


class HostLimit:
    """The adaptive limit of requests in flight to one host, shared by the client's threads.

    ``acquire()`` before a request, then exactly one of ``answered()`` / ``throttled()`` /
    ``failed()`` after it. See the module docstring for the policy.
    """

    def __init__(
        self,
        host: str,
        ceiling: int,
        *,
        backoff: float = 0.5,
        max_wait: float = 60.0,
        patience: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.ceiling = max(1, ceiling)
        self._backoff = backoff
        self._max_wait = max_wait
        self.patience = patience
        self._clock = clock
        self._limit = float(self.ceiling)
        self._in_flight = 0
        self._paused_until = 0.0
        self._last_cut = -math.inf
        self._cuts_since_progress = 0
        self._stalled_since: float | None = None
        self._throttled = 0
        self._lowest = self.ceiling
        self._waited = 0.0
        self._gave_up = 0
        self._cond = threading.Condition()

    def acquire(self) -> float:
        """Wait for a free slot and for any pause to end; returns when the request may go (its
        send time, for :meth:`throttled`). Raises :class:`RateLimitedTooLong` instead when, by the
        end of the pause, the host will have answered nothing but 429 for more than ``patience``
        seconds (nothing is sent during a pause, so nothing can change before it ends)."""
        with self._cond:
            while True:
                now = self._clock()
                if self._stalled_since is not None:
                    stalled = max(now, self._paused_until) - self._stalled_since
                    if stalled > self.patience:
                        self._gave_up += 1
                        raise RateLimitedTooLong(
                            f"{self.host}: rate-limited (HTTP 429) for {stalled:.0f}s with no other "
                            f"answer, more than the {self.patience:g}s allowed "
                            f"(slowed to {int(self._limit)} in flight)"
                        )
                if now < self._paused_until:
                    self._cond.wait(self._paused_until - now)
                elif self._in_flight < int(self._limit):
                    self._in_flight += 1
                    return now
                else:
                    self._cond.wait()

    def answered(self) -> None:
        """The request got an answer other than 429: progress; the limit grows back slowly."""
        with self._cond:
            self._in_flight -= 1
            self._stalled_since = None
            self._cuts_since_progress = 0
            if self._limit < self.ceiling:
                self._limit = min(float(self.ceiling), self._limit + 1.0 / self._limit)
            self._cond.notify()

    def failed(self) -> None:
        """No answer (connection error, timeout): not progress, not a rate limit."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()

    def throttled(self, sent_at: float, retry_after: float | None) -> float:
        """The request got a 429: cut the limit (once per round) and pause the host. Returns the
        pause in seconds, counted from now."""
        with self._cond:
            self._in_flight -= 1
            self._throttled += 1
            now = self._clock()
            if self._stalled_since is None:
                self._stalled_since = now
            if sent_at > self._last_cut:
                self._limit = max(1.0, math.floor(self._limit / 2))
                self._lowest = min(self._lowest, int(self._limit))
                self._last_cut = now
                self._cuts_since_progress += 1
            if retry_after is not None:
                wait = retry_after
            else:
                wait = self._backoff * 2.0 ** min(6, max(0, self._cuts_since_progress - 1))
            wait = min(max(0.0, wait), self._max_wait)
            until = now + wait
            if until > self._paused_until:
                self._waited += until - max(now, self._paused_until)
                self._paused_until = until
            self._cond.notify_all()
            return wait

    def stalled_for(self) -> float:
        """Seconds the host has answered nothing but 429 (since the first 429 after its last other
        answer); 0 when its last answer was not a 429."""
        with self._cond:
            return 0.0 if self._stalled_since is None else self._clock() - self._stalled_since

    def stats(self) -> RateLimitStats:
        with self._cond:
            return RateLimitStats(
                host=self.host,
                throttled=self._throttled,
                ceiling=self.ceiling,
                lowest=self._lowest,
                limit=int(self._limit),
                waited=self._waited,
                gave_up=self._gave_up,
            )
