"""The `iotpipe` command: subscribe and decrypt, generate dev secrets, run the local stack."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import orjson

from ._bus import Bus, PlainMessage
from ._envelope import KeyRing, Opener
from ._errors import DuplicateMessage, IotpipeError, PermanentError
from ._health import check_health
from ._keys import (
    RingFile,
    ServiceKeys,
    key_from,
    promote_blockers,
    retire_blockers,
    status_lines,
    statuses_from_broker,
    statuses_from_health,
)
from ._models import Alert, HealthReport, Processed, RawBatch, json_schemas, to_builtins
from ._redis import REDIS_PREFIX
from ._settings import ServiceSettings, health_file_for
from ._topics import Topics, validate_id
from ._watch import MAX_ALERTS, LiveView, SealedOpener
from .bench import bench_command
from .devstack import (
    LOCAL_METRICS_BASE,
    Ports,
    ensure_secrets,
    local_metrics_ports,
    missing_secrets,
    prepare_local_stack,
    read_procfile,
    share_secrets,
    stack_running,
    supervise,
)

# The models of the sealed topics, by the topic level after `<base>/v2/`.
SEALED_KINDS: dict[str, Any] = {"raw": RawBatch, "processed": Processed, "health": HealthReport, "alerts": Alert}


class SubscriberSettings(ServiceSettings):
    """Same IOTPIPE_ variables as the services; connects as the read-only `reader` user of the public
    broker unless told another user (IOTPIPE_MQTT__USERNAME or --user)."""

    service_name = "reader"


def reader_client_id(user: str = SubscriberSettings.service_name) -> str:
    """A fresh client id for one of this command's own connections: `<user>-<id>`, as the pipeline
    broker requires (and harmless on the public one); no one's session is touched."""
    return f"{user}-sub-{uuid.uuid4().hex[:8]}"


@click.group()
def main() -> None:
    """iotpipe: MQTT sensor pipeline tools."""


# The connection options of the commands that read as the read-only user (`sub`, `watch`): one
# definition, so both connect the same way (host, port and TLS from the IOTPIPE_MQTT__ variables).
_secrets_dir_option = click.option(
    "--secrets-dir", type=click.Path(path_type=Path), help="default: $IOTPIPE_SECRETS_DIR"
)
_user_option = click.option(
    "--user",
    help="broker user (default `reader`, on the public broker); an operator holding a service's password "
    "may watch that service's topics on the pipeline broker as it (never joining its group or session)",
)


def reader_settings(secrets_dir: Path | None, user: str | None) -> SubscriberSettings:
    """The settings of a read-only connection: the IOTPIPE_ variables, then the command's options."""
    try:
        overrides: dict[str, object] = {"secrets_dir": secrets_dir} if secrets_dir else {}
        settings = SubscriberSettings.load(**overrides)
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None
    if user is not None:
        settings = settings.model_copy(update={"mqtt": settings.mqtt.model_copy(update={"username": user})})
    return settings


def reader_bus(settings: SubscriberSettings, what: str) -> Bus:
    """A Bus for one read-only connection (not started), keeping no session at the broker. `what`
    names the command in our `src`."""
    mqtt = settings.mqtt.model_copy(update={"session_expiry": 0})
    user = mqtt.username or SubscriberSettings.service_name
    return Bus(
        mqtt,
        # `<user>-<id>`, as the pipeline broker requires; a fresh id, so no one's session is touched.
        client_id=reader_client_id(user),
        keyring=None,
        src=f"{user}/{what}",
        username=user,
        password_file=settings.mqtt_password_path,
    )


