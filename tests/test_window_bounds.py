"""Window times within a clock-skew bound, and aggregates that stay numbers (issue 10, cases 5 and 6).

Case 5: a window dated years ahead pinned Redis `latest` for its sensor for good (the cache-writer
only moves `latest` forward). Every service that consumes windows (the preprocessor raw ones; the
cache-writer, cloud-forwarder and monitor processed ones, which any key holder could publish)
refuses a window outside iotpipe.WindowBounds of its own clock, alone: counted by reason, logged,
dead-lettered, while the other windows of the message (other devices') go through.

Case 6: readings of 1.7e308 made the preprocessor publish `null` aggregates (numpy overflowed to
inf), so every consumer refused the whole processed message, other devices' windows with it.

The services run as subprocesses on the real broker and Redis, with the shipped bounds (the suite's
`IOTPIPE_WINDOW_MAX_AGE` override, for its 1970-dated windows, is removed here).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe import (
    MAX_WINDOW_MS,
    ConfigError,
    KeyRing,
    MalformedEnvelope,
    Opener,
    PlainMessage,
    Processed,
    RawBatch,
    SchemaError,
    Sealer,
    ServiceSettings,
    Topics,
    WindowBounds,
    decode,
)
from preprocessor.service import process
from preprocessor.windows import FIELDS, SAFE_EXPONENT, aggregate, aggregate_array, round_aggregates
from servers import (
    TAP,
    WINDOW_MAX_AGE,
    Stack,
    bus_for,
    free_port,
    service_counters,
    service_env,
    spawn,
    stop_all,
    wait_online,
    wait_until,
)
from window_reference import mirrored

DAY_MS = 24 * 3600 * 1000
YEAR_MS = 365 * DAY_MS
# What the shipped settings allow (IOTPIPE_WINDOW_MAX_SKEW, IOTPIPE_WINDOW_MAX_AGE unset).
SKEW_MS = 60_000
MAX_AGE_MS = 2 * 7 * DAY_MS + DAY_MS
HUGE = 1.7e308


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the rule ---------------------------------------------------------------------------------------
def processed(*spans: tuple[int, int], device: str = "d1") -> Processed:
    windows = [
        {"device": device, "sensor": "temp", "unit": "degC", "start": s, "end": e, "n": 1,
         "mean": 1.0, "median": 1.0, "min": 1.0, "max": 1.0, "std": 0.0}
        for s, e in spans
    ]  # fmt: skip
    return decode(orjson.dumps({"windows": windows}), Processed)


def test_bounds_at_their_edges() -> None:
    bounds = WindowBounds(max_skew_ms=SKEW_MS, max_age_ms=MAX_AGE_MS)
    now = 1_800_000_000_000
    cases = {
        (now - MAX_AGE_MS, now - MAX_AGE_MS + 1000): None,  # as old as allowed
        (now - MAX_AGE_MS - 1, now - MAX_AGE_MS + 999): "window_too_old",
        (now + SKEW_MS, now + SKEW_MS + 1000): None,  # as far ahead as another host's clock may be
        (now + SKEW_MS + 1, now + SKEW_MS + 1001): "window_future",
        (now, now + SKEW_MS + MAX_WINDOW_MS): None,  # the longest window, closed early at a reader's stop
        (now, now + SKEW_MS + MAX_WINDOW_MS + 1): "window_future",  # a window stretched into the future
        (now + 10 * YEAR_MS, now + 10 * YEAR_MS + 1000): "window_future",
        (0, 1000): "window_too_old",
    }
    batch = processed(*cases)
    want = [(i, reason) for i, reason in enumerate(cases.values()) if reason]
    assert bounds.refused(batch.windows, now) == want
    kept, refused = batch.within(bounds, now)
    assert refused == want
    assert kept is not None and [w.span for w in kept.windows] == [s for s, r in cases.items() if r is None]
    # Nothing left: None, so the message is acknowledged without reaching the handler.
    assert processed((0, 1000)).within(bounds, now) == (None, [(0, "window_too_old")])
    # The same rule for raw windows (start + size).
    raw = decode(
        orjson.dumps(
            {"windows": [raw_window("d1", now + 10 * YEAR_MS, {"t": [1.0]}), raw_window("d1", now, {"t": [1.0]})]}
        ),
        RawBatch,
    )
    kept_raw, refused_raw = raw.within(bounds, now + 5000)
    assert refused_raw == [(0, "window_future")] and kept_raw is not None and kept_raw.windows == raw.windows[1:]
    assert bounds.explain(raw.windows[0], now) == (
        f"starts +{10 * YEAR_MS // 1000} s and ends +{10 * YEAR_MS // 1000 + 1} s from this host's clock "
        "(at most +60 s and +3660 s)"
    )
    assert bounds.explain(processed((0, 1000)).windows[0], now) == (
        f"starts {-now // 1000:+d} s from this host's clock (at least {-MAX_AGE_MS // 1000:+d} s)"
    )


def test_settings_bound_the_past_by_the_message_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """The past bound follows the durability promise: a window may wait one message TTL as raw and
    one as processed, so by default it is two TTLs and a day, and it cannot be set below two TTLs."""
    for name in ("IOTPIPE_MESSAGE_TTL", "IOTPIPE_WINDOW_MAX_SKEW", WINDOW_MAX_AGE):
        monkeypatch.delenv(name, raising=False)
    assert ServiceSettings.load().window_bounds == WindowBounds(max_skew_ms=SKEW_MS, max_age_ms=MAX_AGE_MS)
    monkeypatch.setenv("IOTPIPE_MESSAGE_TTL", str(30 * 24 * 3600))  # an operator riding out a month
    assert ServiceSettings.load().window_bounds.max_age_ms == 61 * DAY_MS
    monkeypatch.setenv("IOTPIPE_WINDOW_MAX_SKEW", "5")
    monkeypatch.setenv(WINDOW_MAX_AGE, str(90 * 24 * 3600))
    assert ServiceSettings.load().window_bounds == WindowBounds(max_skew_ms=5000, max_age_ms=90 * DAY_MS)
    monkeypatch.setenv(WINDOW_MAX_AGE, str(59 * 24 * 3600))
    with pytest.raises(ConfigError, match=f"{WINDOW_MAX_AGE}: .*at least twice IOTPIPE_MESSAGE_TTL"):
        ServiceSettings.load()


# -- helpers for the services ---------------------------------------------------------------------
def raw_window(device: str, start: int, series: dict[str, list[float]], size: int = 1000) -> dict[str, Any]:
    return {
        "device": device,
        "window": {"start": start, "size": size},
        "sensors": {
            sensor: {"unit": "degC", "t": [start + i for i in range(len(v))], "v": v} for sensor, v in series.items()
        },
    }


def window(device: str, start: int, mean: float = 21.5, sensor: str = "temp") -> dict[str, Any]:
    return {"device": device, "sensor": sensor, "unit": "degC", "start": start, "end": start + 1000, "n": 3,
            "mean": mean, "median": mean, "min": mean - 1, "max": mean + 1, "std": 0.5}  # fmt: skip


def shipped_env(
    stack: Stack, base: str, workdir: Path, instance: str, sink_port: int | None = None, **extra: str
) -> dict[str, str]:
    """A service's environment with the shipped window bounds and a dead-letter file of its own."""
    env = service_env(stack, base, workdir, instance, sink_port, IOTPIPE_STATUS_INTERVAL="0.2", **extra)
    env["IOTPIPE_DEAD_LETTER_FILE"] = str(workdir / f"dead-{instance}.jsonl")
    del env[WINDOW_MAX_AGE]
    return env


