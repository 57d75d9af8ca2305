"""cache-writer: processed windows into Redis, idempotently, acknowledged only once written.

Keys (prefix configurable, default `iotpipe`; see docs/contract.md):
  <prefix>:latest:<device>              hash  sensor -> mean of that sensor's newest window
  <prefix>:latest_start:<device>        hash  sensor -> start (unix ms) of that window
  <prefix>:series:<device>:<sensor>     zset  score = window start (unix ms), member = window JSON,
                                              the newest `history` windows kept

One Lua script per window makes the write atomic and idempotent: a window whose start is already
in the series changes nothing (a QoS 1 redelivery, a reprocessed raw batch), and an older window
arriving late (several preprocessor instances) is added to history without overwriting `latest`.
All windows of a batch go to Redis in one pipeline round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import backoff
import orjson
import redis.asyncio as aioredis
import redis.exceptions
from iotpipe import (
    ID_PATTERN,
    MalformedEnvelope,
    Opened,
    RateLimitedLog,
    RedisSettings,
    Runtime,
    ServiceSettings,
    Topics,
    read_secret,
    redis_password_file,
    run_service,
)
from pydantic import Field, field_validator

log = logging.getLogger(__name__)

WRITE_WINDOW = """
if redis.call('ZCOUNT', KEYS[1], ARGV[1], ARGV[1]) > 0 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
local newest = redis.call('HGET', KEYS[3], ARGV[4])
if not newest or tonumber(newest) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
end
return 1
"""
NUMBER_FIELDS = ("mean", "median", "min", "max", "std")


class Settings(ServiceSettings):
    service_name = "cache-writer"

    redis: RedisSettings = RedisSettings()
    redis_prefix: str = "iotpipe"
    history: int = Field(1440, ge=1, description="windows kept per sensor")
    retry_max_delay: float = Field(10.0, gt=0, description="cap on the delay between Redis retries")

    @field_validator("redis_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"must match {ID_PATTERN.pattern}")
        return value


def parse_processed(message: Opened) -> tuple[str, list[dict[str, Any]]]:
    data = message.data
    if not isinstance(data, dict) or set(data) != {"device", "windows"}:
        raise MalformedEnvelope("processed message must have exactly device, windows")
    device, windows = data["device"], data["windows"]
    if not isinstance(device, str) or Topics.device_of(message.topic) != device:
        raise MalformedEnvelope("device does not match the topic")
    if not isinstance(windows, list) or not windows:
        raise MalformedEnvelope("windows must be a non-empty list")
    for w in windows:
        if not isinstance(w, dict) or not isinstance(w.get("sensor"), str) or not ID_PATTERN.fullmatch(w["sensor"]):
            raise MalformedEnvelope("window without a valid sensor id")
        if type(w.get("start")) is not int or type(w.get("end")) is not int or type(w.get("n")) is not int:
            raise MalformedEnvelope("window start/end/n must be integers")
        if not all(isinstance(w.get(f), int | float) for f in NUMBER_FIELDS):
            raise MalformedEnvelope("window aggregates must be numbers")
    return device, windows


class CacheWriter:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings  # type: ignore[assignment]
        r = self.settings.redis
        password_file = r.password_file or redis_password_file(self.settings.secrets_dir, "cache-writer")
        password = read_secret(password_file, "Redis password")
        self.redis = aioredis.Redis(
            host=r.host,
            port=r.port,
            db=r.db,
            username=r.username or "cache-writer",
            password=password,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self.script = self.redis.register_script(WRITE_WINDOW)
        self.written = runtime.metrics.counter("iotpipe_windows_written", "Windows newly written to Redis")
        self.duplicates = runtime.metrics.counter("iotpipe_windows_duplicate", "Windows already in Redis")
        self._rejects = RateLimitedLog(log)
        self._redis_down = False
        self._write_retrying = backoff.on_exception(
            backoff.expo,
            (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError),
            max_value=self.settings.retry_max_delay,
            jitter=backoff.full_jitter,
            on_backoff=self._on_redis_down,
            logger=None,
        )(self._write)
        runtime.bus.subscribe(runtime.topics.all("processed"), self.handle, batch=256)

    def _on_redis_down(self, details: Any) -> None:
        if not self._redis_down:
            self._redis_down = True
            rows = details["args"][0]
            log.error("Redis unavailable (%s); holding %d windows and retrying", details.get("exception"), len(rows))

    async def handle(self, messages: Sequence[Opened]) -> None:
        rows: list[tuple[str, dict[str, Any]]] = []
        for message in messages:
            try:
                device, windows = parse_processed(message)
            except MalformedEnvelope as exc:
                self.runtime.metrics.rejected.labels("schema").inc()
                self._rejects.warning("schema", "rejected processed message on %s: %s", message.topic, exc)
                continue
            rows.extend((device, w) for w in windows)
        if rows:
            await self._write_until_done(rows)

    async def _write_until_done(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """Retry while Redis is unavailable: the batch stays unacknowledged (so is redelivered if we
        die) and, through ReceiveMaximum, the broker holds the rest. Log once down, once back."""
        results = await self._write_retrying(rows)
        if self._redis_down:
            self._redis_down = False
            log.info("Redis is back")
        new = sum(results)
        self.written.inc(new)
        self.duplicates.inc(len(results) - new)

    async def _write(self, rows: list[tuple[str, dict[str, Any]]]) -> list[int]:
        prefix, history = self.settings.redis_prefix, self.settings.history
        async with self.redis.pipeline(transaction=False) as pipe:
            for device, w in rows:
                sensor = w["sensor"]
                keys = [
                    f"{prefix}:series:{device}:{sensor}",
                    f"{prefix}:latest:{device}",
                    f"{prefix}:latest_start:{device}",
                ]
                member = orjson.dumps(w, option=orjson.OPT_SORT_KEYS)
                await self.script(
                    keys=keys, args=[w["start"], member, history, sensor, repr(float(w["mean"]))], client=pipe
                )
            return [int(x) for x in await pipe.execute()]

    async def run(self) -> None:
        await asyncio.Event().wait()

    def health(self) -> dict[str, Any]:
        return {"redis": "down" if self._redis_down else "up"}

    async def close(self) -> None:
        await self.redis.aclose()


def run(settings: Settings) -> None:
    run_service(settings, CacheWriter)
