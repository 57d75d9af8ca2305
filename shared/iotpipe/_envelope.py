"""Sealed envelope v1: Fernet tokens with key ids, bound to topic, sender, boot and sequence.

Wire format (UTF-8 JSON):   {"v":1,"alg":"fernet","kid":"<key id>","ct":"<Fernet token>"}
Inside the token (JSON):    {"topic","src","boot","seq","ts","data"}

Fernet authenticates but carries no associated data, so everything a receiver must check goes
inside the ciphertext: the topic (a token replayed onto another device's topic is rejected), the
sender and its boot id plus a per-boot sequence number (a replay is dropped by a sliding window).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import msgspec
import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ._errors import (
    ConfigError,
    DuplicateMessage,
    MalformedEnvelope,
    SchemaError,
    StaleMessage,
    TopicMismatch,
    UndecryptableToken,
)
from ._models import MAX_INT, UnixMs, decode, encode, validation_message
from ._topics import ID_PATTERN

ENVELOPE_VERSION = 1
ALGORITHM = "fernet"
_ENVELOPE_KEYS = frozenset({"v", "alg", "kid", "ct"})
T = TypeVar("T")


class _Sealed(msgspec.Struct, forbid_unknown_fields=True):
    """What a token holds: exactly these keys. `data` is kept undecoded (a slice of the plaintext)
    until the envelope checks passed, then decoded straight into the subscriber's model."""

    topic: str
    src: str
    boot: str
    seq: Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]  # a Sealer counts from 1; ReplayGuard.dump needs <2**64
    ts: UnixMs
    data: msgspec.Raw


_sealed_decoder = msgspec.json.Decoder(_Sealed)


class KeyRing:
    """Named Fernet keys. The first encrypts; every key decrypts (so rotation never needs downtime:
    add the new key everywhere, then move it first, then retire the old one: iotpipe._keys, where
    services also re-read their ring file as it changes). Immutable: a new ring replaces it."""

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        self._keys = list(keys)
        if not self._keys:
            raise ConfigError("key ring is empty: it needs at least one '<kid> <fernet key>' line")
        kids = [kid for kid, _ in self._keys]
        if len(set(kids)) != len(kids):
            raise ConfigError("key ring has a duplicate key id")
        fernets = []
        for kid, key in self._keys:
            if not ID_PATTERN.fullmatch(kid):
                raise ConfigError(f"key ring: invalid key id {kid!r:.80} (must match {ID_PATTERN.pattern})")
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError) as exc:
                # Never echo the key itself.
                raise ConfigError(f"key ring: key {kid!r} is not a valid Fernet key") from exc
        self.primary_kid = kids[0]
        self.kids = tuple(kids)
        self._multi = MultiFernet(fernets)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read key ring file {str(path)!r}: {why}") from None
        return cls(parse_keyring(text, str(path)))

    @staticmethod
    def generate_line(kid: str) -> str:
        return f"{kid} {Fernet.generate_key().decode()}"

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._multi.encrypt(plaintext)

    def decrypt(self, token: bytes, ttl: int | None) -> bytes:
        return self._multi.decrypt(token, ttl=ttl)


def parse_keyring(text: str, source: str) -> list[tuple[str, bytes]]:
    """The `(kid, key)` pairs of a key ring file's text, in order: `<kid> <fernet key>` lines, blank
    lines and `#` comments skipped. Errors name `source` and the line number, never its content."""
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"key ring {source!r} line {lineno}: expected '<kid> <fernet key>'")
        keys.append((parts[0], parts[1].encode("ascii", "replace")))
    return keys


@dataclass(frozen=True, slots=True)
class Opened(Generic[T]):
    """A verified message: who sealed it (`src`, `boot`, `seq`), when (`ts`, unix ms), and its
    payload, decoded and validated as the subscriber's model."""

    topic: str
    src: str
    boot: str
    seq: int
    ts: int
    data: T


def loads_strict(payload: bytes) -> Any:
    """JSON that refuses NaN/Infinity and overflowing numbers (1e999) and survives deep nesting."""
    try:
        value = orjson.loads(payload)  # orjson: no NaN/Infinity literals, nesting capped at 1024
    except orjson.JSONDecodeError as exc:
        raise MalformedEnvelope(f"not JSON: {exc}") from exc
    if not _all_finite(value):
        raise MalformedEnvelope("non-finite number")
    return value


def _all_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class Sealer:
    """Seals messages from one sender (`src` = service/instance) for one process start."""

    def __init__(self, keyring: KeyRing, src: str) -> None:
        self.keyring = keyring
        self.src = src
        self.boot = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)

    def seal(self, topic: str, data: Any) -> bytes:
        """`data` is a model of iotpipe._models (or plain JSON values)."""
        inner = {
            "topic": topic,
            "src": self.src,
            "boot": self.boot,
            "seq": next(self._seq),
            "ts": time.time_ns() // 1_000_000,
            "data": data,
        }
        ring = self.keyring  # once: a reload may replace it (iotpipe._keys), never mid-message
        token = ring.encrypt(encode(inner))
        return orjson.dumps(
            {"v": ENVELOPE_VERSION, "alg": ALGORITHM, "kid": ring.primary_kid, "ct": token.decode("ascii")}
        )


# Sequence numbers remembered per sender: as many as a publisher replays after a broker restart
# (iotpipe._mqtt.REPLAY_MAX_MESSAGES), so every replayed copy is recognised as a duplicate.
REPLAY_WINDOW = 16_384


