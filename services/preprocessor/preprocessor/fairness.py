"""Per-device fairness: one token bucket per device on raw windows, so that one device's flood is
shed before it costs the pipeline anything but its decryption and a look at whose it is, and the
other devices' windows keep their pace (docs/contract.md, "Per-device fairness").

What a device may deliver, and why. Every window costs about the same downstream (aggregation,
sealing, a Redis write, an outbox row, a score: about 90 µs of CPU in all), so the unit is the
window, whatever its length or readings. A device may deliver

- `rate` windows a second, sustained: far above any real device (one window per window length;
  the reader's shortest window is 10 ms), yet a small share of what the pipeline handles
  (20,000 windows/s on the 2-core development machine), so a device held to it cannot delay
  the others;
- `burst` windows at once on top (a new device, a share-group member's queue adopted by another,
  a window split by sensor across messages, jitter);
- and, after a silence, one window per window length of that silence: what a reader replays
  from its spool after an outage, or what queued at the broker while this preprocessor was away
  (its table of devices is saved in the state directory, so a restart keeps it). A backlog is
  the windows a device did not deliver while it was silent, so legitimate catch-up, however
  long the outage (up to the message TTL), is never shed, while a device that is delivering
  (or a forged device id, never seen before) gets only `burst`.

What this cannot tell apart: an insider holding the key ring who floods in the name of a device
that has been silent gets that device's silence worth of windows; one who floods in the name of a
genuine, live device competes with its windows for the same allowance (that device's windows may be
shed with the flood's). And one who spreads a flood over many forged device ids gets `burst` windows
for each: per-device limits bound one device; the table's size bounds memory, not that.

The table holds at most `max_devices` devices; when full, the least recently seen tenth is evicted
(an evicted device that comes back starts again with `burst`), devices whose shed windows are not
reported yet last.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

# Index of each field in a table entry (a list: several times cheaper than an object per window).
_TOKENS, _LAST, _PERIOD, _SHED, _SINCE, _ALERTED = range(6)


@dataclass(frozen=True, slots=True)
class Shed:
    """Windows of `device` shed since `since` (unix s) and not yet reported."""

    device: str
    windows: int
    since: float


class DeviceBuckets:
    """The per-device allowances of one preprocessor. Times are unix seconds (the table is saved and
    restored across restarts, so a monotonic clock would not do); a clock stepping back grants
    nothing and takes nothing (counting starts again from the new time)."""

    def __init__(self, rate: float, burst: int, max_devices: int, max_silence: float) -> None:
        """`max_silence`: s of silence credited at most (the message TTL: an older window is
        refused anyway)."""
        self.rate = rate
        self.burst = float(burst)
        self.max_devices = max_devices
        self.max_silence = max_silence
        self.min_period = 1.0 / rate
        # device -> [tokens, last window (s), window length (s), shed unreported, first of those (s),
        # last reported (s)]
        self._table: dict[str, list[float]] = {}
        self._unreported: dict[str, None] = {}  # devices with shed windows not yet reported, in order
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._table)

    def admit(self, device: str, size_ms: int, now: float) -> bool:
        """Charge one window of `device` (its length `size_ms`) at `now`; False: shed it. Under a
        microsecond for a device seen before (it runs for every window)."""
        entry = self._table.get(device)
        if entry is None:
            entry = self._add(device, size_ms, now)
        else:
            elapsed = now - entry[_LAST]
            if elapsed > 0:
                if elapsed > self.max_silence:
                    elapsed = self.max_silence
                tokens = entry[_TOKENS]
                # Refill at `rate`, up to the burst plus the windows the device could have produced
                # since it was last heard from; credit already above that (a catch-up in progress)
                # is kept until spent.
                refilled = tokens + elapsed * self.rate
                cap = self.burst + elapsed / entry[_PERIOD]
                entry[_TOKENS] = refilled if refilled <= cap else (cap if cap > tokens else tokens)
                entry[_LAST] = now
            elif elapsed < 0:
                entry[_LAST] = now
        if entry[_TOKENS] >= 1.0:
            entry[_TOKENS] -= 1.0
            return True
        if not entry[_SHED]:
            entry[_SINCE] = now
            self._unreported[device] = None
        entry[_SHED] += 1
        return False

    def _add(self, device: str, size_ms: int, now: float) -> list[float]:
        if len(self._table) >= self.max_devices:
            self._evict()
        # Its window length as first seen sets its silence credit (floored: a device declaring tiny
        # windows is owed no more than `rate` a second).
        entry = [self.burst, now, max(size_ms / 1000, self.min_period), 0.0, 0.0, 0.0]
        self._table[device] = entry
        return entry

    def _evict(self) -> None:
        """Make room: the least recently seen tenth of the table goes (in one sort, so that a flood
        of forged ids costs a fraction of a microsecond per id, not a scan each). Devices with shed
        windows not yet reported go last: evicted, their flood alert would be lost, and a flood
        followed by a spray of new ids would never be reported. (Each of them delivered more than
        its burst, so they are few; the table stays bounded even if every one of them has some.)"""
        count = max(1, self.max_devices // 10)
        unreported = self._unreported
        oldest = sorted(self._table.items(), key=lambda item: (item[0] in unreported, item[1][_LAST]))[:count]
        for device, _entry in oldest:
            del self._table[device]
            self._unreported.pop(device, None)
        self.evicted += len(oldest)

    def due(self, now: float, interval: float, limit: int) -> list[Shed]:
        """Up to `limit` devices with shed windows not yet reported and no report within `interval`
        s, oldest first, each reset as reported (`restore` puts one back if reporting failed)."""
        out: list[Shed] = []
        for device in list(self._unreported):
            if len(out) >= limit:
                break
            entry = self._table[device]
            if now - entry[_ALERTED] < interval:
                continue
            out.append(Shed(device, int(entry[_SHED]), entry[_SINCE]))
            entry[_SHED] = 0.0
            entry[_ALERTED] = now
            del self._unreported[device]
        return out

    def restore(self, shed: Shed) -> None:
        """A report that could not be sent: counted again with the next one, an interval later."""
        entry = self._table.get(shed.device)
        if entry is None:
            return
        if not entry[_SHED]:
            self._unreported[shed.device] = None
        entry[_SINCE] = shed.since
        entry[_SHED] += shed.windows

    def dump(self) -> bytes:
        """Each device's allowance and when it was last heard from, for `load` after a restart (what
        lets the backlog that queued meanwhile through). Unreported sheds are counted already."""
        return orjson.dumps([[d, e[_TOKENS], e[_LAST], e[_PERIOD]] for d, e in self._table.items()])

    def load(self, data: bytes) -> None:
        """Restore what `dump` wrote (the most recently seen `max_devices`); ValueError if it is not that."""
        try:
            rows = [(str(d), float(t), float(last), float(p)) for d, t, last, p in orjson.loads(data)]
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"not a device table: {exc}") from exc
        rows.sort(key=lambda row: row[2])
        table: dict[str, list[float]] = {}
        for device, tokens, last, period in rows[-self.max_devices :]:
            period = max(period, self.min_period)
            tokens = min(max(tokens, 0.0), self.burst + self.max_silence / period)
            table[device] = [tokens, last, period, 0.0, 0.0, 0.0]
        self._table = table
        self._unreported = {}