def dead_letters(workdir: Path, instance: str) -> list[dict[str, Any]]:
    path = workdir / f"dead-{instance}.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def rejected(workdir: Path, service: str, instance: str) -> dict[str, float]:
    counters = service_counters(workdir, service, instance)
    return dict(counters.get("rejected", {}))


@pytest.fixture
async def redis_reader(stack: Stack, redis_reader_password: str) -> Any:
    client = aioredis.Redis(
        port=stack.ports.redis, username="reader", password=redis_reader_password, decode_responses=True
    )
    yield client
    await client.aclose()


class Services:
    """Spawned services, stopped (SIGTERM) at the end of the test."""

    def __init__(self, stack: Stack, base: str, workdir: Path) -> None:
        self.stack, self.base, self.workdir = stack, base, workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self, module: str, service: str, instance: str, **extra: str) -> None:
        self.procs.append(
            spawn(module, shipped_env(self.stack, self.base, self.workdir, instance, **extra), self.workdir)
        )
        await wait_online(self.stack, Topics(self.base).service_status(service, instance), timeout=60)

    def stop(self) -> None:
        stop_all(self.procs)


@pytest.fixture
def services(stack: Stack, base: str, tmp_path: Path) -> Iterator[Services]:
    running = Services(stack, base, tmp_path)
    yield running
    running.stop()


