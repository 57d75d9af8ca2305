"""Key rotation live (issue 10), piece by piece: a service's key ring file re-read as it changes
(a broken one refused, the ring in use kept), the key ids each service reports, and `iotpipe keys`,
which rewrites a ring atomically and refuses each step the services' reports say is unsafe.
tests/faults/test_key_rotation.py rotates under load through the whole pipeline."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from cryptography.fernet import Fernet
from iotpipe import ConfigError, KeyRing, Metrics, Opener, Sealer, Topics, UndecryptableToken, counter
from iotpipe._keys import (
    UNKNOWN_KID_RECHECK,
    KeyRingFile,
    RingFile,
    ServiceKeys,
    promote_blockers,
    retire_blockers,
    status_lines,
)
from iotpipe._models import KeyRingStatus
from iotpipe.cli import main
from servers import (
    ROOT,
    Stack,
    bus_for,
    health_doc,
    processed_payload,
    service_counters,
    service_env,
    spawn,
    stop_all,
    wait_online,
    wait_until,
    window_payload,
)

TOPIC = "iotpipe/v2/processed/p1"
KEYS = {kid: Fernet.generate_key().decode() for kid in ("k1", "k2", "k3")}


def ring_text(*kids: str, comment: str = "# <key id> <fernet key>; the first encrypts, all decrypt") -> str:
    return comment + "\n" + "".join(f"{kid} {KEYS[kid]}\n" for kid in kids)


def replace(path: Path, text: str) -> None:
    """Rewrite a ring file as `iotpipe keys` does (a new file renamed over it): a service polling it
    sees the old ring or the new one, never a half-written file."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def ring(*kids: str) -> KeyRing:
    return KeyRing((kid, KEYS[kid].encode()) for kid in kids)


def no_key_material(text: str) -> None:
    assert not any(key in text for key in KEYS.values()), "key material in output"


# -- the service side: KeyRingFile ------------------------------------------------------------------


def test_a_changed_ring_is_loaded_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1"))
    metrics = Metrics()
    watched = KeyRingFile(path, metrics)
    since = watched.since
    assert watched.ring.kids == ("k1",) and watched.check() is None
    path.write_text(ring_text("k1", "k2"))  # step 1: decrypt-only, the same key encrypts
    assert watched.check() is not None and watched.ring.kids == ("k1", "k2") and watched.since == since
    path.write_text(ring_text("k2", "k1"))  # step 2: k2 encrypts from now
    assert watched.check() is not None and watched.ring.primary_kid == "k2" and watched.since >= since
    assert watched.status() == {"kids": ["k2", "k1"], "encrypts": "k2", "since": watched.since}
    assert counter(metrics.counters(), "keyring_reloads", "loaded") == 2


BROKEN = {
    "empty": "",
    "only comments": "# nothing here\n",
    "a malformed line": f"k1 {KEYS['k1']}\nk2\n",
    "a bad key": f"k1 {KEYS['k1']}\nk2 bm90LWEtdmFsaWQta2V5LW1hdGVyaWFs\n",
    "a duplicate id": f"k1 {KEYS['k1']}\nk1 {KEYS['k2']}\n",
    "an invalid id": f"k1 {KEYS['k1']}\nk/2 {KEYS['k2']}\n",
    "not UTF-8": f"k1 {KEYS['k1']}\n\xff\n",
}


