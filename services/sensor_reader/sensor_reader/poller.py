"""Polls one device on a drift-free schedule and survives a flaky bus.

Every read of a blocking driver runs on its bus's worker thread (`BusThreads`: one thread per
physical bus, shared by the devices on it; a stuck bus blocks only its own devices) under a timeout;
a driver that never blocks (the simulator) is read on the event loop, so thousands of simulated
devices need no thread at all. A failed read is retried a few times with jittered backoff inside the same poll; after
`reopen_after` consecutive failed polls the bus handle is closed and reopened; after `fault_after`
the device is reported `fault` with the reason, and polling backs off exponentially (capped) until
a read succeeds again. Checksum and implausible-value errors are counted and the sample dropped.

All scheduling and timeouts go through a `Clock`: the event loop's monotonic clock unless a test
hands in one it drives itself.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .drivers import BusError, DeviceIdentityError, Driver, DriverError, Sample

log = logging.getLogger(__name__)
T = TypeVar("T")

SampleSink = Callable[[int, Sample], None]
StateSink = Callable[[str, str | None], None]


class ReadTimeoutError(BusError):
    kind = "timeout"


class Clock(Protocol):
    """Where the poller's schedule and read timeouts get their time."""

    def now(self) -> float:
        """Monotonic seconds."""

    async def sleep(self, seconds: float) -> None: ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """Like asyncio.timeout: TimeoutError out of the `async with` body once `seconds` have passed."""


class LoopClock:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        # asyncio.timeout, never asyncio.wait_for: on Python 3.11 wait_for swallows a cancellation
        # that lands as the read completes, so this poller (polling every few ms) sometimes
        # ignored shutdown and the process hung on SIGTERM (reproduced about 1 in 12 stops).
        return asyncio.timeout(seconds)


