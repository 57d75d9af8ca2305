"""The one shape every service has: settings in, logging once, `run(settings)`.

`run_service` owns the process lifecycle so each service only writes its own logic: it builds the
key ring, metrics and bus, lets the component register subscriptions, connects, publishes retained
`online` status with counters every `status_interval` (and the health file a container healthcheck
reads), re-reads the key ring file as it changes (iotpipe._keys: the new ring is used from the next
message, and the status goes out at once), and on SIGINT/SIGTERM drains: share groups first (a
member of a shared subscription hands its share to the live members, iotpipe._share), then the
component, then `offline` status (or, having left its groups, no status and no session), then
disconnect.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ._bus import Bus
from ._envelope import KeyRing
from ._errors import ConfigError, IotpipeError
from ._health import Metrics, MetricsServer, write_health
from ._keys import KEYRING_POLL, KeyRingFile, keyring_status
from ._logging import configure_logging
from ._settings import ServiceSettings, load_settings_or_exit
from ._topics import Topics

log = logging.getLogger(__name__)

# Another member's `online` status older than this many of its heartbeats is not believed: it died
# without a Will (the broker was down then), so it cannot take over a leaving member's share.
STATUS_LIVENESS = 3

S = TypeVar("S", bound=ServiceSettings)


class Runtime(Generic[S]):
    """What a service runs in: its settings, topics, counters, key ring and bus."""

    def __init__(self, settings: S, *, keyring: KeyRing | None = None) -> None:
        self.settings: S = settings
        self.name = settings.service_name
        self.topics = Topics(settings.base_topic)
        self.metrics = Metrics()
        # Given a key ring (tests), that one for good; else the file's, re-read as it changes.
        self.keyring_file: KeyRingFile | None = None
        if keyring is None:
            self.keyring_file = KeyRingFile(settings.keyring_path, self.metrics)
            keyring = self.keyring_file.ring
        self.keyring = keyring
        self.boot_ts = time.time_ns() // 1_000_000
        self.status_now = asyncio.Event()  # set: publish status now rather than at the next heartbeat
        self.bus = Bus(
            settings.mqtt,
            client_id=f"{self.name}-{settings.instance}",
            keyring=self.keyring,
            src=settings.src,
            status_topic=self.topics.service_status(self.name, settings.instance),
            metrics=self.metrics,
            message_ttl=settings.message_ttl,
            max_payload_bytes=settings.max_payload_bytes,
            username=self.name,
            password_file=settings.mqtt_password_path,
            status_extra={"service": self.name, "instance": settings.instance},
            dead_letter_file=settings.dead_letter_path,
            replay_state_file=settings.replay_state_file,
            status_liveness=STATUS_LIVENESS * settings.status_interval,
            window_bounds=settings.window_bounds,
        )
        if self.keyring_file is not None and self.bus.opener is not None:
            self.bus.opener.on_unknown_kid = functools.partial(self.reload_keyring, soon=True)

    def reload_keyring(self, soon: bool = False) -> bool:
        """Use the key ring file's new content if it changed and loads (`soon`: unless it was read
        within the last second); True if a new ring is now in use. Its status goes out at once, so
        `iotpipe keys` sees the step reach this service."""
        if self.keyring_file is None:
            return False
        refused = self.keyring_file.refused
        ring = self.keyring_file.check_soon() if soon else self.keyring_file.check()
        if ring is None:
            if self.keyring_file.refused != refused:
                self.status_now.set()  # a refusal (or its end) is news for the operator too
            return False
        self.keyring = ring
        self.bus.use_keyring(ring)
        self.status_now.set()
        return True

    def keyring_status(self) -> dict[str, Any]:
        if self.keyring_file is not None:
            return self.keyring_file.status()
        return keyring_status(self.keyring, self.boot_ts)


class Component(Generic[S]):
    """A service's own logic, built with the runtime it runs in. Subclasses subscribe in
    `__init__` and override what they need; the defaults do nothing."""

    def __init__(self, runtime: Runtime[S]) -> None:
        self.runtime = runtime
        self.settings: S = runtime.settings

    async def run(self) -> None:
        """The service's own loops, if any (the bus delivers messages without one)."""
        await asyncio.Event().wait()

    def health(self) -> dict[str, Any]:
        """Service-specific details for the status topic and health file. An `unhealthy` key (the
        reason, one line) makes the container healthcheck fail although the pipeline broker is there."""
        return {}

    async def close(self) -> None:
        """Flush and release resources; called once on shutdown."""


ComponentFactory = Callable[[Runtime[S]], Component[S]]


# Generation-0 collections every this many net allocations instead of CPython's 700. The services
# allocate many short-lived containers per message (decoded payloads, windows); with the default
# the cyclic collector ran hundreds of times a second and, at 5,000 devices, took about a fifth of
# the sensor-reader's CPU walking long-lived objects that can never be garbage.
GC_GEN0_THRESHOLD = 50_000


