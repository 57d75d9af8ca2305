"""`iotpipe watch`: its view (iotpipe._watch.LiveView) fed the payloads the services really publish,
and the command itself driven in tmux (send-keys, capture-pane) against a running stack: simulated
devices through sensor-reader, preprocessor, exporter and monitor, read as the public broker's
read-only `reader`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from iotpipe import (
    AnomalyOpen,
    Bus,
    DeviceStatus,
    Evidence,
    KeyRing,
    MqttSettings,
    OfflineAlert,
    Sealer,
    Topics,
    encode,
)
from iotpipe._watch import NONE, LiveView
from iotpipe.cli import SubscriberSettings, _alert_opener
from iotpipe.watch import WatchApp
from servers import ROOT, Stack, free_port, pipeline_env, spawn, stop_all, wait_online, wait_until
from textual.widgets import DataTable, Static

T0 = 1_800_000_000_000  # unix ms
BASE = "iotpipe"
ROOT_TOPIC = Topics(BASE).root


def status(state: str = "online", ts: int = T0, boot: int = T0 - 60_000, **details: object) -> bytes:
    """A service's retained status as iotpipe.Bus publishes it (state, client_id, ts, service,
    instance, then the heartbeat's details)."""
    doc = {"state": state, "client_id": "preprocessor-p1", "ts": ts, "service": "preprocessor", "instance": "p1"}
    return orjson.dumps({**doc, "boot_ts": boot, **details})


# -- the view ------------------------------------------------------------------------------------------
def test_a_device_shows_the_monitors_state_its_values_with_units_and_how_long_ago_its_window_ended() -> None:
    view = LiveView()
    dev = f"{ROOT_TOPIC}/devices/greenhouse-1"
    # As the exporter publishes them (services/exporter: orjson of its table; bare online/offline).
    view.ingest(f"{dev}/units", orjson.dumps({"temperature": "degC", "humidity": "%RH"}))
    view.ingest(f"{dev}/state", orjson.dumps({"temperature": 21.347, "humidity": 48, "ts": T0}))
    view.ingest(f"{dev}/availability", b"online")
    view.ingest(f"{dev}/sensor/temperature", b"21.347")  # not subscribed to; harmless if it comes
    view.ingest(
        f"{ROOT_TOPIC}/status/device/greenhouse-1",
        encode(DeviceStatus(state="online", device="greenhouse-1", last_seen=T0, ts=T0)),
    )
    [row] = view.device_rows(now=T0 / 1000 + 7.5)
    assert (row.device, row.state, row.last_seen) == ("greenhouse-1", "online", "7s")
    assert row.values == "humidity 48.00 %RH  temperature 21.35 degC"
    assert view.counts() == {
        "devices": 1,
        "devices_online": 1,
        "services": 0,
        "services_online": 0,
        "alerts": 0,
    }


def test_a_fault_shows_its_reason_and_a_disagreeing_projection_and_a_cleared_device_goes() -> None:
    view = LiveView()
    dev = f"{ROOT_TOPIC}/devices/pm-1"
    view.ingest(
        f"{ROOT_TOPIC}/status/device/pm-1",
        encode(DeviceStatus(state="fault", device="pm-1", last_seen=T0 - 120_000, ts=T0, reason="bus: timeout")),
    )
    view.ingest(f"{dev}/availability", b"offline")
    [row] = view.device_rows(now=T0 / 1000)
    # No state yet: last seen from the monitor's last_seen.
    assert (row.state, row.values, row.last_seen) == ("fault (bus: timeout), exporter: offline", NONE, "2m")
    # The exporter forgets it (empty retained payloads) and the monitor clears its status: gone.
    for topic in (f"{dev}/availability", f"{ROOT_TOPIC}/status/device/pm-1"):
        view.ingest(topic, b"")
    assert view.device_rows(now=T0 / 1000) == []


