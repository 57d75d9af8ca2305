"""A PMS5003 on the far end of a real pseudo-terminal.

The driver opens the pty's slave path with pyserial exactly as it would open /dev/serial0; an
emulator thread owns the master side, answers the host's commands and writes whatever frames,
garbage and fragments the test queues, each chunk as its own write(2).
"""

from __future__ import annotations

import fcntl
import os
import queue
import select
import struct
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from types import TracebackType

import serial

START = b"\x42\x4d"
CMD_MODE = 0xE1
CMD_READ = 0xE2
CMD_SLEEP = 0xE4


def _checksum(body: bytes) -> bytes:
    return (sum(body) & 0xFFFF).to_bytes(2, "big")


def data_frame(
    pm1_0: int,
    pm2_5: int,
    pm10: int,
    *,
    cf1: tuple[int, int, int] | None = None,
    counts: tuple[int, int, int, int, int, int] = (1200, 350, 60, 8, 2, 1),
) -> bytes:
    """A 32-byte data frame with a correct checksum."""
    words = (*(cf1 or (pm1_0, pm2_5, pm10)), pm1_0, pm2_5, pm10, *counts, 0x9700)
    body = START + struct.pack(">H13H", 28, *words)
    return body + _checksum(body)


def ack_frame(command: int, data: int) -> bytes:
    """The 8-byte answer to a mode or sleep command."""
    body = START + bytes([0x00, 0x04, command, data & 0xFF])
    return body + _checksum(body)


def corrupted(frame: bytes, offset: int = 13) -> bytes:
    """`frame` with one data bit flipped and the original checksum (line noise)."""
    out = bytearray(frame)
    out[offset] ^= 0x04
    return bytes(out)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """For conditions only the kernel knows (bytes queued in a tty): re-check every 2 ms."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.002)


class PMS5003Emulator:
    def __init__(self, values: tuple[int, int, int] = (5, 12, 20)) -> None:
        self._master, self._slave = os.openpty()
        # Raw before anyone writes: a cooked tty would echo, translate CR and eat ^C (0x03) bytes.
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.values = values
        self.mode = "active"
        self.commands: list[bytes] = []
        self.responses: deque[list[bytes]] = deque()  # scripted answers to passive read requests
        self.frames_sent = 0
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._queued = 0
        self._written = 0
        self._written_cond = threading.Condition()
        self._rx = bytearray()
        self._thread = threading.Thread(target=self._run, name="pms5003-emulator", daemon=True)

    def __enter__(self) -> PMS5003Emulator:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w, self._master, self._slave):
            os.close(fd)

    # -- what the test drives ----------------------------------------------------------------
    def send(self, *chunks: bytes) -> int:
        """Queue chunks for the line, each written separately; returns the total queued so far."""
        for chunk in chunks:
            self._outbox.put(chunk)
        os.write(self._wake_w, b"x")
        return self._queued_total(sum(len(c) for c in chunks))

    def wait_written(self, total: int, timeout: float = 5.0) -> None:
        with self._written_cond:
            if not self._written_cond.wait_for(lambda: self._written >= total, timeout):
                raise AssertionError(f"emulator wrote {self._written} of {total} bytes")

    def wait_at_port(self, count: int, timeout: float = 5.0) -> None:
        """Wait until `count` bytes sit in the slave's input queue, ready for the driver."""
        wait_until(lambda: self.at_port() >= count, timeout, f"{count} bytes at {self.port}")

    def at_port(self) -> int:
        buf = fcntl.ioctl(self._slave, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    # -- the sensor ----------------------------------------------------------------------------
    def _queued_total(self, added: int) -> int:
        with self._written_cond:
            self._queued += added
            return self._queued

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self._master, self._wake_r], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 1024)
                self._flush_outbox()
            if self._master in ready and not self._stop:
                self._rx += os.read(self._master, 1024)
                self._handle_commands()

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._master, view) :]
        with self._written_cond:
            self._written += len(chunk)
            self._written_cond.notify_all()

    def _flush_outbox(self) -> None:
        while True:
            try:
                chunk = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._write(chunk)

    def _handle_commands(self) -> None:
        while True:
            start = self._rx.find(START)
            if start < 0 or len(self._rx) - start < 7:
                return
            cmd = bytes(self._rx[start : start + 7])
            del self._rx[: start + 7]
            if _checksum(cmd[:5]) != cmd[5:]:
                continue  # the real sensor ignores a command with a bad checksum
            self.commands.append(cmd)
            code, data = cmd[2], int.from_bytes(cmd[3:5], "big")
            if code == CMD_MODE:
                self.mode = "active" if data else "passive"
                self._write(ack_frame(code, data))
            elif code == CMD_READ and self.mode == "passive":
                chunks = self.responses.popleft() if self.responses else [data_frame(*self.values)]
                self.frames_sent += 1  # before writing: the driver may return as soon as it has them
                for chunk in chunks:
                    self._write(chunk)


class SpySerial(serial.Serial):  # type: ignore[misc]  # pyserial ships no type hints
    """A real pyserial port that also reports what the driver has read so far."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.read_total = 0
        self.read_calls = 0
        self._read_cond = threading.Condition()
        super().__init__(*args, **kwargs)

    def read(self, size: int = 1) -> bytes:
        with self._read_cond:
            self.read_calls += 1
            self._read_cond.notify_all()
        data: bytes = super().read(size)
        with self._read_cond:
            self.read_total += len(data)
            self._read_cond.notify_all()
        return data

    def wait_read(self, total: int, timeout: float = 5.0) -> None:
        with self._read_cond:
            if not self._read_cond.wait_for(lambda: self.read_total >= total, timeout):
                raise AssertionError(f"driver read {self.read_total} of {total} bytes")

    def wait_calls(self, calls: int, timeout: float = 5.0) -> None:
        with self._read_cond:
            if not self._read_cond.wait_for(lambda: self.read_calls >= calls, timeout):
                raise AssertionError(f"driver made {self.read_calls} of {calls} read calls")
