"""DevicePoller under bus faults: real drivers on byte-exact fake buses, three devices at once.

Each test runs the pollers as asyncio tasks, injects a fault into one device's bus, waits for what
the pollers report (samples, state changes) and checks that the faulty device is handled -- retried,
reopened, faulted, recovered -- while the healthy devices keep sampling on their schedule.

The pollers run on virtual time (`VirtualTime`, their Clock). It stands still while any driver call
is at work on its device thread, and only when every poller is waiting for time to pass does the
rig move it to the next moment something is due. Each driver call takes READ_COST of it. So every
schedule below is exact, and no assertion depends on how quickly this machine runs the threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import math
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import sensor_reader.poller
from fakes.faults import FaultInjector
from fakes.i2c import FakeBME280, FakeI2CBus, FakeSHT31
from fakes.spi import FakeMCP3008
from sensor_reader.drivers import Driver
from sensor_reader.drivers.i2c import BME280Driver, BME280Params, SHT31Driver, SHT31Params
from sensor_reader.drivers.spi import MCP3008Driver, MCP3008Params
from sensor_reader.poller import DevicePoller, DeviceThread, PollPolicy

INTERVAL = 0.02
READ_COST = INTERVAL / 8  # virtual time a driver call takes; a poll makes one to three of them
POLICY = PollPolicy(read_timeout=0.2, retries=1, retry_base=0.002, reopen_after=2, fault_after=3, max_backoff=0.5)
SOIL = {"channel": 0, "unit": "%", "raw_min": 850, "raw_max": 400, "min": 0.0, "max": 100.0}
BUSY_LIMIT = 10.0  # real seconds the device threads get to finish what they are doing


# -- virtual time ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One driver call (open or read) submitted to a device thread."""

    poller: asyncio.Task[Any]
    future: concurrent.futures.Future[object] | None = None
    wake_at: float | None = None  # set while the call spends its READ_COST
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class TimedWait:
    """A poller inside `VirtualTime.timeout`."""

    deadline: float
    expiry: asyncio.Timeout
    job: Job | None  # the driver call it awaits; None for close(), which runs on the loop's pool
    expired: bool = False


class VirtualTime:
    """The pollers' Clock. Time moves only in `advance()`; the rest is what the rig needs to know
    that every poller is waiting for it."""

    def __init__(self) -> None:
        self._now = 0.0
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self.changed = asyncio.Event()  # a poller or a driver call began or stopped waiting
        self.sleeping: dict[asyncio.Task[Any], tuple[float, asyncio.Future[None]]] = {}
        self.timed: dict[asyncio.Task[Any], TimedWait] = {}
        self.jobs: list[Job] = []
        self._unclaimed: dict[asyncio.Task[Any], Job] = {}

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        task = current_task()
        wake = self._loop.create_future()
        self.sleeping[task] = (self._now + max(seconds, 0.0), wake)
        self.changed.set()
        try:
            await wake
        finally:
            self.sleeping.pop(task, None)

    @contextlib.asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[None]:
        task = current_task()
        # asyncio's own Timeout, expired by advance(): cancellation behaves exactly as in production.
        async with asyncio.timeout(None) as expiry:
            # The poller submits a driver call just before it waits for it, and submits nothing
            # before waiting for close().
            self.timed[task] = TimedWait(self._now + seconds, expiry, self._unclaimed.pop(task, None))
            self.changed.set()
            try:
                yield
            finally:
                del self.timed[task]
                self.changed.set()

    def submitted(self, job: Job) -> None:
        self._unclaimed[job.poller] = job
        self.jobs.append(job)

    def spend(self, job: Job, seconds: float) -> None:
        """On a device thread: return once `seconds` of virtual time have passed."""

        def start() -> None:
            job.wake_at = self._now + seconds
            self.changed.set()

        if self._stopped or not self.notify_threadsafe(start):
            return  # the test is over
        job.wake.wait(BUSY_LIMIT)

    def notify_threadsafe(self, callback: Callable[[], None] | None = None) -> bool:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(callback or self.changed.set)
            return True
        return False

    def advance(self) -> None:
        """Jump to the next moment something is due, and wake whatever is due then."""
        due = [at for at, _ in self.sleeping.values()]
        due += [wait.deadline for wait in self.timed.values() if not wait.expired]
        due += [job.wake_at for job in self.jobs if job.wake_at is not None]
        if not due:
            raise AssertionError("nothing will ever happen: no poller or driver call waits for time")
        self._now = max(self._now, min(due))
        for task, (at, wake) in list(self.sleeping.items()):
            if at <= self._now:
                del self.sleeping[task]
                if not wake.done():
                    wake.set_result(None)
        for wait in self.timed.values():
            if not wait.expired and wait.deadline <= self._now:
                wait.expired = True
                wait.expiry.reschedule(self._loop.time())  # raises TimeoutError in the poller at once
        for job in self.jobs:
            if job.wake_at is not None and job.wake_at <= self._now:
                job.wake_at = None
                job.wake.set()

    def stop(self) -> None:
        """Let every driver call still spending virtual time return."""
        self._stopped = True
        for job in self.jobs:
            job.wake.set()


