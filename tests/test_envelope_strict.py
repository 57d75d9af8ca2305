"""The envelope checks of docs/contract.md ("Sealed envelope v1"), one at a time.

Each refused envelope below differs from an accepted one in exactly the field under test and keeps a
token that authenticates, so only that one check can refuse it: drop the check and the envelope opens.
The TTL cases build genuine tokens dated in the past (Fernet's own timestamp), as a backlog or a
captured message replayed later would carry.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet
from iotpipe import KeyRing, MalformedEnvelope, Opener, Sealer, UndecryptableToken

TOPIC = "iotpipe/v2/processed/dev-1"
KEY = Fernet.generate_key()
DAY = 24 * 3600


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing([("k1", KEY)])


def sealed(keys: KeyRing) -> dict[str, Any]:
    """A freshly sealed envelope as a dict, to alter one field of."""
    return orjson.loads(Sealer(keys, "preprocessor/a").seal(TOPIC, {"x": 1}))  # type: ignore[no-any-return]


def sealed_at(key: bytes, topic: str, data: Any, at: int, kid: str = "k1", seq: int = 1) -> bytes:
    """The contract's wire format, sealed with `key` as if at unix time `at` (the Fernet timestamp
    and the sealed `ts` both say so)."""
    inner = {"topic": topic, "src": "preprocessor/old", "boot": uuid.uuid4().hex[:16], "seq": seq, "ts": at * 1000}
    token = Fernet(key).encrypt_at_time(orjson.dumps({**inner, "data": data}), at)
    return orjson.dumps({"v": 1, "alg": "fernet", "kid": kid, "ct": token.decode("ascii")})


def refused(keys: KeyRing, envelope: dict[str, Any], match: str | None = None) -> None:
    """Opening `envelope` raises exactly MalformedEnvelope (reason `malformed`), whose message
    matches `match` when given (it names what it objects to)."""
    with pytest.raises(MalformedEnvelope, match=match) as err:
        Opener(keys).open(TOPIC, orjson.dumps(envelope))
    assert type(err.value) is MalformedEnvelope and err.value.reason == "malformed"


def test_the_unaltered_envelope_opens(keys: KeyRing) -> None:
    """The control for every case below: the same envelope, untouched, is accepted."""
    envelope = sealed(keys)
    assert set(envelope) == {"v", "alg", "kid", "ct"}
    opened = Opener(keys).open(TOPIC, orjson.dumps(envelope))
    assert (opened.topic, opened.src, opened.seq) == (TOPIC, "preprocessor/a", 1)


@pytest.mark.parametrize("extra", [{"extra": 1}, {"aad": "x"}, {"V": 1}])
def test_an_extra_key_is_refused_even_with_a_valid_token(keys: KeyRing, extra: dict[str, Any]) -> None:
    refused(keys, {**sealed(keys), **extra})


@pytest.mark.parametrize("missing", ["v", "alg", "kid"])
def test_a_missing_key_is_refused_even_with_a_valid_token(keys: KeyRing, missing: str) -> None:
    """`ct` stays, so the token would still decrypt: only the key-set check can refuse these.
    (A missing `v` or `alg` must be refused as malformed, not crash with a KeyError.)"""
    envelope = sealed(keys)
    del envelope[missing]
    refused(keys, envelope)


def test_a_missing_ct_is_refused_as_malformed(keys: KeyRing) -> None:
    envelope = sealed(keys)
    del envelope["ct"]
    refused(keys, envelope)


@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.0])
def test_a_version_other_than_1_is_refused(keys: KeyRing, version: object) -> None:
    refused(keys, {**sealed(keys), "v": version}, match=r"(?i)\bv\b|version")


@pytest.mark.parametrize("alg", ["aes", "FERNET", "", None])
def test_an_algorithm_other_than_fernet_is_refused(keys: KeyRing, alg: object) -> None:
    refused(keys, {**sealed(keys), "alg": alg}, match=r"(?i)alg")


@pytest.mark.parametrize("kid", [1, None, ["k1"], {"k": "k1"}])
def test_a_kid_that_is_not_a_string_is_refused(keys: KeyRing, kid: object) -> None:
    """The key id is not needed to decrypt (every key of the ring is tried), so nothing but the
    type check refuses these."""
    refused(keys, {**sealed(keys), "kid": kid}, match="(?i)kid")


@pytest.mark.parametrize("ct", [12, None, ["token"], {"t": 1}])
def test_a_ct_that_is_not_a_string_is_refused_as_malformed(keys: KeyRing, ct: object) -> None:
    refused(keys, {**sealed(keys), "ct": ct}, match="(?i)ct")


# -- message TTL (IOTPIPE_MESSAGE_TTL; 7 days by default) ---------------------------------------


def test_a_token_older_than_the_ttl_is_refused_and_one_within_it_accepted(keys: KeyRing) -> None:
    at = int(time.time()) - 3600
    hour_old = sealed_at(KEY, TOPIC, {"x": 1}, at)
    with pytest.raises(UndecryptableToken) as err:
        Opener(keys, ttl=60).open(TOPIC, hour_old)
    assert type(err.value) is UndecryptableToken and err.value.reason == "undecryptable"
    assert Opener(keys, ttl=2 * 3600).open(TOPIC, hour_old).ts == at * 1000


def test_the_default_ttl_is_seven_days(keys: KeyRing) -> None:
    now = int(time.time())
    assert Opener(keys).open(TOPIC, sealed_at(KEY, TOPIC, 6, now - 6 * DAY, seq=6)).seq == 6
    with pytest.raises(UndecryptableToken) as err:
        Opener(keys).open(TOPIC, sealed_at(KEY, TOPIC, 8, now - 8 * DAY))
    assert err.value.reason == "undecryptable"


def test_sealed_at_builds_what_the_sealer_builds(keys: KeyRing) -> None:
    """The helper above is the contract's format and nothing else: a current one opens normally."""
    at = int(time.time())
    opened = Opener(keys, ttl=60).open(TOPIC, sealed_at(KEY, TOPIC, {"y": 2}, at, seq=7))
    assert (opened.topic, opened.src, opened.seq, opened.ts) == (TOPIC, "preprocessor/old", 7, at * 1000)
