"""Shared subscriptions (`$share/<group>/...`) whose members may go away for good.

mosquitto 2.0 deals a group's messages round-robin to every member with a session, connected or
not (measured on 2.0.11: with two of three members disconnected, the one online got 10 of 30), so a
member removed for good (scale-down) or recreated under a new id (a new container, a new host name)
strands what was dealt to it for as long as its session lives (7 days). The members of a group
therefore watch each other's retained service statuses (`<base>/v2/status/service/<service>/+`, on
the connection they already have), and:

- Leave on a clean stop when another member is live: announce it (status `online` with `"leaving"`),
  and once that announcement came back through the broker, look at the others. The broker orders
  everything on those topics, so of members leaving at the same time the last one sees all the
  others leaving: it stays. A member that leaves UNSUBSCRIBEs the group's filters, handles what the
  broker had queued for it (MqttConnection.hand_over), clears its retained status and disconnects
  with SessionExpiryInterval=0, so nothing outlives it. The last member keeps its durable session
  (what arrives queues for it while it restarts) and says `offline` as before.
- Adopt the session of a member whose status says `offline` (a clean stop as the last member, or
  its Will) for `adopt_after` s: open a second connection under its client id (clean_start=False:
  the broker resumes its session), hand it over as above into this member's own handlers, then
  discard the session and clear its status. A member killed for good is thus drained after the
  grace period instead of holding its share for 7 days. When several members are live, the one
  with the lowest client id goes first and each other one ADOPT_STAGGER s later, as a backup. Two
  adopters, or the owner coming back mid-adoption, take the client id from each other (the broker
  ends the older connection): what the loser had not acknowledged is delivered again to the winner
  (duplicates, which the sinks absorb; never a loss), and the loser logs it and stops.

What a member's status says about it (`"shared"`: its shared filters, in every status it
publishes, Will included) decides what it is a member of; a status without it (published before
this existed) is taken as a member of the same groups as ours, being the same service.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from ._errors import IotpipeError
from ._mqtt import MqttConnection

log = logging.getLogger("iotpipe.bus")

# How long a live member lets another member's session sit `offline` before draining it: longer
# than a restart under the same id normally takes (that member then resumes its own session).
ADOPT_AFTER = 30.0
# Each further live member (by client id) waits this much longer: normally one member adopts, the
# others only back it up if it could not.
ADOPT_STAGGER = 10.0
# An adoption that neither receives nor finishes handling anything for this long is abandoned (its
# session kept, for another attempt ADOPT_AFTER s later): a handler held up, or a broker gone quiet.
ADOPT_STALL = 30.0
# What a stopping member may spend leaving its groups (announcing it, then handling what the broker
# had queued for it): within the 5 s supervisord and the 10 s compose give a stopping service before
# SIGKILL, with SHUTDOWN_DRAIN after it. Past it the member keeps its session, drained later by
# adoption.
LEAVE_TIMEOUT = 3.0
# Retained status topic suffix a hand-over's marker goes to (one level below the status itself, so
# no reader of `<service>/+` statuses sees it; within every service's ACL of its own statuses).
MARKER_SUFFIX = "drain"


@dataclass(frozen=True, slots=True)
class Member:
    """Another member, as its retained status last described it."""

    client_id: str
    state: str
    leaving: bool
    shared: frozenset[str] | None  # its shared filters; None: a status from before they were listed
    ts: int  # when it published the status, unix ms (its clock)


OpenSession = Callable[[str, frozenset[str]], MqttConnection]


class ShareGroups:
    """The member side of this process's shared subscriptions (see the module docstring)."""

    def __init__(
        self,
        connection: MqttConnection,
        *,
        status_topic: str,
        shared: Iterable[str],
        adopt_after: float,
        liveness: float | None,
        publish_status: Callable[..., Awaitable[None]],
        open_session: OpenSession,
        drain_timeout: float,
    ) -> None:
        self.connection = connection
        self.status_topic = status_topic
        self.shared = frozenset(shared)
        self.adopt_after = adopt_after
        self.liveness = liveness  # s after which an `online` status without a heartbeat is not believed
        self.status_filter = status_topic.rsplit("/", 1)[0] + "/+"
        self._publish_status = publish_status
        self._open_session = open_session
        self._drain_timeout = drain_timeout
        self._members: dict[str, Member] = {}  # status topic -> member
        self._offline_since: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._adoptions: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one adoption at a time
        self._echo: tuple[str, asyncio.Event] | None = None
        self._live_at_echo: list[str] = []
        self._stopping = False
        self.adopted = 0  # sessions drained and discarded

    # -- what the members say -------------------------------------------------------------------
    def on_status(self, message: mqtt.MQTTMessage) -> None:
        """A retained status of a member (or ours); acknowledged at once: it is state, not work."""
        self.connection.ack(message)
        topic, payload = message.topic, bytes(message.payload)
        if topic == self.status_topic:
            if self._echo is not None and payload:
                nonce, echoed = self._echo
                if _field(payload, "leaving") == nonce and not echoed.is_set():
                    # Who is live as of our announcement, taken now: statuses read in the same
                    # batch after it were published after it, and must not count.
                    self._live_at_echo = self.live_members()
                    echoed.set()
            return
        member = _parse(payload)
        if member is None:  # cleared (or not a status): gone
            self._members.pop(topic, None)
            self._offline_since.pop(topic, None)
        else:
            self._members[topic] = member
            if member.state != "offline":
                self._offline_since.pop(topic, None)
            else:
                self._offline_since.setdefault(topic, time.monotonic())
        self._consider(topic)

    def _same_groups(self, member: Member) -> bool:
        return member.shared is None or (bool(member.shared) and member.shared <= self.shared)

    def _live(self, member: Member) -> bool:
        if member.state != "online" or member.leaving or not self._same_groups(member):
            return False
        return self.liveness is None or time.time() * 1000 - member.ts <= self.liveness * 1000

    def live_members(self) -> list[str]:
        """Client ids of the other members that are live, as their statuses say."""
        return sorted(m.client_id for m in self._members.values() if self._live(m))

    # -- adopting the session of a member gone for good ----------------------------------------
    def _consider(self, topic: str) -> None:
        member = self._members.get(topic)
        if member is None or member.state != "offline" or not self._same_groups(member) or self._stopping:
            timer = self._timers.pop(topic, None)
            if timer is not None:
                timer.cancel()
            return
        if topic not in self._timers:  # an offline status seen again (a reconnect) keeps its first timer
            self._arm(topic, self.adopt_after)

    def _arm(self, topic: str, after: float, *, ranked: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._timers[topic] = loop.call_later(after, self._due, topic, ranked)

    def _due(self, topic: str, ranked: bool) -> None:
        self._timers.pop(topic, None)
        if not ranked:
            # Ranked now rather than when the status came: a member that just started learns of
            # the others within the grace period.
            rank = sorted([*self.live_members(), self.connection.client_id]).index(self.connection.client_id)
            if rank:
                self._arm(topic, rank * ADOPT_STAGGER, ranked=True)
                return
        task = asyncio.create_task(self._adopt(topic), name=f"adopt {topic}")
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt(self, topic: str) -> None:
        async with self._lock:
            member = self._members.get(topic)
            if self._stopping or member is None or member.state != "offline":
                return
            drained = await self._drain(topic, member)
        member = self._members.get(topic)
        still_offline = member is not None and member.state == "offline"
        if not drained and not self._stopping and still_offline and topic not in self._timers:
            self._arm(topic, self.adopt_after)

    async def _drain(self, topic: str, member: Member) -> bool:
        """Resume `member`'s session, hand its queue to our handlers, discard it, clear its status.
        One log line, whatever happens."""
        shared = member.shared if member.shared is not None else self.shared
        offline_for = time.monotonic() - self._offline_since.get(topic, time.monotonic())
        conn = self._open_session(member.client_id, shared)
        what = f"the session of {member.client_id} (offline for {offline_for:.0f} s)"
        outcome = "could not connect"
        stopped = False
        try:
            await conn.start()
            if await _first(conn.connected, conn.lost, self.connection.settings.connect_timeout) is conn.connected:
                if not conn.session_present:
                    drained = True  # expired or discarded already: nothing was stranded there
                else:
                    drained = await conn.hand_over(sorted(shared), f"{topic}/{MARKER_SUFFIX}", stall=ADOPT_STALL)
                if drained:
                    async with asyncio.timeout(self._drain_timeout):
                        await conn.publish(topic, b"", retain=True)  # as this session: not if it was taken over
                    await conn.stop(will=False, timeout=self._drain_timeout, session_expiry=0)
                    stopped = True
                    self.adopted += 1
                    log.info(
                        "adopted %s: %d message(s) handled, session discarded, status cleared",
                        what,
                        conn.received,
                    )
                    return True
                outcome = (
                    f"the connection ended ({conn.disconnect_reason}: its owner is back, another member "
                    "took it over, or the broker went away)"
                    if not conn.connected.is_set()
                    else f"nothing handled for {ADOPT_STALL:.0f} s"
                )
        except asyncio.CancelledError:
            outcome = "stopping"
            raise
        except (TimeoutError, IotpipeError, OSError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            if not stopped:
                # Keep the session (its expiry as we connected: the configured one): what we did not
                # acknowledge is delivered again to whoever resumes it next.
                await asyncio.shield(conn.stop(will=False, timeout=self._drain_timeout))
                level = logging.INFO if self._stopping or "connection ended" in outcome else logging.WARNING
                log.log(
                    level,
                    "gave up adopting %s: %s; %d message(s) handled, session kept%s",
                    what,
                    outcome,
                    conn.received,
                    "" if self._stopping else f" for another attempt in {self.adopt_after:.0f} s",
                )
        return False

    # -- leaving ------------------------------------------------------------------------------
    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> bool:
        """On a clean stop: leave the groups if another member is live (True once what the broker
        had queued for us is handled: the caller then clears our status and discards our session),
        or keep our session as the last member (False; also when leaving could not finish in time)."""
        await self.stop()
        if not self.connection.connected.is_set():
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        nonce = uuid.uuid4().hex
        echoed = asyncio.Event()
        self._echo = (nonce, echoed)
        try:
            async with asyncio.timeout(timeout):
                await self._publish_status("online", leaving=nonce)
                await echoed.wait()  # now we know of every member that announced leaving before us
        except (TimeoutError, IotpipeError) as exc:
            log.warning("could not announce leaving the shared subscription(s) (%s): keeping our session", exc)
            return False
        finally:
            self._echo = None
        others = self._live_at_echo
        if not others:
            log.info("last live member of the shared subscription(s): keeping our session, so messages queue for us")
            return False
        started = loop.time()
        try:
            async with asyncio.timeout(max(0.0, deadline - started)):
                drained = await self.connection.hand_over(
                    sorted(self.shared), f"{self.status_topic}/{MARKER_SUFFIX}", stall=timeout
                )
        except TimeoutError:
            drained = False
        if drained:
            log.info(
                "left the shared subscription(s) to %s: what was queued for us handled in %.2f s",
                ", ".join(others),
                loop.time() - started,
            )
        else:
            log.warning(
                "could not hand over what was queued for us within %.0f s: keeping our session (a live member "
                "adopts it %.0f s after we are offline)",
                timeout,
                self.adopt_after,
            )
        return drained

    async def stop(self) -> None:
        """No adoption from now on; one under way stops, keeping the session it was draining."""
        self._stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._adoptions):
            task.cancel()
        await asyncio.gather(*self._adoptions, return_exceptions=True)


def _parse(payload: bytes) -> Member | None:
    if not payload:
        return None
    try:
        doc = orjson.loads(payload)
        shared = doc.get("shared")
        return Member(
            client_id=str(doc["client_id"]),
            state=str(doc["state"]),
            leaving=bool(doc.get("leaving")),
            shared=frozenset(str(f) for f in shared) if isinstance(shared, list) else None,
            ts=int(doc.get("ts", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not a status we can act on: never adopted, never counted live


def _field(payload: bytes, name: str) -> Any:
    try:
        doc = orjson.loads(payload)
    except ValueError:
        return None
    return doc.get(name) if isinstance(doc, dict) else None


async def _first(a: asyncio.Event, b: asyncio.Event, timeout: float) -> asyncio.Event | None:
    """Whichever of two events is set first, or None after `timeout`."""
    waits = {asyncio.ensure_future(a.wait()): a, asyncio.ensure_future(b.wait()): b}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in waits:
            future.cancel()
    if not done:
        return None
    return a if a.is_set() else b
