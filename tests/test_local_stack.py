"""`make run`'s stack (iotpipe stack → supervisord → Procfile) as a user starts it: TLS between
services, generated secrets, rendered configs, per-service log files, every line of output prefixed
by its process, a killed process restarted while the others ride it out, a process that keeps dying
backed off and given up on, and a clean stop on Ctrl-C that leaves no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe.devstack import (
    Program,
    Supervision,
    mqtt_password_file,
    read_procfile,
    redis_password_file,
    render_supervisor_config,
)
from servers import ROOT, free_port, free_ports, wait_until
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

DEVICES = ("greenhouse-1", "greenhouse-2", "weather-station")
LOGS = (
    "sensor-reader",
    "preprocessor",
    "cache-writer",
    "cloud-forwarder",
    "monitor",
    "exporter",
    "cloud-sink",
    "broker",
)
SERVICES = LOGS[:6]  # the ones with a health file
PROGRAMS = ("broker", "broker-public", "redis", "cloud-sink", *SERVICES)
# supervisord's own log line: `2026-01-31 12:00:00,123 INFO spawned: 'preprocessor' with pid 4242`
SPAWNED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO spawned: '([\w-]+)' with pid (\d+)$", re.M)


class LocalStack:
    """`iotpipe stack --root <copy of the repo>` on ephemeral ports, as `make run` starts it."""

    def __init__(self, tmp_path: Path, procfile: str | None = None) -> None:
        self.root = tmp_path / "repo"
        for part in ("Procfile", "mosquitto", "redis", "services/sensor_reader/examples"):
            src = ROOT / part
            (self.root / part).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, self.root / part)
            else:
                shutil.copy(src, self.root / part)
        if procfile is not None:
            (self.root / "Procfile").write_text(procfile)
        self.secrets = self.root / "secrets"
        self.conf = self.root / "var/supervisor/supervisord.conf"
        self.ports = {
            name: str(free_port())
            for name in (
                "MQTT",
                "MQTT_TLS",
                "MQTT_MTLS",
                "MQTT_BRIDGE",
                "PUBLIC",
                "PUBLIC_TLS",
                "REDIS",
                "SINK",
            )
        }
        self.ports["METRICS"] = str(free_ports(len(SERVICES)))  # the first of the services' /metrics ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        env.update({f"IOTPIPE_STACK_{name}_PORT": port for name, port in self.ports.items()})
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
        self.out_path = tmp_path / "stack.out"
        self.out = self.out_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iotpipe.cli", "stack", "--root", str(self.root)],
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def supervisor_log(self) -> str:
        path = self.root / "var/log/supervisord.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def processes(self) -> set[int]:
        """Every live process of this stack: `iotpipe stack`, supervisord and all it started, found by
        the session the test started it in (supervisord gives each program its own process group,
        not its own session). Not by environment: redis-server overwrites its own."""
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone already
            if fields[0] != "Z" and int(fields[3]) == self.proc.pid:
                found.add(int(entry.name))
        return found

    def status(self) -> dict[str, str]:
        """`supervisorctl status`: program -> its state and, when RUNNING, its pid and uptime."""
        lines = self.supervisorctl("status").stdout.splitlines()
        return {line.split()[0]: line.split(None, 1)[1] for line in lines if len(line.split()) > 1}

    def pids(self) -> dict[str, int]:
        """RUNNING program -> pid, and supervisord's own."""
        out = {
            name: int(m.group(1))
            for name, state in self.status().items()
            if (m := re.match(r"RUNNING +pid (\d+),", state))
        }
        pidfile = self.root / "var/supervisor/supervisord.pid"
        if pidfile.exists() and pidfile.read_text().strip():
            out["supervisord"] = int(pidfile.read_text())
        return out

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """What a user runs: `uv run supervisorctl -c var/supervisor/supervisord.conf ...`."""
        return subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def interrupt(self) -> float:
        """Ctrl-C: SIGINT to the foreground process. Returns how long the stack took to stop."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(30) == 0, f"exit status {self.proc.returncode}"
        return time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.processes():  # a failed test must not leave its stack running either
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.out.close()


async def latest_starts(stack: LocalStack) -> dict[str, int]:
    """Device -> start (unix ms) of its newest window in Redis; {} while Redis is unreachable."""
    client = aioredis.Redis(
        port=int(stack.ports["REDIS"]),
        username="reader",
        decode_responses=True,
        password=redis_password_file(stack.secrets, "reader").read_text().strip(),
        socket_timeout=2,
    )
    try:
        out = {}
        for device in DEVICES:
            starts = await client.hvals(f"iotpipe:latest_start:{device}")
            if starts:
                out[device] = max(map(int, starts))
        return out
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
        return {}  # starting, or being restarted
    finally:
        await client.aclose()


async def windows_start_after(stack: LocalStack, ms: float, timeout: float = 45) -> None:
    """Every device has a window in Redis that started after `ms`: data flows end to end."""

    async def newer() -> bool:
        starts = await latest_starts(stack)
        return len(starts) == len(DEVICES) and min(starts.values()) > ms

    await wait_until(newer, timeout, f"a window starting after {ms:.0f} of every device in Redis")


async def all_running(stack: LocalStack) -> dict[str, int]:
    """Waits until `supervisorctl status` shows every program RUNNING; returns the pids."""
    await wait_until(lambda: set(stack.pids()) == {*PROGRAMS, "supervisord"}, 30, "every program RUNNING")
    return stack.pids()


def kill9(pid: int) -> float:
    """kill -9, a crash; returns when (unix ms) it happened."""
    at = time.time() * 1000
    os.kill(pid, signal.SIGKILL)
    return at


async def third_party_sees_every_device(stack: LocalStack) -> None:
    """What `make run` promises a third party holding only the `reader` password: mosquitto_sub on the
    public broker (TLS) gets each simulated device's state, fresh, within 5 s of its window's end."""
    password = mqtt_password_file(stack.secrets, "reader").read_text().strip()
    argv = [
        "mosquitto_sub",
        "-h",
        "localhost",
        "-p",
        stack.ports["PUBLIC_TLS"],
        "--cafile",
        str(stack.secrets / "ca_crt"),
    ]
    argv += ["-u", "reader", "-P", password, "-t", "iotpipe/v2/devices/+/state", "-R", "-v", "-W", "20"]
    seen: dict[str, float] = {}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            topic, payload = line.rstrip("\n").split(" ", 1)
            seen[topic.split("/")[3]] = time.time() - orjson.loads(payload)["ts"] / 1000
            if set(seen) == set(DEVICES):
                break
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert set(seen) == set(DEVICES), seen
    assert max(seen.values()) < 5.0, seen


async def stop_and_check_nothing_is_left(stack: LocalStack) -> None:
    before = set(stack.processes())
    assert before, "no process of the stack found"
    took = stack.interrupt()
    assert took < 15, f"Ctrl-C took {took:.1f}s to stop the stack"
    await wait_until(lambda: not stack.processes(), 5, "no process of the stack left")  # reparented zombies
    assert "Traceback" not in stack.text()


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_local_stack_fills_redis_within_30s_and_stops_cleanly(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    try:
        await wait_until(lambda: redis_password_file(stack.secrets, "reader").exists(), 30, "secrets")
        await windows_start_after(stack, 0, 30)  # the latest window of every simulated device

        def all_online() -> bool:
            files = [stack.root / "var/health" / f"{name}-local.json" for name in SERVICES]
            return all(f.exists() and orjson.loads(f.read_bytes())["state"] == "online" for f in files)

        await wait_until(all_online, 30, "every service's health file to say online")
        # Each service's /metrics on its own port, in SERVICES order from the base (devstack): told
        # apart by a queue only that service has.
        own_queue = {
            "sensor-reader": "spool_memory",
            "preprocessor": "inbound:iotpipe/v2/raw/+",
            "cache-writer": "redis_batch",
            "cloud-forwarder": "outbox",
            "monitor": "inbound:iotpipe/v2/health/+",
            "exporter": "projection_pending",
        }
        for offset, name in enumerate(SERVICES):
            url = f"http://127.0.0.1:{int(stack.ports['METRICS']) + offset}/metrics"
            page = await asyncio.to_thread(lambda u=url: urllib.request.urlopen(u, timeout=5).read().decode())
            assert f'iotpipe_queue_depth{{queue="{own_queue[name]}"}}' in page, name
        await third_party_sees_every_device(stack)
        await stop_and_check_nothing_is_left(stack)
    except BaseException:
        os.write(2, stack.text()[-5000:].encode())
        raise
    finally:
        stack.close()
    text = stack.text()
    # Every line in the terminal names its process; the broker's and Redis's too.
    for name in (*PROGRAMS, "supervisord"):
        assert re.search(rf"^\d\d:\d\d:\d\d {re.escape(name)} +\| ", text, re.M), f"no line prefixed {name}"
    assert re.search(r"^\d\d:\d\d:\d\d redis +\| .*Ready to accept connections", text, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d broker +\| .*New client connected .* as sensor-reader-local", text, re.M)
    # The public broker's bridge logged in to the pipeline broker by its certificate.
    assert re.search(r"^\d\d:\d\d:\d\d broker +\| .*New bridge connected .* as bridge ", text, re.M)
    unprefixed = [line for line in text.splitlines()[1:] if not re.match(r"\d\d:\d\d:\d\d [\w-]+ +\| ", line)]
    assert unprefixed == [], unprefixed[:5]
    for name in LOGS:
        assert (stack.root / "var/log" / f"{name}.log").stat().st_size > 0, name
    # Services talked TLS to the broker, and every one of them said offline on its way out.
    assert "on port " + stack.ports["MQTT_TLS"] in (stack.root / "var/log/broker.log").read_text()
    for name in SERVICES:
        health = orjson.loads((stack.root / "var/health" / f"{name}-local.json").read_bytes())
        assert health["state"] == "offline", name


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_killed_service_or_redis_is_restarted_and_the_rest_rides_it_out(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    try:
        before = await all_running(stack)
        await windows_start_after(stack, 0)

        for victim in ("preprocessor", "redis"):
            expected = "redis-server" if victim == "redis" else "python"
            assert Path(f"/proc/{before[victim]}/comm").read_text().strip().startswith(expected)
            killed_at = kill9(before[victim])
            # RUNNING again (up for `startsecs`) with a new pid, the others as they were.
            await wait_until(
                lambda v=victim, old=before[victim]: stack.pids().get(v, old) != old, 30, f"{victim} to be restarted"
            )
            await windows_start_after(stack, killed_at)
            after = await all_running(stack)
            assert after[victim] != before[victim]
            assert {k: v for k, v in after.items() if k != victim} == {
                k: v for k, v in before.items() if k != victim
            }, f"killing {victim} restarted something else"
            before = after

        # Reported as it happened, through supervisord's lines in the terminal.
        text = stack.text()
        for victim in ("preprocessor", "redis"):
            assert re.search(rf"supervisord +\| .*exited: {victim} \(terminated by SIGKILL", text), victim
            assert len([m for m in SPAWNED.finditer(stack.supervisor_log()) if m.group(2) == victim]) == 2
        await stop_and_check_nothing_is_left(stack)
    except BaseException:
        os.write(2, stack.text()[-8000:].encode())
        raise
    finally:
        stack.close()


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_a_process_that_keeps_dying_backs_off_and_is_reported(tmp_path: Path) -> None:
    """Dying right after each start (before `startsecs`), it is retried after 1, 2, 3... s, then
    given up on with a line in the terminal, while the rest keeps running."""
    procfile = "steady: sleep 600\ncrasher: sh -c \"echo 'crashing on purpose' >&2; exit 3\"\n"
    stack = LocalStack(tmp_path, procfile)
    retries = Supervision().start_retries
    try:
        await wait_until(lambda: "steady" in stack.pids(), 30, "steady to be RUNNING")
        steady = stack.pids()["steady"]
        await wait_until(
            lambda: "gave up: crasher entered FATAL state" in stack.text(), 60, "supervisord to give up on crasher"
        )
        spawns = [
            time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
            for m in SPAWNED.finditer(stack.supervisor_log())
            if m.group(2) == "crasher"
        ]
        assert len(spawns) == retries + 1, spawns
        gaps = [later - earlier for earlier, later in itertools.pairwise(spawns)]
        # Backoff, not a spin: the n-th retry comes n seconds after the n-th death, or a tick later.
        for n, gap in enumerate(gaps, 1):
            assert n - 0.2 < gap < n + 5, gaps
        await wait_until(lambda: stack.text().count("crashing on purpose") == retries + 1, 5, "every try's output")
        text = stack.text()
        assert re.search(r"crasher kept dying right after starting and will not be restarted", text)
        assert stack.status()["crasher"].startswith("FATAL")
        assert stack.pids()["steady"] == steady
        await stop_and_check_nothing_is_left(stack)
    except BaseException:
        os.write(2, stack.text()[-5000:].encode())
        raise
    finally:
        stack.close()


def test_supervisord_runs_each_procfile_command_as_written(tmp_path: Path) -> None:
    """Read back by supervisord's own parser: `%`, quotes and `$VARS` reach `sh -c` untouched, in
    Procfile order, each with the restart policy."""
    var = tmp_path / "var"
    for sub in ("log", "supervisor"):
        (var / sub).mkdir(parents=True)
    tricky = Program("tricky", """sh -c 'echo "100% of $HOME"; exit 3'""")
    programs = [*read_procfile(ROOT / "Procfile"), tricky]
    conf = tmp_path / "supervisord.conf"
    conf.write_text(render_supervisor_config(programs, tmp_path, var))
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    parsed = sorted((c for g in options.process_group_configs for c in g.process_configs), key=lambda c: c.priority)
    assert [c.name for c in parsed] == [p.name for p in programs]
    policy = Supervision()
    for config, program in zip(parsed, programs, strict=True):
        assert shlex.split(config.command) == ["/bin/sh", "-c", f"exec {program.command}"]
        assert config.directory == str(tmp_path)
        assert config.autorestart is RestartUnconditionally and config.startretries == policy.start_retries
        assert config.startsecs == policy.start_secs and config.stopwaitsecs == policy.stop_wait_secs
        assert config.stopasgroup and config.killasgroup and config.redirect_stderr
    for bad in ("python -m x ; rm -rf /", "python -m x # a comment"):
        with pytest.raises(ValueError, match="comment"):
            render_supervisor_config([Program("bad", bad)], tmp_path, var)
