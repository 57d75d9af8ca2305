"""Fuzzing the sensor-reader's inputs from outside Python: the devices file and the chips' bytes.

- The devices file (sensor_reader.config.load_devices): any bytes, any TOML document (generated
  near the real schema, with every TOML value kind including inf and nan), and the shipped examples
  with bytes changed, give a ConfigError or a valid configuration, never another exception. A valid
  one has valid unique ids, known drivers, a sane interval, and drivers that can only ever report
  finite values (every raw count of an ADC channel converts to a finite value or is implausible).
- Each chip's frames (through the byte-exact fakes in tests/fakes, or straight into the parser):
  any bytes give readings that are finite and within the chip's range, or the driver's own errors
  (DriverError subclasses), never another exception; the PMS5003 stream parser finds the same
  frames however the stream is cut into reads, and its buffer stays under one frame.
Regressions found here follow the properties, each with its exact failing input.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.i2c import FakeBME280, FakeI2CBus
from fakes.spi import FakeMCP3008
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from iotpipe import ID_PATTERN, ConfigError
from sensor_reader.config import load_devices
from sensor_reader.drivers import (
    DRIVERS,
    BME280Driver,
    DriverError,
    MCP3008Driver,
    PMS5003Driver,
    SHT31Driver,
    SimulatedDriver,
)
from sensor_reader.drivers.i2c import BME280Calibration, BME280Params, crc8_sensirion
from sensor_reader.drivers.spi import MCP3008Params
from sensor_reader.drivers.uart import DATA_FRAME_LENGTH, START, FrameParser, PMS5003Params, frame_checksum

EXAMPLES = int(os.environ.get("IOTPIPE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("IOTPIPE_FUZZ_EXAMPLES"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "services/sensor_reader/examples"


@pytest.fixture(scope="module")
def devices_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-devices") / "devices.toml"


# -- TOML documents near the devices file's schema --------------------------------------------------


def toml(value: Any) -> str:
    """`value` as a TOML value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string (or a TOMLDecodeError)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml(str(k))} = {toml(v)}" for k, v in value.items()) + "}"


any_float = st.floats() | st.sampled_from([1.7e308, -1.7e308, 5e-324, 0.0, -0.0, 1e300])
scalars = st.booleans() | st.integers() | st.integers(-5, 2000) | any_float | st.text(max_size=12)
toml_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
)
valid_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")
small = st.floats(-1e3, 1e3)
channel_configs = st.fixed_dictionaries(
    {"unit": st.just("%"), "min": small, "max": small},
    optional={"raw_min": st.integers(0, 1023), "raw_max": st.integers(0, 1023), "margin": st.floats(0, 1)},
)
# Each driver's parameters as a devices file would give them (invalid only by chance: min == max...).
GOOD_PARAMS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "simulated": st.fixed_dictionaries(
        {},
        optional={
            "sensors": st.lists(valid_ids, min_size=1, max_size=3, unique=True),
            "spike_probability": st.floats(0, 1),
            "period_s": st.floats(0.001, 1e6),
            "sample_rate": st.floats(1, 1000),
            "seed": st.integers(0, 2**64),
        },
    ),
    "mcp3008": st.fixed_dictionaries(
        {
            "channels": st.lists(channel_configs, min_size=1, max_size=3).map(
                lambda chans: {f"ch{i}": {**c, "channel": i} for i, c in enumerate(chans)}
            )
        },
        optional={
            "bus": st.integers(0, 3),
            "samples_per_read": st.integers(1, 4),
            "max_speed_hz": st.integers(1, 3_600_000),
        },
    ),
    "bme280": st.fixed_dictionaries(
        {},
        optional={
            "address": st.sampled_from([0x76, 0x77]),
            "mode": st.sampled_from(["forced", "normal"]),
            "oversampling_humidity": st.sampled_from([1, 2, 4, 8, 16]),
            "standby_ms": st.sampled_from([0.5, 10, 20, 62.5, 125, 250, 500, 1000]),
        },
    ),
    "sht31": st.fixed_dictionaries({}, optional={"repeatability": st.sampled_from(["high", "medium", "low"])}),
    "pms5003": st.fixed_dictionaries(
        {}, optional={"mode": st.sampled_from(["active", "passive"]), "frame_timeout": st.floats(0.01, 30)}
    ),
}
good_devices = st.lists(
    st.sampled_from(sorted(GOOD_PARAMS)).flatmap(
        lambda driver: st.fixed_dictionaries(
            {"id": valid_ids, "driver": st.just(driver), "params": GOOD_PARAMS[driver]},
            optional={"interval": st.floats(0.01, 3600)},
        )
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda device: device["id"],
)
hostile = toml_values | st.sampled_from([math.inf, -math.inf, math.nan, 1.7e308, -1.7e308, 2**64, -1, 0, "", []])


@st.composite
def perturbed(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one part changed: a leaf or subtree replaced by a hostile TOML value, a key
    dropped or added."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["descend", "descend", "descend", "drop", "add"]))
        out = dict(value)
        if action == "descend":
            out[key] = draw(perturbed(value[key]))
        elif action == "drop":
            del out[key]
        else:
            out[draw(st.text(max_size=8))] = draw(hostile)
        return out
    if isinstance(value, list) and value and draw(st.integers(0, 3)) > 0:
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], draw(perturbed(value[index])), *value[index + 1 :]]
    return draw(hostile)


