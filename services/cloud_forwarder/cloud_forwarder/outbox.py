"""The forwarder's durable outbox: records between "acknowledged to the broker" and "accepted by the cloud".

One SQLite database (standard library), WAL mode, one table in insertion order. A record goes in
(INSERT OR IGNORE by record id, so a redelivered MQTT message adds nothing while its records are
still here) before its MQTT message is acknowledged, and is deleted only after the cloud answered
2xx for it. Whatever instant the process is killed (kill -9), each record is either still here,
and will be uploaded, or was accepted by the cloud; a crash between the 2xx and the delete uploads
it again, and the cloud de-duplicates it by id.

Synchronous level (`IOTPIPE_OUTBOX_SYNCHRONOUS`): in WAL mode a commit has written the log to the
OS before it returns, so both levels survive kill -9 of the process. They differ on power loss:
FULL (default) fsyncs the log at every commit, so an acknowledged record survives a power cut too
(given storage that honours fsync); NORMAL fsyncs only at checkpoints, so a power cut can roll back
the last commits: records whose MQTT messages were already acknowledged, lost. The database itself
stays consistent either way. FULL costs one fsync per bus batch, not per record: about 8 µs per
record either way for batches of 64-200 messages, 0.2-0.6 ms instead of 0.1 ms for a one-message
batch, on the development VM (tests/bench/outbox.py; docs/operations.md).

Every SQLite call runs on one dedicated thread (the connection is used by nothing else), so a
commit's fsync or a WAL checkpoint never stalls the event loop, and calls run in submission order.

The disk budget (`IOTPIPE_OUTBOX_MAX_BYTES`) counts the database pages in use (pages freed by
uploads are reused, so the file stays about that size, plus the write-ahead log, which checkpoints
at about 4 MiB; a batch is sized by estimate before it goes in). A batch that would take the outbox past it is refused
(`OutboxFull`, a RetryableError) unless the outbox is empty, so any batch can always get in. Once
full, the outbox refuses every batch until uploads have freed a margin (a tenth of the budget, at
most 16 MiB): a small batch (an alert) squeezing into the last bytes would otherwise flip it
between full and not full, and the forwarder's "full" would not be said once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from iotpipe import RetryableError

T = TypeVar("T")
SCHEMA_VERSION = 1
# Rough bytes a row adds beyond its body and id (columns, the id index entry, page slack): only used
# to decide whether a batch would fit, never for the reported size.
ROW_OVERHEAD = 96
# Once full, how much must be free again before a batch is taken: a tenth of the budget, at most this.
RESUME_MARGIN_MAX = 16 << 20

Synchronous = Literal["FULL", "NORMAL"]


class OutboxUnavailable(RetryableError):
    """SQLite could not do what we asked (disk full, I/O error, locked): worth retrying."""

    def __init__(self, message: str) -> None:
        super().__init__(message, dependency="outbox")


class OutboxFull(OutboxUnavailable):
    """The outbox is at its disk budget: the batch is refused until uploads make room."""


@dataclass(frozen=True, slots=True)
class Row:
    """One record as the outbox keeps it: its id, its JSON (as it goes to the cloud), and where its
    MQTT message came from (for a dead letter). `key` is the outbox's own order, 0 until stored."""

    id: str
    body: bytes
    topic: str
    src: str | None = None
    boot: str | None = None
    seq: int | None = None
    key: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    records: int
    bytes: int


class Outbox:
    def __init__(self, path: Path, max_bytes: int, synchronous: Synchronous = "FULL") -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.resume_margin = min(max_bytes // 10, RESUME_MARGIN_MAX)
        self.full = False  # refusing batches until usage is below max_bytes - resume_margin
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._closed = False
        # Opened on the outbox thread like every other call; waited for here (start-up, nothing to stall).
        self.usage: Usage = self._executor.submit(self._open, synchronous).result()

    # -- the event loop's side -------------------------------------------------------------------
    async def add(self, rows: Sequence[Row]) -> int:
        """Store `rows` in one transaction; how many were new (the rest were already here)."""
        return await self._call(self._add, list(rows))

    async def head(self, limit: int) -> list[Row]:
        """The oldest `limit` records, oldest first."""
        return await self._call(self._head, limit)

    async def delete(self, rows: Sequence[Row]) -> None:
        await self._call(self._delete, [r.key for r in rows])

    @property
    def records(self) -> int:
        return self.usage.records

    async def close(self) -> None:
        """Finish what was submitted, then close; later calls raise OutboxUnavailable (retryable,
        so a bus handler still running holds its batch unacknowledged instead of losing it)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise OutboxUnavailable("outbox closed (shutting down)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # executor shut down between the check and the submit
            raise OutboxUnavailable(f"outbox closed: {exc}") from exc

    # -- the outbox thread's side ---------------------------------------------------------------
    def _open(self, synchronous: Synchronous) -> Usage:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot use WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous={synchronous}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.executescript(
                f"""
                BEGIN;
                CREATE TABLE IF NOT EXISTS outbox (
                    key INTEGER PRIMARY KEY,  -- insertion order (rowid): uploads go oldest first
                    id TEXT NOT NULL UNIQUE,  -- the record id the cloud de-duplicates on
                    topic TEXT NOT NULL,
                    src TEXT,
                    boot TEXT,
                    seq INTEGER,
                    body BLOB NOT NULL
                );
                PRAGMA user_version = {SCHEMA_VERSION};
                COMMIT;
                """
            )
        elif version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"{self.path}: outbox schema version {version}, expected {SCHEMA_VERSION}")
        self._db = db
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        records = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        return self._measure(records)

    def _measure(self, records: int) -> Usage:
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        self.usage = Usage(records, (pages - free) * self._page_size)
        return self.usage

    def _add(self, rows: list[Row]) -> int:
        usage = self.usage
        incoming = sum(len(r.body) + 2 * len(r.id) + len(r.topic) + ROW_OVERHEAD for r in rows)
        limit = self.max_bytes - (self.resume_margin if self.full else 0)
        if usage.records and usage.bytes + incoming > limit:
            self.full = True
            raise OutboxFull(
                f"outbox full: {usage.records} records, {usage.bytes} of {self.max_bytes} bytes in use, "
                f"a batch of {len(rows)} needs about {incoming} more"
            )
        db = self._db
        try:
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR IGNORE INTO outbox (id, topic, src, boot, seq, body) VALUES (?, ?, ?, ?, ?, ?)",
                [(r.id, r.topic, r.src, r.boot, r.seq, r.body) for r in rows],
            )
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # disk full, I/O error, locked: nothing was stored
            self._rollback()
            raise OutboxUnavailable(f"cannot store in {self.path}: {exc}") from exc
        added = db.total_changes - before
        self.full = False
        self._measure(usage.records + added)
        return added

    def _head(self, limit: int) -> list[Row]:
        cursor = self._db.execute(
            "SELECT key, id, body, topic, src, boot, seq FROM outbox ORDER BY key LIMIT ?", (limit,)
        )
        return [
            Row(id=i, body=bytes(body), topic=topic, src=src, boot=boot, seq=seq, key=key)
            for key, i, body, topic, src, boot, seq in cursor
        ]

    def _delete(self, keys: list[int]) -> None:
        db = self._db
        try:
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM outbox WHERE key = ?", [(k,) for k in keys])
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            raise OutboxUnavailable(f"cannot delete from {self.path}: {exc}") from exc
        self._measure(self.usage.records - (db.total_changes - before))

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back by itself (SQLITE_FULL)
                self._db.execute("ROLLBACK")
