"""The sensor-reader's outbox and spool (sensor_reader.spool) against a fake broker: the order windows
are published in, the byte budget, restarts, expiry, and what happens without a spool. The same
behaviour through the real broker and a real reader process: tests/test_reader_outage.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from iotpipe import BrokerRefused, ConfigError
from sensor_reader.spool import COMMIT_INTERVAL, ROW_OVERHEAD, Outbox, SpoolFile, Window
from servers import wait_until

PAYLOAD = 400  # bytes of each fake sealed window


class FakeBroker:
    """Acknowledges each publish after `delay` while `connected` is set; records what it got."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.delay = 0.0
        self.got: list[tuple[str, int]] = []  # (device, start) in arrival order
        self.refuse: set[int] = set()  # starts the broker refuses

    async def publish(self, topic: str, payload: bytes) -> None:
        device = topic.rsplit("/", 1)[1]
        start = int(payload.split(b":")[1])
        assert len(payload) == PAYLOAD
        self.got.append((device, start))
        if start in self.refuse:
            raise BrokerRefused(topic, 0x87)
        await asyncio.sleep(self.delay)
        await self.connected.wait()


class Counts:
    def __init__(self) -> None:
        self.published: list[Window] = []
        self.dropped: list[tuple[Window, str]] = []

    def by_reason(self, reason: str) -> list[tuple[str, int]]:
        return [(w.device, w.start) for w, r in self.dropped if r == reason]


