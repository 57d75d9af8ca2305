"""Fuzzing the sealed envelope (iotpipe._envelope): what every service runs on each inbound message.

Properties, for any input:
- seal -> open gives back exactly what was sealed, for any JSON value and any valid payload model;
- a genuine sealed message changed in any way (a bit flipped, truncated, emptied, extended, a byte
  replaced or dropped), or opened with the wrong key or on the wrong topic, raises an EnvelopeError
  and nothing else, or (only where the change left the authenticated token intact) opens to the very
  same message; the error's text holds neither key material nor the sealed data;
- arbitrary bytes, JSON and envelope-shaped objects raise an EnvelopeError and nothing else;
- whatever a key holder seals (arbitrary plaintext inside a genuine token) raises an EnvelopeError or
  a SchemaError, or opens to a message whose identity the replay window can record and persist;
- an oversize payload is refused before any decryption; the replay window agrees with a reference
  model for any sequence of messages, and its state file loads or is refused, never half-read.
Regressions found here and by the atheris harness (tests/fuzz/envelope_payload.py) follow the
properties, each with its exact failing input.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet
from fuzz.payloads import GENUINE, MAX_INT, dumps, json_values, mutated
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from iotpipe import (
    DuplicateMessage,
    EnvelopeError,
    KeyRing,
    MalformedEnvelope,
    Opened,
    Opener,
    ReplayGuard,
    SchemaError,
    Sealer,
    StaleMessage,
    TopicMismatch,
    UndecryptableToken,
    decode,
)
from iotpipe._models import SCHEMAS

EXAMPLES = int(os.environ.get("IOTPIPE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("IOTPIPE_FUZZ_EXAMPLES"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOPIC = "iotpipe/v2/processed/pre-1"
KEY = Fernet.generate_key()
OTHER_KEY = Fernet.generate_key()
KEYS = KeyRing([("k1", KEY)])
CANARY = "¤sealed-canary¤"  # sealed into every message below: no error may quote it


def secrets_in(text: str) -> list[str]:
    """Which secrets `text` gives away: the keys (as configured, or either half in any encoding
    a message might use) or the sealed data."""
    found = []
    for key in (KEY, OTHER_KEY):
        raw = base64.urlsafe_b64decode(key)
        for half in (raw[:16], raw[16:]):
            if half.hex() in text or repr(half)[2:-1] in text or base64.urlsafe_b64encode(half).decode()[:20] in text:
                found.append("key half")
        if key.decode() in text or key.decode()[:20] in text:
            found.append("key")
    if CANARY in text or CANARY.encode("unicode_escape").decode() in text:
        found.append("sealed data")
    return found


def refusal(exc: BaseException) -> str:
    """Everything about an error that reaches a log line or a dead letter: the message of it and of
    each exception it was raised from."""
    parts = []
    while exc is not None:
        parts += [str(exc), repr(exc)]
        # What a traceback shows: the cause, or the context unless `raise ... from None` hid it.
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # type: ignore[assignment]
    return " | ".join(parts)


def open_or_refuse(opener: Opener, topic: str, payload: bytes, model: Any = Any) -> Opened[Any] | None:
    """Open `payload`; an EnvelopeError is fine (None) as long as it gives nothing away. Any other
    exception fails the property."""
    try:
        return opener.open(topic, payload, model)
    except EnvelopeError as exc:
        text = refusal(exc)
        assert not secrets_in(text), text
        assert "\n" not in str(exc), str(exc)
        return None


def genuine(data: Any = None, sealer: Sealer | None = None, topic: str = TOPIC) -> bytes:
    return (sealer or Sealer(KEYS, "preprocessor/pre-1")).seal(topic, {"canary": CANARY, "data": data})


# -- round trips ----------------------------------------------------------------------------------


@FUZZ
@given(data=json_values, topic=st.from_regex(r"\A[a-z0-9_-]{1,20}(/[A-Za-z0-9_-]{1,20}){1,4}\Z"))
def test_seal_then_open_gives_back_any_json_value(data: Any, topic: str) -> None:
    sealer = Sealer(KEYS, "svc/inst")
    opened = Opener(KEYS).open(topic, sealer.seal(topic, data))
    assert (opened.data, opened.topic, opened.src, opened.boot, opened.seq) == (data, topic, "svc/inst", sealer.boot, 1)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@FUZZ
@given(data=st.data())
def test_seal_then_open_gives_back_any_valid_payload(name: str, data: st.DataObject) -> None:
    model = SCHEMAS[name]
    value = decode(dumps(data.draw(GENUINE[name])), model)
    device = getattr(value, "device", "pre-1")
    topic = f"iotpipe/v2/x/{device}"
    assert Opener(KEYS).open(topic, Sealer(KEYS, "s/i").seal(topic, value), model).data == value


# -- mutations of a genuine message ---------------------------------------------------------------


@st.composite
def changed(draw: st.DrawFn, payload: bytes) -> bytes:
    """`payload` altered the ways a network, a broken client or an attacker alters bytes."""
    how = draw(st.sampled_from(["flip", "truncate", "extend", "replace", "drop", "insert"]))
    if how == "truncate":
        return payload[: draw(st.integers(0, len(payload) - 1))]
    if how == "extend":
        return payload + draw(st.binary(min_size=1, max_size=40))
    at = draw(st.integers(0, len(payload) - 1))
    if how == "flip":
        return payload[:at] + bytes([payload[at] ^ (1 << draw(st.integers(0, 7)))]) + payload[at + 1 :]
    if how == "replace":
        byte = draw(st.integers(0, 255).filter(lambda b: b != payload[at]))
        return payload[:at] + bytes([byte]) + payload[at + 1 :]
    if how == "drop":
        return payload[:at] + payload[at + 1 :]
    return payload[:at] + draw(st.binary(min_size=1, max_size=8)) + payload[at:]


@FUZZ
@given(data=st.data(), value=json_values)
def test_any_change_to_a_sealed_message_is_refused_or_changes_nothing(data: st.DataObject, value: Any) -> None:
    sealer = Sealer(KEYS, "preprocessor/pre-1")
    payload = genuine(value, sealer)
    original = Opener(KEYS).open(TOPIC, payload)
    altered = data.draw(changed(payload), label="altered")
    opened = open_or_refuse(Opener(KEYS), TOPIC, altered)
    if opened is not None:
        # Only bytes outside what Fernet authenticates moved (the unauthenticated `kid` hint, JSON
        # whitespace, base64 padding bits): the message must be the very one that was sealed.
        assert (opened.topic, opened.src, opened.boot, opened.seq, opened.ts, opened.data) == (
            original.topic,
            original.src,
            original.boot,
            original.seq,
            original.ts,
            original.data,
        )


@FUZZ
@given(value=json_values, topic=st.text(max_size=40).filter(lambda t: t != TOPIC))
def test_the_wrong_key_or_the_wrong_topic_is_always_refused(value: Any, topic: str) -> None:
    payload = genuine(value)
    with pytest.raises(UndecryptableToken) as wrong_key:
        Opener(KeyRing([("k1", OTHER_KEY)])).open(TOPIC, payload)
    assert not secrets_in(refusal(wrong_key.value))
    with pytest.raises(TopicMismatch) as wrong_topic:
        Opener(KEYS).open(topic, payload)
    assert not secrets_in(refusal(wrong_topic.value))


@FUZZ
@given(cut=st.integers(0, 400), value=json_values)
def test_a_truncated_or_empty_token_is_refused(cut: int, value: Any) -> None:
    envelope = orjson.loads(genuine(value))
    envelope["ct"] = envelope["ct"][: min(cut, len(envelope["ct"]) - 1)]
    with pytest.raises(EnvelopeError) as err:
        Opener(KEYS).open(TOPIC, orjson.dumps(envelope))
    assert type(err.value) in (UndecryptableToken, MalformedEnvelope)
    assert not secrets_in(refusal(err.value))


# -- arbitrary input --------------------------------------------------------------------------------

envelope_fields = st.one_of(json_values, st.text(max_size=200), st.just("fernet"), st.just(1), st.just("k1"))


@FUZZ
@given(
    payload=st.binary(max_size=400)
    | json_values.map(dumps)
    | st.fixed_dictionaries(
        {"v": envelope_fields, "alg": envelope_fields, "kid": envelope_fields, "ct": envelope_fields}
    ).map(dumps)
)
@example(payload=b"")
@example(payload=b"[" * 200_000)
@example(payload=b'{"v":1,"alg":"fernet","kid":"k1","ct":"\\u00e9"}')
def test_arbitrary_input_is_only_ever_an_envelope_error(payload: bytes) -> None:
    assert open_or_refuse(Opener(KEYS), TOPIC, payload) is None


def sealed_plaintext(plaintext: bytes, kid: str = "k1") -> bytes:
    """A genuine envelope around `plaintext`: what a holder of the key can send."""
    token = Fernet(KEY).encrypt(plaintext).decode("ascii")
    return orjson.dumps({"v": 1, "alg": "fernet", "kid": kid, "ct": token})


def inner(**fields: Any) -> dict[str, Any]:
    base = {"topic": TOPIC, "src": "p/1", "boot": uuid.uuid4().hex[:16], "seq": 1, "ts": int(time.time() * 1000)}
    return {**base, "data": {"canary": CANARY}, **fields}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@FUZZ
@given(data=st.data())
def test_whatever_a_key_holder_seals_is_refused_or_opens_cleanly(name: str, data: st.DataObject) -> None:
    """A key holder's messages still pass every check: arbitrary plaintext, a sealed object with any
    field changed, or a genuine payload mutated. Whatever opens, the replay window records and
    persists (its state file is JSON of 64-bit integers)."""
    how = data.draw(st.sampled_from(["bytes", "inner", "payload"]), label="how")
    if how == "bytes":
        plaintext = data.draw(st.binary(max_size=200), label="plaintext")
    elif how == "inner":
        plaintext = dumps(data.draw(mutated(inner(data=data.draw(GENUINE[name]))), label="inner"))
    else:
        payload = data.draw(GENUINE[name].flatmap(mutated), label="payload")
        plaintext = dumps(inner(data=payload))
    opener = Opener(KEYS)
    try:
        opened = opener.open(TOPIC, sealed_plaintext(plaintext), SCHEMAS[name])
    except EnvelopeError as exc:
        assert not secrets_in(refusal(exc)), refusal(exc)
        return
    except SchemaError as exc:
        assert CANARY not in str(exc)
        return
    assert opened.topic == TOPIC and 1 <= opened.seq <= MAX_INT and 0 <= opened.ts <= MAX_INT
    opener.commit(opened)
    restored = ReplayGuard()
    restored.load(opener.guard.dump())
    with pytest.raises(DuplicateMessage):
        restored.check(opened.src, opened.boot, opened.seq)


# -- size, replay, ttl --------------------------------------------------------------------------------


@FUZZ
@given(value=json_values, slack=st.integers(1, 10_000), padding=st.integers(0, 5000))
def test_oversize_is_refused_before_decrypting(value: Any, slack: int, padding: int) -> None:
    payload = genuine([value, "x" * padding])

    class NoDecrypt(KeyRing):
        def decrypt(self, token: bytes, ttl: int | None) -> bytes:
            raise AssertionError("decrypted an oversize payload")

    opener = Opener(NoDecrypt([("k1", KEY)]), max_bytes=max(0, len(payload) - slack))
    with pytest.raises(MalformedEnvelope, match="exceeds"):
        opener.open(TOPIC, payload)
    assert Opener(KEYS, max_bytes=len(payload)).open(TOPIC, payload).data == {
        "canary": CANARY,
        "data": [value, "x" * padding],
    }


@FUZZ
@given(
    steps=st.lists(st.tuples(st.sampled_from(["check", "record"]), st.integers(1, 40), st.integers(0, 2)), max_size=60)
)
def test_the_replay_window_agrees_with_a_reference_model(steps: list[tuple[str, int, int]]) -> None:
    """For any interleaving of senders' messages: a duplicate within the window is refused as such,
    anything older than the window as stale, everything else passes; a dump/load keeps it all."""
    window = 8
    guard = ReplayGuard(window=window, max_senders=10)
    seen: dict[str, set[int]] = {}
    for action, seq, sender in steps:
        src = f"s{sender}"
        if action == "record":
            guard.record(src, "boot", seq)
            seen.setdefault(src, set()).add(seq)
            continue
        restored = ReplayGuard(window=window, max_senders=10)
        restored.load(guard.dump())
        for g in (guard, restored):
            high = max(seen[src]) if seen.get(src) else None
            if high is not None and high - seq >= window:
                with pytest.raises(StaleMessage):
                    g.check(src, "boot", seq)
            elif high is not None and seq in seen[src]:
                with pytest.raises(DuplicateMessage):
                    g.check(src, "boot", seq)
            else:
                g.check(src, "boot", seq)


@FUZZ
@given(state=st.binary(max_size=200) | json_values.map(dumps) | st.lists(st.lists(json_values, max_size=5)).map(dumps))
@example(state=b'[["s","b","1000000000000000000000000","1"]]')
@example(state=b'[["s","b",1e300,"1"]]')
def test_a_replay_state_file_loads_or_is_refused_never_half_read(state: bytes) -> None:
    """The file each service persists its replay window in (IOTPIPE_REPLAY_STATE): whatever is in it,
    loading raises ValueError (the bus then starts empty) or gives a window that saves again."""
    guard = ReplayGuard()
    try:
        guard.load(state)
    except ValueError:
        return
    assert ReplayGuard().load(guard.dump()) is None


@FUZZ
@given(age=st.integers(-3600, 3 * 3600).filter(lambda a: abs(a - 3600) > 5 and abs(a + 60) > 5))
def test_the_ttl_refuses_exactly_what_is_too_old_or_from_the_future(age: int) -> None:
    """Fernet's own timestamp: older than the ttl (3600 s here) or more than 60 s ahead is refused."""
    at = int(time.time()) - age
    plaintext = orjson.dumps(inner(ts=max(0, at * 1000)))
    payload = orjson.dumps(
        {"v": 1, "alg": "fernet", "kid": "k1", "ct": Fernet(KEY).encrypt_at_time(plaintext, at).decode()}
    )
    opened = open_or_refuse(Opener(KEYS, ttl=3600), TOPIC, payload)
    assert (opened is not None) == (-60 <= age <= 3600)