def test_a_services_rates_come_from_successive_nested_counters_and_a_restart_resets_them() -> None:
    view = LiveView()
    topic = f"{ROOT_TOPIC}/status/service/preprocessor/p1"
    first = {"received": {"raw": 100}, "published": {"processed": 100, "status": 5}, "windows": 300}
    view.ingest(topic, status(counters=first))
    [row] = view.service_rows(now=T0 / 1000 + 2)
    assert (row.service, row.instance, row.state, row.rate_in, row.rate_out) == (
        "preprocessor",
        "p1",
        "online",
        NONE,
        NONE,
    )
    assert (row.rejected, row.lag, row.status_age) == ("0", NONE, "2s")

    later = {
        "received": {"raw": 150},
        "published": {"processed": 125, "status": 6},  # the heartbeat itself is not data out
        "rejected": {"stale": 2, "replay": 1},
        "windows": 450,
    }
    view.ingest(topic, status(ts=T0 + 10_000, counters=later, lag={"p50_ms": 412.4, "max_ms": 900.0, "windows": 25}))
    [row] = view.service_rows(now=T0 / 1000 + 10)
    assert (row.rate_in, row.rate_out, row.rejected, row.lag) == ("5.0/s", "2.5/s", "3", "412 ms")

    # A new boot starts its counters from 0: no rate from the old process's numbers.
    view.ingest(topic, status(ts=T0 + 20_000, boot=T0 + 15_000, counters={"received": {"raw": 10}}))
    [row] = view.service_rows(now=T0 / 1000 + 20)
    assert (row.rate_in, row.rate_out, row.lag) == (NONE, NONE, NONE)
    view.ingest(topic, status(state="offline", ts=T0 + 21_000, boot=T0 + 15_000))
    assert view.service_rows(now=T0 / 1000 + 21)[0].state == "offline"
    view.ingest(topic, b"")  # a member that left its group clears its status
    assert view.service_rows(now=T0 / 1000) == []


def test_the_exporters_publishes_to_the_public_broker_count_as_out() -> None:
    view = LiveView()
    topic = f"{ROOT_TOPIC}/status/service/exporter/x1"
    view.ingest(topic, status(counters={"received": {"processed": 10}, "projected": {"state": 10, "sensor": 20}}))
    later = {"received": {"processed": 20}, "projected": {"state": 20, "sensor": 40, "availability": 2}}
    view.ingest(topic, status(ts=T0 + 2_000, counters=later))
    [row] = view.service_rows(now=T0 / 1000 + 2)
    assert (row.service, row.rate_in, row.rate_out) == ("exporter", "5.0/s", "16.0/s")


def test_alerts_newest_first_each_once_whether_sealed_or_projected(keyring: KeyRing, secrets_dir: Path) -> None:
    settings = SubscriberSettings.load(secrets_dir=secrets_dir)
    opener, note = _alert_opener(settings)
    assert opener is not None and "key ring" in note
    view = LiveView(open_sealed=opener, max_alerts=3)
    offline = OfflineAlert(device="greenhouse-2", reason="no window for 30 s", last_seen=T0 - 30_000, ts=T0)
    anomaly = AnomalyOpen(
        device="greenhouse-1",
        sensor="temperature",
        episode=f"temperature/{T0}",
        anomaly="level_shift",
        start=T0,
        end=T0 + 1000,
        score=9.5,
        evidence=Evidence(mean=55.5, min=55.0, max=56.0, std=0.3, n=10, windows=3, normal=21.0, scale=0.2),
        ts=T0 + 2000,
    )
    sealer = Sealer(keyring, "monitor/m1")
    sealed_topic = Topics(BASE).alerts("greenhouse-2")
    view.ingest(sealed_topic, sealer.seal(sealed_topic, offline))  # bridged, sealed
    view.ingest(f"{ROOT_TOPIC}/devices/greenhouse-2/alert", encode(offline))  # the exporter's plain copy
    view.ingest(f"{ROOT_TOPIC}/devices/greenhouse-1/alert", encode(anomaly))
    rows = view.alert_rows()
    assert [(r.device, r.kind) for r in rows] == [("greenhouse-1", "anomaly_open"), ("greenhouse-2", "offline")]
    assert rows[0].detail == "temperature level_shift: mean 55.50 score 9.50"
    assert rows[1].detail.startswith("no window for 30 s, last seen ")
    assert rows[0].time == time.strftime("%H:%M:%S", time.localtime((T0 + 2000) / 1000))
    # A sealed message that does not open is named and skipped, never raised.
    view.ingest(sealed_topic, b'{"v":1,"alg":"fernet","kid":"nope","ct":"x"}')
    assert view.unreadable == 1 and view.problem is not None and sealed_topic in view.problem
    # Only the newest `max_alerts` are kept.
    for i in range(3):
        view.ingest(
            f"{ROOT_TOPIC}/devices/d{i}/alert",
            encode(OfflineAlert(device=f"d{i}", reason=None, last_seen=None, ts=T0 + 10_000 + i)),
        )
    assert [r.device for r in view.alert_rows()] == ["d2", "d1", "d0"]


