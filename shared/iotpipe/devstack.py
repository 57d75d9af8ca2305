"""Development secrets and the local (no-Docker) stack.

`ensure_secrets(dir)` creates, only where missing, every secret the stack needs, as files named as
the services find them (/run/secrets/<name>): the Fernet key ring, one MQTT password per broker user
and mosquitto's hashed password files, the Redis ACL file (hashed) and passwords, a CA with a server
certificate for the TLS listeners and client certificates, and the cloud bearer token. No existing
secret is ever replaced; only the files derived from the passwords (the Redis ACL file, the hashed
password files) are brought up to date from the same passwords. Nothing here is ever committed.

`share_secrets(dir, root)` gives each container of docker-compose.yml its own copy of exactly the
secrets it holds (`CONTAINER_SECRETS`), in `root/<service>/`: the compose file's one-shot `secrets`
service runs both (`iotpipe secrets /secrets --share /shares`).

`render_broker_config` / `render_redis_config` turn the committed mosquitto/mosquitto.conf and
redis/redis.conf (the compose configuration) into local ones: loopback ports and local paths
substituted, every other line as shipped. The tests use the same functions.

`supervise` runs the local stack (`iotpipe stack`, `make run`) under supervisord, one program per
Procfile line (`render_supervisor_config`): a program that dies is restarted while the others keep
running, one that keeps dying right after its start backs off (1, 2, 3... s) and is then given up
on, loudly. supervisord keeps each program's output in var/supervisor/<name>.log; `supervise`
follows those files and prints every line prefixed by its program's name, as honcho did.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import getpass
import hashlib
import ipaddress
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._envelope import KeyRing
from ._errors import ConfigError
from ._redis import REDIS_PREFIX, REDIS_USERS, redis_acl_rules
from ._settings import mqtt_client_cert_file, mqtt_client_key_file, mqtt_password_file, redis_password_file

SERVICES = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor", "exporter")
# The pipeline broker admits the services, `health` (logs in, may read and write nothing: the
# compose healthcheck) and, on its bridge listener only, the public broker's bridge (by client
# certificate). Third parties log in to the public broker, never to this one.
HEALTH_USER = "health"
MQTT_USERS = (*SERVICES, HEALTH_USER)
BRIDGE_USER = "bridge"
# The public broker's users: third-party consumers, read-only (docs/security.md), and the exporter,
# which writes the plaintext projection there (mosquitto/public-acl). The exporter's one password
# (`mqtt_exporter_password`) logs it in to both brokers, each of which has its own ACL for it.
PUBLIC_USERS = ("reader", "exporter")
# Every name a client uses to reach a broker: the local stack's, and both compose services'.
_TLS_NAMES = ("localhost", "mosquitto", "mosquitto-public", "broker")


# The local stack's Prometheus /metrics ports on 127.0.0.1: one per service, from this base in SERVICES
# order (sensor-reader 19101 ... exporter 19106; docs/operations.md, "Metrics"). In containers every
# service uses the default, 9100, each in its own network namespace.
LOCAL_METRICS_BASE = 19101


def local_metrics_ports(base: int = LOCAL_METRICS_BASE) -> dict[str, int]:
    """Each service's /metrics port in the local stack (`base` 0: every one 0, metrics off)."""
    return {name: base + i if base else 0 for i, name in enumerate(SERVICES)}


def _pipeline_service(service: str, *more: str) -> tuple[str, ...]:
    return ("keyring", "ca_crt", mqtt_password_file(Path(), service).name, *more)


