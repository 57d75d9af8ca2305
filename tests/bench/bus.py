"""`make bench-bus`: messages/s and CPU per message of ONE process's iotpipe Bus, against the real broker.

Starts mosquitto with the project's config (mosquitto/mosquitto.conf, rendered for ephemeral
loopback ports as the tests do; a fresh broker for every run) and measures four cases, each in this
process only:

  publish  plain   `await bus.publish(topic, payload)`, QoS 1, resolved by the broker's PUBACK
  publish  sealed  `await bus.publish_sealed(topic, data)` (sealing included)
  consume  plain   messages delivered to a `sealed=False` handler and acknowledged
  consume  sealed  the same through a sealed subscription (size, envelope, key, topic, replay checks)

Each run, for plain and then for sealed payloads: a durable session of user preprocessor (stable
client id, session expiry) subscribes to <base>/v2/raw/+ and goes offline, as a stopped service's
session does. Then, with only the publisher Bus running in this process, sensor-reader publishes
--messages to <base>/v2/raw/dev-0, keeping `--concurrency` publishes awaiting their PUBACK at once
(default: the bus's max_inflight), as the sensor-reader's concurrent window tasks do; the broker
queues each for the offline session, as it would for the preprocessor. That is the publish figure.
The publisher stops; the consumer's session comes back, with only the consumer Bus running in this
process, and the consume figure is how fast it drains the queue: from `start()` until its handler
has returned for the last message (the bus acknowledges as each batch's handler returns). Process
CPU (time.process_time: every thread, user + system) is measured over the same intervals; on a
shared machine it is the steadier figure (other load stretches wall time, not the work done per
message), so each run also records the load average. The payload is a realistic raw batch: one
device, 10 sensors, 10 readings each (docs/contract.md); plain cases send the same batch as JSON,
unsealed. A warm-up of each case (--warmup messages) runs first and is not counted.

Broker modes. The shipped config saves the whole database on every change (autosave_on_changes,
autosave_interval 1), which makes a queued message cost a snapshot and dominates the publish figure.
By default the broker runs "client-bound": same config but `autosave_on_changes false` and
`autosave_interval 86400` (persistence on, nothing written during runs). `--broker-autosave` runs the
config as shipped (then keep --messages small: each save writes every queued message).

Only the Bus's public API is used (constructor, start, wait_connected, subscribe, publish,
publish_sealed, stop), so the same script measures the bus before and after a rewrite.

    uv run --frozen python tests/bench/bus.py --repeat 3 --json var/bench/bus.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt
from iotpipe import Bus, KeyRing, MqttSettings, Sealer
from iotpipe.devstack import Ports, ensure_secrets, mqtt_password_file, render_broker_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import ROOT, free_port

CASES = ("publish_plain", "publish_sealed", "consume_plain", "consume_sealed")
DEFAULT_MESSAGES = {"client": 50_000, "autosave": 1_000}
# Client-bound mode: persistence stays on (as shipped), but nothing is saved while the bench runs.
CLIENT_BOUND = {"autosave_on_changes": "false", "autosave_interval": "86400"}
PUBLISHER_USER = "sensor-reader"  # ACL: write +/v2/raw/+
CONSUMER_USER = "preprocessor"  # ACL: read +/v2/raw/+


# -- broker -------------------------------------------------------------------------------------
class Broker:
    """mosquitto with the project's config on loopback ports; its log goes to a file (not through
    a pipe this process drains, so no thread of ours spends CPU on broker log lines)."""

    def __init__(self, workdir: Path, secrets_dir: Path, autosave: bool) -> None:
        self.ports = Ports(mqtt=free_port(), mqtt_tls=free_port(), redis=free_port(), sink=free_port())
        self.mode = "broker-autosave (as shipped)" if autosave else "client-bound (long autosave interval)"
        data = workdir / "mosquitto"
        data.mkdir(parents=True, exist_ok=True)
        text = render_broker_config(
            ROOT / "mosquitto/mosquitto.conf",
            self.ports,
            secrets_dir,
            data,
            extra=("log_type information",),  # has the "running" line we wait for
        )
        if not autosave:
            lines = text.splitlines()
            for key, value in CLIENT_BOUND.items():
                hits = [i for i, line in enumerate(lines) if line.split()[:1] == [key]]
                if not hits:
                    raise SystemExit(f"mosquitto.conf has no `{key}` line to override; update tests/bench/bus.py")
                for i in hits:
                    lines[i] = f"{key} {value}"
            text = "\n".join(lines) + "\n"
        self.persistence = [
            line
            for line in text.splitlines()
            if line.split()[:1] and line.split()[0] in ("persistence", "autosave_on_changes", "autosave_interval")
        ]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(text)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("mosquitto")
        if binary is None:
            raise SystemExit("mosquitto is not installed: run `make deps`")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while " running" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("mosquitto did not start:\n" + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.02)  # wait-ok: polling the broker's log, bounded by the deadline

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise SystemExit("mosquitto exited:\n" + self.log.read_text(errors="replace")[-3000:])


# -- the bus under test -------------------------------------------------------------------------
@dataclass
class Env:
    broker: Broker
    secrets_dir: Path
    keyring: KeyRing
    args: argparse.Namespace


def make_bus(env: Env, user: str, client_id: str, session_expiry: int = 0) -> Bus:
    settings = MqttSettings(
        host="127.0.0.1",
        port=env.broker.ports.mqtt,
        session_expiry=session_expiry,
        receive_maximum=env.args.receive_maximum,
        max_inflight=env.args.max_inflight,
        connect_timeout=15,
    )
    return Bus(
        settings,
        client_id,
        env.keyring,
        f"{user}/bench",
        username=user,
        password_file=mqtt_password_file(env.secrets_dir, user),
    )


def raw_batch(sensors: int, readings: int, device: str = "dev-0") -> dict[str, Any]:
    """A raw message of one device's window (docs/contract.md, raw batch)."""
    size = 1000
    start = 1_700_000_000_000
    stamps = [start + i * size // readings for i in range(readings)]
    window = {
        "device": device,
        "window": {"start": start, "size": size},
        "sensors": {
            f"s{s}": {
                "unit": "degC",
                "t": stamps,
                "v": [round(20 + 0.137 * ((i * 7 + s) % 11), 3) for i in range(readings)],
            }
            for s in range(sensors)
        },
    }
    return {"windows": [window]}


async def publish_many(bus: Bus, topic: str, n: int, sealed: bool, data: Any, payload: bytes, concurrency: int) -> None:
    """n publishes with `concurrency` of them awaiting their PUBACK at any time."""
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:  # one iterator shared by all workers: n publishes in all
            if sealed:
                await bus.publish_sealed(topic, data)
            else:
                await bus.publish(topic, payload)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))


