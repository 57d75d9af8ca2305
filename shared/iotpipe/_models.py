"""The wire contract, once, as types: every payload the pipeline publishes or consumes.

docs/contract.md describes these; docs/schema/*.json is generated from them (`iotpipe schema`), and
a test proves the committed schema is what these models produce. The bus decodes each payload
straight into its model (`Bus.subscribe(..., model=...)`), so a handler only ever sees a value that
satisfies every rule below; a payload that does not is a counted, logged, dead-lettered `schema`
rejection and never reaches a handler.

msgspec rather than pydantic: decoding and validating a raw batch in one pass was measured faster
(tests/bench/validation.py: 7.0 vs 11.5 µs for 4 readings, 22.6 vs 34.4 µs for 100, 115 vs 135 µs
for 1,000 on the 2-core dev machine), and this runs for every message. Both refuse NaN, Infinity
and numbers that overflow a float, so every float here is finite.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, Self, TypeVar

import msgspec
import orjson
from msgspec import Meta, Struct

from ._errors import SchemaError
from ._topics import ID_PATTERN

# Ids become topic levels, Redis keys and ACL patterns: one pattern for all of them.
Id = Annotated[str, Meta(pattern=ID_PATTERN.pattern)]
# The largest integer every consumer holds exactly: a double, as Redis keeps sorted-set scores
# (window starts) and JavaScript reads every JSON number. JSON itself has no bound, so without this
# an integer of 400 digits passes decoding and breaks the first encoder or Redis write downstream.
MAX_INT = 2**53 - 1
UnixMs = Annotated[int, Meta(ge=0, le=MAX_INT, description="unix time in milliseconds")]
Count = Annotated[int, Meta(ge=0, le=MAX_INT)]
Unit = Annotated[str, Meta(max_length=32)]
Reason = Annotated[str, Meta(max_length=200)]
# A window holding more readings per sensor than this is a bug or an attack.
MAX_SAMPLES_PER_SENSOR = 1_000_000
# The longest window the sensor-reader closes (its IOTPIPE_WINDOW_MS at most). A clean stop closes
# the open windows early, so a genuine window may end up to this long after it was published.
MAX_WINDOW_MS = 3_600_000

# Reasons a window is refused by WindowBounds (counted as `iotpipe_rejected{reason}`, per window).
WINDOW_FUTURE = "window_future"
WINDOW_TOO_OLD = "window_too_old"


class _Spanned(Protocol):
    @property
    def span(self) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class WindowBounds:
    """How far from the receiving host's clock a window may lie, the same rule at every service that
    consumes windows (the bus applies it to each window of a raw or processed message).

    Future: a window cannot start after the moment it is received, so it may start at most
    `max_skew_ms` (the clock difference between hosts) after this host's clock, and end at most
    that plus the longest window after it (a window closed early at a clean stop ends in the
    future). Without this, one window dated years ahead would pin Redis `latest` for its sensor
    for good, since `latest` only moves forward.
    Past: a window may start at most `max_age_ms` before this host's clock. Genuine windows arrive
    late after an outage (the reader's spool, the broker's queues), each hop bounded by the message
    TTL, so ServiceSettings keeps this at least two TTLs (raw, then processed) and a margin."""

    max_skew_ms: int
    max_age_ms: int

    def refused(self, windows: Sequence[_Spanned], now_ms: int) -> list[tuple[int, str]]:
        """(index, reason) of each window in `windows` that lies outside the bounds at `now_ms`."""
        oldest, newest = now_ms - self.max_age_ms, now_ms + self.max_skew_ms
        newest_end = newest + MAX_WINDOW_MS
        out = []
        for index, window in enumerate(windows):
            start, end = window.span
            if start < oldest:
                out.append((index, WINDOW_TOO_OLD))
            elif start > newest or end > newest_end:
                out.append((index, WINDOW_FUTURE))
        return out

    def explain(self, window: _Spanned, now_ms: int) -> str:
        """Why `window` is refused, in words for a log line or a dead letter (times, no data)."""
        start, end = window.span
        if start < now_ms - self.max_age_ms:
            oldest = -self.max_age_ms // 1000
            return f"starts {(start - now_ms) // 1000:+d} s from this host's clock (at least {oldest:+d} s)"
        return (
            f"starts {(start - now_ms) // 1000:+d} s and ends {(end - now_ms) // 1000:+d} s from this host's clock "
            f"(at most {self.max_skew_ms // 1000:+d} s and {(self.max_skew_ms + MAX_WINDOW_MS) // 1000:+d} s)"
        )


def _within(
    payload: Any, windows: Sequence[_Spanned], bounds: WindowBounds, now_ms: int
) -> tuple[Any, list[tuple[int, str]]]:
    """`payload` with only its `windows` inside `bounds` (None if none is), and the refused ones."""
    refused = bounds.refused(windows, now_ms)
    if not refused:
        return payload, refused
    if len(refused) == len(windows):
        return None, refused
    out = {index for index, _reason in refused}
    return msgspec.structs.replace(payload, windows=[w for i, w in enumerate(windows) if i not in out]), refused


class Payload(Struct, forbid_unknown_fields=True, frozen=True):
    """Base of the sealed payloads: exactly the listed keys, nothing else."""

    def check_topic(self, topic: str) -> None:
        """Rules that need the arrival topic (the model alone cannot see it)."""

    def within(self, bounds: WindowBounds, now_ms: int) -> tuple[Self | None, list[tuple[int, str]]]:
        """Rules that need the receiver's clock: this payload without its windows outside `bounds`
        (None when none is left), and (index, reason) of those. Unlike a schema error, these
        concern one window each, so the others of the message (other devices') still go through."""
        return self, []


class DevicePayload(Payload, frozen=True):
    """A payload about one device, published on `<base>/v2/<kind>/<device>`."""

    device: Id

    def check_topic(self, topic: str) -> None:
        if topic.rsplit("/", 1)[-1] != self.device:
            raise SchemaError(f"device {self.device!r} does not match the topic")


# -- raw: sensor-reader -> preprocessor -----------------------------------------------------------
class WindowSpan(Struct, forbid_unknown_fields=True, frozen=True):
    start: UnixMs
    size: Annotated[int, Meta(gt=0, le=MAX_INT, description="window length in ms")]


class Series(Struct, forbid_unknown_fields=True, frozen=True):
    """One sensor's readings in a window: `t[i]` is when `v[i]` was read (unix ms)."""

    unit: Unit
    t: list[int]
    v: list[float]

    def __post_init__(self) -> None:
        if len(self.t) != len(self.v):
            raise ValueError("t and v must have equal length")
        if not 0 < len(self.v) <= MAX_SAMPLES_PER_SENSOR:
            raise ValueError(f"a series needs 1 to {MAX_SAMPLES_PER_SENSOR} readings")


Sensors = Annotated[dict[Id, Series], Meta(min_length=1)]
_SENSORS_LIST = list[Sensors]


class RawWindow(Struct, forbid_unknown_fields=True, frozen=True):
    """One whole tumbling window of one device: every sensor's readings in it."""

    device: Id
    window: WindowSpan
    sensors: Sensors

    def __post_init__(self) -> None:
        start, end = self.window.start, self.window.start + self.window.size
        if end > MAX_INT:  # the processed window's `end` must be a valid UnixMs too
            raise ValueError(f"window end exceeds {MAX_INT}")
        for series in self.sensors.values():
            if min(series.t) < start or max(series.t) >= end:
                raise ValueError("timestamps outside the window")

    @property
    def span(self) -> tuple[int, int]:
        """(start, end) in unix ms."""
        return self.window.start, self.window.start + self.window.size


class RawBatch(Payload, frozen=True):
    """`<base>/v2/raw/<source>`: whole windows of one or many devices, as the sensor-reader closed
    them. Many devices travel together so that a fleet of thousands of slow devices costs a few
    messages per second instead of one per device per window (contract v2)."""

    windows: Annotated[list[RawWindow], Meta(min_length=1)]

    def within(self, bounds: WindowBounds, now_ms: int) -> tuple[Self | None, list[tuple[int, str]]]:
        return _within(self, self.windows, bounds, now_ms)


class RawWindowHead(Struct, forbid_unknown_fields=True, frozen=True):
    """A raw window with its readings not decoded yet: whose, and when. Decoding and checking the
    readings is most of the cost of a raw window, so a receiver that may drop windows unseen (the
    preprocessor's per-device allowance) decides on this first, then decodes the rest with
    `raw_windows`."""

    device: Id
    window: WindowSpan
    sensors: msgspec.Raw

    @property
    def span(self) -> tuple[int, int]:
        """(start, end) in unix ms."""
        return self.window.start, self.window.start + self.window.size


class RawBatchHead(Payload, frozen=True):
    """A RawBatch as it is received when its windows' readings are decoded later (`raw_windows`)."""

    windows: Annotated[list[RawWindowHead], Meta(min_length=1)]

    def within(self, bounds: WindowBounds, now_ms: int) -> tuple[Self | None, list[tuple[int, str]]]:
        return _within(self, self.windows, bounds, now_ms)


def raw_windows(heads: Sequence[RawWindowHead]) -> list[RawWindow]:
    """The windows of `heads` with their readings, decoded and checked exactly as RawBatch's would be
    (SchemaError if one breaks the contract). All readings in one decoder call: one call per window
    cost a fifth more than decoding the whole RawBatch in one pass; this, about a twentieth."""
    if not heads:
        return []
    every: list[dict[str, Series]] = decode(b"[" + b",".join(h.sensors for h in heads) + b"]", _SENSORS_LIST)
    try:
        return [RawWindow(h.device, h.window, sensors) for h, sensors in zip(heads, every, strict=True)]
    except ValueError as exc:  # RawWindow's own rules (timestamps within the window)
        raise SchemaError(str(exc)[:300]) from None


# -- processed: preprocessor -> cache-writer, cloud-forwarder, monitor ----------------------------
class Window(Struct, forbid_unknown_fields=True, frozen=True):
    """One sensor's window after the median filter: aggregates of its `n` readings."""

    device: Id
    sensor: Id
    unit: Unit
    start: UnixMs
    end: UnixMs
    n: Annotated[int, Meta(ge=1, le=MAX_SAMPLES_PER_SENSOR)]
    mean: float
    median: float
    min: float
    max: float
    std: Annotated[float, Meta(ge=0)]

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError("a window must end after it starts")

    @property
    def span(self) -> tuple[int, int]:
        """(start, end) in unix ms."""
        return self.start, self.end


class Processed(Payload, frozen=True):
    """`<base>/v2/processed/<source>`: windows of one or many devices, each naming its device."""

    windows: Annotated[list[Window], Meta(min_length=1)]

    def within(self, bounds: WindowBounds, now_ms: int) -> tuple[Self | None, list[tuple[int, str]]]:
        return _within(self, self.windows, bounds, now_ms)


# -- health: sensor-reader -> monitor -------------------------------------------------------------
# The longest a health report may say it holds: a report is renewed every heartbeat, so an hour is
# far beyond any sane IOTPIPE_STATUS_INTERVAL, and a report cannot pin a device's state for longer.
MAX_HEALTH_VALID_MS = 3_600_000


class DeviceHealth(Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """How polling one device goes: not yet read (`starting`), reading (`online`), or failing for
    `IOTPIPE_FAULT_AFTER` polls in a row (`fault`, with the driver's reason)."""

    state: Literal["starting", "online", "fault"]
    reason: Reason | None = None


class HealthReport(Payload, frozen=True):
    """`<base>/v2/health/<source>`: the sensor-reader instance `<source>` on its devices, sealed like
    the data, so only a holder of the key ring can report a device failing (the plaintext service
    status says the same for display, and decides nothing). Published at each change and each
    heartbeat; every entry holds for `valid_for` ms from the envelope's `ts`, so a fault that is not
    renewed ends by itself. A reader with many devices splits its report over several messages."""

    valid_for: Annotated[int, Meta(ge=1, le=MAX_HEALTH_VALID_MS, description="ms each entry holds after `ts`")]
    devices: Annotated[dict[Id, DeviceHealth], Meta(min_length=1)]


# -- alerts: monitor (and the preprocessor's flood alerts) -> cloud-forwarder -----------------------
# What a monitor anomaly episode is about (docs/contract.md, "Anomaly episodes"): physical checks
# first (they need no history), then the statistical ones, then the IsolationForest's `pattern`.
AnomalyKind = Literal["out_of_range", "dropout", "stuck", "level_shift", "noise", "drift", "pattern"]
EpisodeEnd = Literal["normal", "new_normal", "superseded"]


class Evidence(Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """The window that opened an episode, and what the monitor expected of its sensor. Fields the
    sensor has no value for yet (still warming up) are left out; every number is finite."""

    mean: float
    min: float
    max: float
    std: Annotated[float, Meta(ge=0)]
    n: Count
    windows: Annotated[int, Meta(ge=1, le=MAX_INT, description="consecutive windows the check held")]
    normal: float | None = None  # the level expected for this window (trend included)
    scale: float | None = None  # 1 sigma of a window's mean about `normal`
    normal_std: float | None = None  # the sensor's usual within-window std
    normal_n: float | None = None  # the sensor's usual readings per window
    low: float | None = None  # out_of_range: the chip's range; drift: the normal envelope with its margin
    high: float | None = None


class AnomalyOpen(DevicePayload, frozen=True, tag_field="kind", tag="anomaly_open"):
    """A sensor's anomaly episode begins: `anomaly` held for enough windows in a row. `episode`
    (`<sensor>/<start>`) names it until its AnomalyClose. `start` is the start of the first
    anomalous window, `end` the end of the window that opened it (unix ms)."""

    sensor: Id
    episode: Annotated[str, Meta(max_length=200)]
    anomaly: AnomalyKind
    start: UnixMs
    end: UnixMs
    score: float
    evidence: Evidence
    ts: UnixMs

    @property
    def kind(self) -> AlertKind:
        return "anomaly_open"


class AnomalyClose(DevicePayload, frozen=True, tag_field="kind", tag="anomaly_close"):
    """The episode is over: its sensor was normal for `IOTPIPE_CLOSE_AFTER` windows in a row
    (`reason` "normal"), or a relative anomaly lasted `IOTPIPE_ADAPT_AFTER` windows and its level
    is taken as the sensor's new normal ("new_normal": the sensor warms up again), or a physical
    anomaly (out_of_range, dropout, stuck) began during a relative one ("superseded": the physical
    episode opens in the same batch). `end` is the end
    of its last anomalous window; `anomalies` every kind that held during it."""

    sensor: Id
    episode: Annotated[str, Meta(max_length=200)]
    anomaly: AnomalyKind
    start: UnixMs
    end: UnixMs
    windows: Annotated[int, Meta(ge=1, le=MAX_INT, description="anomalous windows in the episode")]
    peak: float
    anomalies: list[AnomalyKind]
    reason: EpisodeEnd
    ts: UnixMs

    @property
    def kind(self) -> AlertKind:
        return "anomaly_close"


class _DeviceStateAlert(DevicePayload, frozen=True):
    reason: Reason | None
    last_seen: UnixMs | None
    ts: UnixMs


class OfflineAlert(_DeviceStateAlert, frozen=True, tag_field="kind", tag="offline"):
    """No processed window from the device for `IOTPIPE_OFFLINE_AFTER` seconds."""

    @property
    def kind(self) -> AlertKind:
        return "offline"


class FaultAlert(_DeviceStateAlert, frozen=True, tag_field="kind", tag="fault"):
    """The sensor-reader reports the device failing (bus errors, timeouts, wrong chip id...) in its
    sealed health report."""

    @property
    def kind(self) -> AlertKind:
        return "fault"


class FloodAlert(DevicePayload, frozen=True, tag_field="kind", tag="flood"):
    """The preprocessor shed `shed` windows of the device since `since` (unix ms): it delivered more
    than its allowance (docs/contract.md, "Per-device fairness"). From the preprocessor, at most one
    per device per `IOTPIPE_FLOOD_ALERT_INTERVAL`."""

    shed: Annotated[int, Meta(ge=1, le=MAX_INT)]
    since: UnixMs
    reason: Reason
    ts: UnixMs

    @property
    def kind(self) -> AlertKind:
        return "flood"


Alert = AnomalyOpen | AnomalyClose | OfflineAlert | FaultAlert | FloodAlert


# -- status: plain retained JSON for anyone (Home Assistant, Telegraf, Node-RED...) ---------------
class ReaderDeviceHealth(Struct, frozen=True):
    """A device as the sensor-reader's status shows it, for display (the monitor decides a device's
    `fault` from the sealed HealthReport only)."""

    state: Literal["starting", "online", "fault"]
    reason: str | None = None
    reads: Count = 0
    errors: dict[str, Count] = {}
    reopens: Count = 0
    skipped_ticks: Count = 0


class KeyRingStatus(Struct, frozen=True):
    """Which keys a service holds (ids only, never key material): every service reports it, so an
    operator (`iotpipe keys status`) sees each step of a rotation reach every service."""

    kids: list[Id]  # every key it decrypts with, in ring order
    encrypts: Id  # the one it seals with (the first)
    since: UnixMs  # when this process began sealing with `encrypts` (its start, or the reload)
    refused: Reason | None = None  # why the ring file as it is now was not loaded (the ring above is kept)


# A service's counters (iotpipe._health.nested_counters): by name without `iotpipe_`/`_total`, a
# number if unlabelled, else one object level per label (keyed by label value, in label order; no
# counter of ours has more than two labels). Typed level by level, so a decoder takes numbers only.
CounterTotal = Annotated[float, Meta(ge=0)]
ByLabel = Annotated[
    dict[str, CounterTotal | dict[str, CounterTotal]],
    Meta(description="a labelled counter: by the first label's values, then the second's (one level per label)"),
]
CounterValue = Annotated[float, Meta(ge=0, description="an unlabelled counter")] | ByLabel
Counters = Annotated[
    dict[str, CounterValue],
    Meta(
        description="every counter of the service by name (its Prometheus name without `iotpipe_` and "
        '`_total`), e.g. {"received": {"raw": 60}, "rejected": {"stale": 1}, "windows": 60}; a labelled '
        "counter with no sample yet is absent",
    ),
]


class LagSummary(Struct, frozen=True):
    """A service's window lag (window end -> handled) over the windows it handled since its previous
    status (iotpipe._health.WindowLag.take_interval; docs/operations.md, "Metrics")."""

    p50_ms: Annotated[float, Meta(ge=0)]  # interpolated in the histogram's buckets, as histogram_quantile does
    max_ms: Annotated[float, Meta(ge=0)]  # exact
    windows: Annotated[int, Meta(ge=1)]


class ServiceStatus(Struct, frozen=True):
    """`<base>/v2/status/service/<service>/<instance>`: birth, heartbeat and Last Will. Services add
    their own details (unknown keys are allowed and ignored by readers that do not know them)."""

    state: Literal["online", "offline"]
    client_id: str
    ts: UnixMs
    service: str | None = None
    instance: str | None = None
    boot_ts: UnixMs | None = None
    counters: Counters | None = None
    devices: dict[Id, ReaderDeviceHealth] | None = None  # the sensor-reader's devices
    keyring: KeyRingStatus | None = None
    lag: LagSummary | None = None  # absent when no window was handled since the previous status


DeviceState = Literal["online", "offline", "fault"]
AlertKind = Literal["anomaly_open", "anomaly_close", "offline", "fault", "flood"]


class DeviceStatus(Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """`<base>/v2/status/device/<device>`, published by the monitor."""

    state: DeviceState
    device: Id
    last_seen: UnixMs | None
    ts: UnixMs
    reason: str | None = None


# -- cloud: cloud-forwarder -> cloud endpoint -----------------------------------------------------
class WindowRecord(Window, frozen=True, tag_field="type", tag="window"):
    """A processed window, with a stable id the cloud de-duplicates on: `<device>/<sensor>/<start>`."""

    id: str


class AlertRecord(Struct, forbid_unknown_fields=True, frozen=True, tag_field="type", tag="alert"):
    """An alert, flattened; id `<device>/alert/<src>/<boot>/<seq>` (the sealed message's identity)."""

    id: str
    device: Id
    kind: AlertKind
    ts: UnixMs
    sensor: Id | None = None
    start: UnixMs | None = None
    end: UnixMs | None = None
    mean: float | None = None
    score: float | None = None
    episode: str | None = None
    anomaly: AnomalyKind | None = None
    evidence: Evidence | None = None
    windows: Count | None = None
    peak: float | None = None
    anomalies: list[AnomalyKind] | None = None
    reason: str | None = None
    last_seen: UnixMs | None = None
    shed: Count | None = None
    since: UnixMs | None = None


CloudRecord = WindowRecord | AlertRecord


class CloudBatch(Struct, forbid_unknown_fields=True, frozen=True):
    """The body of one `POST <IOTPIPE_CLOUD_URL>`; `batch_id` is also the Idempotency-Key."""

    batch_id: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
    records: list[CloudRecord]


# -- decoding -------------------------------------------------------------------------------------
T = TypeVar("T")
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode(payload: bytes | msgspec.Raw, model: type[T] | Any, topic: str | None = None) -> T:
    """`payload` as `model`, or SchemaError naming what is wrong (path and rule, never the value)."""
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = msgspec.json.Decoder(model)
    try:
        value: T = decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise SchemaError(validation_message(exc)) from None
    except RecursionError:  # msgspec recurses per nesting level (`[[[...` a hundred thousand deep)
        raise SchemaError("JSON nested too deeply") from None
    if topic is not None and isinstance(value, Payload):
        value.check_topic(topic)
    return value


# msgspec quotes the offending value in a few messages ("Invalid enum value 'x'") and names an
# unknown key ("Object contains unknown field `x`"). A sealed payload's values are decrypted data,
# which no log line or dead letter may hold, and a quoted key can carry line breaks that forge log
# lines: the rule and the path stay (the path names only the model's own fields), a value goes, and
# a key stays only if it is a plain name (a newer producer's field, worth seeing when debugging).
_QUOTING_VALUE = ("Invalid enum value ", "Invalid value ")
_UNKNOWN_KEY = "Object contains unknown field `"
_AT = " - at `"
# msgspec's path: field names of the model, list indices, `[...]` for a dict's values.
_PATH = re.compile(r"\$(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\[\.\.\.\])*")


def validation_message(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """What msgspec found wrong, as a SchemaError says it: the rule and the path, never a value."""
    text = str(exc)
    at = text.rfind(_AT)  # the path comes last: "... - at `$.windows[0].device`"
    path = text[at:] if at >= 0 and text.endswith("`") and _PATH.fullmatch(text, at + len(_AT), len(text) - 1) else ""
    for rule in _QUOTING_VALUE:
        if text.startswith(rule):
            return f"{rule.rstrip()}{path}"
    if text.startswith(_UNKNOWN_KEY):
        key = text[len(_UNKNOWN_KEY) : len(text) - len(path) - 1]
        return f"{_UNKNOWN_KEY}{key}`{path}" if ID_PATTERN.fullmatch(key) else f"{_UNKNOWN_KEY[:-2]}{path}"
    return text[:300]


encode = msgspec.json.Encoder().encode


def to_builtins(value: Any) -> Any:
    """Plain dicts and lists (for printing or storing a model as ordinary JSON values)."""
    return msgspec.to_builtins(value)


# What docs/schema/ holds: one JSON Schema per payload, named by file.
SCHEMAS: dict[str, Any] = {
    "raw": RawBatch,
    "processed": Processed,
    "health": HealthReport,
    "alert": Alert,
    "service-status": ServiceStatus,
    "device-status": DeviceStatus,
    "cloud-batch": CloudBatch,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema (2020-12) of every payload, keyed by the name in SCHEMAS."""
    out = {}
    for name, model in SCHEMAS.items():
        schema = msgspec.json.schema(model)
        out[name] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": name, **schema}
    return out


def encode_sorted(value: Any) -> bytes:
    """JSON with keys sorted at every level: one canonical byte string per value (Redis members)."""
    return orjson.dumps(msgspec.to_builtins(value), option=orjson.OPT_SORT_KEYS)
