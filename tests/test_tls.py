"""Services reach the broker over TLS and verify it: the certificate must chain to the configured CA
and name the host dialled. A client that skipped either check (CERT_NONE, check_hostname=False)
would connect to an impostor; these tests see it connect and fail.

The broker's own log is the witness that a refused connection never became an MQTT session: a
client that gave up in the handshake never appears there as `... as <client id>`."""

from __future__ import annotations

import asyncio
import datetime
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from iotpipe import Bus, KeyRing, MqttSettings, Opened, PlainMessage, RetryableError, Topics, check_health
from iotpipe.devstack import Ports, ensure_secrets, mqtt_password_file, render_broker_config
from servers import ROOT, TAP, Server, Stack, bus_for, free_port, service_env, spawn, stop_all, wait_until

HANDSHAKE_FAILED = "OpenSSL Error"  # what mosquitto logs when a client aborts the TLS handshake


# paho (2.2) does not close the socket of a failed TLS handshake; the garbage collector does, with a
# ResourceWarning. Only that warning is tolerated, only in the tests whose handshakes fail.
def paho_leaks_failed_tls_sockets(test: Callable[..., Any]) -> Callable[..., Any]:
    test = pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")(test)
    return pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
    )(test)


def tls_bus(
    stack_or_ports: Stack | Ports, secrets_dir: Path, host: str, ca_file: Path, user: str = "monitor", **kw: Any
) -> Bus:
    ports = stack_or_ports.ports if isinstance(stack_or_ports, Stack) else stack_or_ports
    settings = MqttSettings(
        host=host, port=ports.mqtt_tls, tls=True, ca_file=ca_file, session_expiry=0, connect_timeout=15
    )
    return Bus(
        settings,
        client_id=f"{user}-tls-{uuid.uuid4().hex[:8]}",
        keyring=kw.pop("keyring", None),
        src=f"{user}/tls",
        username=user,
        password_file=mqtt_password_file(secrets_dir, user),
        **kw,
    )


def broker_saw(lines: list[str], client_id: str) -> bool:
    return any(f" as {client_id} " in line for line in lines)


async def refused_by_client(bus: Bus, broker: Server) -> None:
    """`bus` starts, and the handshake fails on the client's side (the broker logs the client's TLS
    alert); it never connects and the broker never sees its client id."""
    seen = len(broker.lines)
    await bus.start()
    connecting = asyncio.create_task(bus.wait_connected(30))
    try:
        await wait_until(
            lambda: connecting.done() or any(HANDSHAKE_FAILED in line for line in broker.lines[seen:]),
            20,
            "a TLS handshake failure at the broker",
        )
        assert not connecting.done(), "connected to a broker whose certificate it should have refused"
        with pytest.raises(RetryableError):
            await bus.wait_connected(1.0)
        assert not broker_saw(broker.lines, bus.client_id)
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await bus.stop()


# -- the session broker (dev CA; certificate names localhost, mosquitto, broker, 127.0.0.1, ::1) --


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_the_right_ca_and_a_certified_name_connect(stack: Stack, host: str) -> None:
    bus = tls_bus(stack, stack.secrets_dir, host, stack.secrets_dir / "ca_crt")
    await bus.start()
    try:
        await bus.wait_connected(10)
        assert broker_saw(stack.broker.lines, bus.client_id)
    finally:
        await bus.stop()


@paho_leaks_failed_tls_sockets
async def test_a_broker_certificate_from_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    """Another CA, made as the dev CA is made (same name, other key): its CA file must not vouch for
    the broker."""
    other_ca = ensure_secrets(tmp_path / "other") / "ca_crt"
    assert other_ca.read_bytes() != (stack.secrets_dir / "ca_crt").read_bytes()
    await refused_by_client(tls_bus(stack, stack.secrets_dir, "localhost", other_ca), stack.broker)


# -- a broker of its own whose certificate (from the same dev CA) names only `localhost` ---------