# Which secrets each container of docker-compose.yml holds: the one-shot `secrets` service copies
# exactly these into that container's own volume (`secrets-<service>`, its /run/secrets), so no
# container can read another's (docs/security.md, "Who holds which secret"). `ca_key` is nobody's.
CONTAINER_SECRETS: dict[str, tuple[str, ...]] = {
    "mosquitto": (
        "mosquitto_passwd",
        "ca_crt",
        "server_crt",
        "server_key",
        mqtt_password_file(Path(), HEALTH_USER).name,  # its healthcheck's login (no topic granted)
    ),
    "mosquitto-public": (
        "public_mosquitto_passwd",
        "ca_crt",
        "server_crt",
        "server_key",
        mqtt_client_cert_file(Path(), BRIDGE_USER).name,
        mqtt_client_key_file(Path(), BRIDGE_USER).name,
        mqtt_password_file(Path(), "reader").name,  # its healthcheck's login
    ),
    "redis": ("redis_users_acl", redis_password_file(Path(), "reader").name),  # the latter: its healthcheck's
    "cloud-sink": ("cloud_token",),
    "sensor-reader": _pipeline_service("sensor-reader"),
    "preprocessor": _pipeline_service("preprocessor"),
    "cache-writer": _pipeline_service("cache-writer", redis_password_file(Path(), "cache-writer").name),
    "cloud-forwarder": _pipeline_service("cloud-forwarder", "cloud_token"),
    "monitor": _pipeline_service("monitor"),
    "exporter": _pipeline_service("exporter"),
}


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    """Replace `path` by rename: a reader (a service re-reading its key ring) sees the old file or the
    new one, never a half-written one."""
    data = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by an interrupted run
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    if os.geteuid() == 0:
        # Run as root (compose's one-shot `secrets` service, writing into the bind-mounted ./secrets):
        # a new file belongs to whoever owns the directory, so the user who cloned the repository
        # can read it on the host. Where the file system will not (some desktop VMs' shares), the
        # file stays root's, which changes nothing inside the containers.
        owner = path.parent.stat()
        with contextlib.suppress(OSError):
            os.chown(path, owner.st_uid, owner.st_gid)


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


def _password_hashes(secrets_dir: Path, passwd: Path, users: Sequence[str], keep_others: bool) -> None:
    """Bring a mosquitto password file up to date: a line for each of `users` (an existing line kept
    as it is, a missing one hashed from its password file) and, with `keep_others`, the lines of the
    users an operator added (third parties on the public broker); without, those are dropped (the
    pipeline broker admits our users only). Rewritten only if that changes it."""
    current = passwd.read_text().splitlines() if passwd.exists() else []
    lines = {line.split(":", 1)[0]: line for line in current if ":" in line}
    wanted = [
        lines.get(user) or f"{user}:{mosquitto_hash(_password(mqtt_password_file(secrets_dir, user)))}"
        for user in users
    ]
    if keep_others:
        wanted += [line for user, line in lines.items() if user not in users]
    if wanted != current:
        _write(passwd, "\n".join(wanted) + "\n", 0o644)


def ensure_secrets(secrets_dir: Path, redis_prefixes: Sequence[str] = (REDIS_PREFIX,)) -> Path:
    """Create whatever is missing in `secrets_dir`; existing files are kept (keys stay stable), except
    the Redis ACL file, rewritten when its rules are out of date (passwords never change).
    `redis_prefixes`: the Redis key prefixes (or globs) the ACL lets the users reach."""
    # The directory keeps other local users out; the files inside are readable by all who get that far
    # (the local stack's broker and Redis may run as other users; compose's containers read copies,
    # see share_secrets).
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    keyring = secrets_dir / "keyring"
    if not keyring.exists():
        _write(
            keyring,
            "# <key id> <fernet key>; the first encrypts, all decrypt\n" + KeyRing.generate_line("k1") + "\n",
            0o644,
        )
    # Hashes only; the broker's user must read them. A file whose users differ from today's (an older
    # layout, where the pipeline broker also had `reader`) is rewritten; passwords are kept.
    _password_hashes(secrets_dir, secrets_dir / "mosquitto_passwd", MQTT_USERS, keep_others=False)
    _password_hashes(secrets_dir, secrets_dir / "public_mosquitto_passwd", PUBLIC_USERS, keep_others=True)
    acl = secrets_dir / "redis_users_acl"
    current = acl.read_text() if acl.exists() else ""
    wanted = _redis_acl(secrets_dir, current, redis_prefixes)
    if wanted != current:
        _write(acl, wanted, 0o644)
    token = secrets_dir / "cloud_token"
    if not token.exists():
        _write(token, secrets.token_urlsafe(32) + "\n")
    # A CA only where there is none; certificates only where missing, issued by the CA that is there
    # (its key is needed then, and only then: bring your own CA's certificates and keep its key away).
    if not _pair_present(secrets_dir / "ca_crt", secrets_dir / "ca_key"):
        _make_ca(secrets_dir)
    if not _pair_present(secrets_dir / "server_crt", secrets_dir / "server_key") or _our_server_cert_lacks_names(
        secrets_dir
    ):
        _make_server_cert(secrets_dir)
    # Client certificates: the bridge's (its identity on the pipeline broker's bridge listener) and
    # one per service (the mTLS option, a second factor beside its password).
    for user in (BRIDGE_USER, *SERVICES):
        if not _pair_present(mqtt_client_cert_file(secrets_dir, user), mqtt_client_key_file(secrets_dir, user)):
            _make_client_cert(secrets_dir, user)
    return secrets_dir


