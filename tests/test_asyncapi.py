"""docs/asyncapi.yaml: generated (`iotpipe asyncapi`), valid for the maintained AsyncAPI parser
(@asyncapi/parser run by Node.js, tests/node), and true of a running stack: every topic the services
publish on either broker is one of its channels, with the retained flag it says."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from iotpipe._asyncapi import COMMAND, document, to_yaml
from iotpipe.devstack import mqtt_password_file
from servers import ROOT, TAP, Stack, free_port, pipeline_env, spawn, stop_all, wait_until
from test_e2e import DEVICES

DOC = ROOT / "docs/asyncapi.yaml"
NODE_TOOLS = ROOT / "tests/node"
VALIDATOR = NODE_TOOLS / "asyncapi-validate.js"
PARSER = NODE_TOOLS / "node_modules/@asyncapi/parser/package.json"


def validate(path: Path) -> list[dict[str, str]]:
    """The parser's diagnostics for `path`: [{severity, code, message, path}]."""
    node = shutil.which("node")
    if node is None or not PARSER.exists():
        pytest.fail("needs Node.js and the suite's Node tools (tests/node/node_modules): run `make test-deps`")
    done = subprocess.run(
        [node, str(VALIDATOR), str(path)], cwd=NODE_TOOLS, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"the validator failed to run: {done.stderr}"
    diagnostics: list[dict[str, str]] = json.loads(done.stdout)
    return diagnostics


def errors(diagnostics: list[dict[str, str]]) -> list[dict[str, str]]:
    return [d for d in diagnostics if d["severity"] == "error"]


def test_committed_document_is_what_the_generator_produces() -> None:
    """A model, topic or exporter change without regenerating fails here, saying how to regenerate."""
    assert DOC.read_text(encoding="utf-8") == to_yaml(document()), f"docs/asyncapi.yaml is out of date: run `{COMMAND}`"
    checked = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "asyncapi", "--check", str(DOC)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    # The hand-rolled YAML says exactly what the generator built (read by a real YAML parser).
    assert yaml.safe_load(DOC.read_text(encoding="utf-8")) == document()


def test_document_is_valid_asyncapi_3() -> None:
    diagnostics = validate(DOC)
    for d in diagnostics:
        if d["severity"] != "error":
            print(f"{d['severity']}: {d['code']} at {d['path']}: {d['message']}")  # shown with -s or on failure
    assert not errors(diagnostics), errors(diagnostics)
    doc = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    assert doc["asyncapi"] == "3.0.0"
    # Nested counters are part of the status contract: an unlabelled number or by label value.
    counters = doc["components"]["schemas"]["ServiceStatus"]["properties"]["counters"]
    by_name = counters["anyOf"][0]["additionalProperties"]["anyOf"]
    assert [s["type"] for s in by_name] == ["number", "object"]
    # Every operation says its QoS and retained flag, as its channel's messages are.
    for name, operation in doc["operations"].items():
        assert set(operation["bindings"]["mqtt"]) >= {"qos", "retain"}, name


def test_validator_reports_a_broken_document(tmp_path: Path) -> None:
    """The control: a channel naming a message that does not exist is an error the test sees."""
    doc = document()
    del doc["components"]["messages"]["rawBatch"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(to_yaml(doc), encoding="utf-8")
    found = errors(validate(broken))
    assert found and any("rawBatch" in d["message"] for d in found), found


# -- the document against a running stack ---------------------------------------------------------
def channel_patterns(doc: dict[str, Any], base: str, prefix: str) -> dict[str, re.Pattern[str]]:
    """Each channel's address as a regex: `{base}` and `{prefix}` this test's, other parameters any id."""
    known = {"base": base, "prefix": prefix}

    def level(match: re.Match[str]) -> str:
        name = match.group(1)
        return re.escape(known[name]) if name in known else "[A-Za-z0-9_-]{1,64}"

    return {
        name: re.compile(re.sub(r"\\\{([a-z]+)\\\}", level, re.escape(channel["address"])))
        for name, channel in doc["channels"].items()
    }


class Sub:
    """mosquitto_sub (a real third-party client) logged in as `user`: every message's retained flag,
    payload length and topic, as they arrive."""

    def __init__(self, stack: Stack, port: int, user: str, *filters: str) -> None:
        password = mqtt_password_file(stack.secrets_dir, user).read_text().strip()
        argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", password]
        argv += ["-i", f"{user}-{uuid.uuid4().hex[:8]}", "-q", "1", "-F", "%r %t %p"]
        for topic_filter in filters:
            argv += ["-t", topic_filter]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.messages: list[tuple[bool, str, str]] = []  # (retained, topic, payload)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            retained, topic, payload = [*line.rstrip("\n").split(" ", 2), ""][:3]
            self.messages.append((retained == "1", topic, payload))

    def topics(self) -> set[str]:
        return {topic for _, topic, _ in list(self.messages)}

    def latest(self, topic: str) -> str | None:
        payloads = [payload for _, t, payload in list(self.messages) if t == topic]
        return payloads[-1] if payloads else None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def seen(sub: Sub, patterns: dict[str, re.Pattern[str]]) -> set[str]:
    """The channels `sub` has had a message on."""
    return {name for topic in sub.topics() for name, p in patterns.items() if p.fullmatch(topic)}


# Channels a short run must show (so the check below cannot pass by seeing nothing). Not seen in a
# short run: the drain marker (a shared-subscription member leaving while it has peers).
PIPELINE_EXPECTED = {"raw", "processed", "health", "alerts", "serviceStatus", "deviceStatus"}
PUBLIC_EXPECTED = {
    "alerts",
    "serviceStatus",
    "deviceStatus",
    "deviceState",
    "deviceUnits",
    "deviceSensor",
    "deviceAvailability",
    "deviceAlert",
    "exporterState",
    "haDiscovery",
}
SERVICES = ("cloud_sink", "sensor_reader", "preprocessor", "cache_writer", "cloud_forwarder", "monitor", "exporter")


@pytest.mark.e2e
@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto_sub (make deps)")
async def test_every_topic_a_running_stack_publishes_is_in_the_document(
    stack: Stack, base: str, tmp_path: Path
) -> None:
    doc = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    prefix = f"{base}ha"  # the brokers outlive this test: its own discovery prefix, like its own base
    patterns = channel_patterns(doc, base, prefix)
    retained = {name for name, op in doc["operations"].items() if op["bindings"]["mqtt"]["retain"]}
    retained_channels = {doc["operations"][name]["channel"]["$ref"].rsplit("/", 1)[1] for name in retained}
    sink_port = free_port()
    env = pipeline_env(
        stack, base, tmp_path, "api", DEVICES, sink_port, IOTPIPE_HA_DISCOVERY="true", IOTPIPE_HA_PREFIX=prefix
    )
    pipeline = Sub(stack, stack.ports.mqtt, TAP, f"{base}/#")
    public = Sub(stack, stack.ports.public, "reader", f"{base}/#", f"{prefix}/#")
    subs = [pipeline, public]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            procs += [spawn(service, env, tmp_path) for service in SERVICES]
            await wait_until(lambda: seen(pipeline, patterns) >= PIPELINE_EXPECTED, 120, "every pipeline channel")
            await wait_until(lambda: seen(public, patterns) >= PUBLIC_EXPECTED, 60, "every public channel")

            # Retained: a new subscriber gets, flagged retained, the latest message of every topic the
            # document calls retained (of those seen so far, unless that latest message was a clear).
            def expected_retained(sub: Sub) -> set[str]:
                latest = {topic: payload for _, topic, payload in list(sub.messages)}
                return {
                    topic
                    for topic, payload in latest.items()
                    if payload and any(patterns[c].fullmatch(topic) for c in retained_channels)
                }

            def flagged(sub: Sub) -> set[str]:
                return {topic for is_retained, topic, _ in list(sub.messages) if is_retained}

            want = {"pipeline": expected_retained(pipeline), "public": expected_retained(public)}
            subs += [
                Sub(stack, stack.ports.mqtt, TAP, f"{base}/#"),
                Sub(stack, stack.ports.public, "reader", f"{base}/#", f"{prefix}/#"),
            ]
            await wait_until(
                lambda: flagged(subs[2]) >= want["pipeline"] and flagged(subs[3]) >= want["public"],
                30,
                "the retained copy of every topic the document calls retained",
            )
        finally:
            stop_all(procs)
        # After a clean stop too (offline statuses, the exporter's `offline`, cleared topics).
        exporter_state = doc["channels"]["exporterState"]["address"].replace("{base}", base)
        await wait_until(lambda: public.latest(exporter_state) == "offline", 15, "the exporter's `offline` on stopping")
    finally:
        for sub in subs:
            sub.close()

    unknown = sorted({t for sub in subs for t in sub.topics() if not any(p.fullmatch(t) for p in patterns.values())})
    assert not unknown, f"topics published but not in docs/asyncapi.yaml: {unknown}"
    wrongly_retained = sorted(
        {
            t
            for sub in subs
            for is_retained, t, _ in sub.messages
            if is_retained and not any(patterns[c].fullmatch(t) for c in retained_channels)
        }
    )
    assert not wrongly_retained, f"retained, but not retained in docs/asyncapi.yaml: {wrongly_retained}"
    print(f"checked {len(pipeline.topics())} pipeline and {len(public.topics())} public topics")


# -- the document against the brokers' ACLs -------------------------------------------------------
def acl_grants(path: Path) -> dict[str, list[tuple[str, str]]]:
    """user -> [(access, topic pattern)] of a mosquitto ACL file (`user` and `topic` lines)."""
    grants: dict[str, list[tuple[str, str]]] = {}
    user = ""
    for line in path.read_text().splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            user = words[1]
            grants.setdefault(user, [])
        elif words[:1] == ["topic"]:
            access, pattern = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            grants[user].append((access, pattern))
    return grants


def matches(pattern: str, topic: str) -> bool:
    """MQTT topic-filter matching (`+` one level, `#` the rest)."""
    levels, wanted = pattern.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(wanted) or (level != "+" and level != wanted[i]):
            return False
    return len(levels) == len(wanted)


def test_every_operation_is_one_the_broker_acls_allow() -> None:
    """Who publishes and who receives what, as the document says, is what mosquitto/acl (pipeline)
    and mosquitto/public-acl (public) grant that user: `send` needs write, `receive` read."""
    doc = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    acls = {"pipeline": acl_grants(ROOT / "mosquitto/acl"), "public": acl_grants(ROOT / "mosquitto/public-acl")}
    refused = []
    for name, op in doc["operations"].items():
        (user,) = (tag["name"] for tag in op["tags"])
        channel = doc["channels"][op["channel"]["$ref"].rsplit("/", 1)[1]]
        # A sample topic: a service's own status is its own (`{service}` = the user).
        sample = {"base": "iotpipe", "prefix": "homeassistant", "service": user}
        topic = channel["address"].format_map(collections.defaultdict(lambda: "x1", sample))
        brokers = {ref["$ref"].rsplit("/", 1)[1].removesuffix("Tls").removesuffix("Mtls") for ref in channel["servers"]}
        # Third parties are on the public broker; the exporter publishes its projection there.
        broker = "public" if user == "reader" or brokers == {"public"} else "pipeline"
        need = "write" if op["action"] == "send" else "read"
        grants = acls[broker].get(user, [])
        if not any(access in (need, "readwrite") and matches(p, topic) for access, p in grants):
            refused.append(f"{name}: {user} may not {need} {topic} on the {broker} broker")
    assert not refused, refused
    assert {op["tags"][0]["name"] for op in doc["operations"].values()} >= {"reader", "exporter", "sensor-reader"}
