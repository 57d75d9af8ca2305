"""`iotpipe bench` (`make bench`): a stepped, sustained-load benchmark of the whole pipeline on this
machine, with a naive one-reading-per-message baseline measured in the same run. Figures, never
assertions: operators run it on their own hardware.

What runs: in a temp dir, on ephemeral loopback ports, the real mosquitto and redis-server with the
shipped configs rendered by iotpipe.devstack exactly as `make run` renders them (auth, ACL, TLS
listener, persistence), the cloud-sink (durable, IOTPIPE_SINK_DB_FILE) and the five services as
`python -m <service>` with the local stack's environment (devstack.stack_environment). The bench
sets only the devices file, the topic base and the Redis prefix (`bench`).

Each step of a ladder of offered rates (re)starts the sensor-reader with a generated devices file
(simulated devices, dropout 0, so every sensor has exactly one window per window length), waits for
the step's first window in Redis, warms up, measures for a fixed time, stops the reader (SIGTERM)
and waits until the backlog has drained (Redis and the sink hold the same windows and stop
changing) before the next step. Workloads:
  high:  devices x 10 sensors x 250 Hz, in block mode (`sample_rate`), polled every 0.1 s;
  fleet: devices x 4 sensors x 1 Hz, one sample per 1-s poll (thousands of tiny windows).

Measured per step, only through Redis keys, the sink's SQLite file (read-only) and /proc:
- achieved readings/s: windows that reached Redis during the measuring window (ZCOUNT of every
  series of the step) x readings per window;
- lag from a window's end to its arrival in Redis, p50/p99/max: the `latest_start` hashes of a
  random sample of devices are polled (one pipelined HGETALL each per period); a window's lag is the
  first poll that shows it (or a newer window of that sensor) minus its end, so the resolution is
  the poll period;
- lost / duplicated / unexpected windows at Redis and at the sink after the drain: expected is,
  per sensor, every window between the device's first and last window seen at either sink;
- CPU microseconds per reading of each process (/proc/<pid>/stat utime+stime, reaped children
  included) over the measuring window, RSS at its end and the peak (VmHWM);
- once per run, the start-up time from starting the stack to the first window in Redis.

The naive baseline is written the way the blog article this product grew from did it: a paho-mqtt
publisher sends one reading per message (JSON, QoS 1, plaintext), a subscriber handles one message
at a time, keeps a list per (device, sensor) for the current 1-s window and, when the window
closes (its sensor's first reading of a later window arrives), computes the mean and does a
blocking redis-py SET of one key per sensor. It runs against the same broker (its own user,
`bench-naive`, added to a copy of the shipped ACL and to the password file: the services'
configuration is unchanged) and the same Redis (its own user there too, allowed SET on `naive:*`),
after the pipeline's services have been stopped. The bench reads Redis as `bench-observer`, a user
of its own that may SCAN and read both prefixes (`reader` may read only the product's keys).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ._health import counter
from ._settings import mqtt_password_file, redis_password_file
from .devstack import (
    Ports,
    ensure_secrets,
    mosquitto_hash,
    render_broker_config,
    render_redis_config,
    stack_environment,
)

WINDOW_MS = 1000  # the reader's default IOTPIPE_WINDOW_MS, which the bench leaves as shipped
BASE = "bench"  # topic base and Redis prefix of the pipeline under test
INSTANCE = "local"  # stack_environment's IOTPIPE_INSTANCE
SERVICES = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor")
MODULES = {
    "cloud-sink": "cloud_sink",
    "sensor-reader": "sensor_reader",
    "preprocessor": "preprocessor",
    "cache-writer": "cache_writer",
    "cloud-forwarder": "cloud_forwarder",
    "monitor": "monitor",
}
# The processes whose CPU stands for the product: everything but the cloud-sink (the cloud).
PIPELINE = (*SERVICES, "mosquitto", "redis-server")
NAIVE_USER = "bench-naive"
# The bench's own Redis reader: it lists keys (SCAN) and reads the naive keys, which `reader` may not.
OBSERVER_USER = "bench-observer"
NAIVE_PREFIX = "naive"  # its topics (naive/<device>/<sensor>) and Redis keys (naive:<device>:<sensor>)
NAIVE_SENSORS = ("temperature", "humidity", "pressure", "light")
NAIVE_HZ = 10.0
NAIVE_PROCESSES = ("naive-publisher", "naive-subscriber", "mosquitto", "redis-server")

HIGH_SENSORS = ("temperature", "humidity", "pressure", "light", "soil_moisture", "pm2_5", "s6", "s7", "s8", "s9")
FLEET_SENSORS = ("temperature", "humidity", "pressure", "light")


@dataclass(frozen=True)
class Workload:
    """Simulated devices for the real sensor-reader: `devices` x `sensors`, each sensor at
    `sample_rate` Hz in block mode polled every `interval` s, or (no sample rate) one sample per poll."""

    name: str
    id_prefix: str
    sensors: tuple[str, ...]
    interval: float
    sample_rate: float | None
    ladder: tuple[int, ...]  # devices per step
    target: int  # devices at the workload's target (docs/operations.md)
    sustain_minutes: float

    @property
    def hz(self) -> float:
        return self.sample_rate if self.sample_rate is not None else 1.0 / self.interval

    def offered(self, devices: int) -> float:
        return devices * len(self.sensors) * self.hz

    def readings_per_window(self, window_ms: int = WINDOW_MS) -> float:
        return self.hz * window_ms / 1000

    def device_ids(self, devices: int) -> list[str]:
        return [f"{self.id_prefix}-{i:04d}" for i in range(1, devices + 1)]

    def devices_toml(self, devices: int) -> str:
        sensors = ", ".join(f'"{s}"' for s in self.sensors)
        rate = f"sample_rate = {self.sample_rate!r}\n" if self.sample_rate is not None else ""
        return "".join(
            f'[[devices]]\nid = "{device}"\ndriver = "simulated"\ninterval = {self.interval!r}\n'
            f"[devices.params]\nsensors = [{sensors}]\n{rate}"
            f"dropout_probability = 0.0\nspike_probability = 0.01\nseed = {i}\n\n"
            for i, device in enumerate(self.device_ids(devices), 1)
        )


WORKLOADS = {
    "high": Workload("high", "hi", HIGH_SENSORS, 0.1, 250.0, (20, 40, 60, 80, 100, 120), 100, 5.0),
    "fleet": Workload("fleet", "fl", FLEET_SENSORS, 1.0, None, (1000, 2500, 5000, 6000), 5000, 10.0),
}
NAIVE_LADDER = (2000, 5000, 10000, 20000, 40000)  # readings/s


@dataclass
class Options:
    root: Path = Path(".")
    workloads: tuple[str, ...] = ("high", "fleet")
    high_steps: tuple[int, ...] = WORKLOADS["high"].ladder
    fleet_steps: tuple[int, ...] = WORKLOADS["fleet"].ladder
    baseline_steps: tuple[int, ...] = NAIVE_LADDER
    baseline: bool = True
    step_seconds: float = 30.0
    warmup: float = 10.0
    sustain_minutes: float | None = None  # set: one step per workload at its target, this long (0: each workload's own)
    drain_timeout: float = 300.0
    lag_devices: int = 200
    lag_poll: float = 0.1
    lag_bound: float = 3.0  # s: the p99 lag at which iotpipe and the baseline are compared
    keep_going: bool = False  # climb on after a step that achieved < half of what it offered
    out: Path | None = None
    chart: Path | None = None
    workdir: Path | None = None
    keep_workdir: bool = False
    first_window_timeout: float = 120.0

    def steps(self, workload: str) -> tuple[int, ...]:
        if self.sustain_minutes is not None:
            return (WORKLOADS[workload].target,)
        return self.high_steps if workload == "high" else self.fleet_steps

    def measure_seconds(self, workload: str) -> float:
        if self.sustain_minutes is None:
            return self.step_seconds
        return 60 * (self.sustain_minutes or WORKLOADS[workload].sustain_minutes)


class BenchError(Exception):
    """The bench could not run a step (a process died, nothing arrived...)."""


# -- /proc ------------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and of its reaped children (s), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / _TICK


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) in MiB."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "hwm"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


# -- processes --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_prctl: Callable[..., int] | None = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies, even by SIGKILL (Linux). Only calls
    a function looked up in the parent: the bench has threads, so the child may take no lock."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _load_prctl() -> None:
    global _prctl
    if _prctl is None and sys.platform == "linux":
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl


class Child:
    """One process of the run, its output appended to <log_dir>/<name>.out."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log = log_dir / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _load_prctl()
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench only; it stops the children
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True if it stopped on its own."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            return False
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _wait_port(port: int, child: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        except OSError:
            if not child.alive():
                raise BenchError(f"{child.name} exited at start:\n{child.tail()}") from None
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{child.name} does not listen on {port} after {timeout:.0f}s:\n{child.tail()}"
                ) from None
            await asyncio.sleep(0.05)


