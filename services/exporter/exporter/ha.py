"""Home Assistant MQTT discovery for the projection: one `sensor` entity per device and sensor.

What Home Assistant's MQTT sensor platform accepts (homeassistant/components/mqtt/sensor.py,
schemas.py, config.py; homeassistant/components/sensor/const.py), and so what this module emits:
- `state_topic` is required (MQTT_RO_SCHEMA); `value_template` picks this sensor's value out of the
  device's state JSON;
- `device_class` must be one of SensorDeviceClass, and its `unit_of_measurement` one of that class's
  DEVICE_CLASS_UNITS (e.g. temperature: °C, °F, K; humidity and moisture: %; illuminance: lx;
  pm1/pm25/pm10: μg/m³; pressure: Pa, hPa, kPa, bar, cbar, mbar, mmHg, inHg, psi), else Home Assistant
  flags the entity; `state_class` must be allowed for that class (DEVICE_CLASS_STATE_CLASSES:
  `measurement` for every class used here);
- `availability` is a list of `{topic, payload_available, payload_not_available}` with
  `availability_mode` all/any/latest; the `device` block needs at least one of `identifiers` or
  `connections`; `origin` needs a `name`; `unique_id` is any string.
Micro is the Greek small letter mu (U+03BC), as Home Assistant spells it since core PR #144853
(2025; its sensor platform converts the MICRO SIGN U+00B5, which it used before).
A unit we do not recognise is passed through as `unit_of_measurement` with no device class (Home
Assistant then shows the number with that unit and graphs it, which is all it can do with it).

Discovery topics are `<prefix>/sensor/<device>/<sensor>/config` (Home Assistant's
`<prefix>/<component>/<node_id>/<object_id>/config`, both ids `[a-zA-Z0-9_-]+`, which every iotpipe
id matches); an empty retained payload there removes the entity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MEASUREMENT = "measurement"


@dataclass(frozen=True, slots=True)
class Kind:
    """How Home Assistant should see one sensor: its device class (None: a plain number) and the
    unit spelled as Home Assistant spells it (None: no unit)."""

    device_class: str | None
    unit: str | None


# The pipeline's unit -> (Home Assistant device class, Home Assistant's unit). The units are the
# drivers' (sensor_reader.drivers): simulated, BME280, SHT31, PMS5003, MCP3008 channels.
_BY_UNIT: dict[str, Kind] = {
    "degC": Kind("temperature", "°C"),
    "°C": Kind("temperature", "°C"),
    "degF": Kind("temperature", "°F"),
    "°F": Kind("temperature", "°F"),
    "K": Kind("temperature", "K"),
    "%RH": Kind("humidity", "%"),
    "lx": Kind("illuminance", "lx"),
    **{unit: Kind("pressure", unit) for unit in ("Pa", "hPa", "kPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi")},
}
# Particulate matter: the unit alone does not say which size; the sensor's name does.
_PM = {"pm1": "pm1", "pm1_0": "pm1", "pm2_5": "pm25", "pm25": "pm25", "pm10": "pm10"}
MICROGRAMS_PER_CUBIC_METER = "\u03bcg/m\u00b3"  # Home Assistant's CONCENTRATION_MICROGRAMS_PER_CUBIC_METER
_MICROGRAMS = {"ug/m3", "\u00b5g/m\u00b3", MICROGRAMS_PER_CUBIC_METER}
_MOISTURE = ("moisture",)


def kind_of(sensor: str, unit: str) -> Kind:
    """The Home Assistant view of a sensor named `sensor` reporting in the pipeline unit `unit`."""
    if unit in _MICROGRAMS:
        return Kind(_PM.get(sensor.lower()), MICROGRAMS_PER_CUBIC_METER)
    if unit == "%":
        return Kind("moisture" if any(word in sensor.lower() for word in _MOISTURE) else None, "%")
    if unit in ("", "1"):  # dimensionless (the simulator's generic profile)
        return Kind(None, None)
    return _BY_UNIT.get(unit, Kind(None, unit))


def config_topic(prefix: str, device: str, sensor: str) -> str:
    return f"{prefix}/sensor/{device}/{sensor}/config"


def config_payload(
    *,
    base: str,
    device: str,
    sensor: str,
    unit: str,
    state_topic: str,
    device_availability: str,
    bridge_state: str,
) -> bytes:
    """The retained discovery config of one sensor (full key names: Home Assistant accepts them as
    well as its abbreviations). Available only while both the device and the exporter are."""
    kind = kind_of(sensor, unit)
    config: dict[str, Any] = {
        "name": sensor,
        # ':' is in no id, so these cannot collide between (base, device, sensor) triples.
        "unique_id": f"{base}:{device}:{sensor}",
        "state_topic": state_topic,
        # Subscript, not attribute: a sensor id may hold '-' or start with a digit.
        "value_template": f"{{{{ value_json['{sensor}'] }}}}",
        "state_class": MEASUREMENT,
        "availability": [
            {"topic": bridge_state, "payload_available": "online", "payload_not_available": "offline"},
            {"topic": device_availability, "payload_available": "online", "payload_not_available": "offline"},
        ],
        "availability_mode": "all",
        "qos": 1,
        "device": {
            "identifiers": [f"{base}:{device}"],
            "name": device,
            "manufacturer": "iotpipe",
            "model": "iotpipe device",
        },
        "origin": {"name": "iotpipe"},
    }
    if kind.device_class is not None:
        config["device_class"] = kind.device_class
    if kind.unit is not None:
        config["unit_of_measurement"] = kind.unit
    return orjson.dumps(config)
