"""Bus faults a test can switch on and off while a driver is talking to a fake."""

from __future__ import annotations

import errno
import os
import threading
import time

# A call stuck on the gate gives up after this long, so that a test that forgets to release it
# fails instead of hanging the interpreter at exit (worker threads are joined then).
_STUCK_LIMIT_S = 30.0


class ProtocolViolationError(AssertionError):
    """The driver sent something the real chip would misread: a driver bug, so the test fails."""


class FaultInjector:
    """Checked by a fake bus before every transfer.

    fail(times)   the next `times` transfers raise OSError (times=None: every transfer until clear())
    stick()       every transfer blocks until release() -- a wedged bus or a hung USB adapter
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures_left = 0  # -1: until cleared
        self._errno = errno.EREMOTEIO
        self._gate = threading.Event()
        self._gate.set()
        self.blocked = threading.Event()  # set while a transfer is waiting at the gate
        self.transfers = 0
        self.failed_at: list[float] = []  # monotonic time of every injected failure

    def fail(self, times: int | None = 1, code: int = errno.EREMOTEIO) -> None:
        with self._lock:
            self._failures_left = -1 if times is None else times
            self._errno = code

    def clear(self) -> None:
        with self._lock:
            self._failures_left = 0

    def stick(self) -> None:
        self.blocked.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def check(self) -> None:
        if not self._gate.is_set():
            self.blocked.set()
            if not self._gate.wait(_STUCK_LIMIT_S):
                raise OSError(errno.ETIMEDOUT, "fake bus stuck and never released")
        with self._lock:
            self.transfers += 1
            if self._failures_left == 0:
                return
            if self._failures_left > 0:
                self._failures_left -= 1
            self.failed_at.append(time.monotonic())
            code = self._errno
        raise OSError(code, os.strerror(code))
