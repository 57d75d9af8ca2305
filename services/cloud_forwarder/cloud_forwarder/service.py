"""cloud-forwarder: processed windows and alerts, batched and POSTed to the cloud without loss.

Nothing is acknowledged to the broker until the cloud accepted the batch (2xx), so the broker's
durable session is the spool: a dead forwarder or a cloud outage loses nothing, and ReceiveMaximum
bounds what we hold in memory. Each batch carries an `Idempotency-Key` derived from the identities
of its records, so a retried POST is recognisable as the same batch.

Errors split the way `backoff` needs: connection errors, timeouts, 5xx, 408 and 429 are retried
with jittered exponential backoff bounded by `retry_max_time` per round (then logged and retried in
a new round: data is never dropped for being slow); any other 4xx is permanent, so the batch is
written to the dead-letter file, counted, and acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import backoff
import orjson
from iotpipe import (
    Opened,
    PermanentError,
    RetryableError,
    Runtime,
    ServiceSettings,
    Topics,
    read_secret,
    run_service,
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
    retry_max_time: float = Field(60.0, gt=0, description="s of retries before logging and starting over")
    retry_max_delay: float = Field(30.0, gt=0)
    dead_letter_file: Path = Path("var/cloud-forwarder/dead-letter.jsonl")


class CloudRejected(PermanentError):
    pass


class CloudUnavailable(RetryableError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def to_records(message: Opened, kind: str) -> list[dict[str, Any]]:
    data = message.data if isinstance(message.data, dict) else {"value": message.data}
    device = Topics.device_of(message.topic)
    if kind == "processed" and isinstance(data.get("windows"), list):
        return [
            {"type": "window", "id": f"{device}/{w.get('sensor')}/{w.get('start')}", "device": device, **w}
            for w in data["windows"]
            if isinstance(w, dict)
        ]
    return [
        {"type": "alert", "id": f"{device}/alert/{message.src}/{message.boot}/{message.seq}", "device": device, **data}
    ]


def batch_id(records: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256("\n".join(sorted(r["id"] for r in records)).encode()).hexdigest()
    return digest[:32]


class CloudForwarder:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings  # type: ignore[assignment]
        s = self.settings
        self.token = read_secret(s.cloud_token_file, "cloud token") if s.cloud_token_file else None
        # Built here, not in run(): deliveries can start as soon as the bus connects.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.request_timeout))
        self.uploaded = runtime.metrics.counter("iotpipe_records_uploaded", "Records accepted by the cloud")
        self.batches = runtime.metrics.counter("iotpipe_batches", "Upload batches by outcome", ("outcome",))
        self.dead = runtime.metrics.counter("iotpipe_records_dead_lettered", "Records the cloud refused")
        self._cloud_down = False
        # Built once: a round of jittered retries bounded by retry_max_time (upload() starts new rounds).
        self._post_with_retries = backoff.on_exception(
            backoff.expo,
            CloudUnavailable,
            max_time=s.retry_max_time,
            max_value=s.retry_max_delay,
            jitter=backoff.full_jitter,
            on_backoff=self._on_cloud_failing,
            logger=None,
        )(self._attempt)
        for kind in ("processed", "alerts"):
            runtime.bus.subscribe(
                runtime.topics.all(kind), self._handler(kind), batch=s.batch_max, linger=s.batch_linger
            )

    def _handler(self, kind: str):  # type: ignore[no-untyped-def]
        async def handle(messages: Sequence[Opened]) -> None:
            records = [r for m in messages for r in to_records(m, kind)]
            if records:
                await self.upload(records)

        return handle

    async def upload(self, records: list[dict[str, Any]]) -> None:
        key = batch_id(records)
        body = orjson.dumps({"batch_id": key, "records": records})
        while True:
            try:
                await self._post_with_retries(body, key)
            except CloudUnavailable as exc:
                # A whole round of retries failed: keep the batch (unacknowledged) and go again.
                log.warning(
                    "cloud still unavailable after %.0fs (%s); retrying batch %s",
                    self.settings.retry_max_time,
                    exc,
                    key,
                )
                self.batches.labels("retry_round").inc()
                continue
            except CloudRejected as exc:
                self._dead_letter(body, len(records), str(exc))
                return
            break
        if self._cloud_down:
            self._cloud_down = False
            log.info("cloud is accepting uploads again")
        self.batches.labels("accepted").inc()
        self.uploaded.inc(len(records))

    def _on_cloud_failing(self, details: Any) -> None:
        self.batches.labels("retried").inc()
        if not self._cloud_down:
            self._cloud_down = True
            log.error("cloud upload failing (%s); retrying with backoff", details.get("exception"))

    async def _attempt(self, body: bytes, key: str) -> None:
        await self._post(body, key)  # looked up per call (tests wrap _post to script the cloud)

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
                    if retry_after:
                        # Honour the server's pacing, capped so one header cannot stall us for long.
                        await asyncio.sleep(min(retry_after, self.settings.retry_max_delay))
                    raise CloudUnavailable(f"HTTP {response.status}: {text}", retry_after)
                raise CloudRejected(f"HTTP {response.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CloudUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _dead_letter(self, body: bytes, count: int, why: str) -> None:
        log.error(
            "cloud refused batch of %d records permanently (%s); written to %s",
            count,
            why,
            self.settings.dead_letter_file,
        )
        path = self.settings.dead_letter_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as fh:
            fh.write(orjson.dumps({"why": why, "batch": orjson.Fragment(body)}) + b"\n")
        self.batches.labels("dead_lettered").inc()
        self.dead.inc(count)

    async def run(self) -> None:
        await asyncio.Event().wait()

    def health(self) -> dict[str, Any]:
        return {"cloud": "down" if self._cloud_down else "up"}

    async def close(self) -> None:
        await self.session.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff


def run(settings: Settings) -> None:
    run_service(settings, CloudForwarder)
