"""Prometheus metrics of every service, scraped over HTTP from real processes, and the Grafana
dashboard checked against what they expose.

The pipeline runs as subprocesses (cloud-sink, sensor-reader, preprocessor, cache-writer,
cloud-forwarder, monitor, exporter) against the real brokers and Redis, each service with its own
/metrics port; the test scrapes each one, parses it with prometheus_client's own parser and checks
that the per-hop counters move, the window lag histogram has observations at every stage that
observes it, and the queue-depth gauges are there. Every PromQL expression of
docs/grafana/iotpipe-dashboard.json must then name only metrics and labels that scrape exposes
(a misspelt metric or label in a panel is caught: checked on a copy with one of each).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from iotpipe import KeyRing, ServiceSettings, Topics
from iotpipe._health import LAG_BUCKETS, LAG_METRIC, Metrics, MetricsServer, WindowLag
from iotpipe.devstack import SERVICES, local_metrics_ports, read_procfile, render_supervisor_config
from prometheus_client.parser import text_string_to_metric_families
from servers import ROOT, Stack, bus_for, free_port, health_doc, pipeline_env, spawn, stop_all, wait_until
from supervisor.options import ServerOptions

DASHBOARD = ROOT / "docs/grafana/iotpipe-dashboard.json"
# Labels Prometheus adds to every series of a target when it scrapes (docs/prometheus.yml): job is
# the service, instance the target's host:port. The dashboard groups by them; no service exposes them.
TARGET_LABELS = frozenset({"job", "instance"})
# Sample names of each metric type, as the text format exposes them.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
# Words of PromQL that are not metric names when they stand alone (keywords; functions are told by
# the `(` after them).
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"})
PROMQL_WORDS |= {"unless", "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")

# Python services, package names; the cloud-sink is the stand-in cloud (no /metrics of its own).
PIPELINE = ("sensor_reader", "preprocessor", "cache_writer", "cloud_forwarder", "monitor", "exporter")
INSTANCE = "m1"

DEVICES = """
[[devices]]
id = "dev-a"
driver = "simulated"
interval = 0.02
[devices.params]
sensors = ["temperature", "humidity"]

# No SPI bus 99 exists: opening it fails every time, as an unplugged ADC would (a fault alert).
[[devices]]
id = "dead-adc"
driver = "mcp3008"
interval = 0.05
[devices.params]
bus = 99
[devices.params.channels.soil]
channel = 0
unit = "%"
min = 0.0
max = 100.0
"""


# -- the scrape ----------------------------------------------------------------------------------------
@dataclass
class Scrape:
    """One /metrics page, parsed by prometheus_client's parser."""

    types: dict[str, str] = field(default_factory=dict)  # family name -> type
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls()
        for family in text_string_to_metric_families(text):
            scrape.types[family.name] = family.type
            scrape.samples += [(s.name, dict(s.labels), s.value) for s in family.samples]
        return scrape

    def names(self) -> set[str]:
        """Every series name this page exposes: each family's, with its type's suffixes (declared
        even before its first sample), and every sample's."""
        out = {name + suffix for name, kind in self.types.items() for suffix in SUFFIXES.get(kind, ("",))}
        return out | {name for name, _labels, _value in self.samples}

    def labels(self) -> set[str]:
        return {label for _name, labels, _value in self.samples for label in labels}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
        return sum(v for n, lab, v in self.samples if n == name and labels.items() <= lab.items())

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and labels.items() <= lab.items() for n, lab, _v in self.samples)


