"""The broker as configured in mosquitto/: authentication, ACL, TLS, and the bus client on it."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence

import orjson
import paho.mqtt.client as mqtt
import pytest
from iotpipe import KeyRing, Opened, PermanentError, PlainMessage, Sealer, Topics, counter
from iotpipe.devstack import mqtt_password_file
from paho.mqtt.enums import CallbackAPIVersion
from servers import TAP, Stack, bus_for


def raw_connect(stack: Stack, username: str | None, password: str | None, client_id: str | None = None) -> str:
    """Connect with a bare paho client; return the CONNACK reason as text."""
    result: list[str] = []
    done = threading.Event()
    client_id = client_id or f"{username}-raw-{uuid.uuid4().hex[:6]}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)

    def on_connect(_c, _u, _f, reason, _p) -> None:  # type: ignore[no-untyped-def]
        result.append(str(reason))
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", stack.ports.mqtt)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return result[0]


def test_anonymous_and_wrong_password_are_refused(stack: Stack) -> None:
    assert raw_connect(stack, None, None) != "Success"
    assert raw_connect(stack, "monitor", "wrong") != "Success"
    assert raw_connect(stack, "nobody", "x") != "Success"
    password = mqtt_password_file(stack.secrets_dir, "monitor").read_text().strip()
    assert raw_connect(stack, "monitor", password) == "Success"


async def test_acl_refuses_publishes_outside_a_users_topics(stack: Stack, keyring: KeyRing, base: str) -> None:
    topics = Topics(base)
    reader_bus = bus_for(stack, "sensor-reader", keyring=keyring)
    tap = bus_for(stack, TAP, keyring=keyring)  # read-only
    preprocessor = bus_for(stack, "preprocessor", keyring=keyring)
    for bus in (reader_bus, tap, preprocessor):
        await bus.start()
        await bus.wait_connected()
    try:
        await reader_bus.publish_sealed(topics.raw("d1"), {"ok": 1})  # its own topic: accepted
        with pytest.raises(PermanentError, match="refused"):
            await reader_bus.publish_sealed(topics.processed("d1"), {"forged": 1})
        with pytest.raises(PermanentError, match="refused"):
            await tap.publish(topics.raw("d1"), b"{}")
        with pytest.raises(PermanentError, match="refused"):
            await reader_bus.publish(topics.device_status("d1"), b"{}", retain=True)
        with pytest.raises(PermanentError, match="refused"):
            await reader_bus.publish_sealed(topics.alerts("d1"), {"forged": 1})
        # The preprocessor sends flood alerts (per-device fairness), and still publishes no raw data.
        await preprocessor.publish_sealed(topics.alerts("d1"), {"ok": 1})
        with pytest.raises(PermanentError, match="refused"):
            await preprocessor.publish_sealed(topics.raw("d1"), {"forged": 1})
    finally:
        for bus in (reader_bus, tap, preprocessor):
            await bus.stop()


async def test_acl_filters_deliveries_a_user_may_not_read(stack: Stack, keyring: KeyRing, base: str) -> None:
    """cache-writer may read processed but not raw: mosquitto accepts the SUBSCRIBE, delivers nothing."""
    topics = Topics(base)
    got: list[str] = []
    processed_seen = asyncio.Event()

    async def handler(messages: Sequence[Opened]) -> None:
        got.extend(m.topic for m in messages)
        if any("/processed/" in m.topic for m in messages):
            processed_seen.set()

    writer = bus_for(stack, "cache-writer", keyring=keyring)
    writer.subscribe(f"{topics.root}/#", handler)
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    preproc = bus_for(stack, "preprocessor", keyring=keyring)
    for bus in (writer, producer, preproc):
        await bus.start()
        await bus.wait_connected()
    try:
        await wait_subscribed(writer)
        await producer.publish_sealed(topics.raw("d1"), {"raw": 1})
        await preproc.publish_sealed(topics.processed("d1"), {"p": 1})
        await asyncio.wait_for(processed_seen.wait(), 10)
        assert got == [topics.processed("d1")]
    finally:
        for bus in (writer, producer, preproc):
            await bus.stop()


async def wait_subscribed(bus, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    await asyncio.wait_for(bus.subscribed.wait(), timeout)


async def test_bad_input_is_counted_and_never_blocks_the_next_message(
    stack: Stack, keyring: KeyRing, base: str
) -> None:
    topics = Topics(base)
    received: list[object] = []
    good = asyncio.Event()

    async def handler(messages: Sequence[Opened]) -> None:
        received.extend(m.data for m in messages)
        if any(m.data == {"good": True} for m in messages):
            good.set()

    consumer = bus_for(stack, "preprocessor", keyring=keyring)
    consumer.subscribe(topics.all("raw"), handler)
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    for bus in (consumer, producer):
        await bus.start()
        await bus.wait_connected()
    try:
        await wait_subscribed(consumer)
        other_key = KeyRing([("k1", b"A" * 43 + b"=")])
        sealed_elsewhere = Sealer(other_key, "evil/x").seal(topics.raw("d1"), {"bad": 1})
        replayed = Sealer(keyring, "sensor-reader/x").seal(topics.raw("d2"), {"bad": 2})
        bad_payloads = [
            b"",
            b"{",
            b"[" * 100_000,
            b'{"v":1}',
            b"\xff\xfe",
            sealed_elsewhere,
            replayed,
            b'{"v":1,"alg":"fernet","kid":"k1","ct":"' + b"x" * 2_000_000 + b'"}',
        ]
        for payload in bad_payloads:  # as a hostile client would send them: past our own size check
            await producer.connection.publish(topics.raw("d1"), payload)
        with pytest.raises(PermanentError, match="exceeds"):  # our own bus refuses to send an oversize one
            await producer.publish(topics.raw("d1"), bad_payloads[-1])
        duplicate = producer.sealer.seal(topics.raw("d1"), {"dup": True})  # type: ignore[union-attr]
        await producer.publish(topics.raw("d1"), duplicate)
        await producer.publish(topics.raw("d1"), duplicate)
        await producer.publish_sealed(topics.raw("d1"), {"good": True})
        await asyncio.wait_for(good.wait(), 10)
        assert received == [{"dup": True}, {"good": True}]
        counts = consumer.metrics.counters()
        assert counter(counts, "rejected", "malformed") >= 5
        assert counter(counts, "rejected", "undecryptable") == 1
        assert counter(counts, "rejected", "topic_mismatch") == 1
        assert counter(counts, "rejected", "duplicate") == 1
    finally:
        for bus in (consumer, producer):
            await bus.stop()


async def test_tls_listener_with_generated_ca(stack: Stack, keyring: KeyRing, base: str) -> None:
    topics = Topics(base)
    seen = asyncio.Event()
    payloads: list[bytes] = []

    async def handler(messages: Sequence[PlainMessage]) -> None:
        payloads.extend(m.payload for m in messages)
        seen.set()

    bus = bus_for(stack, "monitor", keyring=keyring, tls=True)
    bus.subscribe(f"{topics.root}/status/service/+/+", handler, sealed=False)
    await bus.start()
    await bus.wait_connected()
    try:
        await wait_subscribed(bus)
        await bus.publish(topics.service_status("monitor", "tls"), orjson.dumps({"state": "online"}), retain=True)
        await asyncio.wait_for(seen.wait(), 10)
        assert orjson.loads(payloads[0]) == {"state": "online"}
        await bus.publish(topics.service_status("monitor", "tls"), b"", retain=True)  # clear retained
    finally:
        await bus.stop()


async def test_will_marks_a_vanished_client_offline(stack: Stack, keyring: KeyRing, base: str) -> None:
    """A client that disappears without DISCONNECT gets its retained status flipped to offline."""
    topics = Topics(base)
    status_topic = topics.service_status("preprocessor", "w1")
    doomed = bus_for(stack, "preprocessor", keyring=keyring, status_topic=status_topic, keepalive=5)
    await doomed.start()
    await doomed.wait_connected()
    states: list[str] = []
    offline = asyncio.Event()

    async def handler(messages: Sequence[PlainMessage]) -> None:
        for m in messages:
            if m.payload:
                states.append(orjson.loads(m.payload)["state"])
                if states[-1] == "offline":
                    offline.set()

    watcher = bus_for(stack, "monitor", keyring=keyring)
    watcher.subscribe(status_topic, handler, sealed=False)
    await watcher.start()
    await watcher.wait_connected()
    try:
        await wait_subscribed(watcher)
        # No DISCONNECT, the socket just cut: to the broker, a crashed client.
        doomed.connection.abort()
        await asyncio.wait_for(offline.wait(), 20)
        assert states[0] == "online" and states[-1] == "offline"
    finally:
        await watcher.stop()
