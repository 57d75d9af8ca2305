"""Counters (Prometheus), the health file a container healthcheck reads, and its checker."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, start_http_server


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

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

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
    return True, "ok"