# glibc malloc: buffers from this size up come from mmap and go back to the OS when freed. By default
# glibc raises this threshold each time such a buffer is freed (up to 32 MiB), after which the
# services' sealed messages (up to 1 MiB, several a second) came from the heap, and the heap kept
# its high-water mark: the sensor-reader grew past 350 MiB at 250,000 readings/s.
MMAP_THRESHOLD = 256 << 10
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (mallopt, malloc_trim), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _tune_malloc() -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # a fixed threshold also stops the raising


def _trim_malloc() -> None:
    """Hand the heap's free pages back to the OS (each heartbeat): RSS then follows what is in use."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _tune_gc() -> None:
    """Move everything built at start-up (settings, models, pollers) out of the collector's sight
    and make young-generation collections rarer. Reference counting still frees almost everything;
    only cycles wait longer."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def serve(settings: S, factory: ComponentFactory[S], stop: asyncio.Event | None = None) -> None:
    runtime = Runtime(settings)
    component = factory(runtime)
    _tune_gc()
    _tune_malloc()
    stop = stop or asyncio.Event()
    metrics = MetricsServer(runtime.metrics, settings.metrics_host, settings.metrics_port)
    metrics.start()
    await runtime.bus.start()
    log.info("%s %s starting (src %s)", runtime.name, settings.instance, settings.src)
    main = asyncio.create_task(component.run(), name="component")
    status = asyncio.create_task(_report_status(runtime, component), name="status")
    keys = asyncio.create_task(_watch_keyring(runtime), name="keyring")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if main in done and not main.cancelled() and (error := main.exception()) is not None:
            raise error
    finally:
        log.info("%s shutting down", runtime.name)
        for task in (main, status, keys, stopper):
            task.cancel()
        await asyncio.gather(main, status, keys, stopper, return_exceptions=True)
        # First, so a healthcheck never reports a stopping service healthy, however long draining takes.
        _write_health(runtime, component, "offline")
        try:
            await runtime.bus.leave_groups()  # while the component can still handle what is queued for us
            await runtime.bus.finish_consuming()  # the batches in hand too, rather than again after a restart
            await component.close()
        finally:
            await runtime.bus.stop()
            metrics.stop()


async def _report_status(runtime: Runtime[Any], component: Component[Any]) -> None:
    """Heartbeat: retained status with counters, and the health file, every `status_interval`."""
    interval = runtime.settings.status_interval
    while True:
        runtime.status_now.clear()  # before the snapshot: a reload after it is published at once
        details = _details(runtime, component)  # one snapshot for both the file and the topic
        _write_health(runtime, component, "online", details)
        if runtime.bus.connected.is_set():
            try:
                async with asyncio.timeout(interval):
                    await runtime.bus.publish_status("online", **details)
            except (TimeoutError, IotpipeError) as exc:  # a heartbeat lost to a reconnect is harmless
                log.debug("heartbeat not published: %s", exc)
        _trim_malloc()
        try:
            async with asyncio.timeout(interval):
                await runtime.status_now.wait()
        except TimeoutError:
            pass


async def _watch_keyring(runtime: Runtime[Any]) -> None:
    """Re-read the key ring file every KEYRING_POLL s: a rotation step needs no restart."""
    if runtime.keyring_file is None:
        return
    while True:
        await asyncio.sleep(KEYRING_POLL)
        try:
            runtime.reload_keyring()
        except Exception:  # a bug here must not end the watching, nor the service: the ring in use stays
            log.exception("re-reading the key ring file failed; keeping the ring in use")


def _details(runtime: Runtime[Any], component: Component[Any]) -> dict[str, Any]:
    return {
        "boot_ts": runtime.boot_ts,
        "counters": runtime.metrics.counters(),
        "keyring": runtime.keyring_status(),
        **component.health(),
        # Window end -> handled since the previous status (the lag histogram's `handled` stage).
        **({"lag": lag} if (lag := runtime.metrics.lag.take_interval()) is not None else {}),
    }


def _write_health(
    runtime: Runtime[Any], component: Component[Any], state: str, details: dict[str, Any] | None = None
) -> None:
    path = runtime.settings.health_file
    doc = {
        "state": state,
        "service": runtime.name,
        "instance": runtime.settings.instance,
        "ts": time.time_ns() // 1_000_000,
        "connected": runtime.bus.connected.is_set(),
        **(details if details is not None else _details(runtime, component)),
    }
    try:
        write_health(path, doc)
    except OSError as exc:
        log.warning("cannot write health file %s: %s", path, exc)


def main(settings_type: type[S], factory: ComponentFactory[S]) -> None:
    """A service's whole `__main__`: settings from the environment (a bad value exits 2 with one
    line naming it), logging configured once, then `run_service`. What the settings name but only
    start-up reads (the key ring, the sensor-reader's devices file) is refused the same way: one
    line, exit 2, never a traceback."""
    settings = load_settings_or_exit(settings_type)
    configure_logging(settings)
    try:
        run_service(settings, factory)
    except ConfigError as exc:
        log.critical("configuration error: %s", exc)
        raise SystemExit(2) from None


def run_service(settings: S, factory: ComponentFactory[S]) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, factory, stop)

    asyncio.run(main())