class ReplayGuard:
    """Per-(src, boot) sliding window of seen sequence numbers (as IPsec does), bounded in senders."""

    def __init__(self, window: int = REPLAY_WINDOW, max_senders: int = 4096) -> None:
        self.window = window
        self.max_senders = max_senders
        self._state: collections.OrderedDict[tuple[str, str], list[int]] = collections.OrderedDict()
        self.changes = 0  # records since creation: whoever persists the window saves when this moves

    def dump(self) -> bytes:
        """The whole window as JSON, so duplicates stay dropped across a restart (`load`)."""
        return orjson.dumps([[src, boot, high, format(mask, "x")] for (src, boot), (high, mask) in self._state.items()])

    def load(self, data: bytes) -> None:
        """Restore what `dump` wrote; raises ValueError if it is not that."""
        try:
            rows = orjson.loads(data)
            state = collections.OrderedDict(
                ((str(src), str(boot)), [int(high), int(mask, 16) & ((1 << self.window) - 1)])
                for src, boot, high, mask in rows
            )
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"not a replay window: {exc}") from exc
        if not all(0 <= high <= MAX_INT for high, _mask in state.values()):
            # A sequence number no Sealer reaches, and `dump` (orjson: 64-bit integers) could not save.
            raise ValueError(f"not a replay window: a sequence number outside 0..{MAX_INT}")
        while len(state) > self.max_senders:
            state.popitem(last=False)
        self._state = state

    def check(self, src: str, boot: str, seq: int) -> None:
        """Raise if (src, boot, seq) was already recorded or is older than the window."""
        state = self._state.get((src, boot))
        if state is None:
            return
        high, mask = state
        if seq > high:
            return
        offset = high - seq
        if offset >= self.window:
            raise StaleMessage(f"seq {seq} is older than the replay window of {src}")
        if mask >> offset & 1:
            raise DuplicateMessage(f"seq {seq} of {src} already seen")

    def record(self, src: str, boot: str, seq: int) -> None:
        """Remember a message once its effect is done, so a redelivery of a message whose handling
        failed is processed again rather than dropped as a duplicate."""
        self.changes += 1
        key = (src, boot)
        state = self._state.get(key)
        if state is None:
            self._state[key] = [seq, 1]
            if len(self._state) > self.max_senders:
                self._state.popitem(last=False)
            return
        self._state.move_to_end(key)
        high, mask = state
        if seq > high:
            shift = seq - high
            state[0] = seq
            state[1] = ((mask << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
        elif high - seq < self.window:
            state[1] = mask | (1 << (high - seq))


class Opener:
    """Verifies sealed messages: envelope shape, key, topic binding, replay window."""

    def __init__(
        self,
        keyring: KeyRing,
        ttl: int | None = 7 * 24 * 3600,
        max_bytes: int = 1 << 20,
        replay_window: int = REPLAY_WINDOW,
    ) -> None:
        self.keyring = keyring
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.guard = ReplayGuard(replay_window)
        # Called (before decrypting) for an envelope naming a key id the ring lacks: a service
        # re-reads its key ring file then, so a key promoted elsewhere is picked up at once.
        self.on_unknown_kid: Callable[[], object] | None = None

    def open(self, topic: str, payload: bytes, model: Any = Any) -> Opened[Any]:
        """Verify a sealed message and decode its payload as `model` (one of iotpipe._models; by
        default any strict JSON value). Raises an EnvelopeError, or SchemaError for the payload."""
        opened = self._verify(topic, payload)
        try:
            data = decode(opened.data, model, topic)
        except SchemaError as exc:
            exc.sender = {"src": opened.src, "boot": opened.boot, "seq": opened.seq}
            raise
        return Opened(topic, opened.src, opened.boot, opened.seq, opened.ts, data)

    def _verify(self, topic: str, payload: bytes) -> _Sealed:
        """Everything but the payload's schema, which is decoded only once all else passed."""
        if len(payload) > self.max_bytes:  # before any parsing or decrypting
            raise MalformedEnvelope(f"payload of {len(payload)} bytes exceeds {self.max_bytes}")
        envelope = loads_strict(payload)
        if not isinstance(envelope, dict) or envelope.keys() != _ENVELOPE_KEYS:
            raise MalformedEnvelope("not a v1 envelope (expected exactly v, alg, kid, ct)")
        # `type(...) is int`: in Python `True == 1` and `1.0 == 1`, and the contract says the integer 1.
        if type(envelope["v"]) is not int or envelope["v"] != ENVELOPE_VERSION or envelope["alg"] != ALGORITHM:
            raise MalformedEnvelope(f"unsupported envelope v={envelope['v']!r:.20} alg={envelope['alg']!r:.20}")
        token = envelope["ct"]
        if not isinstance(token, str) or not isinstance(envelope["kid"], str):
            raise MalformedEnvelope("kid and ct must be strings")
        if self.on_unknown_kid is not None and envelope["kid"] not in self.keyring.kids:
            self.on_unknown_kid()
        try:
            plaintext = self.keyring.decrypt(token.encode("ascii"), ttl=self.ttl)
        except (InvalidToken, UnicodeEncodeError) as exc:
            raise UndecryptableToken("token failed authentication (wrong key, tampered, truncated or expired)") from exc
        try:
            inner = _sealed_decoder.decode(plaintext)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise MalformedEnvelope(
                f"sealed content is not topic/src/boot/seq/ts/data: {validation_message(exc)}"
            ) from None
        except RecursionError:  # skipping `data` recurses per nesting level, like decoding it
            raise MalformedEnvelope("sealed content nested too deeply") from None
        if inner.topic != topic:
            raise TopicMismatch(f"sealed for {inner.topic[:200]!r}, arrived on {topic!r}")
        self.guard.check(inner.src, inner.boot, inner.seq)
        return inner

    def commit(self, message: Opened[Any]) -> None:
        """Record a handled message in the replay window."""
        self.guard.record(message.src, message.boot, message.seq)
