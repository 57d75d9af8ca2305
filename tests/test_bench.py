"""`iotpipe bench` (`make bench`) end to end on a tiny ladder: one short step per workload with a few
devices, one tiny step of the naive baseline. Checks that the report has every figure, that no window
was lost and that the chart is a PNG; speed is never asserted (figures, not assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from servers import ROOT

PROCESSES = (
    "sensor-reader",
    "preprocessor",
    "cache-writer",
    "cloud-forwarder",
    "monitor",
    "mosquitto",
    "redis-server",
    "cloud-sink",
)
NAIVE_PROCESSES = ("naive-publisher", "naive-subscriber", "mosquitto", "redis-server")
COMMON = {
    "workload",
    "devices",
    "sensors",
    "hz",
    "readings_per_window",
    "offered",
    "achieved",
    "measure_s",
    "warmup_s",
    "lag_ms",
    "lost",
    "cpu_us_per_reading",
    "cpu_us_per_reading_total",
    "cpu_cores",
    "cpu_cores_total",
    "machine_busy_cores",
    "other_load_cores",
    "memory_mib",
    "drained",
    "drain_s",
}
PIPELINE_STEP = COMMON | {
    "achieved_intervals",
    "reader_published",
    "windows_expected",
    "lost_redis",
    "lost_sink",
    "lost_at_both",
    "duplicated",
    "duplicated_redis",
    "duplicated_sink",
    "unexpected",
    "unexpected_redis",
    "unexpected_sink",
    "devices_unseen",
    "alert_records",
    "loss_examples",
    "reader_stopped_cleanly",
    "source_gaps",
    "reader_skipped_polls",
    "doubled_windows",
    "readings_at_sink",
}
NAIVE_STEP = COMMON | {"publisher_acked", "messages_published", "messages_received", "backlog", "late_readings"}


def check_step(step: dict[str, Any], fields: set[str], processes: tuple[str, ...]) -> None:
    assert "error" not in step, step.get("error")
    assert fields <= set(step), sorted(fields - set(step))
    assert step["drained"], step
    assert step["lost"] == 0, step
    assert step["offered"] > 0
    assert step["achieved"] > 0, step  # something went through; how fast is a figure, not a check
    assert {"p50", "p99", "max", "samples", "resolution_ms"} <= set(step["lag_ms"])
    assert step["lag_ms"]["samples"] > 0 and step["lag_ms"]["p99"] is not None
    assert set(processes) <= set(step["cpu_us_per_reading"])
    for name in processes:
        assert {"rss", "hwm"} <= set(step["memory_mib"][name]), name
        assert step["memory_mib"][name]["hwm"] >= step["memory_mib"][name]["rss"] > 0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_bench_tiny_ladder(tmp_path: Path) -> None:
    out = tmp_path / "report" / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "iotpipe.cli",
            "bench",
            "--root",
            str(ROOT),
            "--high-steps",
            "2",
            "--fleet-steps",
            "20",
            "--baseline-steps",
            "400",
            "--warmup",
            "1",
            "--step-seconds",
            "5",
            "--drain-timeout",
            "60",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert {
        "started",
        "machine",
        "options",
        "window_ms",
        "lag_resolution_ms",
        "notes",
        "startup_s",
        "steps",
        "baseline",
        "ratio",
    } <= set(doc)
    assert doc["startup_s"] > 0
    assert [s["workload"] for s in doc["steps"]] == ["high", "fleet"]
    for step in doc["steps"]:
        check_step(step, PIPELINE_STEP, PROCESSES)
        assert step["lost_redis"] == step["lost_sink"] == 0
        assert step["windows_expected"] > 0
    assert [s["workload"] for s in doc["baseline"]] == ["naive"]
    check_step(doc["baseline"][0], NAIVE_STEP, NAIVE_PROCESSES)
    assert {"lag_bound_s", "baseline_best", "high_best", "high_over_baseline"} <= set(doc["ratio"])
    chart = out.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "iotpipe high / baseline at equal lag" in result.stdout
    # nothing of the run is left behind: its temp dir is removed
    assert not list(tmp_path.glob("iotpipe-bench-*"))
