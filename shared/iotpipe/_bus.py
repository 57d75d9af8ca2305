"""The bus every service uses: typed, sealed messages over one MQTT connection (iotpipe._mqtt).

Delivery (docs/contract.md):
- each message is opened (size, envelope, key, topic binding, replay window) and its payload
  decoded into the subscriber's model (iotpipe._models) before a handler sees it; a message that
  fails is counted by reason, logged rate-limited, dead-lettered and acknowledged, so bad input can
  neither reach a handler nor block a subscription (a QoS 1 duplicate is only counted);
- given `window_bounds`, each window of a raw or processed message dated outside them (this host's
  clock) is refused the same way, alone: the message's other windows go to the handler;
- a handler receives a batch and makes its effect durable before returning: the batch is then
  acknowledged (`manual_ack`) and recorded in the replay window;
- what a handler raises decides what happens to its messages (iotpipe._errors):
  RetryableError: a dependency is down; the batch stays unacknowledged and is retried with capped,
  jittered backoff (honouring the dependency's `retry_after`), said once when waiting starts and
  once when it ends; nothing is acknowledged, nothing lost, and ReceiveMaximum makes the broker
  hold the rest;
  PermanentError (SchemaError, BrokerRefused, a cloud 4xx...): it concerns one message; that
  message alone is dead-lettered and acknowledged, its batch-mates handled;
  anything else is a bug: the batch is retried `BUG_RETRIES` times, then each message alone, and a
  message that still fails is dead-lettered with the traceback's summary. One poison message never
  stops a subscription and never takes healthy messages with it.

Shared subscriptions (`share_group`): the members of a group leave it cleanly on a stop while
another member is live, and drain the session of a member gone for good (iotpipe._share), through
the same handlers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import orjson
import paho.mqtt.client as mqtt

from ._envelope import KeyRing, Opened, Opener, Sealer
from ._errors import ConfigError, DuplicateMessage, PermanentError, RetryableError, SchemaError
from ._health import Metrics, write_atomically
from ._logging import RateLimitedLog
from ._models import Payload, WindowBounds, decode
from ._mqtt import MqttConnection
from ._retry import Outage
from ._settings import MqttSettings, read_secret
from ._share import ADOPT_AFTER, LEAVE_TIMEOUT, ShareGroups

log = logging.getLogger(__name__)

# How long a handler batch may grow: draining what is already queued amortises per-call costs
# (one Redis pipeline, one HTTP batch) without adding latency when traffic is light.
DEFAULT_BATCH = 64
# How long a stopping service waits for the broker to acknowledge its last messages: short, since
# process managers (honcho, docker) SIGKILL after a few seconds, and the broker may be stopping too.
SHUTDOWN_DRAIN = 2.0
# A handler that raised something unforeseen gets this many more tries (with the batch, then with
# each message alone) before the message is dead-lettered: enough to ride out a transient glitch
# nobody classified, few enough that a poison message costs milliseconds.
BUG_RETRIES = 2
BUG_RETRY_DELAY = 0.05
# Cap on the backoff while a handler's dependency is down (a subscription may set its own).
DEFAULT_RETRY_MAX_DELAY = 30.0
# Dead-letter file: rotated once it reaches this size (one old generation kept), so a flood of bad
# messages cannot fill the disk; every message is counted whether or not its line survives.
DEAD_LETTER_MAX_BYTES = 64 << 20
# How often the replay window is saved (when it changed): what a crash can forget of it.
REPLAY_STATE_INTERVAL = 5.0
DEAD_LETTER_MAX_PAYLOAD = 64 << 10

T = TypeVar("T")
M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class PlainMessage(Generic[T]):
    """A message on a plain (unsealed) topic. With a model, `data` is the payload decoded as it;
    `None` for an empty payload (a cleared retained message) or when no model was given."""

    topic: str
    payload: bytes
    retain: bool
    data: T | None = None


SealedHandler = Callable[[Sequence[Opened[T]]], Awaitable[None]]
PlainHandler = Callable[[Sequence[PlainMessage[T]]], Awaitable[None]]


class DeadLetters:
    """Messages a service gave up on, one JSON line each: when, topic, reason, the error, the
    sender's src/boot/seq when known, and the payload as received (a sealed payload stays sealed:
    a dead-letter file never holds key material or decrypted data)."""

    def __init__(self, path: Path | None, metrics: Metrics, max_bytes: int = DEAD_LETTER_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.counter = metrics.counter("iotpipe_dead_lettered", "Messages dead-lettered, by reason", ("reason",))

    def write(self, reason: str, error: str, topic: str, payload: bytes | None = None, **extra: Any) -> None:
        self.counter.labels(reason).inc()
        if self.path is None:
            return
        line: dict[str, Any] = {
            "ts": time.time_ns() // 1_000_000,
            "reason": reason,
            "error": error[:500],
            "topic": topic,
        }
        line.update(extra)
        if payload is not None:
            line["bytes"] = len(payload)
            if len(payload) <= DEAD_LETTER_MAX_PAYLOAD:
                line["payload"] = payload.decode("utf-8", "replace")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            with self.path.open("ab") as fh:
                fh.write(orjson.dumps(line) + b"\n")
        except OSError as exc:
            log.error("cannot write dead letter to %s: %s", self.path, exc)


@dataclass
class _Subscription:
    filter: str  # what we SUBSCRIBE to (may be $share/...)
    match: str  # the topic filter deliveries match
    shared: bool  # a $share/... subscription
    handler: Callable[[Sequence[Any]], Awaitable[None]]
    model: Any
    sealed: bool
    batch: int
    linger: float
    outage: Outage
    queue: asyncio.Queue[mqtt.MQTTMessage] = field(default_factory=asyncio.Queue)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # clear while a batch is in the handler
    windowed: bool = False  # its model carries `windows`: their lag is observed once handled

    def __post_init__(self) -> None:
        self.idle.set()


class Bus:
    """Typed publish/subscribe for one service process (see the module docstring for the contract
    of acknowledgement and errors). Everything runs on the event loop that calls `start()`."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        keyring: KeyRing | None,
        src: str,
        *,
        status_topic: str | None = None,
        status_extra: dict[str, Any] | None = None,
        metrics: Metrics | None = None,
        message_ttl: int | None = 7 * 24 * 3600,
        max_payload_bytes: int = 1 << 20,
        username: str | None = None,
        password_file: Path | None = None,
        dead_letter_file: Path | None = None,
        replay_state_file: Path | None = None,
        status_liveness: float | None = None,
        window_bounds: WindowBounds | None = None,
    ) -> None:
        """`status_liveness`: s after which another member's `online` status, not refreshed by a
        heartbeat, is no longer believed (a member that died while the broker was down leaves an
        `online` no Will replaces); None believes it until it changes. `window_bounds`: how far
        from this host's clock a window received may lie (None: any time; tools and tests)."""
        self.settings = settings
        self.client_id = client_id
        self.status_topic = status_topic
        self.status_extra = dict(status_extra or {})
        self.metrics = metrics or Metrics()
        self.sealer = Sealer(keyring, src) if keyring else None
        self.opener = Opener(keyring, ttl=message_ttl, max_bytes=max_payload_bytes) if keyring else None
        self.max_payload_bytes = max_payload_bytes
        self.dead_letters = DeadLetters(dead_letter_file, self.metrics)
        self.replay_state_file = replay_state_file
        self._saved_changes = 0
        self._subs: list[_Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._rejects = RateLimitedLog(log)
        self.status_liveness = status_liveness
        self.window_bounds = window_bounds
        self.groups: ShareGroups | None = None  # at start(), given a shared subscription and a status topic
        self._adopt_after = ADOPT_AFTER
        self._left: bool | None = None  # whether we left our share groups (None: not tried yet)
        self._closing = False  # set once stopping: consumers take no new batch
        self._adopted: dict[int, tuple[mqtt.MQTTMessage, MqttConnection]] = {}  # id(msg) -> the session it came in
        self._user = settings.username or username
        password_path = settings.password_file or password_file
        self._password = read_secret(password_path, "MQTT password") if self._user and password_path else None
        self.connection = MqttConnection(
            settings,
            client_id,
            username=self._user,
            password=self._password,
            will=(lambda: (status_topic, self._status_payload("offline"))) if status_topic else None,
            birth=(lambda: (status_topic, self._status_payload("online"))) if status_topic else None,
        )
        self.connected = self.connection.connected
        self.subscribed = self.connection.subscribed
        queues = self.metrics.queues
        queues.add("publish_in_flight", lambda: self.connection.in_flight)
        queues.add("deliveries_unacked", lambda: self.connection.unacked)

    # -- subscribing ----------------------------------------------------------------------------
    @overload
    def subscribe(
        self,
        topic_filter: str,
        handler: SealedHandler[M],
        *,
        model: Any,
        share_group: str | None = ...,
        adopt_after: float = ...,
        batch: int = ...,
        linger: float = ...,
        retry_max_delay: float = ...,
    ) -> None: ...

    @overload
    def subscribe(
        self,
        topic_filter: str,
        handler: PlainHandler[M],
        *,
        model: type[M] | None = ...,
        sealed: bool,
        share_group: str | None = ...,
        adopt_after: float = ...,
        batch: int = ...,
        linger: float = ...,
        retry_max_delay: float = ...,
    ) -> None: ...

    def subscribe(
        self,
        topic_filter: str,
        handler: Any,
        *,
        model: Any = None,
        sealed: bool = True,
        share_group: str | None = None,
        adopt_after: float = ADOPT_AFTER,
        batch: int = DEFAULT_BATCH,
        linger: float = 0.0,
        retry_max_delay: float = DEFAULT_RETRY_MAX_DELAY,
    ) -> None:
        """Register a handler before `start()`. Sealed subscriptions (the default) hand the handler
        `Opened[model]` messages, `model` one of iotpipe._models; `sealed=False` hands it
        `PlainMessage`s, their payload decoded as `model` if one is given. A batch takes what is
        already queued, up to `batch`; `linger` waits up to that many seconds for it to fill
        (worth it for HTTP uploads, pointless for Redis). `retry_max_delay` caps the backoff while
        the handler reports a dependency down (RetryableError).

        `share_group`: subscribe as a member of `$share/<share_group>/<topic_filter>`; with a status
        topic, this member leaves the group cleanly when it stops while another member is live, and
        drains (through `handler`) the session of a member whose status has said `offline` for
        `adopt_after` s (iotpipe._share)."""
        if sealed and self.opener is None:
            raise ConfigError("a sealed subscription needs a key ring")
        if sealed and model is None:
            model = Any  # any strict JSON value: for tools and tests; services always name a model
        wire = f"$share/{share_group}/{topic_filter}" if share_group else topic_filter
        outage = Outage(retry_max_delay, log, on_retry=self.metrics.errors.labels("retry").inc)
        sub = _Subscription(wire, topic_filter, bool(share_group), handler, model, sealed, batch, linger, outage)
        sub.windowed = sealed and "windows" in getattr(model, "__struct_fields__", ())
        self._subs.append(sub)
        self.metrics.queues.add(f"inbound:{topic_filter}", sub.queue.qsize)
        self.connection.subscribe(wire, topic_filter, sub.queue.put_nowait)
        if share_group:  # one grace for the process: the shortest asked for
            self._adopt_after = adopt_after if len(self._shared()) == 1 else min(self._adopt_after, adopt_after)

    async def start(self) -> None:
        """Connect (retrying in the background until the broker answers) and start the consumers."""
        self._load_replay_window()
        for sub in self._subs:
            self._tasks.append(asyncio.create_task(self._consume(sub), name=f"consume {sub.match}"))
        if self.opener is not None and self.replay_state_file is not None and self._subs:
            self._tasks.append(asyncio.create_task(self._keep_replay_window(), name="replay window"))
        if self._shared() and self.status_topic and self.groups is None:
            self.groups = ShareGroups(
                self.connection,
                status_topic=self.status_topic,
                shared=self._shared(),
                adopt_after=self._adopt_after,
                liveness=self.status_liveness,
                publish_status=self.publish_status,
                open_session=self._open_session,
                drain_timeout=SHUTDOWN_DRAIN,
            )
            # Every member's retained status, ours included (the echo that tells leaving is announced).
            self.connection.subscribe(self.groups.status_filter, self.groups.status_filter, self.groups.on_status)
        await self.connection.start()

    def use_keyring(self, keyring: KeyRing) -> None:
        """From the next message on, seal with `keyring`'s first key and open with any of its keys
        (a step of a key rotation, iotpipe._keys)."""
        if self.sealer is not None:
            self.sealer.keyring = keyring
        if self.opener is not None:
            self.opener.keyring = keyring

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self.connection.wait_connected(timeout)

    def waiting_on(self) -> set[str]:
        """Dependencies some subscription is holding a batch for right now (e.g. {"redis"})."""
        return {sub.outage.waiting_on for sub in self._subs if sub.outage.waiting_on}

    async def leave_groups(self, timeout: float = LEAVE_TIMEOUT) -> bool:
        """The first step of a clean stop, while handlers still work: leave our share groups if
        another member is live (what the broker had queued for us handled here), else keep our
        session. Once; `stop()` does it if the service did not."""
        if self._left is None:
            self._left = await self.groups.leave(timeout) if self.groups is not None else False
        return self._left

    async def finish_consuming(self, timeout: float = SHUTDOWN_DRAIN) -> None:
        """Take no new batch, let the batches already in a handler finish (bounded by `timeout`), and
        stop the consumers: what a restart would otherwise handle twice is acknowledged now. Call
        it while the component can still handle (before its `close()`); `stop()` does it too."""
        self._closing = True
        busy = [sub.idle.wait() for sub in self._subs if not sub.idle.is_set()]
        if busy:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*busy)
            except TimeoutError:
                log.warning("a handler batch was still running after %.0fs: it will be redelivered", timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self, drain_timeout: float = SHUTDOWN_DRAIN) -> None:
        """Clean shutdown: say `offline` ourselves (the Will only fires on an unclean loss); having
        left our share groups, clear our status and have the broker discard our session instead."""
        left = await self.leave_groups()
        await self.finish_consuming(drain_timeout)
        self._save_replay_window()
        if left and self.status_topic and self.connection.connected.is_set():
            try:
                async with asyncio.timeout(drain_timeout):
                    await self.publish(self.status_topic, b"", retain=True, kind="status")
            except (TimeoutError, RetryableError, PermanentError) as exc:
                log.warning("could not clear our status (%s): keeping our session, saying offline", exc)
            else:
                # Nothing of ours is left at the broker: no status, no session, no Will.
                await self.connection.stop(will=False, timeout=drain_timeout, session_expiry=0)
                return
        said_offline = not self.status_topic
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
        await self.connection.stop(will=not said_offline, timeout=drain_timeout)

    # -- the replay window, across restarts ---------------------------------------------------
    def _load_replay_window(self) -> None:
        path = self.replay_state_file
        if self.opener is None or path is None or not path.exists():
            return
        try:
            self.opener.guard.load(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("replay window in %s unreadable (%s); starting with an empty one", path, exc)
            return
        self._saved_changes = self.opener.guard.changes
        log.info("replay window restored from %s", path)

    def _save_replay_window(self) -> None:
        """Persist which (src, boot, seq) were handled, so a message captured and re-published after
        a restart is still dropped. Only handled messages are in it, so a save at any moment is safe:
        a crash loses at most the last interval's records, whose redelivery sinks absorb."""
        path = self.replay_state_file
        if self.opener is None or path is None or self.opener.guard.changes == self._saved_changes:
            return
        self._saved_changes = self.opener.guard.changes
        try:
            write_atomically(path, self.opener.guard.dump())
        except OSError as exc:
            log.error("cannot save the replay window to %s: %s", path, exc)

    async def _keep_replay_window(self) -> None:
        while True:
            await asyncio.sleep(REPLAY_STATE_INTERVAL)
            self._save_replay_window()

    # -- publishing -----------------------------------------------------------------------------
    async def publish_sealed(self, topic: str, data: Any, *, kind: str = "sealed", expiry: int | None = None) -> None:
        """Seal `data` (a model of iotpipe._models) for `topic` and publish it."""
        if self.sealer is None:
            raise ConfigError("publishing sealed messages needs a key ring")
        await self.publish(topic, self.sealer.seal(topic, data), kind=kind, expiry=expiry)

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, kind: str = "plain", expiry: int | None = None
    ) -> None:
        """QoS 1, returning once the broker acknowledged it; BrokerRefused if the broker said no.
        A payload over the size every receiver accepts is refused here, as a PermanentError: sent,
        it would be refused by each receiver, or make the broker drop our connection over and over.
        `expiry` (s): the broker discards the message once it has waited that long for a subscriber
        (iotpipe._mqtt.MqttConnection.publish); such a message is not replayed after a reconnect."""
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLarge(f"{len(payload)} bytes for {topic} exceeds the {self.max_payload_bytes}-byte limit")
        await self.connection.publish(topic, payload, retain=retain, expiry=expiry)
        self.metrics.published.labels(kind).inc()

    async def publish_status(self, state: str, **extra: Any) -> None:
        if self.status_topic:
            await self.publish(self.status_topic, self._status_payload(state, **extra), retain=True, kind="status")

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        shared = self._shared()
        return orjson.dumps(
            {
                "state": state,
                "client_id": self.client_id,
                "ts": time.time_ns() // 1_000_000,
                **self.status_extra,
                **({"shared": shared} if shared else {}),
                **extra,
            }
        )

    def _shared(self) -> list[str]:
        """Our shared subscriptions' filters, as subscribed (`$share/<group>/<filter>`)."""
        return [sub.filter for sub in self._subs if sub.shared]

    # -- another member's session, adopted (iotpipe._share) ------------------------------------
    def _open_session(self, client_id: str, shared: frozenset[str]) -> MqttConnection:
        """A connection resuming `client_id`'s session (not kept up, no Will, no birth) whose
        messages under `shared` go to our subscriptions' handlers and are acknowledged on it."""
        conn = MqttConnection(self.settings, client_id, username=self._user, password=self._password, reconnect=False)
        for sub in self._subs:
            if sub.filter in shared:
                conn.deliver(sub.match, self._deliver_adopted(sub, conn))
        return conn

    def _deliver_adopted(self, sub: _Subscription, conn: MqttConnection) -> Callable[[mqtt.MQTTMessage], None]:
        def deliver(msg: mqtt.MQTTMessage) -> None:
            self._adopted[id(msg)] = (msg, conn)
            sub.queue.put_nowait(msg)

        return deliver

    def _from_ended_adoption(self, msg: mqtt.MQTTMessage) -> bool:
        """Came in an adopted session whose connection has ended (taken over, given up): not ours
        to handle any more; the broker delivers it again to whoever resumes that session."""
        adopted = self._adopted.get(id(msg))
        if adopted is None or adopted[1].connected.is_set():
            return False
        del self._adopted[id(msg)]
        return True

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        """On the connection the message came in (an adopted session's, or ours)."""
        adopted = self._adopted.pop(id(msg), None) if self._adopted else None
        (adopted[1] if adopted is not None else self.connection).ack(msg)

    # -- consuming ------------------------------------------------------------------------------
    async def _consume(self, sub: _Subscription) -> None:
        while not self._closing:
            batch = await self._collect(sub)
            items = self._accept(sub, batch)
            if items:
                sub.idle.clear()
                try:
                    await self._handle(sub, items)
                finally:
                    sub.idle.set()

    async def _collect(self, sub: _Subscription) -> list[mqtt.MQTTMessage]:
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
        return batch

    def _accept(self, sub: _Subscription, batch: list[mqtt.MQTTMessage]) -> list[tuple[mqtt.MQTTMessage, Any]]:
        """Open and validate each message; reject (count, log, dead-letter, ack) the rest."""
        accepted: list[tuple[mqtt.MQTTMessage, Any]] = []
        # The replay window records a message only once its batch is handled, so a duplicate
        # within this same batch (a QoS 1 resend right behind the original) is caught here.
        in_batch: set[tuple[str, str, int]] = set()
        now_ms = time.time_ns() // 1_000_000
        for msg in batch:
            if self._adopted and self._from_ended_adoption(msg):
                continue
            try:
                item = self._open(sub, msg)
                if isinstance(item, Opened):
                    key = (item.src, item.boot, item.seq)
                    if key in in_batch:
                        raise DuplicateMessage(f"seq {item.seq} of {item.src} twice in one batch")
                    in_batch.add(key)
            except DuplicateMessage:
                self.metrics.rejected.labels(DuplicateMessage.reason).inc()  # QoS 1 redelivery: quiet
                self._ack(msg)
                continue
            except SchemaError as exc:
                self._reject(msg, exc.reason, str(exc), exc.sender or {})
                continue
            except PermanentError as exc:
                self._reject(msg, exc.reason, str(exc))
                continue
            except Exception as exc:  # input we did not foresee must still not kill the consumer
                self._reject(msg, "malformed", f"unexpected {type(exc).__name__}: {exc}")
                continue
            bounds = self.window_bounds
            if bounds is not None and isinstance(item, Opened) and isinstance(item.data, Payload):
                data, refused = item.data.within(bounds, now_ms)
                if refused:
                    self._refuse_windows(msg, item, refused, bounds, now_ms)
                    if data is None:  # nothing left to handle
                        self._ack(msg)
                        continue
                    item = dataclasses.replace(item, data=data)
            accepted.append((msg, item))
        return accepted

    def _refuse_windows(
        self,
        msg: mqtt.MQTTMessage,
        item: Opened[Any],
        refused: list[tuple[int, str]],
        bounds: WindowBounds,
        now_ms: int,
    ) -> None:
        """Windows dated outside `bounds`: counted per window by reason, logged rate-limited, and
        dead-lettered as one line per reason naming their indexes in the message (the payload as
        it arrived, still sealed). The caller hands the message's other windows on."""
        windows = item.data.windows
        by_reason: dict[str, list[int]] = {}
        for index, reason in refused:
            by_reason.setdefault(reason, []).append(index)
        sender = {"src": item.src, "boot": item.boot, "seq": item.seq}
        for reason, indexes in by_reason.items():
            first = windows[indexes[0]]
            error = (
                f"{len(indexes)} of {len(windows)} window(s) refused; window {indexes[0]} (device {first.device}) "
                f"{bounds.explain(first, now_ms)}"
            )
            self.metrics.rejected.labels(reason).inc(len(indexes))
            self._rejects.warning(reason, "refused windows on %s (%s): %s", msg.topic, reason, error)
            self.dead_letters.write(reason, error, msg.topic, bytes(msg.payload), windows=indexes, **sender)

    def _open(self, sub: _Subscription, msg: mqtt.MQTTMessage) -> Opened[Any] | PlainMessage[Any]:
        payload = bytes(msg.payload)  # already bytes: no copy
        if not sub.sealed:
            data = decode(payload, sub.model) if sub.model is not None and payload else None
            return PlainMessage(msg.topic, payload, bool(msg.retain), data)
        assert self.opener is not None
        return self.opener.open(msg.topic, payload, sub.model)

    def _reject(self, msg: mqtt.MQTTMessage, reason: str, error: str, sender: dict[str, object] | None = None) -> None:
        """A message we give up on: counted, logged rate-limited, dead-lettered, acknowledged."""
        self.metrics.rejected.labels(reason).inc()
        self._rejects.warning(reason, "rejected message on %s (%s): %s", msg.topic, reason, error)
        self.dead_letters.write(reason, error, msg.topic, bytes(msg.payload), **(sender or {}))
        self._ack(msg)

    def _done(self, sub: _Subscription, items: Sequence[tuple[mqtt.MQTTMessage, Any]]) -> None:
        for msg, item in items:
            if isinstance(item, Opened) and self.opener is not None:
                self.opener.commit(item)
            self._ack(msg)
        self.metrics.received.labels("sealed" if sub.sealed else "plain").inc(len(items))
        if sub.windowed:
            now_ms = time.time_ns() // 1_000_000
            self.metrics.lag.observe("handled", now_ms, (w.span[1] for _msg, item in items for w in item.data.windows))

    async def _handle(self, sub: _Subscription, items: Sequence[tuple[mqtt.MQTTMessage, Any]]) -> None:
        """Run the handler until every message in `items` is handled or dead-lettered."""
        failure = await self._call(sub, items)
        for attempt in range(BUG_RETRIES):
            if failure is None or isinstance(failure, PermanentError):
                break
            self.metrics.errors.labels("handler").inc()
            await asyncio.sleep(BUG_RETRY_DELAY * 2**attempt)
            failure = await self._call(sub, items)
        if failure is None:
            self._done(sub, items)
        elif len(items) == 1:
            msg, item = items[0]
            sender = {"src": item.src, "boot": item.boot, "seq": item.seq} if isinstance(item, Opened) else None
            if isinstance(failure, PermanentError):
                self._reject(msg, failure.reason, str(failure), sender)
            else:
                log.error("handler for %s keeps failing on one message from %s", sub.match, msg.topic, exc_info=failure)
                self._reject(msg, "handler_error", _summary(failure), sender)
        else:
            # Find the message(s) at fault: each alone, so the healthy ones are handled.
            for one in items:
                await self._handle(sub, [one])

    async def _call(self, sub: _Subscription, items: Sequence[tuple[mqtt.MQTTMessage, Any]]) -> Exception | None:
        """Call the handler, holding the batch through RetryableErrors; the error it ended with."""
        try:
            await sub.outage.run(lambda: sub.handler([item for _msg, item in items]), f"{len(items)} message(s)")
        except asyncio.CancelledError:
            raise  # unacknowledged: redelivered to our next session
        except Exception as exc:
            return exc
        return None


class PayloadTooLarge(PermanentError):
    reason = "too_large"


def _summary(exc: BaseException) -> str:
    """`ValueError: bad thing at service.py:42 in handle`: enough to find the bug, no locals."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{where}"
