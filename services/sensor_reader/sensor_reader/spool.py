"""The sensor-reader's outbox: every closed window, sealed, until the broker has acknowledged it.

A window is sealed when it closes and handed to the outbox, which publishes windows strictly in the
order they closed (a device's windows in start order) and keeps every one the broker has not
acknowledged (PUBACK) in a local SQLite spool (WAL mode):

- Commit ticks. Every `COMMIT_INTERVAL` in which something happened, one transaction writes each
  window that closed since the last tick and is *still unacknowledged*, and deletes the rows of
  windows acknowledged since. So within one tick of closing, every window is either acknowledged
  by the broker or on disk: the guarantee of a write-ahead log with per-tick transactions, without
  writing the windows the broker acknowledges within the tick (a healthy broker answers in about
  a millisecond: then the spool file sees no writes at all).
- The broker unreachable or slow: windows keep being read, sealed and spooled. Only
  `max_in_memory` wait in memory (next in line or in flight); later ones wait on disk only and are
  loaded back, oldest first, as room frees up. Nothing newer is published before anything older.
- The spool over its byte budget: the oldest windows not yet handed to the MQTT client are
  dropped, counted, and said once per episode (when it fills and when it has room again). The
  windows handed to the client (at most `max_in_flight`) are outside the budget: they cannot be
  dropped, and when the broker comes back they must not push out the windows right behind them.
- A clean stop (SIGTERM): the open windows are closed and spooled, what the broker acknowledges
  within the drain is deleted, the rest stays. kill -9: the committed rows stay. Either way the
  next start publishes them first. A kill -9 can lose only the windows still open and those closed
  within the last tick (at most `COMMIT_INTERVAL` plus one transaction) that the broker had not
  acknowledged; a window acknowledged but not yet deleted is published again: the same sealed
  bytes, so the same (src, boot, seq), which receivers drop like any QoS 1 redelivery.

A row holds the sealed envelope, exactly the bytes that go to the broker: readings are never at rest
in plaintext, and sealing costs nothing extra (it is needed for publishing anyway). A window sealed
longer ago than the message TTL would be refused by every receiver (Fernet TTL); it is dropped and
counted as expired instead of being published.

All SQLite work runs on one worker thread (a WAL checkpoint's fsync never stalls the event loop),
issued by one task (`Outbox._keep`), so the file has a single writer and the loop-side bookkeeping
needs no lock. The file is locked exclusively while open: a second reader configured with the same
file fails at start instead of publishing the same windows twice.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from iotpipe import ConfigError, IotpipeError

log = logging.getLogger(__name__)
T = TypeVar("T")

# 2: contract v2 (one entry is a raw message of one or many device windows; `windows` counts them).
# A spool of another version is set aside at start (its messages are of another contract).
SCHEMA_VERSION = 2
# Seconds per commit tick: the windows closed (and acknowledged) within one share one transaction.
# Also the longest a closed, unacknowledged window is in memory only (what a kill -9 can take).
COMMIT_INTERVAL = 0.01
# Rows of acknowledged windows are deleted with the next tick's windows, or after this many seconds
# when no window closes meanwhile. A kill -9 leaves at most that many seconds of acknowledged
# windows in the spool, published again at the next start (duplicates receivers drop).
DELETE_INTERVAL = 0.1
# Bytes counted per row on top of its sealed payload (topic, device, integers, b-tree slack), so
# the budget tracks the file for small windows too.
ROW_OVERHEAD = 100
# The WAL file is truncated back to this after a checkpoint (SQLite checkpoints every ~4 MiB).
WAL_SIZE_LIMIT = 8 << 20
# A window sealed this close to the message TTL is not published (a receiver would refuse it); a
# quarter of the TTL when that is shorter (a TTL under 4 minutes, in tests: else nothing is published).
EXPIRY_MARGIN_MS = 60_000
# A full spool (or memory) is said once when it fills, and once when it is back under this share.
FULL_EPISODE_END = 0.9
# Windows per SELECT while trimming the oldest rows, and at most per load back into memory.
TRIM_CHUNK = 256
LOAD_CHUNK = 256

Row = tuple[int, str, int, int, int, str, bytes, int]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True, eq=False)
class Window:
    """One sealed raw message of closed windows (one or many devices' windows: `windows` of them;
    `device` names the first, for logs): what goes to the broker, and what the counters need. The
    spool calls each entry a window, as it was one device's window before contract v2."""

    device: str
    start: int
    readings: int
    topic: str
    payload: bytes
    sealed_at: int  # unix ms
    id: int = 0  # spool row id: the order windows are published in
    size: int = 0  # bytes counted against the budget
    in_memory: bool = True  # in the publishing queue or in flight (else: waiting on disk only)
    handed: bool = False  # given to the MQTT client: no longer droppable, outside the budget
    on_disk: bool = False
    done: bool = False  # acknowledged by the broker, or given up: its row may be deleted
    dropped: bool = False
    windows: int = 1  # device windows in the message

    def __post_init__(self) -> None:
        if not self.size:
            self.size = len(self.payload) + ROW_OVERHEAD

    def row(self) -> Row:
        return (self.id, self.device, self.start, self.readings, self.sealed_at, self.topic, self.payload, self.windows)


