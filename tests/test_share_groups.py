"""Members of a shared subscription that go away strand nothing (iotpipe._share, docs/contract.md
"Delivery"): real mosquitto, preprocessors as subprocesses in the `$share/preprocessor` group,
raw windows flowing while members are stopped, killed, restarted or replaced.

mosquitto (2.0) deals a group's messages round-robin to every member with a session, connected or
not, so a member that goes for good keeps receiving its share into a session no one reads. Every
test counts each raw window published against what the processed stream shows (the test's own
subscriber, opening every processed message with the test's key ring): lost (published, never
processed), duplicated (processed more than once), unexpected (processed but never published, or
not as published). The control (kill -9 with adoption held off) shows that counting sees stranded
windows as lost.

Where a test needs "everything dealt to a live member so far is processed" it publishes windows of
a device of their own (`end`) until each live member has processed one: a member handles what it
is dealt in order, so its `end` window comes after all of its earlier ones."""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from iotpipe import KeyRing, MqttSettings, PlainMessage, Topics
from iotpipe._bus import DEFAULT_BATCH
from iotpipe._mqtt import MqttConnection
from iotpipe.devstack import mqtt_password_file
from servers import TAP, Stack, bus_for, service_env, spawn, stop_all, unseal, wait_until

STATUS_INTERVAL = "1"  # s between heartbeats: others believe an `online` status for 3 of them
QUICK_ADOPTION = "1"  # s a member's session may say offline before a live member drains it
NO_ADOPTION = "3600"  # longer than any test: the control sees what adoption would have drained
FLOW = 60  # windows published between the steps of a test, while members come and go
PACE = 0.005  # s between two published windows: a steady stream, not one burst
END_WINDOWS = 8  # `end` windows per round: at least one for each member of the group, in turn
# Unacknowledged deliveries per member: small, so that a backlog (a burst, a dead member's share)
# waits in the member's session at the broker, as a large one would with the default of 200.
# (mosquitto 2.0.11 lets more than this be outstanding while acknowledgements trail deliveries.)
RECEIVE_MAXIMUM = 10
BURST = 300  # windows published at once: members fall behind, and are stopped with a backlog


def raw(start: int, value: float, device: str = "d1") -> dict[str, Any]:
    window = {
        "device": device,
        "window": {"start": start, "size": 1000},
        "sensors": {"temp": {"unit": "degC", "t": [start + k for k in range(7)], "v": [value] * 7}},
    }
    return {"windows": [window]}


def processed(start: int, value: float) -> dict[str, Any]:
    stats = {"n": 7, "mean": value, "median": value, "min": value, "max": value, "std": 0.0}
    return {"device": "d1", "sensor": "temp", "unit": "degC", "start": start, "end": start + 1000, **stats}


@dataclass
class Tally:
    lost: list[int] = field(default_factory=list)
    duplicated: int = 0
    unexpected: list[Any] = field(default_factory=list)
    twice: dict[int, list[str]] = field(default_factory=dict)  # start -> the instances that processed it

    def __str__(self) -> str:
        return (
            f"lost {len(self.lost)} {self.lost[:10]}, "
            f"duplicated {self.duplicated} {dict(list(self.twice.items())[:5])}, "
            f"unexpected {len(self.unexpected)} {self.unexpected[:5]}"
        )


