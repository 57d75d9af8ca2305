"""Hypothesis strategies for the fuzz properties: genuine payloads of every model of the contract
(docs/contract.md, iotpipe._models), arbitrary JSON, and mutations of either.

Genuine payloads are built as plain JSON values (what a publisher sends), so a mutation can change
any part of one: a leaf, a subtree, a key, its type. What the properties ask of any input is in
tests/test_fuzz_models.py and tests/test_fuzz_envelope.py.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

# The largest integer every consumer holds exactly: a double (Redis sorted-set scores, JavaScript).
# docs/contract.md bounds every integer of a payload by it.
MAX_INT = 2**53 - 1
ID_CHARS = string.ascii_letters + string.digits + "_-"
ids = st.text(ID_CHARS, min_size=1, max_size=64)  # iotpipe.ID_PATTERN
unix_ms = st.integers(0, 2_000_000_000_000)  # to 2033: the ids and keys a healthy pipeline makes
finite = st.floats(allow_nan=False, allow_infinity=False)
units = st.text(max_size=32)

# Any JSON value: ints past 64 bits and 2**53, every finite float, any text, nested a few levels.
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([MAX_INT, MAX_INT + 1, -MAX_INT - 1, 2**63, 2**64, -(2**63) - 1])
    | finite
    | st.text()
    | ids
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8) | ids, children, max_size=4),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    """Standard JSON (any int, finite floats), as any publisher may produce it."""
    return json.dumps(value, allow_nan=False).encode()


@st.composite
def raw_windows(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(unix_ms)
    size = draw(st.integers(1, 3_600_000))
    sensors = {}
    for sensor in draw(st.lists(ids, min_size=1, max_size=3, unique=True)):
        n = draw(st.integers(1, 6))
        sensors[sensor] = {
            "unit": draw(units),
            "t": draw(st.lists(st.integers(start, start + size - 1), min_size=n, max_size=n)),
            "v": draw(st.lists(finite, min_size=n, max_size=n)),
        }
    return {"device": draw(ids), "window": {"start": start, "size": size}, "sensors": sensors}


raw_batches = st.builds(lambda w: {"windows": w}, st.lists(raw_windows(), min_size=1, max_size=3))


@st.composite
def windows(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(unix_ms)
    low, high = sorted((draw(finite), draw(finite)))
    return {
        "device": draw(ids),
        "sensor": draw(ids),
        "unit": draw(units),
        "start": start,
        "end": start + draw(st.integers(1, 3_600_000)),
        "n": draw(st.integers(1, 1_000_000)),
        "mean": draw(finite),
        "median": draw(finite),
        "min": low,
        "max": high,
        "std": draw(st.floats(min_value=0, allow_infinity=False)),
    }


processed_batches = st.builds(lambda w: {"windows": w}, st.lists(windows(), min_size=1, max_size=3))

_maybe_ms = st.none() | unix_ms
_reasons = st.none() | st.text(max_size=200)
_anomalies = st.sampled_from(["out_of_range", "dropout", "stuck", "level_shift", "noise", "drift", "pattern"])
evidence = st.fixed_dictionaries(
    {
        "mean": finite,
        "min": finite,
        "max": finite,
        "std": st.floats(min_value=0, allow_infinity=False),
        "n": st.integers(0, 2**53 - 1),
        "windows": st.integers(1, 10**6),
    },
    optional={name: finite for name in ("normal", "scale", "normal_std", "normal_n", "low", "high")},
)
anomaly_alerts = st.fixed_dictionaries(
    {
        "kind": st.just("anomaly_open"),
        "device": ids,
        "sensor": ids,
        "episode": st.text(max_size=200),
        "anomaly": _anomalies,
        "start": unix_ms,
        "end": unix_ms,
        "score": finite,
        "evidence": evidence,
        "ts": unix_ms,
    }
) | st.fixed_dictionaries(
    {
        "kind": st.just("anomaly_close"),
        "device": ids,
        "sensor": ids,
        "episode": st.text(max_size=200),
        "anomaly": _anomalies,
        "start": unix_ms,
        "end": unix_ms,
        "windows": st.integers(1, 10**6),
        "peak": finite,
        "anomalies": st.lists(_anomalies, max_size=7),
        "reason": st.sampled_from(["normal", "new_normal", "superseded"]),
        "ts": unix_ms,
    }
)
state_alerts = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["offline", "fault"]),
        "device": ids,
        "reason": _reasons,
        "last_seen": _maybe_ms,
        "ts": unix_ms,
    }
)
flood_alerts = st.fixed_dictionaries(
    {
        "kind": st.just("flood"),
        "device": ids,
        "shed": st.integers(1, 10**9),
        "since": unix_ms,
        "reason": st.text(max_size=200),
        "ts": unix_ms,
    }
)
alerts = anomaly_alerts | state_alerts | flood_alerts

health_reports = st.fixed_dictionaries(
    {
        "valid_for": st.integers(1, 3_600_000),
        "devices": st.dictionaries(
            ids,
            st.fixed_dictionaries(
                {"state": st.sampled_from(["starting", "online", "fault"])},
                optional={"reason": st.text(max_size=200)},
            ),
            min_size=1,
            max_size=3,
        ),
    }
)

reader_health = st.fixed_dictionaries(
    {"state": st.sampled_from(["starting", "online", "fault"])},
    optional={
        "reason": st.none() | st.text(max_size=40),
        "reads": st.integers(0, 10**9),
        "errors": st.dictionaries(st.text(max_size=10), st.integers(0, 10**6), max_size=3),
        "reopens": st.integers(0, 1000),
        "skipped_ticks": st.integers(0, 1000),
    },
)
# Status counters, nested (iotpipe._health.nested_counters): a count, or by label value, two levels deep at most.
counts = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
counts_by_label = st.dictionaries(
    st.text(max_size=20), counts | st.dictionaries(st.text(max_size=20), counts, max_size=3), max_size=3
)
service_statuses = st.fixed_dictionaries(
    {"state": st.sampled_from(["online", "offline"]), "client_id": st.text(max_size=80), "ts": unix_ms},
    optional={
        "service": st.none() | ids,
        "instance": st.none() | ids,
        "boot_ts": _maybe_ms,
        "counters": st.none() | st.dictionaries(st.text(max_size=20), counts | counts_by_label, max_size=4),
        "devices": st.none() | st.dictionaries(ids, reader_health, max_size=3),
        "keyring": st.none()
        | st.fixed_dictionaries(
            {"kids": st.lists(ids, min_size=1, max_size=3), "encrypts": ids, "since": unix_ms},
            optional={"refused": st.text(max_size=60)},
        ),
        "shared": st.lists(st.text(max_size=30), max_size=2),  # a service's own detail: allowed
    },
)
device_statuses = st.fixed_dictionaries(
    {"state": st.sampled_from(["online", "offline", "fault"]), "device": ids, "last_seen": _maybe_ms, "ts": unix_ms},
    optional={"reason": st.text(max_size=60)},
)


@st.composite
def window_records(draw: st.DrawFn) -> dict[str, Any]:
    w = draw(windows())
    return {"type": "window", "id": f"{w['device']}/{w['sensor']}/{w['start']}", **w}


@st.composite
def alert_records(draw: st.DrawFn) -> dict[str, Any]:
    alert = dict(draw(alerts))
    alert_id = f"{alert['device']}/alert/{draw(ids)}/{draw(ids)}/{draw(st.integers(1, 10**6))}"
    return {"type": "alert", "id": alert_id, **alert}


cloud_batches = st.fixed_dictionaries(
    {
        "batch_id": st.text("0123456789abcdef", min_size=32, max_size=32),
        "records": st.lists(window_records() | alert_records(), max_size=3),
    }
)

# Model name (iotpipe._models.SCHEMAS) -> genuine payloads of it.
GENUINE: dict[str, st.SearchStrategy[Any]] = {
    "raw": raw_batches,
    "processed": processed_batches,
    "health": health_reports,
    "alert": alerts,
    "service-status": service_statuses,
    "device-status": device_statuses,
    "cloud-batch": cloud_batches,
}


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one part changed: a leaf or subtree replaced by any JSON, a key dropped, a key
    added, or a container emptied. Applied to a genuine payload, it produces the near-misses a
    validator is most likely to let through."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["descend", "descend", "drop", "add", "replace"]))
        out = dict(value)
        if action == "descend":
            out[key] = draw(mutated(value[key]))
        elif action == "drop":
            del out[key]
        elif action == "add":
            out[draw(st.text(max_size=8) | st.sampled_from(sorted(value)))] = draw(json_values)
        else:
            out[key] = draw(json_values)
        return out
    if isinstance(value, list) and value and draw(st.integers(0, 3)) > 0:
        index = draw(st.integers(0, len(value) - 1))
        out_list = list(value)
        action = draw(st.sampled_from(["descend", "descend", "drop", "append"]))
        if action == "descend":
            out_list[index] = draw(mutated(value[index]))
        elif action == "drop":
            del out_list[index]
        else:
            out_list.append(draw(json_values | st.just(value[index])))
        return out_list
    return draw(json_values | st.sampled_from([None, 0, -1, 1.5, "", [], {}, True]))


# Literals a JSON encoder never writes but a hostile publisher can: each replaces a number.
HOSTILE_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" + b"0" * 400, b"9" * 5000]
DEEP = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 100_000]
