"""DevicePoller under bus faults: real drivers on byte-exact fake buses, three devices at once.

Each test runs the pollers as asyncio tasks, injects a fault into one device's bus, waits for what
the pollers report (samples, state changes) and checks that the faulty device is handled -- retried,
reopened, faulted, recovered -- while the healthy devices keep sampling on their schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace

import pytest
from fakes.i2c import FakeBME280, FakeI2CBus, FakeSHT31
from fakes.spi import FakeMCP3008
from sensor_reader.drivers import Driver
from sensor_reader.drivers.i2c import BME280Driver, BME280Params, SHT31Driver, SHT31Params
from sensor_reader.drivers.spi import MCP3008Driver, MCP3008Params
from sensor_reader.poller import DevicePoller, PollPolicy

INTERVAL = 0.02
POLICY = PollPolicy(read_timeout=0.2, retries=1, retry_base=0.002, reopen_after=2, fault_after=3, max_backoff=0.5)
SOIL = {"channel": 0, "unit": "%", "raw_min": 850, "raw_max": 400, "min": 0.0, "max": 100.0}


@dataclass
class Device:
    poller: DevicePoller
    samples: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)  # (monotonic, ts, sample)
    states: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.samples]

    def samples_after(self, moment: float) -> int:
        return sum(1 for t in self.times if t > moment)


class Rig:
    """An MCP3008 on SPI, a BME280 and an SHT31 on two I2C adapters, one poller each."""

    def __init__(self, policy: PollPolicy = POLICY) -> None:
        self.adc = FakeMCP3008({0: 625})
        self.bme = FakeBME280()
        self.sht = FakeSHT31(temperature=21.5, humidity=40.0)
        self.bus_bme = FakeI2CBus({0x76: self.bme}, number=1)
        self.bus_sht = FakeI2CBus({0x44: self.sht}, number=3)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.soil = self._device(
            MCP3008Driver(
                "soil",
                MCP3008Params.model_validate({"channels": {"soil_moisture": SOIL}}),
                spi_factory=self.adc.spidev,
            ),
            policy,
        )
        self.weather = self._device(
            BME280Driver("weather", BME280Params(bus=1, address=0x76), bus_factory=self.bus_bme.smbus), policy
        )
        self.climate = self._device(
            SHT31Driver(
                "climate",
                SHT31Params(bus=3, address=0x44, repeatability="low"),
                bus_factory=self.bus_sht.smbus,
            ),
            policy,
        )

    def _device(self, driver: Driver, policy: PollPolicy) -> Device:
        device: Device

        def on_sample(ts: int, sample: Mapping[str, float]) -> None:
            device.samples.append((time.monotonic(), ts, dict(sample)))
            self._changed.set()

        def on_state(state: str, reason: str | None) -> None:
            device.states.append((state, reason))
            self._changed.set()

        device = Device(DevicePoller(driver, INTERVAL, on_sample, on_state, policy))
        return device

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        devices = (self.soil, self.weather, self.climate)
        self._tasks = [asyncio.create_task(d.poller.run(), name=d.poller.driver.device_id) for d in devices]
        try:
            yield
        finally:
            for faults in (self.adc.faults, self.bus_bme.faults, self.bus_sht.faults):
                faults.release()  # a worker thread still stuck would outlive the test
            for task in self._tasks:
                task.cancel()
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
        crashed = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        assert not crashed, f"poller task ended with {crashed!r}"

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
        """Wait until `predicate` holds, re-checking whenever any poller reports; returns the time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            for task in self._tasks:
                if task.done():
                    raise AssertionError(f"poller {task.get_name()} stopped: {task!r}")
            if loop.time() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        return time.monotonic()


def assert_on_schedule(device: Device, max_gap: float) -> None:
    """Samples sit on the drift-free grid `start + k * INTERVAL`, none is late by `max_gap`, and no
    tick was lost over the whole run."""
    times = device.times
    assert len(times) >= 10
    # Each sample's phase within the interval, as an angle; on a drift-free schedule they cluster
    # (every read takes about as long), while a loop that sleeps `interval` after each read slides
    # through every phase. Circular statistics, so that a cluster at the wrap-around still counts.
    angles = [2 * math.pi * (t % INTERVAL) / INTERVAL for t in times]
    centre = math.atan2(sum(map(math.sin, angles)), sum(map(math.cos, angles)))
    off_centre = sorted(abs(math.remainder(a - centre, 2 * math.pi)) * INTERVAL / (2 * math.pi) for a in angles)
    assert off_centre[int(0.8 * len(off_centre))] < INTERVAL / 4, f"samples drift off the grid: {off_centre}"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < max_gap, f"{device.poller.driver.device_id} stalled for {max(gaps):.3f}s"
    expected = (times[-1] - times[0]) / INTERVAL + 1
    assert len(times) >= 0.9 * expected, f"{len(times)} samples where {expected:.0f} ticks passed"
    stamps = [ts for _, ts, _ in device.samples]
    assert stamps == sorted(stamps)