def window(device: str, start: int, sealed_at: int | None = None) -> Window:
    body = f"{device}:{start}:".encode()
    payload = body + b"x" * (PAYLOAD - len(body))
    return Window(device, start, 4, f"t/v2/raw/{device}", payload, sealed_at or time.time_ns() // 1_000_000)


def make(
    broker: FakeBroker,
    counts: Counts,
    path: Path | None,
    *,
    max_bytes: int = 1 << 20,
    max_in_memory: int = 1000,
    ttl_ms: int = 3600_000,
) -> Outbox:
    return Outbox(
        SpoolFile(path, lock_timeout=0.1) if path else None,
        max_bytes=max_bytes,
        publish=broker.publish,
        connected=broker.connected,
        max_in_memory=max_in_memory,
        max_in_flight=10,
        ttl_ms=ttl_ms,
        on_published=counts.published.append,
        on_dropped=lambda w, reason: counts.dropped.append((w, reason)),
    )


def rows(path: Path) -> list[tuple[str, int]]:
    """What the spool file holds, read as another process would (the outbox must have closed it)."""
    with contextlib.closing(sqlite3.connect(path)) as db:  # closed: an open connection keeps a lock
        return [(d, s) for d, s in db.execute("SELECT device, start FROM windows ORDER BY id")]


async def put_over_ticks(outbox: Outbox, windows: list[Window], per_tick: int = 7) -> None:
    """Windows closing over several commit ticks, as they do in a reader."""
    for first in range(0, len(windows), per_tick):
        for w in windows[first : first + per_tick]:
            outbox.put(w)
        await asyncio.sleep(COMMIT_INTERVAL * 1.5)


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
async def closing() -> AsyncIterator[list[Outbox]]:
    """Outboxes a test started: closed at the end even if it failed."""
    started: list[Outbox] = []
    yield started
    for outbox in started:
        await outbox.close(0)


def interleaved(count: int, devices: tuple[str, ...] = ("a", "b", "c")) -> list[Window]:
    return [window(devices[i % len(devices)], 1000 * (i // len(devices))) for i in range(count)]


async def test_outage_spills_to_disk_and_publishes_everything_in_order_after(
    broker: FakeBroker, tmp_path: Path, closing: list[Outbox]
) -> None:
    counts = Counts()
    outbox = make(broker, counts, tmp_path / "spool.sqlite3", max_in_memory=5)
    await outbox.start()
    closing.append(outbox)
    windows = interleaved(60)
    await put_over_ticks(outbox, windows)  # the broker is unreachable all along
    await wait_until(lambda: outbox.stats()["windows"] == 60, 10, "every window spooled")
    stats = outbox.stats()
    assert stats["in_memory"] <= 5 and stats["bytes"] == 60 * (PAYLOAD + ROW_OVERHEAD)
    broker.connected.set()
    await wait_until(lambda: len(counts.published) == 60 and outbox.stats()["windows"] == 0, 10, "backlog published")
    sent = [(w.device, w.start) for w in windows]
    assert broker.got == sent  # exactly once each, in the order they closed (so per device in start order)
    assert counts.dropped == []


async def test_windows_acknowledged_within_the_tick_are_never_written(
    broker: FakeBroker, tmp_path: Path, closing: list[Outbox]
) -> None:
    counts = Counts()
    broker.connected.set()
    outbox = make(broker, counts, tmp_path / "spool.sqlite3")
    await outbox.start()
    closing.append(outbox)
    await put_over_ticks(outbox, interleaved(40))
    await wait_until(lambda: len(counts.published) == 40, 10, "all published")
    assert outbox.written == 0
    broker.delay = COMMIT_INTERVAL * 5  # a slow broker: every window is on disk until acknowledged
    await put_over_ticks(outbox, [window("a", 100_000 + i) for i in range(20)])
    await wait_until(lambda: len(counts.published) == 60 and outbox.stats()["windows"] == 0, 10, "all published")
    assert outbox.written == 20


async def test_budget_drops_the_oldest_counts_them_and_says_so_once(
    broker: FakeBroker, tmp_path: Path, closing: list[Outbox], caplog: pytest.LogCaptureFixture
) -> None:
    counts = Counts()
    size = PAYLOAD + ROW_OVERHEAD
    outbox = make(broker, counts, tmp_path / "spool.sqlite3", max_bytes=10 * size, max_in_memory=3)
    await outbox.start()
    closing.append(outbox)
    windows = interleaved(50)
    with caplog.at_level(logging.WARNING, logger="sensor_reader.spool"):
        await put_over_ticks(outbox, windows)
        await wait_until(lambda: outbox.stats()["windows"] == 10, 10, "the spool at its budget")
        assert outbox.stats()["bytes"] <= 10 * size
        assert outbox.stats()["dropped"] == 40
        broker.connected.set()
        await wait_until(lambda: len(counts.published) == 10 and outbox.stats()["windows"] == 0, 10, "the rest sent")
    sent = [(w.device, w.start) for w in windows]
    assert counts.by_reason("spool_full") == sent[:40]  # the oldest went
    assert broker.got == sent[40:]  # the newest were kept, and published in order
    full = [r for r in caplog.records if "is full" in r.getMessage()]
    room = [r for r in caplog.records if "has room again" in r.getMessage()]
    assert len(full) == 1 and len(room) == 1, caplog.text
    assert "40 windows (160 readings) were dropped" in room[0].getMessage()


async def test_a_restart_publishes_the_leftover_spool_first(broker: FakeBroker, tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    first = make(broker, Counts(), path, max_in_memory=4)
    await first.start()
    old = interleaved(25)
    await put_over_ticks(first, old)
    for w in interleaved(3, ("z",)):  # closed at stop (the open windows), written by close()
        first.put(w)
    await first.close(0.5)  # the broker is unreachable: nothing is waited for
    assert rows(path) == [(w.device, w.start) for w in [*old, *interleaved(3, ("z",))]]

    counts = Counts()
    broker.connected.set()
    second = make(broker, counts, path, max_in_memory=4)
    await second.start()
    assert second.stats()["windows"] == 28
    new = [window("a", 10**9 + i) for i in range(5)]
    for w in new:
        second.put(w)
    await wait_until(lambda: len(counts.published) == 33, 10, "leftovers, then new windows")
    await second.close(0.5)
    assert broker.got == [(w.device, w.start) for w in [*old, *interleaved(3, ("z",)), *new]]
    assert rows(path) == []


async def test_close_leaves_unacknowledged_windows_in_the_spool(broker: FakeBroker, tmp_path: Path) -> None:
    """Connected, but the broker never acknowledges within the drain: the windows stay on disk."""
    path = tmp_path / "spool.sqlite3"
    counts = Counts()
    broker.connected.set()
    broker.delay = 60
    outbox = make(broker, counts, path)
    await outbox.start()
    windows = interleaved(12)
    await put_over_ticks(outbox, windows)
    await outbox.close(0.2)
    assert counts.published == []
    assert rows(path) == [(w.device, w.start) for w in windows]


async def test_windows_older_than_the_message_ttl_are_dropped_not_published(
    broker: FakeBroker, tmp_path: Path, closing: list[Outbox]
) -> None:
    counts = Counts()
    now = time.time_ns() // 1_000_000
    outbox = make(broker, counts, tmp_path / "spool.sqlite3", ttl_ms=3600_000)
    await outbox.start()
    closing.append(outbox)
    stale = [window("a", i, sealed_at=now - 2 * 3600_000) for i in range(3)]
    fresh = [window("a", 100 + i) for i in range(3)]
    await put_over_ticks(outbox, [*stale, *fresh])
    broker.connected.set()
    await wait_until(lambda: len(counts.published) == 3 and outbox.stats()["windows"] == 0, 10, "fresh ones sent")
    assert counts.by_reason("expired") == [("a", i) for i in range(3)]
    assert broker.got == [("a", 100 + i) for i in range(3)]
    assert outbox.stats()["expired"] == 3


async def test_a_window_the_broker_refuses_is_counted_and_does_not_block_the_rest(
    broker: FakeBroker, tmp_path: Path, closing: list[Outbox]
) -> None:
    counts = Counts()
    broker.connected.set()
    broker.refuse = {3}
    outbox = make(broker, counts, tmp_path / "spool.sqlite3")
    await outbox.start()
    closing.append(outbox)
    await put_over_ticks(outbox, [window("a", i) for i in range(8)])
    await wait_until(lambda: len(counts.published) == 7 and outbox.stats()["windows"] == 0, 10, "the rest sent")
    assert counts.by_reason("publish_failed") == [("a", 3)]


async def test_a_second_reader_cannot_open_the_same_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    first = SpoolFile(path)
    first.open()
    try:
        with pytest.raises(ConfigError, match="locked by another process"):
            SpoolFile(path, lock_timeout=0.1).open()
    finally:
        first.close()


async def test_an_unreadable_spool_is_set_aside_and_a_new_one_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    spool = SpoolFile(path)
    assert spool.open() == (0, 0, 0)
    spool.close()
    aside = list(tmp_path.glob("spool.sqlite3.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "unreadable" in caplog.text


async def test_without_a_spool_memory_keeps_the_newest_and_a_stop_loses_the_rest(broker: FakeBroker) -> None:
    counts = Counts()
    outbox = make(broker, counts, None, max_in_memory=5)
    await outbox.start()
    windows = [window("a", i) for i in range(12)]
    for w in windows:
        outbox.put(w)
    assert counts.by_reason("memory_full") == [("a", i) for i in range(7)]
    await outbox.close(0.2)
    assert counts.by_reason("shutdown") == [("a", i) for i in range(7, 12)]
    assert counts.published == []


async def test_a_spool_that_cannot_be_written_keeps_windows_in_memory(
    broker: FakeBroker, tmp_path: Path, closing: list[Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = Counts()
    errors: list[None] = []
    outbox = make(broker, counts, tmp_path / "spool.sqlite3", max_in_memory=5)
    outbox._on_spool_error = lambda: errors.append(None)
    await outbox.start()
    closing.append(outbox)

    def disk_full(*_args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(SpoolFile, "write", disk_full)
    await put_over_ticks(outbox, [window("a", i) for i in range(9)], per_tick=3)
    await wait_until(lambda: len(counts.dropped) == 4, 10, "what memory cannot hold dropped")
    assert counts.by_reason("spool_error") == [("a", i) for i in range(5, 9)]
    assert errors
    broker.connected.set()
    await wait_until(lambda: len(counts.published) == 5, 10, "memory published")
    assert broker.got == [("a", i) for i in range(5)]
