"""The fault battery under load (issue "Durable at speed"): each fault while the real sensor-reader
pushes about 20,000 readings/s (tests/faults/harness.py: `Load`) through all five services, the
broker and Redis with the project's configs; then every window is counted at both sinks, Redis and
the cloud-sink by record id: lost, duplicated, unexpected, each 0 (tests/faults/harness.py says
how). Each run prints a table, one row per fault.

`faults_fast` (in `make test`): one run with F4 (the cloud down for 30 s), F1 (a broker kill), F1
with the preprocessor group reconnecting last, F2 (one service killed), F3 (Redis killed) and F5
(the reader cut off from the broker for 20 s); and one control run, with the publishers' replay and
the reader's spool switched off, under F1 (preprocessors last) and F5, which must lose windows.

`faults_full` (`make test-faults`): F1 repeated, F2 for every service, F3, F4 for 10 minutes with
the broker's memory and database size printed, F5 for 2 minutes and its control, F6 (a cloud that
hangs, resets, crawls) and F7 (the preprocessor group scaled down and redeployed). Durations and
counts: IOTPIPE_FAULTS_F1_KILLS, _F4_SECONDS, _F5_SECONDS, _F6_SECONDS, _RECOVERY_TIMEOUT, and the
load: IOTPIPE_FAULTS_DEVICES, _SENSORS, _HZ.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from iotpipe import KeyRing, counter

from faults.harness import Load, Pipeline, Row, env_number, full_battery, now_ms, problems, report, rss_mib

BROKER_DOWN = 5.0  # s a killed broker stays down (F1)
REDIS_DOWN = 5.0  # s a killed Redis stays down (F3)
RECOVERY = env_number("IOTPIPE_FAULTS_RECOVERY_TIMEOUT", 90)  # s a fault's recovery may take
FAST_F4 = env_number("IOTPIPE_FAULTS_FAST_F4_SECONDS", 30)
FAST_F5 = env_number("IOTPIPE_FAULTS_FAST_F5_SECONDS", 20)
FAST_F2 = os.environ.get("IOTPIPE_FAULTS_FAST_F2", "preprocessor")
F1_KILLS = int(env_number("IOTPIPE_FAULTS_F1_KILLS", 5))
F4_SECONDS = env_number("IOTPIPE_FAULTS_F4_SECONDS", 600)
F5_SECONDS = env_number("IOTPIPE_FAULTS_F5_SECONDS", 120)
F6_SECONDS = env_number("IOTPIPE_FAULTS_F6_SECONDS", 30)
F7_GRACE = 30.0  # s after which a dead member's session is adopted and drained (the bus's promise)

full = pytest.mark.skipif(not full_battery(), reason="the whole battery runs under `make test-faults`")


@pytest.fixture
def load() -> Load:
    return Load.from_env()


def pipeline(tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load, **kwargs: Any) -> Pipeline:
    return Pipeline(tmp_path, secrets_dir, keyring, load, **kwargs)


def check(title: str, p: Pipeline, rows: list[Row], summary: str) -> str:
    """Print the table; every fault's accounting clean, and nothing written twice in Redis."""
    low = [r.fault for r in rows if r.rate < 20_000 and r.seconds >= 10]
    if low:
        summary += f"\nbelow 20,000 readings/s: {', '.join(low)} (what this machine sustained then)"
    text = report(title, rows, summary)
    assert not problems(rows), text
    assert p.written_excess <= 0, text
    assert all(r.gaps == 0 for r in rows), text
    return text


# -- the fault steps -------------------------------------------------------------------------------