# -- regressions: each input a fuzzer found, exactly ------------------------------------------------


def test_a_sequence_number_no_sealer_makes_is_refused_not_left_to_break_the_replay_state_file() -> None:
    """test_whatever_a_key_holder_seals_is_refused_or_opens_cleanly found a sealed `seq` of 0
    accepted (a Sealer counts from 1); past 2**64 it is worse: the message opened, was recorded, and
    the next save of the replay window raised orjson's "Integer exceeds 64-bit range" (a TypeError
    the bus's save loop does not expect), which ended replay persistence for that service."""
    for seq in (2**64, MAX_INT + 1, 0, -1):
        with pytest.raises(MalformedEnvelope, match="seq"):
            Opener(KEYS).open(TOPIC, sealed_plaintext(dumps(inner(seq=seq))))
    for ts in (2**64, -1):
        with pytest.raises(MalformedEnvelope, match="ts"):
            Opener(KEYS).open(TOPIC, sealed_plaintext(dumps(inner(ts=ts))))
    opened = Opener(KEYS).open(TOPIC, sealed_plaintext(orjson.dumps(inner(seq=MAX_INT))))
    guard = ReplayGuard()
    guard.record(opened.src, opened.boot, opened.seq)
    ReplayGuard().load(guard.dump())


def test_sealed_content_nested_deeply_is_malformed_not_a_recursion_error() -> None:
    """The RecursionError test_fuzz_models found in msgspec (one level of recursion per level of
    nesting) is here too: msgspec skips the sealed `data` by recursion, so a key holder's `data` of
    100,000 nested arrays raised RecursionError out of Opener.open instead of an EnvelopeError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    plaintext = dumps(inner(data=None)).replace(b'"data": null', b'"data": ' + deep)
    with pytest.raises(MalformedEnvelope, match="nested too deeply"):
        Opener(KEYS).open(TOPIC, sealed_plaintext(plaintext))


def test_a_refusal_of_sealed_content_never_quotes_it() -> None:
    """The quoting test_fuzz_models found in SchemaError was in the envelope's own message too: an
    unknown key inside the token was quoted (`unknown field ...`), so decrypted text, line breaks
    included, reached the log and the dead-letter file."""
    plaintext = dumps({**inner(), f"{CANARY}\nFAKE LOG LINE": 1})
    with pytest.raises(MalformedEnvelope) as err:
        Opener(KEYS).open(TOPIC, sealed_plaintext(plaintext))
    assert CANARY not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).endswith("unknown field")


def test_a_replay_state_file_with_an_integer_past_64_bits_is_refused() -> None:
    """Found by test_a_replay_state_file_loads_or_is_refused_never_half_read: a state file whose
    high-water mark was a 25-digit string loaded, and every later save raised JSONEncodeError."""
    with pytest.raises(ValueError):
        ReplayGuard().load(b'[["s","b","1000000000000000000000000","1"]]')
    with pytest.raises(ValueError):
        ReplayGuard().load(b'[["s","b",1e300,"1"]]')


def test_a_sealed_alert_with_a_27_digit_last_seen_is_a_schema_error() -> None:
    """Found by the atheris harness (`make fuzz`, mode 2: a key holder's sealed `data`, alerts
    subscription) within 14,000 inputs: this alert opened, and re-encoding it for Redis or the
    cloud (orjson, 64-bit integers) raised "Integer exceeds 64-bit range"."""
    data = (
        b'{"kind":"fault","device":"greenhouse-1","reason":"bus: timeout",'
        b'"last_seen":999999999999991795988855000,"ts":1795988855702}'
    )
    topic = "iotpipe/v2/alerts/greenhouse-1"
    plaintext = dumps(inner(topic=topic, data=None)).replace(b'"data": null', b'"data": ' + data)
    with pytest.raises(SchemaError, match=r"<= 9007199254740991 - at `\$\.last_seen`"):
        Opener(KEYS).open(topic, sealed_plaintext(plaintext), SCHEMAS["alert"])
