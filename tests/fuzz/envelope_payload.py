"""Coverage-guided fuzzing (atheris, libFuzzer) of the path every service runs on each inbound
message: Opener.open (size, JSON, envelope shape, Fernet, sealed fields, topic, replay window) and the
payload's decode into its model; plus the plain path (a service status, unsealed, into its model).

    make fuzz                         FUZZ_SECONDS (default 60) of fuzzing, corpus in var/fuzz/
    uv run python tests/fuzz/envelope_payload.py --seconds 300 [libFuzzer flags...]
    uv run python tests/fuzz/envelope_payload.py var/fuzz/crashes/crash-<sha1>   (replay one input)

The first byte of an input picks the attacker: 0 anyone on the broker (the bytes are the MQTT
payload), 1 a key holder (the bytes are the plaintext inside a genuine token), 2 a key holder who
follows the envelope (the bytes are the `data` of a genuinely sealed message), 3 anyone publishing
a service status (plain JSON). The second picks the subscription's model. A fixed key, used for
nothing else, makes every crash file replayable. At start, genuine messages of every model, sealed
now, are written to the corpus as seeds.

An input fails (libFuzzer saves it under var/fuzz/crashes/) when opening or decoding it raises
anything but EnvelopeError or SchemaError, when an error's text holds key material, the sealed data
or a line break, when what opened breaks an invariant (integers past 2**53, a topic other than the
arrival one) or cannot be re-encoded, recorded and persisted, or when it takes longer than
`-timeout` seconds. Each finding becomes a regression test in tests/test_fuzz_*.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # no wheel for this platform (atheris ships Linux x86_64 wheels only)
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["iotpipe"]):
        from iotpipe import (
            Alert,
            EnvelopeError,
            KeyRing,
            Opener,
            Processed,
            RawBatch,
            ReplayGuard,
            SchemaError,
            Sealer,
            ServiceStatus,
            decode,
            encode_sorted,
        )
        from iotpipe._models import to_builtins
else:
    from iotpipe import (
        Alert,
        EnvelopeError,
        KeyRing,
        Opener,
        Processed,
        RawBatch,
        ReplayGuard,
        SchemaError,
        Sealer,
        ServiceStatus,
        decode,
        encode_sorted,
    )
    from iotpipe._models import to_builtins
import msgspec
import orjson
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[2]
# A fuzzing-only key (it seals nothing real), fixed so that a saved crash replays identically.
FUZZ_KEY = base64.urlsafe_b64encode(hashlib.sha256(b"iotpipe fuzz harness, not a secret").digest())
KEYS = KeyRing([("fuzz", FUZZ_KEY)])
FERNET = Fernet(FUZZ_KEY)
CANARY = "¤sealed-canary¤"  # sealed into every seed: no error may quote it
MAX_INT = 2**53 - 1
# (topic, model) of each sealed subscription in the services, as iotpipe.Bus opens them.
SUBSCRIPTIONS: list[tuple[str, Any]] = [
    ("iotpipe/v2/raw/reader-1", RawBatch),
    ("iotpipe/v2/processed/pre-1", Processed),
    ("iotpipe/v2/alerts/greenhouse-1", Alert),
    ("iotpipe/v2/processed/pre-1", Any),
]
STATUS_TOPIC = "iotpipe/v2/status/service/sensor-reader/reader-1"
SECRETS = [FUZZ_KEY.decode(), FUZZ_KEY.decode()[:20], CANARY, base64.urlsafe_b64decode(FUZZ_KEY)[:16].hex()]


def genuine_payloads() -> list[Any]:
    """One genuine payload per subscription, as the services publish them."""
    now = int(time.time() * 1000)
    start = now - now % 1000
    return [
        {
            "windows": [
                {
                    "device": "greenhouse-1",
                    "window": {"start": start, "size": 1000},
                    "sensors": {"temperature": {"unit": "degC", "t": [start, start + 500], "v": [21.5, 21.625]}},
                }
            ]
        },
        {
            "windows": [
                {
                    "device": "greenhouse-1",
                    "sensor": "temperature",
                    "unit": "degC",
                    "start": start,
                    "end": start + 1000,
                    "n": 2,
                    "mean": 21.5625,
                    "median": 21.5625,
                    "min": 21.5,
                    "max": 21.625,
                    "std": 0.0625,
                }
            ]
        },
        {"kind": "fault", "device": "greenhouse-1", "reason": "bus: timeout", "last_seen": start, "ts": now},
        {"canary": CANARY, "nested": [1, 2.5, None, True, {"k": "v"}]},
    ]


def seeds() -> list[bytes]:
    """Genuine inputs for every mode and model: what coverage-guided mutation starts from."""
    out = []
    sealer = Sealer(KEYS, "fuzz/seed")
    for index, ((topic, _model), payload) in enumerate(zip(SUBSCRIPTIONS, genuine_payloads(), strict=True)):
        sealed = sealer.seal(topic, payload)
        out.append(bytes([0, index]) + sealed)
        inner = {"topic": topic, "src": "fuzz/seed", "boot": "0123456789abcdef", "seq": 7, "ts": 1, "data": payload}
        out.append(bytes([1, index]) + orjson.dumps(inner))
        out.append(bytes([2, index]) + orjson.dumps(payload))
    # Near-misses a mutation turns hostile in one step: nesting just under msgspec's recursion
    # limit (which no coverage leads to: msgspec is C, not instrumented), a start near 2**53.
    limit = nesting_limit()
    for depth in (limit - 32, limit - 8, limit - 2):  # the stack under libFuzzer differs a little
        out.append(bytes([2, 3]) + b"[" * depth + b"]" * depth)
    out.append(
        bytes([2, 1]) + orjson.dumps(genuine_payloads()[1]).replace(b'"start":', b'"start":9007199254740990,"x":')
    )
    status = {"state": "online", "client_id": "sensor-reader-1", "ts": 1, "service": "sensor-reader"}
    out.append(bytes([3, 0]) + orjson.dumps({**status, "devices": {"greenhouse-1": {"state": "fault", "reads": 3}}}))
    return out


# libFuzzer's dictionary: tokens its mutations insert whole (JSON's hostile literals, nesting).
DICTIONARY = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"9007199254740993", b"18446744073709551616",
    b'"\\u0000"', b'"\\ud800"', b"\xff", b"\xed\xa0\x80", b"[" * 32, b"]" * 32, b'{"a":' * 8, b"\\n",
    b'"v":1', b'"alg":"fernet"', b'"kid":"fuzz"', b'"ct":"', b'"seq":', b'"ts":', b'"topic":', b'"data":',
]  # fmt: skip


def nesting_limit() -> int:
    """The shallowest nesting msgspec refuses with RecursionError from here (about 1,000 levels)."""
    low, high = 1, 100_000
    while low < high:
        middle = (low + high) // 2
        try:
            msgspec.json.decode(b"[" * middle + b"]" * middle)
            low = middle + 1
        except RecursionError:
            high = middle
    return low


def seal_plaintext(plaintext: bytes) -> bytes:
    token = FERNET.encrypt(plaintext).decode("ascii")
    return orjson.dumps({"v": 1, "alg": "fernet", "kid": "fuzz", "ct": token})


def check_refusal(exc: BaseException) -> None:
    while exc is not None:
        text = f"{exc}{exc!r}"
        leaked = [secret for secret in SECRETS if secret in text]
        if leaked or "\n" in str(exc) or "\r" in str(exc):
            raise AssertionError(f"refusal gives away {leaked or 'a line break'}: {text[:300]!r}") from exc
        # What a traceback shows: the cause, or the context unless `raise ... from None` hid it.
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # type: ignore[assignment]


def check_value(value: Any) -> None:
    """A decoded model: re-encodable by every encoder the pipeline uses (orjson takes 64 bits at
    most), and every integer in it exact as a double."""
    encode_sorted(value)
    stack = [to_builtins(value)]
    while stack:
        item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
            raise AssertionError(f"a decoded model holds the integer {item}")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, which, body = data[0] % 4, data[1] % len(SUBSCRIPTIONS), data[2:]
    topic, model = SUBSCRIPTIONS[which]
    if mode == 3:
        try:
            check_value(decode(body, ServiceStatus))
        except SchemaError as exc:
            check_refusal(exc)
        return
    if mode == 0:
        payload = body
    elif mode == 1:
        payload = seal_plaintext(body)
    else:
        inner = {"topic": topic, "src": "fuzz/x", "boot": "0123456789abcdef", "seq": 1, "ts": 1}
        payload = seal_plaintext(orjson.dumps(inner)[:-1] + b',"data":' + body + b"}")
    opener = Opener(KEYS, ttl=None)
    try:
        opened = opener.open(topic, payload, model)
    except (EnvelopeError, SchemaError) as exc:
        check_refusal(exc)
        return
    if opened.topic != topic or not (0 <= opened.seq <= MAX_INT and 0 <= opened.ts <= MAX_INT):
        raise AssertionError(f"opened a message breaking the envelope's invariants: {opened!r:.300}")
    if model is not Any:
        check_value(opened.data)
    opener.commit(opened)
    ReplayGuard().load(opener.guard.dump())


def write_seeds(corpus: Path) -> Path:
    """The seeds into `corpus`, the dictionary beside it (returned)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds():
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
    dictionary = corpus.parent / "json.dict"
    escaped = ("".join(f"\\x{byte:02x}" for byte in token) for token in DICTIONARY)
    dictionary.write_text("".join(f'"{token}"\n' for token in escaped))
    return dictionary


