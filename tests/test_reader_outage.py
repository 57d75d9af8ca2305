"""sensor-reader when the broker is unreachable, through the real broker: the reader reaches it
through a TCP proxy the test cuts (every connection closed, new ones closed at once) and restores.

Every window is counted against what the reader closed (in-process: its own `_flush`; a reader
process: every window whose end lies well before the stop or kill): lost, duplicated (a second
copy with another seal; the same sealed message twice is a QoS 1 redelivery receivers drop,
counted apart), unexpected, and out of start order per device. The control runs (no spool) show
the same checks do see loss.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from iotpipe import Bus, KeyRing, Opener, PlainMessage, RawBatch, counter, serve
from sensor_reader.service import SensorReader, Settings
from servers import TAP, Stack, bus_for, service_env, spawn, unseal, wait_until

WINDOW_MS = 100
GRACE_MS = 20
DEVICES = """
[[devices]]
id = "d1"
driver = "simulated"
interval = 0.01
[devices.params]
dropout_probability = 0.0

[[devices]]
id = "d2"
driver = "simulated"
interval = 0.01
[devices.params]
dropout_probability = 0.0
sensors = ["temperature", "humidity", "pressure"]
"""

Key = tuple[str, int]  # (device, window start)


class Proxy:
    """TCP proxy to the broker. `cut()` closes every connection and closes new ones at once (the
    client sees the broker vanish, as in a network or broker outage); `hold_acks()` keeps passing
    the client's bytes to the broker but holds back the broker's (a broker that takes the messages
    and does not acknowledge them); `restore()` ends either."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = True
        self.port = 0
        self._answers = asyncio.Event()  # broker -> client bytes flow while set
        self._answers.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, self._answers))
        finally:
            self._links -= {writer, up_writer}

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event | None = None
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                if flowing is not None:
                    await flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        self.up = False
        for writer in list(self._links):
            writer.transport.abort()

    def hold_acks(self) -> None:
        self._answers.clear()

    def restore(self) -> None:
        self.up = True
        self._answers.set()

    async def close(self) -> None:
        self._answers.set()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Arrival:
    key: Key
    readings: int
    sealed: tuple[str, str, int]  # src, boot, seq


@dataclass
class RawWire:
    """Every raw window the broker delivers, opened (never committed to a replay guard, so a
    redelivery is seen, not dropped)."""

    keyring: KeyRing
    arrivals: list[Arrival] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.opener = Opener(self.keyring)

    async def handle(self, messages: Sequence[PlainMessage[Any]]) -> None:
        for m in messages:
            opened = self.opener.open(m.topic, m.payload, RawBatch)
            for window in opened.data.windows:
                readings = sum(len(s.v) for s in window.sensors.values())
                self.arrivals.append(
                    Arrival((window.device, window.window.start), readings, (opened.src, opened.boot, opened.seq))
                )

    def delivered(self) -> set[Key]:
        return {a.key for a in self.arrivals}

    def count(self, device: str, since_ms: int = 0) -> int:
        return len({a.key for a in self.arrivals if a.key[0] == device and a.key[1] >= since_ms})

    def audit(self, expected: set[Key]) -> dict[str, Any]:
        """Lost, duplicated (another seal), redelivered (same seal), unexpected, out of order."""
        first: dict[Key, tuple[str, str, int]] = {}
        duplicated, redelivered = [], []
        last_start: dict[str, int] = {}
        out_of_order = []
        for a in self.arrivals:
            if a.key in first:
                (redelivered if first[a.key] == a.sealed else duplicated).append(a.key)
                continue
            first[a.key] = a.sealed
            device, start = a.key
            if start <= last_start.get(device, -1):
                out_of_order.append(a.key)
            last_start[device] = start
        return {
            "lost": sorted(expected - first.keys()),
            "duplicated": duplicated,
            "redelivered": redelivered,
            "unexpected": sorted(first.keys() - expected),
            "out_of_order": out_of_order,
        }