@st.composite
def devices_documents(draw: st.DrawFn) -> str:
    """A genuine devices file changed in up to three places, as TOML (a [[devices]] table each)."""
    doc: Any = {"devices": draw(good_devices)}
    for _ in range(draw(st.integers(0, 3))):
        doc = draw(perturbed(doc))
    if not isinstance(doc, dict):
        doc = {"devices": doc}
    lines = [f"{toml(k)} = {toml(v)}" for k, v in doc.items() if k != "devices"]
    devices = doc.get("devices", [])
    if isinstance(devices, list) and devices and all(isinstance(d, dict) for d in devices):
        for device in devices:
            lines.append("[[devices]]")
            lines += [f"{toml(k)} = {toml(v)}" for k, v in device.items()]
    elif "devices" in doc:
        lines.insert(0, f"devices = {toml(devices)}")
    return "\n".join(lines) + "\n"


def loaded_or_refused(path: Path) -> list[Any] | None:
    """load_devices(path): a valid configuration (checked) or ConfigError (None); any other
    exception fails the property."""
    try:
        built = load_devices(path)
    except ConfigError as exc:
        assert "\n" not in str(exc).split(": ", 1)[0]
        return None
    assert built, "a valid devices file has at least one device"
    assert len({device.id for device, _ in built}) == len(built)
    for device, driver in built:
        assert ID_PATTERN.fullmatch(device.id) and isinstance(driver, DRIVERS[device.driver])
        assert math.isfinite(device.interval) and 0 < device.interval <= 3600
        assert driver.sensors and all(ID_PATTERN.fullmatch(s) for s in driver.sensors)
        if isinstance(driver, MCP3008Driver):
            for cfg in driver.params.channels.values():
                values = [cfg.convert(raw) for raw in range(1024)]
                assert all(math.isfinite(v) for v in values if cfg.plausible(v)), f"non-finite reading from {cfg}"
        if isinstance(driver, SimulatedDriver):
            for _ in range(3):
                assert all_finite(driver.read())
        if isinstance(driver, PMS5003Driver):
            assert math.isfinite(driver.params.frame_timeout)
    return built


def all_finite(sample: Any) -> bool:
    values = sample.values.values() if hasattr(sample, "period_ms") else [[v] for v in sample.values()]
    return all(math.isfinite(v) for series in values for v in series)


@FUZZ
@given(content=st.binary(max_size=300))
@example(content=b"\xff\xfe[[devices]]\n")
def test_any_bytes_as_the_devices_file_are_a_config_error_or_a_valid_config(devices_file: Path, content: bytes) -> None:
    devices_file.write_bytes(content)
    loaded_or_refused(devices_file)


@FUZZ
@given(document=devices_documents())
def test_any_toml_devices_document_is_a_config_error_or_a_valid_config(devices_file: Path, document: str) -> None:
    devices_file.write_text(document, encoding="utf-8")
    loaded_or_refused(devices_file)


@FUZZ
@given(
    example_file=st.sampled_from(sorted(EXAMPLES_DIR.glob("*.toml"))),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(max_size=4), st.integers(0, 4)), max_size=4),
)
def test_a_shipped_example_with_bytes_changed_is_a_config_error_or_a_valid_config(
    devices_file: Path, example_file: Path, edits: list[tuple[float, bytes, int]]
) -> None:
    content = example_file.read_bytes()
    assert loaded_or_refused(example_file) is not None  # the control: each example is valid
    for where, insert, remove in edits:
        at = int(where * len(content))
        content = content[:at] + insert + content[at + remove :]
    devices_file.write_bytes(content)
    loaded_or_refused(devices_file)


# -- chips ----------------------------------------------------------------------------------------------