async def series(client: aioredis.Redis, base: str, device: str, sensor: str = "temp") -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in await client.zrange(f"{base}:series:{device}:{sensor}", 0, -1)]


# -- case 5: raw windows, through the preprocessor into Redis -------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_raw_windows_outside_the_clock_bounds_are_refused_and_latest_keeps_moving(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, services: Services, redis_reader: aioredis.Redis
) -> None:
    """One raw message holds a window dated 10 years ahead, one 30 days old, and genuine windows of
    the same device and another; then genuine windows follow. The preprocessor refuses exactly the
    two (counted by reason, dead-lettered naming them, logged once per reason), the genuine ones
    reach Redis, and `latest` follows the newest genuine window."""
    topics = Topics(base)
    await services.start("preprocessor", "preprocessor", "pp")
    await services.start("cache_writer", "cache-writer", "cw")
    reader = bus_for(stack, "sensor-reader", keyring=keyring)
    await reader.start()
    await reader.wait_connected()
    t0 = now_ms() // 1000 * 1000 - 10_000
    genuine = {"temp": [20.0, 21.0, 22.0]}
    try:
        await reader.publish_sealed(
            topics.raw("r1"),
            {
                "windows": [
                    raw_window("d1", t0 + 10 * YEAR_MS, {"temp": [99.0]}),
                    raw_window("d1", t0, genuine),
                    raw_window("d1", t0 - 30 * DAY_MS, {"temp": [-99.0]}),
                    raw_window("d2", t0, genuine),
                ]
            },
        )
        for i in (1, 2):
            await reader.publish_sealed(topics.raw("r1"), {"windows": [raw_window("d1", t0 + 1000 * i, genuine)]})
        # A second future window, in a message of its own: refused too, but not logged again.
        await reader.publish_sealed(topics.raw("r1"), {"windows": [raw_window("d3", t0 + YEAR_MS, genuine)]})
        await reader.publish_sealed(topics.raw("r1"), {"windows": [raw_window("d1", t0 + 3000, genuine)]})

        async def latest_is_newest() -> bool:
            return await redis_reader.hget(f"{base}:latest_start:d1", "temp") == str(t0 + 3000)

        await wait_until(latest_is_newest, 60, "`latest` of d1 at its newest genuine window")
        assert [w["start"] for w in await series(redis_reader, base, "d1")] == [t0 + 1000 * i for i in range(4)]
        assert [w["start"] for w in await series(redis_reader, base, "d2")] == [t0]
        assert not await redis_reader.exists(f"{base}:series:d3:temp")
        await wait_until(
            lambda: rejected(tmp_path, "preprocessor", "pp") == {"window_future": 2, "window_too_old": 1},
            30,
            "the preprocessor's refusals counted",
        )
        letters = dead_letters(tmp_path, "pp")
        assert [(d["reason"], d["windows"], d["topic"]) for d in letters] == [
            ("window_future", [0], topics.raw("r1")),
            ("window_too_old", [2], topics.raw("r1")),
            ("window_future", [0], topics.raw("r1")),
        ]
        assert all(d["src"] == "sensor-reader/test" and "ct" in orjson.loads(d["payload"]) for d in letters)
        assert letters[0]["error"].startswith("1 of 4 window(s) refused; window 0 (device d1) starts +315")
        assert letters[1]["error"].startswith("1 of 4 window(s) refused; window 2 (device d1) starts -259")
        assert rejected(tmp_path, "cache-writer", "cw") == {}
        log = (tmp_path / "preprocessor.out").read_text()
        assert log.count("(window_future)") == 1 and log.count("(window_too_old)") == 1, log
    finally:
        await reader.stop()


# -- case 5: forged processed windows, at every consumer ------------------------------------------
def forged_window(device: str, start: int, field: str, literal: str) -> str:
    """A processed window's JSON whose `field` is `literal` (null, 1e999, NaN...): what no encoder
    of ours writes, so it is put together as text."""
    good = window(device, start, sensor="hum")
    text = orjson.dumps(good).decode()
    forged = text.replace(f'"{field}":{orjson.dumps(good[field]).decode()}', f'"{field}":{literal}')
    assert forged != text
    return forged


