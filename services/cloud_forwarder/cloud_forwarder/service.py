"""cloud-forwarder: processed windows and alerts, through a durable outbox, POSTed to the cloud without loss.

Two halves joined by the outbox (cloud_forwarder.outbox, SQLite):
- the bus handlers turn each batch of MQTT messages into records, store them in the outbox in one
  transaction and return, so the bus acknowledges the messages: the broker's queue for us stays
  small however long the cloud is away, because the outbox holds the backlog. When the outbox is
  at its disk budget the handler raises OutboxFull (a RetryableError, dependency "outbox"): the bus
  holds the batch unacknowledged and retries it, the broker queues the rest (bounded by
  ReceiveMaximum in flight), and nothing is dropped. The forwarder logs it once, counts it
  (`iotpipe_outbox_full`) and says `"full": true` in its health until a batch fits again;
- the uploader (`run()`) POSTs the oldest records, up to `IOTPIPE_BATCH_MAX` per request, and
  deletes them on 2xx. Each request carries an `Idempotency-Key` derived from its record ids, so a
  retried POST is recognisable as the same batch; the cloud de-duplicates by record id anyway.

Errors: connection errors, timeouts, 5xx, 401, 403, 408, 425 and 429 are CloudUnavailable,
retried by `iotpipe.Outage` (the bus's mechanism: capped jittered backoff, Retry-After honoured,
said once when waiting starts and once when it ends), each retry with the oldest records (the same
ones, under the same key, unless the batch was not yet full and more arrived); any other 4xx is
CloudRejected: the batch is bisected until the records the cloud refuses are alone, the rest are
uploaded, and each refused record is dead-lettered (`cloud_rejected`, its JSON as the payload) and
deleted. 401/403 are retried rather than bisected: they refuse us, not a record, and bisecting
them would dead-letter the whole backlog.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from iotpipe import (
    Alert,
    AlertRecord,
    CloudRecord,
    Component,
    Opened,
    Outage,
    PermanentError,
    Processed,
    RetryableError,
    Runtime,
    ServiceSettings,
    WindowRecord,
    encode,
    read_secret,
)
from pydantic import Field, field_validator

from .outbox import Outbox, OutboxFull, Row, Synchronous

log = logging.getLogger(__name__)

# Retried, not refused: the cloud is busy or overloaded (408, 425, 429, 5xx), or refuses *us* (401,
# 403: a token to fix, after which everything held goes through).
RETRYABLE_STATUS = frozenset({401, 403, 408, 425, 429})
# An uploader step that failed in a way nobody foresaw waits this long before trying again.
UPLOADER_BUG_DELAY = 1.0


class Settings(ServiceSettings):
    service_name = "cloud-forwarder"

    cloud_url: str = "http://localhost:8080/ingest"
    cloud_token_file: Path | None = Field(None, description="bearer token, read from this file")
    batch_max: int = Field(
        1000, ge=1, le=10_000, description="records per POST at most (about 250 KB at 1,000 windows)"
    )
    batch_linger: float = Field(1.0, ge=0, description="s to wait for a POST to fill")
    request_timeout: float = Field(10.0, gt=0)
    retry_max_delay: float = Field(30.0, gt=0, description="cap on the delay between upload retries")
    outbox_file: Path | None = Field(
        None, description="the durable outbox (SQLite); default <state_dir>/cloud-forwarder-<instance>.outbox.sqlite3"
    )
    outbox_max_bytes: int = Field(1 << 30, ge=1 << 15, description="disk budget of the outbox")
    outbox_synchronous: Synchronous = Field("FULL", description="SQLite synchronous level of the outbox")

    @field_validator("outbox_synchronous", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def outbox_path(self) -> Path:
        return self.outbox_file or self.state_dir / f"{self.service_name}-{self.instance}.outbox.sqlite3"


class CloudRejected(PermanentError):
    reason = "cloud_rejected"


class CloudUnavailable(RetryableError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, dependency="cloud", retry_after=retry_after)


def window_records(message: Opened[Processed]) -> list[CloudRecord]:
    return [WindowRecord(id=f"{w.device}/{w.sensor}/{w.start}", **_fields(w)) for w in message.data.windows]


_window_json = msgspec.json.Encoder().encode


class _RecordEnd(msgspec.Struct):
    """What the end-to-end lag needs of a stored record's JSON: a window's end (alerts have none)."""

    type: str
    end: int | None = None


_record_end = msgspec.json.Decoder(_RecordEnd).decode


def window_ends(rows: Sequence[Row]) -> list[int]:
    """The ends (unix ms) of the windows among `rows`, read from their stored JSON."""
    ends = []
    for row in rows:
        record = _record_end(row.body)
        if record.type == "window" and record.end is not None:
            ends.append(record.end)
    return ends


def window_rows(message: Opened[Processed]) -> list[Row]:
    """Outbox rows of a processed message's windows: the same JSON as `encode(WindowRecord)` (the
    `type` tag, then the window's fields and `id`), written directly from each window: building a
    WindowRecord per window cost about a third of the forwarder's CPU at 20,000 windows/s."""
    topic, src, boot, seq = message.topic, message.src, message.boot, message.seq
    rows = []
    for w in message.data.windows:
        record_id = f"{w.device}/{w.sensor}/{w.start}"
        body = b'{"type":"window",' + _window_json(w)[1:-1] + b',"id":' + _window_json(record_id) + b"}"
        rows.append(Row(record_id, body, topic, src, boot, seq))
    return rows