def test_without_a_key_ring_sealed_alerts_are_left_to_the_projection(tmp_path: Path) -> None:
    opener, note = _alert_opener(SubscriberSettings.load(secrets_dir=tmp_path))
    assert opener is None and "projection only" in note
    view = LiveView(open_sealed=None)
    view.ingest(f"{ROOT_TOPIC}/alerts/d1", b'{"v":1,"alg":"fernet","kid":"k1","ct":"x"}')
    assert view.alert_rows() == [] and view.unreadable == 0


def test_unreadable_payloads_are_counted_and_named_never_raised() -> None:
    view = LiveView()
    view.ingest(f"{ROOT_TOPIC}/devices/d1/state", b"not json")
    view.ingest(f"{ROOT_TOPIC}/status/service/monitor/m1", b"[1, 2]")
    view.ingest(f"{ROOT_TOPIC}/devices/d1/alert", b'{"kind": "offline"}')
    assert view.unreadable == 3
    assert view.problem == f"{ROOT_TOPIC}/devices/d1/alert: an alert needs device, kind and ts"
    assert view.device_rows(now=T0 / 1000) == []  # no row made of what could not be read
    view.ingest(f"{ROOT_TOPIC}/devices/d1/state", orjson.dumps({"temperature": 20, "ts": T0}))
    view.ingest(f"{ROOT_TOPIC}/devices/d1/state", b'{"temperature": ')
    assert view.device_rows(now=T0 / 1000)[0].values == "temperature 20.00"  # the last good one stays
    view.ingest(f"{ROOT_TOPIC}/exporter/state", b"online")
    assert view.exporter == "online"


# -- the command, in tmux, against a running stack ---------------------------------------------------
DEVICES = """
[[devices]]
id = "dev-a"
driver = "simulated"
interval = 0.05
[devices.params]
sensors = ["temperature", "humidity"]

[[devices]]
id = "dev-b"
driver = "simulated"
interval = 0.05
[devices.params]
sensors = ["pressure"]
"""
SERVICES = {
    "sensor_reader": "sensor-reader",
    "preprocessor": "preprocessor",
    "exporter": "exporter",
    "monitor": "monitor",
}
VALUE = r"-?\d+\.\d\d"


