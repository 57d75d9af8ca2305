"""Validate Home Assistant MQTT discovery messages with Home Assistant's own code.

Run by tests/test_consumers.py in the pinned Home Assistant environment (tests/ha/setup.sh), never
in the project's. stdin is JSON `{"prefix": <discovery prefix>, "messages": {<topic>: <config>},
"states": {<topic>: <payload>}}`; stdout is JSON `{"version": <HA version>, "results": {<topic>: {...}}}`
where each result holds what Home Assistant made of the message: the component and ids its discovery
topic matcher found (`topic`), the config after its MQTT sensor platform's discovery schema
(`config`, or the schema's `error`), the warnings its validators logged, its sensor tables for the
config's device class (`units`: DEVICE_CLASS_UNITS, `state_classes`: DEVICE_CLASS_STATE_CLASSES),
and the state its template engine renders from the payload on the config's state topic, as the MQTT
sensor does (`rendered`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from typing import Any


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def plain(value: Any) -> Any:
    """What the schema returns (Template objects, enums, sets), as JSON."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if hasattr(value, "template"):  # homeassistant.helpers.template.Template
        return value.template
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value) if isinstance(value, str) else value
    return str(value)


async def validate(request: dict[str, Any]) -> dict[str, Any]:
    from homeassistant.const import __version__
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers import frame

    with tempfile.TemporaryDirectory() as config_dir:
        hass = HomeAssistant(config_dir)  # templates are validated against a running instance
        frame.async_setup(hass)
        from homeassistant.components.mqtt.discovery import TOPIC_MATCHER
        from homeassistant.components.mqtt.sensor import DISCOVERY_SCHEMA
        from homeassistant.components.sensor.const import DEVICE_CLASS_STATE_CLASSES, DEVICE_CLASS_UNITS
        from homeassistant.helpers.template import Template

        collect = Collect()
        ha_log = logging.getLogger("homeassistant")
        ha_log.setLevel(logging.WARNING)  # the validators warn (a unit not valid for its class) rather than fail
        ha_log.addHandler(collect)
        prefix = request["prefix"]
        results = {}
        for topic, config in request["messages"].items():
            result: dict[str, Any] = {}
            match = TOPIC_MATCHER.match(topic.replace(f"{prefix}/", "", 1))
            result["topic"] = match.groupdict() if match else None
            collect.records.clear()
            try:
                result["config"] = plain(DISCOVERY_SCHEMA(config))
            except Exception as exc:  # voluptuous.Invalid and its kin: reported, not raised
                result["error"] = f"{type(exc).__name__}: {exc}"
            result["warnings"] = list(collect.records)
            device_class = config.get("device_class")
            if device_class is not None:
                units = DEVICE_CLASS_UNITS.get(device_class)
                result["units"] = None if units is None else sorted(str(u) for u in units if u is not None)
                state_classes = DEVICE_CLASS_STATE_CLASSES.get(device_class)
                result["state_classes"] = None if state_classes is None else sorted(str(s) for s in state_classes)
            payload = request["states"].get(config.get("state_topic"))
            if payload is not None and "value_template" in config:
                template = Template(config["value_template"], hass)
                result["rendered"] = template.async_render_with_possible_json_value(payload, None)
            results[topic] = result
        await hass.async_stop(force=True)
        return {"version": __version__, "results": results}


def main() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    request = json.load(sys.stdin)
    json.dump(asyncio.run(validate(request)), sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
