"""Riding out a dependency's outage: one mechanism for every consumer of Redis, the cloud, the broker.

`Outage.run(call)` calls until the call stops raising RetryableError, sleeping a capped, jittered
exponential backoff between tries (or the dependency's own `retry_after`, e.g. HTTP Retry-After,
when it gave one). It says once that it is waiting (naming the dependency and what it holds) and
once that the dependency is back: never a line per retry. The bus holds a handler's batch this way;
anything else that must not give up on a dependency (an outbox uploader) uses the same.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._errors import RetryableError

T = TypeVar("T")
# The first retry comes fast (a dependency restart takes about a second); later ones spread out.
RETRY_FIRST_DELAY = 0.5


class Outage:
    def __init__(self, max_delay: float, logger: logging.Logger, on_retry: Callable[[], None] | None = None) -> None:
        self.max_delay = max_delay
        self.logger = logger
        self.on_retry = on_retry
        self.waiting_on: str | None = None  # the dependency we are waiting for, while we are
        self._since = 0.0
        self._attempt = 0

    async def run(self, call: Callable[[], Awaitable[T]], holding: str = "") -> T:
        """The call's result, however many outages it takes; other errors end the wait and propagate."""
        while True:
            try:
                result = await call()
            except RetryableError as exc:
                self._down(exc, holding)
                await asyncio.sleep(self._next_delay(exc))
                continue
            except Exception:
                self._up()  # the dependency answered, even if with something we cannot use
                raise
            self._up()
            return result

    def _next_delay(self, exc: RetryableError) -> float:
        delay = random.uniform(0, min(self.max_delay, RETRY_FIRST_DELAY * 2**self._attempt))
        self._attempt += 1
        if exc.retry_after is not None:
            delay = min(max(delay, exc.retry_after), self.max_delay)  # the dependency's own pacing
        return delay

    def _down(self, exc: RetryableError, holding: str) -> None:
        if self.on_retry is not None:
            self.on_retry()
        if self.waiting_on is None:
            self.waiting_on = exc.dependency or "dependency"
            self._since = time.monotonic()
            held = f"; holding {holding}" if holding else ""
            self.logger.error("%s unavailable (%s)%s and retrying", self.waiting_on, exc, held)

    def _up(self) -> None:
        self._attempt = 0
        if self.waiting_on is not None:
            self.logger.info("%s is back after %.0fs", self.waiting_on, time.monotonic() - self._since)
            self.waiting_on = None