@main.command()
@click.argument("topic_filter", default="iotpipe/v2/#")
@click.option("--count", "-n", type=int, default=0, help="exit after this many messages (0 = run until Ctrl-C)")
@_secrets_dir_option
@_user_option
def sub(topic_filter: str, count: int, secrets_dir: Path | None, user: str | None) -> None:
    """Subscribe and print each message as one JSON line, sealed payloads opened and verified (raw,
    processed, health, alerts), status payloads as they are. By default as the read-only `reader`
    of the public broker (point IOTPIPE_MQTT__HOST/PORT at it), which carries statuses and alerts."""
    settings = reader_settings(secrets_dir, user)
    try:
        asyncio.run(_subscribe(settings, topic_filter, count))
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


async def _subscribe(settings: SubscriberSettings, topic_filter: str, count: int) -> None:
    keyring = KeyRing.from_file(settings.keyring_path)
    opener = Opener(keyring, ttl=settings.message_ttl, max_bytes=settings.max_payload_bytes)
    bus = reader_bus(settings, "cli")
    done = asyncio.Event()
    seen = 0

    async def show(messages: Sequence[PlainMessage[None]]) -> None:
        nonlocal seen
        for message in messages:
            if done.is_set():
                return
            line = _describe(opener, message)
            if line is None:
                continue
            try:
                sys.stdout.write(orjson.dumps(line).decode() + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader went away (`| head -3`): stop quietly, as Unix tools do.
                _silence_stdout()
                done.set()
                return
            seen += 1
            if count and seen >= count:
                done.set()

    bus.subscribe(topic_filter, show, sealed=False)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await bus.start()
    await bus.wait_connected()
    try:
        await done.wait()
    finally:
        await bus.stop()


def _describe(opener: Opener, message: PlainMessage[None]) -> dict[str, object] | None:
    """One output line: sealed payloads opened and validated, plain ones as they are; None for a
    QoS 1 duplicate."""
    parts = message.topic.split("/")
    line: dict[str, object] = {"topic": message.topic}
    model = SEALED_KINDS.get(parts[2]) if len(parts) >= 3 else None
    if model is not None:
        try:
            opened = opener.open(message.topic, message.payload, model)
            opener.commit(opened)
            line.update(src=opened.src, seq=opened.seq, ts=opened.ts, data=to_builtins(opened.data))
        except DuplicateMessage:
            return None
        except PermanentError as exc:
            line.update(rejected=exc.reason, error=str(exc))
    else:
        try:
            line["data"] = orjson.loads(message.payload) if message.payload else None
        except orjson.JSONDecodeError:
            line["payload"] = message.payload.decode("utf-8", "replace")
        line["retained"] = message.retain
    return line


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@main.command()
@_secrets_dir_option
@_user_option
@click.option(
    "--alerts",
    "max_alerts",
    type=click.IntRange(1, 1000),
    default=MAX_ALERTS,
    show_default=True,
    help="recent alerts kept and shown",
)
def watch(secrets_dir: Path | None, user: str | None, max_alerts: int) -> None:
    """Live view for operators: each device (state, latest values, last seen), each service instance
    (state, messages/s in and out, rejections, lag) and the recent alerts, refreshed in place. Reads
    what the read-only `reader` may read on the public broker (point IOTPIPE_MQTT__HOST/PORT at it,
    as for `sub`); with the key ring at hand it also opens the sealed alerts. `q` quits."""
    try:
        from .watch import WatchApp, subscriptions  # Textual: only for this command
    except ImportError as exc:  # a service image, which has no reason to carry a terminal UI
        raise click.ClickException(
            f"iotpipe watch needs the `watch` extra ({exc.name} is missing): pip install 'iotpipe[watch]' "
            "(the repository's `uv sync` has it)"
        ) from None

    settings = reader_settings(secrets_dir, user)
    opener, sealed_note = _alert_opener(settings)
    view = LiveView(open_sealed=opener, max_alerts=max_alerts)
    try:
        bus = reader_bus(settings, "watch")
    except IotpipeError as exc:  # its password file
        raise click.ClickException(str(exc)) from None
    app = WatchApp(
        view,
        bus,
        where=f"{settings.mqtt.host}:{settings.mqtt.port}{' (TLS)' if settings.mqtt.tls else ''} as "
        f"{settings.mqtt.username or SubscriberSettings.service_name}",
        sealed_note=sealed_note,
    )
    for topic_filter in subscriptions(Topics(settings.base_topic).root, sealed_alerts=opener is not None):
        bus.subscribe(topic_filter, app.on_messages, sealed=False)
    app.run()
    sys.exit(app.return_code or 0)


def _alert_opener(settings: SubscriberSettings) -> tuple[SealedOpener | None, str]:
    """How `watch` opens the sealed alerts the bridge brings, and what the header says of it: with the
    key ring if this user holds it, else not at all (the projection's plain copy of each alert is shown)."""
    try:
        keyring = KeyRing.from_file(settings.keyring_path)
    except IotpipeError:
        return None, "alerts: projection only (no key ring)"
    opener = Opener(keyring, ttl=settings.message_ttl, max_bytes=settings.max_payload_bytes)

    def open_alert(topic: str, payload: bytes) -> dict[str, Any] | None:
        try:
            opened = opener.open(topic, payload, Alert)
        except DuplicateMessage:
            return None
        opener.commit(opened)
        doc: dict[str, Any] = to_builtins(opened.data)
        return doc

    return open_alert, "alerts: sealed (key ring) + projection"


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("secrets"))
@click.option(
    "--redis-prefix",
    "redis_prefixes",
    multiple=True,
    default=(REDIS_PREFIX,),
    show_default=True,
    help="Redis key prefix the ACL lets cache-writer and reader reach (IOTPIPE_REDIS_PREFIX); repeatable",
)
@click.option(
    "--share",
    "share_root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="then copy into each ROOT/<compose service>/ exactly the secrets that container holds",
)
@click.option(
    "--create/--no-create",
    default=True,
    show_default=True,
    envvar="IOTPIPE_SECRETS_CREATE",
    help="create what is missing; --no-create (or IOTPIPE_SECRETS_CREATE=false) changes nothing in "
    "DIRECTORY and fails naming each missing file (your own secrets, in production)",
)
def secrets(directory: Path, redis_prefixes: tuple[str, ...], share_root: Path | None, create: bool) -> None:
    """Create missing dev secrets (keys, passwords, TLS material) in DIRECTORY; bring the files derived
    from the passwords (Redis ACL, hashed password files) up to date. No existing secret is replaced."""
    try:
        if create:
            ensure_secrets(directory, [validate_id(p, "--redis-prefix") for p in redis_prefixes])
            click.echo(f"secrets ready in {directory}/ (missing ones created, existing ones kept)")
        else:
            missing = missing_secrets(directory)
            if missing:
                raise click.ClickException(f"{directory}/ lacks {', '.join(missing)} (and --no-create is set)")
            click.echo(f"secrets ready in {directory}/ (nothing created: --no-create)")
        if share_root is not None:
            for service, written in share_secrets(directory, share_root).items():
                click.echo(f"{service}: {', '.join(written) if written else 'up to date'}")
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=Path("docs/schema"))
@click.option("--check", is_flag=True, help="exit 1 if DIRECTORY differs from what the models produce")
def schema(directory: Path, check: bool) -> None:
    """Write the JSON Schema of every payload (generated from iotpipe._models) into DIRECTORY."""
    stale = []
    for name, document in json_schemas().items():
        path = directory / f"{name}.json"
        text = orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        raise click.ClickException(f"out of date: {', '.join(map(str, stale))} (run `iotpipe schema`)")
    click.echo(f"{'checked' if check else 'wrote'} {len(json_schemas())} schemas in {directory}/")