def current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None
    return task


class TimedDeviceThread(DeviceThread):
    """The poller's device thread, with every driver call tracked and taking READ_COST."""

    def __init__(self, name: str, clock: VirtualTime) -> None:
        super().__init__(name)
        self._clock = clock

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future[object]:
        job = Job(current_task())

        def call() -> object:
            try:
                return fn()
            finally:
                self._clock.spend(job, READ_COST)

        job.future = super().submit(call)
        # Called once the future is done, exactly when the poller sees it done: never too early.
        job.future.add_done_callback(lambda _: self._clock.notify_threadsafe())
        self._clock.submitted(job)
        return job.future


class _NotifyingEvent(threading.Event):
    def __init__(self, notify: Callable[[], object]) -> None:
        super().__init__()
        self._notify = notify

    def set(self) -> None:
        super().set()
        self._notify()


class VirtualFaults(FaultInjector):
    """The rig's FaultInjector: failures are stamped in virtual time, and a transfer stopping at
    the gate of a stuck bus tells the rig, which then counts its poller as waiting for time."""

    def __init__(self, clock: VirtualTime) -> None:
        super().__init__()
        self._clock = clock
        self.blocked = _NotifyingEvent(clock.notify_threadsafe)
        self.stuck = False

    def stick(self) -> None:
        self.stuck = True
        super().stick()

    def release(self) -> None:
        self.stuck = False
        super().release()

    def check(self) -> None:
        failures = len(self.failed_at)
        try:
            super().check()
        except OSError:
            if len(self.failed_at) > failures:
                self.failed_at[-1] = self._clock.now()  # the injector stamps the real clock
            raise


# -- the rig --------------------------------------------------------------------------------------


@dataclass
class Device:
    poller: DevicePoller
    faults: VirtualFaults
    task: asyncio.Task[None] | None = None
    samples: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)  # (virtual time, ts, sample)
    states: list[tuple[str, str | None]] = field(default_factory=list)
    state_changed_at: list[float] = field(default_factory=list)  # virtual time of each entry in `states`

    @property
    def name(self) -> str:
        return self.poller.driver.device_id

    @property
    def running(self) -> asyncio.Task[None]:
        assert self.task is not None, "only inside Rig.running()"
        return self.task

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.samples]

    def samples_after(self, moment: float) -> int:
        return sum(1 for t in self.times if t > moment)