NOT_NUMBERS = [("mean", "null", "schema"), ("mean", "1e999", "schema"), ("min", "-1e400", "schema"),
               ("std", "NaN", "malformed"), ("max", "Infinity", "malformed")]  # fmt: skip


@pytest.mark.parametrize(("field", "literal", "reason"), NOT_NUMBERS)
def test_aggregates_that_are_not_numbers_are_refused_on_decode(
    keyring: KeyRing, field: str, literal: str, reason: str
) -> None:
    """A processed window must carry numbers: a forged null, an overflowing literal, NaN or
    Infinity fails the whole (forged) message with a counted reason (this held before issue 10;
    the test keeps it so)."""
    topic = "iotpipe/v2/processed/forged"
    payload = (
        f'{{"windows": [{orjson.dumps(window("d1", 1000)).decode()}, {forged_window("d4", 1000, field, literal)}]}}'
    )
    sealed = Sealer(keyring, "preprocessor/forger").seal(topic, msgspec.Raw(payload.encode()))
    with pytest.raises((SchemaError, MalformedEnvelope)) as err:
        Opener(keyring).open(topic, sealed, Processed)
    assert err.value.reason == reason


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_forged_processed_windows_are_refused_by_every_consumer(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, services: Services, redis_reader: aioredis.Redis
) -> None:
    """A key holder publishes processed windows directly: a future one (of d1, and of dz, a device
    with nothing else), a far-past one and genuine ones in one message; then messages whose
    aggregates are not numbers; then a genuine window. The cache-writer, the cloud-forwarder and the
    monitor each refuse the dated windows alone and the non-numbers whole, counted by reason and
    dead-lettered; Redis, the cloud and the device statuses get exactly the genuine windows, and
    `latest` keeps moving."""
    topics = Topics(base)
    sink_port = free_port()
    services.procs.append(spawn("cloud_sink", shipped_env(stack, base, tmp_path, "sink", sink_port), tmp_path))
    await services.start("cache_writer", "cache-writer", "cw")
    await services.start("cloud_forwarder", "cloud-forwarder", "cf", sink_port=sink_port, IOTPIPE_BATCH_LINGER="0.1")
    await services.start("monitor", "monitor", "mon")
    statuses: dict[str, dict[str, Any]] = {}

    async def on_status(messages: Sequence[PlainMessage[Any]]) -> None:
        for m in messages:
            if m.payload:
                statuses[m.topic.rsplit("/", 1)[-1]] = orjson.loads(m.payload)

    watcher = bus_for(stack, TAP)
    watcher.subscribe(f"{topics.root}/status/device/+", on_status, sealed=False)
    await watcher.start()
    await asyncio.wait_for(watcher.subscribed.wait(), 10)
    forger = bus_for(stack, "preprocessor", keyring=keyring)
    await forger.start()
    await forger.wait_connected()
    t0 = now_ms() // 1000 * 1000 - 10_000
    topic = topics.processed("forged")

    async def at_cloud() -> list[str]:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{sink_port}/records") as r:
                # Windows only: an offline alert for d1 or d2 may follow if the test runs long.
                return sorted(record["id"] for record in await r.json() if record["type"] == "window")
        except aiohttp.ClientError:
            return []

    try:
        await forger.publish_sealed(
            topic,
            {
                "windows": [
                    window("d1", t0 + 10 * YEAR_MS, mean=99.0),
                    window("d1", t0),
                    window("d1", t0 - 30 * DAY_MS, mean=-99.0),
                    window("dz", t0 + 10 * YEAR_MS),
                    window("d2", t0),
                ]
            },
        )
        genuine = orjson.dumps(window("d3", t0, sensor="hum")).decode()
        for field, literal, _reason in NOT_NUMBERS:
            forged = forged_window("d4", t0, field, literal)
            await forger.publish_sealed(topic, msgspec.Raw(f'{{"windows": [{genuine}, {forged}]}}'.encode()))
        await forger.publish_sealed(topic, {"windows": [window("d1", t0 + 1000)]})

        async def latest_is_newest() -> bool:
            return await redis_reader.hget(f"{base}:latest_start:d1", "temp") == str(t0 + 1000)

        want_ids = sorted([f"d1/temp/{t0}", f"d1/temp/{t0 + 1000}", f"d2/temp/{t0}"])

        async def all_at_cloud() -> bool:
            return await at_cloud() == want_ids

        await wait_until(latest_is_newest, 60, "`latest` of d1 at its newest genuine window")
        await wait_until(all_at_cloud, 60, "the genuine windows at the cloud")
        await wait_until(lambda: {"d1", "d2"} <= set(statuses), 30, "the monitor's device statuses")
        assert [w["start"] for w in await series(redis_reader, base, "d1")] == [t0, t0 + 1000]
        assert not await redis_reader.exists(f"{base}:series:dz:temp", f"{base}:series:d3:hum", f"{base}:series:d4:hum")
        want = {"window_future": 2, "window_too_old": 1, "schema": 3, "malformed": 2}
        for service, instance in (("cache-writer", "cw"), ("cloud-forwarder", "cf"), ("monitor", "mon")):
            await wait_until(lambda: rejected(tmp_path, service, instance) == want, 30, f"{service}'s refusals")  # noqa: B023
            letters = dead_letters(tmp_path, instance)
            assert [(d["reason"], d.get("windows")) for d in letters] == [
                ("window_future", [0, 3]),
                ("window_too_old", [2]),
                *((reason, None) for _f, _l, reason in NOT_NUMBERS),
            ], service
        assert await at_cloud() == want_ids
        assert "dz" not in statuses  # the monitor never took dz for a live device
    finally:
        await forger.stop()
        await watcher.stop()