# -- the cloud-sink's database, read-only -----------------------------------------------------------


class SinkDb:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection | None:
        if not self.path.exists():
            return None
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)

    def position(self) -> tuple[int, int]:
        """(highest record seq, duplicate_records counter)."""
        db = self._connect()
        if db is None:
            return 0, 0
        try:
            seq = db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]
            dup = db.execute("SELECT value FROM counters WHERE name = 'duplicate_records'").fetchone()
            return int(seq), int(dup[0]) if dup else 0
        except sqlite3.OperationalError:  # created, schema not there yet
            return 0, 0
        finally:
            db.close()

    def count_since(self, seq0: int) -> int:
        db = self._connect()
        if db is None:
            return 0
        try:
            return int(db.execute("SELECT count(*) FROM records WHERE seq > ?", (seq0,)).fetchone()[0])
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def windows_since(self, seq0: int) -> SinkWindows:
        """The window records stored after `seq0` (ids `<device>/<sensor>/<start>`; alerts apart)."""
        found = SinkWindows()
        db = self._connect()
        if db is None:
            return found
        try:
            rows = db.execute("SELECT id, json_extract(CAST(body AS TEXT), '$.n') FROM records WHERE seq > ?", (seq0,))
            for record_id, n in rows:
                parts = record_id.split("/")
                if len(parts) != 3 or not parts[2].isdigit():
                    found.others += 1
                    continue
                key = (parts[0], parts[1])
                starts = found.starts.get(key)
                if starts is None:
                    starts = found.starts[key] = set()
                starts.add(int(parts[2]))
                if isinstance(n, int):
                    found.readings[key] = found.readings.get(key, 0) + n
        finally:
            db.close()
        return found


@dataclass
class SinkWindows:
    starts: dict[tuple[str, str], set[int]] = field(default_factory=dict)  # window starts per (device, sensor)
    readings: dict[tuple[str, str], int] = field(default_factory=dict)  # their readings (`n`) added up
    others: int = 0  # records that are not windows (alerts)


# -- Redis, read-only ---------------------------------------------------------------------------------


class RedisReplyError(Exception):
    pass


class _Incomplete(Exception):
    pass


