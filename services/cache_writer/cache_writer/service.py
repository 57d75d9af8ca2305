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

import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from iotpipe import (
    ID_PATTERN,
    Component,
    Opened,
    Processed,
    RedisSettings,
    RetryableError,
    Runtime,
    ServiceSettings,
    Window,
    encode_sorted,
    read_secret,
    redis_password_file,
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


class CacheWriter(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
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
        # While Redis is down the bus holds the batch unacknowledged (so it is redelivered if we die)
        # and retries; through ReceiveMaximum the broker holds the rest.
        runtime.bus.subscribe(
            runtime.topics.all("processed"),
            self.handle,
            model=Processed,
            batch=256,
            retry_max_delay=self.settings.retry_max_delay,
        )

    async def handle(self, messages: Sequence[Opened[Processed]]) -> None:
        rows = [(m.data.device, w) for m in messages for w in m.data.windows]
        try:
            results = await self._write(rows)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise RetryableError(str(exc) or type(exc).__name__, dependency="Redis") from exc
        new = sum(results)
        self.written.inc(new)
        self.duplicates.inc(len(results) - new)

    async def _write(self, rows: list[tuple[str, Window]]) -> list[int]:
        prefix, history = self.settings.redis_prefix, self.settings.history
        async with self.redis.pipeline(transaction=False) as pipe:
            for device, w in rows:
                keys = [
                    f"{prefix}:series:{device}:{w.sensor}",
                    f"{prefix}:latest:{device}",
                    f"{prefix}:latest_start:{device}",
                ]
                await self.script(
                    keys=keys, args=[w.start, encode_sorted(w), history, w.sensor, repr(w.mean)], client=pipe
                )
            return [int(x) for x in await pipe.execute()]

    def health(self) -> dict[str, Any]:
        return {"redis": "down" if "Redis" in self.runtime.bus.waiting_on() else "up"}

    async def close(self) -> None:
        await self.redis.aclose()