async def f1_broker_kill(
    p: Pipeline, label: str, *, preprocessors_last: bool = False, recovery: float = RECOVERY
) -> None:
    """kill -9 the broker, restart it BROKER_DOWN s later. `preprocessors_last`: the preprocessor
    group reconnects only after the reader has reconnected and published its backlog (SIGSTOP
    across the restart): what the reader published meanwhile reached no preprocessor (mosquitto
    does not restore shared subscriptions), and only its replay brings it back."""
    seg = p.begin(label)
    group = [n for n in p.services if n.startswith("preprocessor/") and p.services[n].alive()]
    if preprocessors_last:
        for name in group:
            p.pause(name, True)
    await p.kill_broker()
    await p.hold(BROKER_DOWN)  # wait-ok: the fault's duration
    await p.start_broker()
    restarted = now_ms()
    if preprocessors_last:
        reader = p.service("sensor-reader").name

        def reader_caught_up() -> bool:
            doc = p.health(reader)
            spool = doc.get("spool", {})
            backlog = spool.get("windows", 1) + spool.get("in_memory", 1)
            return bool(doc.get("connected")) and doc.get("ts", 0) > restarted and backlog == 0

        try:
            await p.wait(reader_caught_up, 30, "the reader reconnected with its backlog published")
        finally:
            for name in group:
                p.pause(name, False)
    seg.recovery = await p.recovered(restarted, recovery)
    await p.broker_saved()  # every session on disk again before the next fault


