from __future__ import annotations

import pytest
from iotpipe import MalformedEnvelope, Opened
from preprocessor.service import parse_raw

TOPIC = "iotpipe/v1/raw/d1"


def raw(data: object, topic: str = TOPIC) -> Opened:
    return Opened(topic, "sensor-reader/x", "b", 1, 0, data)


def good(**sensor: object) -> dict[str, object]:
    body = {"unit": "degC", "t": [1000, 1500], "v": [20.0, 21.0], **sensor}
    return {"device": "d1", "window": {"start": 1000, "size": 1000}, "sensors": {"temp": body}}


def test_a_valid_batch_parses() -> None:
    device, start, size, series = parse_raw(raw(good()))
    assert (device, start, size) == ("d1", 1000, 1000)
    ((sensor, unit, values),) = series
    assert sensor == "temp" and unit == "degC" and values.tolist() == [20.0, 21.0]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "exactly device"),
        ({**good(), "extra": 1}, "exactly device"),
        ({**good(), "device": "d2"}, "does not match the topic"),
        ({**good(), "window": {"start": 1000}}, "window must have"),
        ({**good(), "window": {"start": 1000.5, "size": 1000}}, "integers"),
        ({**good(), "sensors": {}}, "non-empty"),
        ({**good(), "sensors": {"a/b": {"unit": "u", "t": [1000], "v": [1.0]}}}, "invalid sensor id"),
        (good(v=[1.0]), "equal length"),
        (good(v=["x", "y"]), "numbers"),
        (good(v=[[1.0], [2.0]]), "finite numbers"),
        (good(t=[1000, 2000]), "outside the window"),
        (good(t=[999, 1500]), "outside the window"),
        (good(t=[1000, 1500.5]), "integers"),
        (good(t=[1000, "x"]), "integers"),
        (good(t=[], v=[]), "0 samples"),
        (good(extra=1), "exactly unit, t, v"),
    ],
)
def test_bad_batches_raise_our_error_naming_the_problem(data: object, match: str) -> None:
    with pytest.raises(MalformedEnvelope, match=match):
        parse_raw(raw(data))
