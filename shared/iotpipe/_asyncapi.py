"""docs/asyncapi.yaml, generated: the AsyncAPI 3.0 document of every topic both brokers carry.

`iotpipe asyncapi > docs/asyncapi.yaml` writes it; tests/test_asyncapi.py proves the committed file is
what this produces (so a model or topic change without regenerating fails), that the AsyncAPI
parser accepts it, and that every topic a running stack publishes is one of its channels.

Generated from, never restated: payload schemas from the msgspec models (iotpipe._models), topic
addresses from iotpipe._topics.Topics (and, for Home Assistant discovery, the exporter's own
`ha.config_topic` and `ha.config_payload`), the envelope from iotpipe._envelope's constants. What
this module states itself is what no code holds as data: which user publishes or receives each
channel, retained or not, and the servers (mosquitto/*.conf, docker-compose.yml).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ._envelope import ALGORITHM, ENVELOPE_VERSION
from ._models import (
    MAX_INT,
    Alert,
    DeviceStatus,
    HealthReport,
    Id,
    Processed,
    RawBatch,
    ServiceStatus,
    Unit,
)
from ._share import MARKER_SUFFIX
from ._topics import ID_PATTERN, VERSION, Topics

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
COMMAND = "iotpipe asyncapi > docs/asyncapi.yaml"
# Every publish of the pipeline (iotpipe._mqtt) and of the exporter is QoS 1, every subscription too.
QOS = 1
SCHEMAS = "#/components/schemas/{name}"

# -- addresses: Topics' own methods, with placeholder ids turned into AsyncAPI parameters ---------
# A placeholder is a valid id (Topics validates every level) that no real topic level is.
_HOLE = "Zq"
_HOLES = re.compile(rf"{_HOLE}([a-z]+)")


def _address(build: Callable[[Topics], str]) -> str:
    """`build`'s topic with `{base}`, `{device}`... where the placeholders went."""
    return _HOLES.sub(r"{\1}", build(Topics(f"{_HOLE}base")))


def _h(name: str) -> str:
    return f"{_HOLE}{name}"


PARAMETERS: dict[str, str] = {
    "base": "The topic base (IOTPIPE_BASE_TOPIC, default `iotpipe`).",
    "source": "The publishing instance (the sensor-reader's or the preprocessor's IOTPIPE_INSTANCE).",
    "device": "A device id.",
    "sensor": "A sensor id of the device.",
    "service": "A service name (sensor-reader, preprocessor, cache-writer, cloud-forwarder, monitor, exporter).",
    "instance": "The service instance (IOTPIPE_INSTANCE).",
    "prefix": "Home Assistant's discovery prefix (IOTPIPE_HA_PREFIX, default `homeassistant`).",
}


# -- servers --------------------------------------------------------------------------------------
PIPELINE = ("pipeline", "pipelineTls", "pipelineMtls")
PUBLIC = ("public", "publicTls")


def _servers() -> dict[str, Any]:
    def server(host: str, protocol: str, security: str, description: str) -> dict[str, Any]:
        return {
            "host": host,
            "protocol": protocol,
            "protocolVersion": "5",
            "description": description,
            "security": [{"$ref": f"#/components/securitySchemes/{security}"}],
        }

    pipeline = (
        "The pipeline broker (mosquitto/mosquitto.conf, ACL mosquitto/acl): one user per service, each "
        "with its own password; the client id must be `<user>-<id>`. Every data payload here is sealed."
    )
    public = (
        "The public broker (mosquitto/public.conf, ACL mosquitto/public-acl): third parties log in as "
        "`reader` (read-only). It gets service and device status and the sealed alerts through a "
        "bridge from the pipeline broker, and the exporter's plaintext projection."
    )
    return {
        "pipeline": server("mosquitto:1883", "mqtt", "userPassword", f"{pipeline} Plain MQTT."),
        "pipelineTls": server("mosquitto:8883", "secure-mqtt", "userPassword", f"{pipeline} TLS 1.2+."),
        "pipelineMtls": server(
            "mosquitto:8884",
            "secure-mqtt",
            "clientCertificate",
            f"{pipeline} TLS 1.2+ with a client certificate from the deployment's CA, and the password too.",
        ),
        "public": server("mosquitto-public:1883", "mqtt", "userPassword", f"{public} Plain MQTT."),
        "publicTls": server("mosquitto-public:8883", "secure-mqtt", "userPassword", f"{public} TLS 1.2+."),
    }


