"""Fuzzing every payload model's decoder (iotpipe._models.decode, what the bus runs on each message).

For any input, decoding either raises SchemaError (the project's own validation error, whose text
names the path and the rule but never a value of the payload) or returns a model that satisfies
everything the model declares plus what every consumer relies on: finite floats, integers a double
holds exactly, ids matching the id pattern, lengths within their limits, and a value that encodes
(msgspec and orjson, as the sealer, the Redis writer and the cloud sink do) and decodes back equal.

Inputs: arbitrary bytes, arbitrary JSON, genuine payloads of each model with one part mutated, and
the literals JSON encoders never write (NaN, Infinity, 1e999, deep nesting, invalid UTF-8).
Regressions found by this file and by the atheris harness (tests/fuzz/envelope_payload.py) are the
explicit tests at the end.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import msgspec.inspect as mi
import pytest
from fuzz.payloads import DEEP, GENUINE, HOSTILE_NUMBERS, MAX_INT, dumps, json_values, mutated, raw_batches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iotpipe import ID_PATTERN, Processed, RawBatch, SchemaError, decode, encode, encode_sorted
from iotpipe._models import SCHEMAS
from preprocessor.service import process

# Bounded so that the file runs in seconds in `make test`; IOTPIPE_FUZZ_EXAMPLES=20000 explores more.
EXAMPLES = int(os.environ.get("IOTPIPE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("IOTPIPE_FUZZ_EXAMPLES"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MODELS = sorted(SCHEMAS)
CANARY = "¤canary¤"  # in no field name, rule or pattern: if an error holds it, it holds a value


def topic_for(name: str, value: Any) -> str | None:
    """The arrival topic a device payload is checked against (its device), else None."""
    if name in ("alert", "device-status") and isinstance(value, dict) and isinstance(value.get("device"), str):
        return f"iotpipe/v2/alerts/{value['device']}"
    return None


def decoded_or_refused(name: str, payload: bytes, topic: str | None = None) -> Any:
    """Decode `payload` as model `name`: a valid model (checked) or SchemaError (None). Any other
    exception fails the property, which is the point."""
    try:
        value = decode(payload, SCHEMAS[name], topic)
    except SchemaError as exc:
        message = str(exc)
        assert 0 < len(message) <= 300, message
        assert "\n" not in message and "\r" not in message, message  # one log line, never forged ones
        return None
    assert_valid(value, mi.type_info(SCHEMAS[name]), "$")
    # What a consumer accepted, re-published, is accepted again, and every encoder takes it.
    assert decode(encode(value), SCHEMAS[name]) == value
    encode_sorted(value)
    return value


def assert_valid(value: Any, info: mi.Type, path: str) -> None:
    """`value` satisfies `info` (msgspec.inspect's view of the model) and the pipeline's invariants."""
    if isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.UnionType):
        errors = []
        for option in info.types:
            try:
                assert_valid(value, option, path)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: {value!r:.80} fits no member of the union: {errors}")
    if isinstance(info, mi.NoneType):
        assert value is None, path
    elif isinstance(info, mi.BoolType):
        assert isinstance(value, bool), path
    elif isinstance(info, mi.IntType):
        assert type(value) is int, path
        assert -MAX_INT <= value <= MAX_INT, f"{path}: {value} is not exact as a double"
        assert info.ge is None or value >= info.ge, path
        assert info.gt is None or value > info.gt, path
        assert info.le is None or value <= info.le, path
    elif isinstance(info, mi.FloatType):
        assert isinstance(value, float) and math.isfinite(value), f"{path}: {value!r}"
        assert info.ge is None or value >= info.ge, path
    elif isinstance(info, mi.StrType):
        assert isinstance(value, str), path
        value.encode("utf-8")  # no lone surrogate
        assert info.max_length is None or len(value) <= info.max_length, path
        assert info.min_length is None or len(value) >= info.min_length, path
        assert info.pattern is None or re.search(info.pattern, value), f"{path}: {value!r:.80}"
        if info.pattern == ID_PATTERN.pattern:
            assert ID_PATTERN.fullmatch(value), path
    elif isinstance(info, mi.LiteralType):
        assert value in info.values, path
    elif isinstance(info, mi.ListType):
        assert isinstance(value, list), path
        assert info.min_length is None or len(value) >= info.min_length, path
        for index, item in enumerate(value):
            assert_valid(item, info.item_type, f"{path}[{index}]")
    elif isinstance(info, mi.DictType):
        assert isinstance(value, dict), path
        assert info.min_length is None or len(value) >= info.min_length, path
        for key, item in value.items():
            assert_valid(key, info.key_type, f"{path} key")
            assert_valid(item, info.value_type, f"{path}[{key!r:.40}]")
    elif isinstance(info, mi.StructType):
        assert isinstance(value, info.cls), f"{path}: {type(value).__name__} is not {info.cls.__name__}"
        for field in info.fields:
            assert_valid(getattr(value, field.name), field.type, f"{path}.{field.encode_name}")
    elif not isinstance(info, mi.AnyType):
        raise AssertionError(f"{path}: no check for {info!r}")


# -- properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@FUZZ
@given(payload=st.binary(max_size=300))
def test_any_bytes_decode_to_a_valid_model_or_our_error(name: str, payload: bytes) -> None:
    decoded_or_refused(name, payload)


@pytest.mark.parametrize("name", MODELS)
@FUZZ
@given(value=json_values)
def test_any_json_decodes_to_a_valid_model_or_our_error(name: str, value: Any) -> None:
    decoded_or_refused(name, dumps(value), topic_for(name, value))


@pytest.mark.parametrize("name", MODELS)
@FUZZ
@given(data=st.data())
def test_genuine_payloads_decode_and_any_mutation_is_valid_or_refused(name: str, data: st.DataObject) -> None:
    genuine = data.draw(GENUINE[name], label="genuine")
    assert decoded_or_refused(name, dumps(genuine), topic_for(name, genuine)) is not None
    changed = data.draw(mutated(genuine), label="mutated")
    decoded_or_refused(name, dumps(changed), topic_for(name, changed))


@pytest.mark.parametrize("name", MODELS)
@FUZZ
@given(data=st.data())
def test_hostile_literals_are_our_error(name: str, data: st.DataObject) -> None:
    """A genuine payload with a number replaced by NaN/Infinity/1e999/a 5,000-digit integer, a
    string broken into invalid UTF-8, or the payload wrapped in deep nesting."""
    wire = dumps(data.draw(GENUINE[name], label="genuine"))
    numbers, quotes = number_spans(wire), [i for i, byte in enumerate(wire) if byte == ord('"')]
    how = data.draw(st.sampled_from(["number", "utf8", "deep"] if numbers else ["utf8", "deep"]), label="how")
    if how == "number":
        begin, end = data.draw(st.sampled_from(numbers), label="which number")
        wire = wire[:begin] + data.draw(st.sampled_from(HOSTILE_NUMBERS), label="literal") + wire[end:]
    elif how == "utf8":
        at = data.draw(st.sampled_from(quotes), label="quote") + 1
        wire = wire[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + wire[at:]
    else:
        deep = data.draw(st.sampled_from(DEEP), label="nesting")
        wire = deep[: len(deep) // 2] + wire + deep[len(deep) // 2 :]
    # msgspec skips an unknown field without reading its bytes as UTF-8; the model it returns is
    # still checked whole (service statuses allow unknown fields).
    assert decoded_or_refused(name, wire) is None or how == "utf8"


def number_spans(wire: bytes) -> list[tuple[int, int]]:
    """Where the numbers of a JSON document are (outside its strings)."""
    spans, index, in_string = [], 0, False
    while index < len(wire):
        char = wire[index : index + 1]
        if in_string:
            index += 2 if char == b"\\" else 1
            in_string = char != b'"'
            continue
        if char == b'"':
            in_string = True
        elif char in b"-0123456789" and char:
            match = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?").match(wire, index)
            assert match is not None
            spans.append(match.span())
            index = match.end()
            continue
        index += 1
    return spans


@pytest.mark.parametrize("name", MODELS)
@FUZZ
@given(data=st.data())
def test_a_refusal_never_quotes_the_payload(name: str, data: st.DataObject) -> None:
    """Decrypted payloads are refused into logs and dead letters (iotpipe._bus), which must never
    hold decrypted data: a refusal names the path and the rule, not the offending value or key."""
    genuine = data.draw(GENUINE[name], label="genuine")
    canary = CANARY + data.draw(st.text(max_size=8), label="suffix")
    planted = data.draw(plant(genuine, canary), label="planted")
    try:
        decode(dumps(planted), SCHEMAS[name], topic_for(name, planted))
    except SchemaError as exc:
        assert CANARY not in str(exc)


@st.composite
def plant(draw: st.DrawFn, value: Any, canary: str) -> Any:
    """`value` with `canary` put in one place: as a leaf, as a key, as a list item."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: draw(plant(value[key], canary))}
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], draw(plant(value[index], canary)), *value[index + 1 :]]
    if isinstance(value, dict) and draw(st.booleans()):
        return {**value, canary: 1}
    return canary