# -- case 6: finite but huge readings -------------------------------------------------------------
def filtered(values: Sequence[float], kernel: int) -> list[float]:
    """The contract's median filter (window_reference's mirrored edges); an odd kernel only selects."""
    half = kernel // 2
    return [
        statistics.median(values[mirrored(j, len(values))] for j in range(i - half, i + half + 1))
        for i in range(len(values))
    ]


def exact(values: Sequence[float]) -> dict[str, float]:
    """mean, median, min, max, std (population) of `values`, computed exactly in fractions, where
    nothing can overflow, and rounded once to the nearest double."""
    xs = [Fraction(v) for v in values]
    n = len(xs)
    mean = sum(xs) / n
    ordered = sorted(xs)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    var = sum((x - mean) ** 2 for x in xs) / n
    # sqrt(p/q) = sqrt(p * q * 4**k) / (q * 2**k): an integer square root with k bits to spare.
    root = Fraction(math.isqrt(var.numerator * var.denominator * 4**200), var.denominator * 2**200)
    return {"mean": float(mean), "median": float(median), "min": float(min(xs)), "max": float(max(xs)),
            "std": float(root)}  # fmt: skip


def assert_close(got: dict[str, float], want: dict[str, float], values: Sequence[float]) -> None:
    """Every aggregate finite and within a few ulps of the largest reading of the exact one (what a
    sum of a dozen doubles can be off by); min and max exactly."""
    tolerance = 1e-14 * max(abs(v) for v in values)
    for field in FIELDS:
        assert math.isfinite(got[field]), (field, values)
        assert abs(got[field] - want[field]) <= tolerance, (field, got[field], want[field], values)
    assert (got["min"], got["max"]) == (want["min"], want["max"])


DBL_MAX = sys.float_info.max
HUGE_SERIES = {
    "five_huge": [HUGE] * 5,
    "mixed_huge": [HUGE, -HUGE, HUGE, -HUGE, HUGE],
    "max_even": [DBL_MAX] * 4,
    "max_alternating": [DBL_MAX, -DBL_MAX] * 3,
    "huge_and_small": [HUGE, 1e-300, -HUGE, 2.5, 1e154, -1e200],
    "square_overflows": [1e200, -1e200, 1e200],  # deviations whose squares pass 1e308
}


@pytest.mark.parametrize("kernel", [1, 5])
@pytest.mark.parametrize("name", list(HUGE_SERIES))
def test_huge_readings_give_finite_aggregates(name: str, kernel: int) -> None:
    values = HUGE_SERIES[name]
    (got,) = aggregate([np.array(values)], kernel)
    assert_close(got, exact(filtered(values, kernel)), values)
    # And as published: rounded to 6 places, still numbers (np.round alone overflows near 1.8e308).
    (published,) = process([raw_batch_of({"s": values}).windows[0]], kernel)
    assert all(math.isfinite(getattr(published, f)) for f in FIELDS)
    assert [getattr(published, f) for f in FIELDS] == list(round_aggregates(np.array([got[f] for f in FIELDS]), 6))