@pytest.fixture
async def proxy(stack: Stack) -> AsyncIterator[Proxy]:
    p = Proxy(stack.ports.mqtt)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def wire(stack: Stack, keyring: KeyRing, base: str) -> AsyncIterator[RawWire]:
    raw = RawWire(keyring)
    watcher: Bus = bus_for(stack, TAP)
    watcher.subscribe(f"{base}/v2/raw/+", raw.handle, sealed=False)
    await watcher.start()
    await watcher.wait_connected()
    async with asyncio.timeout(15):
        await watcher.subscribed.wait()
    yield raw
    await watcher.stop()


def reader_env(stack: Stack, base: str, tmp_path: Path, proxy: Proxy, **extra: str) -> dict[str, str]:
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES)
    return service_env(
        stack,
        base,
        tmp_path,
        "outage",
        IOTPIPE_MQTT__PORT=str(proxy.port),
        IOTPIPE_DEVICES_FILE=str(devices),
        IOTPIPE_WINDOW_MS=str(WINDOW_MS),
        IOTPIPE_WINDOW_GRACE_MS=str(GRACE_MS),
        IOTPIPE_STATUS_INTERVAL="0.2",
        IOTPIPE_SPOOL_FILE=str(tmp_path / "spool" / "reader.sqlite3"),
        **extra,
    )


# -- the reader in this process: the test records every window it closes ----------------------


@contextlib.asynccontextmanager
async def reader_in_process(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Callable[[], SensorReader], list[tuple[Key, int]]]]:
    for key in [k for k in env if k.startswith("IOTPIPE_")]:
        monkeypatch.setenv(key, env[key])
    components: list[SensorReader] = []
    closed: list[tuple[Key, int]] = []  # every window the reader closed with readings in it

    def factory(runtime):  # type: ignore[no-untyped-def]
        reader = SensorReader(runtime)
        flush = reader._flush

        def recording_flush(windows):  # type: ignore[no-untyped-def]
            for window in windows:
                if window.readings:
                    closed.append(((window.device, window.start), window.readings))
            flush(windows)

        reader._flush = recording_flush  # type: ignore[method-assign]
        components.append(reader)
        return reader

    stop = asyncio.Event()
    task = asyncio.create_task(serve(Settings.load(), factory, stop))
    try:
        await wait_until(lambda: components or task.done(), 10, "the reader built")
        yield (lambda: components[0]), closed
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.mark.timeout(90)
async def test_outage_windows_are_spooled_then_all_delivered_in_order(
    stack: Stack, base: str, tmp_path: Path, proxy: Proxy, wire: RawWire, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small memory bound: most of the backlog waits on disk only and is loaded back in turns.
    env = reader_env(stack, base, tmp_path, proxy, IOTPIPE_MAX_PENDING_WINDOWS="4")
    async with reader_in_process(env, monkeypatch) as (get, closed):
        await wait_until(lambda: wire.count("d1") >= 3 and wire.count("d2") >= 3, 30, "windows flowing")
        reader = get()
        proxy.cut()
        await wait_until(lambda: reader.health()["spool"]["windows"] >= 30, 30, "30 windows spooled")
        spool = reader.health()["spool"]
        assert spool["in_memory"] <= 4 and spool["dropped"] == 0
        assert not reader.runtime.bus.connected.is_set()
        proxy.restore()
        await wait_until(
            lambda: reader.health()["spool"]["windows"] == 0 and {k for k, _ in closed} <= wire.delivered(),
            60,
            "the backlog delivered",
        )
    # Stopped: the windows still open were closed and published within the drain.
    expected = {k for k, _ in closed}
    await wait_until(lambda: expected <= wire.delivered(), 30, "the last windows delivered")
    audit = wire.audit(expected)
    assert audit["lost"] == [] and audit["duplicated"] == [] and audit["unexpected"] == [], audit
    assert audit["out_of_order"] == [], audit
    readings = {k: n for k, n in closed}
    assert all(a.readings == readings[a.key] for a in wire.arrivals)
    assert len(expected) >= 40
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / "reader.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM windows").fetchone() == (0,)