def dumb_fuzz(corpus: Path, seconds: float) -> None:
    """Without atheris: random byte edits of the corpus for `seconds` (no coverage guidance)."""
    inputs = [path.read_bytes() for path in sorted(corpus.iterdir())]
    rng, deadline, runs = random.Random(os.getpid()), time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(inputs))
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data) + 1)
            action = rng.randrange(4)
            if action == 0 and at < len(data):
                data[at] ^= 1 << rng.randrange(8)
            elif action == 1:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            elif action == 2:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.choice(b'[{"0-e.9,:').to_bytes(1, "big") * rng.randint(1, 2000)
        try:
            test_one_input(bytes(data))
        except BaseException:
            crash = corpus.parent / "crashes" / f"crash-{hashlib.sha1(data).hexdigest()}"
            crash.parent.mkdir(parents=True, exist_ok=True)
            crash.write_bytes(bytes(data))
            print(f"crash saved to {crash}", file=sys.stderr)
            raise
        runs += 1
    print(f"done: {runs} inputs in {seconds:.0f}s, no failure (random mutation, atheris unavailable)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--seconds", type=int, default=60, help="fuzz this long (libFuzzer -max_total_time)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var/fuzz", help="corpus/ and crashes/ live here")
    args, libfuzzer = parser.parse_known_args()
    corpus, crashes = args.workdir / "corpus", args.workdir / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    replay = [arg for arg in libfuzzer if not arg.startswith("-")]
    dictionary = None if replay else write_seeds(corpus)
    if atheris is None:
        if replay:
            for path in replay:
                test_one_input(Path(path).read_bytes())
            print(f"replayed {len(replay)} input(s): no failure")
            return
        print("atheris is not installed (it has wheels for Linux x86_64 only): random mutation instead")
        dumb_fuzz(corpus, args.seconds)
        return
    flags = [
        f"-max_total_time={args.seconds}",
        f"-artifact_prefix={crashes}/",
        "-timeout=10",  # a hang: any single input taking this long is a finding
        "-rss_limit_mb=2048",
        "-max_len=16384",  # room for nesting past msgspec's recursion limit (about 1,000 levels)
        "-len_control=0",  # long inputs from the start: the near-limit seeds are 2 KB
        # Keep every seed, whole: the near-limit ones add no coverage (msgspec is not instrumented),
        # so libFuzzer would drop them at start or shrink them away from the limit.
        "-keep_seed=1",
        "-reduce_inputs=0",
        "-print_final_stats=1",
        *([f"-dict={dictionary}"] if dictionary else []),
        *libfuzzer,
    ]
    atheris.Setup([sys.argv[0], *flags, *([] if replay else [str(corpus)])], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
