"""Plantower PMS5003 particulate-matter sensor on a UART (9600 8N1) via pyserial.

The sensor speaks in frames: 0x42 0x4D, a 16-bit big-endian length, payload, and a 16-bit sum of
every preceding byte. A 32-byte data frame (length 28) carries 13 words; the driver reports the
"atmospheric environment" concentrations (words 4..6). The sensor also answers commands with
8-byte frames (length 4), which the parser recognises and skips.

A serial line delivers bytes, not frames: a read can start mid-frame, line noise inserts garbage,
and a frame may arrive in several pieces. `FrameParser` therefore keeps leftover bytes between reads
and resynchronises by scanning for the start bytes; after a checksum failure it resumes scanning one
byte after the bad header, so a genuine frame that began inside the corrupt span is not lost.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from pydantic import Field

from .base import BusError, ChecksumError, Driver, DriverParams, ImplausibleValueError

log = logging.getLogger(__name__)

START = b"\x42\x4d"
DATA_FRAME_LENGTH = 28  # the length field of a data frame: 13 data words + checksum
_KNOWN_LENGTHS = frozenset({DATA_FRAME_LENGTH, 4})  # 4: the answer to a mode/sleep command
_PORT_POLL_S = 0.1  # pyserial read timeout: how often a blocked read re-checks its deadline


@dataclass(frozen=True)
class Frame:
    raw: bytes
    checksum_ok: bool

    @property
    def is_data(self) -> bool:
        return len(self.raw) == 4 + DATA_FRAME_LENGTH


def frame_checksum(frame_without_checksum: bytes) -> int:
    return sum(frame_without_checksum) & 0xFFFF


class FrameParser:
    """Cuts a byte stream into frames; feed it whatever the port returned."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.discarded = 0  # bytes skipped while hunting for a frame start

    def __len__(self) -> int:
        return len(self._buffer)

    def clear(self) -> None:
        self._buffer.clear()

    @property
    def missing(self) -> int:
        """Bytes still needed to complete the frame in progress (at least 1)."""
        # After feed() the buffer is empty or starts at a candidate header.
        buf = self._buffer
        length = int.from_bytes(buf[2:4], "big") if len(buf) >= 4 else DATA_FRAME_LENGTH
        return max(1, 4 + length - len(buf))

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        while True:
            start = buf.find(START)
            if start < 0:
                # Keep a trailing 0x42: it may be the first start byte, its partner still in transit.
                keep = 1 if buf.endswith(START[:1]) else 0
                self._skip(len(buf) - keep)
                return frames
            self._skip(start)
            if len(buf) < 4:
                return frames
            length = int.from_bytes(buf[2:4], "big")
            if length not in _KNOWN_LENGTHS:
                self._skip(1)  # 0x42 0x4D inside garbage, not a header
                continue
            end = 4 + length
            if len(buf) < end:
                return frames
            raw = bytes(buf[:end])
            ok = frame_checksum(raw[:-2]) == int.from_bytes(raw[-2:], "big")
            frames.append(Frame(raw, ok))
            if ok:
                del buf[:end]
            else:
                self._skip(1)

    def _skip(self, count: int) -> None:
        if count:
            del self._buffer[:count]
            self.discarded += count


class SerialLike(Protocol):
    """The subset of `serial.Serial` the driver uses (so tests can hand in a fake)."""

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def flush(self) -> None: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


SerialFactory = Callable[..., SerialLike]  # called as factory(port, baudrate, timeout=seconds)


def _default_serial_factory(port: str, baudrate: int, *, timeout: float) -> SerialLike:
    import serial  # imported on open so that loading the driver table costs nothing

    handle: SerialLike = serial.Serial(port, baudrate, timeout=timeout)
    return handle


def command(cmd: int, data: int = 0) -> bytes:
    """A 7-byte host command: start bytes, command, 16-bit data, 16-bit sum of the first five."""
    body = START + bytes([cmd, data >> 8, data & 0xFF])
    return body + frame_checksum(body).to_bytes(2, "big")


class PMS5003Params(DriverParams):
    port: str = Field("/dev/serial0", min_length=1)
    baudrate: int = Field(9600, gt=0, description="the PMS5003 only speaks 9600 8N1")
    mode: Literal["active", "passive"] = Field(
        "active",
        description="active: the sensor streams a frame every 0.2-2.3 s and a read takes the newest; "
        "passive: each read requests one frame",
    )
    frame_timeout: float = Field(
        1.5,
        gt=0,
        le=30,
        description="longest a read waits for a complete frame; keep it below the reader's read timeout",
    )