@FUZZ
@given(batch=raw_batches)
def test_the_preprocessors_output_for_any_valid_raw_batch_is_valid_processed(batch: dict[str, Any]) -> None:
    """Closure: whatever the preprocessor accepts, what it publishes every consumer accepts (else
    one bad window would poison a processed message holding up to 500 windows of other devices).
    Readings span the whole double range: aggregates never overflow (issue 10 item 6)."""
    raw = decode(dumps(batch), RawBatch)
    windows = process(raw.windows, kernel=3)
    decoded_or_refused("processed", encode(Processed(windows=windows)))
    assert decode(encode(Processed(windows=windows)), Processed).windows == windows


# -- regressions: each input a fuzzer found, exactly --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("cloud-batch", b'{"\\r": null}'),  # test_any_json_...: value={'\r': None}
        ("device-status", b'{"\\n": null}'),
        ("raw", b'{"\\n": null}'),
    ],
)
def test_an_unknown_key_with_a_line_break_is_not_quoted_into_the_log(name: str, payload: bytes) -> None:
    """The error quoted the key, line break and all: in the text log format one hostile key wrote
    a second, forged log line (and in a sealed payload it put decrypted text into the log)."""
    with pytest.raises(SchemaError) as err:
        decode(payload, SCHEMAS[name])
    assert str(err.value) == "Object contains unknown field"


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("alert", b'{"kind": "\xc2\xa4canary\xc2\xa4", "device": "0"}', "Invalid value - at `$.kind`"),
        ("device-status", b'{"state": "\xc2\xa4canary\xc2\xa4"}', "Invalid enum value - at `$.state`"),
        ("raw", b'{"\xc2\xa4canary\xc2\xa4": 1}', "Object contains unknown field"),
        ("device-status", b'{"extra_field": 1}', "Object contains unknown field `extra_field`"),
        # A key that forges a path of its own, line break included: only a well-formed path is kept.
        ("device-status", b'{" - at `$.x\\nFAKE`": 1}', "Object contains unknown field"),
        ("raw", b'{"windows": [{" - at `$.x`\\n": 1}]}', "Object contains unknown field - at `$.windows[0]`"),
    ],
)
def test_a_refusal_names_the_rule_and_path_never_the_value(name: str, payload: bytes, message: str) -> None:
    """test_a_refusal_never_quotes_the_payload: msgspec's message quoted the offending value (and
    any unknown key), so a sealed payload's decrypted text reached logs and dead-letter files.
    A key that is a plain name (a newer producer's field) is still named."""
    with pytest.raises(SchemaError) as err:
        decode(payload, SCHEMAS[name])
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        # test_genuine_payloads_...[alert]: one past 2**53 - 1 (no longer exact as a double).
        ("alert", b'{"kind": "offline", "device": "0", "reason": null, "last_seen": 9007199254740992, "ts": 0}'),
        # test_hostile_literals_...[cloud-batch]: a 401-digit `end` decoded, then broke orjson.
        (
            "cloud-batch",
            b'{"batch_id": "00000000000000000000000000000000", "records": [{"type": "window", "id": "0/0/0", '
            b'"device": "0", "sensor": "0", "unit": "", "start": 0, "end": 1' + b"0" * 400 + b', "n": 1, '
            b'"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0, "std": 0.0}]}',
        ),
        # test_any_json_...[raw]: a window whose end (start + size) is past 2**53 - 1, so the
        # processed window the preprocessor builds from it would be refused by every consumer.
        (
            "raw",
            b'{"windows": [{"device": "d", "window": {"start": 9007199254740990, "size": 5}, "sensors": '
            b'{"t": {"unit": "", "t": [9007199254740990], "v": [1.0]}}}]}',
        ),
        ("service-status", b'{"state": "online", "client_id": "c", "ts": 0, "devices": {"d": {"state": "online", '
         b'"reads": 18446744073709551616}}}'),
    ],
)  # fmt: skip
def test_an_integer_no_consumer_holds_exactly_is_refused(name: str, payload: bytes) -> None:
    """JSON integers have no bound and msgspec decodes any: a 20-digit window start went through
    the preprocessor into Redis scores (doubles) and the cloud sink's orjson (64 bits) broke on it."""
    with pytest.raises(SchemaError, match=r"<= 9007199254740991|window end exceeds"):
        decode(payload, SCHEMAS[name])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("nesting", DEEP[:2])
def test_deep_nesting_is_our_error_not_a_recursion_error(name: str, nesting: bytes) -> None:
    """test_hostile_literals_...: msgspec recurses once per nesting level and raised RecursionError
    (not ours). A service status is plain JSON any broker user may publish: no key needed."""
    half = len(nesting) // 2
    wrapped = b'{"state": "online", "client_id": "c", "ts": 0, "x": ' + nesting + b"}"
    for payload in (nesting, nesting[:half] + b"1" + nesting[half:], wrapped):
        with pytest.raises(SchemaError):
            decode(payload, SCHEMAS[name])
