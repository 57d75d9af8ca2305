"""cloud-sink: accepts the forwarder's POSTs like a cloud ingest endpoint would.

POST /ingest       {"batch_id": ..., "records": [...]} with an Idempotency-Key header (and a bearer
                   token when one is configured). A repeated key is answered 200 and counted as a
                   duplicate, without storing the records again.
GET  /stats        {"batches", "duplicate_batches", "records", "unique_records"}
GET  /records      every stored record (optionally ?device=<id>)
GET  /healthz      200 when serving

Records are kept in memory and, when `IOTPIPE_SINK_STORE_FILE` is set, appended to that JSONL file.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web
from iotpipe import read_secret
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTPIPE_SINK_", extra="ignore")
    service_name: ClassVar[str] = "cloud-sink"
    instance: ClassVar[str] = "0"

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token_file: Path | None = None
    store_file: Path | None = None
    max_body_bytes: int = 16 << 20
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_dir: Path | None = Field(None, validation_alias=AliasChoices("IOTPIPE_SINK_LOG_DIR", "IOTPIPE_LOG_DIR"))

    @property
    def log_file(self) -> Path | None:
        return self.log_dir / "cloud-sink.log" if self.log_dir else None


class Sink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.token = read_secret(settings.token_file, "sink token") if settings.token_file else None
        self.keys: set[str] = set()
        self.records: list[dict[str, Any]] = []
        self.record_ids: set[str] = set()
        self.duplicate_batches = 0

    async def ingest(self, request: web.Request) -> web.Response:
        if self.token is not None:
            supplied = request.headers.get("Authorization", "")
            if not hmac.compare_digest(supplied.encode(), f"Bearer {self.token}".encode()):
                return web.json_response({"error": "unauthorized"}, status=401)
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": "Idempotency-Key header required"}, status=400)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("records"), list) or "batch_id" not in body:
            return web.json_response({"error": "expected {batch_id, records: [...]}"}, status=400)
        if key in self.keys:
            self.duplicate_batches += 1
            return web.json_response({"status": "duplicate", "batch_id": body["batch_id"]})
        self.keys.add(key)
        records = [r for r in body["records"] if isinstance(r, dict)]
        self.records.extend(records)
        self.record_ids.update(str(r.get("id")) for r in records)
        if self.settings.store_file is not None:
            with self.settings.store_file.open("ab") as fh:
                fh.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
        return web.json_response({"status": "accepted", "batch_id": body["batch_id"], "records": len(records)})

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "batches": len(self.keys),
                "duplicate_batches": self.duplicate_batches,
                "records": len(self.records),
                "unique_records": len(self.record_ids),
            }
        )

    async def list_records(self, request: web.Request) -> web.Response:
        device = request.query.get("device")
        rows = [r for r in self.records if device is None or r.get("device") == device]
        return web.Response(body=orjson.dumps(rows), content_type="application/json")

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"state": "online"})


def make_app(settings: Settings) -> web.Application:
    sink = Sink(settings)
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.add_routes(
        [
            web.post("/ingest", sink.ingest),
            web.get("/stats", sink.stats),
            web.get("/records", sink.list_records),
            web.get("/healthz", sink.healthz),
        ]
    )
    return app


def run(settings: Settings) -> None:
    if settings.store_file is not None:
        settings.store_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("cloud-sink listening on %s:%s", settings.host, settings.port)
    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=None, access_log=None)