@pytest.mark.timeout(90)
async def test_a_tiny_spool_drops_the_oldest_counts_and_reports_them_and_keeps_the_newest(
    stack: Stack,
    base: str,
    tmp_path: Path,
    proxy: Proxy,
    wire: RawWire,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = 16 << 10  # about a dozen of these windows
    env = reader_env(stack, base, tmp_path, proxy, IOTPIPE_SPOOL_MAX_BYTES=str(budget), IOTPIPE_MAX_PENDING_WINDOWS="4")
    caplog.set_level(logging.WARNING, logger="sensor_reader.spool")
    async with reader_in_process(env, monkeypatch) as (get, closed):
        await wait_until(lambda: wire.count("d1") >= 3 and wire.count("d2") >= 3, 30, "windows flowing")
        reader = get()
        proxy.cut()
        peak: list[int] = []

        def dropped_enough() -> bool:
            peak.append(reader.health()["spool"]["bytes"])
            return bool(reader.health()["spool"]["dropped"] >= 20)

        await wait_until(dropped_enough, 30, "20 windows dropped")
        # The budget bounds the windows waiting their turn; the few handed to the client at the
        # cut (at most 4 here: IOTPIPE_MAX_PENDING_WINDOWS) come on top.
        assert max(peak) <= budget + 4 * 1500
        kept = reader.health()["spool"]["windows"]
        assert 5 <= kept <= budget // 1000
        proxy.restore()
        await wait_until(lambda: reader.health()["spool"]["windows"] == 0, 60, "the kept windows delivered")
        status = reader.health()["spool"]
        snapshot = reader.runtime.metrics.counters()
    expected = {k for k, _ in closed}
    await wait_until(lambda: len(wire.delivered()) >= len(expected) - status["dropped"], 30, "last windows delivered")
    audit = wire.audit(expected)
    assert audit["duplicated"] == [] and audit["unexpected"] == [] and audit["out_of_order"] == [], audit
    lost = set(audit["lost"])
    # Exactly what the reader says it dropped, counted by reason and in readings per device...
    assert len(lost) == status["dropped"] == counter(snapshot, "windows_dropped", "spool_full")
    readings = dict(closed)
    assert counter(snapshot, "readings_dropped") == sum(readings[k] for k in lost)
    # ... and it was the oldest: one run of consecutive windows in the order they closed, with
    # everything closed after it (the newest) delivered.
    order = [k for k, _ in closed]
    positions = sorted(order.index(k) for k in lost)
    assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert set(order[positions[-1] + 1 :]) <= wire.delivered()
    assert len(order) - positions[-1] - 1 >= 5
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "is full" in m]) == 1, said
    assert len([m for m in said if "has room again" in m]) == 1, said


# -- the reader as a process: stopped (SIGTERM) or killed (kill -9) during an outage ------------