class Tmux:
    """A detached tmux session of a fixed size on a server of its own (`-L`): never a user's tmux."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Not COLUMNS/LINES (pytest sets 80x24): the server hands them to the pane, where Textual
        # would believe them over the pane's real size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=check, timeout=30, env=env
        )

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "watch", check=False).stdout

    def alive(self) -> bool:
        return self("has-session", "-t", "watch", check=False).returncode == 0


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run `make test-deps` (it installs TEST_OS_PACKAGES, tmux among them)")
    server = Tmux(f"iotpipe-test-{uuid.uuid4().hex[:12]}")
    try:
        yield server
    finally:
        server("kill-server", check=False)  # whatever the test left: its own server only
        # tmux leaves its socket file behind when its last session ends.
        (Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / server.socket).unlink(missing_ok=True)


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_watch_in_tmux_shows_every_device_service_and_alert_and_quits_on_q(
    stack: Stack, base: str, tmp_path: Path, tmux: Tmux
) -> None:
    topics = Topics(base)
    env = pipeline_env(stack, base, tmp_path, "w1", DEVICES, IOTPIPE_OFFLINE_AFTER="3")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    exit_file = tmp_path / "watch.exit"
    try:
        for module, name in SERVICES.items():
            if module != "sensor_reader":
                procs[module] = spawn(module, env, tmp_path)
                await wait_online(stack, topics.service_status(name, "w1"), timeout=60)
        procs["sensor_reader"] = spawn("sensor_reader", env, tmp_path)

        # What `uv run iotpipe watch` runs: this environment's `iotpipe` script, as the operator of the
        # public broker (`reader`, the default), with the test's secrets (its key ring too) and topic base.
        watch_env = {
            "IOTPIPE_MQTT__HOST": "127.0.0.1",
            "IOTPIPE_MQTT__PORT": str(stack.ports.public),
            "IOTPIPE_SECRETS_DIR": str(stack.secrets_dir),
            "IOTPIPE_BASE_TOPIC": base,
        }
        command = " ".join(
            [
                "env",
                *(f"{k}={v}" for k, v in watch_env.items()),
                str(Path(sys.executable).parent / "iotpipe"),
                "watch",
                ";",  # (not redirecting its stderr: Textual draws there)
                f"echo $? > {exit_file}",
            ]
        )
        tmux("new-session", "-d", "-s", "watch", "-x", "160", "-y", "48", "-c", str(ROOT), command)

        def shows(*patterns: str) -> bool:
            screen = tmux.screen()
            return all(re.search(p, screen, re.M) for p in patterns)

        device_rows = (
            rf"dev-a\s+online\s+humidity {VALUE} \S+\s+temperature {VALUE} \S+\s+\d+s\b",
            rf"dev-b\s+online\s+pressure {VALUE} \S+\s+\d+s\b",
        )
        service_rows = tuple(rf"{name}\s+w1\s+online\b" for name in SERVICES.values())
        # Rates need two heartbeats of one process, a second apart: numbers, not —.
        rates = tuple(rf"{name}\s+w1\s+online\s+\d+\.\d/s\s+\d+\.\d/s\s+\d+\s" for name in ("preprocessor", "exporter"))
        header = (rf"127\.0\.0\.1:{stack.ports.public} as reader\s+connected", r"devices 2/2 online")
        await wait_until(lambda: shows(*device_rows, *service_rows, *rates, *header), 120, "every device and service")

        # A device stops sending (its reader stops): the monitor's offline alert, sealed through the
        # bridge and as the projection's copy, shown once per device.
        procs["sensor_reader"].terminate()
        assert procs["sensor_reader"].wait(30) == 0
        alerts = tuple(rf"^\W*\d\d:\d\d:\d\d\s+{d}\s+offline\b" for d in ("dev-a", "dev-b"))
        await wait_until(lambda: shows(*alerts, r"dev-a\s+offline"), 60, "the offline alerts")
        screen = tmux.screen()
        assert len(re.findall(r"dev-a\s+offline\s+\S", screen.split("Recent alerts")[1])) == 1, screen

        tmux("send-keys", "-t", "watch", "q")
        await wait_until(lambda: exit_file.exists() and exit_file.read_text().strip(), 30, "watch to exit")
        assert exit_file.read_text().strip() == "0"
        await wait_until(lambda: not tmux.alive(), 10, "the tmux session to end with it")
    except BaseException:
        sys.stderr.write(f"\n===== screen =====\n{tmux.screen()}\n")
        for module in SERVICES:
            log = tmp_path / f"{module}.out"
            if log.exists():
                sys.stderr.write(f"===== {module} =====\n{log.read_text(errors='replace')[-2000:]}\n")
        raise
    finally:
        stop_all(procs.values())


# -- the app, without a terminal (Textual's pilot) ------------------------------------------------------
async def test_the_app_draws_the_view_says_it_is_not_connected_and_ctrl_c_quits(tmp_path: Path) -> None:
    password = tmp_path / "mqtt_reader_password"
    password.write_text("not used: nothing listens\n")
    # A real Bus towards a port nothing listens on: it keeps retrying in the background.
    bus = Bus(
        MqttSettings(host="127.0.0.1", port=free_port(), session_expiry=0),
        client_id="reader-sub-test",
        keyring=None,
        src="reader/watch",
        username="reader",
        password_file=password,
    )
    view = LiveView()
    view.ingest(f"{ROOT_TOPIC}/devices/dev-a/state", orjson.dumps({"temperature": 20.5, "ts": T0}))
    app = WatchApp(view, bus, where="127.0.0.1 as reader", sealed_note="alerts: projection only (no key ring)")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert "NOT CONNECTED (retrying)" in str(app.query_one("#header", Static).render())
        assert app.query_one("#devices", DataTable).get_row_at(0)[:3] == ["dev-a", NONE, "temperature 20.50"]
        view.ingest(f"{ROOT_TOPIC}/devices/dev-b/availability", b"online")
        await wait_until(lambda: app.query_one("#devices", DataTable).row_count == 2, 10, "dev-b drawn")
        await pilot.press("ctrl+c")
        await wait_until(lambda: app.return_code is not None, 10, "the app to exit")
    assert app.return_code == 0