class SpoolFile:
    """The SQLite file. Synchronous: every method runs on the outbox's one worker thread."""

    def __init__(self, path: Path, synchronous: str = "NORMAL", lock_timeout: float = 5.0) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigError(f"spool synchronous level must be NORMAL or FULL, not {synchronous!r}")
        self.path = path
        self.synchronous = synchronous
        self.lock_timeout = lock_timeout
        self._db: sqlite3.Connection | None = None

    def open(self) -> tuple[int, int, int]:
        """Open (creating it if need be) and lock the file: (windows, bytes, highest id) it holds."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the spool directory {str(self.path.parent)!r}: {exc.strerror}") from exc
        try:
            return self._open()
        except sqlite3.OperationalError as exc:
            self._close_quietly()
            if "locked" in str(exc):
                raise ConfigError(
                    f"spool {str(self.path)!r} is locked by another process (another sensor-reader with the same "
                    "IOTPIPE_SPOOL_FILE?)"
                ) from exc
            if "unable to open" in str(exc) or "readonly" in str(exc):
                raise ConfigError(f"cannot open the spool {str(self.path)!r}: {exc}") from exc
            return self._set_aside(exc)
        except sqlite3.DatabaseError as exc:  # not a database, damaged, or a format we do not know
            self._close_quietly()
            return self._set_aside(exc)

    def _set_aside(self, exc: Exception) -> tuple[int, int, int]:
        """Keep an unreadable file for inspection and start an empty one: refusing to start would
        lose every reading from now on."""
        aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
        log.error("spool %s is unreadable (%s): moved to %s, starting an empty spool", self.path, exc, aside)
        return self._open()

    def _open(self) -> tuple[int, int, int]:
        db = self._db = sqlite3.connect(self.path, isolation_level=None, timeout=self.lock_timeout)
        # Exclusive locking before the first access: the WAL index lives in this process's memory
        # (no -shm file) and the lock, taken by the first transaction, is held until close.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot use a write-ahead log (journal mode {mode})")
        # NORMAL: a commit survives a crash or kill of this process (the OS has the WAL); the WAL is
        # fsynced at each checkpoint, so a power loss can take the commits since the last one.
        # FULL: also fsynced at each commit (one per tick that wrote something).
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS windows ("
                    " id INTEGER PRIMARY KEY, device TEXT NOT NULL, start INTEGER NOT NULL,"
                    " readings INTEGER NOT NULL, sealed_at INTEGER NOT NULL, topic TEXT NOT NULL,"
                    " payload BLOB NOT NULL, windows INTEGER NOT NULL DEFAULT 1)"
                )
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"spool format {version}, this reader knows {SCHEMA_VERSION}")
            windows, payload, high = db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(id), 0) FROM windows"
            ).fetchone()
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return int(windows), int(payload) + int(windows) * ROW_OVERHEAD, int(high)

    def write(
        self,
        delete_upto: int,
        delete_ranges: Sequence[tuple[int, int]],
        trim_after: int,
        trim_bytes: int,
        rows: Sequence[Row],
    ) -> list[Window]:
        """One transaction: delete every row up to `delete_upto` and in `delete_ranges`, drop the
        oldest rows after `trim_after` until at least `trim_bytes` are freed (returned, without
        payload), and insert `rows`."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            if delete_upto:
                db.execute("DELETE FROM windows WHERE id <= ?", (delete_upto,))
            for first, last in delete_ranges:
                db.execute("DELETE FROM windows WHERE id BETWEEN ? AND ?", (first, last))
            trimmed = self._trim(db, trim_after, trim_bytes) if trim_bytes > 0 else []
            if rows:
                db.executemany(
                    "INSERT INTO windows (id, device, start, readings, sealed_at, topic, payload, windows)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return trimmed

    @staticmethod
    def _trim(db: sqlite3.Connection, after: int, needed: int) -> list[Window]:
        trimmed: list[Window] = []
        freed, last = 0, after
        while freed < needed:
            rows = db.execute(
                "SELECT id, device, start, readings, length(payload), windows FROM windows WHERE id > ? ORDER BY id"
                " LIMIT ?",
                (last, TRIM_CHUNK),
            ).fetchall()
            if not rows:
                break
            for row_id, device, start, readings, length, count in rows:
                window = Window(
                    device, start, readings, "", b"", 0, id=row_id, size=length + ROW_OVERHEAD, windows=count
                )
                trimmed.append(window)
                freed += window.size
                last = row_id
                if freed >= needed:
                    break
        if trimmed:
            db.execute("DELETE FROM windows WHERE id > ? AND id <= ?", (after, last))
        return trimmed

    def load(self, after: int, limit: int) -> list[Window]:
        """The oldest `limit` windows with an id above `after`."""
        rows = (
            self._connection()
            .execute(
                "SELECT id, device, start, readings, sealed_at, topic, payload, windows FROM windows"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            )
            .fetchall()
        )
        return [
            Window(device, start, readings, topic, bytes(payload), sealed_at, id=row_id, on_disk=True, windows=count)
            for row_id, device, start, readings, sealed_at, topic, payload, count in rows
        ]

    def close(self) -> None:
        """Checkpoint, remove the WAL and release the lock."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def _close_quietly(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.close()
        self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("spool is not open")
        return self._db


Publish = Callable[[str, bytes], Awaitable[None]]


class Outbox:
    """Closed windows on their way to the broker: `start`, `put` each (in seal order), `close`.

    With a `spool` (see the module docstring) memory holds at most `max_in_memory` windows and the
    rest wait on disk. Without one, memory is all there is: a window that finds `max_in_memory`
    waiting pushes out the oldest not yet handed to the client, and a stop loses what the broker
    has not acknowledged within the drain.

    Why a window is dropped (`on_dropped`'s reason): `spool_full`, `memory_full` (no spool),
    `expired` (sealed longer ago than the message TTL), `publish_failed` (the broker refused it),
    `spool_error` (the spool cannot be written and memory is full), `shutdown` (no spool:
    unacknowledged at stop).
    """

    def __init__(
        self,
        spool: SpoolFile | None,
        *,
        max_bytes: int,
        publish: Publish,
        connected: asyncio.Event,
        max_in_memory: int,
        max_in_flight: int,
        ttl_ms: int,
        on_published: Callable[[Window], None],
        on_dropped: Callable[[Window, str], None],
        on_spool_error: Callable[[], None] = lambda: None,
        commit_interval: float = COMMIT_INTERVAL,
    ) -> None:
        self.spool = spool
        self.max_bytes = max_bytes
        self.max_in_memory = max(1, max_in_memory)
        self.max_in_flight = max(1, min(max_in_flight, self.max_in_memory))
        self.ttl_ms = ttl_ms
        self._expires_after = ttl_ms - min(EXPIRY_MARGIN_MS, ttl_ms // 4)  # ms after sealing
        self.commit_interval = commit_interval
        self._publish = publish
        self._connected = connected
        self._on_published = on_published
        self._on_dropped = on_dropped
        self._on_spool_error = on_spool_error
        self._low_water = max(1, self.max_in_memory // 4)
        self._next_id = 1
        # Order of every window: handed (in flight or done) < queue < on disk only < not yet written.
        self._handed: collections.deque[Window] = collections.deque()  # given to the client, until deleted
        self._queue: collections.deque[Window] = collections.deque()  # in memory, next in line
        self._fresh: list[Window] = []  # closed since the last tick (wherever they are now)
        self._fresh_since = 0.0  # loop time the first of them closed
        self._last_tick = 0.0
        self._delete_signalled = False
        self._spilled = 0  # of those, windows not in memory (waiting for the tick to be written)
        self._sends: dict[asyncio.Task[None], Window] = {}
        self._in_flight = 0
        self._mem_tail = 0  # highest id that made it into memory: every disk-only row is above
        self._deleted_upto = 0
        self._pending_deletes: list[tuple[int, int, int, int]] = []  # (first, last, windows, bytes)
        self.disk_windows = 0  # rows in the spool (as of the last commit) and their counted bytes
        self.disk_bytes = 0
        self._disk_only = 0  # of those, windows (and bytes) not in memory
        self._disk_only_bytes = 0
        self.written = 0  # windows written to the spool since start (unacknowledged at their tick)
        self.dropped = 0  # windows dropped for want of room (spool or memory), since start
        self.expired = 0
        self._full = False
        self._episode = [0, 0]  # windows, readings dropped in the current full episode
        self._spool_errors = 0
        self._work = asyncio.Event()  # something for the spool task: a tick or a refill
        self._pump_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._started = False
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.spool is not None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
            try:
                windows, size, high = await self._run(self.spool.open)
            except BaseException:
                self._executor.shutdown(wait=False)
                raise
            self.disk_windows = self._disk_only = windows
            self.disk_bytes = self._disk_only_bytes = size
            self._next_id = high + 1
            if windows:
                log.info(
                    "spool %s holds %d windows (%.1f MiB) from before: publishing them first",
                    self.spool.path,
                    windows,
                    size / 2**20,
                )
                self._work.set()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(), name="outbox pump")]
        if self.spool is not None:
            self._tasks.append(loop.create_task(self._keep(), name="outbox spool"))
        self._started = True

    async def watch(self) -> None:
        """Runs as long as the outbox's own tasks do; raises what one of them raised (a bug)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        raise RuntimeError("outbox task ended")

    async def close(self, drain: float) -> None:
        """Write the last windows, give the broker `drain` seconds to acknowledge what is in memory,
        then leave the rest on disk (or, without a spool, count it lost)."""
        if not self._started:
            return
        self._started = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        pump, *keep = self._tasks
        if self.spool is not None:
            self._stopping = True
            self._work.set()
            await asyncio.gather(*keep, return_exceptions=True)
            await self._tick()  # the last windows are on disk before anything else can go wrong
        if self._connected.is_set() or self.spool is None:
            while (self._queue or self._in_flight) and (remaining := deadline - loop.time()) > 0:
                self._pump_wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._pump_wake.wait()
        pump.cancel()
        sends = dict(self._sends)
        for task in sends:
            task.cancel()  # their windows are not done: their rows stay
        await asyncio.gather(pump, *sends, return_exceptions=True)
        if self.spool is None:
            lost = [*(w for w in sends.values() if not w.done), *self._queue]
            for window in lost:
                self._drop(window, "shutdown")
            if lost:
                log.error(
                    "stopping with %d windows (%d readings) not acknowledged by the broker and no spool: lost",
                    len(lost),
                    sum(w.readings for w in lost),
                )
            return
        await self._tick()  # rows of what was acknowledged during the drain go
        with contextlib.suppress(sqlite3.Error):
            await self._run(self.spool.close)
        assert self._executor is not None
        self._executor.shutdown(wait=True)
        if self.disk_windows:
            log.info(
                "stopped with %d windows in the spool %s: the next start publishes them",
                self.disk_windows,
                self.spool.path,
            )

    # -- closed windows in ---------------------------------------------------------------------
    def put(self, window: Window) -> None:
        """A window that just closed (in seal order)."""
        window.id = self._next_id
        self._next_id += 1
        if self.spool is not None:
            if not self._fresh:
                self._fresh_since = asyncio.get_running_loop().time()
                self._work.set()
            self._fresh.append(window)
        if not self._disk_only and not self._spilled and self.in_memory() < self.max_in_memory:
            self._queue.append(window)
            self._mem_tail = window.id
        elif self.spool is not None:
            window.in_memory = False  # behind others waiting on disk, or no room: written at the tick
            self._spilled += 1
        elif self._queue:
            self._drop(self._queue.popleft(), "memory_full")  # the oldest not handed to the client yet
            self._queue.append(window)
        else:
            self._drop(window, "memory_full")
        self._pump_wake.set()

    def stats(self) -> dict[str, Any]:
        return {
            "windows": self.disk_windows if self.spool is not None else self.in_memory(),
            "bytes": self.disk_bytes,
            "max_bytes": self.max_bytes,
            "written": self.written,
            "dropped": self.dropped,
            "expired": self.expired,
            "in_memory": self.in_memory(),
            "in_flight": self._in_flight,
        }

    def in_memory(self) -> int:
        """Windows next in line or in flight: what `max_in_memory` bounds."""
        return len(self._queue) + self._in_flight

    # -- the spool: one task does all of its work -----------------------------------------------
    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            due = self._due()
            if due is None:
                await self._work.wait()
            elif (remaining := due - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._work.wait()
            self._work.clear()
            if self._stopping:
                return
            await self._refill()
            due = self._due()
            if due is not None and loop.time() >= due:
                await self._tick()
                await self._refill()

    def _due(self) -> float | None:
        """When the next tick is due: `commit_interval` after the first window closed since the
        last one; `DELETE_INTERVAL` after the last one when there are only rows to delete."""
        if self._fresh:
            return self._fresh_since + self.commit_interval
        if self._pending_deletes or (self._handed and self._handed[0].done):
            return self._last_tick + DELETE_INTERVAL
        return None

    async def _tick(self) -> None:
        """One transaction: unacknowledged new windows in, acknowledged rows out, the budget kept."""
        assert self.spool is not None
        self._last_tick = asyncio.get_running_loop().time()
        self._delete_signalled = False
        fresh, self._fresh = self._fresh, []
        # Still counted in `_spilled` until written: meanwhile a new window must not overtake them.
        spilled = [w for w in fresh if not w.in_memory]
        done: list[Window] = []
        while self._handed and self._handed[0].done:
            done.append(self._handed.popleft())
        upto = done[-1].id if done else self._deleted_upto
        done_rows = [w for w in done if w.on_disk]
        # The budget bounds the windows waiting for their turn. Those handed to the client (at most
        # max_in_flight, acknowledged within milliseconds once the broker is back) come on top: the
        # moment the broker returns, they must not push out the windows right behind them.
        # Over budget: drop the oldest windows not handed to the client yet: those next in line in
        # memory, then those on disk only, then the oldest of the ones not written yet.
        handed = sum(w.size for w in done_rows) + sum(w.size for w in self._handed if w.on_disk)
        pending = sum(p[3] for p in self._pending_deletes)
        unwritten = sum(w.size for w in fresh if not w.handed)
        over = self.disk_bytes - handed - pending + unwritten - self.max_bytes
        from_queue: list[Window] = []
        while over > 0 and self._queue:
            window = self._queue.popleft()
            from_queue.append(window)
            over -= window.size  # frees its row, or spares writing it
            self._drop(window, "spool_full")
        rows_dropped = [w for w in from_queue if w.on_disk]
        if rows_dropped:
            self._pending_deletes.append(
                (rows_dropped[0].id, rows_dropped[-1].id, len(rows_dropped), sum(w.size for w in rows_dropped))
            )
        trim_bytes = min(over, self._disk_only_bytes) if over > 0 else 0
        over -= trim_bytes
        for window in spilled:
            if over <= 0:
                break
            over -= window.size
            self._drop(window, "spool_full")
        new = [w for w in fresh if not w.done and not w.dropped]
        if not (new or done_rows or self._pending_deletes or trim_bytes):
            self._deleted_upto = upto
            self._spilled -= len(spilled)
            self._end_episode()
            return
        try:
            trimmed = await self._run(
                self.spool.write,
                upto,
                [(first, last) for first, last, _, _ in self._pending_deletes],
                self._mem_tail,
                trim_bytes,
                [w.row() for w in new],  # built here: a send may drop a payload meanwhile
            )
        except (sqlite3.Error, OSError) as exc:
            self._spool_failed("write", exc)
            self._handed.extendleft(reversed(done))  # their rows go with the next transaction
            for window in new:
                if not window.in_memory:  # nowhere else to keep it
                    self._drop(window, "spool_error")
            self._spilled -= len(spilled)
            return
        if self._spool_errors:
            log.warning("spool %s is writable again", self.spool.path)
            self._spool_errors = 0
        self._deleted_upto = upto
        self.disk_windows -= len(done_rows) + sum(p[2] for p in self._pending_deletes)
        self.disk_bytes -= sum(w.size for w in done_rows) + sum(p[3] for p in self._pending_deletes)
        self._pending_deletes.clear()
        self.written += len(new)
        for window in trimmed:
            self.disk_windows -= 1
            self.disk_bytes -= window.size
            self._disk_only -= 1
            self._disk_only_bytes -= window.size
            self._drop(window, "spool_full")
        for window in new:
            window.on_disk = True
            self.disk_windows += 1
            self.disk_bytes += window.size
            if not window.in_memory:
                window.payload = b""  # loaded again when its turn comes
                self._disk_only += 1
                self._disk_only_bytes += window.size
        self._spilled -= len(spilled)
        self._end_episode()

    async def _refill(self) -> None:
        """Load windows waiting on disk only into memory, oldest first, as room frees up."""
        assert self.spool is not None
        while self._disk_only and len(self._queue) < self._low_water and not self._stopping:
            room = min(LOAD_CHUNK, self.max_in_memory - self.in_memory())
            if room <= 0:
                return
            try:
                windows = await self._run(self.spool.load, self._mem_tail, room)
            except (sqlite3.Error, OSError) as exc:
                self._spool_failed("read", exc)
                return
            if not windows:  # only if the file was changed under us
                log.error("spool %s lost %d windows it should hold", self.spool.path, self._disk_only)
                self.disk_windows -= self._disk_only
                self.disk_bytes -= self._disk_only_bytes
                self._disk_only = self._disk_only_bytes = 0
                return
            self._queue.extend(windows)
            self._mem_tail = windows[-1].id
            self._disk_only -= len(windows)
            self._disk_only_bytes -= sum(w.size for w in windows)
            self._pump_wake.set()

    def _spool_failed(self, what: str, exc: BaseException) -> None:
        assert self.spool is not None
        self._spool_errors += 1
        if self._spool_errors == 1:
            log.error(
                "cannot %s the spool %s (%s): new windows are kept in memory only until it works",
                what,
                self.spool.path,
                exc,
            )
        self._on_spool_error()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- publishing: one pump, sends in flight ----------------------------------------------
    async def _pump(self) -> None:
        """Hand windows to the MQTT client in queue order, at most `max_in_flight` at once. A send's
        task reaches the client (paho) in creation order, so the broker gets them in order."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self._in_flight >= self.max_in_flight:
                self._pump_wake.clear()
                await self._pump_wake.wait()
                continue
            if not self._connected.is_set():
                await self._connected.wait()  # no use queueing in the client: the spool holds them
                continue
            window = self._queue.popleft()
            if self._disk_only and len(self._queue) < self._low_water:
                self._work.set()
            window.handed = True
            if self.spool is not None:
                self._handed.append(window)
            if window.sealed_at + self._expires_after < _now_ms():
                window.done = True
                window.payload = b""
                self._drop(window, "expired")
                if not self._delete_signalled:
                    self._delete_signalled = True
                    self._work.set()
                continue
            self._in_flight += 1
            task = loop.create_task(self._send(window), name="publish window")
            self._sends[task] = window
            task.add_done_callback(self._sends.pop)

    async def _send(self, window: Window) -> None:
        try:
            try:
                await self._publish(window.topic, window.payload)
            except Exception as exc:  # refused by the broker (or a bug): never let it block the rest
                log.error(
                    "publishing window %s of %s failed (%s); %d readings lost",
                    window.start,
                    window.device,
                    exc,
                    window.readings,
                    exc_info=not isinstance(exc, IotpipeError),
                )
                self._drop(window, "publish_failed")
            else:
                self._on_published(window)
            window.done = True  # not when cancelled at stop: then its row stays for the next start
            window.payload = b""
        finally:
            self._in_flight -= 1
            self._pump_wake.set()
            if self.spool is None:
                self._end_episode()
            elif not self._delete_signalled and self._handed and self._handed[0].done:
                self._delete_signalled = True  # rows to delete: the spool task sets a due time
                self._work.set()

    # -- counting ---------------------------------------------------------------------------
    def _drop(self, window: Window, reason: str) -> None:
        window.dropped = True
        if reason == "expired":
            self.expired += window.windows
        if reason in ("spool_full", "memory_full"):
            self.dropped += window.windows
            if not self._full:
                self._full = True
                self._episode = [0, 0]
                where = f"spool {self.spool.path} ({self.max_bytes} bytes)" if self.spool else "memory (no spool)"
                log.warning("%s is full: dropping the oldest windows awaiting the broker, keeping the newest", where)
            self._episode[0] += window.windows
            self._episode[1] += window.readings
        self._on_dropped(window, reason)

    def _end_episode(self) -> None:
        if not self._full:
            return
        if self.spool is not None:
            if self.disk_bytes > self.max_bytes * FULL_EPISODE_END:
                return
            where = f"spool {self.spool.path}"
        else:
            if self.in_memory() > self.max_in_memory * FULL_EPISODE_END:
                return
            where = "memory"
        self._full = False
        log.warning("%s has room again: %d windows (%d readings) were dropped while it was full", where, *self._episode)