@main.command()
@click.option("--check", type=click.Path(path_type=Path, dir_okay=False), help="exit 1 if this file differs")
def asyncapi(check: Path | None) -> None:
    """Print the AsyncAPI 3.0 document of both brokers' topics (docs/asyncapi.yaml), generated from
    the models and topic definitions; with --check, compare it with that file instead."""
    from ._asyncapi import COMMAND, document, to_yaml

    try:
        text = to_yaml(document())
    except ModuleNotFoundError as exc:  # Home Assistant discovery is the exporter's own code
        raise click.ClickException(f"needs the exporter package (the dev environment, `uv sync`): {exc}") from None
    if check is None:
        click.echo(text, nl=False)
    elif not check.exists() or check.read_text(encoding="utf-8") != text:
        raise click.ClickException(f"{check} is out of date: run `{COMMAND}`")


@main.command()
@click.argument("kid")
def keygen(kid: str) -> None:
    """Print a new key ring line `<KID> <fernet key>` (for key rotation; see docs/operations.md)."""
    try:
        click.echo(KeyRing.generate_line(validate_id(kid, "key id")))
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def keys() -> None:
    """Rotate the payload key without downtime, one checked step at a time (docs/operations.md):
    `add` a new key, `promote` it once every service holds it, `retire` the old one once nothing
    sealed with it can still arrive. `status` shows the ring, what each service holds, and the next
    step. Key material is never printed."""