def health(tmp_path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = orjson.loads((tmp_path / "health" / "sensor-reader-outage.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc


def spooled(path: Path, keyring: KeyRing) -> list[Key]:
    """The device windows in the spool's messages, in order."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:  # closed: an open connection keeps a lock
        payloads = [bytes(p) for (p,) in db.execute("SELECT payload FROM windows ORDER BY id")]
    return [(w["device"], w["window"]["start"]) for p in payloads for w in unseal(keyring, p)["data"]["windows"]]


def closed_before(first: dict[str, int], until_ms: int) -> set[Key]:
    """Every window of each device from its first delivered one whose end (plus grace and a wide
    margin for scheduling) lies before `until_ms`: closed, whatever happened next."""
    last = until_ms - WINDOW_MS - GRACE_MS - 300
    return {(d, s) for d, start in first.items() for s in range(start, last - WINDOW_MS + 1, WINDOW_MS)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
@pytest.mark.parametrize("spool", [True, False], ids=["spool", "control-no-spool"])
async def test_reader_stopped_or_killed_during_an_outage_delivers_every_closed_window_after_restart(
    stack: Stack, base: str, tmp_path: Path, proxy: Proxy, wire: RawWire, how: str, spool: bool
) -> None:
    env = reader_env(stack, base, tmp_path, proxy, **({} if spool else {"IOTPIPE_SPOOL_MAX_BYTES": "0"}))
    spool_file = Path(env["IOTPIPE_SPOOL_FILE"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(spawn("sensor_reader", env, tmp_path, "reader-1"))
        await wait_until(lambda: wire.count("d1") >= 3 and wire.count("d2") >= 3, 30, "windows flowing")
        first = {d: min(s for dd, s in wire.delivered() if dd == d) for d in ("d1", "d2")}
        proxy.cut()
        await wait_until(lambda: health(tmp_path).get("spool", {}).get("windows", 0) >= 20, 30, "20 windows waiting")
        if how == "sigterm":
            procs[0].send_signal(signal.SIGTERM)
        else:
            procs[0].kill()
        stopped_ms = time.time_ns() // 1_000_000
        rc = await asyncio.to_thread(procs[0].wait, 20)
        assert rc == (0 if how == "sigterm" else -signal.SIGKILL)
        on_disk = spooled(spool_file, wire.keyring)
        assert (len(on_disk) >= 20) == spool, on_disk
        expected = closed_before(first, stopped_ms)

        proxy.restore()
        procs.append(spawn("sensor_reader", env, tmp_path, "reader-2"))
        restarted_ms = time.time_ns() // 1_000_000
        await wait_until(
            lambda: wire.count("d1", restarted_ms) >= 3 and wire.count("d2", restarted_ms) >= 3,
            30,
            "the restarted reader's own windows",
        )
        await wait_until(lambda: set(on_disk) <= wire.delivered(), 30, "the spooled windows delivered")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 20)
    # (Windows closed within the margin before the stop, and the restarted reader's, are outside
    # `expected`: "unexpected" means nothing here.)
    audit = wire.audit(expected)
    assert audit["duplicated"] == [] and audit["out_of_order"] == [], audit
    lost = audit["lost"]
    if spool:
        assert lost == [], f"{len(lost)} of {len(expected)} closed windows lost: {lost}"
        assert collections.Counter(k[0] for k in on_disk).keys() == {"d1", "d2"}
    else:
        # The control: the same run without a spool loses what was waiting in memory.
        assert len(lost) >= 10, audit
    print(
        f"{how}, spool={spool}: {len(expected)} windows closed, {len(lost)} lost, {len(on_disk)} were on disk,"
        f" {len(audit['redelivered'])} redelivered (same seal)"
    )


@pytest.mark.timeout(120)
async def test_reader_killed_while_the_broker_holds_its_acknowledgements_loses_nothing(
    stack: Stack, base: str, tmp_path: Path, proxy: Proxy, wire: RawWire
) -> None:
    """The other path into the spool: windows already handed to the broker, not yet acknowledged
    at their commit tick. After a kill -9 they are published again from the spool: the same sealed
    messages (receivers drop them as QoS 1 redeliveries), never a second seal of a window."""
    env = reader_env(stack, base, tmp_path, proxy)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(spawn("sensor_reader", env, tmp_path, "reader-1"))
        await wait_until(lambda: wire.count("d1") >= 3 and wire.count("d2") >= 3, 30, "windows flowing")
        first = {d: min(s for dd, s in wire.delivered() if dd == d) for d in ("d1", "d2")}
        proxy.hold_acks()
        await wait_until(lambda: health(tmp_path).get("spool", {}).get("windows", 0) >= 20, 30, "20 windows waiting")
        procs[0].kill()
        killed_ms = time.time_ns() // 1_000_000
        await asyncio.to_thread(procs[0].wait, 20)
        on_disk = spooled(Path(env["IOTPIPE_SPOOL_FILE"]), wire.keyring)
        assert len(on_disk) >= 20
        proxy.restore()
        procs.append(spawn("sensor_reader", env, tmp_path, "reader-2"))
        await wait_until(lambda: set(on_disk) <= wire.delivered(), 30, "the spooled windows delivered")
        await wait_until(
            lambda: len(wire.audit(set(on_disk))["redelivered"]) >= len(on_disk) - 5,
            30,
            "the windows the broker had got before the kill published again",
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 20)
    audit = wire.audit(closed_before(first, killed_ms))
    assert audit["lost"] == [] and audit["duplicated"] == [] and audit["out_of_order"] == [], audit
    print(f"{len(on_disk)} on disk at the kill, {len(audit['redelivered'])} redelivered (same seal), none lost")
