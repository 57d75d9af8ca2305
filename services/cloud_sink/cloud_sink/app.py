"""cloud-sink: accepts the forwarder's POSTs like a cloud ingest endpoint would.

POST /ingest       {"batch_id": ..., "records": [...]} with an Idempotency-Key header (and a bearer
                   token when one is configured). Every record needs a string `id` (else 400). Records
                   are de-duplicated by id: one already stored is counted as a duplicate and not
                   stored again, whatever batch it comes in (the forwarder's batches can differ
                   between retries, so batch keys alone cannot tell). A repeated Idempotency-Key is
                   counted as a duplicate batch.
GET  /stats        {"batches": distinct Idempotency-Keys, "duplicate_batches": keys received again,
                    "records": records stored (unique by id), "duplicate_records": records received
                    again by id, "unique_records": the same as "records"}
GET  /records      every stored record, in arrival order (optionally ?device=<id>)
GET  /healthz      200 when serving

The store is SQLite: in memory unless `IOTPIPE_SINK_DB_FILE` names a file, and then durable (WAL,
synchronous FULL): a restarted sink still knows every record id and batch key it has seen, so it
never counts a record twice. With `IOTPIPE_SINK_STORE_FILE`, each newly stored record is also
appended to that JSONL file.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web
from iotpipe import read_secret
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    device TEXT,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_device ON records (device);
CREATE TABLE IF NOT EXISTS batches (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('duplicate_batches', 0), ('duplicate_records', 0);
"""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTPIPE_SINK_", extra="ignore")
    service_name: ClassVar[str] = "cloud-sink"
    instance: ClassVar[str] = "0"

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token_file: Path | None = None
    db_file: Path | None = Field(None, description="durable store (SQLite); in memory when unset")
    store_file: Path | None = Field(None, description="also append each newly stored record here (JSONL)")
    max_body_bytes: int = 16 << 20
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_dir: Path | None = Field(None, validation_alias=AliasChoices("IOTPIPE_SINK_LOG_DIR", "IOTPIPE_LOG_DIR"))

    @property
    def log_file(self) -> Path | None:
        return self.log_dir / "cloud-sink.log" if self.log_dir else None


class Store:
    """Records unique by id, batch keys and the duplicate counters, in one SQLite database. Each
    call is one short transaction, run inline: the sink is a stand-in, and a commit is a fraction
    of a millisecond (the forwarder, which must not stall, uses a thread)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(":memory:" if path is None else path, isolation_level=None)
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(f"BEGIN; {SCHEMA} COMMIT;")

    def ingest(self, key: str, records: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
        """(whether the key was new, the records newly stored)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            new_key = db.execute("INSERT OR IGNORE INTO batches VALUES (?)", (key,)).rowcount == 1
            stored = [
                r
                for r in records
                if db.execute(
                    "INSERT OR IGNORE INTO records (id, device, body) VALUES (?, ?, ?)",
                    (r["id"], r.get("device") if isinstance(r.get("device"), str) else None, orjson.dumps(r)),
                ).rowcount
                == 1
            ]
            db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'duplicate_records'", (len(records) - len(stored),)
            )
            if not new_key:
                db.execute("UPDATE counters SET value = value + 1 WHERE name = 'duplicate_batches'")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new_key, stored

    def stats(self) -> dict[str, int]:
        counters = dict(self.db.execute("SELECT name, value FROM counters").fetchall())
        records = int(self.db.execute("SELECT count(*) FROM records").fetchone()[0])
        return {
            "batches": int(self.db.execute("SELECT count(*) FROM batches").fetchone()[0]),
            "duplicate_batches": int(counters["duplicate_batches"]),
            "records": records,
            "duplicate_records": int(counters["duplicate_records"]),
            "unique_records": records,
        }

    def records(self, device: str | None) -> bytes:
        """The stored records as one JSON array, without decoding them."""
        if device is None:
            rows = self.db.execute("SELECT body FROM records ORDER BY seq")
        else:
            rows = self.db.execute("SELECT body FROM records WHERE device = ? ORDER BY seq", (device,))
        return b"[" + b",".join(bytes(body) for (body,) in rows) + b"]"

    def close(self) -> None:
        self.db.close()


class Sink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.token = read_secret(settings.token_file, "sink token") if settings.token_file else None
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the store opens when the app starts")
        return self._store

    async def open(self, _app: web.Application) -> None:
        self._store = Store(self.settings.db_file)

    async def close(self, _app: web.Application) -> None:
        if self._store is not None:
            self._store.close()

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
        records = body["records"]
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
                return web.json_response({"error": f"records[{i}] has no string id"}, status=400)
        new_key, stored = self.store.ingest(key, records)
        if self.settings.store_file is not None and stored:
            with self.settings.store_file.open("ab") as fh:
                fh.write(b"".join(orjson.dumps(r) + b"\n" for r in stored))
        return web.json_response(
            {
                "status": "accepted" if new_key else "duplicate",
                "batch_id": body["batch_id"],
                "records": len(stored),
                "duplicates": len(records) - len(stored),
            }
        )

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.store.stats())

    async def list_records(self, request: web.Request) -> web.Response:
        return web.Response(body=self.store.records(request.query.get("device")), content_type="application/json")

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
    app.on_startup.append(sink.open)
    app.on_cleanup.append(sink.close)
    return app


def run(settings: Settings) -> None:
    if settings.store_file is not None:
        settings.store_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("cloud-sink listening on %s:%s, store %s", settings.host, settings.port, settings.db_file or "in memory")
    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=None, access_log=None)
