from __future__ import annotations

import base64

import orjson
import pytest
from cryptography.fernet import Fernet
from iotpipe import (
    ConfigError,
    DuplicateMessage,
    KeyRing,
    MalformedEnvelope,
    Opener,
    Sealer,
    StaleMessage,
    TopicMismatch,
    UndecryptableToken,
)

TOPIC = "iotpipe/v2/raw/dev-1"


def ring(*kids: str) -> KeyRing:
    return KeyRing([(kid, Fernet.generate_key()) for kid in kids])


def test_round_trip_carries_identity_and_data() -> None:
    keys = ring("k1")
    sealer = Sealer(keys, "sensor-reader/a")
    opened = Opener(keys).open(TOPIC, sealer.seal(TOPIC, {"x": [1, 2.5]}))
    assert opened.data == {"x": [1, 2.5]}
    assert (opened.src, opened.boot, opened.seq, opened.topic) == ("sensor-reader/a", sealer.boot, 1, TOPIC)
    envelope = orjson.loads(sealer.seal(TOPIC, 1))
    assert set(envelope) == {"v", "alg", "kid", "ct"} and envelope["v"] == 1 and envelope["kid"] == "k1"
    assert b"dev-1" not in base64.urlsafe_b64decode(envelope["ct"])  # the topic is inside the ciphertext


def test_wrong_key_is_rejected() -> None:
    payload = Sealer(ring("k1"), "s/a").seal(TOPIC, 1)
    with pytest.raises(UndecryptableToken):
        Opener(ring("k1")).open(TOPIC, payload)


@pytest.mark.parametrize("position", [10, 40, -5])
def test_tampered_token_is_rejected(position: int) -> None:
    keys = ring("k1")
    envelope = orjson.loads(Sealer(keys, "s/a").seal(TOPIC, 1))
    ct = bytearray(envelope["ct"].encode())
    ct[position] = ord("A") if ct[position] != ord("A") else ord("B")
    envelope["ct"] = ct.decode()
    with pytest.raises(UndecryptableToken):
        Opener(keys).open(TOPIC, orjson.dumps(envelope))


def test_replay_onto_another_topic_is_rejected() -> None:
    keys = ring("k1")
    payload = Sealer(keys, "s/a").seal(TOPIC, 1)
    with pytest.raises(TopicMismatch):
        Opener(keys).open("iotpipe/v2/raw/dev-2", payload)


def test_duplicate_and_stale_sequence_numbers() -> None:
    keys = ring("k1")
    sealer = Sealer(keys, "s/a")
    opener = Opener(keys, replay_window=16)
    first = sealer.seal(TOPIC, 1)
    opened = opener.open(TOPIC, first)
    opener.commit(opened)
    with pytest.raises(DuplicateMessage):
        opener.open(TOPIC, first)
    later = [sealer.seal(TOPIC, i) for i in range(20)]
    for payload in later[10:]:
        opener.commit(opener.open(TOPIC, payload))
    with pytest.raises(StaleMessage):  # seq far behind the newest: outside the window
        opener.open(TOPIC, later[0])
    out_of_order = later[9]  # inside the window, never seen: accepted
    assert opener.open(TOPIC, out_of_order).seq == 11


def test_uncommitted_message_can_be_redelivered() -> None:
    """A message whose handling failed (not committed) must be processed again on redelivery."""
    keys = ring("k1")
    payload = Sealer(keys, "s/a").seal(TOPIC, 1)
    opener = Opener(keys)
    opener.open(TOPIC, payload)
    assert opener.open(TOPIC, payload).seq == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[" * 200_000,
        b'{"v":1,"alg":"fernet","kid":"k1"}',
        b'{"v":2,"alg":"fernet","kid":"k1","ct":"x"}',
        b'{"v":1,"alg":"aes","kid":"k1","ct":"x"}',
        b'{"v":1,"alg":"fernet","kid":"k1","ct":"x","extra":1}',
        b'{"v":1,"alg":"fernet","kid":"k1","ct":12}',
        b'{"v":NaN,"alg":"fernet","kid":"k1","ct":"x"}',
        b'{"v":1e999,"alg":"fernet","kid":"k1","ct":"x"}',
        b"[1,2,3]",
    ],
)
def test_malformed_envelopes_raise_only_our_error(payload: bytes) -> None:
    with pytest.raises((MalformedEnvelope, UndecryptableToken)):
        Opener(ring("k1")).open(TOPIC, payload)


def test_truncated_and_empty_tokens() -> None:
    keys = ring("k1")
    envelope = orjson.loads(Sealer(keys, "s/a").seal(TOPIC, 1))
    for ct in (envelope["ct"][: len(envelope["ct"]) // 2], "", "é"):
        with pytest.raises(UndecryptableToken):
            Opener(keys).open(TOPIC, orjson.dumps({**envelope, "ct": ct}))


def test_oversize_is_rejected_before_decrypting() -> None:
    with pytest.raises(MalformedEnvelope, match="exceeds"):
        Opener(ring("k1"), max_bytes=1024).open(TOPIC, b" " * 2048)


def test_sealed_content_must_be_complete() -> None:
    keys = ring("k1")
    token = keys.encrypt(orjson.dumps({"topic": TOPIC, "data": 1})).decode()
    with pytest.raises(MalformedEnvelope):
        Opener(keys).open(TOPIC, orjson.dumps({"v": 1, "alg": "fernet", "kid": "k1", "ct": token}))


def test_key_rotation_without_downtime() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    before = KeyRing([("k1", old)])
    during = KeyRing([("k1", old), ("k2", new)])  # step 1: new key decrypts everywhere
    after = KeyRing([("k2", new), ("k1", old)])  # step 2: producers encrypt with the new key
    final = KeyRing([("k2", new)])  # step 3: old key retired
    assert Opener(during).open(TOPIC, Sealer(before, "s/a").seal(TOPIC, 1)).data == 1
    assert Opener(during).open(TOPIC, Sealer(after, "s/b").seal(TOPIC, 2)).data == 2
    assert orjson.loads(Sealer(after, "s/b").seal(TOPIC, 2))["kid"] == "k2"
    with pytest.raises(UndecryptableToken):
        Opener(final).open(TOPIC, Sealer(before, "s/c").seal(TOPIC, 3))


def test_key_ring_file_errors_never_show_the_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keyring"
    path.write_text("k1 not-a-valid-secret-key-material\n")
    with pytest.raises(ConfigError) as err:
        KeyRing.from_file(path)
    assert "not-a-valid-secret" not in str(err.value) and "k1" in str(err.value)
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="empty"):
        KeyRing.from_file(path)
    good = Fernet.generate_key().decode()
    path.write_text(f"k1 {good}\nk1 {good}\n")
    with pytest.raises(ConfigError, match="duplicate"):
        KeyRing.from_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        KeyRing.from_file(tmp_path / "missing")


def test_public_surface_is_exactly_what_all_names() -> None:
    import iotpipe

    assert all(hasattr(iotpipe, name) for name in iotpipe.__all__)
    public = {n for n in dir(iotpipe) if not n.startswith("_") and n != "annotations"}
    # The public submodules (commands and tools), present once some test has imported them.
    assert public - {"cli", "devstack", "bench", "watch"} == set(iotpipe.__all__)
