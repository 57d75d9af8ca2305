"""Key rotation live (issue 10): the payload key rotated under load, no service restarted, every
window counted at both sinks (tests/faults/harness.py).

Two "hosts" with a key ring file each, as a deployment with one copy of the secrets per machine
has: ring A for the sensor-reader, preprocessor and monitor; ring B for the cache-writer and
cloud-forwarder. The test is the operator: it runs `iotpipe keys` (a real subprocess, reading
the services' retained statuses as the read-only MQTT user) on each file in the documented order
(docs/operations.md), and between steps waits on what the services report (their health files:
the key ids they hold, the one they seal with), never on a fixed delay.

1. k1 -> k2 in order: add (both rings), promote (both), retire k1 (refused until the message TTL
   after every service sealed with k2, then done): lost, duplicated and unexpected 0 at Redis and
   at the cloud, and no service rejected anything as undecryptable.
2. The control: k3 promoted on ring A while ring B lacks it. `iotpipe keys promote` refuses
   (naming the two services without it); forced, the consumers reject what the preprocessor
   now seals (undecryptable, counted) and windows are lost at both sinks: the test sees the harm
   that the order prevents.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from iotpipe import KeyRing, counter
from servers import ROOT

from faults.harness import Load, Pipeline, report

# Light enough for a 2-core machine shared with other work, heavy enough that windows are always
# in flight (sealed, queued at the broker, in a batch, in the forwarder's outbox) at every step.
LOAD = Load(devices=10, sensors=6, hz=100.0)
# Short, so step 3 (retire) comes within the test's time: the CLI refuses it for this long after
# every service began sealing with the new key. Far above the pipeline's lag at this load.
TTL = 20
HOST_A = ("sensor-reader", "preprocessor", "monitor")
HOST_B = ("cache-writer", "cloud-forwarder")
UNDECRYPTABLE = ("rejected", "undecryptable")
STEP_TIMEOUT = 30.0  # s for a step to reach every service (they re-read their ring every 2 s)


class WireKeys:
    """The test's own view of the wire must open whatever any service seals at every step: every
    key either ring file ever held (the test is an insider; services only ever hold their file's)."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def learn(self, *rings: Path) -> KeyRing:
        for ring in rings:
            for line in ring.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    kid, key = line.split()
                    self.keys[kid] = key.encode()
        return KeyRing(self.keys.items())


async def keys_cli(p: Pipeline, *args: str) -> tuple[int, str]:
    """`iotpipe keys ARGS` as an operator runs it, with the pipeline's settings; (exit code, output)."""
    # `keys status` reads the retained statuses on the public broker, as `reader`.
    env = p.stack.env(
        IOTPIPE_BASE_TOPIC=p.base, IOTPIPE_MESSAGE_TTL=str(TTL), IOTPIPE_MQTT__PORT=str(p.stack.ports.public)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotpipe.cli",
        "keys",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    print(f"$ iotpipe keys {' '.join(args)}  -> {proc.returncode}\n{text}", flush=True)
    return proc.returncode or 0, text


def names(p: Pipeline, services: tuple[str, ...] = HOST_A + HOST_B) -> list[str]:
    return [n for n in p.services if n.split("/")[0] in services]


def reports(p: Pipeline, services: tuple[str, ...] = HOST_A + HOST_B) -> dict[str, dict[str, Any]]:
    """Each service's key ring report, as in its latest health file / retained status."""
    return {n: p.health(n).get("keyring") or {} for n in names(p, services)}


def counted(p: Pipeline, name: str, key: tuple[str, ...]) -> float:
    """Service `name`'s counter `key` (name, label values) as of its latest health file."""
    return counter(p.health(name).get("counters", {}), *key)


async def reached(p: Pipeline, what: str, ok: Any, services: tuple[str, ...] = HOST_A + HOST_B) -> float:
    """Wait until every service's report satisfies `ok`; the seconds it took."""
    began = time.monotonic()
    await p.wait(lambda: all(ok(r) for r in reports(p, services).values()), STEP_TIMEOUT, what)
    return time.monotonic() - began


@pytest.mark.e2e
@pytest.mark.faults_fast
@pytest.mark.timeout(300)
async def test_key_rotation_under_load_loses_nothing_and_the_wrong_order_does(
    tmp_path: Path, secrets_dir: Path
) -> None:
    secrets = tmp_path / "secrets"
    shutil.copytree(secrets_dir, secrets)  # this test's own keys: it rewrites them
    ring_a = secrets / "keyring"
    ring_b = tmp_path / "host-b" / "keyring"
    ring_b.parent.mkdir()
    shutil.copy2(ring_a, ring_b)
    on_b = {"IOTPIPE_KEYRING_FILE": str(ring_b)}
    wire_keys = WireKeys()
    async with Pipeline(
        tmp_path / "run",
        secrets,
        wire_keys.learn(ring_a),
        LOAD,
        env={"IOTPIPE_MESSAGE_TTL": str(TTL)},
        service_env=dict.fromkeys(HOST_B, on_b),
    ) as p:
        timings: list[str] = []
        p.begin("rotation k1 -> k2, in order")

        # Step 1: k2, decrypt-only, on both hosts (B's copied from A's: one key, two files).
        assert (await keys_cli(p, "add", "k2"))[0] == 0
        p.wire.keyring = wire_keys.learn(ring_a)
        assert (await keys_cli(p, "add", "k2", "--keyring", str(ring_b), "--from", str(ring_a)))[0] == 0
        took = await reached(p, "every service holding k2", lambda r: r.get("kids") == ["k1", "k2"])
        timings.append(f"add k2 reached every service in {took:.1f} s")
        code, out = await keys_cli(p, "status")
        assert code == 0 and "k2: held by every service" in out and "iotpipe keys promote k2" in out, out

        # Step 2: k2 encrypts, on both hosts; the services still open k1 (what is in flight).
        assert (await keys_cli(p, "promote", "k2"))[0] == 0
        assert (await keys_cli(p, "promote", "k2", "--keyring", str(ring_b)))[0] == 0
        took = await reached(p, "every service sealing with k2", lambda r: r.get("encrypts") == "k2")
        timings.append(f"promote k2 reached every service in {took:.1f} s")

        # Step 3: retiring k1 is refused while something sealed with it may still arrive...
        code, out = await keys_cli(p, "retire", "k1")
        assert code != 0 and "may still be in flight" in out, out
        # ...which the services' reports say ends the message TTL after the last of them switched.
        switched = max(r["since"] for r in reports(p).values())
        await p.wait(lambda: time.time() * 1000 > switched + TTL * 1000, TTL + 15, "the message TTL after the switch")
        assert (await keys_cli(p, "retire", "k1"))[0] == 0
        assert (await keys_cli(p, "retire", "k1", "--keyring", str(ring_b)))[0] == 0
        took = await reached(p, "every service holding k2 alone", lambda r: r.get("kids") == ["k2"])
        timings.append(f"retire k1 reached every service in {took:.1f} s")
        assert ring_a.stat().st_mode == ring_b.stat().st_mode == secrets_dir.joinpath("keyring").stat().st_mode
        await p.steady()  # windows sealed with k2 alone, opened by rings of k2 alone, at both sinks
        # Windows flowed throughout: sealed with k1 before step 2, with k2 since.
        assert p.wire.sealed_with["k1"] > 0 and p.wire.sealed_with["k2"] > 0, p.wire.sealed_with

        # Nothing was refused on the way: no undecryptable message, no key ring file refused.
        rejected = {n: counted(p, n, UNDECRYPTABLE) for n in names(p)}
        assert not any(rejected.values()), rejected
        refused = {n: counted(p, n, ("keyring_reloads", "refused")) for n in names(p)}
        assert not any(refused.values()), refused
        assert all(counted(p, n, ("keyring_reloads", "loaded")) == 3 for n in names(p))

        # The control: k3 promoted on host A before host B holds it.
        p.begin("control: k3 promoted before host B holds it")
        assert (await keys_cli(p, "add", "k3"))[0] == 0
        p.wire.keyring = wire_keys.learn(ring_a)
        await reached(p, "host A's services holding k3", lambda r: "k3" in r.get("kids", []), HOST_A)
        code, out = await keys_cli(p, "promote", "k3")
        assert code != 0 and "cache-writer/f holds k2" in out and "cloud-forwarder/f holds k2" in out, out
        assert ring_a.read_text().count("k3 ") == 1 and KeyRing.from_file(ring_a).primary_kid == "k2"
        assert (await keys_cli(p, "promote", "k3", "--force"))[0] == 0
        await p.wait(
            lambda: all(counted(p, n, UNDECRYPTABLE) > 0 for n in names(p, HOST_B)),
            STEP_TIMEOUT,
            "host B's services rejecting what is sealed with k3",
        )
        assert p.wire.sealed_with["k3"] > 0

        rows, summary = await p.finish(drain_timeout=20)  # the control's lost windows never come
        timings.append(f"raw and processed messages by key id: {dict(sorted(p.wire.sealed_with.items()))}")
        text = report("key rotation under load", rows, summary + "\n" + "; ".join(timings))
        rotation, control = rows
        assert rotation.clean and rotation.gaps == 0 and rotation.sensor_windows > 0, text
        assert p.written_excess <= 0, text
        # The control lost windows at both sinks, and the test saw it.
        assert control.redis.lost and control.cloud.lost, text