def alert_record(message: Opened[Alert]) -> AlertRecord:
    alert = message.data
    fields = _fields(alert)
    return AlertRecord(
        id=f"{alert.device}/alert/{message.src}/{message.boot}/{message.seq}",
        kind=alert.kind,
        **fields,
    )


def _fields(value: Any) -> dict[str, Any]:
    return {f: getattr(value, f) for f in value.__struct_fields__}


def batch_id(records: Sequence[CloudRecord | Row]) -> str:
    digest = hashlib.sha256("\n".join(sorted(r.id for r in records)).encode()).hexdigest()
    return digest[:32]


def batch_body(key: str, rows: Sequence[Row]) -> bytes:
    """A CloudBatch's JSON from the records' stored JSON, without decoding them again."""
    return b'{"batch_id":"' + key.encode() + b'","records":[' + b",".join(r.body for r in rows) + b"]}"


def outbox_rows(message: Opened[Any], records: Sequence[CloudRecord]) -> list[Row]:
    return [Row(r.id, encode(r), message.topic, message.src, message.boot, message.seq) for r in records]


class CloudForwarder(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
        s = self.settings
        self.token = read_secret(s.cloud_token_file, "cloud token") if s.cloud_token_file else None
        self.outbox = Outbox(s.outbox_path, s.outbox_max_bytes, s.outbox_synchronous)
        if self.outbox.records:
            log.info(
                "outbox %s holds %d record(s) from before: uploading them first", s.outbox_path, self.outbox.records
            )
        # Built here, not in run(): deliveries can start as soon as the bus connects.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.request_timeout))
        metrics = runtime.metrics
        self.uploaded = metrics.counter("iotpipe_records_uploaded", "Records accepted by the cloud")
        self.batches = metrics.counter("iotpipe_batches", "Upload requests by outcome", ("outcome",))
        self.stored = metrics.counter(
            "iotpipe_outbox_records", "Records offered to the outbox, by outcome", ("outcome",)
        )
        self.full_count = metrics.counter(
            "iotpipe_outbox_full", "Times the outbox reached its disk budget and acknowledging stopped"
        )
        self.full = False
        self._full_since = 0.0
        metrics.queues.add("outbox", lambda: self.outbox.usage.records, lambda: self.outbox.usage.bytes)
        self.cloud = Outage(s.retry_max_delay, log, on_retry=metrics.errors.labels("retry").inc)
        self._added = asyncio.Event()
        # A batch is one outbox transaction: as many messages as the broker may have in flight to us.
        options: dict[str, Any] = {"batch": s.mqtt.receive_maximum, "retry_max_delay": s.retry_max_delay}
        # Processed messages hold up to 500 windows each: 16 of them are one outbox transaction of up
        # to 8,000 records, short enough that the uploader's reads and deletes are never stuck behind it.
        runtime.bus.subscribe(
            runtime.topics.all("processed"), self.store_windows, model=Processed, **{**options, "batch": 16}
        )
        runtime.bus.subscribe(runtime.topics.all("alerts"), self.store_alerts, model=Alert, **options)

    # -- MQTT -> outbox ---------------------------------------------------------------------------
    async def store_windows(self, messages: Sequence[Opened[Processed]]) -> None:
        await self.store([row for m in messages for row in window_rows(m)])

    async def store_alerts(self, messages: Sequence[Opened[Alert]]) -> None:
        await self.store([row for m in messages for row in outbox_rows(m, [alert_record(m)])])

    async def store(self, rows: list[Row]) -> None:
        """Durable in the outbox when this returns (the bus then acknowledges the messages)."""
        try:
            added = await self.outbox.add(rows)
        except OutboxFull as exc:
            if not self.full:
                self.full = True
                self._full_since = asyncio.get_running_loop().time()
                self.full_count.inc()
                log.error("%s: no longer acknowledging MQTT messages until uploads make room", exc)
            raise
        if self.full:
            self.full = False
            waited = asyncio.get_running_loop().time() - self._full_since
            log.info("outbox has room again after %.0fs: acknowledging MQTT messages", waited)
        self.stored.labels("added").inc(added)
        if len(rows) > added:
            self.stored.labels("duplicate").inc(len(rows) - added)
        self._added.set()

    # -- outbox -> cloud --------------------------------------------------------------------------
    async def run(self) -> None:
        """Upload the outbox, oldest first, for as long as the service runs."""
        while True:
            try:
                await self._batch_ready()
                await self._deliver_oldest()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug, or the outbox failing outside an upload: never stop uploading
                self.runtime.metrics.errors.labels("uploader").inc()
                log.exception("uploader step failed; trying again in %.0fs", UPLOADER_BUG_DELAY)
                await asyncio.sleep(UPLOADER_BUG_DELAY)

    async def _batch_ready(self) -> None:
        """Once there are `batch_max` records, or `batch_linger` after the first one."""
        s = self.settings
        while not self.outbox.records:
            self._added.clear()
            if not self.outbox.records:
                await self._added.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.batch_linger
        while self.outbox.records < s.batch_max and (remaining := deadline - loop.time()) > 0:
            self._added.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._added.wait()
            except TimeoutError:
                break

    async def _deliver_oldest(self) -> None:
        """Upload the oldest `batch_max` records, retrying while the cloud is unavailable. Each retry
        takes the oldest records afresh, so the first POST after an outage is a full one (with
        nothing new in the outbox they are the same records, so the same Idempotency-Key)."""
        batch: list[Row] = []

        async def attempt() -> None:
            batch[:] = await self.outbox.head(self.settings.batch_max)
            if batch:
                await self._upload(batch)

        try:
            await self.cloud.run(attempt, f"{self.outbox.records} record(s) in the outbox")
        except CloudRejected as exc:
            self.batches.labels("rejected").inc()
            await self._split(list(batch), exc)

    async def _deliver(self, rows: Sequence[Row]) -> None:
        """Upload exactly `rows` (part of a refused batch), retrying while the cloud is unavailable."""
        try:
            await self.cloud.run(lambda: self._upload(rows), f"{len(rows)} record(s)")
        except CloudRejected as exc:
            self.batches.labels("rejected").inc()
            await self._split(rows, exc)

    async def _split(self, rows: Sequence[Row], exc: CloudRejected) -> None:
        """The cloud refused `rows` (4xx): halve them until each refused record is alone, upload the
        rest, and dead-letter (and delete) each record refused alone."""
        if len(rows) > 1:
            middle = len(rows) // 2
            await self._deliver(rows[:middle])
            await self._deliver(rows[middle:])
            return
        (row,) = rows
        log.warning("cloud refused record %s (%s): dead-lettered", row.id, exc)
        self.runtime.bus.dead_letters.write(
            reason=CloudRejected.reason,
            error=str(exc),
            topic=row.topic,
            payload=row.body,
            id=row.id,
            src=row.src,
            boot=row.boot,
            seq=row.seq,
        )
        await self.outbox.delete(rows)

    async def _upload(self, rows: Sequence[Row]) -> None:
        """One try: POST, then (2xx) delete. An outbox error after the 2xx is retried with the POST:
        the cloud sees the same Idempotency-Key and the same record ids again, and keeps them once."""
        key = batch_id(rows)
        try:
            await self._post(batch_body(key, rows), key)
        except CloudUnavailable:
            self.batches.labels("retried").inc()
            raise
        accepted_ms = time.time_ns() // 1_000_000
        await self.outbox.delete(rows)
        self.batches.labels("accepted").inc()
        self.uploaded.inc(len(rows))
        self.runtime.metrics.lag.observe("delivered", accepted_ms, window_ends(rows))

    async def _post(self, body: bytes, key: str) -> None:
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with self.session.post(self.settings.cloud_url, data=body, headers=headers) as response:
                if 200 <= response.status < 300:
                    return
                text = (await response.text())[:200]
                if response.status >= 500 or response.status in RETRYABLE_STATUS:
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    raise CloudUnavailable(f"HTTP {response.status}: {text}", retry_after)
                raise CloudRejected(f"HTTP {response.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CloudUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def health(self) -> dict[str, Any]:
        usage = self.outbox.usage
        return {
            "cloud": "down" if self.cloud.waiting_on == "cloud" else "up",
            "outbox": {"records": usage.records, "bytes": usage.bytes, "full": self.full},
        }

    async def close(self) -> None:
        await self.session.close()
        await self.outbox.close()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (0 included); None when absent or an HTTP-date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
