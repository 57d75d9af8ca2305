"""The trust boundary between the pipeline broker and third parties (docs/security.md), tried as an
insider with one credential would: issue 10's cases 1, 2 and 8, the bridge, and the mTLS option.

Every test runs against the shipped configs (mosquitto/mosquitto.conf with the iotpipe_guard plugin,
mosquitto/public.conf bridged to it), rendered for loopback by tests/servers.py."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from iotpipe import KeyRing, Sealer, Topics
from iotpipe.devstack import mqtt_client_cert_file, mqtt_client_key_file, mqtt_password_file
from paho.mqtt.enums import CallbackAPIVersion
from servers import TAP, Stack, wait_until

REFUSED = 135  # MQTT 5 "Not authorized"
ACCEPTED = (0, 16)  # 16: "No matching subscribers", accepted all the same


class Client:
    """A bare paho MQTT 5 client in its own network thread: what any third-party library does."""

    def __init__(
        self,
        stack: Stack,
        user: str | None,
        client_id: str,
        *,
        port: int | None = None,
        password: str | None = None,
        tls: bool = False,
        cert_user: str | None = None,
    ) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.port = port or stack.ports.mqtt
        if user is not None:
            secret = password if password is not None else mqtt_password_file(stack.secrets_dir, user).read_text()
            self.client.username_pw_set(user, secret.strip())
        if tls or cert_user:
            certs = {}
            if cert_user:
                certs = {
                    "certfile": str(mqtt_client_cert_file(stack.secrets_dir, cert_user)),
                    "keyfile": str(mqtt_client_key_file(stack.secrets_dir, cert_user)),
                }
            self.client.tls_set(ca_certs=str(stack.secrets_dir / "ca_crt"), **certs)
        self.connack: queue.Queue[str] = queue.Queue()
        self.disconnects: queue.Queue[str] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self.connack.put(str(reason))
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self.disconnects.put(str(reason))
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put([c.value for c in codes])
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.pubacks.__setitem__(mid, reason.value)
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)

    def connect(self) -> str:
        """The CONNACK's reason ("Success", "Not authorized", ...)."""
        self.client.connect("localhost", self.port)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=15)
        except queue.Empty:
            return "no CONNACK"  # e.g. a TLS handshake the broker refused

    def subscribe(self, topic_filter: str) -> int:
        self.client.subscribe(topic_filter, qos=1)
        return self.subacks.get(timeout=15)[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The PUBACK's reason code (0: accepted, 135: refused)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(15)
        return self.pubacks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def connected(stack: Stack, user: str | None, client_id: str, **kw: object) -> Iterator[Client]:
    client = Client(stack, user, client_id, **kw)  # type: ignore[arg-type]
    reason = client.connect()
    try:
        assert reason == "Success", f"{user} as {client_id}: {reason}"
        yield client
    finally:
        client.close()


def drain(messages: queue.Queue[mqtt.MQTTMessage]) -> list[mqtt.MQTTMessage]:
    out = []
    while True:
        try:
            out.append(messages.get_nowait())
        except queue.Empty:
            return out


def refused(stack: Stack, user: str | None, client_id: str, **kw: object) -> str:
    client = Client(stack, user, client_id, **kw)  # type: ignore[arg-type]
    try:
        return client.connect()
    finally:
        client.close()


def public(stack: Stack, client_id: str) -> Client:
    """A third party on the public broker, as the documented `reader` user."""
    return Client(stack, "reader", client_id, port=stack.ports.public)


# -- case 1: no user outside a group can join it and take its share ----------------------------------


def test_third_parties_are_not_users_of_the_pipeline_broker(stack: Stack) -> None:
    """Issue 10 case 1: `reader` joined `$share/preprocessor/...raw/+` on the one broker and took raw
    windows for good. `reader` exists only on the public broker now."""
    assert refused(stack, "reader", "reader-x") == "Not authorized"
    assert refused(stack, "reader", "reader-x", port=stack.ports.mqtt_tls, tls=True) == "Not authorized"


def test_a_service_cannot_join_another_services_shared_group(stack: Stack, keyring: KeyRing, base: str) -> None:
    """The monitor may read processed windows, but joining the cache-writer's group would take the
    cache-writer's share of them: the SUBSCRIBE is refused and nothing is delivered to it, while
    every message reaches the real group member."""
    topics = Topics(base)
    group_filter = f"{topics.all('processed')}"
    with (
        connected(stack, "cache-writer", f"cache-writer-{base}") as member,
        connected(stack, "monitor", f"monitor-{base}") as thief,
        connected(stack, "preprocessor", f"preprocessor-{base}") as producer,
    ):
        assert member.subscribe(f"$share/cache-writer/{group_filter}") == 1
        assert thief.subscribe(f"$share/cache-writer/{group_filter}") == REFUSED
        assert thief.subscribe(f"$share/cache-writer-extra/{group_filter}") == REFUSED
        assert thief.subscribe(f"$share/monitor/{group_filter}") == 1  # its own group is its business
        sealer = Sealer(keyring, f"preprocessor/{base}")
        for n in range(20):
            payload = sealer.seal(topics.processed(base), {"n": n})
            assert producer.publish(topics.processed(base), payload) in ACCEPTED
        wait_until_sync(lambda: member.messages.qsize() >= 20, 15, "the member's 20 messages")
        assert member.messages.qsize() == 20
        # The monitor's own group got its copy of each (a group per subscriber name), never the
        # cache-writer's share.
        wait_until_sync(lambda: thief.messages.qsize() >= 20, 15, "the monitor group's copies")
        assert thief.messages.qsize() == 20


def test_the_public_broker_never_carries_raw_or_processed_data(stack: Stack, keyring: KeyRing, base: str) -> None:
    topics = Topics(base)
    third_party = public(stack, "home-assistant")
    assert third_party.connect() == "Success"
    try:
        for topic_filter in ("#", f"$share/preprocessor/{topics.all('raw')}", f"{base}/v2/+/+"):
            assert third_party.subscribe(topic_filter) in (0, 1)
        with (
            connected(stack, "sensor-reader", f"sensor-reader-{base}") as reader,
            connected(stack, "preprocessor", f"preprocessor-{base}") as preprocessor,
            connected(stack, "monitor", f"monitor-{base}") as monitor,
        ):
            assert (
                reader.publish(topics.raw(base), Sealer(keyring, "sensor-reader/x").seal(topics.raw(base), {}))
                in ACCEPTED
            )
            processed = Sealer(keyring, "preprocessor/x").seal(topics.processed(base), {})
            assert preprocessor.publish(topics.processed(base), processed) in ACCEPTED
            # A status published after both: once it reached the third party, so would they have.
            # Retained, so it arrives even if the bridge is (re)subscribing just now.
            marker = topics.device_status("marker")
            assert monitor.publish(marker, b'{"state": "online"}', retain=True) in ACCEPTED
            wait_until_sync(
                lambda: any(m.topic == marker for m in list(third_party.messages.queue)), 30, "the bridged status"
            )
            monitor.publish(marker, b"", retain=True)
        seen = {m.topic for m in drain(third_party.messages)}
        assert not [t for t in seen if "/raw/" in t or "/processed/" in t], seen
    finally:
        third_party.close()


# -- case 2: no user can take a client id that is not its own ---------------------------------------


def test_no_user_can_take_another_users_client_id(stack: Stack) -> None:
    """Issue 10 case 2: `reader` connected as `cache-writer-local`, the broker closed the real
    cache-writer's connection and handed its session over. Now a client id must be `<user>-<id>`."""
    with connected(stack, "cache-writer", "cache-writer-local") as victim:
        for user in ("sensor-reader", "monitor", "preprocessor"):
            assert refused(stack, user, "cache-writer-local") == "Not authorized", user
        assert refused(stack, "sensor-reader", "cache-writer-local", port=stack.ports.mqtt_tls, tls=True) == (
            "Not authorized"
        )
        # Not even a look-alike id: `<user>-` must be followed by an id.
        assert refused(stack, "cache-writer", "cache-writer-") == "Not authorized"
        assert refused(stack, "cache-writer", "cache-writerx") == "Not authorized"
        assert refused(stack, "cache-writer", "cache-writer-a b") == "Not authorized"
        # On the public broker the same id is just another client of another broker.
        third_party = public(stack, "cache-writer-local")
        assert third_party.connect() == "Success"
        third_party.close()
        assert victim.disconnects.empty(), "the real cache-writer lost its connection"
        assert not [line for line in stack.broker.lines if "cache-writer-local already connected" in line]


def test_a_service_may_take_over_its_own_users_sessions(stack: Stack, base: str) -> None:
    """Share-group members adopt the session of a member gone for good (iotpipe._share): the same
    user may still take over its own user's client ids."""
    with connected(stack, "preprocessor", f"preprocessor-{base}-a") as first:
        with connected(stack, "preprocessor", f"preprocessor-{base}-a"):
            first.disconnects.get(timeout=15)  # the older connection was closed...
        assert any(f"preprocessor-{base}-a already connected" in line for line in stack.broker.lines)


# -- case 8: topics the contract forbids are refused by the broker -----------------------------------


@pytest.mark.parametrize(
    "last_level",
    ["x" * 300, "has space", "a:b", "g\u00e9rard", "", "dev.ice"],
    ids=["300-chars", "space", "colon", "non-ascii", "empty", "dot"],
)
def test_the_broker_refuses_topic_levels_that_are_not_ids(
    stack: Stack, keyring: KeyRing, base: str, last_level: str
) -> None:
    topics = Topics(base)
    topic = f"{topics.root}/raw/{last_level}"
    with (
        connected(stack, "sensor-reader", f"sensor-reader-{base}") as reader,
        connected(stack, TAP, f"{TAP}-{base}") as tap,
    ):
        assert tap.subscribe(f"{topics.root}/#") == 1
        assert reader.publish(topic, Sealer(keyring, "sensor-reader/x").seal(topic, {})) == REFUSED
        good = topics.raw(base)
        assert reader.publish(good, Sealer(keyring, "sensor-reader/x").seal(good, {})) in ACCEPTED
        arrived = tap.messages.get(timeout=15)
        assert arrived.topic == good  # the refused one never reached a subscriber, the next one did


# -- the bridge: one way, only what is meant for third parties ---------------------------------------


def test_the_bridge_carries_statuses_and_alerts_one_way(stack: Stack, keyring: KeyRing, base: str) -> None:
    topics = Topics(base)
    device_status = topics.device_status("greenhouse-1")
    with connected(stack, "monitor", f"monitor-{base}") as monitor:
        assert monitor.publish(device_status, b'{"state": "online"}', retain=True) in ACCEPTED
        alert = Sealer(keyring, "monitor/x").seal(topics.alerts("greenhouse-1"), {"kind": "offline"})
        third_party = public(stack, "telegraf")
        assert third_party.connect() == "Success"
        try:
            assert third_party.subscribe(f"{topics.root}/#") == 1
            # Retained: a consumer that subscribes later still gets the last status.
            first = third_party.messages.get(timeout=15)
            assert (first.topic, orjson.loads(first.payload), first.retain) == (
                device_status,
                {"state": "online"},
                True,
            )
            assert monitor.publish(topics.alerts("greenhouse-1"), alert) in ACCEPTED
            assert third_party.messages.get(timeout=15).payload == alert  # sealed, for key holders only
            # Read-only: the public broker refuses a third party's publish, retained or not...
            assert third_party.publish(device_status, b'{"state": "fault"}', retain=True) == REFUSED
            assert third_party.publish(f"{topics.root}/raw/x", b"{}") == REFUSED
        finally:
            third_party.close()
        monitor.publish(device_status, b"", retain=True)  # clear it; the clear is bridged too


def test_the_bridge_listener_names_the_client_by_its_certificate(stack: Stack) -> None:
    """The bridge listener authenticates by certificate only, so its client id is forced to the
    certificate's name: a service's certificate there cannot take that service's client id."""
    with connected(stack, "cache-writer", "cache-writer-bridgetest") as victim:
        intruder = Client(
            stack, None, "cache-writer-bridgetest", port=stack.ports.mqtt_bridge, cert_user="cache-writer"
        )
        assert intruder.connect() == "Success"
        intruder.close()
        assert victim.disconnects.empty()
    wait_until_sync(
        lambda: any(" as cache-writer (" in line for line in stack.broker.lines), 10, "the forced client id"
    )
    assert refused(stack, None, "bridge", port=stack.ports.mqtt_bridge, tls=True) != "Success"  # no certificate


# -- the mTLS option ------------------------------------------------------------------------------


def test_mtls_listener_needs_the_users_own_certificate_and_password(stack: Stack) -> None:
    port = stack.ports.mqtt_mtls
    with connected(stack, "monitor", "monitor-mtls", port=port, cert_user="monitor"):
        pass
    assert refused(stack, "monitor", "monitor-mtls", port=port, cert_user="cache-writer") == "Not authorized"
    assert refused(stack, "monitor", "monitor-mtls", port=port, tls=True) != "Success"  # no certificate
    assert refused(stack, "monitor", "monitor-mtls", port=port, cert_user="monitor", password="wrong") == (
        "Not authorized"
    )


async def test_a_service_runs_over_mtls(stack: Stack, base: str, tmp_path: Path) -> None:
    """The preprocessor started with IOTPIPE_MQTT__CERT_FILE/KEY_FILE on the mTLS listener comes online."""
    from servers import service_env, spawn, stop_all, wait_online

    instance = f"mtls-{uuid.uuid4().hex[:6]}"
    env = service_env(
        stack,
        base,
        tmp_path,
        instance,
        IOTPIPE_MQTT__TLS="true",
        IOTPIPE_MQTT__HOST="localhost",
        IOTPIPE_MQTT__PORT=str(stack.ports.mqtt_mtls),
        IOTPIPE_MQTT__CA_FILE=str(stack.secrets_dir / "ca_crt"),
        IOTPIPE_MQTT__CERT_FILE=str(mqtt_client_cert_file(stack.secrets_dir, "preprocessor")),
        IOTPIPE_MQTT__KEY_FILE=str(mqtt_client_key_file(stack.secrets_dir, "preprocessor")),
    )
    proc = spawn("preprocessor", env, tmp_path, "pp")
    try:
        await wait_online(stack, Topics(base).service_status("preprocessor", instance), timeout=60)
    finally:
        stop_all([proc])


def wait_until_sync(condition: object, timeout: float, what: str) -> None:
    """wait_until for the synchronous tests here: poll `condition` on an event, not a fixed sleep."""
    import asyncio

    asyncio.run(wait_until(condition, timeout, what))  # type: ignore[arg-type]