def issue_server_cert(secrets_dir: Path, dns_names: Sequence[str]) -> None:
    """Replace the server certificate in `secrets_dir` by one from its CA naming only `dns_names`."""
    ca_key = serialization.load_pem_private_key((secrets_dir / "ca_key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((secrets_dir / "ca_crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = serialization.Encoding.PEM
    (secrets_dir / "server_crt").write_bytes(cert.public_bytes(pem))
    (secrets_dir / "server_key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture
def localhost_only_broker(tmp_path: Path, secrets_dir: Path) -> Iterator[tuple[Ports, Path, Server]]:
    secrets = tmp_path / "secrets"
    shutil.copytree(secrets_dir, secrets)
    issue_server_cert(secrets, ["localhost"])
    ports = Ports(mqtt=free_port(), mqtt_tls=free_port(), redis=0, sink=0)
    (tmp_path / "data").mkdir()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        render_broker_config(
            ROOT / "mosquitto/mosquitto.conf", ports, secrets, tmp_path / "data", extra=("log_type information",)
        )
    )
    broker = Server("mosquitto-localhost-only", ["mosquitto", "-c", str(conf)], " running", tmp_path)
    broker.start()
    try:
        yield ports, secrets, broker
    finally:
        broker.stop()


@paho_leaks_failed_tls_sockets
async def test_a_name_the_broker_certificate_does_not_carry_is_refused(
    localhost_only_broker: tuple[Ports, Path, Server],
) -> None:
    """Same broker, same trusted CA: dialled as `localhost` it connects; dialled as 127.0.0.1 (the
    same socket, a name its certificate does not carry) it must not."""
    ports, secrets, broker = localhost_only_broker
    ca = secrets / "ca_crt"
    good = tls_bus(ports, secrets, "localhost", ca)
    await good.start()
    try:
        await good.wait_connected(10)
        assert broker_saw(broker.lines, good.client_id)
    finally:
        await good.stop()
    await refused_by_client(tls_bus(ports, secrets, "127.0.0.1", ca), broker)


# -- a service over TLS, end to end ---------------------------------------------------------------


def tls_env(stack: Stack, base: str, tmp_path: Path, instance: str, ca_file: Path) -> dict[str, str]:
    """A service's environment with the broker reached only through the TLS listener."""
    return service_env(
        stack,
        base,
        tmp_path,
        instance,
        IOTPIPE_MQTT__TLS="true",
        IOTPIPE_MQTT__HOST="localhost",
        IOTPIPE_MQTT__PORT=str(stack.ports.mqtt_tls),
        IOTPIPE_MQTT__CA_FILE=str(ca_file),
        IOTPIPE_STATUS_INTERVAL="0.3",
    )


def listener_port_of(lines: list[str], client_id: str) -> int:
    """The broker listener port `client_id` connected on, from mosquitto's connection messages:
    `New connection from <peer> on port <port>.` then `New client connected from <peer> as <id> (...)`."""
    ports: dict[str, int] = {}
    for line in lines:
        if m := re.search(r"New connection from (\S+) on port (\d+)\.", line):
            ports[m[1]] = int(m[2])
        elif (m := re.search(r"New client connected from (\S+) as (\S+) ", line)) and m[2] == client_id:
            return ports[m[1]]
    raise AssertionError(f"{client_id} never connected")


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_the_preprocessor_works_over_tls(stack: Stack, keyring: KeyRing, base: str, tmp_path: Path) -> None:
    topics = Topics(base)
    instance = f"tls-{uuid.uuid4().hex[:6]}"
    online = asyncio.Event()
    processed: list[Opened] = []
    got_processed = asyncio.Event()

    async def on_status(messages: Sequence[PlainMessage]) -> None:
        if any(m.payload and orjson.loads(m.payload)["state"] == "online" for m in messages):
            online.set()

    async def on_processed(messages: Sequence[Opened]) -> None:
        processed.extend(messages)
        got_processed.set()

    watcher = bus_for(stack, TAP, keyring=keyring)
    watcher.subscribe(topics.service_status("preprocessor", instance), on_status, sealed=False)
    watcher.subscribe(topics.all("processed"), on_processed)
    # The reading side over TLS too.
    reader = tls_bus(
        stack, stack.secrets_dir, "localhost", stack.secrets_dir / "ca_crt", "sensor-reader", keyring=keyring
    )
    proc = spawn("preprocessor", tls_env(stack, base, tmp_path, instance, stack.secrets_dir / "ca_crt"), tmp_path, "pp")
    try:
        await watcher.start()
        await reader.start()
        await reader.wait_connected(15)
        await asyncio.wait_for(online.wait(), 30)  # published after its SUBSCRIBE: it is subscribed
        start = 1_700_000_000_000
        batch = {
            "device": "d1",
            "window": {"start": start, "size": 1000},
            "sensors": {"temperature": {"unit": "degC", "t": [start + 100 * i for i in range(5)], "v": [20.0] * 5}},
        }
        await reader.publish_sealed(topics.raw("d1"), {"windows": [batch]})
        await asyncio.wait_for(got_processed.wait(), 20)
        (message,) = processed
        assert message.topic == topics.processed(instance) and message.src == f"preprocessor/{instance}"
        assert listener_port_of(stack.broker.lines, f"preprocessor-{instance}") == stack.ports.mqtt_tls
        assert proc.poll() is None
    except BaseException:
        print((tmp_path / "pp.out").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_all([proc])
        await reader.stop()
        await watcher.stop()


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_service_with_the_wrong_ca_never_connects(stack: Stack, base: str, tmp_path: Path) -> None:
    instance = f"tls-{uuid.uuid4().hex[:6]}"
    client_id = f"preprocessor-{instance}"
    other_ca = ensure_secrets(tmp_path / "other") / "ca_crt"
    health = tmp_path / "health" / f"preprocessor-{instance}.json"
    seen = len(stack.broker.lines)

    def handshakes_failed() -> int:
        return sum(HANDSHAKE_FAILED in line for line in stack.broker.lines[seen:])

    def health_doc() -> dict[str, Any]:
        try:
            return orjson.loads(health.read_bytes())  # type: ignore[no-any-return]
        except (OSError, orjson.JSONDecodeError):
            return {}

    proc = spawn("preprocessor", tls_env(stack, base, tmp_path, instance, other_ca), tmp_path, "pp")
    try:
        # It keeps trying (paho reconnects), and every attempt dies in the handshake; its heartbeat
        # keeps running meanwhile and reports itself not connected.
        await wait_until(
            lambda: broker_saw(stack.broker.lines, client_id) or (handshakes_failed() >= 2 and health_doc()),
            30,
            "two refused handshakes and a health file",
        )
        assert not broker_saw(stack.broker.lines, client_id), "connected with a CA that does not vouch for the broker"
        ok, why = check_health(health, max_age=30)
        assert not ok and "connected=False" in why
        assert health_doc()["connected"] is False
        assert proc.poll() is None  # still running, still retrying: a broker outage must not kill it
    except BaseException:
        print((tmp_path / "pp.out").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_all([proc])


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_service_with_the_wrong_ca_says_why_in_its_log(stack: Stack, base: str, tmp_path: Path) -> None:
    """An operator reading the log of a service that cannot connect must learn it is the broker's
    certificate, not a silent retry loop."""
    instance = f"tls-{uuid.uuid4().hex[:6]}"
    other_ca = ensure_secrets(tmp_path / "other") / "ca_crt"
    log = tmp_path / "pp.out"
    proc = spawn("preprocessor", tls_env(stack, base, tmp_path, instance, other_ca), tmp_path, "pp")
    try:
        await wait_until(
            lambda: re.search(r"(?i)certificate[ _]verify[ _]failed", log.read_text(errors="replace")),
            30,
            "the service to log that the broker's certificate failed verification",
        )
        assert not broker_saw(stack.broker.lines, f"preprocessor-{instance}")
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_all([proc])
