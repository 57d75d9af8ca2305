"""PMS5003 driver: the frame parser on its own, then the driver through a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator, Mapping

import pytest
from fakes.uart import (
    CMD_MODE,
    CMD_READ,
    PMS5003Emulator,
    SpySerial,
    ack_frame,
    corrupted,
    data_frame,
)
from pydantic import ValidationError
from sensor_reader.drivers import BusError, ChecksumError, ImplausibleValueError
from sensor_reader.drivers.uart import FrameParser, PMS5003Driver, PMS5003Params, command
from sensor_reader.poller import DevicePoller, PollPolicy

A = data_frame(3, 7, 9)
B = data_frame(11, 22, 33)
C = data_frame(40, 55, 61)


def values(frame_values: tuple[int, int, int]) -> dict[str, float]:
    return dict(zip(("pm1_0", "pm2_5", "pm10"), map(float, frame_values), strict=True))


# -- FrameParser ----------------------------------------------------------------------------------


def test_frame_layout_and_checksum() -> None:
    assert len(A) == 32
    assert A[:4] == b"\x42\x4d\x00\x1c"
    assert int.from_bytes(A[30:], "big") == sum(A[:30])
    assert ack_frame(CMD_MODE, 0) == bytes.fromhex("424d0004e1000174")  # as captured from a sensor
    assert command(0xE1, 0) == bytes.fromhex("424de100000170")  # datasheet: passive mode


def test_byte_by_byte_yields_the_frame_once_complete() -> None:
    parser = FrameParser()
    for i, byte in enumerate(A[:-1]):
        assert parser.feed(bytes([byte])) == []
        assert parser.missing == len(A) - i - 1
    [frame] = parser.feed(A[-1:])
    assert frame.raw == A and frame.checksum_ok and frame.is_data
    assert len(parser) == 0


def test_garbage_between_frames_is_skipped_and_counted() -> None:
    parser = FrameParser()
    garbage = b"\x00\xff\x42\x13\x4d"
    frames = parser.feed(garbage + A + garbage + B)
    assert [f.raw for f in frames] == [A, B]
    assert parser.discarded == 2 * len(garbage)


def test_false_header_with_an_impossible_length_is_not_a_frame() -> None:
    parser = FrameParser()
    frames = parser.feed(b"\x42\x4d\x7f\xff" + A)
    assert [f.raw for f in frames] == [A]


def test_partial_frame_is_kept_between_feeds() -> None:
    parser = FrameParser()
    assert [f.raw for f in parser.feed(A + B[:10])] == [A]
    assert len(parser) == 10
    assert parser.missing == 22
    assert [f.raw for f in parser.feed(B[10:])] == [B]


def test_trailing_first_start_byte_is_kept() -> None:
    parser = FrameParser()
    assert parser.feed(b"\x01\x02" + A[:1]) == []
    assert len(parser) == 1
    assert [f.raw for f in parser.feed(A[1:])] == [A]


def test_corrupt_frame_is_reported_and_the_parser_resyncs_inside_it() -> None:
    # A frame cut short by a glitch, immediately followed by a whole frame: the 32 bytes after the
    # first header fail the checksum, and the genuine frame starting inside them is still found.
    parser = FrameParser()
    frames = parser.feed(A[:12] + B)
    assert [(f.raw[:2], f.checksum_ok) for f in frames] == [(b"\x42\x4d", False), (b"\x42\x4d", True)]
    assert frames[-1].raw == B


def test_command_answers_are_recognised_but_are_not_data() -> None:
    frames = FrameParser().feed(ack_frame(CMD_MODE, 1) + A)
    assert [(f.is_data, f.checksum_ok) for f in frames] == [(False, True), (True, True)]


# -- the driver over a pseudo-terminal -----------------------------------------------------------


@pytest.fixture
def emulator() -> Iterator[PMS5003Emulator]:
    with PMS5003Emulator(values=(5, 12, 20)) as emu:
        yield emu


def open_driver(emu: PMS5003Emulator, **params: object) -> tuple[PMS5003Driver, list[SpySerial]]:
    ports: list[SpySerial] = []

    def factory(port: str, baudrate: int, *, timeout: float) -> SpySerial:
        ports.append(SpySerial(port, baudrate, timeout=timeout))
        return ports[-1]

    driver = PMS5003Driver(
        "air-1",
        PMS5003Params.model_validate({"port": emu.port} | params),
        serial_factory=factory,
    )
    driver.open()
    # The mode command's answer races with the driver's input flush; once it is out, the next
    # frame read consumes it if it survived, so every test starts from an empty line.
    emu.wait_written(len(ack_frame(CMD_MODE, 1)))
    if driver.params.mode == "active":
        emu.send(data_frame(1, 1, 1))
        assert driver.read() == values((1, 1, 1))
    return driver, ports


@pytest.fixture
def active(emulator: PMS5003Emulator) -> Iterator[tuple[PMS5003Driver, SpySerial]]:
    driver, ports = open_driver(emulator, frame_timeout=0.5)
    yield driver, ports[0]
    driver.close()


@pytest.fixture
def passive(emulator: PMS5003Emulator) -> Iterator[PMS5003Driver]:
    driver, _ = open_driver(emulator, mode="passive", frame_timeout=0.5)
    yield driver
    driver.close()


def read_in_thread(driver: PMS5003Driver) -> concurrent.futures.Future[Mapping[str, float]]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(driver.read)
    pool.shutdown(wait=False)
    return future


def test_open_sets_the_mode(emulator: PMS5003Emulator) -> None:
    driver, _ = open_driver(emulator, mode="passive")
    driver.close()
    assert emulator.commands[0] == command(CMD_MODE, 0)
    assert emulator.mode == "passive"


def test_active_mode_reads_a_frame(emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]) -> None:
    driver, _ = active
    emulator.send(B)
    assert driver.read() == values((11, 22, 33))
    assert driver.sensors == {"pm1_0": "ug/m3", "pm2_5": "ug/m3", "pm10": "ug/m3"}


def test_active_mode_returns_the_newest_of_several_frames(
    emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]
) -> None:
    driver, _ = active
    emulator.send(A, B, C)
    emulator.wait_at_port(3 * 32)
    assert driver.read() == values((40, 55, 61))
    assert emulator.at_port() == 0  # drained: the older frames are not returned later


def test_active_mode_waits_for_the_next_frame(
    emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]
) -> None:
    driver, port = active
    calls = port.read_calls
    pending = read_in_thread(driver)
    port.wait_calls(calls + 2)  # drained nothing, now blocked waiting on the empty line
    emulator.send(C)
    assert pending.result(timeout=5) == values((40, 55, 61))


def test_garbage_and_false_headers_between_frames(
    emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]
) -> None:
    driver, _ = active
    emulator.send(b"\x00\x13\x42", b"\x42\x4d\xff\xff\x42", B)
    assert driver.read() == values((11, 22, 33))
    emulator.send(b"\xde\xad\xbe\xef" * 5, C)
    assert driver.read() == values((40, 55, 61))


def test_frame_split_across_writes_and_reads(
    emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]
) -> None:
    driver, port = active
    already_read = port.read_total
    emulator.send(B[:11])
    pending = read_in_thread(driver)
    port.wait_read(already_read + 11)  # the driver holds an incomplete frame ...
    emulator.send(B[11:20], B[20:])  # ... before the rest exists
    assert pending.result(timeout=5) == values((11, 22, 33))


def test_partial_frame_is_kept_for_the_next_read(
    emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]
) -> None:
    driver, port = active
    emulator.send(A + B[:16])
    emulator.wait_at_port(32 + 16)
    assert driver.read() == values((3, 7, 9))
    before = port.read_total
    emulator.send(B[16:])
    assert driver.read() == values((11, 22, 33))
    assert port.read_total - before == 16  # only the rest of B was read; its start was kept


def test_bad_checksum_is_a_checksum_error(emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]) -> None:
    driver, _ = active
    emulator.send(corrupted(B))
    with pytest.raises(ChecksumError, match="checksum"):
        driver.read()
    emulator.send(C)
    assert driver.read() == values((40, 55, 61))


def test_corrupt_frame_superseded_by_a_good_one_is_not_an_error(
    emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]
) -> None:
    driver, _ = active
    emulator.send(corrupted(A), B[:5], C)  # a corrupt frame, a truncated one, then a whole one
    emulator.wait_at_port(32 + 5 + 32)
    assert driver.read() == values((40, 55, 61))


def test_no_frame_in_time_is_a_bus_error(emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]) -> None:
    driver, _ = active
    emulator.send(B[:20])
    with pytest.raises(BusError, match=r"no complete frame .* within 0.5s \(20 bytes"):
        driver.read()
    emulator.send(B[20:])  # the fragment was kept: the frame completes on the next read
    assert driver.read() == values((11, 22, 33))


def test_implausible_concentration(emulator: PMS5003Emulator, active: tuple[PMS5003Driver, SpySerial]) -> None:
    driver, _ = active
    emulator.send(data_frame(20, 40, 1500))
    with pytest.raises(ImplausibleValueError, match="pm10 1500 ug/m3"):
        driver.read()


def test_passive_mode_requests_each_frame(emulator: PMS5003Emulator, passive: PMS5003Driver) -> None:
    assert passive.read() == values((5, 12, 20))
    emulator.values = (6, 13, 21)
    assert passive.read() == values((6, 13, 21))
    assert [c[2] for c in emulator.commands] == [CMD_MODE, CMD_READ, CMD_READ]
    assert emulator.frames_sent == 2


def test_passive_mode_answer_with_noise_and_fragments(emulator: PMS5003Emulator, passive: PMS5003Driver) -> None:
    emulator.responses.append([b"\xff\x00", B[:3], B[3:17], B[17:]])
    assert passive.read() == values((11, 22, 33))


def test_passive_mode_errors(emulator: PMS5003Emulator, passive: PMS5003Driver) -> None:
    emulator.responses.append([corrupted(B)])
    with pytest.raises(ChecksumError):
        passive.read()
    emulator.responses.append([])  # the sensor does not answer
    with pytest.raises(BusError, match="no complete frame"):
        passive.read()
    assert passive.read() == values((5, 12, 20))


def test_missing_port_is_a_bus_error() -> None:
    driver = PMS5003Driver("air-1", PMS5003Params(port="/dev/does-not-exist-pms"))
    with pytest.raises(BusError, match="does-not-exist-pms"):
        driver.open()
    with pytest.raises(BusError, match="not open"):
        driver.read()


def test_pms5003_params() -> None:
    assert PMS5003Params.model_validate({}).port == "/dev/serial0"
    for bad in ({"mode": "burst"}, {"frame_timeout": 0}, {"port": ""}, {"parity": "N"}):
        with pytest.raises(ValidationError):
            PMS5003Params.model_validate(bad)


# -- through the poller: checksum errors are counted and dropped ---------------------------------


async def test_poller_counts_corrupt_frames_and_never_delivers_them(emulator: PMS5003Emulator) -> None:
    driver, _ = open_driver(emulator, mode="passive", frame_timeout=0.5)
    driver.close()  # the poller opens it itself
    good = data_frame(5, 12, 20)
    script = [[good], [corrupted(good)], [b"\x00" * 7, good], [corrupted(good)], [good[:9], good[9:]], [good]]
    emulator.responses.extend(script)
    samples: list[Mapping[str, float]] = []
    enough = asyncio.Event()

    def on_sample(ts: int, sample: Mapping[str, float]) -> None:
        samples.append(dict(sample))
        if len(samples) == 4:
            enough.set()

    poller = DevicePoller(
        driver, 0.02, on_sample, lambda state, reason: None, PollPolicy(read_timeout=2.0, fault_after=5)
    )
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.wait_for(enough.wait(), timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert samples == [values((5, 12, 20))] * 4  # corrupted(good) would carry pm2_5 = 8
    assert poller.stats.errors["checksum"] == 2
    assert poller.stats.reopens == 0
    assert poller.state == "online"
