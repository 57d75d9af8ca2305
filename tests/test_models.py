"""The wire contract as types (iotpipe._models): each rule docs/contract.md states is enforced by
the model, with an error naming the problem; the committed JSON Schema is what the models produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from iotpipe import Alert, CloudBatch, DeviceStatus, OfflineAlert, Processed, RawBatch, SchemaError, decode, encode
from preprocessor.service import process

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "iotpipe/v2/raw/d1"


def good(**sensor: object) -> dict[str, object]:
    body = {"unit": "degC", "t": [1000, 1500], "v": [20.0, 21.0], **sensor}
    return {"device": "d1", "window": {"start": 1000, "size": 1000}, "sensors": {"temp": body}}


def raw(window: object, topic: str = TOPIC) -> RawBatch:
    """`window` as the only raw window of a raw message."""
    return decode(orjson.dumps({"windows": [window]}), RawBatch, topic)


def test_a_valid_batch_decodes_and_processes() -> None:
    (first,) = raw(good()).windows
    assert (first.device, first.window.start, first.window.size) == ("d1", 1000, 1000)
    ((sensor, series),) = first.sensors.items()
    assert sensor == "temp" and series.unit == "degC" and series.v == [20.0, 21.0]
    (window,) = process([first], kernel=1)
    assert (window.device, window.sensor, window.start, window.end, window.n, window.mean) == (
        "d1",
        "temp",
        1000,
        2000,
        2,
        20.5,
    )


def test_one_raw_message_carries_many_devices() -> None:
    batch = decode(orjson.dumps({"windows": [good(), {**good(), "device": "d2"}]}), RawBatch, TOPIC)
    assert [w.device for w in batch.windows] == ["d1", "d2"]
    assert [w.device for w in process(batch.windows, kernel=1)] == ["d1", "d2"]
    for bad, match in [
        ({"windows": []}, "length >= 1"),
        ({"windows": [good()], "device": "d1"}, "unknown field `device`"),
        ({"windows": [good(), {**good(), "device": "a b"}]}, "matching regex"),
    ]:
        with pytest.raises(SchemaError, match=match):
            decode(orjson.dumps(bad), RawBatch, TOPIC)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "Expected `object`"),
        ({**good(), "extra": 1}, "unknown field `extra`"),
        ({**good(), "device": "d" * 65}, "matching regex"),
        ({**good(), "window": {"start": 1000}}, "missing required field `size`"),
        ({**good(), "window": {"start": 1000.5, "size": 1000}}, "Expected `int`"),
        ({**good(), "sensors": {}}, "length >= 1"),
        ({**good(), "sensors": {"a/b": {"unit": "u", "t": [1000], "v": [1.0]}}}, "matching regex"),
        (good(v=[1.0]), "equal length"),
        (good(v=["x", "y"]), "Expected `float`"),
        (good(v=[[1.0], [2.0]]), "Expected `float`"),
        (good(t=[1000, 2000]), "outside the window"),
        (good(t=[999, 1500]), "outside the window"),
        (good(t=[1000, 1500.5]), "Expected `int`"),
        (good(t=[1000, "x"]), "Expected `int`"),
        (good(t=[], v=[]), "1 to 1000000 readings"),
        (good(extra=1), "unknown field `extra`"),
        (good(unit="u" * 33), "length <= 32"),
        (good(v=[True, 1.0]), "Expected `float`"),
    ],
)
def test_bad_batches_raise_our_error_naming_the_problem(data: object, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        raw(data)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(literal: bytes) -> None:
    payload = orjson.dumps({"windows": [good()]}).replace(b"21.0", literal)
    with pytest.raises(SchemaError):
        decode(payload, RawBatch, TOPIC)


def test_processed_windows_follow_the_contract() -> None:
    window = {
        "device": "d1",
        "sensor": "t",
        "unit": "C",
        "start": 0,
        "end": 1000,
        "n": 3,
        "mean": 1,
        "median": 1,
        "min": 1,
        "max": 1,
    }
    ok = decode(orjson.dumps({"windows": [{**window, "std": 0.0}]}), Processed)
    assert ok.windows[0].mean == 1.0 and isinstance(ok.windows[0].mean, float)
    for bad, match in [
        ({"windows": []}, "length >= 1"),
        ({"windows": [window]}, "missing required field `std`"),
        ({"windows": [{**window, "std": -1.0}]}, ">= 0"),
        ({"windows": [{**window, "std": 0, "end": 0}]}, "end after it starts"),
        ({"windows": [{**window, "std": 0, "n": 0}]}, ">= 1"),
        ({"windows": [{**window, "std": 0, "device": None}]}, "Expected `str`"),
        ({"device": "d1", "windows": [{**window, "std": 0}]}, "unknown field `device`"),
    ]:
        with pytest.raises(SchemaError, match=match):
            decode(orjson.dumps(bad), Processed)


def test_alerts_are_one_union_tagged_by_kind() -> None:
    alert = OfflineAlert(device="d1", reason="no data for 30s", last_seen=5, ts=6)
    wire = orjson.loads(encode(alert))
    assert wire == {"kind": "offline", "device": "d1", "reason": "no data for 30s", "last_seen": 5, "ts": 6}
    assert decode(encode(alert), Alert, "iotpipe/v2/alerts/d1") == alert
    with pytest.raises(SchemaError, match=r"^Invalid value - at `\$\.kind`$"):
        decode(orjson.dumps({**wire, "kind": "party"}), Alert)
    with pytest.raises(SchemaError, match="does not match the topic"):
        decode(encode(alert), Alert, "iotpipe/v2/alerts/d2")


def test_status_and_cloud_payloads() -> None:
    status = DeviceStatus(state="online", device="d1", last_seen=1, ts=2)
    assert orjson.loads(encode(status)) == {"state": "online", "device": "d1", "last_seen": 1, "ts": 2}
    with pytest.raises(SchemaError, match=r"^Invalid enum value - at `\$\.state`$"):
        decode(orjson.dumps({"state": "sleepy", "device": "d1", "last_seen": 1, "ts": 2}), DeviceStatus)
    with pytest.raises(SchemaError, match="matching regex"):
        decode(orjson.dumps({"batch_id": "not-hex", "records": []}), CloudBatch)


def test_committed_schema_is_what_the_models_produce() -> None:
    """docs/schema/*.json is generated (`iotpipe schema`): a model change without regenerating fails."""
    result = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "schema", "--check", str(ROOT / "docs/schema")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.stem for p in (ROOT / "docs/schema").glob("*.json")) == sorted(
        ["alert", "cloud-batch", "device-status", "health", "processed", "raw", "service-status"]
    )
