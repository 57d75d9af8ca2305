"""README and docs name only settings the code has, and every service setting is documented."""

from __future__ import annotations

import re

from cache_writer.service import Settings as CacheWriterSettings
from cloud_forwarder.service import Settings as ForwarderSettings
from cloud_sink.app import Settings as SinkSettings
from exporter.service import Settings as ExporterSettings
from monitor.service import Settings as MonitorSettings
from preprocessor.service import Settings as PreprocessorSettings
from pydantic import BaseModel
from sensor_reader.service import Settings as ReaderSettings
from servers import ROOT

SERVICE_SETTINGS = (
    ReaderSettings,
    PreprocessorSettings,
    CacheWriterSettings,
    ForwarderSettings,
    MonitorSettings,
    ExporterSettings,
)
STACK_VARIABLES = {f"IOTPIPE_STACK_{p}_PORT" for p in ("MQTT", "MQTT_TLS", "REDIS", "SINK", "METRICS")} | {
    "IOTPIPE_NO_INSTALL"
}
LOCAL_STACK_ONLY = {"IOTPIPE_BROKER_CONFIG", "IOTPIPE_REDIS_CONFIG"}  # read by the Procfile, not by Python
TESTS_ONLY = {"IOTPIPE_FUZZ_EXAMPLES"}  # read by tests/test_fuzz_*.py
# Read by the `iotpipe` CLI: `secrets --no-create`, and the image's own service for `health`.
CLI_VARIABLES = {"IOTPIPE_SECRETS_CREATE", "IOTPIPE_SERVICE_MODULE"}


def env_names(model: type[BaseModel], prefix: str) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def known() -> set[str]:
    names = set(STACK_VARIABLES) | LOCAL_STACK_ONLY | TESTS_ONLY | CLI_VARIABLES
    for settings in SERVICE_SETTINGS:
        names |= env_names(settings, "IOTPIPE_")
    names |= env_names(SinkSettings, "IOTPIPE_SINK_")
    return names


def test_documented_variables_exist() -> None:
    names = known()
    for doc in ("README.md", "docs/contract.md", "docs/operations.md", "docker-compose.yml"):
        text = (ROOT / doc).read_text()
        mentioned = set(re.findall(r"\bIOTPIPE_[A-Z0-9_]*[A-Z0-9]", text))
        assert mentioned - names == set(), doc


def test_every_service_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for settings in SERVICE_SETTINGS:
        for name in env_names(settings, "IOTPIPE_"):
            group, _, leaf = name.partition("__")
            if name not in readme and not (leaf and group in readme and f"`__{leaf}`" in readme):
                missing.append(name)
    assert sorted(set(missing)) == []
