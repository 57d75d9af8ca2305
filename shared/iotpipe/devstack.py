"""Development secrets and the local (no-Docker) stack.

`ensure_secrets(dir)` creates, only where missing, every secret the stack needs, as files named like
the compose secrets (/run/secrets/<name>): the Fernet key ring, one MQTT password per broker user
and mosquitto's hashed password file, the Redis ACL file (hashed) and passwords, a CA with a server
certificate for the TLS listener, and the cloud bearer token. Nothing here is ever committed.

`render_broker_config` / `render_redis_config` turn the committed mosquitto/mosquitto.conf and
redis/redis.conf (the compose configuration) into local ones: loopback ports and local paths
substituted, every other line as shipped. The tests use the same functions.
"""

from __future__ import annotations

import base64
import datetime
import getpass
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._envelope import KeyRing
from ._settings import mqtt_password_file, redis_password_file

SERVICES = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor")
MQTT_USERS = (*SERVICES, "reader")
REDIS_USERS = ("cache-writer", "reader")
# Broker user -> what the Redis ACL grants it.
_REDIS_RULES = {
    "cache-writer": "~* &* +@all -@admin -@dangerous",
    "reader": "~* resetchannels -@all +@read +@connection",
}
_TLS_NAMES = ("localhost", "mosquitto", "broker")


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def mosquitto_hash(password: str) -> str:
    """mosquitto 2.x `$7$` format: PBKDF2-SHA512, 101 iterations, 12-byte salt (as mosquitto_passwd),
    computed here so no password ever appears in a process list."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _password(path: Path) -> str:
    if not path.exists():
        _write(path, secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def ensure_secrets(secrets_dir: Path) -> Path:
    """Create whatever is missing in `secrets_dir`; existing files are kept (keys stay stable)."""
    # The directory keeps other local users out. The files inside are world-readable because docker
    # compose (outside swarm) bind-mounts secret files with their host owner and mode: the services'
    # and the broker's non-root users in the containers must be able to read them.
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    keyring = secrets_dir / "keyring"
    if not keyring.exists():
        _write(
            keyring,
            "# <key id> <fernet key>; the first encrypts, all decrypt\n" + KeyRing.generate_line("k1") + "\n",
            0o644,
        )
    passwd = secrets_dir / "mosquitto_passwd"
    if not passwd.exists():
        lines = [f"{user}:{mosquitto_hash(_password(mqtt_password_file(secrets_dir, user)))}" for user in MQTT_USERS]
        _write(passwd, "\n".join(lines) + "\n", 0o644)  # hashes only; the broker's user must read it
    acl = secrets_dir / "redis_users_acl"
    if not acl.exists() or acl.read_text().startswith("user default off"):  # the latter: see below
        # Not `user default off`: Redis replays the append-only file as the default user, and with
        # that user disabled it refused every MULTI/EXEC block (our multi-write Lua scripts) on
        # restart, losing them (measured: tests/test_crash_recovery.py). So `default` keeps its
        # permissions but gets a random password that is thrown away: nobody can log in as it.
        unknowable = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
        lines = [f"user default on #{unknowable} ~* &* +@all"]
        for user in REDIS_USERS:
            digest = hashlib.sha256(_password(redis_password_file(secrets_dir, user)).encode()).hexdigest()
            lines.append(f"user {user} on #{digest} {_REDIS_RULES[user]}")
        _write(acl, "\n".join(lines) + "\n", 0o644)
    token = secrets_dir / "cloud_token"
    if not token.exists():
        _write(token, secrets.token_urlsafe(32) + "\n")
    if not (secrets_dir / "server_crt").exists():
        _make_tls(secrets_dir)
    return secrets_dir


def _make_tls(secrets_dir: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotpipe dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in _TLS_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(secrets_dir / "ca_crt", ca_cert.public_bytes(pem), 0o644)
    _write(
        secrets_dir / "ca_key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,  # never mounted anywhere: only `iotpipe secrets` uses it
    )
    _write(secrets_dir / "server_crt", cert.public_bytes(pem), 0o644)
    _write(
        secrets_dir / "server_key",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@dataclass(frozen=True)
class Ports:
    mqtt: int
    mqtt_tls: int
    redis: int
    sink: int


def render_broker_config(
    source: Path,
    ports: Ports,
    secrets_dir: Path,
    data_dir: Path,
    *,
    log_file: Path | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    out = []
    for line in source.read_text().splitlines():
        if line.startswith("listener 1883"):
            line = f"listener {ports.mqtt} 127.0.0.1"
        elif line.startswith("listener 8883"):
            line = f"listener {ports.mqtt_tls} 127.0.0.1"
        line = line.replace("/run/secrets/", f"{secrets_dir.resolve()}/")
        line = line.replace("/mosquitto/config/acl", str((source.parent / "acl").resolve()))
        line = line.replace("/mosquitto/data/", f"{data_dir.resolve()}/")
        if line == "log_dest stdout":
            line = "log_dest stderr"  # unbuffered when piped (honcho, tests): lines arrive as they happen
        out.append(line)
    # As root, mosquitto would switch to the `mosquitto` user, who cannot write our data dir.
    out.append(f"user {getpass.getuser()}")
    if log_file is not None:
        out.append(f"log_dest file {log_file.resolve()}")
    out.extend(extra)
    return "\n".join(out) + "\n"


def render_redis_config(source: Path, ports: Ports, secrets_dir: Path, data_dir: Path) -> str:
    out = []
    for line in source.read_text().splitlines():
        if line.startswith("bind "):
            line = "bind 127.0.0.1"
        elif line.startswith("port "):
            line = f"port {ports.redis}"
        elif line.startswith("dir "):
            line = f"dir {data_dir.resolve()}"
        out.append(line.replace("/run/secrets/", f"{secrets_dir.resolve()}/"))
    return "\n".join(out) + "\n"


def stack_environment(root: Path, var: Path, secrets_dir: Path, ports: Ports) -> dict[str, str]:
    """The environment every service of the local stack gets (compose sets the same variables)."""
    return {
        "IOTPIPE_SECRETS_DIR": str(secrets_dir.resolve()),
        "IOTPIPE_MQTT__HOST": "localhost",
        "IOTPIPE_MQTT__PORT": str(ports.mqtt_tls),
        "IOTPIPE_MQTT__TLS": "true",
        "IOTPIPE_MQTT__CA_FILE": str((secrets_dir / "ca_crt").resolve()),
        "IOTPIPE_REDIS__HOST": "127.0.0.1",
        "IOTPIPE_REDIS__PORT": str(ports.redis),
        "IOTPIPE_CLOUD_URL": f"http://127.0.0.1:{ports.sink}/ingest",
        "IOTPIPE_CLOUD_TOKEN_FILE": str((secrets_dir / "cloud_token").resolve()),
        "IOTPIPE_SINK_HOST": "127.0.0.1",
        "IOTPIPE_SINK_PORT": str(ports.sink),
        "IOTPIPE_SINK_TOKEN_FILE": str((secrets_dir / "cloud_token").resolve()),
        "IOTPIPE_SINK_STORE_FILE": str((var / "cloud-sink" / "records.jsonl").resolve()),
        "IOTPIPE_DEVICES_FILE": str((root / "services/sensor_reader/examples/simulated.toml").resolve()),
        "IOTPIPE_LOG_DIR": str((var / "log").resolve()),
        "IOTPIPE_HEALTH_DIR": str((var / "health").resolve()),
        "IOTPIPE_DEAD_LETTER_FILE": str((var / "cloud-forwarder" / "dead-letter.jsonl").resolve()),
        "IOTPIPE_INSTANCE": "local",
        "IOTPIPE_BROKER_CONFIG": str((var / "mosquitto.conf").resolve()),
        "IOTPIPE_REDIS_CONFIG": str((var / "redis.conf").resolve()),
        "PYTHONUNBUFFERED": "1",
    }


def prepare_local_stack(root: Path, var: Path, ports: Ports) -> dict[str, str]:
    """Secrets, rendered broker/Redis configs and data dirs under `var`; returns the environment."""
    secrets_dir = ensure_secrets(root / "secrets")
    for sub in ("mosquitto", "redis", "log", "health", "cloud-sink", "cloud-forwarder"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    (var / "mosquitto.conf").write_text(
        render_broker_config(
            root / "mosquitto/mosquitto.conf", ports, secrets_dir, var / "mosquitto", log_file=var / "log/broker.log"
        )
    )
    (var / "redis.conf").write_text(render_redis_config(root / "redis/redis.conf", ports, secrets_dir, var / "redis"))
    env = stack_environment(root, var, secrets_dir, ports)
    (var / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return env
