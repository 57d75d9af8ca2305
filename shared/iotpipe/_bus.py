"""The MQTT bus client every service uses: paho-mqtt 2.x under asyncio, MQTT v5, QoS 1.

Delivery (see docs/contract.md and ../notes on paho/mosquitto defaults):
- durable session: `clean_start=False`, a session expiry, a stable client id (service-instance),
  so the broker queues for us while we are down;
- `manual_ack=True`: a message is acknowledged only after its handler returned, i.e. after its
  effect is durable; `ReceiveMaximum` caps unacked deliveries, which is also our backpressure;
- our publishes resolve when the broker's PUBACK arrives, and at most `max_inflight` are
  outstanding, so nothing piles up unbounded in paho's memory;
- Last Will: retained `offline` on our status topic; birth: retained `online` on every connect.

Bad input never reaches a handler: each message is opened (size, envelope, key, topic binding,
replay window) first; a rejection is counted by reason, logged rate-limited with its topic, and
acknowledged so it can never block the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ._envelope import KeyRing, Opened, Opener, Sealer
from ._errors import ConfigError, DuplicateMessage, EnvelopeError, PermanentError, RetryableError
from ._health import Metrics
from ._logging import RateLimitedLog
from ._settings import MqttSettings, read_secret

log = logging.getLogger(__name__)

# How long a handler batch may grow: draining what is already queued amortises per-call costs
# (one Redis pipeline, one HTTP batch) without adding latency when traffic is light.
DEFAULT_BATCH = 64
# How long a stopping service waits for the broker to acknowledge its last messages: short, since
# process managers (honcho, docker) SIGKILL after a few seconds, and the broker may be stopping too.
SHUTDOWN_DRAIN = 2.0


@dataclass(frozen=True, slots=True)
class PlainMessage:
    topic: str
    payload: bytes
    retain: bool


SealedHandler = Callable[[Sequence[Opened]], Awaitable[None]]
PlainHandler = Callable[[Sequence[PlainMessage]], Awaitable[None]]


@dataclass
class _Subscription:
    filter: str  # what we SUBSCRIBE to (may be $share/...)
    match: str  # the topic filter deliveries match
    handler: Callable[[Sequence[Any]], Awaitable[None]]
    sealed: bool
    batch: int
    linger: float
    queue: asyncio.Queue[mqtt.MQTTMessage] | None = None


class Bus:
    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        keyring: KeyRing | None,
        src: str,
        *,
        status_topic: str | None = None,
        metrics: Metrics | None = None,
        message_ttl: int | None = 7 * 24 * 3600,
        max_payload_bytes: int = 1 << 20,
        username: str | None = None,
        password_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.status_topic = status_topic
        self.metrics = metrics or Metrics()
        self.sealer = Sealer(keyring, src) if keyring else None
        self.opener = Opener(keyring, ttl=message_ttl, max_bytes=max_payload_bytes) if keyring else None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()  # set once the broker acknowledged our subscriptions
        self.status_extra: dict[str, Any] = {}
        self._username = settings.username or username
        self._password_file = settings.password_file or password_file
        self._subs: list[_Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: asyncio.Semaphore | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early: dict[int, int] = {}  # mid -> reason code, for PUBACKs that beat registration
        self._untracked: set[int] = set()  # mids of publishes nobody awaits (the birth message)
        self._refused_logged = False
        self._lock = threading.Lock()
        self._rejects = RateLimitedLog(log)
        self._was_connected = False
        self._stopping = False
        self._client = self._make_client()

    # -- setup ----------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if self._username:
            password = read_secret(self._password_file, "MQTT password") if self._password_file else None
            client.username_pw_set(self._username, password)
        if s.tls:
            if s.ca_file is None:
                raise ConfigError("IOTPIPE_MQTT__CA_FILE is required when IOTPIPE_MQTT__TLS is true")
            context = ssl.create_default_context(cafile=str(s.ca_file))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            client.tls_set_context(context)
        if self.status_topic:
            client.will_set(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
        client.max_inflight_messages_set(s.max_inflight)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def subscribe(
        self,
        topic_filter: str,
        handler: SealedHandler | PlainHandler,
        *,
        sealed: bool = True,
        share_group: str | None = None,
        batch: int = DEFAULT_BATCH,
        linger: float = 0.0,
    ) -> None:
        """Register a handler before `start()`. It receives a batch of verified messages and must
        make their effect durable before returning: the batch is acknowledged when it returns.
        A batch takes what is already queued, up to `batch`; `linger` waits up to that many seconds
        for it to fill (worth it for HTTP uploads, pointless for Redis)."""
        if sealed and self.opener is None:
            raise ConfigError("a sealed subscription needs a key ring")
        wire = f"$share/{share_group}/{topic_filter}" if share_group else topic_filter
        sub = _Subscription(wire, topic_filter, handler, sealed, batch, linger)
        self._subs.append(sub)
        self._client.message_callback_add(topic_filter, lambda _c, _u, msg, sub=sub: self._deliver(sub, msg))

    async def start(self) -> None:
        """Connect (retrying in the background until the broker answers) and start the consumers."""
        self._loop = asyncio.get_running_loop()
        self._inflight = asyncio.Semaphore(self.settings.max_inflight)
        for sub in self._subs:
            sub.queue = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._consume(sub), name=f"consume {sub.match}"))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        props.ReceiveMaximum = self.settings.receive_maximum
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout or self.settings.connect_timeout):
                await self.connected.wait()
        except TimeoutError as exc:
            raise RetryableError(
                f"no MQTT connection to {self.settings.host}:{self.settings.port} "
                f"within {timeout or self.settings.connect_timeout}s"
            ) from exc

    async def stop(self, drain_timeout: float = SHUTDOWN_DRAIN) -> None:
        """Clean shutdown: say `offline` ourselves (the Will only fires on an unclean loss)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopping = True
        said_offline = False
        if self.status_topic and self.connected.is_set():
            try:
                async with asyncio.timeout(drain_timeout):
                    await self.publish_status("offline")
                said_offline = True
            except TimeoutError:
                log.warning(
                    "offline status not acknowledged within %.0fs (broker stopping?); "
                    "asking the broker for our Last Will instead",
                    drain_timeout,
                )
            except (RetryableError, PermanentError) as exc:
                log.warning("could not publish offline status: %s", exc)
        # A normal DISCONNECT discards the Will; if our own `offline` did not make it, ask for the Will.
        reason = (
            None
            if said_offline or not self.status_topic
            else ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        self._client.disconnect(reasoncode=reason)
        await asyncio.to_thread(self._client.loop_stop)

    # -- publishing -----------------------------------------------------------------------------
    async def publish_sealed(self, topic: str, data: Any, *, kind: str = "sealed") -> None:
        if self.sealer is None:
            raise ConfigError("publishing sealed messages needs a key ring")
        await self.publish(topic, self.sealer.seal(topic, data), kind=kind)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, kind: str = "plain") -> None:
        """Publish at QoS 1 and return once the broker acknowledged it (after a reconnect if need be:
        paho keeps and resends unacknowledged QoS 1 messages of a durable session)."""
        assert self._loop is not None and self._inflight is not None, "start() first"
        async with self._inflight:
            future: asyncio.Future[None] = self._loop.create_future()
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise RetryableError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            with self._lock:
                early = self._early.pop(info.mid, None)
                if early is None:
                    self._pending[info.mid] = future
            if early is not None:
                self._resolve(future, early, topic)
            else:
                try:
                    await future
                finally:
                    with self._lock:
                        self._pending.pop(info.mid, None)
        self.metrics.published.labels(kind).inc()

    async def publish_status(self, state: str, **extra: Any) -> None:
        if self.status_topic:
            await self.publish(self.status_topic, self._status_payload(state, **extra), retain=True, kind="status")

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        return orjson.dumps(
            {
                "state": state,
                "client_id": self.client_id,
                "ts": time.time_ns() // 1_000_000,
                **self.status_extra,
                **extra,
            }
        )

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        code = getattr(reason, "value", reason)
        with self._lock:
            if mid in self._untracked:
                # Nobody awaits it; and an entry left in _early would wrongly resolve a later publish
                # that reuses this packet id.
                self._untracked.discard(mid)
                return
            future = self._pending.get(mid)
            if future is None:
                self._early[mid] = code
                return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, future, code, "")

    @staticmethod
    def _resolve(future: asyncio.Future[None], code: int, topic: str) -> None:
        if future.done():
            return
        if code >= 0x80:  # e.g. 0x87 not authorised: the ACL refused our publish
            future.set_exception(PermanentError(f"broker refused publish {topic} (reason code {code:#x})"))
        else:
            future.set_result(None)

    # -- connection events (paho's thread) ------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            # Bad credentials or a refused client id: paho retries; say it once per outage.
            if self._was_connected or not self._refused_logged:
                log.error("broker refused connection: %s", reason)
                self._refused_logged = True
            return
        self._refused_logged = False
        log.info("connected to %s:%s as %s", self.settings.host, self.settings.port, self.client_id)
        self._was_connected = True
        if self._subs:
            # Re-subscribe every time: the broker may have lost our session (expiry, restart).
            client.subscribe([(s.filter, SubscribeOptions(qos=1)) for s in self._subs])
        if self.status_topic:
            # Birth message. Its PUBACK is handled on this same (paho) thread, after we return, so
            # recording the mid here cannot race with it.
            info = client.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)
            with self._lock:
                self._untracked.add(info.mid)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.connected.set)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("broker refused a subscription: %s", reason)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.connected.clear)
            self._loop.call_soon_threadsafe(self.subscribed.clear)
        if self._was_connected and not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting", reason)

    def _deliver(self, sub: _Subscription, msg: mqtt.MQTTMessage) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or sub.queue is None:
            return  # shutting down: unacked, so the broker redelivers to our next session
        loop.call_soon_threadsafe(sub.queue.put_nowait, msg)

    # -- consuming ------------------------------------------------------------------------------
    async def _consume(self, sub: _Subscription) -> None:
        assert sub.queue is not None
        while True:
            batch = [await sub.queue.get()]
            deadline = asyncio.get_running_loop().time() + sub.linger
            while len(batch) < sub.batch:
                if not sub.queue.empty():
                    batch.append(sub.queue.get_nowait())
                    continue
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await sub.queue.get())
                except TimeoutError:
                    break
            accepted: list[Any] = []
            ack_now: list[mqtt.MQTTMessage] = []
            # The replay window records a message only once its batch is handled, so a duplicate
            # within this same batch (a QoS 1 resend right behind the original) is caught here.
            in_batch: set[tuple[str, str, int]] = set()
            for msg in batch:
                item = self._open(sub, msg)
                if isinstance(item, Opened):
                    key = (item.src, item.boot, item.seq)
                    if key in in_batch:
                        self.metrics.rejected.labels(DuplicateMessage.reason).inc()
                        item = None
                    in_batch.add(key)
                if item is None:
                    ack_now.append(msg)
                else:
                    accepted.append((msg, item))
            for msg in ack_now:
                self._ack(msg)
            if not accepted:
                continue
            try:
                await sub.handler([item for _msg, item in accepted])
            except asyncio.CancelledError:
                raise  # unacked: redelivered to our next session
            except Exception:
                # A bug or an unexpected input in the handler: say so loudly with the topics, count
                # it, and move on; holding the messages would stall the whole subscription.
                topics = sorted({m.topic for m, _ in accepted})
                log.exception("handler for %s failed on %d message(s) from %s", sub.match, len(accepted), topics[:5])
                self.metrics.errors.labels("handler").inc(len(accepted))
            for msg, item in accepted:
                if sub.sealed and self.opener is not None:
                    self.opener.commit(item)
                self._ack(msg)
            self.metrics.received.labels("sealed" if sub.sealed else "plain").inc(len(accepted))

    def _open(self, sub: _Subscription, msg: mqtt.MQTTMessage) -> Opened | PlainMessage | None:
        if not sub.sealed:
            return PlainMessage(msg.topic, msg.payload, bool(msg.retain))
        assert self.opener is not None
        try:
            return self.opener.open(msg.topic, msg.payload)
        except DuplicateMessage:
            self.metrics.rejected.labels(DuplicateMessage.reason).inc()  # QoS 1 redelivery: quiet
        except EnvelopeError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self._rejects.warning(exc.reason, "rejected message on %s (%s): %s", msg.topic, exc.reason, exc)
        except Exception as exc:  # input we did not foresee must still not kill the consumer
            self.metrics.rejected.labels("malformed").inc()
            self._rejects.warning(
                "unexpected", "rejected message on %s (unexpected %s): %s", msg.topic, type(exc).__name__, exc
            )
        return None

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)
