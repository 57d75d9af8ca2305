"""Counters (Prometheus), the health file a container healthcheck reads, and its checker; the window
lag histogram, queue-depth gauges and the /metrics endpoint (docs/operations.md, "Metrics")."""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

log = logging.getLogger(__name__)


class Metrics:
    """One registry per service process. Every counter is also in the status message and health file."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("iotpipe_received", "Messages received and handled", ["kind"], registry=self.registry)
        self.published = Counter(
            "iotpipe_published", "Messages published and acknowledged by the broker", ["kind"], registry=self.registry
        )
        self.rejected = Counter(
            "iotpipe_rejected",
            "Messages rejected, by reason (window_future, window_too_old: windows, refused one by one)",
            ["reason"],
            registry=self.registry,
        )
        self.errors = Counter("iotpipe_errors", "Errors while handling, by kind", ["kind"], registry=self.registry)
        self.lag = WindowLag()
        self.queues = Queues()
        self.registry.register(self.lag)
        self.registry.register(self.queues)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def counters(self) -> dict[str, Any]:
        """Every counter, nested as the status message and health file carry it (`nested_counters`)."""
        return nested_counters(self.registry)


# The prefix every counter of ours has on /metrics, and the suffix prometheus_client gives counters:
# both say nothing in a status document that is all iotpipe counters.
_PREFIX = "iotpipe_"


def nested_counters(registry: CollectorRegistry) -> dict[str, Any]:
    """The counters of `registry` as nested JSON (docs/contract.md, "Service status"): the counter's
    name without `iotpipe_` and `_total`; an unlabelled counter is a number, a labelled one an
    object keyed by its first label's values, then its second's..., e.g.
    `{"received": {"raw": 60}, "rejected": {"stale": 1}, "windows": 60}`. A labelled counter with no
    sample yet is absent. Whole values are ints: JSON readers then see `60`, not `60.0`."""
    out: dict[str, Any] = {}
    for metric in registry.collect():
        if metric.type != "counter":
            continue
        name = metric.name.removeprefix(_PREFIX)
        for sample in metric.samples:
            if sample.name != f"{metric.name}_total":  # not `_created`
                continue
            value = int(sample.value) if sample.value.is_integer() else sample.value
            if not sample.labels:
                out[name] = value
                continue
            node = out.setdefault(name, {})
            *outer, last = sample.labels.values()  # in the counter's label order
            for label in outer:
                node = node.setdefault(label, {})
            node[last] = value
    return out


def counter(counters: Mapping[str, Any], name: str, *labels: str) -> float:
    """One value from nested counters (`nested_counters`, a status's `"counters"`): `name` without
    `iotpipe_`, then label values in order, e.g. `counter(c, "rejected", "stale")`; 0 if absent.
    Fewer labels than the counter has: the sum over the rest (`counter(c, "rejected")`: all reasons)."""
    node: Any = counters.get(name, 0)
    for label in labels:
        node = node.get(label, 0) if isinstance(node, Mapping) else 0
    return _total(node)


def _total(node: Any) -> float:
    if isinstance(node, Mapping):
        return sum((_total(child) for child in node.values()), 0)
    return node if isinstance(node, int | float) and not isinstance(node, bool) else 0


def write_health(path: Path, doc: dict[str, Any]) -> None:
    """Atomically replace the health file, so a reader never sees half a document."""
    write_atomically(path, orjson.dumps(doc))


def write_atomically(path: Path, data: bytes, like: os.stat_result | None = None) -> None:
    """Replace `path` with `data` so that a reader, or a crash, sees the old file or the new one.
    `like`: give the new file that file's mode (and owner, where we may), e.g. the one it replaces
    (else it is private to us: mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            if like is not None:
                os.fchmod(fh.fileno(), like.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):  # only root may give a file away
                    os.fchown(fh.fileno(), like.st_uid, like.st_gid)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_health(path: Path, max_age: float) -> tuple[bool, str]:
    """(healthy, why): the file exists, is fresh, and says the service is connected and online."""
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        return False, f"no readable health file at {path}: {exc}"
    age = time.time() - doc.get("ts", 0) / 1000
    if age > max_age:
        return False, f"health file is {age:.0f}s old (max {max_age:.0f}s)"
    if doc.get("state") != "online" or not doc.get("connected"):
        return False, f"state={doc.get('state')} connected={doc.get('connected')}"
    if doc.get("unhealthy"):  # the service's own reason (Component.health), e.g. a second broker gone
        return False, str(doc["unhealthy"])
    return True, "ok"


# -- window lag and queue depths (issue 12) -----------------------------------------------------------
# Upper bounds (s) of the window lag histogram: from 10 ms (a window handled at once) to 10 min (a
# backlog after an outage). Finer between 0.1 and 1 s, where a healthy pipeline lives: the reader
# publishes a window a grace period (200 ms by default) after its end.
LAG_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
LAG_METRIC = "iotpipe_window_lag_seconds"
# The stage whose observations make the status `lag` (docs/contract.md): a window handled by the bus
# (its handler returned: its effect is durable); `delivered` is the sinks' own, end to end.
STATUS_LAG_STAGE = "handled"


class _Lags:
    """One stage's observations: cumulative bucket counts and sum for Prometheus, and the counts
    since the last status `lag` (the same buckets: one definition of the percentile)."""

    __slots__ = ("counts", "interval", "interval_max", "sum_ms")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # per bucket (not cumulative), the last one +Inf
        self.interval = [0] * (buckets + 1)
        self.interval_max = 0
        self.sum_ms = 0


class WindowLag:
    """`iotpipe_window_lag_seconds{stage}`: how long after a window's end (its own timestamp, the
    sender's clock) a stage was done with it. Observed a batch of window ends at a time on the event
    loop; read by the /metrics thread (a copy of the counts under the GIL: a scrape may miss the
    batch being added, never sees a histogram whose buckets disagree with its count).

    Cost: counting the ends in C, then a bisect per distinct end: a few hundred ns a window, several
    times less than prometheus_client's Histogram, which takes a lock and a bisect per observation
    (tests/bench/lag.py measures both)."""

    def __init__(self, buckets: tuple[float, ...] = LAG_BUCKETS) -> None:
        self.buckets = buckets
        self._bounds_ms = [round(b * 1000) for b in buckets]
        self._stages: dict[str, _Lags] = {}

    def observe(self, stage: str, now_ms: int, ends: Iterable[int]) -> None:
        lags = self._stages.get(stage)
        if lags is None:
            lags = self._stages[stage] = _Lags(len(self.buckets))
        counts, interval, bounds = lags.counts, lags.interval, self._bounds_ms
        total, high = 0, lags.interval_max
        # The windows of a batch mostly share a few ends (every device's window closes at once):
        # counted in C first, then one bisect per distinct end.
        for end, n in collections.Counter(ends).items():
            lag = now_ms - end
            if lag < 0:  # the sender's clock ahead of ours: handled at once, as far as we can tell
                lag = 0
            i = bisect.bisect_left(bounds, lag)
            counts[i] += n
            interval[i] += n
            total += lag * n
            if lag > high:
                high = lag
        lags.sum_ms += total
        lags.interval_max = high

    def take_interval(self, stage: str = STATUS_LAG_STAGE) -> dict[str, float | int] | None:
        """The status `lag` since the previous call, and a new interval: `p50_ms` interpolated in
        the histogram's buckets as Prometheus's histogram_quantile does (so the status and the
        dashboard agree), never above the largest lag seen; `max_ms` exact. None if no window."""
        lags = self._stages.get(stage)
        if lags is None:
            return None
        interval, lags.interval = lags.interval, [0] * len(lags.interval)
        high, lags.interval_max = lags.interval_max, 0
        windows = sum(interval)
        if not windows:
            return None
        return {
            "p50_ms": round(float(min(self._quantile(0.5, interval, windows), high)), 3),
            "max_ms": float(high),
            "windows": windows,
        }

    def _quantile(self, q: float, counts: list[int], total: int) -> float:
        rank, seen, lower = q * total, 0, 0.0
        for bound, count in zip(self._bounds_ms, counts, strict=False):
            if count and seen + count >= rank:
                return lower + (bound - lower) * (rank - seen) / count
            seen += count
            lower = bound
        return float(self._bounds_ms[-1])  # in +Inf: the largest finite bound, as Prometheus says

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            LAG_METRIC,
            "Seconds from a window's end to a stage done with it: handled (its handler returned, the "
            "effect durable) or delivered (end to end: Redis written, cloud accepted, projection published)",
            labels=["stage"],
        )
        for stage, lags in list(self._stages.items()):
            counts = list(lags.counts)
            cumulative, running = [], 0
            for bound, count in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric([stage], cumulative, lags.sum_ms / 1000)
        yield family


class Queues:
    """`iotpipe_queue_depth{queue}` and `iotpipe_queue_bytes{queue}`: what waits in each bounded
    buffer of the process, read when scraped (nothing on the hot path). Readers run on the /metrics
    thread, so they only read lengths and counters the event loop keeps."""

    def __init__(self) -> None:
        self._depth: dict[str, Callable[[], float]] = {}
        self._bytes: dict[str, Callable[[], float]] = {}

    def add(self, queue: str, depth: Callable[[], float], size: Callable[[], float] | None = None) -> None:
        self._depth[queue] = depth
        if size is not None:
            self._bytes[queue] = size

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "iotpipe_queue_depth", "Items waiting in a bounded buffer, by queue", labels=["queue"]
        )
        size = GaugeMetricFamily("iotpipe_queue_bytes", "Bytes waiting in a bounded buffer, by queue", labels=["queue"])
        for family, readers in ((depth, self._depth), (size, self._bytes)):
            for queue, read in list(readers.items()):
                try:
                    family.add_metric([queue], float(read()))
                except Exception:  # a reader racing the event loop: this queue skips one scrape
                    log.debug("queue %s not readable for this scrape", queue, exc_info=True)
            yield family


class MetricsServer:
    """The /metrics HTTP endpoint of one process. A port already taken (another instance on the same
    host, a stale process) costs the metrics, never the service: one clear line, counted in
    `iotpipe_errors{kind="metrics_port"}` (visible in the status counters), and the service runs on."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics, self.host, self.port = metrics, host, port
        self._server: Any = None

    def start(self) -> bool:
        if not self.port:
            return False
        try:
            self._server, _thread = start_http_server(self.port, addr=self.host, registry=self.metrics.registry)
        except OSError as exc:
            self.metrics.errors.labels("metrics_port").inc()
            log.error(
                "metrics off: cannot listen on %s:%d (%s); set IOTPIPE_METRICS_PORT (0: no metrics)",
                self.host,
                self.port,
                exc.strerror or exc,
            )
            return False
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