_keyring_option = click.option(
    "--keyring",
    "keyring_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="the key ring file to show or edit (default: $IOTPIPE_KEYRING_FILE, else $IOTPIPE_SECRETS_DIR/keyring)",
)
_health_option = click.option(
    "--health-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="read the services' reports from their health files here, not from their retained statuses "
    "(which are read as the read-only MQTT user)",
)
_force_option = click.option("--force", is_flag=True, help="do it even though the services' reports say it is unsafe")


def _keys_settings(keyring_file: Path | None) -> tuple[SubscriberSettings, Path]:
    try:
        settings = SubscriberSettings.load()
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None
    return settings, keyring_file or settings.keyring_path


def _read_ring(path: Path) -> RingFile:
    try:
        return RingFile.read(path)
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None


def _reports(settings: SubscriberSettings, health_dir: Path | None) -> tuple[list[ServiceKeys] | None, str]:
    """The services' key ring reports, or None and why they cannot be seen."""
    if health_dir is not None:
        return statuses_from_health(health_dir), f"health files in {health_dir}"
    try:
        return asyncio.run(statuses_from_broker(settings, reader_client_id())), "retained statuses"
    except IotpipeError as exc:
        return None, str(exc)


def _save(ring: RingFile) -> None:
    try:
        ring.save()
    except (IotpipeError, OSError) as exc:
        raise click.ClickException(f"could not rewrite {ring.path}: {exc}") from None


def _refuse(what: str, blockers: list[str], force: bool) -> None:
    if not blockers:
        return
    listed = "".join(f"\n  - {b}" for b in blockers)
    if force:
        click.echo(f"--force: {what} although:{listed}", err=True)
        return
    raise click.ClickException(
        f"refusing to {what}:{listed}\n(`iotpipe keys status` shows each service; --force overrides)"
    )


@keys.command("status")
@_keyring_option
@_health_option
def keys_status(keyring_file: Path | None, health_dir: Path | None) -> None:
    """The key ring (ids, which one encrypts), what each service reports holding, and the next step."""
    settings, path = _keys_settings(keyring_file)
    ring = _read_ring(path)
    services, source = _reports(settings, health_dir)
    now = time.time_ns() // 1_000_000
    for line in status_lines(ring, services, settings.message_ttl, now):
        click.echo(line)
    if services is None:
        click.echo(f"\nthe services' reports cannot be seen: {source}")