def channels_config() -> st.SearchStrategy[dict[str, Any]]:
    channel = st.fixed_dictionaries(
        {"unit": st.just("%"), "min": any_float, "max": any_float},
        optional={"raw_min": st.integers(0, 1023), "raw_max": st.integers(0, 1023), "margin": any_float},
    )
    return st.lists(channel, min_size=1, max_size=3).map(
        lambda chans: {f"ch{i}": {**c, "channel": i} for i, c in enumerate(chans)}
    )


@FUZZ
@given(channels=channels_config(), raws=st.lists(st.integers(0, 1023), min_size=3, max_size=3))
@example(
    channels={"ch0": {"unit": "%", "min": -1.7e308, "max": 1.7e308, "channel": 0}},
    raws=[1023, 0, 0],
)
def test_mcp3008_reads_finite_values_or_its_own_error(channels: dict[str, Any], raws: list[int]) -> None:
    """Any calibration the devices file accepts, any count the ADC returns (through the bit-exact
    fake): a finite value, or ImplausibleValueError."""
    try:
        params = MCP3008Params.model_validate({"channels": channels})
    except ValueError:  # pydantic's ValidationError: refused at config time, a ConfigError in load_devices
        return
    chip = FakeMCP3008({i: raw for i, raw in enumerate(raws)})
    driver = MCP3008Driver("adc", params, spi_factory=chip.spidev)
    driver.open()
    try:
        sample = driver.read()
    except DriverError:
        return
    finally:
        driver.close()
    assert all_finite(sample)


@pytest.fixture(scope="module")
def bme_wire() -> Iterator[tuple[FakeI2CBus, FakeBME280]]:
    chip = FakeBME280()
    wire = FakeI2CBus({0x76: chip}, number=1)
    yield wire, chip
    wire.faults.release()


@FUZZ
@given(
    trimming_88=st.binary(min_size=26, max_size=26),
    trimming_e1=st.binary(min_size=7, max_size=7),
    adc=st.tuples(st.integers(0, 2**20 - 1), st.integers(0, 2**20 - 1), st.integers(0, 2**16 - 1)),
)
def test_bme280_any_trimming_and_conversion_give_readings_in_range_or_its_own_error(
    bme_wire: tuple[FakeI2CBus, FakeBME280], trimming_88: bytes, trimming_e1: bytes, adc: tuple[int, int, int]
) -> None:
    """A chip whose factory trimming registers and ADC words are any bits at all (a counterfeit or
    a damaged chip): through the fake's register map, a reading in range or a DriverError."""
    wire, chip = bme_wire
    chip.regs[0x88:0xA2] = trimming_88
    chip.regs[0xE1:0xE8] = trimming_e1
    chip.adc_p, chip.adc_t, chip.adc_h = adc
    driver = BME280Driver("bme", BME280Params(mode="normal", soft_reset=False), bus_factory=wire.smbus)
    try:
        driver.open()
        sample = driver.read()
    except DriverError:
        return
    finally:
        driver.close()
    assert all_finite(sample)
    assert -40 <= sample["temperature"] <= 85 and 300 <= sample["pressure"] <= 1100
    assert 0 <= sample["humidity"] <= 100


@FUZZ
@given(data=st.binary(min_size=8, max_size=8), trimming=st.binary(min_size=33, max_size=33))
def test_bme280_compensation_of_any_data_registers(data: bytes, trimming: bytes) -> None:
    """Straight into the parser: any 8 data registers (the low nibbles of the 20-bit words too,
    which the fake always leaves zero) with any trimming."""
    driver = BME280Driver("bme", BME280Params())
    driver._calibration = BME280Calibration.from_registers(trimming[:26], trimming[26:])
    try:
        sample = driver.compensate(list(data))
    except DriverError:
        return
    assert all_finite(sample) and -40 <= sample["temperature"] <= 85


@FUZZ
@given(
    frame=st.binary(min_size=6, max_size=6)
    | st.tuples(st.binary(min_size=2, max_size=2), st.binary(min_size=2, max_size=2)).map(
        lambda words: b"".join(w + bytes([crc8_sensirion(w)]) for w in words)
    )
)
def test_sht31_any_frame_gives_readings_in_range_or_its_own_error(frame: bytes) -> None:
    """Any 6 bytes, and any two words with valid CRCs (so the conversion is reached every time)."""
    try:
        sample = SHT31Driver.convert(frame)
    except DriverError:
        return
    assert all_finite(sample)
    assert -40 <= sample["temperature"] <= 125 and 0 <= sample["humidity"] <= 100


