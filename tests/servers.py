"""Real mosquitto and redis-server for tests: the project's own configs, ephemeral loopback ports,
readiness awaited on the servers' own "ready" log lines (never a fixed sleep)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotpipe.devstack import (
    Ports,
    mosquitto_hash,
    mqtt_password_file,
    render_broker_config,
    render_public_broker_config,
    render_redis_config,
)

ROOT = Path(__file__).resolve().parents[1]
# The tests' own user of the pipeline broker: reads every topic (never writes), to watch what the
# services publish. It exists only in the tests' broker (an ACL and password file of their own);
# the shipped broker has service users only.
TAP = "test-tap"


# The environment variable of the past bound on window times (iotpipe.WindowBounds).
WINDOW_MAX_AGE = "IOTPIPE_WINDOW_MAX_AGE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports that are all free now (the local stack's
    /metrics ports are consecutive)."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


class Server:
    """A child process whose output is drained by a thread that flags a readiness line."""

    def __init__(self, name: str, argv: list[str], ready_text: str, cwd: Path) -> None:
        binary = shutil.which(argv[0])
        if binary is None:
            raise RuntimeError(f"{argv[0]} is not installed: run `make deps` (CI installs it in .ci/run)")
        self.name = name
        self.argv = [binary, *argv[1:]]
        self.ready_text = ready_text
        self.cwd = cwd
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> None:
        ready = threading.Event()
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        proc = self.proc

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line.rstrip())
                if self.ready_text in line:
                    ready.set()
            ready.set()  # exited: let start() see it

        self._drain = threading.Thread(target=drain, daemon=True, name=f"{self.name}-output")
        self._drain.start()
        if not ready.wait(timeout) or proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready:\n" + "\n".join(self.lines[-30:]))

    def kill(self) -> None:
        """kill -9: what a crash looks like."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._release()

    def _release(self) -> None:
        """Close the output pipe once the drain thread has read it to the end."""
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self._drain.join(10)
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._release()