def fetch(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return Scrape.parse(response.read().decode())


# -- the dashboard's queries ----------------------------------------------------------------------------
def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to: a small tokenizer, not a parser.
    Grafana variables and range selectors go first, then label matchers (their label names kept,
    their quoted values dropped), then grouping clauses (their label names kept); what is left that
    looks like an identifier, is no keyword and is not called as a function, is a metric name."""
    labels: set[str] = set()
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    for body in _GROUPING.findall(expr):
        labels |= {label.strip() for label in body.split(",") if label.strip()}
    expr = _GROUPING.sub(" ", expr)
    metrics = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue  # a function or an aggregation, or a keyword
        metrics.add(match.group(0))
    return metrics, labels


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_problems(dashboard: dict[str, Any], names: set[str], labels: set[str]) -> list[str]:
    """Every metric or label a panel's query or legend names that the scrape does not expose."""
    problems = []
    known_labels = labels | TARGET_LABELS
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            metrics, used = promql_names(target["expr"])
            used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            problems += [f"{panel['title']!r}: no metric {m}" for m in sorted(metrics - names)]
            problems += [f"{panel['title']!r}: no label {lab}" for lab in sorted(used - known_labels)]
            if not metrics:
                problems.append(f"{panel['title']!r}: {target['expr']!r} names no metric")
    return problems


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


# -- the pipeline, scraped --------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_every_service_exposes_hop_counters_lag_and_queues_that_the_dashboard_queries(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    sink_port = free_port()
    ports = {service: free_port() for service in PIPELINE}
    env = pipeline_env(stack, base, tmp_path, INSTANCE, DEVICES, sink_port)
    topics = Topics(base)
    procs: dict[str, subprocess.Popen[bytes]] = {"cloud_sink": spawn("cloud_sink", env, tmp_path)}
    for service in PIPELINE:
        if service != "sensor_reader":
            procs[service] = spawn(service, {**env, "IOTPIPE_METRICS_PORT": str(ports[service])}, tmp_path)
    sender = bus_for(stack, "preprocessor", keyring=keyring)  # may publish on processed topics
    scrapes: dict[str, Scrape] = {}

    async def scrape_all() -> dict[str, Scrape]:
        got = await asyncio.gather(*(asyncio.to_thread(fetch, ports[s]) for s in PIPELINE), return_exceptions=True)
        return {s: g for s, g in zip(PIPELINE, got, strict=True) if isinstance(g, Scrape)}

    lags: list[dict[str, Any]] = []  # the preprocessor's status `lag`, as its health file says it

    unmet: list[str] = []  # what the last check still waited for

    async def flowing() -> bool:
        if lag := health_doc(tmp_path, "preprocessor", INSTANCE).get("lag"):
            lags.append(lag)
        scrapes.update(await scrape_all())
        count = f"{LAG_METRIC}_count"
        checks = {"a status lag": bool(lags), "every scrape": len(scrapes) == len(PIPELINE)}
        for service, scrape in scrapes.items():
            if service != "sensor_reader":
                checks[f"{service} handled"] = scrape.value(count, stage="handled") > 0
            if service in ("cache_writer", "cloud_forwarder", "exporter"):
                checks[f"{service} delivered"] = scrape.value(count, stage="delivered") > 0
            if service in ("cache_writer", "monitor", "exporter"):
                checks[f"{service} rejected"] = scrape.value("iotpipe_rejected_total") > 0
        checks["fault alert"] = (
            "monitor" in scrapes and scrapes["monitor"].value("iotpipe_alerts_total", kind="fault") > 0
        )
        unmet[:] = [what for what, ok in checks.items() if not ok]
        return not unmet

    try:
        for service in PIPELINE[1:]:
            name = service.replace("_", "-")
            await wait_until(
                lambda n=name: health_doc(tmp_path, n, INSTANCE).get("state") == "online", 60, f"{name} online"
            )
        procs["sensor_reader"] = spawn(
            "sensor_reader", {**env, "IOTPIPE_METRICS_PORT": str(ports["sensor_reader"])}, tmp_path
        )
        # Something every consumer of processed windows refuses: a rejection by reason to scrape.
        await sender.start()
        await sender.wait_connected(15)
        await sender.publish(topics.processed("junk"), b"not an envelope", kind="junk")
        try:
            await wait_until(flowing, 90, "windows through every hop, end to end, a fault alert and a rejection")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still waiting for {unmet}") from None
    finally:
        await sender.stop()
        final = await scrape_all()
        stop_all(procs.values())
    scrapes.update(final)

    reader, pre, cache, fwd, mon, exp = (scrapes[s] for s in PIPELINE)
    # Per hop: what each service publishes, the next one receives.
    assert reader.value("iotpipe_published_total", kind="raw") > 0 and reader.value("iotpipe_readings_total") > 0
    assert pre.value("iotpipe_received_total", kind="sealed") > 0
    assert pre.value("iotpipe_published_total", kind="processed") > 0 and pre.value("iotpipe_windows_total") > 0
    for consumer in (cache, fwd, mon, exp):
        assert consumer.value("iotpipe_received_total", kind="sealed") > 0
        assert consumer.value("iotpipe_rejected_total") > 0  # the junk message
    assert cache.value("iotpipe_windows_written_total") > 0
    assert fwd.value("iotpipe_records_uploaded_total") > 0
    assert exp.value("iotpipe_projected_total", kind="state") > 0
    assert mon.value("iotpipe_published_total", kind="alert") > 0
    for scrape in scrapes.values():
        assert scrape.value("iotpipe_published_total", kind="status") > 0  # every heartbeat counted
    # The lag histogram: buckets from 10 ms to 10 min, +Inf equal to the count.
    for service in PIPELINE[1:]:
        scrape = scrapes[service]
        buckets = [
            (lab["le"], v) for n, lab, v in scrape.samples if n == f"{LAG_METRIC}_bucket" and lab["stage"] == "handled"
        ]
        assert [le for le, _v in buckets] == [*(str(b) for b in LAG_BUCKETS), "+Inf"], service
        assert buckets[-1][1] == scrape.value(f"{LAG_METRIC}_count", stage="handled") > 0, service
        assert [v for _le, v in buckets] == sorted(v for _le, v in buckets), f"{service}: cumulative"
        assert scrape.value(f"{LAG_METRIC}_sum", stage="handled") > 0, service
    assert not reader.has(f"{LAG_METRIC}_count"), "the sensor-reader handles no window it receives"
    # Queue depths: the bus's inbound queue of each subscription, and each service's own buffers.
    for service in PIPELINE:
        assert scrapes[service].has("iotpipe_queue_depth", queue="publish_in_flight"), service
    for service in PIPELINE[1:]:
        assert (
            scrapes[service].has("iotpipe_queue_depth", queue=f"inbound:{base}/v2/processed/+")
            or service == "preprocessor"
        )
    assert pre.has("iotpipe_queue_depth", queue=f"inbound:{base}/v2/raw/+")
    assert reader.has("iotpipe_queue_depth", queue="spool_memory") and reader.has(
        "iotpipe_queue_bytes", queue="spool_disk"
    )
    assert cache.has("iotpipe_queue_depth", queue="redis_batch")
    assert fwd.has("iotpipe_queue_depth", queue="outbox") and fwd.has("iotpipe_queue_bytes", queue="outbox")
    assert exp.has("iotpipe_queue_depth", queue="projection_pending") and exp.has(
        "iotpipe_queue_depth", queue="alerts_pending"
    )
    # The status `lag`: the same observations, over the windows handled since the previous status.
    for lag in lags:
        assert set(lag) == {"p50_ms", "max_ms", "windows"}, lag
        assert 0 <= lag["p50_ms"] <= lag["max_ms"] and lag["windows"] >= 1, lag

    # The dashboard: every query names what these scrapes expose.
    names = set().union(*(s.names() for s in scrapes.values()))
    labels = set().union(*(s.labels() for s in scrapes.values()))
    dashboard = load_dashboard()
    assert dashboard_problems(dashboard, names, labels) == []
    # Control: the same check catches a misspelt metric, and a misspelt label, in one panel.
    broken = copy.deepcopy(dashboard)
    target = next(t for p in panels(broken) for t in p.get("targets", []) if "_bucket" in t["expr"])
    target["expr"] = target["expr"].replace(f"{LAG_METRIC}_bucket", "iotpipe_window_lag_second_bucket")
    assert any("no metric iotpipe_window_lag_second_bucket" in p for p in dashboard_problems(broken, names, labels))
    broken = copy.deepcopy(dashboard)
    target = next(t for p in panels(broken) for t in p.get("targets", []) if "by (job, queue)" in t["expr"])
    target["expr"] = target["expr"].replace("by (job, queue)", "by (job, queues)")
    assert any("no label queues" in p for p in dashboard_problems(broken, names, labels))


# -- the dashboard's shape ----------------------------------------------------------------------------------
def test_the_dashboard_is_importable_and_queries_through_its_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    variables = dashboard["templating"]["list"]
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus"}.items() <= variables[0].items()
    every = list(panels(dashboard))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    cells: set[tuple[int, int]] = set()
    for panel in every:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cell = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cell & cells, f"{panel['title']} overlaps another panel"
        cells |= cell
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == datasource and t["expr"].strip() for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in every)
    for topic in ("received", "published", "rejections", "p50", "p99", "queue", "outbox", "alerts", "projection"):
        assert topic in titles, f"no panel about {topic}"