class DeviceThread:
    """A daemon worker thread for the devices of one bus. A stdlib ThreadPoolExecutor's threads are joined at
    interpreter exit, so a driver wedged forever in a bus call would keep the process from ever
    exiting on SIGTERM; a daemon thread does not."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError("device thread is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting poller, which classifies it
                future.set_exception(exc)


class BusThreads:
    """One DeviceThread per bus key (Driver.bus_key), created on first use."""

    def __init__(self) -> None:
        self._threads: dict[str, DeviceThread] = {}

    def for_driver(self, driver: Driver) -> DeviceThread:
        key = driver.bus_key
        thread = self._threads.get(key)
        if thread is None:
            thread = self._threads[key] = DeviceThread(f"bus-{key}"[:15])
        return thread

    def __len__(self) -> int:
        return len(self._threads)

    def shutdown(self) -> None:
        for thread in self._threads.values():
            thread.shutdown()


@dataclass(frozen=True)
class PollPolicy:
    read_timeout: float = 2.0
    retries: int = 2  # extra attempts within one poll, for transient bus errors only
    retry_base: float = 0.02  # first retry delay (s); doubles, full jitter
    reopen_after: int = 3  # consecutive failed polls before the bus is reopened
    fault_after: int = 5  # consecutive failed polls before the device is reported `fault`
    max_backoff: float = 60.0  # cap on the polling interval while faulted


@dataclass
class DeviceStats:
    reads: int = 0  # successful reads (a Block counts once)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    reopens: int = 0
    skipped_ticks: int = 0  # schedule ticks missed because the previous poll ran late

    def snapshot(self) -> dict[str, object]:
        return {
            "reads": self.reads,
            "errors": dict(self.errors),
            "reopens": self.reopens,
            "skipped_ticks": self.skipped_ticks,
        }


class DevicePoller:
    def __init__(
        self,
        driver: Driver,
        interval: float,
        on_sample: SampleSink,
        on_state: StateSink,
        policy: PollPolicy | None = None,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        clock: Clock | None = None,
        thread: DeviceThread | None = None,
    ) -> None:
        self.driver = driver
        self.interval = interval
        self.policy = policy or PollPolicy()
        self.stats = DeviceStats()
        self.state = "starting"
        self.reason: str | None = None
        self._on_sample = on_sample
        self._on_state = on_state
        self._wall_clock_ms = wall_clock_ms
        self._clock = clock or LoopClock()
        self._failures = 0  # consecutive failed polls
        self._opened = False
        self._pending: concurrent.futures.Future[Any] | None = None
        # A blocking driver's calls run on its bus's thread (given, shared with the bus's other
        # devices; else one of its own): a bus that hangs stalls its own devices, never the others.
        # A driver that never blocks is called inline.
        self._owns_thread = driver.blocking and thread is None
        self._executor = (thread or DeviceThread(f"dev-{driver.device_id}")) if driver.blocking else None

    # -- schedule -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll until cancelled. Ticks are `start + k * interval` on the monotonic clock, so sleeps
        never accumulate drift; ticks missed while a poll overran are skipped, not bunched up."""
        start = self._clock.now()
        tick = 0
        try:
            while True:
                await self.poll_once()
                if self._failures >= self.policy.fault_after:
                    # Faulted: back off, but stay on the grid of the original schedule.
                    extra = self._failures - self.policy.fault_after
                    delay = min(self.interval * 2 ** min(extra + 1, 30), self.policy.max_backoff)
                    step = max(1, round(delay / self.interval))
                else:
                    step = 1
                tick += step
                now = self._clock.now()
                behind = int((now - start) / self.interval) - tick
                if behind >= 0:  # overran: jump to the next future tick
                    self.stats.skipped_ticks += behind + 1
                    tick += behind + 1
                await self._clock.sleep(start + tick * self.interval - now)
        finally:
            await self._close()
            if self._owns_thread and self._executor is not None:
                self._executor.shutdown()

    # -- one poll -------------------------------------------------------------------------------
    async def poll_once(self) -> bool:
        """Read one sample (with retries). Returns True when a sample was delivered."""
        try:
            if not self._opened:
                await self._call(self.driver.open)
                self._opened = True
            sample = await self._read_with_retries()
        except DriverError as exc:
            await self._failed(exc)
            return False
        ts = self._wall_clock_ms()
        self.stats.reads += 1
        if self._failures or self.state != "online":
            if self._failures >= self.policy.fault_after:
                log.info("device %s recovered after %d failed polls", self.driver.device_id, self._failures)
            self._failures = 0
            self._set_state("online", None)
        if sample:
            self._on_sample(ts, sample)
        return True

    async def _read_with_retries(self) -> Sample:
        """One read; a transient bus error is retried within the poll after a full-jitter
        exponential delay (retry_base, then twice that...). Written out rather than with the
        `backoff` decorator, whose generic wrapper cost a fifth of the reader's CPU with 5,000
        devices for polls that almost never fail. The delay is asyncio's sleep, not the clock's: a
        few milliseconds inside one poll, which never move the schedule."""
        attempt = 0
        while True:
            try:
                return await self._call(self.driver.read)
            except BusError as exc:
                if attempt >= self.policy.retries:
                    raise
                self.stats.errors[exc.kind] += 1
                await asyncio.sleep(random.uniform(0, self.policy.retry_base * 2**attempt))
                attempt += 1

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:  # a driver that never blocks: no thread, no timeout needed
            try:
                return fn()
            except DriverError:
                raise
            except OSError as exc:
                raise BusError(f"{type(exc).__name__}: {exc}") from exc
        if self._pending is not None and not self._pending.done():
            # The previous call is still stuck in the driver: do not queue behind it.
            raise ReadTimeoutError("previous bus call still blocked")
        try:
            pending: concurrent.futures.Future[T] = self._executor.submit(fn)
            self._pending = pending
        except RuntimeError as exc:  # executor shut down: we are stopping
            raise BusError("poller stopped") from exc
        try:
            async with self._clock.timeout(self.policy.read_timeout):
                return await asyncio.wrap_future(pending)
        except TimeoutError as exc:
            raise ReadTimeoutError(f"no answer within {self.policy.read_timeout}s") from exc
        except DriverError:
            raise
        except OSError as exc:  # a driver that let an OSError through: still a bus error
            raise BusError(f"{type(exc).__name__}: {exc}") from exc

    async def _failed(self, exc: DriverError) -> None:
        self._failures += 1
        self.stats.errors[exc.kind] += 1
        device = self.driver.device_id
        if self._failures == 1:
            log.warning("device %s read failed (%s): %s", device, exc.kind, exc)
        reopen = isinstance(exc, BusError | DeviceIdentityError)
        if reopen and self._failures % self.policy.reopen_after == 0:
            log.warning("device %s: %d consecutive failures, reopening the bus", device, self._failures)
            await self._close()
            self.stats.reopens += 1
        if self._failures == self.policy.fault_after:
            reason = f"{exc.kind}: {exc}"
            log.error("device %s marked fault after %d failed polls: %s", device, self._failures, reason)
            self._set_state("fault", reason)

    async def _close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        try:
            # close() on the loop's default pool: the device thread may be the one that is stuck.
            async with self._clock.timeout(self.policy.read_timeout):
                await asyncio.to_thread(self.driver.close)
        except Exception as exc:  # a failing close must not stop the reopen
            log.warning("device %s close failed: %s", self.driver.device_id, exc)
            self.stats.errors["close"] += 1

    def _set_state(self, state: str, reason: str | None) -> None:
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason = state, reason
            self._on_state(state, reason)
