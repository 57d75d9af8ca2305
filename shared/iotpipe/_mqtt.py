"""One MQTT v5 connection, paho-mqtt 2.x driven by the asyncio event loop (as Home Assistant does).

paho never runs a thread of its own here: its socket is registered with the loop (`add_reader`,
`add_writer`), keepalive runs in a task, and every callback (deliveries, PUBACKs, connect and
disconnect) runs on the loop thread. So a publish registers its PUBACK future before the loop can
read that PUBACK, with no lock and no bookkeeping for acknowledgements that beat their publisher.
Only the blocking part of connecting (DNS, TCP connect, TLS handshake) runs in a worker thread,
whose socket callbacks hop back onto the loop.

Kept from the threaded version: durable session (`clean_start=False`, session expiry, stable client
id), `manual_ack`, ReceiveMaximum, a publish that resolves on PUBACK (raising BrokerRefused with
the broker's reason code), Last Will + a birth message on every connect, re-subscribe on every
connect, and reconnecting with capped, jittered backoff.

Handing a shared subscription's share back (`hand_over`, used by iotpipe._bus to leave a
`$share/...` group and to drain the session of a member gone for good): mosquitto 2.0 keeps dealing
a group's messages to members that are disconnected but keep a session, so a member that goes for
good strands what was dealt to it. Measured on mosquitto 2.0.11: after UNSUBSCRIBE the broker deals
nothing new to the session but still delivers what it had queued for it; a message published after
the UNSUBSCRIBE to a topic only this session subscribes to arrives after every one of those (one
client's messages are delivered in the order they were queued); DISCONNECT with
SessionExpiryInterval=0 discards the session (a later clean_start=False connect gets
session_present=False).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ._errors import BrokerRefused, ConfigError, RetryableError
from ._settings import MqttSettings

log = logging.getLogger("iotpipe.bus")

# Reconnect backoff: the first retry comes quickly (a broker restart takes about a second), later
# ones spread out and are jittered so a fleet of services does not reconnect in lockstep.
RECONNECT_MIN_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
# paho's keepalive bookkeeping (PINGREQ, detecting a silent broker) wants a call about once a second.
MISC_INTERVAL = 1.0
# Packets read per readiness callback before yielding to other tasks: large enough to amortise the
# callback, small enough that a flood of deliveries cannot starve our own writes and handlers.
MAX_READS_PER_CALLBACK = 256

# What the broker acknowledged is kept this long (while connected) and republished after every
# reconnect. The broker snapshots its store every few seconds (mosquitto.conf: autosave_interval 5)
# and acknowledges before saving, so a broker killed in between loses up to that much of what it
# acknowledged; the copies close that gap. Receivers drop them by (src, boot, seq)
# (iotpipe._envelope.ReplayGuard, whose window is as long as REPLAY_MAX_MESSAGES), and every sink
# is idempotent.
REPLAY_SECONDS = 15.0
REPLAY_MAX_MESSAGES = 16_384
REPLAY_MAX_BYTES = 64 << 20
# ...and republished once more this long after the reconnect, with what was published since: a
# restarted mosquitto does not restore shared subscriptions ($share/...), so until each member of a
# group has reconnected and subscribed again, what reaches the broker for that group goes nowhere.
REPLAY_SETTLE = 8.0

Delivery = Callable[[mqtt.MQTTMessage], None]


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Verify the broker's certificate against our CA and its host name (TLS 1.2 at least)."""
    if settings.ca_file is None:
        raise ConfigError("IOTPIPE_MQTT__CA_FILE is required when IOTPIPE_MQTT__TLS is true")
    context = ssl.create_default_context(cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if (settings.cert_file is None) != (settings.key_file is None):
        raise ConfigError("IOTPIPE_MQTT__CERT_FILE and IOTPIPE_MQTT__KEY_FILE go together (the mTLS option)")
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            # Names the files, never their content.
            raise ConfigError(
                f"cannot load the client certificate {str(settings.cert_file)!r} with its key: {type(exc).__name__}"
            ) from None
    return context


class MqttConnection:
    """A durable MQTT session on the running event loop. Create, `subscribe`, then `start()`."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        username: str | None,
        password: str | None,
        will: Callable[[], tuple[str, bytes]] | None = None,
        birth: Callable[[], tuple[str, bytes]] | None = None,
        reconnect: bool = True,
    ) -> None:
        """`will` and `birth` give (topic, payload) of the retained Last Will (taken at `start()`)
        and of the birth message (at every connect). `reconnect=False`: one connection, not kept up
        (`lost` is set when it ends), quiet about its ending: for adopting another member's session."""
        self.settings = settings
        self.client_id = client_id
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()  # set once the broker acknowledged our subscriptions
        self.lost = asyncio.Event()  # reconnect=False: the one connection ended, or never came up
        self.session_present: bool | None = None  # as the broker's last CONNACK said
        self._birth = birth
        self._will = will
        self._reconnect = reconnect
        # Delivered (QoS > 0) and not yet acknowledged, by id(): a hand-over is done when none is left.
        self._delivered: dict[int, mqtt.MQTTMessage] = {}
        self.received = 0  # messages delivered to our callbacks
        self.disconnect_reason: str | None = None  # why the last connection ended, as paho reported it
        self._progress = 0  # deliveries and acknowledgements, for noticing a hand-over that stalls
        self._changed = asyncio.Event()
        self._connects = 0
        self._filters: list[str] = []
        # mid -> (the publisher's future, topic, payload, whether to keep it for the replay below)
        self._pending: dict[int, tuple[asyncio.Future[None], str, bytes, bool]] = {}
        self._recent: collections.deque[tuple[float, str, bytes]] = collections.deque()
        self._recent_bytes = 0
        self._unsettled: list[tuple[float, str, bytes]] = []  # replayed at reconnect, to replay once more
        self._settle_timer: asyncio.TimerHandle | None = None
        self._inflight = asyncio.Semaphore(settings.max_inflight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._socket_closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._was_connected = False
        self._outage_logged = False
        self._stopping = False
        self._client = self._make_client(username, password)

    def _make_client(self, username: str | None, password: str | None) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if username:
            client.username_pw_set(username, password)
        if self.settings.tls:
            client.tls_set_context(tls_context(self.settings))
        client.max_inflight_messages_set(self.settings.max_inflight)
        client.on_connect = self._on_connect
        client.on_message = self._on_unwanted
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def subscribe(self, wire_filter: str, match: str, deliver: Delivery) -> None:
        """Before `start()`: SUBSCRIBE to `wire_filter` (maybe `$share/...`) on every connect and
        hand each message matching `match` to `deliver`, on the loop, unacknowledged."""
        self._filters.append(wire_filter)
        self.deliver(match, deliver)

    def deliver(self, match: str, deliver: Delivery) -> None:
        """Hand each message matching `match` to `deliver` without subscribing to anything: what a
        resumed session already holds (or a filter subscribed another way)."""
        delivered = self._delivered

        def on_message(_client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
            if msg.qos > 0:
                delivered[id(msg)] = msg
            self.received += 1
            self._progress += 1
            self._changed.set()
            deliver(msg)

        self._client.message_callback_add(match, on_message)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._will is not None:
            topic, payload = self._will()
            self._client.will_set(topic, payload, qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        props.SessionExpiryInterval = self.settings.session_expiry
        props.ReceiveMaximum = self.settings.receive_maximum
        # Stores the parameters only; `_maintain` does the (blocking) connecting in a worker thread.
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            clean_start=False,
            properties=props,
        )
        self._tasks = [
            asyncio.create_task(self._maintain(), name=f"mqtt {self.client_id}"),
            asyncio.create_task(self._misc(), name=f"mqtt keepalive {self.client_id}"),
        ]

    async def wait_connected(self, timeout: float | None = None) -> None:
        limit = timeout or self.settings.connect_timeout
        try:
            async with asyncio.timeout(limit):
                await self.connected.wait()
        except TimeoutError as exc:
            raise RetryableError(
                f"no MQTT connection to {self.settings.host}:{self.settings.port} within {limit}s", dependency="broker"
            ) from exc

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, expiry: int | None = None) -> None:
        """QoS 1; returns once the broker acknowledged it (after a reconnect if need be: paho keeps
        and resends the unacknowledged publishes of a durable session). With `expiry` (s), the
        broker discards the message once it has waited that long for a subscriber (MQTT v5 Message
        Expiry Interval): for state that is re-sent periodically, where only a fresh copy matters."""
        assert self._loop is not None, "start() first"
        properties = None
        if expiry is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = expiry
        async with self._inflight:
            info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise RetryableError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}", dependency="broker")
            # Registered before this task yields: the PUBACK is read on this same thread, later.
            future: asyncio.Future[None] = self._loop.create_future()
            # Neither retained status (republished by every birth and heartbeat anyway) nor an
            # expiring message (the next one supersedes it; a replayed copy would not expire) is
            # kept for the replay.
            self._pending[info.mid] = (future, topic, payload, not retain and expiry is None)
            try:
                await future
            finally:
                self._pending.pop(info.mid, None)

    @property
    def in_flight(self) -> int:
        """Our publishes awaiting the broker's PUBACK (at most `max_inflight`)."""
        return len(self._pending)

    @property
    def unacked(self) -> int:
        """Deliveries handed to our callbacks and not yet acknowledged (at most ReceiveMaximum)."""
        return len(self._delivered)

    def ack(self, message: mqtt.MQTTMessage) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)
            if self._delivered.pop(id(message), None) is not None:
                self._progress += 1
                self._changed.set()

    async def hand_over(self, filters: list[str], marker_topic: str, *, stall: float) -> bool:
        """Stop receiving `filters` (shared subscriptions) and wait until every message the broker
        had already queued for this session under them has been delivered and acknowledged (by the
        caller's handlers, through `ack`). True once that is so; False if the connection ended
        first, or nothing was delivered or acknowledged for `stall` s (the caller bounds the whole).

        The broker processes one connection's packets in order: the marker subscription is in
        place before the filters go, and the marker (published to a topic only this session
        subscribes to) is queued behind everything the session holds, so its arrival says the
        broker has handed over all of it."""
        self._filters = [f for f in self._filters if f not in filters]
        connects = self._connects
        nonce = os.urandom(8).hex().encode()
        marker_seen = asyncio.Event()

        def on_marker(client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            if bytes(msg.payload) == nonce:
                marker_seen.set()
                self._changed.set()

        self._client.message_callback_add(marker_topic, on_marker)
        try:
            if not self.connected.is_set():
                return False
            self._client.subscribe([(marker_topic, SubscribeOptions(qos=1))])
            self._client.unsubscribe(filters)
            self._client.publish(marker_topic, nonce, qos=1)  # not remembered for replay: it is no data
            while True:
                if self._connects != connects or not self.connected.is_set():
                    return False  # the session was taken over, or the broker went away
                if marker_seen.is_set() and not self._delivered:
                    return True
                progress = self._progress
                self._changed.clear()
                try:
                    async with asyncio.timeout(stall):
                        await self._changed.wait()
                except TimeoutError:
                    if self._progress == progress:
                        return False  # nothing delivered, nothing handled: a handler held up, or the broker
        finally:
            self._client.message_callback_remove(marker_topic)

    async def stop(self, *, will: bool, timeout: float, session_expiry: int | None = None) -> None:
        """DISCONNECT (asking the broker to publish our Will if `will`; with `session_expiry`, a
        new SessionExpiryInterval: 0 has the broker discard the session), then stop the tasks."""
        self._stopping = True
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client.socket() is not None:
            reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message") if will else None
            props = None
            if session_expiry is not None:
                props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = session_expiry
            self._socket_closed.clear()
            self._client.disconnect(reasoncode=reason, properties=props)
            try:
                async with asyncio.timeout(timeout):
                    await self._socket_closed.wait()
            except TimeoutError:
                log.warning("broker did not take our DISCONNECT within %.0fs; closing", timeout)
        self._close_socket()
        for future, *_ in self._pending.values():
            future.cancel()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the broker publishes our Will)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        sock = self._client.socket()
        self._close_socket()
        if sock is not None:
            sock.close()

    # -- connection upkeep ----------------------------------------------------------------------
    async def _maintain(self) -> None:
        delay = RECONNECT_MIN_DELAY
        while True:
            self._socket_closed.clear()
            try:
                await asyncio.to_thread(self._client.reconnect)
            except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS verification...
                self._log_outage("cannot reach broker %s:%s (%s); retrying", exc)
            else:
                await self._socket_closed.wait()
                if self._was_connected and not self._outage_logged:
                    delay = RECONNECT_MIN_DELAY  # a session that worked: retry promptly
            if not self._reconnect:
                self.lost.set()
                self._changed.set()
                return
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    def _log_outage(self, message: str, exc: BaseException) -> None:
        """Once per outage, not on every retry."""
        if not self._reconnect:
            log.debug(message, self.settings.host, self.settings.port, exc)  # the owner says what failed
        elif not self._outage_logged:
            self._outage_logged = True
            log.error(message, self.settings.host, self.settings.port, exc)

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL)
            self._client.loop_misc()

    # -- socket callbacks: paho calls these on the loop, or from the connecting worker thread -------
    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_socket, sock)

    def _watch_socket(self, sock: Any) -> None:
        assert self._loop is not None
        if self._stopping:
            self._client.disconnect()  # a connect that finished after stop() began
        self._loop.add_reader(sock, self._on_readable, sock)

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._forget_socket, sock)

    def _forget_socket(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._socket_closed.set()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_socket_register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        assert self._loop is not None
        still_ours = self._client.socket() is sock  # not a socket paho has closed meanwhile
        if still_ours:
            self._loop.add_writer(sock, self._client.loop_write)

    def _on_socket_unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    def _on_readable(self, sock: Any) -> None:
        # paho's loop_read reads about one packet per call: keep reading while bytes are waiting
        # (a TLS socket can hold decrypted records the selector cannot see).
        for _ in range(MAX_READS_PER_CALLBACK):
            if self._client.loop_read() != mqtt.MQTT_ERR_SUCCESS or self._client.socket() is not sock:
                return
            if not _has_unread(sock):
                return

    # -- protocol callbacks (on the loop) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            # Bad credentials or a refused client id: the broker closes the socket and we retry.
            self._log_outage("broker %s:%s refused the connection (%s)", reason)
            return
        self._outage_logged = False
        self._was_connected = True
        self._connects += 1
        self.session_present = bool(getattr(_flags, "session_present", False))
        log.log(
            logging.INFO if self._reconnect else logging.DEBUG,
            "connected to %s:%s as %s",
            self.settings.host,
            self.settings.port,
            self.client_id,
        )
        if self._filters:
            # Re-subscribe every time: the broker may have lost our session (expiry, restart).
            client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._filters])
        if self._birth is not None:
            topic, payload = self._birth()
            client.publish(topic, payload, qos=1, retain=True)  # its PUBACK resolves nothing: no one waits
        self._replay(client)
        self.connected.set()

    def _on_unwanted(self, client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """A message no callback wants (what a resumed session held under a filter we do not
        handle): acknowledged, so it cannot hold a slot of ReceiveMaximum for ever."""
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("broker refused a subscription: %s", reason)
        self.subscribed.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self.disconnect_reason = str(reason)
        self._changed.set()
        if self._was_connected and not self._stopping and self._reconnect:
            log.warning("disconnected from broker (%s); reconnecting", reason)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        entry = self._pending.get(mid)
        if entry is None or entry[0].done():
            return  # the birth message, a replayed copy, or a publisher that gave up waiting
        future, topic, payload, replay = entry
        code = getattr(reason, "value", reason)
        if code >= 0x80:  # e.g. 0x87 not authorised: the ACL refused our publish
            future.set_exception(BrokerRefused(topic, code))
            return
        future.set_result(None)
        if replay:
            self._remember(topic, payload)

    def _remember(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        self._recent.append((now, topic, payload))
        self._recent_bytes += len(payload)
        self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        """Only called as new acknowledgements arrive, i.e. while connected: an outage, however long,
        never ages out what the broker may have lost just before it."""
        recent = self._recent
        while recent and (
            now - recent[0][0] > REPLAY_SECONDS
            or len(recent) > REPLAY_MAX_MESSAGES
            or self._recent_bytes > REPLAY_MAX_BYTES
        ):
            self._recent_bytes -= len(recent.popleft()[2])

    def _replay(self, client: mqtt.Client) -> None:
        """Republish what the broker acknowledged lately (it may have lost it if it restarted), now
        and once more REPLAY_SETTLE s later together with what was published meanwhile."""
        if not self._recent and not self._unsettled:
            return
        replay = {id(entry): entry for entry in self._unsettled}
        replay.update((id(entry), entry) for entry in self._recent)
        self._unsettled = sorted(replay.values(), key=lambda entry: entry[0])
        self._republish(client, self._unsettled)
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        assert self._loop is not None
        self._settle_timer = self._loop.call_later(REPLAY_SETTLE, self._replay_settled, time.monotonic())

    def _replay_settled(self, reconnected_at: float) -> None:
        self._settle_timer = None
        if not self.connected.is_set():
            return  # the next reconnect replays all of it
        since = [entry for entry in self._recent if entry[0] >= reconnected_at]
        self._republish(self._client, [*self._unsettled, *since])
        self._unsettled = []

    def _republish(self, client: mqtt.Client, entries: list[tuple[float, str, bytes]]) -> None:
        for _ts, topic, payload in entries:
            client.publish(topic, payload, qos=1)  # no one awaits these: paho resends them until acknowledged
        log.info("republished %d message(s) the broker acknowledged lately", len(entries))


def _has_unread(sock: Any) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False  # closed under us: the reader callback is being removed
    return bool(readable)