def test_the_query_tokenizer_finds_metrics_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(iotpipe_window_lag_seconds_bucket{stage="delivered",'
        ' queue=~"a|b"}[$__rate_interval]))) / on(job) group_left max(iotpipe_queue_depth) > 1e3'
    )
    assert promql_names(expr) == (
        {"iotpipe_window_lag_seconds_bucket", "iotpipe_queue_depth"},
        {"job", "le", "stage", "queue"},
    )


# -- the pieces, alone --------------------------------------------------------------------------------------
def test_window_lag_percentile_comes_from_the_histogram_buckets_and_resets_each_status() -> None:
    lag = WindowLag()
    now = 1_000_000
    lag.observe("handled", now, [now - 150, now - 250, now - 250, now - 350])
    lag.observe("handled", now, [now + 40])  # the sender's clock ahead of ours: no negative lag
    lag.observe("delivered", now, [now - 700_000])  # past the last bucket: +Inf
    # Five lags (0, 150, 250, 250, 350 ms): the median as histogram_quantile interpolates it, rank 2.5
    # of 5, a quarter into the 200-300 ms bucket (which holds the 3rd and 4th): 225 ms, not the exact
    # 250: the dashboard's p50 and the status's are the same number.
    assert lag.take_interval() == {"p50_ms": 225.0, "max_ms": 350.0, "windows": 5}
    assert lag.take_interval() is None, "a new interval after each status"
    (family,) = list(lag.collect())
    samples = {(s.name, s.labels["stage"], s.labels.get("le")): s.value for s in family.samples}
    assert samples[(f"{LAG_METRIC}_count", "handled", None)] == 5
    assert samples[(f"{LAG_METRIC}_bucket", "handled", "0.01")] == 1
    assert samples[(f"{LAG_METRIC}_bucket", "handled", "0.2")] == 2
    assert samples[(f"{LAG_METRIC}_bucket", "handled", "0.3")] == 4
    assert samples[(f"{LAG_METRIC}_sum", "handled", None)] == pytest.approx(1.0)
    assert samples[(f"{LAG_METRIC}_bucket", "delivered", "600.0")] == 0
    assert samples[(f"{LAG_METRIC}_bucket", "delivered", "+Inf")] == 1
    # Interpolation never says more than the largest lag seen, and beyond the last bucket it says
    # that bucket's bound (as Prometheus does).
    lag.observe("handled", now, [now - 11])
    assert lag.take_interval() == {"p50_ms": 11.0, "max_ms": 11.0, "windows": 1}
    lag.observe("handled", now, [now - 700_000])
    assert lag.take_interval() == {"p50_ms": 600_000.0, "max_ms": 700_000.0, "windows": 1}


def test_a_taken_metrics_port_is_logged_once_counted_and_survived(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = Metrics()
        with caplog.at_level(logging.INFO, logger="iotpipe._health"):
            assert MetricsServer(metrics, "127.0.0.1", port).start() is False
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0].getMessage()
        assert metrics.errors.labels("metrics_port")._value.get() == 1
    # The port free: served, then released on stop.
    server = MetricsServer(metrics, "127.0.0.1", port)
    assert server.start() is True
    try:
        page = fetch(port)
        assert page.value("iotpipe_errors_total", kind="metrics_port") == 1
        assert page.types[LAG_METRIC] == "histogram" and page.types["iotpipe_queue_depth"] == "gauge"
    finally:
        server.stop()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own (TIME_WAIT left)
        again.bind(("127.0.0.1", port))  # released
    assert MetricsServer(Metrics(), "127.0.0.1", 0).start() is False  # 0: off, quietly


def test_metrics_are_on_by_default_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("IOTPIPE_METRICS_PORT", "IOTPIPE_METRICS_HOST"):
        monkeypatch.delenv(key, raising=False)
    settings = ServiceSettings.load()
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9100)
    monkeypatch.setenv("IOTPIPE_METRICS_PORT", "0")
    assert ServiceSettings.load().metrics_port == 0


