"""The one shape every service has: settings in, logging once, `run(settings)`.

`run_service` owns the process lifecycle so each service only writes its own logic: it builds the
key ring, metrics and bus, lets the component register subscriptions, connects, publishes retained
`online` status with counters every `status_interval` (and the health file a container healthcheck
reads), and on SIGINT/SIGTERM drains: component first, then `offline` status, then disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._bus import Bus
from ._envelope import KeyRing
from ._health import Metrics, write_health
from ._settings import ServiceSettings
from ._topics import Topics

log = logging.getLogger(__name__)


class Component(Protocol):
    """A service's own logic, built with the runtime it runs in."""

    async def run(self) -> None:
        """The service's main loop (return or block until cancelled)."""

    def health(self) -> dict[str, Any]:
        """Service-specific details for the status topic and health file."""

    async def close(self) -> None:
        """Flush and release resources; called once on shutdown."""


class Runtime:
    def __init__(self, settings: ServiceSettings, *, keyring: KeyRing | None = None) -> None:
        self.settings = settings
        self.name = settings.service_name
        self.topics = Topics(settings.base_topic)
        self.metrics = Metrics()
        self.keyring = keyring or KeyRing.from_file(settings.keyring_path)
        self.boot_ts = time.time_ns() // 1_000_000
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
        )
        self.bus.status_extra = {"service": self.name, "instance": settings.instance}


ComponentFactory = Callable[[Runtime], Component]


async def serve(settings: ServiceSettings, factory: ComponentFactory, stop: asyncio.Event | None = None) -> None:
    runtime = Runtime(settings)
    component = factory(runtime)
    stop = stop or asyncio.Event()
    if settings.metrics_port is not None:
        runtime.metrics.serve(settings.metrics_port)
    await runtime.bus.start()
    log.info("%s %s starting (src %s)", runtime.name, settings.instance, settings.src)
    main = asyncio.create_task(component.run(), name="component")
    status = asyncio.create_task(_report_status(runtime, component), name="status")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if main in done and not main.cancelled() and main.exception() is not None:
            raise main.exception()  # type: ignore[misc]
    finally:
        log.info("%s shutting down", runtime.name)
        for task in (main, status, stopper):
            task.cancel()
        await asyncio.gather(main, status, stopper, return_exceptions=True)
        # First, so a healthcheck never reports a stopping service healthy, however long draining takes.
        _write_health(runtime, component, "offline")
        try:
            await component.close()
        finally:
            await runtime.bus.stop()


async def _report_status(runtime: Runtime, component: Component) -> None:
    """Heartbeat: retained status with counters, and the health file, every `status_interval`."""
    interval = runtime.settings.status_interval
    while True:
        details = _details(runtime, component)  # one snapshot for both the file and the topic
        _write_health(runtime, component, "online", details)
        if runtime.bus.connected.is_set():
            with contextlib.suppress(Exception):  # a heartbeat lost to a reconnect is harmless
                async with asyncio.timeout(interval):
                    await runtime.bus.publish_status("online", **details)
        await asyncio.sleep(interval)


def _details(runtime: Runtime, component: Component) -> dict[str, Any]:
    return {"boot_ts": runtime.boot_ts, "counters": runtime.metrics.snapshot(), **component.health()}


def _write_health(runtime: Runtime, component: Component, state: str, details: dict[str, Any] | None = None) -> None:
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


def run_service(settings: ServiceSettings, factory: ComponentFactory) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, factory, stop)

    asyncio.run(main())
