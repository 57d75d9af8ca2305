"""The fault battery's load and accounting: the whole pipeline as real processes under load, faults
injected into it, and every window counted Jepsen-style at both sinks.

- Load: the real sensor-reader with simulated devices (`Load`: devices x sensors x Hz, 1 s
  windows), all five services, the cloud-sink, mosquitto and redis-server with the project's own
  configs (tests/servers.py renders them: auth, ACL, persistence every 5 s, AOF).
- Published: what the reader sealed. A durable, non-shared subscriber of the test's own (the
  read-only `reader` user, its own session, which survives a broker kill as the services' do)
  opens every raw window the broker delivers; a window the reader sealed that never reached the
  broker shows as a gap, since every simulated device yields a window every `window_ms` (its polls
  run at `hz`), so each device's windows are contiguous. Only windows that started after every
  service's session existed are the pipeline's to account for, and only up to the reader's final
  clean stop (it publishes the windows still open first).
- Counted at the sinks, per window of one sensor (device, sensor, start):
  Redis, the members of `<base>:series:<device>:<sensor>`: lost (published, not there),
  duplicated (two members for one start, or the cache-writers' own count of windows written as
  new exceeding what is stored), unexpected (there, never published, or not as published: another
  `n`, unit or end);
  the cloud-sink, `GET /records` by record id: lost, duplicated (an id stored twice), unexpected;
  the copies the sink recognised and did not store (`duplicate_records` of `/stats`) are reported,
  not failures. The cache-writer's `iotpipe_windows_duplicate` likewise.
- Each fault has a segment of the run (from the window in progress at its injection to the next
  fault's): its table row counts the windows that started in it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from iotpipe import KeyRing, PlainMessage, Topics, counter
from iotpipe.devstack import redis_password_file
from sensor_reader.service import READING_BYTES, SEALED_PAYLOAD_RATIO, SENSOR_BYTES, WINDOW_BYTES

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # run as a script (the load measurement), not only under pytest
    sys.path.insert(0, str(TESTS))

from servers import (  # noqa: E402
    ROOT,
    TAP,
    Stack,
    add_counters,
    bus_for,
    free_port,
    health_doc,
    run_servers,
    service_env,
    unseal,
)
from test_reader_outage import Proxy  # noqa: E402

SIM_SENSORS = ("temperature", "humidity", "pressure", "soil_moisture", "light", "pm2_5")
MODULES = {
    "sensor-reader": "sensor_reader",
    "preprocessor": "preprocessor",
    "cache-writer": "cache_writer",
    "cloud-forwarder": "cloud_forwarder",
    "monitor": "monitor",
    "cloud-sink": "cloud_sink",
}
CONSUMERS = ("cache-writer", "cloud-forwarder", "monitor")
GRACE_MS = 200  # the reader's IOTPIPE_WINDOW_GRACE_MS (default)
STATUS_INTERVAL = 1.0
POLL = 0.25  # s between checks of a condition that has no event of its own
# The publisher replay switched off (the F1 control): the same service, with iotpipe._mqtt keeping
# nothing to republish after a reconnect.
NO_REPLAY = "import iotpipe._mqtt as m, runpy; m.REPLAY_MAX_MESSAGES = 0; runpy.run_module({!r}, run_name='__main__')"


def env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def full_battery() -> bool:
    return os.environ.get("IOTPIPE_FAULTS_FULL", "") not in ("", "0")


@dataclass(frozen=True)
class Load:
    """Simulated devices for the real sensor-reader: `devices` x `sensors` readings `hz` times a
    second (the simulator has six sensor kinds), in windows of `window_ms`."""

    devices: int = 20
    sensors: int = 6
    hz: float = 200.0
    window_ms: int = 1000

    @classmethod
    def from_env(cls) -> Load:
        return cls(
            devices=int(env_number("IOTPIPE_FAULTS_DEVICES", cls.devices)),
            sensors=int(env_number("IOTPIPE_FAULTS_SENSORS", cls.sensors)),
            hz=env_number("IOTPIPE_FAULTS_HZ", cls.hz),
            window_ms=int(env_number("IOTPIPE_FAULTS_WINDOW_MS", cls.window_ms)),
        )

    @property
    def rate(self) -> float:
        """Readings per second the devices are configured for."""
        return self.devices * self.sensors * self.hz

    @property
    def device_ids(self) -> list[str]:
        return [f"sim-{i:03d}" for i in range(self.devices)]

    @property
    def raw_messages_per_window(self) -> int:
        """How many raw messages the reader packs each window's devices into (its own size bound
        against the default payload limit): the unit of its spool and of IOTPIPE_MAX_PENDING_WINDOWS."""
        per_sensor = SENSOR_BYTES + READING_BYTES * self.hz * self.window_ms / 1000
        per_device = WINDOW_BYTES + self.sensors * per_sensor
        budget = (1 << 20) * SEALED_PAYLOAD_RATIO
        return math.ceil(self.devices / max(1, int(budget // per_device)))

    @property
    def sensor_ids(self) -> tuple[str, ...]:
        return SIM_SENSORS[: self.sensors]

    def toml(self) -> str:
        sensors = ", ".join(f'"{s}"' for s in self.sensor_ids)
        return "".join(
            f'[[devices]]\nid = "{d}"\ndriver = "simulated"\ninterval = {1 / self.hz!r}\n'
            f"[devices.params]\nsensors = [{sensors}]\n\n"
            for d in self.device_ids
        )


# -- processes ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (not of its children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Service:
    """One service process of the run (restartable under the same instance id)."""

    service: str
    instance: str
    env: dict[str, str]
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = None
    cpu_done: float = 0.0  # CPU seconds of its earlier (killed or stopped) processes
    # counters of its earlier processes, as of their last heartbeat (a killed one's may undercount)
    counters_done: dict[str, Any] = field(default_factory=dict)  # nested, as in the status

    @property
    def name(self) -> str:
        return f"{self.service}/{self.instance}"

    def cpu(self) -> float:
        return self.cpu_done + (cpu_seconds(self.popen.pid) if self.popen and self.popen.poll() is None else 0.0)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


# -- a cloud that misbehaves -------------------------------------------------------------------


class CloudProxy:
    """TCP proxy between the cloud-forwarder and the cloud-sink that misbehaves on demand:
    `pass` forwards; `hang` forwards each request but of the answer only the headers and half the
    body, then nothing (the sink has stored the records: a retry brings copies it must collapse);
    `hang_request` forwards half of each request and holds it; `reset` answers any request with a
    TCP reset; `slow` holds each answer `slow_seconds` before forwarding it."""

    def __init__(self, target_port: int, slow_seconds: float = 4.0) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self.slow_seconds = slow_seconds
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def set(self, mode: str) -> None:
        """From now on; open connections are closed, so the mode applies to every request from here."""
        assert mode in ("pass", "hang", "hang_request", "reset", "slow"), mode
        self.mode = mode
        for writer in list(self._links):
            writer.transport.abort()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._reset(writer)
            return
        self._links |= {writer, up_writer}
        try:
            await asyncio.gather(self._requests(reader, up_writer, writer), self._answers(up_reader, writer))
        finally:
            self._links -= {writer, up_writer}
            writer.transport.abort()
            up_writer.transport.abort()

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, down: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                if self.mode == "reset":
                    self._reset(down)
                    up.transport.abort()
                    return
                if self.mode == "hang_request":
                    up.write(data[: len(data) // 2])
                    await up.drain()
                    await reader.read()  # hold it: the client gives up (its request timeout)
                    return
                up.write(data)
                await up.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            up.transport.abort()

    async def _answers(self, up: asyncio.StreamReader, down: asyncio.StreamWriter) -> None:
        try:
            while data := await up.read(1 << 16):
                if self.mode == "slow":
                    await asyncio.sleep(self.slow_seconds)  # wait-ok: the fault (a slow cloud)
                if self.mode == "hang":
                    head, sep, body = data.partition(b"\r\n\r\n")
                    down.write(head + sep + body[: len(body) // 2])
                    await down.drain()
                    await up.read()  # nothing more goes back: the client waits for the rest
                    return
                down.write(data)
                await down.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            down.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._links):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


# -- what the test sees on the wire ------------------------------------------------------------


@dataclass
class Wire:
    """Every raw and processed window the broker delivers to the test's durable subscriber, opened
    with the test's own key ring (never through a replay guard: a copy is seen, and counted)."""

    keyring: KeyRing
    raw: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)  # (device, start) -> {sensor: n}
    raw_copies: int = 0  # raw windows seen again (same device and start): replays, redeliveries
    raw_seals: dict[tuple[str, int], set[tuple[str, str, int]]] = field(default_factory=dict)
    processed: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (device, sensor, start) -> copies
    readings: int = 0  # readings in distinct raw windows
    last_processed: float = 0.0  # monotonic s of the latest processed message
    status: dict[str, str] = field(default_factory=dict)  # "<service>/<instance>" -> state
    # raw and processed messages by the key id their envelope names (a key rotation's progress)
    sealed_with: collections.Counter[str] = field(default_factory=collections.Counter)

    async def handle(self, messages: Sequence[PlainMessage[Any]]) -> None:
        for m in messages:
            kind = m.topic.split("/")[2]
            if kind in ("raw", "processed"):
                self.sealed_with[orjson.loads(m.payload)["kid"]] += 1
            if kind == "raw":
                inner = unseal(self.keyring, m.payload)
                for data in inner["data"]["windows"]:
                    key = (data["device"], data["window"]["start"])
                    self.raw_seals.setdefault(key, set()).add((inner["src"], inner["boot"], inner["seq"]))
                    if key in self.raw:
                        self.raw_copies += 1
                        continue
                    counts = {sensor: len(body["v"]) for sensor, body in data["sensors"].items()}
                    self.raw[key] = counts
                    self.readings += sum(counts.values())
            elif kind == "processed":
                self.last_processed = time.monotonic()
                data = unseal(self.keyring, m.payload)["data"]
                for w in data["windows"]:
                    k = (w["device"], w["sensor"], w["start"])
                    self.processed[k] = self.processed.get(k, 0) + 1
            elif kind == "status" and m.payload:
                self.status["/".join(m.topic.split("/")[4:6])] = orjson.loads(m.payload).get("state", "")