@keys.command("add")
@click.argument("kid")
@click.option(
    "--from",
    "from_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="copy KID's key from this file (another host's key ring, or a line `iotpipe keygen` printed) "
    "instead of generating a new one",
)
@_keyring_option
def keys_add(kid: str, from_file: Path | None, keyring_file: Path | None) -> None:
    """Step 1: append a new key KID, decrypt-only (the first key still encrypts)."""
    _settings, path = _keys_settings(keyring_file)
    ring = _read_ring(path)
    try:
        validate_id(kid, "key id")
        key = key_from(from_file, kid) if from_file else KeyRing.generate_line(kid).split()[1]
        ring.add(kid, key)
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None
    _save(ring)
    click.echo(
        f"added {kid} to {path}: every service using it re-reads it within a few seconds and then also decrypts "
        f"{kid}.\nNext: the same key on every other host's ring (iotpipe keys add {kid} --keyring <its file> "
        f"--from {path}), then, once `iotpipe keys status` shows every service holding it: iotpipe keys promote {kid}"
    )


@keys.command("promote")
@click.argument("kid")
@_keyring_option
@_health_option
@_force_option
def keys_promote(kid: str, keyring_file: Path | None, health_dir: Path | None, force: bool) -> None:
    """Step 2: make KID the key that encrypts; refused unless every running service holds it."""
    settings, path = _keys_settings(keyring_file)
    ring = _read_ring(path)
    try:
        ring.key_line(kid)
    except IotpipeError as exc:
        raise click.ClickException(f"{exc}: add it first (iotpipe keys add {kid})") from None
    if ring.kids[0] == kid:
        click.echo(f"{kid} already encrypts in {path}")
        return
    services, why = _reports(settings, health_dir)
    blockers = promote_blockers(kid, services) if services is not None else [f"cannot see the services: {why}"]
    _refuse(f"promote {kid}: a service that lacks it cannot open what is sealed with it", blockers, force)
    old = ring.kids[0]
    ring.promote(kid)
    _save(ring)
    click.echo(
        f"{kid} now encrypts in {path} ({old} still decrypts). Next: promote it on every other host's ring; "
        f"once nothing sealed with {old} can still arrive (the message TTL, {settings.message_ttl} s, after every "
        f"service seals with {kid}): iotpipe keys retire {old}"
    )


@keys.command("retire")
@click.argument("kid")
@_keyring_option
@_health_option
@_force_option
def keys_retire(kid: str, keyring_file: Path | None, health_dir: Path | None, force: bool) -> None:
    """Step 3: remove the old key KID; refused while a message sealed with it may still arrive."""
    settings, path = _keys_settings(keyring_file)
    ring = _read_ring(path)
    try:
        ring.retire(kid)  # never the key that encrypts, nor a key it does not hold (not even with --force)
    except IotpipeError as exc:
        raise click.ClickException(str(exc)) from None
    services, why = _reports(settings, health_dir)
    now = time.time_ns() // 1_000_000
    blockers = (
        retire_blockers(kid, services, settings.message_ttl, now)
        if services is not None
        else [f"cannot see the services: {why}"]
    )
    _refuse(f"retire {kid}: what is sealed with it could no longer be opened", blockers, force)
    _save(ring)
    click.echo(
        f"retired {kid} from {path}: it holds {', '.join(ring.kids)}. Next: retire it on every other host's ring"
    )


# The service an image runs (services/Dockerfile sets it): `iotpipe health` without SERVICE checks it.
IMAGE_SERVICE_ENV = "IOTPIPE_SERVICE_MODULE"
CLOUD_SINK = "cloud-sink"


@main.command()
@click.argument("service", required=False)
@click.option("--instance", default=None, help="default: $IOTPIPE_INSTANCE or the host name")
@click.option("--max-age", type=float, default=30.0, show_default=True)
def health(service: str | None, instance: str | None, max_age: float) -> None:
    """Exit 0 if SERVICE's health file is fresh and online (container healthchecks use this). Without
    SERVICE: the service of this image ($IOTPIPE_SERVICE_MODULE); the cloud-sink, which keeps no health
    file, answers on its /healthz ($IOTPIPE_SINK_PORT)."""
    if service is None:
        module = os.environ.get(IMAGE_SERVICE_ENV)
        if not module:
            raise click.UsageError(f"name the SERVICE (or set {IMAGE_SERVICE_ENV}, as the images do)")
        service = module.replace("_", "-")
    if service == CLOUD_SINK:
        ok, why = _sink_answers(int(os.environ.get("IOTPIPE_SINK_PORT", "8080")))
    else:
        settings = ServiceSettings.load(**({"instance": instance} if instance else {}))
        ok, why = check_health(health_file_for(settings.health_dir, service, settings.instance), max_age)
    click.echo(why)
    sys.exit(0 if ok else 1)


