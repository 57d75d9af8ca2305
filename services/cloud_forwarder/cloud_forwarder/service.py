"""cloud-forwarder: processed windows and alerts, batched and POSTed to the cloud without loss.

Nothing is acknowledged to the broker until the cloud accepted the batch (2xx), so the broker's
durable session is the spool: a dead forwarder or a cloud outage loses nothing, and ReceiveMaximum
bounds what we hold in memory. Each batch carries an `Idempotency-Key` derived from the identities
of its records, so a retried POST is recognisable as the same batch.

Errors map onto the bus's error tree (iotpipe._bus): connection errors, timeouts, 5xx, 408, 425 and
429 are CloudUnavailable (retryable: the bus holds the batch and retries with jittered backoff,
honouring Retry-After, for as long as it takes); any other 4xx is CloudRejected (permanent: the bus
retries the batch's messages one by one and dead-letters only those the cloud still refuses).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from iotpipe import (
    Alert,
    AlertRecord,
    CloudBatch,
    CloudRecord,
    Component,
    Opened,
    PermanentError,
    Processed,
    RetryableError,
    Runtime,
    ServiceSettings,
    WindowRecord,
    encode,
    read_secret,
)
from pydantic import Field

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429})


class Settings(ServiceSettings):
    service_name = "cloud-forwarder"

    cloud_url: str = "http://localhost:8080/ingest"
    cloud_token_file: Path | None = Field(None, description="bearer token, read from this file")
    batch_max: int = Field(200, ge=1, le=10_000, description="messages per POST at most")
    batch_linger: float = Field(1.0, ge=0, description="s to wait for a batch to fill")
    request_timeout: float = Field(10.0, gt=0)
    retry_max_delay: float = Field(30.0, gt=0, description="cap on the delay between upload retries")


class CloudRejected(PermanentError):
    reason = "cloud_rejected"


class CloudUnavailable(RetryableError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, dependency="cloud", retry_after=retry_after)


def window_records(message: Opened[Processed]) -> list[CloudRecord]:
    device = message.data.device
    return [
        WindowRecord(id=f"{device}/{w.sensor}/{w.start}", device=device, **_fields(w)) for w in message.data.windows
    ]


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


def batch_id(records: Sequence[CloudRecord]) -> str:
    digest = hashlib.sha256("\n".join(sorted(r.id for r in records)).encode()).hexdigest()
    return digest[:32]


class CloudForwarder(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
        s = self.settings
        self.token = read_secret(s.cloud_token_file, "cloud token") if s.cloud_token_file else None
        # Built here, not in run(): deliveries can start as soon as the bus connects.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.request_timeout))
        self.uploaded = runtime.metrics.counter("iotpipe_records_uploaded", "Records accepted by the cloud")
        self.batches = runtime.metrics.counter("iotpipe_batches", "Upload batches by outcome", ("outcome",))
        options: dict[str, Any] = {"batch": s.batch_max, "linger": s.batch_linger, "retry_max_delay": s.retry_max_delay}
        runtime.bus.subscribe(runtime.topics.all("processed"), self.upload_windows, model=Processed, **options)
        runtime.bus.subscribe(runtime.topics.all("alerts"), self.upload_alerts, model=Alert, **options)

    async def upload_windows(self, messages: Sequence[Opened[Processed]]) -> None:
        await self.upload([r for m in messages for r in window_records(m)])

    async def upload_alerts(self, messages: Sequence[Opened[Alert]]) -> None:
        await self.upload([alert_record(m) for m in messages])

    async def upload(self, records: list[CloudRecord]) -> None:
        key = batch_id(records)
        body = encode(CloudBatch(batch_id=key, records=records))
        try:
            await self._post(body, key)
        except CloudUnavailable:
            self.batches.labels("retried").inc()
            raise
        except CloudRejected:
            self.batches.labels("rejected").inc()
            raise
        self.batches.labels("accepted").inc()
        self.uploaded.inc(len(records))

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
        return {"cloud": "down" if "cloud" in self.runtime.bus.waiting_on() else "up"}

    async def close(self) -> None:
        await self.session.close()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (0 included); None when absent or an HTTP-date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