def _pair_present(cert: Path, key: Path) -> bool:
    """Whether a certificate is there (its key too, or, for the CA, perhaps kept elsewhere). A key
    without its certificate, or a leaf certificate without its key, is refused: creating the other half
    would replace a secret someone put there."""
    if cert.exists():
        if not key.exists() and key.name != "ca_key":
            raise ConfigError(f"{cert} is there but {key.name} is not: add it, or remove both to have them created")
        return True
    if key.exists():
        raise ConfigError(f"{key} is there but {cert.name} is not: add it, or remove both to have them created")
    return False


def _ca(secrets_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA that issues a missing certificate: its certificate and key from `secrets_dir`."""
    if not (secrets_dir / "ca_key").exists():
        raise ConfigError(
            f"a certificate is missing in {secrets_dir} and so is ca_key, the CA's key that would issue it: "
            "add the certificate and its key yourself, or the CA's key"
        )
    ca_cert = x509.load_pem_x509_certificate((secrets_dir / "ca_crt").read_bytes())
    ca_key = serialization.load_pem_private_key((secrets_dir / "ca_key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{secrets_dir / 'ca_key'}: not an EC private key")
    return ca_cert, ca_key


def missing_secrets(secrets_dir: Path, services: Sequence[str] = tuple(CONTAINER_SECRETS)) -> list[str]:
    """The secrets the given compose services hold that `secrets_dir` lacks."""
    wanted = dict.fromkeys(name for service in services for name in CONTAINER_SECRETS[service])
    return [name for name in wanted if not (secrets_dir / name).is_file()]


def share_secrets(secrets_dir: Path, root: Path) -> dict[str, list[str]]:
    """Into each directory `root/<service>` (a compose service of CONTAINER_SECRETS; any other name is
    refused), copy exactly that service's secrets from `secrets_dir` and remove any other file.

    Each copy replaces the old one by rename (a service re-reading its key ring every 2 s takes a new
    ring at once, never half of one); an unchanged file is left alone. Files are 0444
    (what Docker gives swarm secrets): the volume is that one container's, whose unprivileged user
    must read them. Returns the files written (changed or new) per service."""
    services = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [name for name in services if name not in CONTAINER_SECRETS]
    if unknown:
        raise ConfigError(
            f"{root}: no container is called {', '.join(unknown)} (known: {', '.join(CONTAINER_SECRETS)})"
        )
    missing = missing_secrets(secrets_dir, services)
    if missing:
        raise ConfigError(f"{secrets_dir} lacks {', '.join(missing)}")
    written: dict[str, list[str]] = {}
    for service in services:
        target = root / service
        names = CONTAINER_SECRETS[service]
        for stale in [p for p in target.iterdir() if p.name not in names]:
            stale.unlink()
        written[service] = []
        for name in names:
            data = (secrets_dir / name).read_bytes()
            if (target / name).is_file() and (target / name).read_bytes() == data:
                continue
            _write(target / name, data, 0o444)
            written[service].append(name)
    return written


def _make_client_cert(secrets_dir: Path, user: str) -> None:
    """A client certificate whose common name is the broker user it belongs to."""
    pem = serialization.Encoding.PEM
    ca_cert, ca_key = _ca(secrets_dir)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(mqtt_client_cert_file(secrets_dir, user), cert.public_bytes(pem), 0o644)
    _write(
        mqtt_client_key_file(secrets_dir, user),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o644,  # read by the container's non-root user (see ensure_secrets); the directory is 0700
    )


_ACL_HASH = re.compile(r"#[0-9a-f]{64}")


def _redis_acl(secrets_dir: Path, current: str, prefixes: Sequence[str]) -> str:
    """The Redis ACL file `current` should be: our users with today's rules and the hashes of their
    password files; the `default` user's unknowable hash and any other user's line kept as they are."""
    lines = {line.split()[1]: line for line in current.splitlines() if len(line.split()) > 1}
    # Not `user default off`: Redis replays the append-only file as the default user, and with that
    # user disabled it refused every MULTI/EXEC block (our multi-write Lua scripts) on restart, losing
    # them (measured: tests/test_crash_recovery.py). So `default` keeps its permissions but gets a
    # random password that is thrown away: nobody can log in as it. An old `default off` line (or
    # none) gets a new one; an existing hash is kept, so an up-to-date file is never rewritten.
    kept = _ACL_HASH.search(lines.get("default", ""))
    unknowable = kept.group() if kept else "#" + hashlib.sha256(secrets.token_bytes(32)).hexdigest()
    out = [f"user default on {unknowable} ~* &* +@all"]
    rules = redis_acl_rules(prefixes)
    for user in REDIS_USERS:
        digest = hashlib.sha256(_password(redis_password_file(secrets_dir, user)).encode()).hexdigest()
        out.append(f"user {user} on #{digest} {rules[user]}")
    out += [line for user, line in lines.items() if user != "default" and user not in REDIS_USERS]
    return "\n".join(out) + "\n"


def _make_ca(secrets_dir: Path) -> None:
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
    pem = serialization.Encoding.PEM
    _write(secrets_dir / "ca_crt", ca_cert.public_bytes(pem), 0o644)
    _write(
        secrets_dir / "ca_key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,  # never mounted anywhere: only `iotpipe secrets` uses it
    )


def _our_server_cert_lacks_names(secrets_dir: Path) -> bool:
    """True for a broker certificate we issued (by the CA here, whose key is here) that lacks a name
    clients now use (an older release's: e.g. before the public broker had its compose name). Such a
    certificate is reissued; one issued by another CA (brought by the operator) is never touched."""
    if not (secrets_dir / "ca_key").exists():
        return False  # nothing here could reissue it
    try:
        cert = x509.load_pem_x509_certificate((secrets_dir / "server_crt").read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate((secrets_dir / "ca_crt").read_bytes()))
        names = set(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        )
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return not names >= set(_TLS_NAMES)


def _make_server_cert(secrets_dir: Path) -> None:
    """The brokers' certificate (both brokers, every name a client uses to reach them)."""
    ca_cert, ca_key = _ca(secrets_dir)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in _TLS_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(secrets_dir / "server_crt", cert.public_bytes(pem), 0o644)
    _write(
        secrets_dir / "server_key",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@dataclass(frozen=True)
class Ports:
    """Loopback ports of a local stack or a test's servers. The pipeline broker's mTLS and bridge
    listeners and the public broker's two listeners default to none (not rendered)."""

    mqtt: int
    mqtt_tls: int
    redis: int
    sink: int
    mqtt_mtls: int = 0
    mqtt_bridge: int = 0
    public: int = 0
    public_tls: int = 0


# Where the compose broker image installs the guard plugin (mosquitto/Dockerfile); the local stack
# and the tests build it into var/build/ instead (build_broker_plugin).
PLUGIN_IN_IMAGE = "/usr/lib/iotpipe/iotpipe_guard.so"


def build_broker_plugin(root: Path) -> Path:
    """mosquitto/iotpipe_guard.c compiled for this machine's mosquitto, once per source version
    (var/build/iotpipe_guard-<hash>.so; concurrent builds each write a temporary file and rename)."""
    source = root / "mosquitto" / "iotpipe_guard.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = root / "var" / "build" / f"iotpipe_guard-{digest}.so"
    if target.exists():
        return target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = ["cc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(partial), str(source), "-lcrypto"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(
            "cannot build the broker plugin: no C compiler (cc); `make deps` installs gcc, "
            "mosquitto-dev, libmosquitto-dev and libssl-dev"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"cannot build the broker plugin (`make deps` installs its build dependencies):\n{exc.stderr}"
        ) from None
    os.replace(partial, target)
    return target.resolve()


def _render_mosquitto(
    source: Path,
    listeners: dict[str, int],
    replacements: dict[str, str],
    *,
    log_file: Path | None,
    extra: tuple[str, ...],
) -> str:
    """A shipped mosquitto config for loopback: `listener <shipped port>` lines get their local
    port (a listener whose port is 0 is left out, with its block), paths are substituted."""
    out: list[str] = []
    skipping = False
    for line in source.read_text().splitlines():
        if line.startswith("listener "):
            port = listeners[line.split()[1]]
            skipping = port == 0
            if not skipping:
                line = f"listener {port} 127.0.0.1"
        elif skipping and (not line.strip() or line.startswith("#")):
            skipping = False  # a listener's block ends at the first blank or comment line
        if skipping:
            continue
        for old, new in replacements.items():
            line = line.replace(old, new)
        if line == "log_dest stdout":
            line = "log_dest stderr"  # unbuffered when piped (supervisord, tests): lines arrive as they happen
        out.append(line)
    # As root, mosquitto would switch to the `mosquitto` user, who cannot write our data dir.
    out.append(f"user {getpass.getuser()}")
    if log_file is not None:
        out.append(f"log_dest file {log_file.resolve()}")
    out.extend(extra)
    return "\n".join(out) + "\n"


def render_broker_config(
    source: Path,
    ports: Ports,
    secrets_dir: Path,
    data_dir: Path,
    *,
    log_file: Path | None = None,
    extra: tuple[str, ...] = (),
    acl_file: Path | None = None,
    password_file: Path | None = None,
    plugin: Path | None = None,
) -> str:
    """The pipeline broker's config (mosquitto/mosquitto.conf) for loopback. `acl_file`,
    `password_file`: instead of the shipped ones (tests add a user of their own); `plugin`: the
    guard built for this machine (default: build_broker_plugin of the tree `source` is in)."""
    plugin = plugin or build_broker_plugin(source.resolve().parent.parent)
    return _render_mosquitto(
        source,
        {"1883": ports.mqtt, "8883": ports.mqtt_tls, "8884": ports.mqtt_mtls, "8885": ports.mqtt_bridge},
        {
            "/run/secrets/mosquitto_passwd": str((password_file or secrets_dir / "mosquitto_passwd").resolve()),
            "/run/secrets/": f"{secrets_dir.resolve()}/",
            "/mosquitto/config/acl": str((acl_file or source.parent / "acl").resolve()),
            "/mosquitto/data/": f"{data_dir.resolve()}/",
            PLUGIN_IN_IMAGE: str(plugin),
        },
        log_file=log_file,
        extra=extra,
    )


def render_public_broker_config(
    source: Path,
    ports: Ports,
    secrets_dir: Path,
    data_dir: Path,
    *,
    log_file: Path | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """The public broker's config (mosquitto/public.conf) for loopback, bridged to the pipeline
    broker's bridge listener on `ports.mqtt_bridge`."""
    if not (ports.public and ports.mqtt_bridge):
        raise ValueError("the public broker needs its own port and the pipeline broker's bridge port")
    return _render_mosquitto(
        source,
        {"1883": ports.public, "8883": ports.public_tls},
        {
            "/run/secrets/": f"{secrets_dir.resolve()}/",
            "/mosquitto/config/public-acl": str((source.parent / "public-acl").resolve()),
            "/mosquitto/data/": f"{data_dir.resolve()}/",
            "address mosquitto:8885": f"address 127.0.0.1:{ports.mqtt_bridge}",
        },
        log_file=log_file,
        extra=extra,
    )


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
        # The exporter's second broker: the public one, where it publishes the projection.
        "IOTPIPE_PUBLIC__HOST": "localhost",
        "IOTPIPE_PUBLIC__PORT": str(ports.public_tls),
        "IOTPIPE_PUBLIC__TLS": "true",
        "IOTPIPE_PUBLIC__CA_FILE": str((secrets_dir / "ca_crt").resolve()),
        "IOTPIPE_HA_DISCOVERY": "true",
        "IOTPIPE_REDIS__HOST": "127.0.0.1",
        "IOTPIPE_REDIS__PORT": str(ports.redis),
        "IOTPIPE_CLOUD_URL": f"http://127.0.0.1:{ports.sink}/ingest",
        "IOTPIPE_CLOUD_TOKEN_FILE": str((secrets_dir / "cloud_token").resolve()),
        "IOTPIPE_SINK_HOST": "127.0.0.1",
        "IOTPIPE_SINK_PORT": str(ports.sink),
        "IOTPIPE_SINK_TOKEN_FILE": str((secrets_dir / "cloud_token").resolve()),
        "IOTPIPE_SINK_STORE_FILE": str((var / "cloud-sink" / "records.jsonl").resolve()),
        "IOTPIPE_SINK_DB_FILE": str((var / "cloud-sink" / "sink.sqlite3").resolve()),
        "IOTPIPE_DEVICES_FILE": str((root / "services/sensor_reader/examples/simulated.toml").resolve()),
        "IOTPIPE_LOG_DIR": str((var / "log").resolve()),
        "IOTPIPE_HEALTH_DIR": str((var / "health").resolve()),
        # Each service's own dead letters and state under var/, whatever directory it runs in.
        "IOTPIPE_STATE_DIR": str((var / "state").resolve()),
        "IOTPIPE_INSTANCE": "local",
        "IOTPIPE_BROKER_CONFIG": str((var / "mosquitto.conf").resolve()),
        "IOTPIPE_PUBLIC_BROKER_CONFIG": str((var / "mosquitto-public.conf").resolve()),
        "IOTPIPE_REDIS_CONFIG": str((var / "redis.conf").resolve()),
        "PYTHONUNBUFFERED": "1",
    }


def prepare_local_stack(root: Path, var: Path, ports: Ports) -> dict[str, str]:
    """Secrets, rendered broker/Redis configs and data dirs under `var`; returns the environment."""
    secrets_dir = ensure_secrets(root / "secrets")
    for sub in ("mosquitto", "mosquitto-public", "redis", "log", "health", "cloud-sink", "cloud-forwarder"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    (var / "mosquitto.conf").write_text(
        render_broker_config(
            root / "mosquitto/mosquitto.conf", ports, secrets_dir, var / "mosquitto", log_file=var / "log/broker.log"
        )
    )
    (var / "mosquitto-public.conf").write_text(
        render_public_broker_config(
            root / "mosquitto/public.conf",
            ports,
            secrets_dir,
            var / "mosquitto-public",
            log_file=var / "log/broker-public.log",
        )
    )
    (var / "redis.conf").write_text(render_redis_config(root / "redis/redis.conf", ports, secrets_dir, var / "redis"))
    env = stack_environment(root, var, secrets_dir, ports)
    (var / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return env


# --- the local stack under supervisord --------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """One Procfile line: a name and the shell command that runs it (compose runs the same)."""

    name: str
    command: str


_PROGRAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def read_procfile(path: Path) -> list[Program]:
    programs: list[Program] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = (part.strip() for part in line.partition(":"))
        if not sep or not command or not _PROGRAM_NAME.fullmatch(name):
            raise ValueError(f"{path}:{number}: expected `name: command`, got {line!r}")
        if any(p.name == name for p in programs):
            raise ValueError(f"{path}:{number}: {name} is defined twice")
        programs.append(Program(name, command))
    if not programs:
        raise ValueError(f"{path}: no processes")
    return programs


@dataclass(frozen=True)
class Supervision:
    """How supervisord treats each program of the local stack.

    A program that exits (or is killed) after `start_secs` of running is restarted at once. One that
    dies sooner counts as a failed start: supervisord waits 1 s, 2 s, 3 s... before each new try and
    after `start_retries` failed starts in a row gives up on it (FATAL, logged as `gave up:`); the
    rest of the stack keeps running. Stopping sends SIGTERM to the program's process group and
    SIGKILL after `stop_wait_secs`."""

    start_secs: int = 5
    start_retries: int = 5
    stop_wait_secs: int = 5  # a service's drain takes at most ~2 s (iotpipe._bus.SHUTDOWN_DRAIN)
    log_max_bytes: int = 10 * 1024 * 1024


def supervisor_socket(var: Path) -> Path:
    """supervisorctl's socket; a unix socket path must fit in 107 bytes, so a deep checkout gets
    one under /tmp named after it."""
    sock = (var / "supervisor" / "supervisord.sock").resolve()
    if len(os.fsencode(sock)) < 100:
        return sock
    tag = hashlib.sha256(os.fsencode(var.resolve())).hexdigest()[:16]
    return Path("/tmp") / f"iotpipe-{os.getuid()}-{tag}.sock"


def stack_running(var: Path) -> bool:
    """Whether a supervisord of a stack started from this `var` answers on its socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(supervisor_socket(var)))
        except OSError:
            return False
        return True


def program_log(var: Path, name: str) -> Path:
    """What a program wrote to stdout and stderr, as supervisord captured it (and the terminal shows)."""
    return (var / "supervisor" / f"{name}.log").resolve()


def _ini(value: str) -> str:
    """A value for supervisord's config file: `%` is its interpolation character, and `;` or `#`
    after whitespace starts a comment there (which cannot be escaped)."""
    if "\n" in value or re.search(r"\s[;#]", value):
        raise ValueError(f"supervisord cannot be given {value!r}: a newline, or ` ;` / ` #` (a comment there)")
    return value.replace("%", "%%")


def render_supervisor_config(
    programs: Sequence[Program],
    root: Path,
    var: Path,
    supervision: Supervision = Supervision(),
    program_env: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """supervisord's config for the local stack: one [program] per Procfile line, run as the
    Procfile runs it (`sh -c`, `exec`ed so the program itself is the supervised process), in `root`,
    with supervisord's environment (what `iotpipe stack` gives it). Programs start in Procfile order
    and stop in reverse, each stopped before the next is asked to: the broker, listed first, is
    still there when the services say `offline` on their way out. `program_env`: variables a
    program gets on top of that environment (each service's own /metrics port).

    supervisorctl's socket is the user's only (0700) and has a password as well, which only keeps
    supervisord from logging a CRIT line about running without one at every start."""
    sock = supervisor_socket(var)
    password = secrets.token_urlsafe(18)
    log_dir = (var / "log").resolve()
    run_dir = (var / "supervisor").resolve()
    s = supervision
    lines = [
        "; Generated by `iotpipe stack` from the Procfile on every start: edit the Procfile, not this.",
        "[supervisord]",
        "nodaemon=true",
        "silent=true",  # `iotpipe stack` prints supervisord's log with the programs' output
        f"user={os.getuid()}",  # who runs it already: no CRIT line about running as root
        f"logfile={_ini(str(log_dir / 'supervisord.log'))}",
        f"logfile_maxbytes={s.log_max_bytes}",
        "logfile_backups=1",
        f"pidfile={_ini(str(run_dir / 'supervisord.pid'))}",
        f"childlogdir={_ini(str(run_dir))}",
        "",
        "[unix_http_server]",
        f"file={_ini(str(sock))}",
        "chmod=0700",
        "username=iotpipe",
        f"password={password}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_ini(str(sock))}",
        "username=iotpipe",
        f"password={password}",
    ]
    for position, program in enumerate(programs, 1):
        lines += [
            "",
            f"[program:{program.name}]",
            f"command=/bin/sh -c {_ini(shlex.quote('exec ' + program.command))}",
            f"directory={_ini(str(root.resolve()))}",
            f"priority={10 * position}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={s.start_secs}",
            f"startretries={s.start_retries}",
            "stopsignal=TERM",
            f"stopwaitsecs={s.stop_wait_secs}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_ini(str(program_log(var, program.name)))}",
            f"stdout_logfile_maxbytes={s.log_max_bytes}",
            "stdout_logfile_backups=1",
        ]
        if own := (program_env or {}).get(program.name):
            quoted = ",".join(f'{k}="{_ini(v)}"' for k, v in own.items())
            lines.append(f"environment={quoted}")
    return "\n".join(lines) + "\n"


class _Follower:
    """`tail -F` of one file: complete lines appended since it was created, across rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO | None = None
        self.partial = b""
        try:
            self.offset = path.stat().st_size  # only what this run writes
        except FileNotFoundError:
            self.offset = 0

    def _read(self) -> bytes:
        data = b""
        while True:
            if self.file is None:
                try:
                    self.file = self.path.open("rb")
                except FileNotFoundError:
                    return data
                self.file.seek(self.offset)
            data += self.file.read()
            try:
                rotated = os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino
            except FileNotFoundError:
                rotated = True
            if not rotated:
                return data
            # supervisord closes a log before renaming it: what is left of the old file is final.
            data += self.file.read()
            self.file.close()
            self.file, self.offset = None, 0

    def read(self) -> list[bytes]:
        lines = (self.partial + self._read()).split(b"\n")
        self.partial = lines.pop()
        return lines

    def close(self) -> list[bytes]:
        rest = self.read()
        if self.partial:
            rest.append(self.partial)
            self.partial = b""
        if self.file is not None:
            self.file.close()
            self.file = None
        return rest


_COLORS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)
_GAVE_UP = re.compile(rb"gave up: (\S+) entered FATAL")


def _set_parent_death_signal() -> None:
    """In the child, before exec: if `iotpipe stack` dies (even by SIGKILL), supervisord gets
    SIGTERM and stops the stack instead of leaving it running unattended (Linux only)."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def supervise(
    programs: Sequence[Program],
    root: Path,
    var: Path,
    env: dict[str, str],
    supervision: Supervision = Supervision(),
    out: BinaryIO | None = None,
    poll: float = 0.1,
    program_env: Mapping[str, Mapping[str, str]] | None = None,
) -> int:
    """Run `programs` under supervisord until SIGINT/SIGTERM/SIGHUP (or supervisord's own end),
    printing each line the programs and supervisord write as `HH:MM:SS name | line`. Returns
    supervisord's exit status (0 after a requested stop)."""
    out = out if out is not None else sys.stdout.buffer
    (var / "supervisor").mkdir(parents=True, exist_ok=True)
    (var / "log").mkdir(parents=True, exist_ok=True)
    conf = var / "supervisor" / "supervisord.conf"
    _write(conf, render_supervisor_config(programs, root, var, supervision, program_env), 0o600)
    names = ["supervisord", *(p.name for p in programs)]
    # supervisord's lines last: what a program said before it died, then supervisord's word on it.
    followers = {p.name: _Follower(program_log(var, p.name)) for p in programs}
    followers["supervisord"] = _Follower((var / "log" / "supervisord.log").resolve())
    width = max(map(len, names))
    color = out.isatty() and os.environ.get("NO_COLOR") is None
    prefixes = {}
    for i, name in enumerate(names):
        label = name.ljust(width).encode()
        prefixes[name] = b"\x1b[%dm%s |\x1b[0m " % (_COLORS[i % len(_COLORS)], label) if color else label + b" | "

    proc: subprocess.Popen[bytes] | None = None
    stopping = False
    reader_gone = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # not SIGHUP, which would make supervisord reload

    def emit(name: str, lines: list[bytes]) -> None:
        nonlocal reader_gone
        if not lines or reader_gone:
            return
        stamp = time.strftime("%H:%M:%S ").encode()
        chunk = bytearray()
        for line in lines:
            chunk += stamp + prefixes[name] + line.rstrip(b"\r") + b"\n"
            if name == "supervisord" and (gave_up := _GAVE_UP.search(line)):
                program = gave_up.group(1).decode(errors="replace")
                hint = (
                    f"{program} kept dying right after starting and will not be restarted: see "
                    f"{program_log(var, program)}, fix it, then `uv run supervisorctl -c {conf} start {program}`"
                )
                chunk += stamp + prefixes[name] + hint.encode() + b"\n"
        try:
            out.write(bytes(chunk))
            out.flush()
        except BrokenPipeError:  # the reader went away (`make run | head`): stop the stack
            reader_gone = True
            stop(signal.SIGPIPE, None)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "--nodaemon", "--configuration", str(conf)],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_set_parent_death_signal,  # this process runs no threads
        )
        if stopping:  # Ctrl-C while it was being started
            proc.send_signal(signal.SIGTERM)
        while True:
            exited = proc.poll() is not None
            for name, follower in followers.items():
                emit(name, follower.close() if exited else follower.read())
            if exited:
                break
            time.sleep(poll)
    finally:
        if proc is not None and proc.poll() is None:  # an exception here: never leave supervisord behind
            proc.terminate()
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = proc.returncode
    return 0 if stopping and code in (0, -signal.SIGTERM) else code
