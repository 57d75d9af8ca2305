"""`iotpipe watch`: the operator's live terminal view (Textual) of devices, services and recent
alerts, as the read-only `reader` user of the public broker sees them.

The MQTT client (iotpipe.Bus) runs on Textual's own event loop: its network waits are in the
background (connecting in a worker thread, reading on a non-blocking socket), so the screen never
waits on the broker, and the connection comes back by itself after an outage. What is shown comes
from iotpipe._watch.LiveView, which knows nothing of the terminal; this module only draws it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Static

from ._bus import Bus, PlainMessage
from ._watch import NONE, LiveView

# Redraws per second at most: fresh enough for values that change once a window (1 s by default),
# cheap enough for a busy host or a slow SSH link.
REFRESH_INTERVAL = 0.5


def subscriptions(root: str, sealed_alerts: bool) -> list[str]:
    """The filters watched under `<base>/v2` (each of them readable by `reader`, mosquitto/public-acl);
    not the per-sensor topics, which repeat what a device's state holds."""
    leaves = ("state", "units", "availability", "alert")
    filters = [f"{root}/devices/+/{leaf}" for leaf in leaves]
    filters += [f"{root}/status/device/+", f"{root}/status/service/+/+", f"{root}/exporter/state"]
    if sealed_alerts:
        filters.append(f"{root}/alerts/+")
    return filters


class _LatestProblem(logging.Handler):
    """Keeps the library's warnings (a broker that cannot be reached...) for the header line: on
    stderr they would scribble over the screen."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.latest: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.latest = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.getMessage()}"


class WatchApp(App[None]):
    """Three tables refreshed in place; `q` (or Ctrl-C) quits."""

    TITLE = "iotpipe watch"
    ENABLE_COMMAND_PALETTE = False  # nothing to command: a view
    CSS = """
    #header { height: auto; padding: 0 1; background: $boost; }
    .box { border: round $primary; height: 1fr; }
    #services-box { height: auto; max-height: 40%; }
    DataTable { height: auto; max-height: 100%; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        # Textual keeps Ctrl-C for copying; an operator's reflex is to stop with it.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, view: LiveView, bus: Bus, *, where: str, sealed_note: str) -> None:
        super().__init__()
        self.view = view
        self.bus = bus
        self.where = where
        self.sealed_note = sealed_note
        self.problems = _LatestProblem()
        self._shown: dict[str, list[tuple[Any, ...]]] = {}  # table id -> the rows it shows

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with Vertical(id="devices-box", classes="box") as box:
            box.border_title = "Devices"
            yield DataTable(id="devices", cursor_type="none", zebra_stripes=True)
        with Vertical(id="services-box", classes="box") as box:
            box.border_title = "Services"
            yield DataTable(id="services", cursor_type="none", zebra_stripes=True)
        with Vertical(id="alerts-box", classes="box") as box:
            box.border_title = "Recent alerts (newest first)"
            yield DataTable(id="alerts", cursor_type="none", zebra_stripes=True)
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#devices", DataTable).add_columns("device", "state", "latest values", "last seen")
        self.query_one("#services", DataTable).add_columns(
            "service", "instance", "state", "in", "out", "rejected", "lag p50", "status age"
        )
        self.query_one("#alerts", DataTable).add_columns("time", "device", "kind", "detail")
        logging.getLogger("iotpipe").addHandler(self.problems)
        self.redraw()
        await self.bus.start()

    async def on_unmount(self) -> None:
        try:
            await self.bus.stop()
        finally:
            logging.getLogger("iotpipe").removeHandler(self.problems)

    async def on_messages(self, messages: Sequence[PlainMessage[Any]]) -> None:
        """The Bus's handler: the view only, never the screen (redrawn on the timer)."""
        for message in messages:
            self.view.ingest(message.topic, message.payload)

    def redraw(self) -> None:
        """Draw the view, and plan the next time: REFRESH_INTERVAL later, or, where drawing takes
        long (thousands of devices), late enough that it takes at most a fifth of the time, so keys
        are still answered at once."""
        started = time.monotonic()
        now = time.time()
        self.query_one("#header", Static).update(self.header())
        self._fill("devices", [tuple(vars(r).values()) for r in self.view.device_rows(now)])
        self._fill("services", [tuple(vars(r).values()) for r in self.view.service_rows(now)])
        self._fill("alerts", [tuple(vars(r).values()) for r in self.view.alert_rows()])
        self.set_timer(max(REFRESH_INTERVAL, 5 * (time.monotonic() - started)), self.redraw)

    def _fill(self, table_id: str, rows: list[tuple[Any, ...]]) -> None:
        """Replace a table's rows in place (its columns stay), unless it shows them already: with
        thousands of devices, rebuilding an unchanged table twice a second is wasted work."""
        if self._shown.get(table_id) == rows:
            return
        table = self.query_one(f"#{table_id}", DataTable)
        table.clear()
        table.add_rows(rows)
        self._shown[table_id] = rows

    def header(self) -> str:
        c = self.view.counts()
        link = "connected" if self.bus.connected.is_set() else "NOT CONNECTED (retrying)"
        line = (
            f"{self.where}  {link}  |  devices {c['devices_online']}/{c['devices']} online  "
            f"services {c['services_online']}/{c['services']} online  alerts {c['alerts']}  "
            f"exporter {self.view.exporter or NONE}  |  {self.sealed_note}"
        )
        notes = [n for n in (self.problems.latest, self.view.problem) if n]
        if self.view.unreadable:
            notes.append(f"{self.view.unreadable} unreadable message(s)")
        return line + ("\n" + "  |  ".join(notes) if notes else "")