def pms_frame(words: list[int], *, length: int = DATA_FRAME_LENGTH, good: bool = True) -> bytes:
    body = START + struct.pack(">H13H", length, *words)
    return body + ((frame_checksum(body) + (0 if good else 1)) & 0xFFFF).to_bytes(2, "big")


pms_streams = st.lists(
    st.binary(max_size=40)
    | st.lists(st.integers(0, 0xFFFF), min_size=13, max_size=13).flatmap(
        lambda w: st.sampled_from([pms_frame(w), pms_frame(w, good=False), pms_frame(w)[:20]])
    )
    | st.sampled_from(
        [START, START[:1], START + b"\x00\x04", START + b"\x00\x1c", b"\x42\x4d\x00\x04\xe1\x01\x01\x73"]
    ),
    max_size=8,
).map(b"".join)


@FUZZ
@given(stream=pms_streams, cuts=st.lists(st.integers(0, 400), max_size=10))
def test_pms5003_parser_finds_the_same_frames_however_the_stream_is_cut(stream: bytes, cuts: list[int]) -> None:
    whole = FrameParser()
    expected = whole.feed(stream)
    pieces, parser, frames = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)}), FrameParser(), []
    for begin, end in itertools.pairwise(pieces):
        frames += parser.feed(stream[begin:end])
        assert len(parser) < 4 + DATA_FRAME_LENGTH  # never more than one frame in progress
    assert frames == expected
    for frame in frames:
        assert frame.raw.startswith(START) and len(frame.raw) == 4 + int.from_bytes(frame.raw[2:4], "big")
        assert frame.checksum_ok == (frame_checksum(frame.raw[:-2]) == int.from_bytes(frame.raw[-2:], "big"))
        if frame.is_data:
            try:
                sample = PMS5003Driver("pms", PMS5003Params()).decode(frame)
            except DriverError:
                continue
            assert all_finite(sample) and all(0 <= v <= 1000 for v in sample.values())


class StreamPort:
    """An in-memory serial port (the subset of pyserial the driver uses) replaying `data`."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    @property
    def in_waiting(self) -> int:
        return len(self.data)

    def read(self, size: int = 1) -> bytes:
        out = bytes(self.data[:size])
        del self.data[:size]
        return out

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


@FUZZ
@given(stream=pms_streams)
def test_pms5003_driver_reads_any_stream_to_a_reading_or_its_own_error(stream: bytes) -> None:
    """Through the driver's read() (active mode): whatever the line carried, a reading within the
    sensor's range or a DriverError (a timeout is a BusError) within the frame timeout."""
    driver = PMS5003Driver("pms", PMS5003Params(frame_timeout=0.001), serial_factory=lambda *a, **k: StreamPort(stream))
    driver.open()
    try:
        sample = driver.read()
    except DriverError:
        return
    finally:
        driver.close()
    assert all_finite(sample) and all(0 <= v <= 1000 for v in sample.values())


# -- regressions: each input a fuzzer found, exactly ------------------------------------------------


def test_a_devices_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """test_any_bytes_as_the_devices_file_...: content=b'\\x80' raised UnicodeDecodeError (a
    ValueError, not the OSError the loader caught), so the reader died with a traceback instead of
    the one-line config error naming the file."""
    path = tmp_path / "devices.toml"
    path.write_bytes(b"\x80")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_devices(path)


@pytest.mark.parametrize(
    "calibration",
    [
        # test_mcp3008_reads_...: raw count 2 read as inf ((2 - 0) * 1.63e308 overflows), and inf
        # passed `plausible`, so the device's window carried a reading the contract cannot encode.
        {"min": 0.0, "max": 1.634266486238469e308},
        {"min": -1.7e308, "max": 1.7e308},
        {"min": "-inf", "max": "inf"},  # TOML's own literals: the same infinite readings
        {"min": 0.0, "max": "nan"},
        {"min": 0.0, "max": 1.0, "margin": "inf"},
    ],
)
def test_an_adc_calibration_that_overflows_is_a_config_error(tmp_path: Path, calibration: dict[str, Any]) -> None:
    channel = "\n".join(f"{key} = {value}" for key, value in calibration.items())
    path = tmp_path / "devices.toml"
    header = '[[devices]]\nid = "adc"\ndriver = "mcp3008"\n[devices.params.channels.soil]\nchannel = 0\nunit = "%"'
    path.write_text(f"{header}\n{channel}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"devices\[0\] \(id 'adc'\)\.params\.channels\.soil"):
        load_devices(path)