class PMS5003Driver(Driver):
    name = "pms5003"
    Params = PMS5003Params
    params: PMS5003Params

    CMD_MODE = 0xE1  # data 0: passive, 1: active
    CMD_READ = 0xE2  # passive mode: send one data frame
    MAX_UG_M3 = 1000.0  # datasheet: effective range 0..500, maximum range >= 1000
    # sensor id -> index of the data word: words 3..5 are PM1.0/PM2.5/PM10 "under atmospheric
    # environment" (words 0..2 are the factory CF=1 values, meant for calibration only).
    _WORDS: ClassVar[dict[str, int]] = {"pm1_0": 3, "pm2_5": 4, "pm10": 5}

    def __init__(
        self,
        device_id: str,
        params: PMS5003Params,
        *,
        serial_factory: SerialFactory | None = None,
    ) -> None:
        super().__init__(device_id, params)
        self._serial_factory = serial_factory or _default_serial_factory
        self._port: SerialLike | None = None
        self._parser = FrameParser()

    @property
    def bus_key(self) -> str:
        return f"uart:{self.params.port}"

    @property
    def sensors(self) -> Mapping[str, str]:
        return dict.fromkeys(self._WORDS, "ug/m3")

    def open(self) -> None:
        p = self.params
        try:
            port = self._serial_factory(p.port, p.baudrate, timeout=_PORT_POLL_S)
        except OSError as exc:  # serial.SerialException is an OSError
            raise BusError(f"open {p.port}: {exc}") from exc
        try:
            # Set the mode explicitly: the sensor keeps it until power-off, so a previous process
            # may have left it passive (or active) whatever the sensor's default is.
            port.write(command(self.CMD_MODE, 1 if p.mode == "active" else 0))
            port.flush()
            # Frames that queued up before we took over are stale.
            port.reset_input_buffer()
        except OSError as exc:
            self._close_port(port)
            raise BusError(f"configure {p.port}: {exc}") from exc
        self._parser.clear()
        self._port = port

    def read(self) -> Mapping[str, float]:
        port = self._port
        if port is None:
            raise BusError(f"{self.params.port} is not open")
        deadline = time.monotonic() + self.params.frame_timeout
        try:
            if self.params.mode == "passive":
                port.reset_input_buffer()  # an answer must belong to this request
                self._parser.clear()
                port.write(command(self.CMD_READ))
                port.flush()
                frame = self._await_frame(port, deadline)
            else:
                # Drain what arrived since the last read and keep only the newest frame: a slow
                # poll interval must not report minutes-old air.
                newest = self._newest(self._parser.feed(port.read(port.in_waiting)))
                frame = newest if newest is not None else self._await_frame(port, deadline)
        except OSError as exc:
            raise BusError(f"{self.params.port}: {exc}") from exc
        return self.decode(frame)

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            self._close_port(port)

    def decode(self, frame: Frame) -> dict[str, float]:
        if not frame.checksum_ok:
            raw = frame.raw
            raise ChecksumError(
                f"frame checksum 0x{int.from_bytes(raw[-2:], 'big'):04X}, computed 0x{frame_checksum(raw[:-2]):04X}"
            )
        words = struct.unpack(">13H", frame.raw[4:30])
        sample: dict[str, float] = {}
        for sensor, index in self._WORDS.items():
            value = float(words[index])
            if value > self.MAX_UG_M3:
                raise ImplausibleValueError(f"{sensor} {value:g} ug/m3 above {self.MAX_UG_M3:g}")
            sample[sensor] = value
        return sample

    def _await_frame(self, port: SerialLike, deadline: float) -> Frame:
        while True:
            frame = self._newest(self._parser.feed(port.read(self._parser.missing)))
            if frame is not None:
                return frame
            if time.monotonic() >= deadline:
                raise BusError(
                    f"no complete frame from {self.params.port} within {self.params.frame_timeout}s "
                    f"({len(self._parser)} bytes of a partial frame buffered)"
                )

    @staticmethod
    def _newest(frames: list[Frame]) -> Frame | None:
        data = [f for f in frames if f.is_data]
        return data[-1] if data else None

    def _close_port(self, port: SerialLike) -> None:
        try:
            port.close()
        except OSError as exc:
            log.debug("%s: closing %s failed: %s", self.device_id, self.params.port, exc)