async def f2_service_kill(p: Pipeline, name: str) -> None:
    """kill -9 a service and restart it at once, as its supervisor would."""
    seg = p.begin(f"F2 kill -9 {name}")
    killed = now_ms()
    await p.kill(name)
    await p.wait_status(name, "offline", 15)  # the broker saw it die (its Last Will)
    p.restart(name)
    restarted = now_ms()
    await p.wait_status(name, "online")  # subscribed again (online follows its SUBSCRIBE)
    if name == "sensor-reader":
        # Its windows from just before the kill to its restart were never sealed; recovered means the
        # first whole window of the new process is at both sinks.
        p.reader_killed(killed, restarted)
        w = p.load.window_ms
        seg.recovery = await p.recovered(restarted, RECOVERY, upto_ms=(restarted // w + 2) * w)
    else:
        seg.recovery = await p.recovered(restarted, RECOVERY)
    await p.steady()


async def f3_redis_kill(p: Pipeline) -> None:
    seg = p.begin(f"F3 kill -9 redis, {REDIS_DOWN:g} s down")
    await p.wait(lambda: p.stack.redis.proc is not None and p.stack.redis.proc.poll() is None, 5, "redis running")
    p.stack.redis.kill()
    await p.hold(REDIS_DOWN)  # wait-ok: the fault's duration
    await asyncio.to_thread(p.stack.redis.start)
    seg.recovery = await p.recovered(now_ms(), RECOVERY)
    await p.steady()


async def f4_cloud_outage(p: Pipeline, seconds: float, recovery_timeout: float) -> list[str]:
    """The cloud-sink down for `seconds` at load. The broker's RSS and database stay bounded (the
    forwarder's outbox holds the backlog, and it keeps acknowledging); everything arrives after."""
    seg = p.begin(f"F4 cloud down {seconds:g} s")
    broker_pid = p.stack.broker.proc.pid  # type: ignore[union-attr]
    db = p.stack.broker.cwd / "mosquitto" / "mosquitto.db"
    forwarder = p.service("cloud-forwarder").name
    samples: list[tuple[float, float, float, int, int]] = []  # (s, broker RSS MiB, db MiB, outbox records, bytes)
    began = time.monotonic()

    async def sample() -> None:
        outbox = p.health(forwarder).get("outbox", {})
        size = db.stat().st_size / 2**20 if db.exists() else 0.0
        samples.append(
            (time.monotonic() - began, rss_mib(broker_pid), size, outbox.get("records", 0), outbox.get("bytes", 0))
        )

    await sample()
    await p.kill("cloud-sink")
    await p.hold(seconds, every=max(2.0, seconds / 12), sample=sample)  # wait-ok: the fault's duration
    p.restart("cloud-sink")
    seg.recovery = await p.recovered(now_ms(), recovery_timeout)
    lines = [f"F4, the cloud down: {'s':>15} {'broker RSS MiB':>15} {'broker db MiB':>14} {'outbox records':>15}"]
    lines += [f"{'':28}{t:6.0f} {rss:15.1f} {size:14.2f} {records:15,}" for t, rss, size, records, _b in samples]
    first, last = samples[0], samples[-1]
    outbox_growth = max(0, last[4] - first[4]) / 2**20
    rss_growth = max(s[1] for s in samples) - first[1]
    db_growth = max(s[2] for s in samples) - first[2]
    lines.append(
        f"{'':28}broker RSS +{rss_growth:.1f} MiB, database +{db_growth:.2f} MiB, outbox +{outbox_growth:.1f} MiB"
        f" ({last[3] - first[3]:,} records)"
    )
    # What the outage produced went into the outbox (the forwarder kept acknowledging)...
    produced = p.load.devices * p.load.sensors * (seconds - 4) * 1000 / p.load.window_ms
    text = "\n".join(lines)
    assert last[3] - first[3] >= 0.8 * produced, text
    # ...and not into the broker: it grew by a small fraction of the backlog at most.
    assert db_growth <= 4 + 0.1 * outbox_growth, text
    assert rss_growth <= 32 + 0.25 * outbox_growth, text
    return lines


async def f5_reader_cut(p: Pipeline, seconds: float, recovery: float = RECOVERY) -> int:
    """The broker unreachable from the reader for `seconds` (its proxy cut). Returns the most
    windows its spool held."""
    assert p.reader_proxy is not None
    seg = p.begin(f"F5 reader cut off {seconds:g} s")
    reader = p.service("sensor-reader").name
    peak = [0]

    async def sample() -> None:
        peak[0] = max(peak[0], p.health(reader).get("spool", {}).get("windows", 0))

    p.reader_proxy.cut()
    await p.hold(seconds, every=1.0, sample=sample)  # wait-ok: the fault's duration
    p.reader_proxy.restore()
    seg.recovery = await p.recovered(now_ms(), recovery)
    return peak[0]


# -- fast: in make test ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.faults_fast
@pytest.mark.timeout(420)
async def test_fast_faults_under_load_lose_nothing(
    tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load
) -> None:
    async with pipeline(tmp_path, secrets_dir, keyring, load, reader_proxy=True) as p:
        # F4 first: its bound on the broker's growth needs a broker without the backlog of other
        # faults (a monitor catching up after a burst queues in the broker too).
        f4 = await f4_cloud_outage(p, FAST_F4, RECOVERY)
        await f1_broker_kill(p, "F1 kill -9 broker, 5 s down")
        await f1_broker_kill(p, "F1 same, preprocessors back last", preprocessors_last=True)
        await f2_service_kill(p, FAST_F2)
        await f3_redis_kill(p)
        spool_peak = await f5_reader_cut(p, FAST_F5)
        rows, summary = await p.finish()
    summary += f"\nF5: the reader's spool held up to {spool_peak} windows\n" + "\n".join(f4)
    check("fault battery, fast part", p, rows, summary)
    assert spool_peak >= load.raw_messages_per_window * (FAST_F5 - 3) * 1000 / load.window_ms * 0.8, (
        summary
    )  # the spool held them
    assert all(r.recovery is not None for r in rows), "a fault did not recover within the timeout"


@pytest.mark.e2e
@pytest.mark.faults_fast
@pytest.mark.timeout(300)
async def test_fast_controls_the_accounting_sees_loss(
    tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load
) -> None:
    """The same faults with the protection switched off must lose windows, and the accounting must
    say so: F1 (preprocessors back last) with every publisher's replay off; F5 with no spool and
    room in memory for only a few seconds of windows (exactly those the reader says it dropped)."""
    memory = load.raw_messages_per_window * 15  # raw messages: 15 s of them (F1's outage fits, F5's does not)
    async with pipeline(
        tmp_path,
        secrets_dir,
        keyring,
        load,
        reader_proxy=True,
        no_replay=True,
        reader_env={"IOTPIPE_SPOOL_MAX_BYTES": "0", "IOTPIPE_MAX_PENDING_WINDOWS": str(memory)},
    ) as p:
        # Short recovery waits: what was lost does not come back.
        await f1_broker_kill(p, "control: F1, replay off, pp last", preprocessors_last=True, recovery=15)
        await f5_reader_cut(p, FAST_F5, recovery=15)
        reader = p.service("sensor-reader")
        rows, summary = await p.finish()
    dropped = counter(reader.counters_done, "windows_dropped", "memory_full")
    summary += f"\nthe reader counted {dropped:g} windows dropped (memory full)"
    text = report("controls (protection off): loss expected", rows, summary)
    f1, f5 = rows
    # The broker kill lost windows the reader did get to the broker (not only ones it dropped).
    assert len(f1.redis.lost) > f1.gaps * load.sensors and len(f1.cloud.lost) > f1.gaps * load.sensors, text
    # What never reached the broker is exactly what the reader says it dropped, and the sinks miss it.
    assert f5.gaps > 0 and f1.gaps + f5.gaps == dropped, text
    assert len(f5.redis.lost) == len(f5.cloud.lost) == f5.gaps * load.sensors, text


# -- the whole battery: make test-faults ------------------------------------------------------------


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(900 + F1_KILLS * 120)
async def test_f1_broker_killed_repeatedly(tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load) -> None:
    async with pipeline(tmp_path, secrets_dir, keyring, load) as p:
        for i in range(F1_KILLS):
            await f1_broker_kill(p, f"F1 kill -9 broker #{i + 1}, 5 s down")
        await f1_broker_kill(p, "F1 preprocessors back last", preprocessors_last=True)
        rows, summary = await p.finish()
    check(f"F1: broker killed {F1_KILLS} times", p, rows, summary)
    assert all(r.recovery is not None for r in rows)


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(900 + F1_KILLS * 120)
async def test_f1_control_without_replay_loses(tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load) -> None:
    """F1 as above with every publisher's replay off: the plain kills may or may not lose (it
    depends on who reconnects first), the one with the preprocessors back last must."""
    async with pipeline(tmp_path, secrets_dir, keyring, load, no_replay=True) as p:
        for i in range(F1_KILLS):
            await f1_broker_kill(p, f"control: F1 #{i + 1}, replay off", recovery=30)
        await f1_broker_kill(p, "control: F1 replay off, pp last", preprocessors_last=True, recovery=15)
        rows, summary = await p.finish()
    text = report("F1 control (publisher replay off): loss expected", rows, summary)
    assert rows[-1].redis.lost and rows[-1].cloud.lost, text


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(1200)
async def test_f2_every_service_killed_in_turn(tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load) -> None:
    async with pipeline(tmp_path, secrets_dir, keyring, load) as p:
        for name in ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor"):
            await f2_service_kill(p, name)
        rows, summary = await p.finish()
    check("F2: each service killed (kill -9) and restarted", p, rows, summary)
    assert all(r.recovery is not None for r in rows)


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(600)
async def test_f3_redis_killed(tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load) -> None:
    async with pipeline(tmp_path, secrets_dir, keyring, load) as p:
        await f3_redis_kill(p)
        await f3_redis_kill(p)
        rows, summary = await p.finish()
    check("F3: Redis killed (kill -9) twice", p, rows, summary)
    assert all(r.recovery is not None for r in rows)


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(F4_SECONDS * 3 + 600)
async def test_f4_long_cloud_outage(tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load) -> None:
    async with pipeline(tmp_path, secrets_dir, keyring, load) as p:
        f4 = await f4_cloud_outage(p, F4_SECONDS, max(RECOVERY, F4_SECONDS))
        rows, summary = await p.finish(drain_timeout=max(120, F4_SECONDS / 2))
    check(f"F4: the cloud down {F4_SECONDS:g} s at load", p, rows, summary + "\n" + "\n".join(f4))
    assert all(r.recovery is not None for r in rows)


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(F5_SECONDS * 3 + 600)
@pytest.mark.parametrize("spool", [True, False], ids=["spool", "control-no-spool"])
async def test_f5_reader_cut_off_from_the_broker(
    tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load, spool: bool
) -> None:
    """The spool holds the whole outage; the control (no spool: windows wait in memory only, at
    most IOTPIPE_MAX_PENDING_WINDOWS, 1000 by default) loses exactly what the reader says it
    dropped."""
    reader_env = {} if spool else {"IOTPIPE_SPOOL_MAX_BYTES": "0"}
    async with pipeline(tmp_path, secrets_dir, keyring, load, reader_proxy=True, reader_env=reader_env) as p:
        peak = await f5_reader_cut(p, F5_SECONDS, RECOVERY if spool else 30)
        reader = p.service("sensor-reader")
        rows, summary = await p.finish()
    summary += f"\nthe reader held up to {peak} windows waiting"
    if spool:
        check(f"F5: the reader cut off from the broker {F5_SECONDS:g} s", p, rows, summary)
        # The spool counts raw messages (each holds many devices' windows).
        assert peak >= load.raw_messages_per_window * (F5_SECONDS - 3) * 1000 / load.window_ms * 0.8, summary
    else:
        dropped = counter(reader.counters_done, "windows_dropped", "memory_full")
        text = report(f"F5 control (no spool), {F5_SECONDS:g} s: loss expected", rows, summary)
        assert rows[0].gaps == dropped > 0, text


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(F6_SECONDS * 4 + 4 * 120 + 600)
async def test_f6_a_cloud_that_hangs_resets_and_crawls(
    tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load
) -> None:
    """The forwarder's cloud behind a proxy: answers that stop mid-body (the sink has stored the
    records, so the retry's copies are collapsed by record id), requests held half-sent, TCP resets,
    answers 4 s late; each for F6_SECONDS."""
    async with pipeline(tmp_path, secrets_dir, keyring, load, cloud_proxy=True) as p:
        assert p.cloud is not None
        for mode, what in (
            ("hang", "answers stop mid-body"),
            ("hang_request", "requests held half-sent"),
            ("reset", "connections reset"),
            ("slow", "answers 4 s late"),
        ):
            seg = p.begin(f"F6 {what}")
            p.cloud.set(mode)
            await p.hold(F6_SECONDS)  # wait-ok: the fault's duration
            p.cloud.set("pass")
            seg.recovery = await p.recovered(now_ms(), RECOVERY)
        rows, summary = await p.finish()
    check("F6: the cloud misbehaves", p, rows, summary)
    assert all(r.recovery is not None for r in rows)


@full
@pytest.mark.e2e
@pytest.mark.faults_full
@pytest.mark.timeout(1200)
async def test_f7_preprocessor_group_scaled_down_and_redeployed(
    tmp_path: Path, secrets_dir: Path, keyring: KeyRing, load: Load
) -> None:
    """Three preprocessors share the raw stream. One leaves for good with SIGTERM (a clean leave
    ends its session: nothing is dealt to it any more), one is killed for good (its session is
    adopted and drained by the group after a grace period of about F7_GRACE s), one is recreated
    under a new id (a redeploy). Nothing may be stranded in a session no one will resume."""
    async with pipeline(tmp_path, secrets_dir, keyring, load, preprocessors=("a", "b", "c")) as p:
        seg = p.begin("F7 preprocessor a: SIGTERM, gone")
        await p.terminate("preprocessor/a")
        seg.recovery = await p.recovered(now_ms(), RECOVERY)
        seg = p.begin("F7 preprocessor b: kill -9, gone")
        await p.kill("preprocessor/b")
        killed = now_ms()
        seg.recovery = await p.recovered(killed, max(RECOVERY, F7_GRACE + 60))
        seg = p.begin("F7 preprocessor c: recreated as c2")
        await p.terminate("preprocessor/c")
        p.add_preprocessor("c2")
        seg.recovery = await p.recovered(now_ms(), RECOVERY)
        rows, summary = await p.finish()
    check("F7: preprocessor group 3 -> 1, redeployed", p, rows, summary)
    assert all(r.recovery is not None for r in rows)