def _encode(command: Sequence[str | int | bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 reply at `pos`: (value, position after it); _Incomplete if `buf` ends first."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos], buf[pos + 1 : end]
    if kind == 0x24:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2 : stop], stop + 2
    if kind == 0x2A:  # * array
        size = int(line)
        if size < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(size):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x3A:  # : integer
        return int(line), end + 2
    if kind == 0x2D:  # - error
        return RedisReplyError(line.decode(errors="replace")), end + 2
    return line, end + 2  # + simple string


def _add_redis_user(secrets_dir: Path, user: str, rules: str) -> None:
    """A Redis user of the bench's own (password file and ACL line) in the bench's secrets."""
    password = redis_password_file(secrets_dir, user)
    password.write_text(os.urandom(18).hex() + "\n")
    digest = hashlib.sha256(password.read_text().strip().encode()).hexdigest()
    with (secrets_dir / "redis_users_acl").open("a") as fh:
        fh.write(f"user {user} on #{digest} {rules}\n")


class RedisConnection:
    """A minimal RESP2 client: commands pipelined on one connection, replies parsed by length.

    The bench's own sampling must cost little next to what it measures: redis-py spends tens of
    microseconds of Python per command, which at 10 polls a second of a few hundred keys was as much
    CPU as the sensor-reader's. One caller at a time (a lock)."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.port = port
        self.auth = ("AUTH", username, password)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        await self.execute([self.auth])

    async def execute(self, commands: Sequence[Sequence[str | int | bytes]]) -> list[Any]:
        """Every command's reply, in order; a Redis error reply raises RedisReplyError."""
        if not commands:
            return []
        async with self._lock:
            assert self._reader is not None and self._writer is not None, "connect() first"
            self._writer.write(b"".join(_encode(c) for c in commands))
            await self._writer.drain()
            replies: list[Any] = []
            buf, pos = b"", 0
            while len(replies) < len(commands):
                try:
                    value, pos = _parse(buf, pos)
                except _Incomplete:
                    chunk = await self._reader.read(1 << 20)
                    if not chunk:
                        raise ConnectionError("Redis closed the connection") from None
                    buf, pos = buf[pos:] + chunk, 0
                    continue
                replies.append(value)
        errors = [r for r in replies if isinstance(r, RedisReplyError)]
        if errors:
            raise errors[0]
        return replies

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


# -- lag sampling -------------------------------------------------------------------------------------


class LagSampler:
    """Polls the newest window start per sensor of a sample of devices every `period` s.

    iotpipe: `HGETALL <prefix>:latest_start:<device>` (sensor -> start ms), one per device, pipelined.
    naive: `MGET naive:<device>:<sensor>` (JSON with `start`). A window's lag is the time of the first
    poll that shows it, or a newer window of its sensor (windows of a sensor are contiguous: dropout 0),
    minus its end; a sensor's first window of a step counts only itself."""

    def __init__(self, redis: RedisConnection, period: float, window_ms: int = WINDOW_MS) -> None:
        self.redis = redis
        self.period = period
        self.window_ms = window_ms
        self.keys: list[str] = []
        self.naive = False
        self.min_start = 0
        self.seen: dict[tuple[str, str], int] = {}
        self.samples: list[tuple[int, int]] = []  # (window start, lag ms)
        self.first_seen: asyncio.Event = asyncio.Event()
        self.first_seen_at: float | None = None  # monotonic

    def watch(self, keys: list[str], min_start: int, *, naive: bool = False) -> None:
        self.keys = keys
        self.naive = naive
        self.min_start = min_start
        self.seen = {}
        self.samples = []
        self.first_seen = asyncio.Event()
        self.first_seen_at = None

    def newest(self) -> dict[str, int]:
        """Newest window start seen per watched device (naive: per key)."""
        out: dict[str, int] = {}
        for (device, _sensor), start in self.seen.items():
            out[device] = max(out.get(device, 0), start)
        return out

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            if self.keys:
                await self.poll()
            await asyncio.sleep(max(0.0, self.period - (time.monotonic() - began)))

    async def poll(self) -> None:
        keys = self.keys
        if self.naive:
            (values,) = await self.redis.execute([("MGET", *keys)])
            now = time.time_ns() // 1_000_000
            for key, value in zip(keys, values, strict=True):
                if value is not None:
                    self._saw((key, ""), int(json.loads(value)["start"]), now)
        else:
            results = await self.redis.execute([("HGETALL", key) for key in keys])
            now = time.time_ns() // 1_000_000
            for key, fields in zip(keys, results, strict=True):
                for i in range(0, len(fields), 2):
                    self._saw((key, fields[i].decode()), int(fields[i + 1]), now)

    def _saw(self, key: tuple[str, str], start: int, now: int) -> None:
        if start < self.min_start:
            return
        previous = self.seen.get(key)
        w = self.window_ms
        if previous is None:
            self.samples.append((start, now - start - w))
        elif start > previous:
            self.samples.extend((s, now - s - w) for s in range(previous + w, start + w, w))
        else:
            return
        self.seen[key] = start
        if not self.first_seen.is_set():
            self.first_seen_at = time.monotonic()
            self.first_seen.set()

    def lags(self, first_end: int, last_end: int) -> list[int]:
        """Lags (ms) of the windows that ended in [first_end, last_end] (unix ms)."""
        w = self.window_ms
        return [lag for start, lag in self.samples if first_end <= start + w <= last_end]


# -- the run ------------------------------------------------------------------------------------------


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _floor(ms: float, window_ms: int = WINDOW_MS) -> int:
    return int(ms) // window_ms * window_ms


# Windows reach Redis in bursts, one a window length: measuring from and to the same phase of the
# window clock, away from the bursts (Bench._quiet_phase), counts whole bursts, not one more or less.
MEASURE_PHASE_MS = 500


def _to_phase(phase_ms: int = MEASURE_PHASE_MS, window_ms: int = WINDOW_MS) -> float:
    """Seconds from now to the next instant at `phase_ms` into a window."""
    return ((phase_ms - _ms()) % window_ms) / 1000


def _whole_windows(seconds: float, window_ms: int = WINDOW_MS) -> float:
    """`seconds` rounded to whole windows (at least one)."""
    return max(1, round(seconds * 1000 / window_ms)) * window_ms / 1000


class Bench:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.root = options.root.resolve()
        self.children: dict[str, Child] = {}
        self.results: dict[str, Any] = {}
        self.bench_pid = os.getpid()
        self._last_stop_ms: int | None = None

    # ---- set-up -------------------------------------------------------------------------------------

    def _prepare(self, workdir: Path) -> None:
        root = self.root
        for needed in ("mosquitto/mosquitto.conf", "mosquitto/acl", "redis/redis.conf"):
            if not (root / needed).exists():
                raise BenchError(f"{root / needed} not found: run from the project's root or pass --root")
        missing = [b for b in ("mosquitto", "redis-server") if shutil.which(b) is None]
        if missing:
            raise BenchError(f"{' and '.join(missing)} not found: `make bench` installs them (or the OS packages)")
        self.workdir = workdir
        self.var = workdir / "var"
        for sub in ("mosquitto", "redis", "log", "health", "cloud-sink", "state", "naive"):
            (self.var / sub).mkdir(parents=True, exist_ok=True)
        self.secrets = ensure_secrets(workdir / "secrets", redis_prefixes=(BASE,))
        self.ports = Ports(mqtt=_free_port(), mqtt_tls=_free_port(), redis=_free_port(), sink=_free_port())
        # The bench's own Redis users, added to the generated ACL: the services' rules are unchanged.
        _add_redis_user(self.secrets, NAIVE_USER, f"~{NAIVE_PREFIX}:* resetchannels -@all +set")
        _add_redis_user(
            self.secrets,
            OBSERVER_USER,
            f"%R~{BASE}:* %R~{NAIVE_PREFIX}:* resetchannels -@all "
            "+scan +hgetall +mget +zcount +zrangebyscore +zrevrangebyscore",
        )
        # The naive baseline's own broker user: the shipped ACL and password file plus one user.
        naive_password = mqtt_password_file(self.secrets, NAIVE_USER)
        naive_password.write_text(os.urandom(18).hex() + "\n")
        with (self.secrets / "mosquitto_passwd").open("a") as fh:
            fh.write(f"{NAIVE_USER}:{mosquitto_hash(naive_password.read_text().strip())}\n")
        acl = workdir / "acl"
        acl.write_text(
            (root / "mosquitto/acl").read_text()
            + f"\n# added by iotpipe bench for its naive baseline only\nuser {NAIVE_USER}\n"
            f"topic readwrite {NAIVE_PREFIX}/#\n"
        )
        broker_conf = render_broker_config(
            root / "mosquitto/mosquitto.conf",
            self.ports,
            self.secrets,
            self.var / "mosquitto",
            log_file=self.var / "log/broker.log",
        )
        shipped_acl = str((root / "mosquitto/acl").resolve())
        if shipped_acl not in broker_conf:
            raise BenchError("the rendered broker config names no ACL file: cannot add the baseline's user")
        (self.var / "mosquitto.conf").write_text(broker_conf.replace(shipped_acl, str(acl)))
        (self.var / "redis.conf").write_text(
            render_redis_config(root / "redis/redis.conf", self.ports, self.secrets, self.var / "redis")
        )
        self.devices_file = workdir / "devices.toml"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        env.update(stack_environment(root, self.var, self.secrets, self.ports))
        env.update(
            IOTPIPE_BASE_TOPIC=BASE,
            IOTPIPE_REDIS_PREFIX=BASE,
            IOTPIPE_DEVICES_FILE=str(self.devices_file),
            # The bench reads its own figures: no /metrics (every service would try 9100).
            IOTPIPE_METRICS_PORT="0",
        )
        self.env = env
        self.sink = SinkDb(Path(env["IOTPIPE_SINK_DB_FILE"]))
        logs = self.var / "log"
        python = sys.executable
        self.children = {
            "mosquitto": Child("mosquitto", ["mosquitto", "-c", str(self.var / "mosquitto.conf")], env, root, logs),
            "redis-server": Child("redis-server", ["redis-server", str(self.var / "redis.conf")], env, root, logs),
        }
        for name, module in MODULES.items():
            self.children[name] = Child(name, [python, "-m", module], env, root, logs)

    async def _connect_redis(self) -> RedisConnection:
        password = redis_password_file(self.secrets, OBSERVER_USER).read_text().strip()
        connection = RedisConnection(self.ports.redis, OBSERVER_USER, password)
        await connection.connect()
        return connection

    # ---- main ---------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        o = self.o
        started = datetime.datetime.now().astimezone()
        self.results = {
            "started": started.isoformat(timespec="seconds"),
            "machine": _machine(),
            "options": _jsonable(o.__dict__),
            "window_ms": WINDOW_MS,
            "lag_resolution_ms": round(o.lag_poll * 1000),
            "notes": [
                "lag: first poll of a sampled device's latest_start showing the window (or a newer one of its "
                "sensor) minus the window's end; resolution = the poll period",
                "achieved: windows that reached Redis during the measuring window x readings per window",
                "cpu_us_per_reading: CPU (utime+stime, reaped children too) over the measuring window / readings "
                "achieved; total excludes the cloud-sink, which stands in for the cloud",
                "lost: per sensor, windows missing between the device's first and last window seen at either "
                "sink; a window missing at both ends of that range cannot be seen",
            ],
            "startup_s": None,
            "steps": [],
            "baseline": [],
        }
        if o.workdir is not None:
            o.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="iotpipe-bench-", dir=o.workdir))
        self._prepare(workdir)
        self.results["workdir"] = str(workdir)
        redis: RedisConnection | None = None
        sampler_redis: RedisConnection | None = None
        sampler_task = None
        try:
            t_stack = time.monotonic()
            await self._start_servers()
            redis = await self._connect_redis()
            sampler_redis = await self._connect_redis()
            self.redis = redis
            self.sampler = LagSampler(sampler_redis, o.lag_poll)
            sampler_task = asyncio.create_task(self.sampler.run(), name="lag sampler")
            if o.workloads:
                await self._run_pipeline(t_stack)
            await self._stop_services()
            if o.baseline and o.baseline_steps:
                await self._run_baseline()
        finally:
            if sampler_task is not None:
                sampler_task.cancel()
                with contextlib.suppress(BaseException):
                    await sampler_task
            for connection in (redis, sampler_redis):
                if connection is not None:
                    await connection.close()
            await self._stop_all()
            if not o.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        self.results["ratio"] = ratios(self.results, o.lag_bound)
        return self.results

    async def _start_servers(self) -> None:
        for name, port in (("mosquitto", self.ports.mqtt), ("redis-server", self.ports.redis)):
            self.children[name].start()
            await _wait_port(port, self.children[name])

    async def _stop_services(self) -> None:
        for name in reversed(MODULES):
            await self.children[name].stop(30)

    async def _stop_all(self) -> None:
        for child in reversed(list(self.children.values())):
            try:
                await child.stop(15)
            except BaseException:
                child.kill()
                raise

    # ---- the pipeline ladders -------------------------------------------------------------------------

    async def _run_pipeline(self, t_stack: float) -> None:
        o = self.o
        first = True
        for name in o.workloads:
            workload = WORKLOADS[name]
            for devices in o.steps(name):
                click.echo(
                    f"[bench] {name}: {devices} devices, offering {workload.offered(devices):,.0f} readings/s",
                )
                try:
                    step = await self._pipeline_step(workload, devices, t_stack if first else None)
                except BenchError as exc:
                    click.echo(f"[bench] {name} step failed: {exc}")
                    self.results["steps"].append(
                        {"workload": name, "devices": devices, "offered": workload.offered(devices), "error": str(exc)}
                    )
                    if first:
                        raise
                    await self.children["sensor-reader"].stop(30)
                    dead = [n for n in MODULES if n != "sensor-reader" and not self.children[n].alive()]
                    if dead:
                        click.echo(f"[bench] {', '.join(dead)} died: no more pipeline steps")
                        return
                    break
                first = False
                self.results["steps"].append(step)
                click.echo(format_step(step))
                if not step["drained"]:
                    # What is left would be measured with the next steps: no more pipeline steps.
                    click.echo("[bench] backlog not drained: no more pipeline steps (--drain-timeout waits longer)")
                    return
                if step["achieved"] < 0.5 * step["offered"] and not o.keep_going:
                    click.echo(
                        f"[bench] {name}: achieved less than half the offered rate: higher steps skipped "
                        "(--keep-going climbs on)",
                    )
                    break

    async def _pipeline_step(self, workload: Workload, devices: int, t_stack: float | None) -> dict[str, Any]:
        o = self.o
        ids = workload.device_ids(devices)
        self.devices_file.write_text(workload.devices_toml(devices))
        reader = self.children["sensor-reader"]
        # A step's windows start after the previous step's last one, so each step is counted apart.
        if self._last_stop_ms is not None:
            await asyncio.sleep(max(0.0, (_floor(self._last_stop_ms) + 2 * WINDOW_MS - _ms()) / 1000))
        seq0, dup0 = self.sink.position()
        reader_start_ms = _ms()
        min_start = _floor(reader_start_ms)
        sample = random.Random(devices).sample(ids, min(o.lag_devices, len(ids)))
        self.sampler.watch([f"{BASE}:latest_start:{d}" for d in sample], min_start)
        if t_stack is not None:  # the first step: the whole stack starts, in the Procfile's order
            for name in MODULES:
                self.children[name].start()
        else:
            reader.start()
        await self._wait_first_window(workload)
        if t_stack is not None:
            assert self.sampler.first_seen_at is not None
            self.results["startup_s"] = round(self.sampler.first_seen_at - t_stack, 2)
            await self._wait_online()
        await self._sleep_checked(o.warmup)
        phase = self._quiet_phase()
        await self._sleep_checked(_to_phase(phase))
        series = [f"{BASE}:series:{d}:{s}" for d in ids for s in workload.sensors]
        measure = _whole_windows(o.measure_seconds(workload.name))
        before = await self._snapshot(series, min_start, (*PIPELINE, "cloud-sink"))
        reader_before = _reader_counters(self._health("sensor-reader"))
        progress: list[tuple[float, int]] = [(before["t"], before["windows"])]
        end = time.monotonic() + measure - 0.3  # then to the phase again
        while (left := end - time.monotonic()) > 0:
            await self._sleep_checked(min(left, 10.0))
            if end - time.monotonic() > 1:
                t, count = await self._count(series, min_start)
                progress.append((t, count))
        await self._sleep_checked(_to_phase(phase))
        after = await self._snapshot(series, min_start, (*PIPELINE, "cloud-sink"))
        progress.append((after["t"], after["windows"]))
        reader_after = _reader_counters(self._health("sensor-reader"))
        memory = {name: memory_mib(self.children[name].pid) for name in (*PIPELINE, "cloud-sink")}
        memory["bench"] = memory_mib(self.bench_pid)
        stop_ms, stopped_at = _ms(), time.monotonic()
        clean_stop = await reader.stop(60)
        self._last_stop_ms = _ms()
        drained, drain_s = await self._drain(series, min_start, seq0, workload, stop_ms, stopped_at)
        final = self._health("sensor-reader")  # written as it stopped, its pollers done
        accounting = await self._account(
            workload, ids, min_start, seq0, dup0, _skipped_polls(final), _samples(final, workload)
        )
        rpw = workload.readings_per_window()
        seconds = after["t"] - before["t"]
        readings = (after["windows"] - before["windows"]) * rpw
        m0, m1 = before["wall_ms"], after["wall_ms"]
        lags = self.sampler.lags(m0, m1)
        step: dict[str, Any] = {
            "workload": workload.name,
            "devices": devices,
            "sensors": len(workload.sensors),
            "hz": workload.hz,
            "readings_per_window": rpw,
            "offered": workload.offered(devices),
            "achieved": round(readings / seconds, 1) if seconds > 0 else 0.0,
            "achieved_intervals": _interval_rates(progress, rpw),
            "reader_published": _rate(reader_before, reader_after),
            "measure_s": round(seconds, 2),
            "warmup_s": o.warmup,
            "lag_ms": _lag_summary(lags, len(sample), o.lag_poll),
            **accounting,
            **_cpu(before, after, readings, PIPELINE, "cloud-sink"),
            "memory_mib": memory,
            "reader_stopped_cleanly": clean_stop,
            "drained": drained,
            "drain_s": round(drain_s, 1),
        }
        return step

    async def _wait_first_window(self, workload: Workload) -> None:
        reader = self.children["sensor-reader"]
        deadline = time.monotonic() + self.o.first_window_timeout
        while not self.sampler.first_seen.is_set():
            if not reader.alive():
                raise BenchError(f"the sensor-reader exited:\n{reader.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"no {workload.name} window in Redis after {self.o.first_window_timeout:.0f}s; "
                    f"sensor-reader says:\n{reader.tail()}"
                )
            await asyncio.sleep(0.05)

    async def _wait_online(self, timeout: float = 60.0) -> None:
        """Every service's health file says online (their first heartbeat)."""
        deadline = time.monotonic() + timeout
        while True:
            offline = [s for s in SERVICES if self._health(s).get("state") != "online"]
            if not offline:
                return
            for name in offline:
                if not self.children[name].alive():
                    raise BenchError(f"{name} exited:\n{self.children[name].tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"not online after {timeout:.0f}s: {', '.join(offline)}")
            await asyncio.sleep(0.1)

    def _quiet_phase(self) -> int:
        """Where in the window clock (ms) Redis is quietest: half a window from when the step's
        windows have been arriving (their end plus the median lag so far)."""
        p50 = percentile([lag for _start, lag in self.sampler.samples], 50)
        return MEASURE_PHASE_MS if p50 is None else int(p50 + WINDOW_MS // 2) % WINDOW_MS

    def _health(self, service: str) -> dict[str, Any]:
        try:
            doc = json.loads((self.var / "health" / f"{service}-{INSTANCE}.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    async def _sleep_checked(self, seconds: float, names: Iterable[str] = (*MODULES,)) -> None:
        """Sleep, failing as soon as a process of the run has died."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.5))
            for name in (*names, "mosquitto", "redis-server"):
                child = self.children[name]
                if child.proc is not None and not child.alive():
                    raise BenchError(f"{name} exited (code {child.proc.returncode}):\n{child.tail()}")

    async def _count(self, series: list[str], min_start: int) -> tuple[float, int]:
        """(monotonic time at the middle of the count, windows in Redis in `series` from `min_start`)."""
        t0 = time.monotonic()
        total = 0
        for i in range(0, len(series), 5000):
            total += sum(await self.redis.execute([("ZCOUNT", key, min_start, "+inf") for key in series[i : i + 5000]]))
        return (t0 + time.monotonic()) / 2, total

    async def _snapshot(self, series: list[str], min_start: int, names: Iterable[str]) -> dict[str, Any]:
        cpu = {name: cpu_seconds(self.children[name].pid) for name in names}
        cpu["bench"] = cpu_seconds(self.bench_pid)
        busy, total = machine_cpu()
        wall_ms = _ms()
        t, windows = await self._count(series, min_start)
        return {"t": t, "wall_ms": wall_ms, "windows": windows, "cpu": cpu, "machine": (busy, total)}

    async def _drain(
        self, series: list[str], min_start: int, seq0: int, workload: Workload, stop_ms: int, stopped_at: float
    ) -> tuple[bool, float]:
        """Wait until Redis and the sink hold as many windows of the step and neither has changed for
        3 s (15 s if some sampled device's newest window is older than its last poll could make it).
        Returns (drained, s from the reader's stop to the last change)."""
        deadline = time.monotonic() + self.o.drain_timeout
        tail = _floor(stop_ms - 1000 * workload.interval - 2 * WINDOW_MS)
        last: tuple[int, int] | None = None
        stable_since = time.monotonic()
        while True:
            _t, in_redis = await self._count(series, min_start)
            in_sink = await asyncio.to_thread(self.sink.count_since, seq0)
            now = time.monotonic()
            if (in_redis, in_sink) != last:
                last, stable_since = (in_redis, in_sink), now
            newest = self.sampler.newest()
            tail_ok = len(newest) == len(self.sampler.keys) and all(v >= tail for v in newest.values())
            quiet = now - stable_since
            if in_redis > 0 and in_sink >= in_redis and quiet >= (3 if tail_ok else 15):
                return True, stable_since - stopped_at
            if now > deadline:
                return False, now - stopped_at
            await self._sleep_checked(1.0, names=[n for n in MODULES if n != "sensor-reader"])

    async def _account(
        self,
        workload: Workload,
        ids: list[str],
        min_start: int,
        seq0: int,
        dup0: int,
        skipped: int | None,
        produced: int | None,
    ) -> dict[str, Any]:
        """Lost / duplicated / unexpected windows of the step at Redis and at the sink.

        Expected, per sensor: every window from its device's first to its last window seen at either
        sink (all sensors of a device share them: dropout is 0). A window missing at both sinks may
        never have been produced: with one sample per poll, stamped when it is taken (fleet), a poll
        that ran late into the next window (which then has 2 readings) or was skipped leaves its
        window empty. So for that workload the readings are counted too: the reader's own count of
        samples taken (its health file) against the readings (`n`) the sink holds; windows missing at
        both sinks beyond what those readings account for are lost, the rest are `source_gaps`."""
        w = WINDOW_MS
        sensors = workload.sensors
        device_set, sensor_set = set(ids), set(sensors)
        redis_spans: dict[tuple[str, str], tuple[int, int, int]] = {}
        keys = [(d, s) for d in ids for s in sensors]
        for i in range(0, len(keys), 2000):
            chunk = keys[i : i + 2000]
            commands: list[tuple[str | int, ...]] = []
            for d, s in chunk:
                key = f"{BASE}:series:{d}:{s}"
                commands.append(("ZCOUNT", key, min_start, "+inf"))
                commands.append(("ZRANGEBYSCORE", key, min_start, "+inf", "WITHSCORES", "LIMIT", 0, 1))
                commands.append(("ZREVRANGEBYSCORE", key, "+inf", min_start, "WITHSCORES", "LIMIT", 0, 1))
            replies = await self.redis.execute(commands)
            for j, (d, s) in enumerate(chunk):
                count, first, last = replies[3 * j : 3 * j + 3]
                if count:  # [member, score]
                    redis_spans[(d, s)] = (int(count), int(first[1]), int(last[1]))
        sink = await asyncio.to_thread(self.sink.windows_since, seq0)
        _seq, dup1 = await asyncio.to_thread(self.sink.position)
        unexpected_sink = 0
        for (d, s), starts in sink.starts.items():
            if d not in device_set or s not in sensor_set:
                unexpected_sink += len(starts)
            else:
                early = {x for x in starts if x < min_start}  # an earlier step's, arriving late
                unexpected_sink += len(early)
                starts -= early
        ranges: dict[str, list[int]] = {}
        for (d, _s), (_count, first, last) in redis_spans.items():
            r = ranges.setdefault(d, [first, last])
            r[0], r[1] = min(r[0], first), max(r[1], last)
        for (d, s), starts in sink.starts.items():
            if d in device_set and s in sensor_set and starts:
                r = ranges.setdefault(d, [min(starts), max(starts)])
                r[0], r[1] = min(r[0], min(starts)), max(r[1], max(starts))
        longest = max(((b - a) // w + 1 for a, b in ranges.values()), default=0)
        expected = missing_redis = missing_sink = missing_both = unseen = 0
        both_candidates: list[tuple[str, str]] = []
        for d in ids:
            if d not in ranges:  # never seen: the step's longest range counts as missing everywhere
                unseen += 1
                n = longest * len(sensors)
                expected += n
                missing_redis += n
                missing_sink += n
                missing_both += n
                continue
            first, last = ranges[d]
            span = (last - first) // w + 1
            for s in sensors:
                expected += span
                at_redis = span - redis_spans.get((d, s), (0, 0, 0))[0]
                at_sink = span - len(sink.starts.get((d, s), ()))
                missing_redis += at_redis
                missing_sink += at_sink
                if at_redis and at_sink:
                    both_candidates.append((d, s))
        examples: list[str] = []
        for i in range(0, len(both_candidates), 500):
            chunk = both_candidates[i : i + 500]
            replies = await self.redis.execute(
                [
                    ("ZRANGEBYSCORE", f"{BASE}:series:{d}:{s}", ranges[d][0], ranges[d][1], "WITHSCORES")
                    for d, s in chunk
                ]
            )
            for (d, s), members in zip(chunk, replies, strict=True):
                first, last = ranges[d]
                want = set(range(first, last + w, w))
                in_redis = {int(score) for score in members[1::2]}
                both = want - in_redis - sink.starts.get((d, s), set())
                missing_both += len(both)
                if both and len(examples) < 5:
                    examples.append(f"{d}/{s}: {len(both)} missing at both sinks, e.g. starts {sorted(both)[:3]}")
        at_sink = sum(n for key, n in sink.readings.items() if key[0] in device_set)
        doubled = 0
        source_gaps = 0
        if workload.sample_rate is None:  # one sample per poll, stamped when taken
            # A window with n > 1 took a neighbour's poll (a late poll crossed the boundary).
            doubled = sum(n - len(sink.starts.get(key, ())) for key, n in sink.readings.items() if key[0] in device_set)
            seen = missing_both - unseen * longest * len(sensors)
            if produced is not None:
                # Every sample the reader took (its own count) is a reading; those not at the sink, less
                # the windows only the sink lacks, are what is missing at both: the rest never existed.
                lost_upstream = produced - at_sink - (missing_sink - missing_both)
                source_gaps = seen - min(seen, max(0, lost_upstream))
            else:
                source_gaps = min(seen, (skipped or 0) * len(sensors) + doubled)
        lost_redis = missing_redis - source_gaps
        lost_sink = missing_sink - source_gaps
        unexpected_redis = await self._unexpected_in_redis(device_set, sensor_set, min_start)
        return {
            "windows_expected": expected - source_gaps,
            "lost_redis": lost_redis,
            "lost_sink": lost_sink,
            "lost_at_both": missing_both - source_gaps,
            # windows missing at one sink or both
            "lost": missing_redis + missing_sink - missing_both - source_gaps,
            "source_gaps": source_gaps,
            "reader_skipped_polls": skipped,
            "readings_produced": produced,
            "doubled_windows": doubled,
            "duplicated_redis": 0,  # idempotent by construction: one member per window start
            "duplicated_sink": dup1 - dup0,
            "duplicated": dup1 - dup0,
            "unexpected_redis": unexpected_redis,
            "unexpected_sink": unexpected_sink,
            "unexpected": unexpected_redis + unexpected_sink,
            "devices_unseen": unseen,
            "readings_at_sink": at_sink,
            "alert_records": sink.others,
            "loss_examples": examples,
        }

    async def _unexpected_in_redis(self, devices: set[str], sensors: set[str], min_start: int) -> int:
        """Windows from `min_start` on in Redis of devices or sensors that the step's file does not have."""
        prefix = f"{BASE}:latest_start:"
        count = 0
        cursor: bytes | int = 0
        while True:
            ((cursor, keys),) = await self.redis.execute([("SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", 1000)])
            for key in keys:
                device = key.decode()[len(prefix) :]
                (fields,) = await self.redis.execute([("HGETALL", key)])
                for i in range(0, len(fields), 2):
                    sensor, start = fields[i].decode(), int(fields[i + 1])
                    if start >= min_start and (device not in devices or sensor not in sensors):
                        (n,) = await self.redis.execute(
                            [("ZCOUNT", f"{BASE}:series:{device}:{sensor}", min_start, "+inf")]
                        )
                        count += n
            if int(cursor) == 0:
                return count

    # ---- the naive baseline ---------------------------------------------------------------------------

    async def _run_baseline(self) -> None:
        for rate in self.o.baseline_steps:
            devices = max(1, round(rate / (len(NAIVE_SENSORS) * NAIVE_HZ)))
            offered = devices * len(NAIVE_SENSORS) * NAIVE_HZ
            click.echo(f"[bench] naive baseline: {devices} devices, offering {offered:,.0f} readings/s")
            try:
                step = await self._naive_step(devices)
            except BenchError as exc:
                click.echo(f"[bench] naive step failed: {exc}")
                self.results["baseline"].append({"workload": "naive", "devices": devices, "error": str(exc)})
                break
            self.results["baseline"].append(step)
            click.echo(format_step(step))
            if not step["drained"]:
                click.echo("[bench] naive: backlog not drained, higher steps skipped")
                break
            if step["achieved"] < 0.5 * step["offered"] and not self.o.keep_going:
                click.echo("[bench] naive: achieved less than half the offered rate: higher steps skipped")
                break

    def _naive_child(self, role: str, stats: Path, devices: int) -> Child:
        port = self.ports.mqtt
        argv = [
            sys.executable,
            "-m",
            "iotpipe.bench",
            role,
            "--port",
            str(port),
            "--password-file",
            str(mqtt_password_file(self.secrets, NAIVE_USER)),
            "--stats",
            str(stats),
        ]
        if role == "naive-publisher":
            argv += ["--devices", str(devices), "--hz", str(NAIVE_HZ), "--sensors", ",".join(NAIVE_SENSORS)]
        else:
            argv += [
                "--redis-port",
                str(self.ports.redis),
                "--redis-password-file",
                str(redis_password_file(self.secrets, NAIVE_USER)),
            ]
        return Child(role, argv, self.env, self.root, self.var / "log")

    async def _naive_step(self, devices: int) -> dict[str, Any]:
        o = self.o
        offered = devices * len(NAIVE_SENSORS) * NAIVE_HZ
        rpw = NAIVE_HZ * WINDOW_MS / 1000
        stats_dir = self.var / "naive"
        sub_stats, pub_stats = stats_dir / f"sub-{devices}.json", stats_dir / f"pub-{devices}.json"
        sub = self.children["naive-subscriber"] = self._naive_child("naive-subscriber", sub_stats, devices)
        pub = self.children["naive-publisher"] = self._naive_child("naive-publisher", pub_stats, devices)
        ids = [f"nv-{i:04d}" for i in range(1, devices + 1)]
        min_start = _floor(_ms())
        sampled = random.Random(devices).sample(ids, min(len(ids), max(1, o.lag_devices // len(NAIVE_SENSORS))))
        self.sampler.watch([f"{NAIVE_PREFIX}:{d}:{s}" for d in sampled for s in NAIVE_SENSORS], min_start, naive=True)
        names: tuple[str, ...] = ("naive-subscriber",)
        try:
            sub.start()
            deadline = time.monotonic() + 30
            while not _read_stats(sub_stats).get("ready"):
                if not sub.alive() or time.monotonic() > deadline:
                    raise BenchError(f"the naive subscriber did not subscribe:\n{sub.tail()}")
                await asyncio.sleep(0.05)
            pub.start()
            names = ("naive-subscriber", "naive-publisher")
            deadline = time.monotonic() + o.first_window_timeout
            while not self.sampler.first_seen.is_set():
                if not pub.alive() or not sub.alive() or time.monotonic() > deadline:
                    raise BenchError(f"no naive window in Redis:\n{pub.tail()}\n{sub.tail()}")
                await asyncio.sleep(0.05)
            await self._sleep_checked(o.warmup, names)
            phase = self._quiet_phase()
            await self._sleep_checked(_to_phase(phase), names)
            before = await self._naive_snapshot(sub_stats, pub_stats)
            await self._sleep_checked(_whole_windows(o.step_seconds) - 0.3, names)
            await self._sleep_checked(_to_phase(phase), names)
            after = await self._naive_snapshot(sub_stats, pub_stats)
            memory = {name: memory_mib(self.children[name].pid) for name in NAIVE_PROCESSES}
            memory["bench"] = memory_mib(self.bench_pid)
            await pub.stop(60)
            # Published: what the broker acknowledged; what paho still queued when it stopped was never sent.
            published = int(_read_stats(pub_stats).get("acked", 0))
            t0 = time.monotonic()
            drained = False
            while time.monotonic() - t0 < o.drain_timeout:
                if int(_read_stats(sub_stats).get("messages", 0)) >= published:
                    drained = True
                    break
                await self._sleep_checked(0.2, ("naive-subscriber",))
            drain_s = time.monotonic() - t0
            await asyncio.sleep(2 * o.lag_poll)  # the sampler sees the last SETs
        finally:
            await pub.stop(30)
            await sub.stop(30)
        final = _read_stats(sub_stats)
        received = int(final.get("messages", 0))
        seconds = after["stats_t"] - before["stats_t"]
        readings = after["readings_written"] - before["readings_written"]
        sent_rate = (after["sent"] - before["sent"]) / (after["pub_t"] - before["pub_t"]) if after["pub_t"] else 0
        return {
            "workload": "naive",
            "devices": devices,
            "sensors": len(NAIVE_SENSORS),
            "hz": NAIVE_HZ,
            "readings_per_window": rpw,
            "offered": offered,
            "achieved": round(readings / seconds, 1) if seconds > 0 else 0.0,
            "publisher_acked": round(sent_rate, 1),  # readings/s the broker acknowledged
            "measure_s": round(seconds, 2),
            "warmup_s": o.warmup,
            "lag_ms": _lag_summary(
                self.sampler.lags(before["wall_ms"], after["wall_ms"]), len(sampled) * len(NAIVE_SENSORS), o.lag_poll
            ),
            "messages_published": published,
            "messages_received": received,
            "lost": max(0, published - received) if drained else None,
            "backlog": None if drained else published - received,
            "late_readings": int(final.get("late", 0)),
            **_cpu(before, after, readings, NAIVE_PROCESSES, None),
            "memory_mib": memory,
            "drained": drained,
            "drain_s": round(drain_s, 1),
        }

    async def _naive_snapshot(self, sub_stats: Path, pub_stats: Path) -> dict[str, Any]:
        cpu = {name: cpu_seconds(self.children[name].pid) for name in NAIVE_PROCESSES}
        cpu["bench"] = cpu_seconds(self.bench_pid)
        sub, pub = _read_stats(sub_stats), _read_stats(pub_stats)
        return {
            "t": time.monotonic(),
            "wall_ms": _ms(),
            "cpu": cpu,
            "machine": machine_cpu(),
            "stats_t": float(sub.get("t", 0.0)),
            "readings_written": int(sub.get("readings_written", 0)),
            "pub_t": float(pub.get("t", 0.0)),
            "sent": int(pub.get("acked", 0)),
        }


# -- figures --------------------------------------------------------------------------------------------


def _reader_counters(health: dict[str, Any]) -> tuple[int, float] | None:
    """(heartbeat ts ms, readings the reader has published) from its health file."""
    counters = health.get("counters")
    if not isinstance(counters, dict) or "ts" not in health:
        return None
    return int(health["ts"]), float(counter(counters, "readings"))


def _skipped_polls(health: dict[str, Any]) -> int | None:
    """Polls the reader skipped because the previous one ran late, all devices (its health file,
    written as it stops)."""
    devices = health.get("devices")
    if not isinstance(devices, dict):
        return None
    return sum(int(d.get("skipped_ticks", 0)) for d in devices.values() if isinstance(d, dict))


def _samples(health: dict[str, Any], workload: Workload) -> int | None:
    """Readings the reader took, from its own count of successful reads per device (its health file,
    written as it stops), for one-sample-per-poll workloads (dropout 0: every read has every sensor)."""
    devices = health.get("devices")
    if workload.sample_rate is not None or not isinstance(devices, dict):
        return None
    reads = [d.get("reads") for d in devices.values() if isinstance(d, dict)]
    counts = [r for r in reads if isinstance(r, int)]
    if not counts or len(counts) != len(reads):
        return None
    return sum(counts) * len(workload.sensors)


def _rate(a: tuple[int, float] | None, b: tuple[int, float] | None) -> float | None:
    if a is None or b is None or b[0] <= a[0]:
        return None
    return round((b[1] - a[1]) / ((b[0] - a[0]) / 1000), 1)


def _interval_rates(progress: list[tuple[float, int]], rpw: float) -> list[float]:
    return [
        round((c1 - c0) * rpw / (t1 - t0), 1) for (t0, c0), (t1, c1) in itertools.pairwise(progress) if t1 - t0 > 0.5
    ]


def _lag_summary(lags: list[int], sampled: int, poll: float) -> dict[str, Any]:
    return {
        "p50": percentile(lags, 50),
        "p99": percentile(lags, 99),
        "max": max(lags) if lags else None,
        "samples": len(lags),
        "sampled_series": sampled,
        "resolution_ms": round(poll * 1000),
    }


def _cpu(
    before: dict[str, Any], after: dict[str, Any], readings: float, pipeline: Sequence[str], cloud: str | None
) -> dict[str, Any]:
    seconds = after["t"] - before["t"]
    used: dict[str, float] = {}
    for name, start in before["cpu"].items():
        end = after["cpu"].get(name)
        if start is not None and end is not None:
            used[name] = end - start
    per_reading = {name: round(1e6 * s / readings, 3) if readings else None for name, s in used.items()}
    cores = {name: round(s / seconds, 3) if seconds > 0 else None for name, s in used.items()}
    total = sum(used.get(name, 0.0) for name in pipeline)
    busy = after["machine"][0] - before["machine"][0]
    ours = sum(used.values())
    return {
        "cpu_us_per_reading": per_reading,
        "cpu_us_per_reading_total": round(1e6 * total / readings, 3) if readings else None,
        "cpu_cores": cores,
        "cpu_cores_total": round(total / seconds, 3) if seconds > 0 else None,
        "machine_busy_cores": round(busy / seconds, 3) if seconds > 0 else None,
        "other_load_cores": round(max(0.0, busy - ours) / seconds, 3) if seconds > 0 else None,
        "cpu_total_excludes": cloud,
    }


def ratios(results: dict[str, Any], lag_bound: float) -> dict[str, Any]:
    """Per workload: the best rate achieved with p99 lag within `lag_bound`, and its ratio to the
    baseline's best under the same bound. `*_at_top`: that best was the ladder's highest step, so the
    capacity at that lag is at least this (the ladder did not reach it)."""

    def best(steps: list[dict[str, Any]]) -> tuple[float | None, bool]:
        done = [s for s in steps if "error" not in s]
        ok = [s for s in done if s["lag_ms"]["p99"] is not None and s["lag_ms"]["p99"] <= lag_bound * 1000]
        if not ok:
            return None, False
        top = max(ok, key=lambda s: s["achieved"])
        return top["achieved"], top["offered"] == max(s["offered"] for s in steps)

    naive, naive_top = best(results.get("baseline", []))
    out: dict[str, Any] = {"lag_bound_s": lag_bound, "baseline_best": naive, "baseline_at_top": naive_top}
    for name in WORKLOADS:
        steps = [s for s in results.get("steps", []) if s.get("workload") == name]
        if not steps:
            continue
        mine, mine_top = best(steps)
        out[f"{name}_best"] = mine
        out[f"{name}_at_top"] = mine_top
        out[f"{name}_over_baseline"] = round(mine / naive, 2) if mine and naive else None
    return out


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def format_step(step: dict[str, Any]) -> str:
    if "error" in step:
        return f"  {step['workload']:<6} {step.get('devices', '-'):>6}  error: {step['error'].splitlines()[0]}"
    lag = step["lag_ms"]
    cores = step["cpu_cores"]
    busiest = max((n for n in cores if n != "bench" and cores[n] is not None), key=lambda n: cores[n], default=None)
    if step["workload"] == "naive":
        accounting = (
            f"sent {_fmt(step['publisher_acked'])}/s, lost msgs {_fmt(step['lost'])}"
            if step["drained"]
            else f"sent {_fmt(step['publisher_acked'])}/s, backlog {step['backlog']:,} msgs"
        )
    else:
        accounting = (
            f"lost R/S {step['lost_redis']}/{step['lost_sink']} dup S {step['duplicated_sink']} "
            f"unexp R/S {step['unexpected_redis']}/{step['unexpected_sink']}"
        )
        if step["source_gaps"]:
            accounting += (
                f" (never produced: {step['source_gaps']:,}, reader skipped {step['reader_skipped_polls']} polls)"
            )
    return (
        f"  {step['workload']:<6} {step['devices']:>6} {step['offered']:>11,.0f} {step['achieved']:>11,.0f} "
        f"{_fmt(lag['p50']):>7} {_fmt(lag['p99']):>7} {_fmt(lag['max']):>7} "
        f"{_fmt(step['cpu_us_per_reading_total'], ',.2f'):>8} "
        f"{(busiest or '-'):>16} {_fmt(cores.get(busiest) if busiest else None, '.2f'):>5}  "
        f"{accounting}  drain {step['drain_s']}s{'' if step['drained'] else ' (NOT drained)'}"
    )


TABLE_HEADER = (
    f"  {'load':<6} {'devs':>6} {'offered/s':>11} {'achieved/s':>11} {'lag p50':>7} {'p99':>7} {'max':>7} "
    f"{'µs/read':>8} {'busiest process':>16} {'cores':>5}  windows"
)


def format_report(results: dict[str, Any]) -> str:
    lines = [
        "",
        f"iotpipe bench, {results['started']}: {results['machine']['cores']} cores, "
        f"load {results['machine']['loadavg']} at start; windows {results['window_ms']} ms",
        f"start-up (stack start to first window in Redis): {_fmt(results.get('startup_s'), '.2f')} s",
        f"lag in ms from a window's end to its arrival in Redis; resolution {results['lag_resolution_ms']} ms "
        "(the poll period); µs/read: CPU per reading of the pipeline without the cloud-sink",
        TABLE_HEADER,
    ]
    lines += [format_step(s) for s in (*results["steps"], *results["baseline"])]
    lines += ["", "  CPU µs per reading (cores busy) and RSS/peak MiB per process, per step:"]
    for step in (*results["steps"], *results["baseline"]):
        if "error" in step:
            continue
        parts = [
            f"{name} {_fmt(us, ',.2f')} ({_fmt(step['cpu_cores'].get(name), '.2f')}) "
            f"{_fmt(step['memory_mib'].get(name, {}).get('rss'), '.0f')}/"
            f"{_fmt(step['memory_mib'].get(name, {}).get('hwm'), '.0f')}"
            for name, us in step["cpu_us_per_reading"].items()
        ]
        lines.append(
            f"  {step['workload']} {step['devices']} devs: "
            + "; ".join(parts)
            + f"; machine busy {_fmt(step['machine_busy_cores'], '.2f')} cores, "
            f"others {_fmt(step['other_load_cores'], '.2f')}"
        )
    ratio = results.get("ratio", {})
    if ratio:
        bound = ratio["lag_bound_s"]
        lines.append("")
        top = " (its ladder's top step: at least this)"
        lines.append(
            f"  best achieved with p99 lag <= {bound:g} s: naive baseline {_fmt(ratio.get('baseline_best'))} "
            f"readings/s{top if ratio.get('baseline_at_top') else ''}"
        )
        for name in WORKLOADS:
            if f"{name}_best" in ratio:
                at_top = top if ratio[f"{name}_at_top"] else ""
                lines.append(
                    f"  iotpipe {name}: {_fmt(ratio[f'{name}_best'])} readings/s{at_top}; "
                    f"iotpipe {name} / baseline at equal lag = {_fmt(ratio.get(f'{name}_over_baseline'), '.2f')}"
                )
    return "\n".join(lines)


def draw_chart(results: dict[str, Any], path: Path) -> None:
    """Achieved readings/s and p99 lag against offered readings/s, one line per workload and one for
    the naive baseline (matplotlib, Agg: no display needed). Log axes: the workloads span 100x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(13, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    rate_ax, lag_ax = fig.subplots(1, 2)
    ok = [s for s in results["steps"] if "error" not in s and s["achieved"] > 0]
    series = {f"iotpipe {name}": [s for s in ok if s["workload"] == name] for name in WORKLOADS}
    series["naive baseline"] = [s for s in results["baseline"] if "error" not in s and s["achieved"] > 0]
    low, high = float("inf"), 0.0
    for label, steps in series.items():
        if not steps:
            continue
        steps = sorted(steps, key=lambda s: s["offered"])
        offered = [s["offered"] for s in steps]
        achieved = [s["achieved"] for s in steps]
        low, high = min(low, *offered, *achieved), max(high, *offered, *achieved)
        rate_ax.plot(offered, achieved, marker="o", label=label)
        lags = [(s["offered"], s["lag_ms"]["p99"] / 1000) for s in steps if s["lag_ms"]["p99"] is not None]
        if lags:
            lag_ax.plot([x for x, _ in lags], [max(y, 0.001) for _, y in lags], marker="o", label=label)
    if high > 0:
        rate_ax.plot([low, high], [low, high], linestyle=":", color="grey", label="achieved = offered")
    readings = FuncFormatter(lambda x, _pos: f"{x:,.0f}")
    seconds = FuncFormatter(lambda x, _pos: f"{x:g}")
    rate_ax.set(xlabel="offered readings/s", ylabel="achieved readings/s (into Redis)", title="Throughput")
    lag_ax.set(
        xlabel="offered readings/s",
        ylabel="p99 lag, window end to Redis (s)",
        title=f"Lag (resolution {results['lag_resolution_ms']} ms)",
    )
    for ax in (rate_ax, lag_ax):
        if ax.get_lines():
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(readings)
            ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
    if rate_ax.get_lines():
        rate_ax.yaxis.set_major_formatter(readings)
    if lag_ax.get_lines():
        lag_ax.yaxis.set_major_formatter(seconds)
    fig.suptitle(f"iotpipe bench {results['started']} ({results['machine']['cores']} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else None

    return {
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "python": sys.version.split()[0],
        "mosquitto": version(["mosquitto", "-h"]),
        "redis": version(["redis-server", "--version"]),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _read_stats(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_stats(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


# -- the naive baseline's two processes (python -m iotpipe.bench naive-publisher|naive-subscriber) ------


def _naive_client(args: argparse.Namespace, client_id: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(NAIVE_USER, Path(args.password_file).read_text().strip())
    return client


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def naive_publisher(args: argparse.Namespace) -> None:
    """One JSON reading per message, QoS 1, every device's sensors `hz` times a second."""
    stop = _stop_event()
    client = _naive_client(args, f"{NAIVE_USER}-pub-{os.getpid()}")
    acked = 0

    def on_publish(_client: Any, _userdata: Any, _mid: int, _rc: Any, _props: Any) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    rng = random.Random(1)
    topics = [
        (d, s, f"{NAIVE_PREFIX}/{d}/{s}")
        for d in (f"nv-{i:04d}" for i in range(1, args.devices + 1))
        for s in args.sensors.split(",")
    ]
    period = 1.0 / args.hz
    next_tick = time.time()
    sent = 0
    next_stats = 0.0
    while not stop.is_set():
        ts = time.time_ns() // 1_000_000
        for device, sensor, topic in topics:
            payload = json.dumps({"device": device, "sensor": sensor, "ts": ts, "value": round(rng.gauss(20, 1), 3)})
            client.publish(topic, payload, qos=1)
            sent += 1
        now = time.time()
        if now >= next_stats:
            _write_stats(args.stats, {"t": now, "sent": sent, "acked": acked})
            next_stats = now + 0.25
        next_tick += period
        if next_tick > now:
            stop.wait(next_tick - now)
    deadline = time.time() + 5  # what is in flight; paho's queue behind it is dropped (never sent)
    while acked < sent and time.time() < deadline:
        time.sleep(0.01)
    _write_stats(args.stats, {"t": time.time(), "sent": sent, "acked": acked, "done": True})
    client.disconnect()
    client.loop_stop()


def naive_subscriber(args: argparse.Namespace) -> None:
    """One message at a time: a list per (device, sensor) for the current 1-s window; when a later
    window's reading arrives, the mean of the closed one goes to Redis with a blocking SET."""
    import redis

    stop = _stop_event()
    store = redis.Redis(
        host="127.0.0.1",
        port=args.redis_port,
        username=NAIVE_USER,
        password=Path(args.redis_password_file).read_text().strip(),
    )
    client = _naive_client(args, f"{NAIVE_USER}-sub-{os.getpid()}")
    windows: dict[tuple[str, str], tuple[int, list[float]]] = {}
    counts = {"messages": 0, "windows": 0, "readings_written": 0, "late": 0}
    ready = threading.Event()

    def on_connect(client: Any, _userdata: Any, _flags: Any, _rc: Any, _props: Any) -> None:
        client.subscribe(f"{NAIVE_PREFIX}/#", qos=1)

    def on_subscribe(_client: Any, _userdata: Any, _mid: int, _rcs: Any, _props: Any) -> None:
        ready.set()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        reading = json.loads(message.payload)
        key = (reading["device"], reading["sensor"])
        start = reading["ts"] - reading["ts"] % 1000
        counts["messages"] += 1
        current = windows.get(key)
        if current is None or start > current[0]:
            if current is not None:
                values = current[1]
                doc = {"start": current[0], "mean": sum(values) / len(values), "n": len(values)}
                store.set(f"{NAIVE_PREFIX}:{key[0]}:{key[1]}", json.dumps(doc))
                counts["windows"] += 1
                counts["readings_written"] += len(values)
            windows[key] = (start, [reading["value"]])
        elif start == current[0]:
            current[1].append(reading["value"])
        else:
            counts["late"] += 1

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    while not stop.wait(0.05):
        _write_stats(args.stats, {"t": time.time(), "ready": ready.is_set(), **counts})
    client.disconnect()
    client.loop_stop()
    _write_stats(args.stats, {"t": time.time(), "ready": ready.is_set(), **counts, "done": True})


def _worker(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m iotpipe.bench")
    parser.add_argument("role", choices=("naive-publisher", "naive-subscriber"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--hz", type=float, default=NAIVE_HZ)
    parser.add_argument("--sensors", default=",".join(NAIVE_SENSORS))
    parser.add_argument("--redis-port", type=int)
    parser.add_argument("--redis-password-file")
    args = parser.parse_args(argv)
    (naive_publisher if args.role == "naive-publisher" else naive_subscriber)(args)


# -- the command ------------------------------------------------------------------------------------------


def run_bench(options: Options) -> dict[str, Any]:
    """Run the whole bench; print the table, write the JSON and the chart; return the results."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = options.out or options.root / "var" / "bench" / f"{stamp}.json"
    chart = options.chart or out.with_suffix(".png")
    bench = Bench(options)
    results = asyncio.run(_main(bench))
    click.echo(format_report(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    results["json"], results["chart"] = str(out), str(chart)
    out.write_text(json.dumps(results, indent=2) + "\n")
    draw_chart(results, chart)
    click.echo(f"\nJSON: {out}\nchart: {chart}")
    return results


async def _main(bench: Bench) -> dict[str, Any]:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await bench.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _ints(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        steps = tuple(int(v.replace("_", "")) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not steps or min(steps) < 1:
        raise click.BadParameter("steps must be positive")
    return steps


@click.command("bench")
@click.option(
    "--workload",
    type=click.Choice(["high", "fleet", "both", "none"]),
    default="both",
    show_default=True,
    help="high: devices x 10 sensors x 250 Hz; fleet: devices x 4 sensors x 1 Hz; none: the baseline only",
)
@click.option("--high-steps", help="devices per step of the high workload [20,40,60,80,100,120]")
@click.option("--fleet-steps", help="devices per step of the fleet workload [1000,2500,5000,6000]")
@click.option("--baseline-steps", help="offered readings/s per step of the naive baseline [2000,...,40000]")
@click.option("--no-baseline", is_flag=True, help="skip the naive baseline")
@click.option("--step-seconds", type=float, default=30.0, show_default=True, help="measuring time per step")
@click.option("--warmup", type=float, default=10.0, show_default=True, help="s after a step's first window in Redis")
@click.option(
    "--sustain",
    "sustain_minutes",
    type=float,
    default=None,
    help="one step per workload at its target (high 100 devices, fleet 5,000) for this many minutes "
    "(0: 5 for high, 10 for fleet, the targets in docs/operations.md); the naive baseline is skipped",
)
@click.option(
    "--drain-timeout", type=float, default=300.0, show_default=True, help="s to wait for a step's backlog to drain"
)
@click.option("--lag-devices", type=int, default=200, show_default=True, help="devices sampled for the lag")
@click.option("--lag-poll", type=float, default=0.1, show_default=True, help="s between lag polls (the resolution)")
@click.option("--lag-bound", type=float, default=3.0, show_default=True, help="p99 lag (s) of the comparison")
@click.option("--keep-going", is_flag=True, help="climb on after a step that achieved under half its offer")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="JSON [var/bench/<time>.json]")
@click.option("--chart", type=click.Path(path_type=Path, dir_okay=False), help="PNG [next to the JSON]")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), help="where the temp dir goes")
@click.option("--keep-workdir", is_flag=True, help="keep the temp dir (logs, databases) for a look")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=Path("."), show_default=True)
def bench_command(
    workload: str,
    high_steps: str | None,
    fleet_steps: str | None,
    baseline_steps: str | None,
    no_baseline: bool,
    step_seconds: float,
    warmup: float,
    sustain_minutes: float | None,
    drain_timeout: float,
    lag_devices: int,
    lag_poll: float,
    lag_bound: float,
    keep_going: bool,
    out: Path | None,
    chart: Path | None,
    workdir: Path | None,
    keep_workdir: bool,
    root: Path,
) -> None:
    """Stepped sustained-load benchmark of the whole pipeline on this machine (real broker, Redis,
    cloud-sink and services), with a naive one-reading-per-message baseline: readings/s achieved,
    lag, lost/duplicated windows, CPU and memory per process. Prints a table, writes JSON and a PNG."""
    workloads = {"both": ("high", "fleet"), "none": ()}.get(workload, (workload,))
    options = Options(
        root=root,
        workloads=workloads,
        high_steps=_ints(high_steps) or WORKLOADS["high"].ladder,
        fleet_steps=_ints(fleet_steps) or WORKLOADS["fleet"].ladder,
        baseline_steps=_ints(baseline_steps) or NAIVE_LADDER,
        baseline=not no_baseline,
        step_seconds=step_seconds,
        warmup=warmup,
        sustain_minutes=sustain_minutes,
        drain_timeout=drain_timeout,
        lag_devices=lag_devices,
        lag_poll=lag_poll,
        lag_bound=lag_bound,
        keep_going=keep_going,
        out=out,
        chart=chart,
        workdir=workdir,
        keep_workdir=keep_workdir,
    )
    if sustain_minutes is not None:
        options.baseline = False
    try:
        run_bench(options)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM: every process was stopped
        raise click.Abort() from None


if __name__ == "__main__":
    _worker(sys.argv[1:])