class Rig:
    """An MCP3008 on SPI, a BME280 and an SHT31 on two I2C adapters, one poller each, all on one
    VirtualTime that starts at 0, as do the pollers' schedules."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, policy: PollPolicy = POLICY) -> None:
        self.clock = VirtualTime()
        monkeypatch.setattr(sensor_reader.poller, "DeviceThread", lambda name: TimedDeviceThread(name, self.clock))
        self.adc = FakeMCP3008({0: 625})
        self.bme = FakeBME280()
        self.sht = FakeSHT31(temperature=21.5, humidity=40.0)
        self.bus_bme = FakeI2CBus({0x76: self.bme}, number=1)
        self.bus_sht = FakeI2CBus({0x44: self.sht}, number=3)
        self.adc.faults = VirtualFaults(self.clock)
        self.bus_bme.faults = VirtualFaults(self.clock)
        self.bus_sht.faults = VirtualFaults(self.clock)
        self.soil = self._device(
            MCP3008Driver(
                "soil",
                MCP3008Params.model_validate({"channels": {"soil_moisture": SOIL}}),
                spi_factory=self.adc.spidev,
            ),
            self.adc.faults,
            policy,
        )
        self.weather = self._device(
            BME280Driver("weather", BME280Params(bus=1, address=0x76), bus_factory=self.bus_bme.smbus),
            self.bus_bme.faults,
            policy,
        )
        self.climate = self._device(
            SHT31Driver(
                "climate",
                SHT31Params(bus=3, address=0x44, repeatability="low"),
                bus_factory=self.bus_sht.smbus,
            ),
            self.bus_sht.faults,
            policy,
        )
        self.devices = (self.soil, self.weather, self.climate)

    def _device(self, driver: Driver, faults: VirtualFaults, policy: PollPolicy) -> Device:
        device: Device

        def on_sample(ts: int, sample: Mapping[str, float]) -> None:
            device.samples.append((self.clock.now(), ts, dict(sample)))

        def on_state(state: str, reason: str | None) -> None:
            device.states.append((state, reason))
            device.state_changed_at.append(self.clock.now())

        poller = DevicePoller(
            driver,
            INTERVAL,
            on_sample,
            on_state,
            policy,
            wall_clock_ms=lambda: int(self.clock.now() * 1000),
            clock=self.clock,
        )
        device = Device(poller, faults)
        return device

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        tasks = []
        for device in self.devices:
            device.task = asyncio.create_task(device.poller.run(), name=device.name)
            device.task.add_done_callback(lambda _: self.clock.changed.set())
            tasks.append(device.task)
        try:
            yield
        finally:
            for device in self.devices:
                device.faults.release()  # a worker thread still stuck would outlive the test
            self.clock.stop()
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        assert not crashed, f"poller task ended with {crashed!r}"

    async def until(self, predicate: Callable[[], bool], what: str, within: float = 10.0) -> float:
        """Let virtual time run until `predicate` holds at a moment when every poller waits for
        time to pass; returns that moment."""
        give_up_at = self.clock.now() + within
        while True:
            await self._settle()
            if predicate():
                return self.clock.now()
            if self.clock.now() >= give_up_at:
                raise AssertionError(f"no {what} within {within}s of virtual time")
            self.clock.advance()

    async def _settle(self) -> None:
        """Wait (in real time, bounded) until every poller and driver call waits for virtual time."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + BUSY_LIMIT
        while True:
            self.clock.changed.clear()
            if self._settled():
                return
            if loop.time() >= give_up_at:
                raise AssertionError(f"pollers still busy after {BUSY_LIMIT}s of real time: {self._describe()}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(give_up_at - loop.time()):
                    await self.clock.changed.wait()

    def _settled(self) -> bool:
        for device in self.devices:
            if device.running.done():
                raise AssertionError(f"poller {device.name} stopped: {device.running!r}")
        self.clock.jobs[:] = [job for job in self.clock.jobs if job.future is None or not job.future.done()]
        return all(self._waits_for_time(device) for device in self.devices) and all(
            self._job_waits_for_time(job) for job in self.clock.jobs
        )

    def _waits_for_time(self, device: Device) -> bool:
        if device.running in self.clock.sleeping:
            return True
        wait = self.clock.timed.get(device.running)
        # close() on the loop's pool needs no time to pass; neither does a timeout already expired.
        return wait is not None and not wait.expired and wait.job is not None and self._job_waits_for_time(wait.job)

    def _job_waits_for_time(self, job: Job) -> bool:
        if job.future is None or job.future.done():
            return False  # its poller is about to resume
        if job.wake_at is not None:
            return True  # spending its READ_COST
        # Stopped at the gate of a stuck bus: one device thread, so this call is the one blocked.
        faults = next(device.faults for device in self.devices if device.task is job.poller)
        return faults.stuck and faults.blocked.is_set()

    def _describe(self) -> str:
        states = []
        for device in self.devices:
            if device.running in self.clock.sleeping:
                what = f"asleep until {self.clock.sleeping[device.running][0]:.4f}"
            elif (wait := self.clock.timed.get(device.running)) is not None:
                what = f"waiting for {'close()' if wait.job is None else 'a driver call'} until {wait.deadline:.4f}"
            else:
                what = "running"
            states.append(f"{device.name} {what}")
        return f"at {self.clock.now():.4f}: " + ", ".join(states)


def tick_and_phase(moment: float) -> tuple[int, float]:
    tick = math.floor(moment / INTERVAL + 1e-9)
    return tick, moment - tick * INTERVAL


def assert_on_grid(device: Device) -> list[int]:
    """Every sample sits on the drift-free grid `k * INTERVAL`: in the first half of its tick, where
    the poll's one to three driver calls put it (a loop that slept `interval` after each poll would
    slide READ_COST further every tick), and no two share a tick. Returns their ticks."""
    ticks, phases = zip(*map(tick_and_phase, device.times), strict=True)
    assert all(0 < phase < INTERVAL / 2 for phase in phases), f"samples drift off the grid: {phases}"
    assert all(a < b for a, b in itertools.pairwise(ticks)), f"{device.name}: ticks bunched up: {ticks}"
    return list(ticks)


def assert_on_schedule(device: Device, max_gap: float) -> None:
    """Samples sit on the drift-free grid, none is late by `max_gap`, and no tick was lost over the
    whole run."""
    times = device.times
    assert len(times) >= 10
    ticks = assert_on_grid(device)
    missed = sorted(set(range(ticks[0], ticks[-1] + 1)) - set(ticks))
    assert not missed, f"{device.name} has no sample in ticks {missed}"
    assert device.poller.stats.skipped_ticks == 0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < max_gap, f"{device.name} stalled for {max(gaps):.3f}s"
    stamps = [ts for _, ts, _ in device.samples]
    assert stamps == sorted(stamps)


# -------------------------------------------------------------------------------------------------


async def test_dead_device_faults_and_backs_off_while_the_others_stay_on_schedule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(monkeypatch)
    rig.bus_bme.faults.fail(times=None)  # every transfer on the BME280's bus fails, from the start
    attempts = rig.bus_bme.faults.failed_at  # each failed poll is one failed open (chip id read)
    soil, weather, climate = rig.soil, rig.weather, rig.climate
    async with rig.running():
        await rig.until(
            lambda: len(soil.samples) >= 40 and len(climate.samples) >= 40 and weather.poller.stats.errors["bus"] >= 9,
            "40 healthy samples each and 9 failed polls of the dead device",
        )

    for healthy in (soil, climate):
        assert healthy.states == [("online", None)]
        assert_on_schedule(healthy, max_gap=POLICY.read_timeout / 2)
        assert healthy.poller.stats.errors == {}
    assert soil.samples[0][2] == {"soil_moisture": pytest.approx(50.0)}
    assert climate.samples[0][2] == {
        "temperature": pytest.approx(21.5, abs=0.01),
        "humidity": pytest.approx(40.0, abs=0.01),
    }

    [(state, reason)] = weather.states
    assert state == "fault"
    assert reason is not None
    assert reason.startswith("bus: read chip id at 0x76 on /dev/i2c-1: ")
    assert "Remote I/O error" in reason
    stats = weather.poller.stats
    assert weather.samples == [] and stats.reads == 0
    assert stats.errors == {"bus": len(attempts)}
    assert stats.reopens >= 2 and stats.reopens == stats.errors["bus"] // POLICY.reopen_after
    # Backoff, on the grid of the original schedule: one tick apart until the device is faulted
    # (fault_after polls), then the interval doubles from two ticks up to max_backoff (25 ticks).
    assert attempts == pytest.approx([round(t / INTERVAL) * INTERVAL for t in attempts], abs=1e-9)
    assert [round((b - a) / INTERVAL) for a, b in itertools.pairwise(attempts)] == [1, 1, 2, 4, 8, 16, 25, 25]
    assert len(soil.samples) >= 80  # while the dead device was polled 9 times


async def test_stuck_bus_times_out_without_delaying_the_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(monkeypatch)
    soil, weather, climate = rig.soil, rig.weather, rig.climate
    async with rig.running():
        stuck_at = await rig.until(lambda: min(len(d.samples) for d in (soil, weather, climate)) >= 5, "5 samples each")
        rig.bus_sht.faults.stick()  # the next SHT31 transfer blocks until released
        await rig.until(lambda: climate.poller.state == "fault", "the stuck device to fault")
        assert rig.bus_sht.faults.blocked.is_set()
        # Keep it stuck for well over two read timeouts while the others keep sampling.
        released_at = await rig.until(lambda: soil.samples_after(stuck_at) >= 25, "25 soil samples while stuck")
        rig.bus_sht.faults.release()
        recovered_at = await rig.until(
            lambda: climate.poller.state == "online" and climate.samples_after(released_at) >= 3,
            "the stuck device to come back",
        )

    for healthy in (soil, weather):
        assert healthy.states == [("online", None)]
        assert_on_schedule(healthy, max_gap=POLICY.read_timeout / 2)
        stuck_window = released_at - stuck_at
        assert healthy.samples_after(stuck_at) - healthy.samples_after(released_at) >= int(stuck_window / INTERVAL)

    assert [s for s, _ in climate.states] == ["online", "fault", "online"]
    reason = climate.states[1][1]
    assert reason is not None and reason.startswith("timeout: ")
    stats = climate.poller.stats
    assert stats.errors["timeout"] >= POLICY.fault_after
    assert stats.reopens >= 1
    # The hung poll (the first tick after stuck_at) overran by a read timeout. The ticks it overran
    # were skipped, not caught up in a burst: the failed polls after it came a tick apart, so the
    # fault (fault_after failed polls) was declared at least fault_after - 2 ticks after the timeout
    # (-2: when the timeout ends exactly on a tick, that tick is polled at once). And every sample,
    # before and after, sits on the grid, one per tick.
    timed_out_at = (tick_and_phase(stuck_at)[0] + 1) * INTERVAL + POLICY.read_timeout
    fault_at = climate.state_changed_at[1]
    assert fault_at - timed_out_at >= (POLICY.fault_after - 2) * INTERVAL - 1e-9
    assert stats.skipped_ticks >= round(POLICY.read_timeout / INTERVAL) - 1
    assert_on_grid(climate)
    before = [t for t in climate.times if t < stuck_at]
    after = [t for t in climate.times if t > released_at]
    assert after[0] - before[-1] >= POLICY.read_timeout
    # Faulted, it polls at most one capped backoff after the release; the sample follows within the tick.
    assert after[0] - released_at <= POLICY.max_backoff + INTERVAL / 2
    assert recovered_at - released_at <= POLICY.max_backoff + 3 * INTERVAL
    assert climate.samples[-1][2]["temperature"] == pytest.approx(21.5, abs=0.01)


async def test_transient_error_is_retried_and_a_dead_device_recovers_by_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(monkeypatch)
    weather = rig.weather
    async with rig.running():
        await rig.until(lambda: len(weather.samples) >= 5, "5 weather samples")
        rig.bus_bme.faults.fail(times=1)  # one NACK: the retry inside the same poll absorbs it
        await rig.until(
            lambda: weather.poller.stats.errors["bus"] == 1 and len(weather.samples) >= 15,
            "one bus error and 15 samples",
        )
        assert weather.states == [("online", None)]
        assert_on_schedule(weather, max_gap=2 * INTERVAL)  # the retried poll still made its tick

        rig.bus_bme.faults.fail(times=None)
        cleared_at = await rig.until(lambda: weather.poller.state == "fault", "the device to fault")
        rig.bus_bme.faults.clear()
        await rig.until(
            lambda: weather.poller.state == "online" and weather.samples_after(cleared_at) >= 5,
            "the device to recover",
        )

    assert [s for s, _ in weather.states] == ["online", "fault", "online"]
    fault_reason = weather.states[1][1]
    assert fault_reason is not None and fault_reason.startswith("bus: ") and "Remote I/O error" in fault_reason
    assert weather.poller.stats.reopens >= 1
    first_back = next(t for t in weather.times if t > cleared_at)
    # Bounded by the backoff cap: the next poll is at most max_backoff away, its sample within the tick.
    assert first_back - cleared_at <= POLICY.max_backoff + INTERVAL / 2
    back = weather.samples[-1][2]
    assert back["temperature"] == pytest.approx(25.08, abs=0.005)
    assert back["pressure"] == pytest.approx(1006.53, abs=0.01)
    assert_on_schedule(rig.soil, max_gap=POLICY.read_timeout / 2)


async def test_checksum_and_implausible_values_are_counted_and_never_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(monkeypatch, policy=replace(POLICY, fault_after=5))
    soil, climate = rig.soil, rig.climate
    async with rig.running():
        await rig.until(lambda: len(climate.samples) >= 5 and len(soil.samples) >= 5, "5 samples each")
        rig.sht.corrupt_next(2, "temperature")
        rig.sht.corrupt_next(1, "humidity")
        rig.adc.set(0, 1023)  # probe pulled off: the rail value is implausible
        await rig.until(lambda: soil.poller.stats.errors["implausible"] >= 2, "two implausible soil reads")
        rig.adc.set(0, 625)
        await rig.until(
            lambda: climate.poller.stats.errors["checksum"] == 3 and len(climate.samples) >= 20,
            "three checksum errors and 20 good samples",
        )
        assert climate.states == [("online", None)]  # 3 consecutive drops stay below fault_after

        rig.sht.corrupt_next(1000)
        await rig.until(lambda: climate.poller.state == "fault", "persistent CRC errors to fault the device")

    stats = climate.poller.stats
    assert stats.errors["checksum"] >= 3 + 5
    assert set(stats.errors) == {"checksum"}
    assert stats.reopens == 0  # the bus works; reopening it would not fix the data
    assert stats.reads == len(climate.samples)
    reason = climate.states[-1][1]
    assert reason is not None and reason.startswith("checksum: temperature word")
    # A corrupted word decodes 0.68 degC / 0.39 %RH off; none of those got through.
    for _, _, sample in climate.samples:
        assert sample == {
            "temperature": pytest.approx(21.5, abs=0.01),
            "humidity": pytest.approx(40.0, abs=0.01),
        }

    assert soil.poller.stats.reads == len(soil.samples)
    assert set(soil.poller.stats.errors) == {"implausible"}
    assert all(sample["soil_moisture"] == pytest.approx(50.0) for _, _, sample in soil.samples)
    assert soil.states == [("online", None)]
