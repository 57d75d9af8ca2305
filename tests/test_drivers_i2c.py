"""BME280 and SHT31 drivers against fakes that speak the chips' I2C protocols byte for byte."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from fakes.i2c import FakeBME280, FakeI2CBus, FakeSHT31, crc8
from pydantic import ValidationError
from sensor_reader.drivers import (
    BusError,
    ChecksumError,
    DeviceIdentityError,
    ImplausibleValueError,
)
from sensor_reader.drivers.i2c import (
    BME280Calibration,
    BME280Driver,
    BME280Params,
    SHT31Driver,
    SHT31Params,
    crc8_sensirion,
)

T = FakeBME280.EXAMPLE_TRIMMING


@pytest.fixture
def bme() -> FakeBME280:
    return FakeBME280()


@pytest.fixture
def sht() -> FakeSHT31:
    return FakeSHT31(temperature=21.5, humidity=40.0)


@pytest.fixture
def wire(bme: FakeBME280, sht: FakeSHT31) -> Iterator[FakeI2CBus]:
    wire = FakeI2CBus({0x76: bme, 0x44: sht}, number=1)
    yield wire
    wire.faults.release()


class ManualClock:
    """Monotonic seconds for a fake chip that move only when the test sets them."""

    def __init__(self, start: float = 1000.0) -> None:
        self.start = self.now = start

    def __call__(self) -> float:
        return self.now


def bme280(wire: FakeI2CBus, **params: object) -> BME280Driver:
    return BME280Driver("gh-1", BME280Params.model_validate({"bus": 1} | params), bus_factory=wire.smbus)


def sht31(wire: FakeI2CBus, **params: object) -> SHT31Driver:
    return SHT31Driver("gh-1-sht", SHT31Params.model_validate({"bus": 1} | params), bus_factory=wire.smbus)


@pytest.fixture
def bme_driver(wire: FakeI2CBus) -> Iterator[BME280Driver]:
    driver = bme280(wire)
    driver.open()
    yield driver
    driver.close()


@pytest.fixture
def sht_driver(wire: FakeI2CBus) -> Iterator[SHT31Driver]:
    driver = sht31(wire, repeatability="low")
    driver.open()
    yield driver
    driver.close()


# -- Bosch's integer reference (BME280 datasheet 4.2.3), independent of the driver's doubles -----


def ref_t_fine(adc_t: int) -> int:
    var1 = (((adc_t >> 3) - (T["t1"] << 1)) * T["t2"]) >> 11
    var2 = (((((adc_t >> 4) - T["t1"]) * ((adc_t >> 4) - T["t1"])) >> 12) * T["t3"]) >> 14
    return var1 + var2


def ref_temperature_centi(t_fine: int) -> int:
    return (t_fine * 5 + 128) >> 8


def ref_pressure_q24_8(adc_p: int, t_fine: int) -> int:
    var1 = t_fine - 128000
    var2 = var1 * var1 * T["p6"]
    var2 = var2 + ((var1 * T["p5"]) << 17)
    var2 = var2 + (T["p4"] << 35)
    var1 = ((var1 * var1 * T["p3"]) >> 8) + ((var1 * T["p2"]) << 12)
    var1 = (((1 << 47) + var1) * T["p1"]) >> 33
    p = 1048576 - adc_p
    p = (((p << 31) - var2) * 3125) // var1
    var1 = (T["p9"] * (p >> 13) * (p >> 13)) >> 25
    var2 = (T["p8"] * p) >> 19
    return ((p + var1 + var2) >> 8) + (T["p7"] << 4)


def ref_humidity_q22_10(adc_h: int, t_fine: int) -> int:
    v = t_fine - 76800
    v = ((((adc_h << 14) - (T["h4"] << 20) - (T["h5"] * v)) + 16384) >> 15) * (
        ((((((v * T["h6"]) >> 10) * (((v * T["h3"]) >> 11) + 32768)) >> 10) + 2097152) * T["h2"] + 8192) >> 14
    )
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * T["h1"]) >> 4)
    return min(max(v, 0), 419430400) >> 12


# -- BME280 ---------------------------------------------------------------------------------------


def test_trimming_registers_parse_back_to_the_values(bme: FakeBME280) -> None:
    cal = BME280Calibration.from_registers(bme.regs[0x88:0xA2], bme.regs[0xE1:0xE8])
    assert cal == BME280Calibration(**T)


def test_negative_h4_h5_keep_their_sign() -> None:
    # dig_H4/H5 are 12-bit values packed around a shared nibble; the sign lives in the outer byte.
    trimming = T | {"h4": -300, "h5": -5, "h2": -12, "h6": -30}
    chip = FakeBME280(trimming=trimming)
    cal = BME280Calibration.from_registers(chip.regs[0x88:0xA2], chip.regs[0xE1:0xE8])
    assert (cal.h2, cal.h4, cal.h5, cal.h6) == (-12, -300, -5, -30)


def test_datasheet_worked_example(bme_driver: BME280Driver) -> None:
    sample = bme_driver.read()
    assert sample["temperature"] == pytest.approx(25.08, abs=0.005)
    assert sample["pressure"] == pytest.approx(1006.5327, abs=0.001)  # 100653.27 Pa
    t_fine = ref_t_fine(FakeBME280.EXAMPLE_ADC_T)
    assert t_fine == 128422
    assert ref_temperature_centi(t_fine) == 2508
    assert sample["humidity"] == pytest.approx(ref_humidity_q22_10(FakeBME280.EXAMPLE_ADC_H, t_fine) / 1024.0, abs=0.05)
    assert bme_driver.sensors == {"temperature": "degC", "pressure": "hPa", "humidity": "%RH"}


@pytest.mark.parametrize("adc_t", [400_000, 480_000, 519_888, 600_000, 680_000])
@pytest.mark.parametrize("adc_p", [330_000, 415_148, 520_000, 700_000])
@pytest.mark.parametrize("adc_h", [22_000, 28_000, 33_000, 37_000])
def test_float_compensation_agrees_with_the_integer_reference(adc_t: int, adc_p: int, adc_h: int) -> None:
    cal = BME280Calibration(**T)
    t_fine = ref_t_fine(adc_t)
    assert cal.t_fine(adc_t) == pytest.approx(t_fine, abs=1)
    assert cal.temperature(cal.t_fine(adc_t)) == pytest.approx(ref_temperature_centi(t_fine) / 100, abs=0.01)
    assert cal.pressure(adc_p, cal.t_fine(adc_t)) == pytest.approx(ref_pressure_q24_8(adc_p, t_fine) / 256, abs=1)
    humidity = ref_humidity_q22_10(adc_h, t_fine) / 1024
    if 0 < humidity < 100:
        assert cal.humidity(adc_h, cal.t_fine(adc_t)) == pytest.approx(humidity, abs=0.05)


def test_open_resets_and_configures_the_chip(wire: FakeI2CBus, bme: FakeBME280) -> None:
    driver = bme280(
        wire,
        mode="normal",
        oversampling_temperature=2,
        oversampling_pressure=4,
        oversampling_humidity=8,
        iir_filter=4,
        standby_ms=62.5,
    )
    driver.open()
    try:
        assert bme.resets == 1
        assert bme.regs[0xF2] == 0b100  # osrs_h x8
        assert bme.regs[0xF4] == 0b010_011_11  # osrs_t x2, osrs_p x4, normal mode
        assert bme.regs[0xF5] == 0b001_010_00  # t_sb 62.5 ms, filter 4
        before = bme.conversions
        assert driver.read()["temperature"] == pytest.approx(25.08, abs=0.005)
        assert bme.regs[0xF4] & 0b11 == 0b11  # normal mode needs no trigger and stays running
        assert bme.conversions == before + 1
    finally:
        driver.close()


def test_forced_mode_triggers_one_conversion_per_read(bme: FakeBME280, bme_driver: BME280Driver) -> None:
    assert bme.regs[0xF4] & 0b11 == 0b00  # sleeping between reads
    bme.adc_t = 480_000
    first = bme_driver.read()["temperature"]
    bme.adc_t = 600_000
    second = bme_driver.read()["temperature"]
    assert bme.conversions == 2
    assert first == pytest.approx(ref_temperature_centi(ref_t_fine(480_000)) / 100, abs=0.01)
    assert second == pytest.approx(ref_temperature_centi(ref_t_fine(600_000)) / 100, abs=0.01)
    assert bme.regs[0xF4] & 0b11 == 0b00


def test_no_soft_reset_when_disabled(wire: FakeI2CBus, bme: FakeBME280) -> None:
    driver = bme280(wire, soft_reset=False)
    driver.open()
    driver.close()
    assert bme.resets == 0


@pytest.mark.parametrize(("oversampling", "max_ms"), [(1, 9.3), (16, 112.8)])
def test_fake_bme280_converts_for_the_datasheet_maximum(oversampling: int, max_ms: float) -> None:
    # Datasheet 9.1: t_measure,max = 1.25 + 2.3 * osrs_t + (2.3 * osrs_p + 0.575) + (2.3 * osrs_h + 0.575) ms.
    clock = ManualClock()
    bus = FakeI2CBus({0x76: FakeBME280(clock=clock)}).smbus(1)
    code = {1: 0b001, 16: 0b101}[oversampling]
    bus.write_byte_data(0x76, 0xF2, code)
    bus.write_byte_data(0x76, 0xF4, code << 5 | code << 2 | 0b01)  # forced mode
    reset_values = [0x80, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80, 0x00]

    clock.now = clock.start + max_ms / 1000 - 0.0001
    assert bus.read_byte_data(0x76, 0xF3) & 0x08  # measuring
    assert bus.read_i2c_block_data(0x76, 0xF7, 8) == reset_values  # the results are not there yet
    assert bus.read_byte_data(0x76, 0xF4) & 0b11 == 0b01

    clock.now = clock.start + max_ms / 1000 + 0.000001
    assert bus.read_byte_data(0x76, 0xF3) & 0x08 == 0
    adc_p, adc_t, adc_h = FakeBME280.EXAMPLE_ADC_P, FakeBME280.EXAMPLE_ADC_T, FakeBME280.EXAMPLE_ADC_H
    expected = (adc_p << 4).to_bytes(3, "big") + (adc_t << 4).to_bytes(3, "big") + adc_h.to_bytes(2, "big")
    assert bytes(bus.read_i2c_block_data(0x76, 0xF7, 8)) == expected
    assert bus.read_byte_data(0x76, 0xF4) & 0b11 == 0b00  # back to sleep


@pytest.mark.parametrize("oversampling", [1, 16])
def test_forced_read_waits_until_the_conversion_is_done(wire: FakeI2CBus, bme: FakeBME280, oversampling: int) -> None:
    # Read too early, the data registers still hold the previous conversion (or, the first time,
    # the reset values). At x16 the conversion takes up to 112.8 ms: only the driver's wait for the
    # datasheet maximum covers it; its measuring-bit poll afterwards is a safety net of ~10 ms.
    driver = bme280(
        wire,
        oversampling_temperature=oversampling,
        oversampling_pressure=oversampling,
        oversampling_humidity=oversampling,
    )
    driver.open()
    try:
        bme.adc_t = 480_000
        first = driver.read()["temperature"]
        bme.adc_t = 600_000
        second = driver.read()["temperature"]
    finally:
        driver.close()
    assert first == pytest.approx(ref_temperature_centi(ref_t_fine(480_000)) / 100, abs=0.01)
    assert second == pytest.approx(ref_temperature_centi(ref_t_fine(600_000)) / 100, abs=0.01)
    assert bme.early_data_reads == 0


def test_a_conversion_running_late_is_waited_for(bme: FakeBME280, bme_driver: BME280Driver) -> None:
    # A chip slower than its datasheet: the driver polls the measuring bit rather than trusting the
    # timing alone, and gives up with a BusError if the bit never clears.
    assert bme_driver.read()["pressure"] == pytest.approx(1006.53, abs=0.01)
    bme.conversion_overrun_s = 0.003
    bme.adc_p = 520_000
    expected_hpa = ref_pressure_q24_8(520_000, ref_t_fine(FakeBME280.EXAMPLE_ADC_T)) / 256 / 100
    assert bme_driver.read()["pressure"] == pytest.approx(expected_hpa, abs=0.01)
    assert bme.early_data_reads == 0
    bme.conversion_overrun_s = 1.0
    with pytest.raises(BusError, match="did not finish the conversion"):
        bme_driver.read()


def test_wrong_chip_id_is_an_identity_error_and_releases_the_bus(wire: FakeI2CBus, bme: FakeBME280) -> None:
    bme.regs[0xD0] = 0x58
    driver = bme280(wire)
    with pytest.raises(DeviceIdentityError, match=r"chip id 0x58 at 0x76 .*BMP280"):
        driver.open()
    assert wire.opened == wire.closed == 1
    bme.regs[0xD0] = 0x12
    with pytest.raises(DeviceIdentityError, match="not a BME280"):
        driver.open()


def test_nothing_at_the_address_is_a_bus_error(wire: FakeI2CBus) -> None:
    with pytest.raises(BusError, match=r"read chip id at 0x77 on /dev/i2c-1: .*Remote I/O error"):
        bme280(wire, address=0x77).open()
    assert wire.opened == wire.closed


def test_missing_adapter_is_a_bus_error(wire: FakeI2CBus) -> None:
    with pytest.raises(BusError, match="/dev/i2c-3"):
        bme280(wire, bus=3).open()


def test_oserror_mid_read_is_a_transient_bus_error(wire: FakeI2CBus, bme_driver: BME280Driver) -> None:
    wire.faults.fail(times=1)
    with pytest.raises(BusError, match="Remote I/O error"):
        bme_driver.read()
    assert bme_driver.read()["temperature"] == pytest.approx(25.08, abs=0.005)


def test_read_when_closed_is_a_bus_error(bme_driver: BME280Driver) -> None:
    bme_driver.close()
    with pytest.raises(BusError, match="not open"):
        bme_driver.read()


def test_chip_reset_by_a_brown_out_is_a_bus_error_until_reopened(bme: FakeBME280, bme_driver: BME280Driver) -> None:
    bme._power_on()  # ctrl_hum back to 0: humidity is skipped and reads 0x8000
    with pytest.raises(BusError, match="skipped-measurement"):
        bme_driver.read()
    bme_driver.close()
    bme_driver.open()
    assert bme_driver.read()["humidity"] == pytest.approx(43.86, abs=0.05)


@pytest.mark.parametrize(
    ("register", "adc", "sensor"),
    [
        ("adc_t", 1_000_000, "temperature"),  # 173 degC
        ("adc_t", 300_000, "temperature"),  # -44 degC
        ("adc_p", 200_000, "pressure"),  # 1380 hPa
        ("adc_p", 850_000, "pressure"),  # 265 hPa
        ("adc_h", 39_000, "humidity"),  # 104.7 %RH
        ("adc_h", 19_000, "humidity"),  # -6.6 %RH
    ],
)
def test_values_outside_the_datasheet_ranges_are_implausible(
    bme: FakeBME280, bme_driver: BME280Driver, register: str, adc: int, sensor: str
) -> None:
    setattr(bme, register, adc)
    with pytest.raises(ImplausibleValueError, match=sensor):
        bme_driver.read()


def test_humidity_overshoot_at_saturation_is_clamped(bme: FakeBME280, bme_driver: BME280Driver) -> None:
    bme.adc_h = 38_200  # 100.3 %RH before the clamp
    assert bme_driver.read()["humidity"] == 100.0
    bme.adc_h = 20_000  # -1.07 %RH before the clamp
    assert bme_driver.read()["humidity"] == 0.0


def test_bme280_params() -> None:
    assert BME280Params.model_validate({"address": 0x77}).address == 0x77
    for bad in ({"address": 0x44}, {"oversampling_pressure": 3}, {"standby_ms": 7}, {"adress": 0x76}):
        with pytest.raises(ValidationError):
            BME280Params.model_validate(bad)


# -- SHT31 ----------------------------------------------------------------------------------------


def test_crc8_matches_the_datasheet_example() -> None:
    assert crc8_sensirion(b"\xbe\xef") == 0x92  # SHT3x datasheet, table 19
    assert crc8(b"\xbe\xef") == 0x92


def test_open_resets_and_checks_status_then_measures(sht: FakeSHT31, sht_driver: SHT31Driver) -> None:
    assert sht.commands == [0x30A2, 0xF32D]
    sample = sht_driver.read()
    assert sample == {"temperature": pytest.approx(21.5, abs=0.01), "humidity": pytest.approx(40.0, abs=0.01)}
    assert sht.commands[-1] == 0x2416  # low repeatability, no clock stretching
    assert sht_driver.sensors == {"temperature": "degC", "humidity": "%RH"}


@pytest.mark.parametrize(("repeatability", "command"), [("high", 0x2400), ("medium", 0x240B), ("low", 0x2416)])
def test_repeatability_selects_the_command(wire: FakeI2CBus, sht: FakeSHT31, repeatability: str, command: int) -> None:
    driver = sht31(wire, repeatability=repeatability)
    driver.open()
    try:
        driver.read()
    finally:
        driver.close()
    assert sht.commands[-1] == command


@pytest.mark.parametrize(("command", "max_s"), [(0x2400, 0.015), (0x240B, 0.006), (0x2416, 0.004)])
def test_fake_sht31_nacks_a_read_until_the_measurement_is_done(command: int, max_s: float) -> None:
    # Single shot without clock stretching: the chip NACKs the read header while it measures
    # (datasheet table 4: at most 15, 6 and 4 ms for high, medium and low repeatability).
    clock = ManualClock()
    chip = FakeSHT31(temperature=21.5, humidity=40.0, clock=clock)
    chip.write(command.to_bytes(2, "big"))
    clock.now = clock.start + max_s - 0.0001
    with pytest.raises(OSError) as nack:
        chip.read(6)
    assert nack.value.errno == errno.EREMOTEIO
    clock.now = clock.start + max_s
    raw_t, raw_rh = FakeSHT31.raw_temperature(21.5), FakeSHT31.raw_humidity(40.0)
    assert chip.read(6) == FakeSHT31.word(raw_t) + FakeSHT31.word(raw_rh)


@pytest.mark.parametrize("repeatability", ["high", "medium", "low"])
def test_sht31_reads_the_measurement_only_once_it_is_done(wire: FakeI2CBus, sht: FakeSHT31, repeatability: str) -> None:
    driver = sht31(wire, repeatability=repeatability)
    driver.open()
    try:
        sample = driver.read()  # a read NACKed for being early would be a BusError
    finally:
        driver.close()
    assert sample == {"temperature": pytest.approx(21.5, abs=0.01), "humidity": pytest.approx(40.0, abs=0.01)}
    assert sht.early_reads == 0


def test_conversion_formulas() -> None:
    def frame(raw_t: int, raw_rh: int) -> bytes:
        return FakeSHT31.word(raw_t) + FakeSHT31.word(raw_rh)

    assert SHT31Driver.convert(frame(0x6666, 0x8000)) == {
        "temperature": pytest.approx(-45 + 175 * 0x6666 / 65535),
        "humidity": pytest.approx(100 * 0x8000 / 65535),
    }
    top = SHT31Driver.convert(frame(0xF8AE, 0xFFFF))  # the datasheet's 125 degC limit; full scale RH
    assert top == {"temperature": pytest.approx(125.0, abs=0.01), "humidity": pytest.approx(100.0)}


@pytest.mark.parametrize("word", ["temperature", "humidity"])
def test_crc_is_checked_on_each_word(sht: FakeSHT31, sht_driver: SHT31Driver, word: str) -> None:
    sht.corrupt_next(1, word)
    with pytest.raises(ChecksumError, match=f"{word} word"):
        sht_driver.read()
    assert sht_driver.read()["temperature"] == pytest.approx(21.5, abs=0.01)


def test_not_an_sht3x_is_an_identity_error(wire: FakeI2CBus) -> None:
    wire.chips[0x45] = FakeBME280()  # a register-based chip answers, but not with CRC'd words
    with pytest.raises(DeviceIdentityError, match="not an SHT3x"):
        sht31(wire, address=0x45).open()
    assert wire.opened == wire.closed


def test_sht31_bus_errors(wire: FakeI2CBus, sht_driver: SHT31Driver) -> None:
    wire.faults.fail(times=2)
    with pytest.raises(BusError, match="start measurement at 0x44 on /dev/i2c-1"):
        sht_driver.read()
    with pytest.raises(BusError):
        sht_driver.read()
    assert sht_driver.read()["humidity"] == pytest.approx(40.0, abs=0.01)
    with pytest.raises(BusError, match="0x45"):
        sht31(wire, address=0x45).open()


def test_sht31_implausible_temperature(sht: FakeSHT31, sht_driver: SHT31Driver) -> None:
    sht.temperature = 130.0  # raw 0xFFFF: a rail value with a valid CRC
    with pytest.raises(ImplausibleValueError, match=r"temperature 130\.00 degC"):
        sht_driver.read()


def test_sht31_params() -> None:
    assert SHT31Params.model_validate({}).address == 0x44
    for bad in ({"address": 0x76}, {"repeatability": "ultra"}, {"clock_stretching": True}):
        with pytest.raises(ValidationError):
            SHT31Params.model_validate(bad)
