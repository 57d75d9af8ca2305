"""Topic names and id validation (the contract in docs/contract.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import ConfigError

# Ids end up inside topic levels, Redis keys and ACL patterns (%u/%c are substituted verbatim),
# so anything that could be a wildcard, separator or control character is refused at config time.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# v2: raw and processed messages carry many devices' windows and their topic's last level names the
# publishing instance (v1: one device per message, the device in the topic).
VERSION = "v2"


def validate_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ConfigError(f"invalid {what} {value!r:.80}: must match {ID_PATTERN.pattern}")
    return value


@dataclass(frozen=True)
class Topics:
    """Builds every topic from one base (a single topic level, default `iotpipe`)."""

    base: str = "iotpipe"

    def __post_init__(self) -> None:
        validate_id(self.base, "topic base")

    @property
    def root(self) -> str:
        return f"{self.base}/{VERSION}"

    def raw(self, source: str) -> str:
        """Raw windows published by `source` (the sensor-reader instance)."""
        return f"{self.root}/raw/{validate_id(source, 'source')}"

    def processed(self, source: str) -> str:
        """Processed windows published by `source` (the preprocessor instance)."""
        return f"{self.root}/processed/{validate_id(source, 'source')}"

    def health(self, source: str) -> str:
        """Sealed device health reported by `source` (the sensor-reader instance)."""
        return f"{self.root}/health/{validate_id(source, 'source')}"

    def alerts(self, device: str) -> str:
        return f"{self.root}/alerts/{validate_id(device, 'device id')}"

    def service_status(self, service: str, instance: str) -> str:
        return f"{self.root}/status/service/{validate_id(service, 'service')}/{validate_id(instance, 'instance')}"

    def device_status(self, device: str) -> str:
        return f"{self.root}/status/device/{validate_id(device, 'device id')}"

    # The plaintext projection (the exporter, on the public broker only; docs/contract.md).
    def device(self, device: str, leaf: str) -> str:
        """`leaf` (state, units, availability, alert) of `device`'s projection."""
        return f"{self.root}/devices/{validate_id(device, 'device id')}/{leaf}"

    def device_sensor(self, device: str, sensor: str) -> str:
        """One sensor's latest value, a bare number, in `device`'s projection."""
        return f"{self.root}/devices/{validate_id(device, 'device id')}/sensor/{validate_id(sensor, 'sensor id')}"

    @property
    def exporter_state(self) -> str:
        """The exporter's own `online`/`offline` (its Last Will), as Zigbee2MQTT's bridge/state."""
        return f"{self.root}/exporter/state"

    def all(self, kind: str) -> str:
        """Filter for every topic of one kind: raw, processed, health (every source), alerts (every device)."""
        return f"{self.root}/{kind}/+"

    @staticmethod
    def device_of(topic: str) -> str:
        return topic.rsplit("/", 1)[-1]