SECURITY_SCHEMES = {
    "userPassword": {
        "type": "userPassword",
        "description": "MQTT username and password: a service's own user on the pipeline broker, `reader` "
        "(or a user added like it) on the public broker.",
    },
    "clientCertificate": {
        "type": "X509",
        "description": "A client certificate from the deployment's CA naming the user (mTLS listener), "
        "in addition to the user's password.",
    },
}


# -- payloads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """One kind of payload on a channel."""

    name: str
    title: str
    summary: str
    payload: Any  # a type msgspec can describe, or a JSON Schema (dict) as is
    sealed: bool = False
    content_type: str = "application/json"
    example: Any = None


@dataclass(frozen=True)
class Channel:
    name: str
    address: str
    description: str
    messages: tuple[Message, ...]
    servers: tuple[str, ...]
    retain: bool
    send: tuple[str, ...]  # users that publish it
    receive: tuple[str, ...]  # users that subscribe to it (`reader`: a third party, public broker)
    extra: dict[str, Any] = field(default_factory=dict)


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


AVAILABILITY = _enum("online", "offline")
DRAIN_NONCE = {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "a random nonce"}
# The projection's payloads (services/exporter): the exporter writes them with orjson from these shapes.
ProjectedState = dict[Id, float]
ProjectedUnits = dict[Id, Unit]

_STATUS_EXAMPLE = {
    "state": "online",
    "client_id": "preprocessor-a",
    "ts": 1764460800000,
    "service": "preprocessor",
    "instance": "a",
    "boot_ts": 1764460000000,
    "counters": {
        "received": {"sealed": 60},
        "published": {"processed": 60, "status": 2},
        "rejected": {"window_future": 1},
        "windows": 60,
    },
}