def test_the_local_stack_gives_each_service_its_own_metrics_port(tmp_path: Path) -> None:
    ports = local_metrics_ports()
    assert list(ports) == list(SERVICES) and list(ports.values()) == list(range(19101, 19101 + len(SERVICES)))
    assert set(local_metrics_ports(0).values()) == {0}
    var = tmp_path / "var"
    for sub in ("log", "supervisor"):
        (var / sub).mkdir(parents=True)
    programs = read_procfile(ROOT / "Procfile")
    conf = tmp_path / "supervisord.conf"
    own = {name: {"IOTPIPE_METRICS_PORT": str(port)} for name, port in ports.items()}
    conf.write_text(render_supervisor_config(programs, tmp_path, var, program_env=own))
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    parsed = {c.name: c for g in options.process_group_configs for c in g.process_configs}
    for name in SERVICES:
        assert parsed[name].environment == {"IOTPIPE_METRICS_PORT": str(ports[name])}, name
    assert not parsed["broker"].environment


def test_the_prometheus_recipes_scrape_every_service_where_it_listens() -> None:
    import yaml

    local = yaml.safe_load((ROOT / "docs/prometheus/local.yml").read_text())
    jobs = {job["job_name"]: job for job in local["scrape_configs"]}
    assert list(jobs) == list(SERVICES)
    for name, port in local_metrics_ports().items():
        assert jobs[name]["static_configs"] == [{"targets": [f"127.0.0.1:{port}"]}], name
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    recipe = yaml.safe_load((ROOT / "docs/prometheus/compose.yml").read_text())
    jobs = {job["job_name"]: job for job in recipe["scrape_configs"]}
    assert list(jobs) == list(SERVICES)
    for name in SERVICES:
        env = compose[name]["environment"]
        port = int(env["IOTPIPE_METRICS_PORT"])
        assert env["IOTPIPE_METRICS_HOST"] == "0.0.0.0", name
        if compose[name].get("ports"):  # a singleton: by its service name
            assert jobs[name]["static_configs"] == [{"targets": [f"{name}:{port}"]}], name
        else:  # scaled: every replica, by DNS
            assert str(port) in [str(p) for p in compose[name]["expose"]], name
            assert jobs[name]["dns_sd_configs"] == [
                {"names": [name], "type": "A", "port": port, "refresh_interval": "30s"}
            ], name
