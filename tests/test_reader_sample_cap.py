"""The sensor-reader's cap on samples per window (issue 10, per-device fairness at the source): a
driver gone wrong that returns far more samples than its device's polling yields cannot flood the
pipeline; the excess is shed, counted by device and said in the log and the device's health."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from iotpipe import MAX_SAMPLES_PER_SENSOR, KeyRing, Runtime, counter
from sensor_reader.drivers import Block
from sensor_reader.service import SensorReader, Settings, sample_cap
from servers import Stack

DEVICES = """
[[devices]]
id = "fifo"
driver = "simulated"
interval = 0.1
[devices.params]
sensors = ["a", "b"]
sample_rate = 100

[[devices]]
id = "plain"
driver = "simulated"
interval = 0.5
"""
T0 = 1_795_533_424_000


def reader(stack: Stack, keyring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SensorReader:
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES)
    env = stack.env(IOTPIPE_DEVICES_FILE=str(devices), IOTPIPE_STATE_DIR=str(tmp_path / "state"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return SensorReader(Runtime(Settings.load(instance="cap"), keyring=keyring))


def test_a_device_returning_far_more_samples_than_configured_is_capped_per_window(
    stack: Stack, keyring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    component = reader(stack, keyring, tmp_path, monkeypatch)
    # 100 samples a second in 1 s windows, a cap of 4 times that; one sample per 0.5 s poll: 2, cap 8.
    assert component._caps == {"fifo": 400, "plain": 8}
    fifo, plain = component._sampler("fifo"), component._sampler("plain")
    fifo(T0 + 100, Block(10.0, {"a": [1.0] * 10, "b": [2.0] * 10}))  # what the device should return
    # A driver gone wrong: a million samples 0.1 µs apart, all in the same window.
    with caplog.at_level(logging.WARNING):
        fifo(T0 + 900, Block(0.0001, {"a": [1.0] * 1_000_000, "b": [2.0] * 1_000_000}))
        fifo(T0 + 950, Block(0.001, {"a": [1.0] * 1000, "b": [2.0] * 1000}))
    window = component._open["fifo"]
    assert window.samples == 400 and {s: len(v) for s, v in window.v.items()} == {"a": 400, "b": 400}
    shed = (1_000_000 - 390 + 1000) * 2
    assert counter(component.runtime.metrics.counters(), "readings_shed", "fifo") == shed
    assert component.health()["devices"]["fifo"]["readings_shed"] == shed
    said = [r.getMessage() for r in caplog.records if "more samples than its window" in r.getMessage()]
    assert len(said) == 1 and "fifo" in said[0]  # once a minute, however many blocks
    # The next window starts with the full cap again; the other device was never touched.
    fifo(T0 + 1100, Block(10.0, {"a": [1.0] * 10, "b": [2.0] * 10}))
    assert component._open["fifo"].samples == 10
    for i in range(12):  # a single-sample device polled too often still keeps at most its cap
        plain(T0 + 2000 + i, {"temperature": 20.0, "humidity": 40.0})
    assert component._open["plain"].samples == 8
    assert component.health()["devices"]["plain"]["readings_shed"] == 4 * 2


def test_the_cap_never_exceeds_what_the_contract_allows() -> None:
    settings = Settings.model_construct(sample_cap_factor=4.0)
    assert sample_cap(10_000_000, settings) == MAX_SAMPLES_PER_SENSOR
    assert sample_cap(0.01, settings) == 1
