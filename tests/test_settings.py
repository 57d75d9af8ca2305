from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from iotpipe import ConfigError, ServiceSettings, Topics, validate_id
from sensor_reader.config import load_devices

BAD_IDS = ["a/b", "a+b", "#", "$SYS", "", "a\x00b", "x" * 65, "x" * 65536, "ü", "a b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_topic_injection_ids_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="must match"):
        validate_id(bad, "device id")
    with pytest.raises(ConfigError):
        Topics("iotpipe").raw(bad)


def test_topics_follow_the_contract() -> None:
    t = Topics("iotpipe")
    assert t.raw("d1") == "iotpipe/v2/raw/d1"
    assert t.processed("d1") == "iotpipe/v2/processed/d1"
    assert t.alerts("d1") == "iotpipe/v2/alerts/d1"
    assert t.service_status("monitor", "i1") == "iotpipe/v2/status/service/monitor/i1"
    assert t.device_status("d1") == "iotpipe/v2/status/device/d1"


def test_env_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTPIPE_MQTT__PORT", "99999")
    monkeypatch.setenv("IOTPIPE_BASE_TOPIC", "a/b")
    with pytest.raises(ConfigError) as err:
        ServiceSettings.load()
    assert "IOTPIPE_MQTT__PORT" in str(err.value) and "IOTPIPE_BASE_TOPIC" in str(err.value)


def test_env_settings_nested_and_secret_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTPIPE_MQTT__HOST", "broker.example")
    monkeypatch.setenv("IOTPIPE_SECRETS_DIR", "/s")
    settings = ServiceSettings.load(instance="i1")
    assert settings.mqtt.host == "broker.example" and settings.mqtt.port == 1883
    assert settings.keyring_path == Path("/s/keyring")
    assert settings.mqtt_password_path == Path("/s/mqtt_iotpipe_password")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[devices]]\nid = "a/b"\ndriver = "simulated"\n', r"devices\[0\] \(id 'a/b'\)\.id"),
        ('[[devices]]\nid = "d1"\ndriver = "nope"\n', r"devices\[0\] \(id 'd1'\)\.driver: .*unknown driver"),
        ('[[devices]]\nid = "d1"\ndriver = "simulated"\ninterval = -1\n', r"\(id 'd1'\)\.interval"),
        ('[[devices]]\nid = "d1"\ndriver = "simulated"\ncolour = 1\n', r"\(id 'd1'\)\.colour"),
        ('[[devices]]\nid = "d1"\ndriver = "simulated"\n[devices.params]\nbogus = 1\n', r"\(id 'd1'\)\.params\.bogus"),
        (
            '[[devices]]\nid = "d1"\ndriver = "simulated"\n[devices.params]\nsensors = ["warp", "warp"]\n',
            r"\(id 'd1'\)\.params: duplicate sensor names",
        ),
        (
            '[[devices]]\nid = "d1"\ndriver = "simulated"\n[[devices]]\nid = "d1"\ndriver = "simulated"\n',
            r"devices\[1\] \(id 'd1'\)\.id: duplicate",
        ),
        ("devices = []\n", "at least one"),
        ("[[devices]\n", "not valid TOML"),
    ],
)
def test_devices_file_errors_name_device_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_devices(write(tmp_path, text))


def test_shipped_simulated_devices_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    devices = load_devices(root / "services/sensor_reader/examples/simulated.toml")
    assert [d.id for d, _ in devices] == ["greenhouse-1", "greenhouse-2", "weather-station"]


def test_service_refuses_bad_config_with_one_clear_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "IOTPIPE_MQTT__PORT": "not-a-port", "IOTPIPE_SECRETS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "preprocessor"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "IOTPIPE_MQTT__PORT" in result.stderr
    assert "Traceback" not in result.stderr