def _sink_answers(port: int) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/healthz", timeout=4) as response:
            return response.status == 200, f"cloud-sink answered {response.status}"
    except (OSError, ValueError) as exc:
        return False, f"cloud-sink on port {port}: {exc}"


@main.command()
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=Path("."))
def stack(root: Path) -> None:
    """Run broker, Redis, cloud-sink and the five services (the Procfile) as local processes under
    supervisord, which restarts any that dies; every line prefixed by its process. Ctrl-C stops."""
    root = root.resolve()
    missing = [b for b in ("mosquitto", "redis-server") if shutil.which(b) is None]
    if missing:
        raise click.ClickException(
            f"{' and '.join(missing)} not found: run `make run` (installs them) or "
            "install the mosquitto and redis-server OS packages"
        )
    try:
        programs = read_procfile(root / "Procfile")
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    ports = Ports(
        mqtt=int(os.environ.get("IOTPIPE_STACK_MQTT_PORT", 18830)),
        mqtt_tls=int(os.environ.get("IOTPIPE_STACK_MQTT_TLS_PORT", 18883)),
        redis=int(os.environ.get("IOTPIPE_STACK_REDIS_PORT", 16379)),
        sink=int(os.environ.get("IOTPIPE_STACK_SINK_PORT", 18080)),
        mqtt_mtls=int(os.environ.get("IOTPIPE_STACK_MQTT_MTLS_PORT", 18884)),
        mqtt_bridge=int(os.environ.get("IOTPIPE_STACK_MQTT_BRIDGE_PORT", 18885)),
        public=int(os.environ.get("IOTPIPE_STACK_PUBLIC_PORT", 11883)),
        public_tls=int(os.environ.get("IOTPIPE_STACK_PUBLIC_TLS_PORT", 18893)),
    )
    metrics = local_metrics_ports(int(os.environ.get("IOTPIPE_STACK_METRICS_PORT", LOCAL_METRICS_BASE)))
    var = root / "var"
    if stack_running(var):  # before anything of its is rewritten (configs, supervisorctl's password)
        raise click.ClickException(
            f"a local stack started from {root} is running already: stop it first (Ctrl-C in its terminal, "
            f"or `uv run supervisorctl -c {var / 'supervisor/supervisord.conf'} shutdown`)"
        )
    try:
        env = prepare_local_stack(root, var, ports)
    except RuntimeError as exc:  # the broker plugin could not be built
        raise click.ClickException(str(exc)) from None
    scrape = ", ".join(f"{name} {port}" for name, port in metrics.items()) if any(metrics.values()) else "off"
    click.echo(
        f"local stack: pipeline MQTT {ports.mqtt} (TLS {ports.mqtt_tls}, mTLS {ports.mqtt_mtls}), "
        f"public MQTT for third parties {ports.public} (TLS {ports.public_tls}), Redis {ports.redis}, "
        f"cloud-sink {ports.sink}; Prometheus /metrics on 127.0.0.1: {scrape}; logs in {var / 'log'}/; "
        f"`uv run supervisorctl -c {var / 'supervisor/supervisord.conf'} status` shows the processes"
    )
    code = supervise(
        programs,
        root,
        var,
        {**os.environ, **env},
        program_env={name: {"IOTPIPE_METRICS_PORT": str(port)} for name, port in metrics.items()},
    )
    sys.exit(128 - code if code < 0 else code)  # killed by a signal: the shell's 128 + signal


main.add_command(bench_command)  # `iotpipe bench`, defined in iotpipe.bench

if __name__ == "__main__":
    main()