class Group:
    """Preprocessors of one test, the raw stream it publishes and the processed stream it sees."""

    def __init__(self, stack: Stack, keyring: KeyRing, base: str, workdir: Path) -> None:
        self.stack, self.keyring, self.base, self.workdir = stack, keyring, base, workdir
        self.topics = Topics(base)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.published: dict[int, dict[str, Any]] = {}  # start -> the processed window it must give
        self.seen: list[tuple[str, dict[str, Any], str]] = []  # (device, window, preprocessor instance)
        self.producer = bus_for(stack, "sensor-reader", keyring=keyring)
        self.status: dict[str, dict[str, Any]] = {}  # instance -> its current status
        self.watcher = bus_for(stack, TAP, client_id=f"watch-{base}")
        self.watcher.subscribe(self.topics.all("processed"), self._on_processed, sealed=False)
        self.watcher.subscribe(f"{self.topics.root}/status/service/preprocessor/+", self._on_status, sealed=False)
        self._end = 0

    async def _on_status(self, messages: Sequence[PlainMessage[Any]]) -> None:
        for m in messages:
            instance = m.topic.rsplit("/", 1)[1]
            if m.payload:
                self.status[instance] = orjson.loads(m.payload)
            else:
                self.status.pop(instance, None)

    async def _on_processed(self, messages: Sequence[PlainMessage[Any]]) -> None:
        for message in messages:
            inner = unseal(self.keyring, message.payload)
            instance = inner["src"].split("/", 1)[1]
            for window in inner["data"]["windows"]:
                self.seen.append((window["device"], window, instance))

    async def __aenter__(self) -> Group:
        await self.watcher.start()
        await self.watcher.wait_connected()
        await asyncio.wait_for(self.watcher.subscribed.wait(), 10)
        await self.producer.start()
        await self.producer.wait_connected()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        stop_all(self.procs.values())
        await self.producer.stop()
        await self.watcher.stop()

    def log(self, instance: str) -> str:
        return (self.workdir / f"preprocessor-{instance}.out").read_text()

    async def start(self, *instances: str, adopt_after: str) -> None:
        for instance in instances:
            env = service_env(
                self.stack,
                self.base,
                self.workdir,
                instance,
                IOTPIPE_STATUS_INTERVAL=STATUS_INTERVAL,
                IOTPIPE_SHARE_ADOPT_AFTER=adopt_after,
                IOTPIPE_MQTT__SESSION_EXPIRY="600",  # the shared test broker forgets what a test leaves
                IOTPIPE_MQTT__RECEIVE_MAXIMUM=str(RECEIVE_MAXIMUM),
            )
            self.procs[instance] = spawn("preprocessor", env, self.workdir, f"preprocessor-{instance}")
        await wait_until(
            lambda: all(self.status.get(i, {}).get("state") == "online" for i in instances),
            60,
            f"preprocessors {instances} online",
        )

    async def retained_statuses(self) -> dict[str, dict[str, Any]]:
        """Every retained status under the preprocessors' status topics right now: a fresh
        subscription gets them all before a message we publish after subscribing."""
        retained: dict[str, dict[str, Any]] = {}
        sentinel = f"{self.topics.root}/status/service/preprocessor/test-sentinel/done"
        done = asyncio.Event()

        async def on_message(messages: Sequence[PlainMessage[Any]]) -> None:
            for m in messages:
                if m.topic == sentinel:
                    done.set()
                elif m.retain and m.topic.count("/") == sentinel.count("/") - 1:
                    retained[m.topic.rsplit("/", 1)[1]] = orjson.loads(m.payload)

        bus = bus_for(self.stack, "preprocessor")
        bus.subscribe(f"{self.topics.root}/status/service/preprocessor/#", on_message, sealed=False)
        await bus.start()
        try:
            await asyncio.wait_for(bus.subscribed.wait(), 10)
            await bus.publish(sentinel, b"x")
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await bus.stop()
        return retained

    async def session_present(self, instance: str) -> bool:
        """Whether the broker still held the session of preprocessor-<instance>. The check resumes
        and then discards it: call it last."""
        settings = MqttSettings(host="127.0.0.1", port=self.stack.ports.mqtt, session_expiry=600, connect_timeout=10)
        password = mqtt_password_file(self.stack.secrets_dir, "preprocessor").read_text().strip()
        conn = MqttConnection(settings, f"preprocessor-{instance}", username="preprocessor", password=password)
        await conn.start()
        try:
            await conn.wait_connected()
            present = conn.session_present
        finally:
            await conn.stop(will=False, timeout=5, session_expiry=0)
        assert present is not None
        return present

    async def publish(self, count: int) -> None:
        for _ in range(count):
            i = len(self.published)
            start = i * 1000
            await self.producer.publish_sealed(self.topics.raw("d1"), raw(start, float(i)))
            self.published[start] = processed(start, float(i))
            await asyncio.sleep(PACE)

    async def burst(self, count: int) -> None:
        """`count` windows at once (each acknowledged by the broker when this returns)."""
        first = len(self.published)
        starts = [(first + k) * 1000 for k in range(count)]
        for k, start in enumerate(starts):
            self.published[start] = processed(start, float(first + k))
        await asyncio.gather(
            *(
                self.producer.publish_sealed(self.topics.raw("d1"), raw(start, float(first + k)))
                for k, start in enumerate(starts)
            )
        )

    async def publish_while(self, step: asyncio.Future[Any]) -> Any:
        """Keep the stream flowing until `step` is done; its result."""
        while not step.done():
            await self.publish(1)
        return step.result()

    async def synced(self, live: Sequence[str], timeout: float = 30) -> None:
        """Every window dealt to each of `live` so far has been processed."""

        def ends_from() -> set[str]:
            return {instance for device, _w, instance in self.seen if device == "end"}

        while not set(live) <= ends_from():
            for _ in range(END_WINDOWS):
                self._end += 1
                await self.producer.publish_sealed(self.topics.raw("end"), raw(self._end * 1000, 0.0, "end"))
            await wait_until(lambda: set(live) <= ends_from(), timeout, f"an end window processed by each of {live}")

    def tally(self) -> Tally:
        by: dict[int, list[str]] = collections.defaultdict(list)
        for device, w, instance in self.seen:
            if device == "d1":
                by[w["start"]].append(instance)
        return Tally(
            lost=sorted(set(self.published) - set(by)),
            duplicated=sum(len(i) - 1 for i in by.values()),
            twice={start: i for start, i in by.items() if len(i) > 1},
            unexpected=[w for device, w, _i in self.seen if device == "d1" and self.published.get(w["start"]) != w],
        )

    async def all_processed(self, timeout: float = 60) -> None:
        try:
            await wait_until(lambda: not self.tally().lost, timeout, "every published window processed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.tally()}") from None

    def processed_by(self, instance: str) -> int:
        return sum(1 for device, _w, i in self.seen if device == "d1" and i == instance)