def raw_batch_of(series: dict[str, list[float]]) -> RawBatch:
    return decode(orjson.dumps({"windows": [raw_window("d1", 1000, series)]}), RawBatch)


def test_aggregates_match_an_exact_reference_on_random_small_arrays() -> None:
    """Property check, 3,000 random series of 1 to 12 readings whose magnitudes span the whole double
    range (signs, repeats and the extremes included), through every kernel in use: each aggregate
    is finite and matches the exact computation."""
    rng = np.random.default_rng(20261129)
    extremes = np.array([DBL_MAX, HUGE, 1e308, 1e200, 1e154, 1.0, 0.0, 1e-300, 5e-324])
    for case in range(3000):
        n = int(rng.integers(1, 13))
        if case % 3 == 0:  # the extremes, with their signs
            values = rng.choice(extremes, n) * rng.choice([-1.0, 1.0], n)
        else:  # any magnitude, mantissa random
            values = rng.uniform(-1, 1, n) * 10.0 ** rng.integers(-300, 309, n).astype(float)
        values = [float(v) for v in values]
        kernel = int(rng.choice([1, 3, 5]))
        (got,) = aggregate([np.array(values)], kernel)
        assert_close(got, exact(filtered(values, kernel)), values)


def test_ordinary_readings_give_the_same_bits_as_before() -> None:
    """Scaling is by a power of two, which is exact: wherever numpy's direct results were finite,
    they are the same bits, for ordinary readings (not scaled) and for ones of 1e152 (scaled)."""
    rng = np.random.default_rng(5)
    series = [rng.normal(20, 2, size=n) for n in (1, 2, 5, 250, 250)] + [rng.normal(0, 1e152, size=7)]
    assert np.frexp(np.abs(series[-1]).max())[1] > SAFE_EXPONENT  # that row is scaled
    _counts, stats = aggregate_array(series, 1)
    for values, row in zip(series, stats, strict=True):
        assert list(row) == [values.mean(), np.median(values), values.min(), values.max(), values.std()]
    assert np.array_equal(round_aggregates(stats, 6), np.round(stats, 6))


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_huge_readings_reach_redis_as_numbers_with_their_neighbours(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, services: Services, redis_reader: aioredis.Redis
) -> None:
    """Five readings of 1.7e308, and +/-1.7e308 alternating, in one raw message with an ordinary
    device: the preprocessor publishes numbers (the exact aggregates, as far as a double holds
    them), so the consumers take the message and every window, the ordinary device's too, is in
    Redis. Before, the aggregates went out as null and the cache-writer refused the whole
    processed message."""
    topics = Topics(base)
    await services.start("preprocessor", "preprocessor", "pp")
    await services.start("cache_writer", "cache-writer", "cw")
    reader = bus_for(stack, "sensor-reader", keyring=keyring)
    await reader.start()
    await reader.wait_connected()
    t0 = now_ms() // 1000 * 1000 - 10_000
    huge = {"five": HUGE_SERIES["five_huge"], "mixed": HUGE_SERIES["mixed_huge"], "max": HUGE_SERIES["max_alternating"]}
    try:
        await reader.publish_sealed(
            topics.raw("r1"),
            {"windows": [raw_window("d1", t0, huge), raw_window("d2", t0, {"temp": [20.0, 21.0, 22.0]})]},
        )

        async def stored() -> bool:
            keys = [f"{base}:series:d1:{s}" for s in huge] + [f"{base}:series:d2:temp"]
            return await redis_reader.exists(*keys) == len(keys)

        await wait_until(stored, 60, "every window of the message in Redis")
        for sensor, values in huge.items():
            (got,) = await series(redis_reader, base, "d1", sensor)
            assert_close(got, exact(filtered(values, 5)), values)
        (ordinary,) = await series(redis_reader, base, "d2")
        assert {f: ordinary[f] for f in FIELDS} == exact(filtered([20.0, 21.0, 22.0], 5))
        assert rejected(tmp_path, "cache-writer", "cw") == {} and rejected(tmp_path, "preprocessor", "pp") == {}
    finally:
        await reader.stop()