# -------------------------------------------------------------------------------------------------


async def test_dead_device_faults_and_backs_off_while_the_others_stay_on_schedule() -> None:
    rig = Rig()
    rig.bus_bme.faults.fail(times=None)  # every transfer on the BME280's bus fails, from the start
    soil, weather, climate = rig.soil, rig.weather, rig.climate
    async with rig.running():
        await rig.until(
            lambda: len(soil.samples) >= 40 and len(climate.samples) >= 40 and weather.poller.state == "fault",
            "40 healthy samples each and the dead device in fault",
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
    attempts = rig.bus_bme.faults.failed_at  # each failed poll is one failed open (chip id read)
    assert len(attempts) - 1 <= stats.errors["bus"] <= len(attempts)
    assert set(stats.errors) == {"bus"}
    assert stats.reopens >= 2 and stats.reopens == stats.errors["bus"] // POLICY.reopen_after
    # Backoff: 40 ticks passed, but the dead device was polled far less often, ever more slowly.
    assert len(attempts) <= 10
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] < 2 * INTERVAL
    assert gaps[-1] >= 4 * INTERVAL
    assert gaps[-1] > 3 * gaps[0]


async def test_stuck_bus_times_out_without_delaying_the_other_devices() -> None:
    rig = Rig()
    soil, weather, climate = rig.soil, rig.weather, rig.climate
    async with rig.running():
        await rig.until(lambda: min(len(d.samples) for d in (soil, weather, climate)) >= 5, "5 samples each")
        stuck_at = time.monotonic()
        rig.bus_sht.faults.stick()  # the next SHT31 transfer blocks until released
        await rig.until(lambda: climate.poller.state == "fault", "the stuck device to fault")
        assert rig.bus_sht.faults.blocked.is_set()
        # Keep it stuck for well over two read timeouts while the others keep sampling.
        await rig.until(lambda: soil.samples_after(stuck_at) >= 25, "25 soil samples while stuck")
        released_at = time.monotonic()
        rig.bus_sht.faults.release()
        recovered_at = await rig.until(
            lambda: climate.poller.state == "online" and climate.samples_after(released_at) >= 3,
            "the stuck device to come back",
        )

    for healthy in (soil, weather):
        assert healthy.states == [("online", None)]
        assert_on_schedule(healthy, max_gap=POLICY.read_timeout / 2)
        stuck_window = released_at - stuck_at
        assert healthy.samples_after(stuck_at) - healthy.samples_after(released_at) >= 0.8 * stuck_window / INTERVAL

    assert [s for s, _ in climate.states] == ["online", "fault", "online"]
    reason = climate.states[1][1]
    assert reason is not None and reason.startswith("timeout: ")
    stats = climate.poller.stats
    assert stats.errors["timeout"] >= POLICY.fault_after
    assert stats.reopens >= 1
    before = [t for t in climate.times if t < stuck_at]
    after = [t for t in climate.times if t > released_at]
    assert after[0] - before[-1] >= POLICY.read_timeout
    assert after[0] - released_at <= POLICY.max_backoff + 0.2
    assert recovered_at - released_at < 2.0
    assert climate.samples[-1][2]["temperature"] == pytest.approx(21.5, abs=0.01)


async def test_transient_error_is_retried_and_a_dead_device_recovers_by_itself() -> None:
    rig = Rig()
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
        await rig.until(lambda: weather.poller.state == "fault", "the device to fault")
        cleared_at = time.monotonic()
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
    assert first_back - cleared_at <= POLICY.max_backoff + 0.2  # bounded by the backoff cap
    back = weather.samples[-1][2]
    assert back["temperature"] == pytest.approx(25.08, abs=0.005)
    assert back["pressure"] == pytest.approx(1006.53, abs=0.01)
    assert_on_schedule(rig.soil, max_gap=POLICY.read_timeout / 2)


async def test_checksum_and_implausible_values_are_counted_and_never_delivered() -> None:
    rig = Rig(policy=replace(POLICY, fault_after=5))
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