def report(test: str, tally: Tally, **extra: object) -> str:
    text = f"{test}: {tally}" + "".join(f", {k} {v}" for k, v in extra.items())
    print(text)
    return text


async def exited(proc: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(proc.wait, 30)


@pytest.fixture
async def group(stack: Stack, keyring: KeyRing, base: str, tmp_path: Path) -> AsyncIterator[Group]:
    async with Group(stack, keyring, base, tmp_path) as g:
        yield g


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_members_stopped_while_windows_flow_strand_nothing(group: Group) -> None:
    """Scale-down 3 -> 1: two members get SIGTERM at once while windows flow. They hand their share
    to the member left (every window processed, none twice), their sessions are gone and no status
    of theirs is left behind; the member left is online."""
    await group.start("a", "b", "c", adopt_after=NO_ADOPTION)  # adoption plays no part here
    await group.publish(FLOW)
    await group.burst(BURST)  # b and c stop with part of it still queued for them
    for instance in ("b", "c"):
        group.procs[instance].send_signal(signal.SIGTERM)
    codes = await group.publish_while(
        asyncio.ensure_future(asyncio.gather(*(exited(group.procs[i]) for i in ("b", "c"))))
    )
    await group.publish(FLOW)
    await group.synced(["a"])
    tally = group.tally()
    text = report("SIGTERM 2 of 3", tally, by_b=group.processed_by("b"), by_c=group.processed_by("c"))
    assert codes == [0, 0], text
    assert not tally.lost and not tally.unexpected and tally.duplicated == 0, text
    for instance in ("b", "c"):
        assert "left the shared subscription(s) to" in group.log(instance), group.log(instance)
        assert not await group.session_present(instance), f"the session of preprocessor-{instance} outlived it"
    retained = await group.retained_statuses()
    assert set(retained) == {"a"} and retained["a"]["state"] == "online", retained


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_member_killed_for_good_is_adopted(group: Group) -> None:
    """kill -9 of one of three members, which never comes back: after the grace period a live member
    resumes its session, handles what was dealt to it, discards it and clears its status. Nothing is
    lost; what the killed member had not acknowledged may be processed twice (bounded by its
    ReceiveMaximum), never unlike what was published."""
    await group.start("a", "b", "c", adopt_after=QUICK_ADOPTION)
    await group.publish(FLOW)
    group.procs["c"].send_signal(signal.SIGKILL)
    await exited(group.procs["c"])

    def adopted_by() -> list[str]:
        return [i for i in ("a", "b") if "adopted the session of preprocessor-c" in group.log(i)]

    await group.publish_while(asyncio.ensure_future(wait_until(adopted_by, 60, "an adoption of c's session")))
    await group.publish(FLOW)
    await group.all_processed()
    tally = group.tally()
    text = report("kill -9 1 of 3, adopted", tally, adopted_by=adopted_by())
    assert not tally.lost and not tally.unexpected, text
    # Processed but not acknowledged by the killed member: at most the one batch it had in hand.
    assert tally.duplicated <= DEFAULT_BATCH, text
    assert len(adopted_by()) == 1, text
    log = group.log(adopted_by()[0])
    assert log.count("adopted the session of preprocessor-c") == 1, log
    assert not await group.session_present("c")
    retained = await group.retained_statuses()
    assert set(retained) == {"a", "b"}, retained


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_control_killed_member_without_adoption_strands_windows(group: Group) -> None:
    """The control: the same kill -9 with adoption held off. The windows dealt to the dead member's
    session are counted lost (stranded there), and its stale `offline` status stays: what the tests
    above would report if members stranded their share."""
    await group.start("a", "b", "c", adopt_after=NO_ADOPTION)
    await group.publish(FLOW)
    group.procs["c"].send_signal(signal.SIGKILL)
    await exited(group.procs["c"])
    await group.publish(FLOW)
    await group.synced(["a", "b"])
    tally = group.tally()
    text = report("control: kill -9 1 of 3, no adoption", tally)
    assert tally.lost, "windows dealt to a dead member's session must show as lost: " + text
    assert not tally.unexpected and tally.duplicated == 0, text
    assert await group.session_present("c")
    retained = await group.retained_statuses()
    assert retained["c"]["state"] == "offline", retained


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_single_member_restarted_keeps_its_queue(group: Group) -> None:
    """The only member stops (SIGTERM) and starts again under the same id: it keeps its durable
    session and says `offline` meanwhile, so the windows published while it was down queue for it
    and are processed once it is back."""
    await group.start("a", adopt_after=QUICK_ADOPTION)
    await group.publish(FLOW)
    group.procs["a"].send_signal(signal.SIGTERM)
    assert await group.publish_while(asyncio.ensure_future(exited(group.procs["a"]))) == 0
    assert "last live member" in group.log("a")
    retained = await group.retained_statuses()
    assert retained["a"]["state"] == "offline", retained
    await group.publish(FLOW)  # nobody is running: all of it queues in a's session
    down = len(group.published)
    await group.start("a", adopt_after=QUICK_ADOPTION)
    await group.publish(FLOW)
    await group.all_processed()
    tally = group.tally()
    text = report("single member restarted", tally, published_while_down=down)
    assert not tally.lost and not tally.unexpected, text
    # Only the batch in hand at the SIGTERM (the last member does not drain: its stream goes on) comes again.
    assert tally.duplicated <= DEFAULT_BATCH, text


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_group_replaced_under_new_ids_strands_nothing(group: Group) -> None:
    """Force-recreate: both members stop at once (as `docker compose up --force-recreate` or `stop`
    does) and new members with new ids take over. Of the two stopping together, one keeps its
    session (the one whose announcement the broker took last sees the other leaving), so windows
    published while none runs queue; the new members adopt that session after the grace period. Nothing lost, and in
    the end no session or status of the old members is left."""
    await group.start("a", "b", adopt_after=QUICK_ADOPTION)
    await group.publish(FLOW)
    await group.burst(BURST)
    for instance in ("a", "b"):
        group.procs[instance].send_signal(signal.SIGTERM)
    codes = await group.publish_while(
        asyncio.ensure_future(asyncio.gather(*(exited(group.procs[i]) for i in ("a", "b"))))
    )
    kept = [i for i in ("a", "b") if "last live member" in group.log(i)]
    # Exactly one: the one whose announcement the broker took second saw the other leaving.
    assert codes == [0, 0] and len(kept) == 1, [group.log(i) for i in ("a", "b")]
    await group.publish(FLOW)  # none running: queued in the session kept
    await group.start("c", "d", adopt_after=QUICK_ADOPTION)

    def adoptions() -> int:
        return sum(group.log(i).count("adopted the session of") for i in ("c", "d"))

    await group.publish_while(asyncio.ensure_future(wait_until(lambda: adoptions() >= len(kept), 60, "adoption")))
    await group.publish(FLOW)
    await group.all_processed()
    tally = group.tally()
    text = report("both members replaced", tally, kept_session=kept, adoptions=adoptions())
    assert not tally.lost and not tally.unexpected, text
    assert tally.duplicated <= DEFAULT_BATCH, text  # at most the batch the member that stayed had in hand
    for instance in ("a", "b"):
        assert not await group.session_present(instance), f"the session of preprocessor-{instance} outlived it"
    retained = await group.retained_statuses()
    assert set(retained) == {"c", "d"}, retained


@pytest.mark.timeout(60)
async def test_owner_back_during_adoption_loses_nothing(
    stack: Stack, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The race: a member killed for good is being adopted, its windows in the adopter's hands and
    not acknowledged, when it comes back under its id. The broker ends the adopter's connection and
    delivers the session to the owner; the adopter logs it once, drops what it had not started on,
    and leaves the owner's status alone. Every message is handled, at most one batch twice."""
    caplog.set_level(logging.INFO, logger="iotpipe.bus")
    topics = Topics(base)
    handled: list[tuple[str, int]] = []
    gate = asyncio.Event()  # closed: the adopter's handler holds its batch

    def member(name: str, client: str) -> Any:
        bus = bus_for(
            stack,
            "preprocessor",
            client_id=f"preprocessor-{client}",
            session_expiry=600,
            status_topic=topics.service_status("preprocessor", client),
        )

        async def handle(messages: Sequence[PlainMessage[Any]]) -> None:
            if name == "adopter":
                await gate.wait()
            handled.extend((name, int(m.payload)) for m in messages)

        bus.subscribe(topics.all("raw"), handle, sealed=False, share_group="preprocessor-race", adopt_after=0.5)
        return bus

    owner, adopter = member("owner", "race-x"), member("adopter", "race-y")
    producer = bus_for(stack, "sensor-reader")
    back = None
    for bus in (owner, adopter, producer):
        await bus.start()
        await bus.wait_connected()
    try:
        await wait_until(
            lambda: adopter.groups.live_members() == ["preprocessor-race-x"], 10, "the adopter to see the owner"
        )
        owner.connection.abort()  # a crash: the broker publishes its Will (offline)
        for task in owner._tasks:
            task.cancel()
        await asyncio.gather(*(producer.publish(topics.raw("d1"), str(i).encode()) for i in range(200)))
        await wait_until(lambda: adopter._adopted, 10, "the adopter to hold the owner's windows")

        back = member("owner", "race-x")  # the owner, back under its id
        await back.start()
        await back.wait_connected()
        await wait_until(lambda: "gave up adopting" in caplog.text, 10, "the adopter to give up")
        gate.set()
        await wait_until(lambda: {i for _n, i in handled} == set(range(200)), 20, "every message handled")
        counts = collections.Counter(i for _n, i in handled)
        duplicated = sum(c - 1 for c in counts.values())
        print(f"owner back during adoption: lost 0, duplicated {duplicated}")
        assert duplicated <= DEFAULT_BATCH, counts
        assert caplog.text.count("gave up adopting the session of preprocessor-race-x") == 1, caplog.text
        assert "adopted the session" not in caplog.text
        await asyncio.wait_for(back.subscribed.wait(), 5)
        status = {}

        async def on_status(messages: Sequence[PlainMessage[Any]]) -> None:
            status.update({m.topic: m.payload for m in messages})

        watcher = bus_for(stack, TAP)
        watcher.subscribe(topics.service_status("preprocessor", "race-x"), on_status, sealed=False)
        await watcher.start()
        try:
            await wait_until(lambda: status, 10, "the owner's retained status")
        finally:
            await watcher.stop()
        assert orjson.loads(next(iter(status.values())))["state"] == "online", status
    finally:
        gate.set()
        for bus in (back, adopter, producer):
            if bus is not None:
                await bus.stop()