@pytest.mark.parametrize("case", [*BROKEN, "missing"])
def test_a_broken_ring_is_refused_once_and_the_ring_in_use_kept(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1", "k2"))
    metrics = Metrics()
    watched = KeyRingFile(path, metrics)
    if case == "missing":
        path.unlink()
    else:
        path.write_bytes(BROKEN[case].encode("latin-1"))
    with caplog.at_level(logging.INFO, logger="iotpipe._keys"):
        for _ in range(3):  # every poll sees it; it is said and counted once
            assert watched.check() is None
    assert watched.ring.kids == ("k1", "k2") and watched.refused
    assert watched.status()["refused"] == watched.refused[:200] and watched.status()["kids"] == ["k1", "k2"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "key ring file refused, still using k1, k2" in errors[0].getMessage()
    no_key_material(caplog.text + watched.refused)
    assert "bm90LWEtdmFsaWQta2V5" not in caplog.text
    assert counter(metrics.counters(), "keyring_reloads", "refused") == 1
    # Put back as it was: nothing to load, and the refusal is over.
    path.write_text(ring_text("k1", "k2"))
    assert watched.check() is None and watched.refused is None and "refused" not in watched.status()


def test_at_start_a_broken_ring_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        KeyRingFile(path)


def test_an_unknown_key_id_rereads_the_ring_at_most_once_a_second(tmp_path: Path) -> None:
    """What a service does when a message names a key id it lacks: re-read the file before
    decrypting (so a key promoted elsewhere opens at once), but never more than once a second."""
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1"))
    watched = KeyRingFile(path)
    opener = Opener(watched.ring)
    reads = []

    def reload() -> None:
        reads.append(time.monotonic())
        if (new := watched.check_soon()) is not None:
            opener.keyring = new

    opener.on_unknown_kid = reload
    file_reads = []
    load = watched._load

    def counted_load() -> Any:
        file_reads.append(1)
        return load()

    watched._load = counted_load  # type: ignore[method-assign]
    path.write_text(ring_text("k1", "k2"))
    watched._last_check -= UNKNOWN_KID_RECHECK  # as if the last read was a second ago
    sealed = Sealer(ring("k2"), "preprocessor/p1").seal(TOPIC, 1)
    assert opener.open(TOPIC, sealed).data == 1 and len(reads) == len(file_reads) == 1  # re-read, and opened
    assert opener.open(TOPIC, Sealer(ring("k1"), "x/y").seal(TOPIC, 2)).data == 2 and len(reads) == 1  # known id
    forged = Sealer(ring("k3"), "x/z").seal(TOPIC, 3)
    for _ in range(5):  # a flood of an unknown id: each refused, the file not read again within the second
        with pytest.raises(UndecryptableToken):
            opener.open(TOPIC, forged)
    assert len(reads) == 6 and len(file_reads) == 1 and watched.ring.kids == ("k1", "k2")


# -- editing a ring: RingFile --------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_a_ring_is_rewritten_atomically_with_its_mode_and_comments(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1"))
    path.chmod(mode)
    inode = path.stat().st_ino
    edited = RingFile.read(path)
    edited.add("k2", KEYS["k2"])
    edited.save()
    assert path.stat().st_ino != inode  # a new file renamed over the old one: readers see one or the other
    assert path.stat().st_mode & 0o7777 == mode
    assert path.read_text() == ring_text("k1", "k2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring"]  # no temporary file left behind


def test_a_failed_rewrite_leaves_the_ring_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1"))

    def fail(*_args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    edited = RingFile.read(path)
    edited.add("k2", KEYS["k2"])
    with pytest.raises(OSError):
        edited.save()
    assert path.read_text() == ring_text("k1") and sorted(p.name for p in tmp_path.iterdir()) == ["keyring"]


def test_ring_edits_refuse_what_would_break_the_ring(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1", "k2"))
    edited = RingFile.read(path)
    with pytest.raises(ConfigError, match="already"):
        edited.add("k2", KEYS["k3"])
    with pytest.raises(ConfigError, match="not a valid Fernet key") as bad:
        edited.add("k3", "bm90LWEtdmFsaWQta2V5LW1hdGVyaWFs")
    assert "bm90" not in str(bad.value)
    with pytest.raises(ConfigError, match="invalid key id"):
        edited.add("k 3", KEYS["k3"])
    with pytest.raises(ConfigError, match="encrypts"):
        edited.retire("k1")
    with pytest.raises(ConfigError, match="not in the key ring"):
        edited.promote("k9")
    edited.retire("k2")
    with pytest.raises(ConfigError, match="encrypts"):
        edited.retire("k1")  # the last key is the one that encrypts: a ring is never emptied
    path.write_text("k1 nonsense\n")
    with pytest.raises(ConfigError, match="not a valid Fernet key"):
        RingFile.read(path)  # a broken ring is not edited (and never written)


# -- the rules of each step, from the services' reports -------------------------------------------


def svc(name: str, kids: list[str], encrypts: str, since: int = 0, state: str = "online") -> ServiceKeys:
    return ServiceKeys(name, state, since, KeyRingStatus(kids, encrypts, since))


def test_promote_needs_every_online_service_to_hold_the_key() -> None:
    services = [svc("a/1", ["k1", "k2"], "k1"), svc("b/1", ["k1"], "k1"), svc("c/1", ["k1"], "k1", state="offline")]
    assert promote_blockers("k2", services) == ["b/1 holds k1, encrypts with k1"]
    assert promote_blockers("k2", services[:1] + services[2:]) == []  # an offline one loads the file when it starts
    assert promote_blockers("k2", [ServiceKeys("old/1", "online", 0, None)]) == ["old/1 no key ids reported"]
    assert promote_blockers("k2", []) != []  # seeing no service proves nothing


def test_retire_waits_until_no_service_seals_with_it_and_the_ttl_has_passed() -> None:
    now = 1_000_000_000
    switched = now - 50_000
    services = [svc("a/1", ["k2", "k1"], "k2", switched), svc("b/1", ["k2", "k1"], "k2", switched - 99_000)]
    lagging = [*services, svc("c/1", ["k1", "k2"], "k1", 0)]
    assert retire_blockers("k1", lagging, ttl=10, now_ms=now) == ["c/1 holds k1, k2, encrypts with k1"]
    (blocker,) = retire_blockers("k1", services, ttl=60, now_ms=now)
    assert "may still be in flight until" in blocker  # 50 s after the last switch, TTL 60 s
    assert retire_blockers("k1", services, ttl=50, now_ms=now) == []


def test_status_guides_through_each_step(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text(ring_text("k1"))
    now = int(time.time() * 1000)
    one = status_lines(RingFile.read(path), [svc("a/1", ["k1"], "k1", now)], 60, now)
    assert any("iotpipe keys add <new kid>" in line for line in one)
    path.write_text(ring_text("k1", "k2"))
    waiting = status_lines(RingFile.read(path), [svc("a/1", ["k1"], "k1", now)], 60, now)
    assert any("k2: not held by every service yet: a/1 holds k1" in line for line in waiting)
    held = status_lines(RingFile.read(path), [svc("a/1", ["k1", "k2"], "k1", now)], 60, now)
    assert any("iotpipe keys promote k2" in line for line in held)
    path.write_text(ring_text("k2", "k1"))
    promoted = status_lines(RingFile.read(path), [svc("a/1", ["k2", "k1"], "k2", now - 61_000)], 60, now)
    assert any("iotpipe keys retire k1` (step 3) is safe now" in line for line in promoted)
    no_key_material("\n".join(one + waiting + held + promoted))


# -- the CLI -------------------------------------------------------------------------------------


def write_health(health: Path, name: str, kids: list[str], encrypts: str, since: int, state: str = "online") -> None:
    service, instance = name.split("/")
    health.mkdir(exist_ok=True)
    doc = {
        "state": state,
        "service": service,
        "instance": instance,
        "ts": int(time.time() * 1000),
        "connected": True,
        "keyring": {"kids": kids, "encrypts": encrypts, "since": since},
    }
    (health / f"{service}-{instance}.json").write_bytes(orjson.dumps(doc))


def keys(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main,
        ["keys", *args],
        env={"IOTPIPE_SECRETS_DIR": str(tmp_path), "IOTPIPE_MESSAGE_TTL": "60", "IOTPIPE_KEYRING_FILE": None},
    )
    no_key_material(result.output)
    return result.exit_code, result.output


def test_keys_cli_refuses_each_unsafe_step(tmp_path: Path) -> None:
    ring_file, health = tmp_path / "keyring", tmp_path / "health"
    ring_file.write_text(ring_text("k1"))
    now = int(time.time() * 1000)
    write_health(health, "preprocessor/a", ["k1"], "k1", now - 3_600_000)
    write_health(health, "cache-writer/b", ["k1"], "k1", now - 3_600_000)
    h = ("--health-dir", str(health))

    code, out = keys(tmp_path, "promote", "k2", *h)
    assert code != 0 and "add it first" in out
    code, out = keys(tmp_path, "add", "k2")
    assert code == 0 and RingFile.read(ring_file).kids == ["k1", "k2"]
    key_b = RingFile.read(ring_file).key_line("k2")
    assert key_b.split()[1] not in out  # the new key is written, never printed
    assert keys(tmp_path, "add", "k2")[0] != 0  # already there

    # Step 2 before every service holds k2: refused, the ring untouched.
    write_health(health, "preprocessor/a", ["k1", "k2"], "k1", now - 3_600_000)
    code, out = keys(tmp_path, "promote", "k2", *h)
    assert code != 0 and "refusing to promote k2" in out and "cache-writer/b holds k1" in out
    assert "preprocessor/a" not in out and RingFile.read(ring_file).kids == ["k1", "k2"]
    # Another host's ring gets the same key with --from (never through the command line).
    other = tmp_path / "host-b" / "keyring"
    other.parent.mkdir()
    other.write_text(ring_text("k1"))
    assert keys(tmp_path, "add", "k2", "--keyring", str(other), "--from", str(ring_file))[0] == 0
    assert RingFile.read(other).key_line("k2") == key_b
    assert keys(tmp_path, "add", "k3", "--keyring", str(other), "--from", str(ring_file))[0] != 0  # no such line

    write_health(health, "cache-writer/b", ["k1", "k2"], "k1", now - 3_600_000)
    code, out = keys(tmp_path, "status", *h)
    assert code == 0 and "k2: held by every service" in out
    assert keys(tmp_path, "promote", "k2", *h)[0] == 0 and RingFile.read(ring_file).kids == ["k2", "k1"]
    assert keys(tmp_path, "promote", "k2", *h) == (0, f"k2 already encrypts in {ring_file}\n")

    # Step 3: never the key that encrypts (not even forced); not while a service seals with the old
    # key; not within the message TTL after the last service switched; then yes.
    code, out = keys(tmp_path, "retire", "k2", *h, "--force")
    assert code != 0 and "promote its successor first" in out
    code, out = keys(tmp_path, "retire", "k1", *h)
    assert code != 0 and "cache-writer/b holds k1, k2, encrypts with k1" in out
    write_health(health, "preprocessor/a", ["k2", "k1"], "k2", now - 61_000)
    write_health(health, "cache-writer/b", ["k2", "k1"], "k2", now - 5_000)
    code, out = keys(tmp_path, "retire", "k1", *h)
    assert code != 0 and "may still be in flight" in out and RingFile.read(ring_file).kids == ["k2", "k1"]
    write_health(health, "cache-writer/b", ["k2", "k1"], "k2", now - 61_000)
    assert keys(tmp_path, "retire", "k1", *h)[0] == 0 and RingFile.read(ring_file).kids == ["k2"]


def test_keys_cli_force_overrides_a_refusal_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "keyring").write_text(ring_text("k1", "k2"))
    write_health(tmp_path / "health", "cache-writer/b", ["k1"], "k1", 0)
    code, out = keys(tmp_path, "promote", "k2", "--health-dir", str(tmp_path / "health"), "--force")
    assert code == 0 and "--force: promote k2" in out and "cache-writer/b holds k1" in out
    assert RingFile.read(tmp_path / "keyring").kids == ["k2", "k1"]


# -- a running service ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_service_follows_its_ring_file_without_a_restart(
    stack: Stack, base: str, tmp_path: Path, redis_reader_password: str
) -> None:
    """The cache-writer as it runs: a ring file made unloadable is refused (said once, counted,
    reported) while it keeps writing what it can open; a key added to the file opens at once
    without a restart; `iotpipe keys status` sees what it holds in its retained status. On the code
    before live rotation, the window sealed with the added key was rejected as undecryptable."""
    topics = Topics(base)
    ring_file = tmp_path / "keyring"
    ring_file.write_text(ring_text("k1"))
    env = service_env(stack, base, tmp_path, "kr", IOTPIPE_STATUS_INTERVAL="0.2", IOTPIPE_KEYRING_FILE=str(ring_file))
    writer = spawn("cache_writer", env, tmp_path)
    redis = aioredis.Redis(port=stack.ports.redis, username="reader", password=redis_reader_password)
    producers = []

    async def publish(kids: tuple[str, ...], start: int) -> None:
        producer = bus_for(stack, "preprocessor", keyring=ring(*kids))
        producers.append(producer)
        await producer.start()
        await producer.wait_connected()
        await producer.publish_sealed(topics.processed("p1"), processed_payload("d1", [window_payload(start)]))

    async def stored(n: int) -> bool:
        return int(await redis.zcard(f"{base}:series:d1:temp")) >= n

    def report() -> dict[str, Any]:
        return health_doc(tmp_path, "cache-writer", "kr").get("keyring") or {}

    try:
        await wait_online(stack, topics.service_status("cache-writer", "kr"))
        assert report()["kids"] == ["k1"] and report()["encrypts"] == "k1"
        await publish(("k1",), 1000)
        await wait_until(lambda: stored(1), 30, "the first window in Redis")

        replace(ring_file, f"k1 {KEYS['k1']}\nk2 not-a-valid-key\n")
        await wait_until(lambda: "refused" in report(), 30, "the refusal reported")
        assert "not a valid Fernet key" in report()["refused"] and report()["kids"] == ["k1"]
        await publish(("k1",), 2000)  # genuine data keeps flowing with the ring in use
        await wait_until(lambda: stored(2), 30, "the second window in Redis")

        replace(ring_file, ring_text("k1", "k2"))
        await wait_until(lambda: report().get("kids") == ["k1", "k2"], 30, "k2 reported held")
        assert "refused" not in report()
        await publish(("k2",), 3000)  # sealed with the key added to the file: opened, no restart
        await wait_until(lambda: stored(3), 30, "the window sealed with k2 in Redis")

        code = subprocess.run(
            [sys.executable, "-m", "iotpipe.cli", "keys", "status"],
            env={
                **stack.env(IOTPIPE_BASE_TOPIC=base, IOTPIPE_MQTT__PORT=str(stack.ports.public)),
                "IOTPIPE_KEYRING_FILE": str(ring_file),
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert code.returncode == 0, code.stderr
        assert "cache-writer/kr" in code.stdout and "k1,k2" in code.stdout, code.stdout
        no_key_material(code.stdout + code.stderr)

        counters = service_counters(tmp_path, "cache-writer", "kr")
        assert counter(counters, "rejected", "undecryptable") == 0, counters
        assert counter(counters, "keyring_reloads", "refused") == 1
        assert counter(counters, "keyring_reloads", "loaded") == 1
        assert writer.poll() is None
    finally:
        for producer in producers:
            await producer.stop()
        await redis.aclose()
        stop_all([writer])
    log = (tmp_path / "cache_writer.out").read_text()
    assert log.count("key ring file refused") == 1 and "not-a-valid-key" not in log
    no_key_material(log)