@dataclass
class Run:
    case: str
    messages: int
    seconds: float
    cpu_s: float
    msgs_per_s: float
    cpu_s_per_1k: float
    cpu_share: float  # CPU seconds / wall seconds (1.0 = one core busy)
    loadavg: str  # the machine's 1/5/15-minute load average as the run ended (other load skews wall time)


def make_run(case: str, n: int, wall: float, cpu: float) -> Run:
    return Run(case, n, wall, cpu, n / wall, cpu / n * 1000, cpu / wall, loadavg())


async def bench(env: Env, n: int, sealed: bool, data: Any, payload: bytes) -> tuple[Run, Run]:
    """One publish run and one consume run of the same n messages (see the module docstring)."""
    kind = "sealed" if sealed else "plain"
    base = f"bench{uuid.uuid4().hex[:8]}"
    topic, probe_topic, pattern = f"{base}/v2/raw/dev-0", f"{base}/v2/raw/probe", f"{base}/v2/raw/+"
    client_id = f"{CONSUMER_USER}-bench-sub-{uuid.uuid4().hex[:8]}"
    expiry = 3600
    received = 0
    probed = asyncio.Event()
    done = asyncio.Event()
    end: list[float] = []

    async def handler(messages: Any) -> None:
        nonlocal received
        for m in messages:
            if m.topic == probe_topic:
                probed.set()
            else:
                received += 1
        if received >= n and not end:
            end.extend((time.perf_counter(), time.process_time()))
            done.set()

    # 1. The consumer's durable session exists and its subscription is in place (a probe got
    #    through); then it goes offline, so the broker queues what follows for it.
    consumer = make_bus(env, CONSUMER_USER, client_id, session_expiry=expiry)
    consumer.subscribe(pattern, handler, sealed=sealed, batch=env.args.batch)
    publisher = make_bus(env, PUBLISHER_USER, f"{PUBLISHER_USER}-bench-pub-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    await publisher.start()
    await consumer.wait_connected()
    await publisher.wait_connected()
    for _ in range(100):
        await (publisher.publish_sealed(probe_topic, {"probe": 1}) if sealed else publisher.publish(probe_topic, b"{}"))
        try:
            await asyncio.wait_for(probed.wait(), 0.2)
            break
        except TimeoutError:
            continue
    else:
        raise SystemExit("the consumer's subscription never delivered a probe")
    await consumer.stop()

    # 2. Publish: n messages into the offline session's queue; only the publisher runs in this process.
    gc.collect()
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        await publish_many(publisher, topic, n, sealed, data, payload, env.args.concurrency)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await publisher.stop()
    published = make_run(f"publish_{kind}", n, wall, cpu)
    env.broker.check()

    # 3. Consume: the same session comes back; time how fast this process (now only the consumer)
    #    drains and acknowledges the queue.
    consumer = make_bus(env, CONSUMER_USER, client_id, session_expiry=expiry)
    consumer.subscribe(pattern, handler, sealed=sealed, batch=env.args.batch)
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        await consumer.start()
        try:
            await asyncio.wait_for(done.wait(), env.args.timeout)
        except TimeoutError:
            raise SystemExit(f"consume: only {received:,} of {n:,} messages within {env.args.timeout}s") from None
    finally:
        await consumer.stop()
    consumed = make_run(f"consume_{kind}", n, end[0] - t0, end[1] - cpu0)
    return published, consumed


# -- reporting ----------------------------------------------------------------------------------
def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def code_info() -> dict[str, Any]:
    import iotpipe

    where = Path(iotpipe.__file__).resolve().parent
    info: dict[str, Any] = {"iotpipe": str(where)}
    try:
        git = ["git", "-C", str(where)]
        info["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout
        info["iotpipe_modified"] = bool(dirty.strip())
    except OSError:
        pass
    return info


def mosquitto_version() -> str:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "?"


def fmt_run(r: Run) -> str:
    verb, kind = r.case.split("_")
    extra = f"  load {r.loadavg}"
    return (
        f"  {verb:<8} {kind:<7} {r.messages:>8,} msgs {r.seconds:7.2f} s {r.msgs_per_s:>9,.0f} msg/s"
        f"   CPU {r.cpu_s:6.2f} s  {r.cpu_s_per_1k:6.3f} CPU-s/1k msgs  {r.cpu_share * 100:4.0f}% of a core{extra}"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = "autosave" if args.broker_autosave else "client"
    n = args.messages or DEFAULT_MESSAGES[mode]
    data = raw_batch(args.sensors, args.readings)
    payload = orjson.dumps(data)
    kinds = args.payloads
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-bus-") as tmp_name:
        tmp = Path(tmp_name)
        secrets_dir = ensure_secrets(tmp / "secrets")
        keyring = KeyRing.from_file(secrets_dir / "keyring")
        # Each run (and warm-up) gets a broker of its own, started afresh, so no run inherits the
        # previous one's sessions, memory or data files; this one only describes the config.
        broker = Broker(tmp / "broker-0", secrets_dir, autosave=args.broker_autosave)
        env = Env(broker, secrets_dir, keyring, args)
        started = 0

        async def measure(kind: str, messages: int) -> tuple[Run, Run]:
            nonlocal started
            started += 1
            workdir = tmp / f"broker-{started}"
            env.broker = Broker(workdir, secrets_dir, autosave=args.broker_autosave)
            env.broker.start()
            try:
                return await bench(env, messages, kind == "sealed", data, payload)
            finally:
                env.broker.stop()
                shutil.rmtree(workdir, ignore_errors=True)

        try:
            sealed_size = len(Sealer(keyring, f"{PUBLISHER_USER}/bench").seal("bench/v2/raw/dev-0", data))
            meta = {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **code_info(),
                "python": platform.python_version(),
                "paho_mqtt": paho.mqtt.__version__,
                "mosquitto": mosquitto_version(),
                "cpus": os.cpu_count(),
                "loadavg_start": loadavg(),
                "argv": sys.argv[1:],
            }
            broker_info = {"mode": broker.mode, "persistence": broker.persistence, "fresh_per_run": True}
            settings = {
                "messages": n,
                "repeat": args.repeat,
                "max_inflight": args.max_inflight,
                "receive_maximum": args.receive_maximum,
                "batch": args.batch,
                "concurrency": args.concurrency,
                "payload": f"raw batch: 1 device x {args.sensors} sensors x {args.readings} readings",
                "plain_bytes": len(payload),
                "sealed_bytes": sealed_size,
                "publisher_user": PUBLISHER_USER,
                "consumer_user": CONSUMER_USER,
            }
            modified = " (shared/iotpipe has uncommitted changes)" if meta.get("iotpipe_modified") else ""
            print("iotpipe Bus benchmark: one process, MQTT v5, QoS 1, loopback broker", flush=True)
            print(f"  code:     {meta['iotpipe']} @ {meta.get('commit', '?')}{modified}")
            print(f"            python {meta['python']}, paho-mqtt {meta['paho_mqtt']}, {meta['mosquitto']}")
            print(f"  machine:  {meta['cpus']} CPUs, load average at start {meta['loadavg_start']}")
            print(f"  broker:   {broker.mode}: {'; '.join(broker.persistence)}; a fresh broker per run")
            print(f"  payload:  {settings['payload']}: plain {len(payload):,} B, sealed {sealed_size:,} B")
            print(
                f"  settings: {n:,} messages per run, {args.repeat} runs, max_inflight {args.max_inflight},"
                f" {args.concurrency} publishes in flight, receive_maximum {args.receive_maximum},"
                f" handler batch {args.batch}",
                flush=True,
            )
            if args.warmup:
                for kind in kinds:
                    await measure(kind, args.warmup)
                print(f"  warm-up:  {args.warmup:,} messages per case (not counted)", flush=True)
            runs: dict[str, list[Run]] = {c: [] for c in CASES if c.split("_")[1] in kinds}
            for r in range(args.repeat):
                print(f"run {r + 1}/{args.repeat} (load average {loadavg()})", flush=True)
                for kind in kinds:
                    for result in await measure(kind, n):
                        runs[result.case].append(result)
                        print(fmt_run(result), flush=True)
            meta["loadavg_end"] = loadavg()
        finally:
            env.broker.stop()
    medians = {
        case: {
            "msgs_per_s": statistics.median(r.msgs_per_s for r in rs),
            "cpu_s_per_1k": statistics.median(r.cpu_s_per_1k for r in rs),
            "cpu_share": statistics.median(r.cpu_share for r in rs),
        }
        for case, rs in runs.items()
    }
    print(f"median of {args.repeat} ({broker.mode}; load average at end {meta['loadavg_end']})")
    print(f"  {'case':<17} {'msg/s':>9}  {'CPU-s/1k msgs':>13}  {'% of a core':>11}")
    for case, m in medians.items():
        verb, kind = case.split("_")
        share = m["cpu_share"] * 100
        print(f"  {verb:<8} {kind:<8} {m['msgs_per_s']:>9,.0f}  {m['cpu_s_per_1k']:>13.3f}  {share:>10.0f}%")
    return {
        "meta": meta,
        "broker": broker_info,
        "settings": settings,
        "cases": {case: {"runs": [asdict(r) for r in rs], "median": medians[case]} for case, rs in runs.items()},
    }


def main() -> None:
    defaults = MqttSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help=f"messages per run and case (default {DEFAULT_MESSAGES['client']:,}; "
        f"{DEFAULT_MESSAGES['autosave']:,} with --broker-autosave)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; each is printed, then the median")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--broker-autosave",
        action="store_true",
        help="run the broker config as shipped (saves on every change: measures the broker's disk);"
        " default: client-bound, autosave_on_changes false / autosave_interval 86400",
    )
    parser.add_argument(
        "--payloads", nargs="+", choices=("plain", "sealed"), default=["plain", "sealed"], help="which cases to run"
    )
    parser.add_argument("--sensors", type=int, default=10, help="sensors in the raw batch")
    parser.add_argument("--readings", type=int, default=10, help="readings per sensor in the raw batch")
    parser.add_argument("--max-inflight", type=int, default=defaults.max_inflight, help="MqttSettings.max_inflight")
    parser.add_argument(
        "--receive-maximum", type=int, default=defaults.receive_maximum, help="MqttSettings.receive_maximum"
    )
    parser.add_argument("--batch", type=int, default=64, help="subscribe(batch=...): the bus's default")
    parser.add_argument("--concurrency", type=int, help="publishes awaiting PUBACK at once (default: --max-inflight)")
    parser.add_argument("--warmup", type=int, default=1000, help="messages per case before the runs, not counted")
    parser.add_argument("--timeout", type=float, default=600, help="s a consumer may take to drain")
    args = parser.parse_args()
    args.concurrency = args.concurrency or args.max_inflight
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = asyncio.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
