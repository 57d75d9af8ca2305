"""Byte-exact fakes of the sensor chips and their buses, with injectable faults.

No hardware exists in CI, so each fake speaks its chip's wire protocol (the MCP3008's bit framing,
the BME280 register map, SHT3x commands and CRCs, PMS5003 frames over a real pseudo-terminal); a
driver under test cannot tell it apart from the chip except by the faults a test injects.
"""

from .faults import FaultInjector, ProtocolViolationError

__all__ = ["FaultInjector", "ProtocolViolationError"]