# -- accounting --------------------------------------------------------------------------------

Key = tuple[str, str, int]  # (device, sensor, window start)


@dataclass
class SinkCount:
    sink: str
    lost: list[Key] = field(default_factory=list)
    duplicated: int = 0
    unexpected: list[Key] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.lost and not self.duplicated and not self.unexpected


@dataclass
class Row:
    """One fault's line of the table."""

    fault: str
    seconds: float  # the segment's length
    readings: int  # readings published (sealed and delivered to the broker) in the segment
    windows: int  # raw windows (one device, one window) published in the segment
    sensor_windows: int  # windows of one sensor expected at each sink
    gaps: int  # raw windows the reader should have sealed that never reached the broker
    redis: SinkCount
    cloud: SinkCount
    recovery: float | None  # s from the fault's end until both sinks held every window closed before it
    note: str = ""

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    @property
    def clean(self) -> bool:
        return self.redis.clean and self.cloud.clean


def table(title: str, rows: Sequence[Row], extra: str = "") -> str:
    head = (
        f"{'fault':<34} {'readings/s':>10} {'windows':>8} {'sensor-w':>8} {'gaps':>5} "
        f"{'redis lost/dup/unexp':>20} {'cloud lost/dup/unexp':>20} {'recovery':>9}"
    )
    lines = [f"== {title}", head, "-" * len(head)]
    for r in rows:
        recovery = "-" if r.recovery is None else f"{r.recovery:.1f} s"  # -: not within the timeout
        lines.append(
            f"{r.fault:<34} {r.rate:>10,.0f} {r.windows:>8} {r.sensor_windows:>8} {r.gaps:>5} "
            f"{f'{len(r.redis.lost)}/{r.redis.duplicated}/{len(r.redis.unexpected)}':>20} "
            f"{f'{len(r.cloud.lost)}/{r.cloud.duplicated}/{len(r.cloud.unexpected)}':>20} {recovery:>9}"
            + (f"  {r.note}" if r.note else "")
        )
    for r in rows:
        for count in (r.redis, r.cloud):
            if count.lost or count.unexpected:
                lines.append(
                    f"   {r.fault} {count.sink}: lost e.g. {count.lost[:4]}, unexpected e.g. {count.unexpected[:4]}"
                )
    if extra:
        lines.append(extra)
    return "\n".join(lines)