@dataclass
class Stack:
    """Where the test servers are and the secrets they use."""

    ports: Ports
    secrets_dir: Path
    broker: Server
    redis: Server
    public: Server  # the public broker, bridged from `broker` (mosquitto/public.conf)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        env.update(
            {
                "IOTPIPE_SECRETS_DIR": str(self.secrets_dir),
                "IOTPIPE_MQTT__HOST": "127.0.0.1",
                "IOTPIPE_MQTT__PORT": str(self.ports.mqtt),
                "IOTPIPE_REDIS__HOST": "127.0.0.1",
                "IOTPIPE_REDIS__PORT": str(self.ports.redis),
                # Never the repo's var/: what services keep across restarts stays with the test run.
                "IOTPIPE_STATE_DIR": str(Path(self.broker.cwd) / "state"),
                # Most tests date their windows from 1970 (starts of 0, 1000, ...): accepted here,
                # where the services would refuse them as older than their past bound (15 days).
                # tests/test_window_bounds.py drops this and tests the shipped bounds.
                WINDOW_MAX_AGE: str(100 * 365 * 24 * 3600),
                # No /metrics unless a test asks (tests/test_metrics.py): every service would try 9100.
                "IOTPIPE_METRICS_PORT": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env


@contextlib.contextmanager
def run_servers(workdir: Path, secrets_dir: Path) -> Iterator[Stack]:
    ports = Ports(
        mqtt=free_port(),
        mqtt_tls=free_port(),
        redis=free_port(),
        sink=free_port(),
        mqtt_mtls=free_port(),
        mqtt_bridge=free_port(),
        public=free_port(),
        public_tls=free_port(),
    )
    for sub in ("mosquitto", "mosquitto-public", "redis"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    broker_conf = workdir / "mosquitto.conf"
    broker_conf.write_text(
        render_broker_config(
            ROOT / "mosquitto/mosquitto.conf",
            ports,
            secrets_dir,
            workdir / "mosquitto",
            # information level has the "running" line we wait for
            extra=("log_type information",),
            **tap_user(workdir, secrets_dir),
        )
    )
    public_conf = workdir / "mosquitto-public.conf"
    public_conf.write_text(
        render_public_broker_config(
            ROOT / "mosquitto/public.conf",
            ports,
            secrets_dir,
            workdir / "mosquitto-public",
            extra=("log_type information",),
        )
    )
    redis_conf = workdir / "redis.conf"
    redis_conf.write_text(render_redis_config(ROOT / "redis/redis.conf", ports, secrets_dir, workdir / "redis"))
    broker = Server("mosquitto", ["mosquitto", "-c", str(broker_conf)], " running", workdir)
    public = Server("mosquitto-public", ["mosquitto", "-c", str(public_conf)], " running", workdir)
    redis = Server("redis", ["redis-server", str(redis_conf)], "Ready to accept connections", workdir)
    with contextlib.ExitStack() as running:
        for server in (broker, public, redis):
            server.start()
            running.callback(server.stop)
        # The public broker's bridge connects on its own after the broker is up: tests that read
        # the public broker start once the pipeline broker has seen it.
        deadline = time.monotonic() + 30
        while not any(" as bridge (" in line for line in list(broker.lines)):
            if time.monotonic() > deadline or broker.proc is None or broker.proc.poll() is not None:
                raise RuntimeError("the public broker's bridge did not connect:\n" + "\n".join(public.lines[-30:]))
            threading.Event().wait(0.05)  # wait-ok: polling the broker's log lines, bounded by the deadline
        yield Stack(ports, secrets_dir, broker, redis, public)


def tap_user(workdir: Path, secrets_dir: Path) -> dict[str, Path]:
    """The shipped ACL and password file plus TAP (read-only, every topic), written into `workdir`."""
    password = mqtt_password_file(secrets_dir, TAP)
    if not password.exists():
        password.write_text(uuid.uuid4().hex + "\n")
    passwd = workdir / "mosquitto_passwd"
    passwd.write_text(
        (secrets_dir / "mosquitto_passwd").read_text() + f"{TAP}:{mosquitto_hash(password.read_text().strip())}\n"
    )
    acl = workdir / "acl"
    acl.write_text((ROOT / "mosquitto/acl").read_text() + f"\nuser {TAP}\ntopic read #\n")
    return {"acl_file": acl, "password_file": passwd}


def spawn(module: str, env: dict[str, str], log_dir: Path, name: str | None = None) -> subprocess.Popen[bytes]:
    """Run `python -m <module>` as a service would run, its output appended to <log_dir>/<name>.out."""
    with (log_dir / f"{name or module}.out").open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, stdout=log, stderr=log)


def service_env(
    stack: Stack, base: str, workdir: Path, instance: str, sink_port: int | None = None, **extra: str
) -> dict[str, str]:
    """The environment of services a test runs: its own topic base and Redis prefix, an instance id,
    health and dead-letter files in `workdir`, and, given `sink_port`, a cloud-sink there to upload to."""
    env = {
        "IOTPIPE_BASE_TOPIC": base,
        "IOTPIPE_REDIS_PREFIX": base,
        "IOTPIPE_INSTANCE": instance,
        "IOTPIPE_HEALTH_DIR": str(workdir / "health"),
        "IOTPIPE_DEAD_LETTER_FILE": str(workdir / "dead.jsonl"),
        "IOTPIPE_STATE_DIR": str(workdir / "state"),
        "IOTPIPE_OUTBOX_FILE": str(workdir / f"outbox-{instance}.sqlite3"),
    }
    if sink_port is not None:
        env |= {"IOTPIPE_CLOUD_URL": f"http://127.0.0.1:{sink_port}/ingest", "IOTPIPE_SINK_PORT": str(sink_port)}
    return stack.env(**env, **extra)


def pipeline_env(
    stack: Stack, base: str, workdir: Path, instance: str, devices: str, sink_port: int | None = None, **extra: str
) -> dict[str, str]:
    """`service_env` for a whole pipeline a test runs, from the simulated (or failing) devices of
    `devices` (a devices file's TOML, written to `workdir`) to the cloud-sink at `sink_port` (with the
    stack's token) and the exporter's public broker: half-second windows, 1 s heartbeats, short
    batches and checks, so that a test sees each hop within seconds. `extra` overrides any of it."""
    devices_file = workdir / "devices.toml"
    devices_file.write_text(devices)
    fast = {
        "IOTPIPE_DEVICES_FILE": str(devices_file),
        "IOTPIPE_WINDOW_MS": "500",
        "IOTPIPE_WINDOW_GRACE_MS": "100",
        "IOTPIPE_STATUS_INTERVAL": "1",
        "IOTPIPE_BATCH_LINGER": "0.2",
        "IOTPIPE_CHECK_INTERVAL": "0.5",
        "IOTPIPE_STATE_INTERVAL": "0.2",
        "IOTPIPE_PUBLIC__HOST": "127.0.0.1",
        "IOTPIPE_PUBLIC__PORT": str(stack.ports.public),
    }
    if sink_port is not None:
        token = str(stack.secrets_dir / "cloud_token")
        fast |= {"IOTPIPE_CLOUD_TOKEN_FILE": token, "IOTPIPE_SINK_TOKEN_FILE": token}
    return service_env(stack, base, workdir, instance, sink_port, **{**fast, **extra})


def stop_all(procs: Iterable[subprocess.Popen[bytes] | None]) -> None:
    """SIGTERM every service at once, then wait for each (SIGKILL if one will not stop)."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bus_for(
    stack: Stack,
    user: str,
    *,
    keyring=None,
    status_topic: str | None = None,  # type: ignore[no-untyped-def]
    tls: bool = False,
    client_id: str | None = None,
    session_expiry: int = 0,
    **mqtt: object,
):
    """An iotpipe Bus logged in as `user` against the test broker (not started). Its client id is
    `<user>-<client_id>` (the broker's rule), `client_id` default random."""
    from iotpipe import Bus, MqttSettings

    settings = MqttSettings(
        host="127.0.0.1" if not tls else "localhost",
        port=stack.ports.mqtt_tls if tls else stack.ports.mqtt,
        tls=tls,
        ca_file=stack.secrets_dir / "ca_crt" if tls else None,
        session_expiry=session_expiry,
        connect_timeout=15,
        **mqtt,
    )  # type: ignore[arg-type]
    return Bus(
        settings,
        client_id=owned_client_id(user, client_id or f"test-{uuid.uuid4().hex[:8]}"),
        keyring=keyring,
        src=f"{user}/test",
        status_topic=status_topic,
        username=user,
        password_file=mqtt_password_file(stack.secrets_dir, user),
    )


def owned_client_id(user: str, client_id: str) -> str:
    """`client_id` as the pipeline broker admits it for `user`: `<user>-<id>` (iotpipe_guard)."""
    return client_id if client_id.startswith(f"{user}-") else f"{user}-{client_id}"


async def wait_online(stack: Stack, topic: str, timeout: float = 30) -> None:
    """A service's retained status says online: it is published after its SUBSCRIBE on the same
    connection, so the broker has its subscription (and durable session) by then."""
    import asyncio

    import orjson

    online = asyncio.Event()

    async def on_status(messages: Sequence[Any]) -> None:
        if any(m.payload and orjson.loads(m.payload)["state"] == "online" for m in messages):
            online.set()

    watcher = bus_for(stack, TAP)
    watcher.subscribe(topic, on_status, sealed=False)
    await watcher.start()
    try:
        await asyncio.wait_for(online.wait(), timeout)
    finally:
        await watcher.stop()


def unseal(keyring, payload: bytes) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The inner document of a sealed envelope (docs/contract.md: topic, src, boot, seq, ts, data),
    opened with the test's key ring, independently of the services' own receiving code."""
    import orjson

    envelope = orjson.loads(payload)
    assert set(envelope) == {"v", "alg", "kid", "ct"}, envelope
    inner: dict[str, Any] = orjson.loads(keyring.decrypt(envelope["ct"].encode("ascii"), ttl=None))
    return inner


def health_doc(workdir: Path, service: str, instance: str) -> dict[str, Any]:
    """The service's health file (the same snapshot as its retained status: state, ts, counters...),
    or {} before its first heartbeat."""
    import orjson

    path = workdir / "health" / f"{service}-{instance}.json"
    try:
        return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def service_counters(workdir: Path, service: str, instance: str) -> dict[str, Any]:
    """The service's counters as of its latest heartbeat (`"counters"` of its status, nested: read one
    with `iotpipe.counter`)."""
    return health_doc(workdir, service, instance).get("counters", {})  # type: ignore[no-any-return]


def add_counters(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Add nested counters `more` (a status's `"counters"`) into `total`, level by level."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_counters(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


# How often wait_until re-checks a condition that has no event of its own.
POLL_INTERVAL = 0.1


async def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Wait for `condition` (a callable, maybe async) to hold, or fail naming `what`: the suite's one
    way to wait for something that has no event of its own (never a fixed sleep)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL)


def processed_payload(device: str, windows: Iterable[dict[str, Any]]) -> dict[str, object]:
    """A processed message (contract v2) holding `windows` of `device`."""
    return {"windows": [{**w, "device": device} for w in windows]}


def raw_payload(*windows: dict[str, Any]) -> dict[str, object]:
    """A raw message (contract v2) holding these raw windows (each: device, window, sensors)."""
    return {"windows": list(windows)}


def window_payload(start: int, sensor: str = "temp", device: str = "d1") -> dict[str, object]:
    """A processed window as the contract has it (1 s long, made-up aggregates) starting at `start`."""
    return {
        "device": device,
        "sensor": sensor,
        "unit": "degC",
        "start": start,
        "end": start + 1000,
        "n": 5,
        "mean": 1.5,
        "median": 1.5,
        "min": 1.0,
        "max": 2.0,
        "std": 0.25,
    }
