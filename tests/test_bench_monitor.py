"""`make bench-monitor` in its short mode: it runs, and prints every row of its table (every fault
kind, the false alarms, CPU at each fleet size) with a figure for the detector and the baseline.
Structure only: speed and quality are figures for the report, never asserted here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from servers import ROOT

FAULTS = ("level_shift", "stuck", "noise", "drift", "dropout", "out_of_range", "missing_readings")


def test_bench_monitor_short_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/bench/monitor.py"), "--short", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("fault kind") and "recall new" in line and "recall base" in line for line in lines)
    for kind in FAULTS:
        (row,) = [line for line in lines if line.split()[:1] == [kind]]
        # events, recall (new, baseline), delay (new, baseline), alerts per event (new, baseline), kind right
        assert len(row.split()) >= 9, row
        assert re.search(r"\d+%", row), row
    (false_alarms,) = [line for line in lines if line.startswith("false alarms")]
    assert len(re.findall(r"\d+\.\d+ /sensor-h", false_alarms)) == 2
    cpu = [line for line in lines if line.startswith("cpu ")]
    assert [line.split()[1] for line in cpu] == ["50", "200"]
    assert all(len(re.findall(r"\d+\.\d+ ms/window", line)) == 2 for line in cpu)
    report = json.loads(out.read_text())
    (quality,) = report["quality"]  # one seed in the short mode
    assert set(quality) == {"new", "baseline"}
    for method in ("new", "baseline"):
        assert set(FAULTS) <= set(quality[method]) and "false_alarms_per_sensor_hour" in quality[method]
    assert set(report["cpu"]) == {"50", "200"}
