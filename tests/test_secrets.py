"""`iotpipe secrets` (iotpipe.devstack): what it creates, that it never replaces a secret someone put
there (bring your own), and how it shares each compose container's own secrets out (`--share`, the
one-shot `secrets` service of docker-compose.yml). And the images' `iotpipe health`."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from iotpipe import ConfigError, devstack
from iotpipe.cli import main
from iotpipe.devstack import (
    CONTAINER_SECRETS,
    MQTT_USERS,
    SERVICES,
    ensure_secrets,
    missing_secrets,
    share_secrets,
)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def issued_by(cert_file: Path, ca_file: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in secrets_dir.iterdir()}
    ensure_secrets(secrets_dir)
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in secrets_dir.iterdir()} == before
    assert not [p for p in secrets_dir.iterdir() if p.name.endswith(".tmp")]


def test_your_own_secrets_are_kept_and_only_the_missing_ones_are_created(tmp_path: Path) -> None:
    # "Your own": a complete set from elsewhere, of which we keep a CA (certificate only: its key
    # stays offline), its certificates and keys, a key ring and a few passwords.
    theirs = ensure_secrets(tmp_path / "theirs")
    mine = tmp_path / "mine"
    mine.mkdir()
    kept = ["keyring", "ca_crt", "server_crt", "server_key", "mqtt_bridge_crt", "mqtt_bridge_key", "cloud_token"]
    kept += [f"mqtt_{s.replace('-', '_')}_crt" for s in SERVICES] + [
        f"mqtt_{s.replace('-', '_')}_key" for s in SERVICES
    ]
    kept += ["mqtt_monitor_password", "redis_reader_password"]
    for name in kept:
        shutil.copy(theirs / name, mine / name)
    ours = contents(mine)

    ensure_secrets(mine)
    after = contents(mine)
    assert {name: after[name] for name in ours} == ours, "an existing secret was replaced"
    assert "ca_key" not in after, "no CA key was needed, so none was made (and no second CA)"
    assert not missing_secrets(mine)
    # The derived files agree with the passwords that were there.
    assert after["mosquitto_passwd"].decode().splitlines()[MQTT_USERS.index("monitor")].startswith("monitor:$7$")


def test_a_missing_certificate_is_issued_by_the_ca_that_is_there(tmp_path: Path) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    ca = secrets_dir.joinpath("ca_crt").read_bytes()
    for name in ("server_crt", "server_key", "mqtt_bridge_crt", "mqtt_bridge_key"):
        (secrets_dir / name).unlink()
    ensure_secrets(secrets_dir)
    assert secrets_dir.joinpath("ca_crt").read_bytes() == ca, "the CA was replaced"
    assert issued_by(secrets_dir / "server_crt", secrets_dir / "ca_crt")
    assert issued_by(secrets_dir / "mqtt_bridge_crt", secrets_dir / "ca_crt")


def dns_names(cert_file: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


def test_our_broker_certificate_from_an_older_release_gets_the_names_clients_now_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older release's certificate: no `mosquitto-public`, the public broker's compose name, which
    # the exporter's TLS connection checks (found by make test-compose).
    with monkeypatch.context() as m:
        m.setattr(devstack, "_TLS_NAMES", ("localhost", "mosquitto", "broker"))
        secrets_dir = ensure_secrets(tmp_path / "secrets")
    assert "mosquitto-public" not in dns_names(secrets_dir / "server_crt")
    ca = secrets_dir.joinpath("ca_crt").read_bytes()
    ensure_secrets(secrets_dir)
    assert dns_names(secrets_dir / "server_crt") >= {"localhost", "mosquitto", "mosquitto-public", "broker"}
    assert issued_by(secrets_dir / "server_crt", secrets_dir / "ca_crt")
    assert secrets_dir.joinpath("ca_crt").read_bytes() == ca, "the CA was replaced"


def test_a_broker_certificate_of_another_ca_is_never_reissued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(devstack, "_TLS_NAMES", ("localhost",))
        theirs = ensure_secrets(tmp_path / "theirs")
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    for name in ("server_crt", "server_key"):
        shutil.copy(theirs / name, secrets_dir / name)
    before = contents(secrets_dir)
    ensure_secrets(secrets_dir)
    assert contents(secrets_dir) == before


@pytest.mark.parametrize(
    ("remove", "error"),
    [
        (["server_key"], "server_crt is there but server_key is not"),
        (["ca_crt"], "ca_key is there but ca_crt is not"),
        (["server_crt", "server_key", "ca_key"], "and so is ca_key"),
    ],
)
def test_half_of_a_pair_is_refused_rather_than_completed(tmp_path: Path, remove: list[str], error: str) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    for name in remove:
        (secrets_dir / name).unlink()
    before = contents(secrets_dir)
    with pytest.raises(ConfigError, match=error):
        ensure_secrets(secrets_dir)
    assert {k: v for k, v in contents(secrets_dir).items() if k in before} == before


def test_third_party_users_added_to_the_public_broker_are_kept(tmp_path: Path) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    public = secrets_dir / "public_mosquitto_passwd"
    added = "telegraf:$7$101$c2FsdHNhbHRzYWx0$aGFzaA==\n"
    public.write_text(public.read_text() + added)
    pipeline = secrets_dir / "mosquitto_passwd"
    pipeline_before = pipeline.read_text()
    pipeline.write_text(pipeline_before + "reader:$7$101$old$old\n")  # an older layout's user

    ensure_secrets(secrets_dir)
    assert public.read_text().endswith(added), "the operator's user was dropped"
    # The pipeline broker admits our users only: the stray line goes, ours stay as they were.
    assert pipeline.read_text() == pipeline_before


def test_share_gives_each_container_exactly_its_own_secrets(tmp_path: Path) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    root = tmp_path / "shares"
    for service in CONTAINER_SECRETS:
        (root / service).mkdir(parents=True)
    (root / "monitor" / "cloud_token").write_text("left over from an older list\n")

    written = share_secrets(secrets_dir, root)
    assert written == {service: list(names) for service, names in sorted(CONTAINER_SECRETS.items())}
    for service, names in CONTAINER_SECRETS.items():
        share = contents(root / service)
        assert set(share) == set(names), f"{service} holds {sorted(share)}"
        assert all(share[name] == (secrets_dir / name).read_bytes() for name in names)
        modes = {stat.S_IMODE((root / service / name).stat().st_mode) for name in names}
        assert modes == {0o444}, "readable by the container's unprivileged user, by nobody writable"
    assert not any("ca_key" in names for names in CONTAINER_SECRETS.values())

    # Unchanged: left alone (same inode). Changed (a rotated key ring): replaced by rename.
    inodes = {name: (root / "monitor" / name).stat().st_ino for name in CONTAINER_SECRETS["monitor"]}
    keyring = secrets_dir / "keyring"
    keyring.write_text(keyring.read_text() + "k2 " + "A" * 43 + "=\n")
    assert share_secrets(secrets_dir, root)["monitor"] == ["keyring"]
    assert (root / "monitor" / "keyring").read_bytes() == keyring.read_bytes()
    assert (root / "monitor" / "keyring").stat().st_ino != inodes["keyring"]
    assert (root / "monitor" / "ca_crt").stat().st_ino == inodes["ca_crt"]
    assert not [p for p in root.rglob("*.tmp")]


def test_share_refuses_an_unknown_container_and_a_missing_secret(tmp_path: Path) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    root = tmp_path / "shares"
    (root / "grafana").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no container is called grafana"):
        share_secrets(secrets_dir, root)
    (root / "grafana").rmdir()
    (root / "monitor").mkdir()
    (secrets_dir / "mqtt_monitor_password").unlink()
    with pytest.raises(ConfigError, match="lacks mqtt_monitor_password"):
        share_secrets(secrets_dir, root)
    assert not list((root / "monitor").iterdir())


def test_cli_creates_and_shares_or_with_no_create_only_checks(tmp_path: Path) -> None:
    runner = CliRunner()
    root = tmp_path / "shares"
    (root / "redis").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()

    refused = runner.invoke(
        main, ["secrets", str(empty), "--share", str(root)], env={"IOTPIPE_SECRETS_CREATE": "false"}
    )
    assert refused.exit_code == 1 and "lacks mosquitto_passwd" in refused.output
    assert all(name in refused.output for names in CONTAINER_SECRETS.values() for name in names)
    assert not list(empty.iterdir()) and not list((root / "redis").iterdir()), "--no-create created something"

    made = runner.invoke(main, ["secrets", str(empty), "--share", str(root)])
    assert made.exit_code == 0, made.output
    assert set(contents(root / "redis")) == set(CONTAINER_SECRETS["redis"])
    assert "redis: redis_users_acl, redis_reader_password" in made.output

    again = runner.invoke(main, ["secrets", str(empty), "--no-create", "--share", str(root)])
    assert again.exit_code == 0 and "redis: up to date" in again.output, again.output
    assert os.stat(empty).st_mode & 0o077 == 0, "the store keeps other local users out"


def test_health_without_a_service_checks_the_images_own(tmp_path: Path) -> None:
    """The images' HEALTHCHECK is `iotpipe health` alone: the service named by the image
    (IOTPIPE_SERVICE_MODULE); the cloud-sink by its /healthz."""
    runner = CliRunner()
    assert runner.invoke(main, ["health"], env={"IOTPIPE_SERVICE_MODULE": ""}).exit_code == 2

    health = tmp_path / "health"
    health.mkdir()
    env = {"IOTPIPE_SERVICE_MODULE": "cache_writer", "IOTPIPE_HEALTH_DIR": str(health), "IOTPIPE_INSTANCE": "1"}
    assert runner.invoke(main, ["health"], env=env).exit_code == 1, "no health file yet"
    doc = {"state": "online", "connected": True, "ts": int(time.time() * 1000)}
    (health / "cache-writer-1.json").write_text(json.dumps(doc))
    assert runner.invoke(main, ["health"], env=env).exit_code == 0

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.HTTPServer(("localhost", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sink = {"IOTPIPE_SERVICE_MODULE": "cloud_sink", "IOTPIPE_SINK_PORT": str(server.server_address[1])}
        assert runner.invoke(main, ["health"], env=sink).exit_code == 0
    finally:
        server.shutdown()
        server.server_close()
    refused = runner.invoke(main, ["health"], env=sink)
    assert refused.exit_code == 1 and "cloud-sink on port" in refused.output