@dataclass
class Segment:
    fault: str
    start_ms: int  # windows that started at or after this belong to the fault...
    recovery: float | None = None
    note: str = ""


# -- the pipeline ------------------------------------------------------------------------------


class Pipeline:
    """The five services, the cloud-sink, a broker and Redis of the run's own, under `load`.

    `preprocessors`: instance ids of the shared group; `reader_proxy`: the reader reaches the
    broker through a TCP proxy the test can cut (F5); `cloud_proxy`: the forwarder reaches the
    cloud-sink through a CloudProxy (F6); `no_replay`: every publisher's replay switched off (the
    F1 control); `env`: extra settings for every service; `reader_env`: for the reader alone;
    `service_env`: for others, by service name."""

    def __init__(
        self,
        workdir: Path,
        secrets_dir: Path,
        keyring: KeyRing,
        load: Load,
        *,
        preprocessors: Sequence[str] = ("p1",),
        reader_proxy: bool = False,
        cloud_proxy: bool = False,
        no_replay: bool = False,
        env: dict[str, str] | None = None,
        reader_env: dict[str, str] | None = None,
        service_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.secrets_dir = secrets_dir
        self.keyring = keyring
        self.load = load
        self.base = f"f{os.urandom(5).hex()}"
        self.topics = Topics(self.base)
        self.preprocessor_ids = list(preprocessors)
        self.use_reader_proxy = reader_proxy
        self.use_cloud_proxy = cloud_proxy
        self.no_replay = no_replay
        self.extra_env = dict(env or {})
        self.reader_extra = dict(reader_env or {})
        self.service_extra = dict(service_env or {})
        self.services: dict[str, Service] = {}
        self.segments: list[Segment] = []
        self.excused: list[tuple[int, int]] = []  # (from, to) ms: windows a killed reader never sealed
        self.wire = Wire(keyring)
        self.rates: list[tuple[float, int]] = []  # (monotonic s, wire readings)
        self.ready_ms = 0
        self.first_start = 0
        self.stop_ms = 0
        self.written_excess = 0
        self._test_cpu0 = 0.0
        self._exit = contextlib.AsyncExitStack()
        self._sampler: asyncio.Task[None] | None = None
        self.stack: Stack
        self.reader_proxy: Proxy | None = None
        self.cloud: CloudProxy | None = None
        self.sink_port = free_port()
        self.log = workdir / "log"

    # -- start and stop ---------------------------------------------------------------------
    async def __aenter__(self) -> Pipeline:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        procs = [s.popen for s in self.services.values() if s.alive()]
        for p in procs:
            assert p is not None
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p is not None
            try:
                await asyncio.to_thread(p.wait, 15)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)
        await self._exit.aclose()

    async def _start(self) -> None:
        self.log.mkdir(parents=True, exist_ok=True)
        self._test_cpu0 = cpu_seconds(os.getpid())
        self.stack = self._exit.enter_context(run_servers(self.workdir / "servers", self.secrets_dir))
        if self.use_reader_proxy:
            self.reader_proxy = Proxy(self.stack.ports.mqtt)
            await self.reader_proxy.start()
            self._exit.push_async_callback(self.reader_proxy.close)
        if self.use_cloud_proxy:
            self.cloud = CloudProxy(self.sink_port)
            await self.cloud.start()
            self._exit.push_async_callback(self.cloud.close)
        watcher = bus_for(self.stack, TAP, client_id=f"faults-wire-{self.base}", session_expiry=24 * 3600)
        for kind in ("raw", "processed"):
            watcher.subscribe(self.topics.all(kind), self.wire.handle, sealed=False)
        watcher.subscribe(f"{self.topics.root}/status/service/+/+", self.wire.handle, sealed=False)
        await watcher.start()
        self._exit.push_async_callback(watcher.stop)
        await watcher.wait_connected()
        async with asyncio.timeout(15):
            await watcher.subscribed.wait()

        devices = self.workdir / "devices.toml"
        devices.write_text(self.load.toml())
        cloud_port = self.cloud.port if self.cloud else self.sink_port
        common = {
            "IOTPIPE_DEVICES_FILE": str(devices),
            "IOTPIPE_WINDOW_MS": str(self.load.window_ms),
            "IOTPIPE_STATUS_INTERVAL": str(STATUS_INTERVAL),
            "IOTPIPE_HISTORY": "1000000",  # the run's whole history, to count it (default 1440 windows)
            "IOTPIPE_SINK_DB_FILE": str(self.workdir / "sink.sqlite3"),  # a cloud that remembers across restarts
            "IOTPIPE_CLOUD_URL": f"http://127.0.0.1:{cloud_port}/ingest",
            "IOTPIPE_SINK_PORT": str(self.sink_port),
            "IOTPIPE_SPOOL_FILE": str(self.workdir / "state" / "reader.spool.sqlite3"),
            **self.extra_env,
        }
        self._add("cloud-sink", "0", common)
        for instance in self.preprocessor_ids:
            self._add("preprocessor", instance, common)
        for service in CONSUMERS:
            self._add(service, "f", common)
        reader_env = dict(common, **self.reader_extra)
        if self.reader_proxy is not None:
            reader_env["IOTPIPE_MQTT__PORT"] = str(self.reader_proxy.port)
        self._add("sensor-reader", "f", reader_env)
        for svc in self.services.values():
            self.spawn(svc.name)
        names = [n for n in self.services if not n.startswith("cloud-sink")]
        await self.wait(lambda: all(self.wire.status.get(n) == "online" for n in names), 90, "every service online")
        # Every service's durable session exists from here: windows that start later are the pipeline's.
        self.ready_ms = now_ms()
        self.first_start = math.ceil(self.ready_ms / self.load.window_ms) * self.load.window_ms
        await self.broker_saved()  # and on the broker's disk, so a broker kill restores them
        self._sampler = asyncio.create_task(self._sample())
        # Flowing: the first accountable windows at both sinks before any fault.
        if await self.recovered(self.first_start + self.load.window_ms, 60) is None:
            raise AssertionError("no windows at the sinks within 60 s of every service being online")

    def _add(self, service: str, instance: str, common: dict[str, str]) -> None:
        extra = {**common, **self.service_extra.get(service, {})}
        env = service_env(self.stack, self.base, self.workdir, instance, **extra)
        module = MODULES[service]
        argv = [sys.executable, "-c", NO_REPLAY.format(module)] if self.no_replay else [sys.executable, "-m", module]
        self.services[f"{service}/{instance}"] = Service(service, instance, env, argv)

    def spawn(self, name: str) -> None:
        svc = self.services[name]
        with (self.log / f"{name.replace('/', '-')}.out").open("ab") as out:
            svc.popen = subprocess.Popen(svc.argv, env=svc.env, cwd=ROOT, stdout=out, stderr=out)

    def service(self, prefix: str) -> Service:
        """The service named `<service>/<instance>`, or the only one of a service."""
        if prefix in self.services:
            return self.services[prefix]
        (match,) = [s for n, s in self.services.items() if n.split("/")[0] == prefix]
        return match

    async def kill(self, name: str) -> None:
        """kill -9."""
        svc = self.service(name)
        assert svc.popen is not None and svc.alive(), f"{svc.name} is not running"
        cpu = cpu_seconds(svc.popen.pid)
        svc.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(svc.popen.wait, 15)
        svc.cpu_done += cpu
        add_counters(svc.counters_done, self.health(name).get("counters", {}))

    async def terminate(self, name: str) -> None:
        """SIGTERM: a clean stop (the service drains, says offline, disconnects)."""
        svc = self.service(name)
        assert svc.popen is not None
        cpu = cpu_seconds(svc.popen.pid)
        svc.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(svc.popen.wait, 30) == 0, f"{svc.name} did not stop cleanly"
        svc.cpu_done += cpu
        add_counters(svc.counters_done, self.health(name).get("counters", {}))

    async def steady(self, windows: int = 5, timeout: float = 60) -> None:
        """Let the load run until `windows` more windows have reached both sinks (so the next fault
        starts from a pipeline in its stride, and this one's row spans them)."""
        if await self.recovered(now_ms(), timeout, now_ms() + windows * self.load.window_ms) is None:
            raise AssertionError(f"{windows} more windows did not reach the sinks within {timeout:.0f} s")

    def restart(self, name: str) -> None:
        self.spawn(self.service(name).name)

    async def wait_status(self, name: str, state: str, timeout: float = 60) -> None:
        """Until the service's retained status (its own, or the broker's Last Will) says `state`."""
        svc = self.service(name)
        await self.wait(lambda: self.wire.status.get(svc.name) == state, timeout, f"{svc.name} {state}")

    def pause(self, name: str, paused: bool) -> None:
        svc = self.service(name)
        assert svc.popen is not None
        svc.popen.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def add_preprocessor(self, instance: str) -> None:
        svc = self.service(f"preprocessor/{self.preprocessor_ids[0]}")
        env = dict(svc.env, IOTPIPE_INSTANCE=instance, IOTPIPE_OUTBOX_FILE=str(self.workdir / f"outbox-{instance}"))
        self.services[f"preprocessor/{instance}"] = Service("preprocessor", instance, env, list(svc.argv))
        self.spawn(f"preprocessor/{instance}")

    def health(self, name: str) -> dict[str, Any]:
        svc = self.service(name)
        return health_doc(self.workdir, svc.service, svc.instance)

    async def broker_saved(self) -> None:
        lines = self.stack.broker.lines
        saved = sum("Saving in-memory database" in line for line in lines)
        await self.wait(lambda: sum("Saving in-memory database" in line for line in lines) > saved, 20, "a broker save")

    async def kill_broker(self) -> None:
        await asyncio.to_thread(self.stack.broker.kill)

    async def start_broker(self) -> None:
        await asyncio.to_thread(self.stack.broker.start)

    async def wait(self, condition: Callable[[], object], timeout: float, what: str, every: float = POLL) -> float:
        """Until `condition()` (maybe a coroutine) is true, checked every `every` s; the seconds it
        took. AssertionError after `timeout` s."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return loop.time() - began
            if loop.time() - began > timeout:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(every)

    async def hold(
        self, seconds: float, every: float = 0.0, sample: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """The fault's duration (sampling `sample` every `every` s meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            if sample is not None:
                await sample()
            await asyncio.sleep(min(left, every) if every > 0 else left)  # wait-ok: the fault's duration
        if sample is not None:
            await sample()

    async def _sample(self) -> None:
        while True:
            self.rates.append((time.monotonic(), self.wire.readings))
            await asyncio.sleep(1.0)  # wait-ok: the rate sampler's period, not a wait

    def rate(self, seconds: float) -> float:
        """Readings/s reaching the broker over the last `seconds` (the wire's count of new windows)."""
        if len(self.rates) < 2:
            return 0.0
        last_t, last_n = self.rates[-1]
        first = next((r for r in self.rates if r[0] >= last_t - seconds), self.rates[0])
        return (last_n - first[1]) / (last_t - first[0]) if last_t > first[0] else 0.0

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per process (every process of a service, killed ones included)."""
        out = {name: svc.cpu() for name, svc in self.services.items()}
        for server in (self.stack.broker, self.stack.redis):
            if server.proc is not None and server.proc.poll() is None:
                out[server.name] = cpu_seconds(server.proc.pid)
        out["test (wire, proxies)"] = cpu_seconds(os.getpid()) - self._test_cpu0
        return out

    # -- faults and segments --------------------------------------------------------------------
    def begin(self, fault: str) -> Segment:
        """A fault starts now: the windows from the one in progress on are its segment (the first
        fault's starts with the first accountable window)."""
        w = self.load.window_ms
        start = max(now_ms() // w * w, self.segments[-1].start_ms + w) if self.segments else self.first_start
        seg = Segment(fault, start)
        self.segments.append(seg)
        return seg

    def reader_killed(self, killed_ms: int, restarted_ms: int) -> None:
        """A reader killed at `killed_ms` never sealed its open windows (docs/contract.md: a kill -9
        loses them), nor any until its restart: not expected, but counted if they arrive."""
        self.excused.append((killed_ms - self.load.window_ms - GRACE_MS - 200, restarted_ms + self.load.window_ms))

    def expected_starts(self, until_ms: int) -> list[int]:
        """Window starts every device must have, from the first accountable one to `until_ms`."""
        w = self.load.window_ms
        return [
            s for s in range(self.first_start, until_ms, w) if not any(lo < s + w and s < hi for lo, hi in self.excused)
        ]

    async def recovered(self, fault_end_ms: int, timeout: float, upto_ms: int | None = None) -> float | None:
        """Seconds from `fault_end_ms` until Redis and the cloud-sink both hold every window that
        started before `upto_ms` (default: then, the one in progress at the fault's end included):
        the backlog is through and new windows flow (None if not within `timeout`)."""
        # The windows of this fault's segment: earlier ones were checked by the earlier recoveries
        # (and a window lost for good there, in a control run, must not hold this one up).
        since = self.segments[-1].start_ms if self.segments else self.first_start
        starts = [s for s in self.expected_starts((fault_end_ms if upto_ms is None else upto_ms) + 1) if s >= since]
        if not starts:
            return 0.0
        per_series = len(starts)
        total = per_series * self.load.devices * self.load.sensors
        lo, hi = starts[0], starts[-1]
        exp = set(starts)

        async def caught_up() -> bool:
            if any(n < per_series for n in await self.redis_counts(lo, hi)):
                return False
            if (await self.cloud_stats()).get("unique_records", 0) < total:  # cheap, necessary
                return False
            records = await self.cloud_records()
            return sum(1 for r in records if r.get("type") == "window" and r["start"] in exp) >= total

        try:
            await self.wait(caught_up, timeout, "recovery", every=0.5)
        except AssertionError:
            return None
        return max(0.0, time.time() - fault_end_ms / 1000)

    # -- the sinks ---------------------------------------------------------------------------------
    def redis_client(self) -> aioredis.Redis:
        password = redis_password_file(self.secrets_dir, "reader").read_text().strip()
        return aioredis.Redis(port=self.stack.ports.redis, username="reader", password=password)

    def series_keys(self) -> list[tuple[str, str, str]]:
        return [(d, s, f"{self.base}:series:{d}:{s}") for d in self.load.device_ids for s in self.load.sensor_ids]

    async def redis_counts(self, lo: int, hi: int) -> list[int]:
        client = self.redis_client()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for _d, _s, key in self.series_keys():
                    pipe.zcount(key, lo, hi)
                return [int(n) for n in await pipe.execute()]
        except (aioredis.ConnectionError, OSError):
            return [-1]
        finally:
            await client.aclose()

    async def redis_windows(self) -> dict[Key, list[dict[str, Any]]]:
        client = self.redis_client()
        out: dict[Key, list[dict[str, Any]]] = collections.defaultdict(list)
        keys = self.series_keys()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for _d, _s, key in keys:
                    pipe.zrange(key, 0, -1)
                results = await pipe.execute()
        finally:
            await client.aclose()
        for (d, s, _key), members in zip(keys, results, strict=True):
            for member in members:
                w = orjson.loads(member)
                out[(d, s, int(w["start"]))].append(w)
        return out

    async def cloud_records(self) -> list[dict[str, Any]]:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.sink_port}/records") as r:
                return orjson.loads(await r.read())  # type: ignore[no-any-return]
        except (aiohttp.ClientError, OSError):
            return []

    async def cloud_stats(self) -> dict[str, int]:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.sink_port}/stats") as r:
                return await r.json()  # type: ignore[no-any-return]
        except (aiohttp.ClientError, OSError):
            return {}

    # -- the end -------------------------------------------------------------------------------
    async def finish(self, drain_timeout: float = 120.0, quiet: float = 15.0) -> tuple[list[Row], str]:
        """Stop the reader cleanly (it publishes its open windows first), wait for both sinks to hold
        every published window, and count. Returns the rows and a summary.

        The wait ends early once no processed message has come for `quiet` s and both sinks hold
        every window the preprocessors did publish: what is missing then was lost upstream (a
        control run, or a failure), and waiting `drain_timeout` would not bring it."""
        self.stop_ms = now_ms()
        reader = self.service("sensor-reader")
        if reader.alive():
            await self.terminate("sensor-reader")
        await self.wait(
            lambda: self.wire.status.get(reader.name) == "offline",
            30,
            "the reader's offline status after its last window",
        )
        expected = self.expected()

        async def drained() -> bool:
            quiet_now = time.monotonic() - self.wire.last_processed > quiet
            wanted = expected
            if quiet_now:
                wanted = {k for k in expected if k in self.wire.processed}
            found = await self.redis_windows_keys()
            if not wanted <= found:
                return False
            if (await self.cloud_stats()).get("unique_records", 0) < len(wanted):
                return False
            records = await self.cloud_records()
            return wanted <= {(r["device"], r["sensor"], r["start"]) for r in records if r.get("type") == "window"}

        note = ""
        try:
            await self.wait(drained, drain_timeout, "both sinks to hold every published window", every=1.0)
        except AssertionError as exc:
            note = str(exc)
        rows = await self.count(expected)
        cpu = self.cpu()
        stats = await self.cloud_stats()
        # Windows written as new (the writers' own count, over every writer process) beyond the
        # windows stored: a window written twice. A killed writer's last heartbeat undercounts it,
        # which can hide such a duplicate, never invent one.
        writer = self.service("cache-writer")
        settled = now_ms() + 2 * STATUS_INTERVAL * 1000
        await self.wait(lambda: self.health(writer.name).get("ts", 0) >= settled, 30, "a cache-writer heartbeat")
        writer_counters = self.health(writer.name).get("counters", {})
        written = counter(writer.counters_done, "windows_written") + counter(writer_counters, "windows_written")
        present = counter(writer.counters_done, "windows_duplicate") + counter(writer_counters, "windows_duplicate")
        stored = sum(len(v) for v in (await self.redis_windows()).values())
        self.written_excess = int(written - stored)
        summary = (
            f"load: {self.load.devices} devices x {self.load.sensors} sensors at {self.load.hz:g} Hz "
            f"({self.load.rate:,.0f} readings/s configured), windows of {self.load.window_ms} ms; "
            f"cloud-sink collapsed {stats.get('duplicate_records', 0)} copies by record id "
            f"({stats.get('duplicate_batches', 0)} repeated batch keys); cache-writer found "
            f"{present:g} windows already present; windows written as new {written:g}, stored {stored}"
            f" (excess {self.written_excess}); "
            f"raw copies seen on the wire (replays, redeliveries) {self.wire.raw_copies}"
            + (f"; NOT DRAINED: {note}" if note else "")
            + "\nCPU s per process: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()))
            + f"\nservices' output: {self.log}"
        )
        return rows, summary

    async def redis_windows_keys(self) -> set[Key]:
        client = self.redis_client()
        try:
            async with client.pipeline(transaction=False) as pipe:
                keys = self.series_keys()
                for _d, _s, key in keys:
                    pipe.zrange(key, 0, -1, withscores=True)
                results = await pipe.execute()
        except (aioredis.ConnectionError, OSError):
            return set()
        finally:
            await client.aclose()
        return {(d, s, int(score)) for (d, s, _k), members in zip(keys, results, strict=True) for _m, score in members}

    def published(self) -> dict[Key, int]:
        """Published windows of one sensor in the accountable range -> readings."""
        return {
            (d, sensor, start): n
            for (d, start), counts in self.wire.raw.items()
            if self.first_start <= start < self.stop_ms
            for sensor, n in counts.items()
        }

    def gaps(self) -> set[tuple[str, int]]:
        """Raw windows the reader should have sealed that never reached the broker."""
        last = self.stop_ms - self.load.window_ms  # the window open at the stop may have been empty
        return {(d, s) for d in self.load.device_ids for s in self.expected_starts(last)} - set(self.wire.raw)

    def expected(self) -> set[Key]:
        gaps = {(d, sensor, s) for d, s in self.gaps() for sensor in self.load.sensor_ids}
        return set(self.published()) | gaps

    async def count(self, expected: set[Key]) -> list[Row]:
        published = self.published()
        gaps = self.gaps()
        in_redis = await self.redis_windows()
        records = [r for r in await self.cloud_records() if r.get("type") == "window"]
        at_cloud: dict[Key, list[dict[str, Any]]] = collections.defaultdict(list)
        for r in records:
            at_cloud[(r["device"], r["sensor"], int(r["start"]))].append(r)
        units = {s: u for s, u in zip(SIM_SENSORS, ("degC", "%RH", "hPa", "%", "lx", "ug/m3"), strict=True)}
        w = self.load.window_ms

        def as_published(key: Key, window: dict[str, Any]) -> bool:
            return (
                published.get(key) == window.get("n")
                and window.get("unit") == units[key[1]]
                and window.get("end") == key[2] + w
            )

        def tally(sink: str, found: dict[Key, list[dict[str, Any]]], keys: set[Key], lo: int, hi: int) -> SinkCount:
            mine = {
                k: v for k, v in found.items() if lo <= k[2] < hi and k[2] >= self.first_start and k[2] < self.stop_ms
            }
            if sink == "redis":
                dup = sum(len({orjson.dumps(x, option=orjson.OPT_SORT_KEYS) for x in v}) - 1 for v in mine.values())
            else:
                dup = sum(len(v) - 1 for v in mine.values())
            return SinkCount(
                sink,
                lost=sorted(keys - set(mine)),
                duplicated=dup,
                unexpected=sorted(k for k, v in mine.items() if not all(as_published(k, x) for x in v)),
            )

        segments = self.segments or [Segment("run", self.first_start)]
        bounds = [s.start_ms for s in segments] + [self.stop_ms + w]
        rows = []
        for i, seg in enumerate(segments):
            lo, hi = bounds[i], bounds[i + 1]
            keys = {k for k in expected if lo <= k[2] < hi}
            raw = {
                k: v for k, v in self.wire.raw.items() if lo <= k[1] < hi and self.first_start <= k[1] < self.stop_ms
            }
            seconds = (min(hi, self.stop_ms) - lo) / 1000
            rows.append(
                Row(
                    seg.fault,
                    seconds,
                    readings=sum(sum(c.values()) for c in raw.values()),
                    windows=len(raw),
                    sensor_windows=len(keys),
                    gaps=sum(1 for g in gaps if lo <= g[1] < hi),
                    redis=tally("redis", in_redis, keys, lo, hi),
                    cloud=tally("cloud", at_cloud, keys, lo, hi),
                    recovery=seg.recovery,
                    note=seg.note,
                )
            )
        return rows


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def report(title: str, rows: Sequence[Row], summary: str) -> str:
    text = table(title, rows, summary)
    print("\n" + text, flush=True)
    out = os.environ.get("IOTPIPE_FAULTS_REPORT")
    if out:
        with open(out, "a") as fh:
            fh.write(text + "\n\n")
    return text


def problems(rows: Iterable[Row]) -> list[str]:
    return [
        f"{r.fault}: redis lost {len(r.redis.lost)} dup {r.redis.duplicated} unexp {len(r.redis.unexpected)}; "
        f"cloud lost {len(r.cloud.lost)} dup {r.cloud.duplicated} unexp {len(r.cloud.unexpected)}"
        for r in rows
        if not r.clean
    ]
