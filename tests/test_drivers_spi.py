"""MCP3008 driver against a bit-exact fake of the chip; plus the driver table and example file."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ProtocolViolationError
from fakes.spi import FakeMCP3008, FakeSpiDev
from pydantic import ValidationError
from sensor_reader.drivers import DRIVERS, Block, BusError, DriverError, ImplausibleValueError
from sensor_reader.drivers.spi import MCP3008Driver, MCP3008Params

REPO = Path(__file__).resolve().parents[1]

SOIL = {"channel": 0, "unit": "%", "raw_min": 850, "raw_max": 400, "min": 0.0, "max": 100.0}
LIGHT = {"channel": 1, "unit": "lx", "raw_min": 0, "raw_max": 1023, "min": 0.0, "max": 1000.0}


def make_driver(chip: FakeMCP3008, **params: object) -> MCP3008Driver:
    raw = {"bus": 0, "chip_select": 0, "channels": {"soil_moisture": SOIL, "light": LIGHT}} | params
    return MCP3008Driver("pot-1", MCP3008Params.model_validate(raw), spi_factory=chip.spidev)


@pytest.fixture
def chip() -> Iterator[FakeMCP3008]:
    chip = FakeMCP3008({0: 625, 1: 512})
    yield chip
    chip.faults.release()


@pytest.fixture
def driver(chip: FakeMCP3008) -> Iterator[MCP3008Driver]:
    driver = make_driver(chip)
    driver.open()
    yield driver
    driver.close()


# -- the wire protocol --------------------------------------------------------------------------


def raw_handle(chip: FakeMCP3008) -> FakeSpiDev:
    spi = chip.spidev()
    spi.open(0, 0)
    spi.max_speed_hz = 1_000_000
    return spi


def test_every_channel_reads_its_own_10_bit_value(chip: FakeMCP3008, driver: MCP3008Driver) -> None:
    values = [0, 1, 2, 255, 256, 511, 768, 1023]
    for channel, raw in enumerate(values):
        chip.set(channel, raw)
    assert [driver.read_raw(ch) for ch in range(8)] == values
    assert chip.conversions == list(range(8))


def test_reply_bits_above_b9_are_masked_off(chip: FakeMCP3008) -> None:
    # The fake drives the high-impedance bits high, so an unmasked reply would read 0xF8 | B9B8.
    chip.set(3, 0x2AA)
    raw = raw_handle(chip).xfer2([0x01, (0x08 | 3) << 4, 0x00])
    assert raw[1] & 0xFC == 0xF8  # hi-Z (1s), then the null bit (0)
    assert ((raw[1] & 0x03) << 8) | raw[2] == 0x2AA


def test_fake_is_bit_exact_for_other_framings(chip: FakeMCP3008) -> None:
    # Start bit and config in the first byte: the result then straddles bytes 1..2 differently.
    # Agreeing with the datasheet here too shows the fake models bits, not the driver's bytes.
    chip.set(5, 0x3C5)
    spi = raw_handle(chip)
    r = spi.xfer2([0b0001_1101, 0x00, 0x00])  # start, SGL, 101 (channel 5)
    # byte 1: sample clock (hi-Z), null bit, B9..B4; byte 2: B3..B0, then B1.. LSB first
    assert r[1] >> 6 == 0b10
    assert ((r[1] & 0x3F) << 4) | (r[2] >> 4) == 0x3C5


def test_fake_rejects_frames_a_real_chip_would_misread(chip: FakeMCP3008) -> None:
    spi = raw_handle(chip)
    with pytest.raises(ProtocolViolationError, match="start bit"):
        spi.xfer2([0x00, 0x00, 0x00])
    with pytest.raises(ProtocolViolationError, match="differential"):
        spi.xfer2([0x01, 0x00, 0x00])
    spi.mode = 1
    with pytest.raises(ProtocolViolationError, match="SPI modes"):
        spi.xfer2([0x01, 0x80, 0x00])


def test_open_configures_mode_and_speed(chip: FakeMCP3008) -> None:
    handles = []

    def factory() -> object:
        handles.append(chip.spidev())
        return handles[-1]

    driver = MCP3008Driver(
        "pot-1",
        MCP3008Params.model_validate({"max_speed_hz": 1_350_000, "channels": {"light": LIGHT}}),
        spi_factory=factory,  # type: ignore[arg-type]
    )
    driver.open()
    try:
        assert handles[0].mode == 0
        assert handles[0].max_speed_hz == 1_350_000
    finally:
        driver.close()


# -- conversion and plausibility ----------------------------------------------------------------


def test_two_point_calibration_including_an_inverted_probe(chip: FakeMCP3008, driver: MCP3008Driver) -> None:
    assert driver.sensors == {"soil_moisture": "%", "light": "lx"}
    sample = driver.read()
    assert sample["soil_moisture"] == pytest.approx(50.0)  # halfway between 850 (dry) and 400 (wet)
    assert sample["light"] == pytest.approx(512 * 1000 / 1023)
    chip.set(0, 400)
    chip.set(1, 0)
    assert driver.read() == {"soil_moisture": pytest.approx(100.0), "light": pytest.approx(0.0)}


def test_a_burst_read_returns_every_round_of_conversions_as_one_block(chip: FakeMCP3008) -> None:
    burst = make_driver(chip, samples_per_read=25)
    burst.open()
    try:
        block = burst.read()
    finally:
        burst.close()
    assert isinstance(block, Block) and len(block) == 25 and block.period_ms > 0
    assert block.values["soil_moisture"] == [pytest.approx(50.0)] * 25
    assert block.values["light"] == [pytest.approx(512 * 1000 / 1023)] * 25
    # Every conversion went over the wire, channel by channel, round after round.
    assert chip.conversions == [0, 1] * 25
    chip.set(0, 1023)  # one implausible value drops the whole burst, as it drops a single sample
    burst.open()
    with pytest.raises(ImplausibleValueError):
        burst.read()
    burst.close()


def test_values_slightly_beyond_the_calibration_are_kept(chip: FakeMCP3008, driver: MCP3008Driver) -> None:
    chip.set(0, 870)  # a little drier than the dry calibration point: -4.4 %, inside the 10 % margin
    assert driver.read()["soil_moisture"] == pytest.approx(-4.444, abs=1e-3)


def test_rail_value_from_a_disconnected_probe_is_implausible(chip: FakeMCP3008, driver: MCP3008Driver) -> None:
    chip.set(0, 1023)  # a floating input pulled to the rail: -38 %
    with pytest.raises(ImplausibleValueError, match=r"soil_moisture: raw 1023 on channel 0"):
        driver.read()


def test_margin_is_configurable(chip: FakeMCP3008) -> None:
    strict = make_driver(chip, channels={"soil_moisture": SOIL | {"margin": 0.0}})
    strict.open()
    try:
        chip.set(0, 851)
        with pytest.raises(ImplausibleValueError):
            strict.read()
        chip.set(0, 850)
        assert strict.read() == {"soil_moisture": pytest.approx(0.0)}
    finally:
        strict.close()


# -- bus faults -----------------------------------------------------------------------------------


def test_oserror_on_transfer_is_a_bus_error_and_transient(chip: FakeMCP3008, driver: MCP3008Driver) -> None:
    chip.faults.fail(times=1)
    with pytest.raises(BusError, match=r"channel 0: .*Remote I/O error"):
        driver.read()
    assert driver.read()["soil_moisture"] == pytest.approx(50.0)


def test_missing_device_node_is_a_bus_error(chip: FakeMCP3008) -> None:
    driver = make_driver(chip, chip_select=1)
    with pytest.raises(BusError, match=r"/dev/spidev0\.1"):
        driver.open()
    with pytest.raises(BusError, match="not open"):
        driver.read()


def test_read_after_close_is_a_bus_error(driver: MCP3008Driver) -> None:
    driver.close()
    with pytest.raises(BusError):
        driver.read()
    driver.close()  # closing twice is harmless


def test_without_a_factory_the_real_spidev_is_used() -> None:
    # No SPI hardware here: either spidev is missing (not Linux) or /dev/spidev0.0 is.
    driver = MCP3008Driver("pot-1", MCP3008Params.model_validate({"channels": {"light": LIGHT}}))
    with pytest.raises(DriverError):
        driver.open()


# -- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ({}, "at least 1"),
        ({"a": SOIL, "b": LIGHT | {"channel": 0}}, "more than one sensor"),
        ({"bad id": SOIL}, "must match"),
        ({"a": SOIL | {"channel": 8}}, "less than or equal to 7"),
        ({"a": SOIL | {"raw_max": 850}}, "raw_min and raw_max must differ"),
        ({"a": SOIL | {"max": 0.0}}, "min and max must differ"),
        ({"a": SOIL | {"gain": 2}}, "Extra inputs"),
        ({"a": {"channel": 0, "unit": "%"}}, "Field required"),
    ],
)
def test_invalid_channel_config_is_rejected(channels: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MCP3008Params.model_validate({"channels": channels})


def test_speed_above_the_datasheet_limit_is_rejected() -> None:
    with pytest.raises(ValidationError, match="max_speed_hz"):
        MCP3008Params.model_validate({"max_speed_hz": 10_000_000, "channels": {"light": LIGHT}})


# -- driver table and the documented example ------------------------------------------------------


def test_driver_table_has_every_chip() -> None:
    assert {"simulated", "mcp3008", "bme280", "sht31", "pms5003"} <= set(DRIVERS)
    for name, cls in DRIVERS.items():
        assert cls.name == name


def test_raspberry_pi_example_validates_against_every_driver() -> None:
    doc = tomllib.loads((REPO / "services/sensor_reader/examples/raspberry-pi.toml").read_text())
    devices = doc["devices"]
    assert {d["driver"] for d in devices} == {"mcp3008", "bme280", "sht31", "pms5003"}
    for device in devices:
        cls = DRIVERS[device["driver"]]
        driver = cls(device["id"], cls.Params.model_validate(device.get("params", {})))
        assert driver.sensors
    soil_and_light = next(d for d in devices if d["driver"] == "mcp3008")
    assert set(soil_and_light["params"]["channels"]) == {"soil_moisture", "light"}


def test_hardware_doc_embeds_the_example_file() -> None:
    example = (REPO / "services/sensor_reader/examples/raspberry-pi.toml").read_text()
    doc = (REPO / "docs/hardware.md").read_text()
    assert example.strip() in doc