def _ha_discovery() -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Home Assistant discovery: its topic (the exporter's `ha.config_topic`) and the JSON Schema of
    its config, inferred from what `ha.config_payload` writes for a sensor Home Assistant knows (it
    has a device class and unit) and one it does not (neither): keys both have are required."""
    from exporter import ha  # the exporter's own code: the one definition of discovery

    base = Topics(_h("base"))
    address = _HOLES.sub(r"{\1}", ha.config_topic(_h("prefix"), _h("device"), _h("sensor")))
    payloads = [
        json.loads(
            ha.config_payload(
                base="{base}",
                device="{device}",
                sensor=sensor,
                unit=unit,
                state_topic=_HOLES.sub(r"{\1}", base.device(_h("device"), "state")),
                device_availability=_HOLES.sub(r"{\1}", base.device(_h("device"), "availability")),
                bridge_state=_HOLES.sub(r"{\1}", base.exporter_state),
            )
        )
        for sensor, unit in (("temperature", "degC"), ("level", ""))
    ]
    return address, _schema_of(payloads), payloads


def _schema_of(examples: list[Any]) -> dict[str, Any]:
    """A JSON Schema every one of `examples` satisfies: types, and the object keys all of them have."""
    first = examples[0]
    if all(isinstance(e, dict) for e in examples):
        keys = sorted({k for e in examples for k in e})
        return {
            "type": "object",
            "properties": {k: _schema_of([e[k] for e in examples if k in e]) for k in keys},
            "required": [k for k in keys if all(k in e for e in examples)],
        }
    if all(isinstance(e, list) for e in examples):
        return {"type": "array", "items": _schema_of([i for e in examples for i in e] or [""])}
    kinds = {"boolean" if isinstance(e, bool) else type(e).__name__ for e in examples}
    names = {"str": "string", "int": "integer", "float": "number", "boolean": "boolean"}
    if len(kinds) == 1 and (kind := kinds.pop()) in names:
        return {"type": names[kind]}
    raise TypeError(f"cannot describe {first!r:.40}")


def channels() -> list[Channel]:
    """Every topic of both brokers, as Channels."""
    services = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor", "exporter")
    sealed_note = "Sealed: only a holder of the key ring can read it."
    ha_address, ha_schema, ha_examples = _ha_discovery()
    return [
        Channel(
            "raw",
            _address(lambda b: b.raw(_h("source"))),
            f"Raw windows, whole, of one or many devices, as a sensor-reader instance closed them. {sealed_note}",
            (Message("rawBatch", "Raw windows", "A RawBatch, sealed.", RawBatch, sealed=True),),
            PIPELINE,
            retain=False,
            send=("sensor-reader",),
            receive=("preprocessor",),
        ),
        Channel(
            "processed",
            _address(lambda b: b.processed(_h("source"))),
            f"Processed windows (median filter and aggregates) of one or many devices. {sealed_note}",
            (Message("processed", "Processed windows", "A Processed batch, sealed.", Processed, sealed=True),),
            PIPELINE,
            retain=False,
            send=("preprocessor",),
            receive=("cache-writer", "cloud-forwarder", "monitor", "exporter"),
        ),
        Channel(
            "health",
            _address(lambda b: b.health(_h("source"))),
            "A sensor-reader instance's report on its devices' polling (starting, online, fault), "
            f"each entry holding `valid_for` ms. Sent with an MQTT v5 message expiry. {sealed_note}",
            (Message("healthReport", "Device health report", "A HealthReport, sealed.", HealthReport, sealed=True),),
            PIPELINE,
            retain=False,
            send=("sensor-reader",),
            receive=("monitor",),
        ),
        Channel(
            "alerts",
            _address(lambda b: b.alerts(_h("device"))),
            "Alerts about one device: anomaly, offline, fault (monitor), flood (preprocessor). "
            f"{sealed_note} Bridged to the public broker as is (still sealed); their plaintext "
            "projection is the `deviceAlert` channel.",
            (Message("alert", "Alert", "An alert, sealed (tagged by `kind`).", Alert, sealed=True),),
            PIPELINE + PUBLIC,
            retain=False,
            send=("monitor", "preprocessor"),
            receive=("cloud-forwarder", "exporter", "reader"),
        ),
        Channel(
            "serviceStatus",
            _address(lambda b: b.service_status(_h("service"), _h("instance"))),
            "Birth, heartbeat (every IOTPIPE_STATUS_INTERVAL s) and Last Will of one service instance, "
            "plain JSON, with its counters nested by name and label value. An empty retained payload "
            "clears it (a shared-subscription member that handed its share over). Shown, never acted "
            "on: whoever holds a service's password can write its status. Bridged to the public broker.",
            (Message("serviceStatus", "Service status", "Plain JSON.", ServiceStatus, example=_STATUS_EXAMPLE),),
            PIPELINE + PUBLIC,
            retain=True,
            send=services,
            receive=(*services, "reader"),  # a shared-subscription member reads its peers' (iotpipe._share)
        ),
        Channel(
            "serviceDrainMarker",
            _address(lambda b: f"{b.service_status(_h('service'), _h('instance'))}/{MARKER_SUFFIX}"),
            "A member of a shared subscription leaving publishes a nonce here, to itself, to learn that "
            "the broker has handed it everything queued for it (iotpipe._share). No one else reads it.",
            (Message("drainMarker", "Drain marker", "A random nonce.", DRAIN_NONCE, content_type="text/plain"),),
            PIPELINE,
            retain=False,
            send=services,
            receive=services,
        ),
        Channel(
            "deviceStatus",
            _address(lambda b: b.device_status(_h("device"))),
            "One device's state as the monitor sees it (online, offline, fault), plain JSON. "
            "Bridged to the public broker.",
            (Message("deviceStatus", "Device status", "Plain JSON.", DeviceStatus),),
            PIPELINE + PUBLIC,
            retain=True,
            send=("monitor",),
            receive=("reader",),
        ),
        Channel(
            "deviceState",
            _address(lambda b: b.device(_h("device"), "state")),
            "The device's latest window means, one key per sensor, and `ts` (the latest window end, "
            "unix ms), at most once per IOTPIPE_STATE_INTERVAL. Plaintext. An empty retained payload: "
            "the device is gone (also on its other projection topics).",
            (
                Message(
                    "deviceState",
                    "Device state",
                    "Flat JSON of numbers.",
                    ProjectedState,
                    example={"temperature": 21.3, "humidity": 48.1, "ts": 1764460800000},
                ),
            ),
            PUBLIC,
            retain=True,
            send=("exporter",),
            receive=("reader",),
        ),
        Channel(
            "deviceUnits",
            _address(lambda b: b.device(_h("device"), "units")),
            "The unit of each sensor of the device in its state. Plaintext.",
            (Message("deviceUnits", "Device units", "Flat JSON of strings.", ProjectedUnits),),
            PUBLIC,
            retain=True,
            send=("exporter",),
            receive=("reader",),
        ),
        Channel(
            "deviceSensor",
            _address(lambda b: b.device_sensor(_h("device"), _h("sensor"))),
            "One sensor's latest window mean, a bare JSON number, for simple clients. Plaintext.",
            (Message("sensorValue", "Sensor value", "A bare number.", float),),
            PUBLIC,
            retain=True,
            send=("exporter",),
            receive=("reader",),
        ),
        Channel(
            "deviceAvailability",
            _address(lambda b: b.device(_h("device"), "availability")),
            "`online` while the device sends windows, `offline` once silent for IOTPIPE_OFFLINE_AFTER.",
            (
                Message(
                    "availability", "Availability", "`online` or `offline`.", AVAILABILITY, content_type="text/plain"
                ),
            ),
            PUBLIC,
            retain=True,
            send=("exporter",),
            receive=("reader",),
        ),
        Channel(
            "deviceAlert",
            _address(lambda b: b.device(_h("device"), "alert")),
            "The device's alerts, opened: plain JSON, the same shape as the sealed alert's content.",
            (Message("projectedAlert", "Alert (plaintext)", "Plain JSON (tagged by `kind`).", Alert),),
            PUBLIC,
            retain=False,
            send=("exporter",),
            receive=("reader",),
        ),
        Channel(
            "exporterState",
            _address(lambda b: b.exporter_state),
            "The exporter's own `online`/`offline` (its Last Will), as Zigbee2MQTT's bridge/state.",
            (
                Message(
                    "exporterState", "Exporter state", "`online` or `offline`.", AVAILABILITY, content_type="text/plain"
                ),
            ),
            PUBLIC,
            retain=True,
            send=("exporter",),
            receive=("reader",),
        ),
        Channel(
            "haDiscovery",
            ha_address,
            "Home Assistant MQTT discovery, one sensor entity per device and sensor (opt-in: "
            "IOTPIPE_HA_DISCOVERY). An empty retained payload removes the entity.",
            (
                Message(
                    "haSensorConfig", "Home Assistant sensor config", "Plain JSON.", ha_schema, example=ha_examples[0]
                ),
            ),
            PUBLIC,
            retain=True,
            send=("exporter",),
            receive=("reader",),
        ),
    ]


def _sealed(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The wire form of a sealed payload: the envelope, whose `ct` is a Fernet token of the JSON
    object {topic, src, boot, seq, ts, data} with `data` the model (iotpipe._envelope)."""
    return {
        "type": "object",
        "description": f"Sealed envelope v{ENVELOPE_VERSION}. The payload on the wire is this JSON object; "
        "`ct` is a Fernet token whose plaintext is the JSON object in `x-plaintext`, with `data` the "
        f"{name}.",
        "properties": {
            "v": {"const": ENVELOPE_VERSION, "description": "envelope version"},
            "alg": {"const": ALGORITHM},
            "kid": {"type": "string", "pattern": ID_PATTERN.pattern, "description": "the sealing key's id"},
            "ct": {
                "type": "string",
                "description": "Fernet token (url-safe base64); plaintext: `x-plaintext`",
                "x-plaintext": {
                    "type": "object",
                    "description": "Checked on receipt: `topic` is the arrival topic; (`src`, `boot`, `seq`) "
                    "is new (replays are dropped).",
                    "properties": {
                        "topic": {"type": "string"},
                        "src": {"type": "string", "description": "<service>/<instance> of the sender"},
                        "boot": {"type": "string", "description": "the sender's process start id"},
                        "seq": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                        "ts": {"type": "integer", "minimum": 0, "maximum": MAX_INT, "description": "unix ms"},
                        "data": data,
                    },
                    "required": ["topic", "src", "boot", "seq", "ts", "data"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["v", "alg", "kid", "ct"],
        "additionalProperties": False,
    }


def _asyncapi_schema(schema: Any) -> Any:
    """msgspec's JSON Schema as AsyncAPI's schema format reads it: its `discriminator` is the
    property's name (OpenAPI's is an object with a mapping)."""
    if isinstance(schema, dict):
        out = {k: _asyncapi_schema(v) for k, v in schema.items()}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = out["discriminator"]["propertyName"]
        return out
    if isinstance(schema, list):
        return [_asyncapi_schema(v) for v in schema]
    return schema


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document, as plain JSON values (key order is the output's order)."""
    chans = channels()
    messages = {m.name: m for c in chans for m in c.messages}
    typed = {name: m.payload for name, m in messages.items() if not isinstance(m.payload, dict)}
    refs, components = msgspec.json.schema_components(typed.values(), ref_template=SCHEMAS)
    schema_of = dict(zip(typed, refs, strict=True))
    schemas: dict[str, Any] = {k: _asyncapi_schema(v) for k, v in sorted(components.items())}

    out_messages: dict[str, Any] = {}
    for name, m in messages.items():
        payload = m.payload if isinstance(m.payload, dict) else _asyncapi_schema(schema_of[name])
        if m.sealed:
            payload = _sealed(payload, m.title.lower())
        body: dict[str, Any] = {
            "name": name,
            "title": m.title,
            "summary": m.summary,
            "contentType": m.content_type,
            "payload": payload,
        }
        if m.example is not None:
            body["examples"] = [{"payload": m.example}]
        out_messages[name] = body

    out_channels: dict[str, Any] = {}
    for c in chans:
        params = re.findall(r"\{([a-z]+)\}", c.address)
        out_channels[c.name] = {
            "address": c.address,
            "description": c.description + (" Retained." if c.retain else " Not retained."),
            "servers": [{"$ref": f"#/servers/{s}"} for s in c.servers],
            "parameters": {p: {"$ref": f"#/components/parameters/{p}"} for p in params},
            "messages": {m.name: {"$ref": f"#/components/messages/{m.name}"} for m in c.messages},
        }

    operations: dict[str, Any] = {}
    for c in chans:
        for action, users in (("send", c.send), ("receive", c.receive)):
            for user in users:
                operations[f"{_camel(user)}{action.title()}{c.name[0].upper()}{c.name[1:]}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{c.name}"},
                    "summary": f"{user} {'publishes' if action == 'send' else 'subscribes'} ({c.address})",
                    "tags": [{"name": user}],
                    "messages": [{"$ref": f"#/channels/{c.name}/messages/{m.name}"} for m in c.messages],
                    "bindings": {"mqtt": {"qos": QOS, "retain": c.retain, "bindingVersion": MQTT_BINDING_VERSION}},
                }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "iotpipe",
            "version": VERSION,
            "description": "Every topic of iotpipe's two MQTT brokers (docs/contract.md). Generated by "
            f"`{COMMAND}` from the typed models and topic definitions: do not edit by hand. "
            "Operations are tagged with the broker user that performs them; `reader` is the public "
            "broker's read-only third party. Every publish and subscription is QoS 1.",
        },
        "defaultContentType": "application/json",
        "servers": _servers(),
        "channels": out_channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": out_messages,
            "parameters": {
                name: {"description": f"{text} Matches `{ID_PATTERN.pattern}`."} for name, text in PARAMETERS.items()
            },
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _camel(user: str) -> str:
    head, *rest = user.split("-")
    return head + "".join(part.title() for part in rest)


# -- YAML out ------------------------------------------------------------------------------------
# A small emitter rather than a YAML library (the core library does not depend on one): block
# style, strings double-quoted the JSON way (valid YAML), keys plain where YAML reads them so.
_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS else json.dumps(key, ensure_ascii=False)


def _scalar(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _lines(value: Any, indent: int) -> Iterable[str]:
    pad = " " * indent
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                yield f"{pad}{_key(k)}:"
                yield from _lines(v, indent + 2)
            else:
                yield f"{pad}{_key(k)}: {_scalar(v)}"
    else:
        for item in value:
            if isinstance(item, dict | list) and item:
                first, *rest = _lines(item, indent + 2)
                yield f"{pad}- {first.lstrip()}"
                yield from rest
            else:
                yield f"{pad}- {_scalar(item)}"


def to_yaml(doc: dict[str, Any]) -> str:
    header = f"# Generated by `{COMMAND}` (iotpipe._asyncapi): do not edit.\n"
    return header + "\n".join(_lines(doc, 0)) + "\n"
