"""Counters (Prometheus), the health file a container healthcheck reads, and its checker."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, start_http_server


class Metrics:
    """One registry per service process. Every counter is also in the status/health snapshot."""

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

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name[:-6]}{{{labels}}}" if labels else sample.name[:-6]] = sample.value
        return out


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
