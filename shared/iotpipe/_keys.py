"""Key ring files, live: every service re-reads its own (a changed ring is used without a restart),
and `iotpipe keys` edits one a rotation step at a time, checking the steps against what the
services report (docs/operations.md, "Rotating the payload key").

A rotation is three steps, each of which must have reached every service before the next:
1. add the new key (decrypt-only, appended): every service can then open what it will seal;
2. promote it (moved first): services seal with it, and still open the old one;
3. retire the old key, once nothing sealed with it can still arrive: the message TTL after every
   service was sealing with another key (a token older than the TTL is refused whatever its key,
   so nothing sealed before then, queued at the broker or in the sensor-reader's spool, is lost).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson

from ._bus import Bus
from ._envelope import KeyRing, parse_keyring
from ._errors import ConfigError, IotpipeError, SchemaError
from ._health import Metrics, write_atomically
from ._models import KeyRingStatus, ServiceStatus, decode
from ._settings import ServiceSettings
from ._topics import Topics, validate_id

log = logging.getLogger(__name__)

# s between re-reads of the key ring file: a step reaches every service this soon (reading a file
# of a few lines costs microseconds; no inotify, which misses files replaced in bind mounts).
KEYRING_POLL = 2.0
# A message sealed with a key id the ring lacks triggers a re-read, at most this often (a flood
# of made-up key ids must not turn into a flood of file reads).
UNKNOWN_KID_RECHECK = 1.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class KeyRingFile:
    """The key ring a service runs with, re-read from its file by `check()`.

    A file that cannot be loaded (missing, unreadable, empty, a malformed line, a bad key, a
    duplicate id) is refused: logged once (its reason names the file and line, never key material),
    counted, reported in the status as `refused`, and the ring in use is kept. A service never
    stops for a bad edit and never runs without keys. At start-up a bad file is a ConfigError, as
    before (there is no ring to keep)."""

    def __init__(self, path: Path, metrics: Metrics | None = None) -> None:
        self.path = path
        digest, self.ring = self._load()
        self._loaded = self._refused_digest = digest
        self.since = _now_ms()
        self.refused: str | None = None
        self._last_check = time.monotonic()
        counter = (metrics or Metrics()).counter(
            "iotpipe_keyring_reloads", "Key ring file changes: loaded, or refused (the ring in use kept)", ("result",)
        )
        self._loaded_count, self._refused_count = counter.labels("loaded"), counter.labels("refused")

    def _load(self) -> tuple[str, KeyRing]:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read key ring file {str(self.path)!r}: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"key ring file {str(self.path)!r} is not UTF-8 text") from None
        return digest, KeyRing(parse_keyring(text, str(self.path)))

    def check(self) -> KeyRing | None:
        """Re-read the file; the new ring if it changed and loads, else None."""
        self._last_check = time.monotonic()
        try:
            digest, ring = self._load()
        except ConfigError as exc:
            reason = str(exc)
            if reason != self.refused:  # once per distinct problem, not every poll
                self.refused = reason
                self._refused_count.inc()
                log.error(
                    "key ring file refused, still using %s (encrypting with %s): %s",
                    ", ".join(self.ring.kids),
                    self.ring.primary_kid,
                    reason,
                )
            return None
        if digest == self._loaded:
            if self.refused is not None:
                log.info("key ring file %s is loadable again (unchanged)", self.path)
                self.refused = None
            return None
        old = self.ring
        self.ring, self._loaded, self.refused = ring, digest, None
        if ring.primary_kid != old.primary_kid:
            self.since = _now_ms()
        self._loaded_count.inc()
        log.info(
            "key ring reloaded from %s: encrypting with %s, decrypting %s (was %s, encrypting with %s)",
            self.path,
            ring.primary_kid,
            ", ".join(ring.kids),
            ", ".join(old.kids),
            old.primary_kid,
        )
        return ring

    def check_soon(self) -> KeyRing | None:
        """`check()`, unless the file was read less than UNKNOWN_KID_RECHECK s ago."""
        if time.monotonic() - self._last_check < UNKNOWN_KID_RECHECK:
            return None
        return self.check()

    def status(self) -> dict[str, Any]:
        return keyring_status(self.ring, self.since, self.refused)


def keyring_status(ring: KeyRing, since: int, refused: str | None = None) -> dict[str, Any]:
    """What a service reports of its key ring (iotpipe._models.KeyRingStatus): ids only."""
    doc: dict[str, Any] = {"kids": list(ring.kids), "encrypts": ring.primary_kid, "since": since}
    if refused is not None:
        doc["refused"] = refused[:200]
    return doc


# -- editing a key ring file (`iotpipe keys add / promote / retire`) -----------------------------


@dataclass
class RingFile:
    """A key ring file as `iotpipe keys` edits it: its comment lines (kept, at the top) and its
    `(kid, key)` lines in order. `save()` refuses to write a ring that would not load."""

    path: Path
    comments: list[str] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> RingFile:
        """The file as it is; a ConfigError (naming the file and line) if it would not load: a
        broken ring is never edited."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read key ring file {str(path)!r}: {why}") from None
        keys = parse_keyring(text, str(path))
        KeyRing(keys)
        comments = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
        return cls(path, comments, [(kid, key.decode("ascii")) for kid, key in keys])

    @property
    def kids(self) -> list[str]:
        return [kid for kid, _ in self.keys]

    def key_line(self, kid: str) -> str:
        """The `<kid> <key>` line of `kid` (to copy it into another host's ring: `add --from`)."""
        for k, key in self.keys:
            if k == kid:
                return f"{k} {key}"
        raise ConfigError(f"{kid!r} is not in the key ring {str(self.path)!r} (it holds {', '.join(self.kids)})")

    def add(self, kid: str, key: str) -> None:
        validate_id(kid, "key id")
        if kid in self.kids:
            raise ConfigError(f"{kid!r} is already in the key ring {str(self.path)!r}")
        KeyRing([(kid, key.encode("ascii", "replace"))])  # a valid Fernet key, or a ConfigError naming only kid
        self.keys.append((kid, key))

    def promote(self, kid: str) -> None:
        line = self.key_line(kid).split()
        self.keys = [(line[0], line[1])] + [(k, v) for k, v in self.keys if k != kid]

    def retire(self, kid: str) -> None:
        self.key_line(kid)
        if self.kids[0] == kid:
            raise ConfigError(
                f"{kid!r} is the key that encrypts: promote its successor first (`iotpipe keys promote <kid>`)"
            )
        self.keys = [(k, v) for k, v in self.keys if k != kid]

    def save(self) -> None:
        """Replace the file atomically (a new file renamed over it, so a service reading it sees the
        old ring or the new one, never half of either), keeping its mode and owner."""
        KeyRing((k, v.encode("ascii", "replace")) for k, v in self.keys)  # never write a ring that cannot load
        text = "".join(f"{c}\n" for c in self.comments) + "".join(f"{k} {v}\n" for k, v in self.keys)
        write_atomically(self.path, text.encode(), like=self.path.stat())
        dir_fd = os.open(self.path.parent, os.O_RDONLY)  # the rename survives a crash once its directory is synced
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def key_from(path: Path, kid: str) -> str:
    """The key of `kid` in a key ring file, or in a file holding the one line `iotpipe keygen` prints."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {str(path)!r}: {why}") from None
    for k, key in parse_keyring(text, str(path)):
        if k == kid:
            return key.decode("ascii", "replace")
    raise ConfigError(f"{str(path)!r} has no line for {kid!r}")


# -- what the services report, and what each step needs of it --------------------------------------


@dataclass(frozen=True)
class ServiceKeys:
    """One service instance's report: its state, when it reported, and its key ring (None if it
    reports none: a version from before live rotation, or a status that could not be read)."""

    name: str  # <service>/<instance>
    state: str
    ts: int
    keyring: KeyRingStatus | None

    def describe_ring(self) -> str:
        if self.keyring is None:
            return "no key ids reported"
        return f"holds {', '.join(self.keyring.kids)}, encrypts with {self.keyring.encrypts}"


def _keyring_of(doc: Any) -> KeyRingStatus | None:
    try:
        return msgspec.convert(doc, KeyRingStatus) if doc is not None else None
    except msgspec.ValidationError:
        return None


def statuses_from_health(health_dir: Path) -> list[ServiceKeys]:
    """The services' reports from their health files (services that share this host's health dir)."""
    out = []
    for path in sorted(health_dir.glob("*.json")):
        try:
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if not isinstance(doc, dict) or "service" not in doc:
            continue
        name = f"{doc.get('service')}/{doc.get('instance')}"
        out.append(ServiceKeys(name, str(doc.get("state")), int(doc.get("ts") or 0), _keyring_of(doc.get("keyring"))))
    return out


async def statuses_from_broker(
    settings: ServiceSettings, client_id: str, *, quiet: float = 0.5, timeout: float = 15.0
) -> list[ServiceKeys]:
    """The services' retained statuses, read as the read-only user `settings` names (its password
    file). Retained messages come right after the subscription is acknowledged, and before any
    live one (heartbeats keep coming, without the retain flag): the read ends once no retained
    message has come for `quiet` s (newer live statuses seen by then are used too)."""
    topics = Topics(settings.base_topic)
    prefix = f"{topics.root}/status/service/"
    found: dict[str, ServiceKeys] = {}
    arrived = asyncio.Event()

    async def collect(messages: Sequence[Any]) -> None:
        for m in messages:
            name = m.topic[len(prefix) :]
            if not m.payload:  # a cleared status: that instance left for good
                found.pop(name, None)
                continue
            try:
                status: ServiceStatus = decode(m.payload, ServiceStatus)
                found[name] = ServiceKeys(name, status.state, status.ts, status.keyring)
            except SchemaError:
                found[name] = ServiceKeys(name, "unreadable", 0, None)
            if m.retain:
                arrived.set()

    mqtt = settings.mqtt.model_copy(update={"session_expiry": 0, "connect_timeout": timeout})
    bus = Bus(
        mqtt,
        client_id=client_id,
        keyring=None,
        src=f"{settings.service_name}/keys",
        username=settings.service_name,
        password_file=settings.mqtt_password_path,
    )
    bus.subscribe(f"{prefix}+/+", collect, sealed=False)
    deadline = asyncio.get_running_loop().time() + 2 * timeout
    await bus.start()
    try:
        async with asyncio.timeout(timeout):
            await bus.wait_connected()
            await bus.subscribed.wait()
        while True:
            arrived.clear()
            try:
                async with asyncio.timeout(quiet):
                    await arrived.wait()
            except TimeoutError:
                break
            if asyncio.get_running_loop().time() > deadline:
                break  # still retained messages after all this time: read what came
    except TimeoutError:
        raise IotpipeError(
            f"no answer from the broker at {settings.mqtt.host}:{settings.mqtt.port} within {timeout:.0f} s"
        ) from None
    finally:
        await bus.stop()
    return sorted(found.values(), key=lambda s: s.name)


def _online(services: Iterable[ServiceKeys]) -> list[ServiceKeys]:
    return [s for s in services if s.state == "online"]


def promote_blockers(kid: str, services: Sequence[ServiceKeys]) -> list[str]:
    """Why `kid` must not seal yet: each online service that does not report holding it (it could
    not open what is sealed with it). Empty: every online service holds it."""
    online = _online(services)
    if not online:
        return ["no service reports online: nothing shows that any of them holds it"]
    out = []
    for s in online:
        if s.keyring is None or kid not in s.keyring.kids:
            refused = (
                f" (its key ring file was refused: {s.keyring.refused})" if s.keyring and s.keyring.refused else ""
            )
            out.append(f"{s.name} {s.describe_ring()}{refused}")
    return out


def retire_blockers(kid: str, services: Sequence[ServiceKeys], ttl: int, now_ms: int) -> list[str]:
    """Why `kid` must not be removed yet: an online service still sealing with it, or, once none
    is, less than the message TTL since the last of them stopped (what it sealed before may still
    be queued at the broker or in the sensor-reader's spool). Empty: safe."""
    online = _online(services)
    if not online:
        return ["no service reports online: nothing shows that none of them still seals with it"]
    out = [f"{s.name} {s.describe_ring()}" for s in online if s.keyring is None or s.keyring.encrypts == kid]
    if out:
        return out
    last = max(s.keyring.since for s in online if s.keyring is not None)
    if now_ms < last + ttl * 1000:
        out.append(
            f"messages sealed with {kid} may still be in flight until {_when(last + ttl * 1000)} "
            f"(the message TTL, {ttl} s, after the last service began sealing with another key, at {_when(last)})"
        )
    return out


def retirable_from(kid: str, services: Sequence[ServiceKeys], ttl: int) -> int | None:
    """Unix ms from which `retire_blockers` has nothing against `kid`, if only time stands in the way."""
    online = _online(services)
    if not online or any(s.keyring is None or s.keyring.encrypts == kid for s in online):
        return None
    return max(s.keyring.since for s in online if s.keyring is not None) + ttl * 1000


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def status_lines(ring: RingFile, services: Sequence[ServiceKeys] | None, ttl: int, now_ms: int) -> list[str]:
    """`iotpipe keys status`: the ring, each service's report, and the next step of a rotation."""
    primary, others = ring.kids[0], ring.kids[1:]
    lines = [
        f"key ring {ring.path}: encrypts with {primary}"
        + (f"; also decrypts {', '.join(others)}" if others else " (its only key)")
    ]
    if services is None:
        return lines
    lines.append("")
    if services:
        lines.append(f"{'service/instance':<36} {'state':<8} {'age':>6}  {'holds':<20} {'encrypts':<10} since")
    else:
        lines.append("no service reports its status (none running, or another IOTPIPE_BASE_TOPIC?)")
    for s in services:
        age = f"{max(0, now_ms - s.ts) / 1000:.0f}s" if s.ts else "-"
        if s.keyring is None:
            lines.append(f"{s.name:<36} {s.state:<8} {age:>6}  (no key ids reported)")
            continue
        k = s.keyring
        lines.append(
            f"{s.name:<36} {s.state:<8} {age:>6}  {','.join(k.kids):<20} {k.encrypts:<10} {_when(k.since)}"
            + (f"  REFUSED its key ring file: {k.refused}" if k.refused else "")
        )
    lines.append("")
    lines.append("next:")
    if not others:
        lines.append("  to rotate: iotpipe keys add <new kid>  (step 1: every service then also decrypts it)")
    lagging = [s for s in _online(services) if s.keyring is None or s.keyring.encrypts != primary]
    if lagging:
        lines.append(
            f"  {primary} encrypts in this file, but {', '.join(f'{s.name} ({s.describe_ring()})' for s in lagging)}: "
            "wait a few seconds for them to re-read their key ring, or on another host promote it there too"
        )
    for kid in others:
        blockers = promote_blockers(kid, services)
        if blockers:
            lines.append(
                f"  {kid}: not held by every service yet: {'; '.join(blockers)}. Wait a few seconds for them "
                f"to re-read their key ring; on another host: "
                f"iotpipe keys add {kid} --keyring <its file> --from {ring.path}"
            )
            continue
        step = f"  {kid}: held by every service: `iotpipe keys promote {kid}` makes it the key that encrypts (step 2)"
        after = retirable_from(kid, services, ttl)
        if after is not None:
            when = "now" if after <= now_ms else f"from {_when(after)} (the message TTL after its last use)"
            step += f"; or, if it is the old key, `iotpipe keys retire {kid}` (step 3) is safe {when}"
        lines.append(step)
    return lines
