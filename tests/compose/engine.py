"""docker-compose.yml brought up for real on a machine with no Docker engine and no registry.

- The engine: rootful podman, whose Docker-compatible API (`podman system service`, on a socket of
  the test's own) docker-compose (Debian's 1.29; Docker users run Compose v2 on the same file)
  drives through DOCKER_HOST. A containers.conf of our own sets the ulimits containers here need
  ("error setting rlimit type 7" without them).
- Healthchecks: podman 4.3 schedules them with systemd timers, and PID 1 here is not systemd, so
  `HealthScheduler` does what the Docker engine does: it runs each container's healthcheck
  (`podman healthcheck run`), every FAST_INTERVAL s until the container is healthy, then at its
  configured interval. Without it, `service_healthy` never completes.
- Base images: none can be pulled, so each base image the Dockerfiles and the compose file name is
  replaced by a stand-in of exactly that name, built from Debian's packages (`ensure_standins`):
  the Debian base by debootstrap from the mirror apt already uses, the Python base and Redis as
  that plus Debian's python3 and redis-server (config paths and user as in the official images),
  the uv image as the pinned uv binary alone. The stand-ins carry this machine's CA bundle (HTTPS
  is intercepted here), which a build's pip/uv then trusts; the project's files are used unchanged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
# A container not yet healthy is checked this often (Docker's `start_interval` idea); a healthy one
# at its own interval. Each check of a Python service costs an interpreter start: no faster.
FAST_INTERVAL = 2.0


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    stdin: Any = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, stdin=stdin
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(cmd)}` exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def qualified(image: str) -> str:
    """The full name Docker gives a short one (`redis:7.2.5` is docker.io/library/redis:7.2.5)."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


def base_images(root: Path = ROOT) -> list[str]:
    """Every image the project builds from or runs as is: FROM lines (not earlier stages) of the
    Dockerfiles the compose file builds, and its `image:`s."""
    import yaml

    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    images: dict[str, None] = {}
    dockerfiles = {svc["build"]["dockerfile"] for svc in compose["services"].values() if "build" in svc}
    for dockerfile in sorted(dockerfiles):
        stages: set[str] = set()
        for line in (root / dockerfile).read_text().splitlines():
            match = re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
            if match:
                if match.group(1) not in stages:
                    images[match.group(1)] = None
                if match.group(2):
                    stages.add(match.group(2))
    for svc in compose["services"].values():
        if "image" in svc and "build" not in svc:
            images[svc["image"]] = None
    return list(images)


def debian_sources() -> list[tuple[str, str]]:
    """(URI, suite) of every Debian archive apt uses here (deb822 .sources or one-line .list)."""
    found: list[tuple[str, str]] = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        text = path.read_text()
        if path.name.endswith(".sources"):
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"(?m)^(\w[\w-]*):\s*(.*)$", block))
                found += [(u, s) for u in fields.get("URIs", "").split() for s in fields.get("Suites", "").split()]
        else:
            found += re.findall(r"(?m)^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text)
    return [(uri, suite) for uri, suite in found if "debian" in uri and suite.startswith("bookworm")]


class Podman:
    """The podman CLI with our containers.conf, and its Docker API on a socket of our own."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.conf = workdir / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.socket = workdir / "podman.sock"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self._service: subprocess.Popen[bytes] | None = None

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], env=self.env, timeout=timeout, check=check)

    def has_image(self, name: str) -> bool:
        return self("image", "exists", qualified(name), check=False).returncode == 0

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def ping(self) -> bool:
        conn = _UnixHTTPConnection(str(self.socket))
        try:
            conn.request("GET", "/_ping")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    @contextlib.contextmanager
    def api(self) -> Iterator[Podman]:
        """`podman system service` on our socket for as long as the block runs."""
        self.socket.unlink(missing_ok=True)
        log = (self.workdir / "podman-service.log").open("ab")
        self._service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.docker_host],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not self.ping():
                if self._service.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"podman system service did not answer (log: {log.name})")
                time.sleep(0.2)  # wait-ok: polling podman's API socket, bounded by the deadline
            yield self
        finally:
            self._service.terminate()
            try:
                self._service.wait(30)
            except subprocess.TimeoutExpired:
                self._service.kill()
                self._service.wait(10)
            log.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


# --- stand-in base images --------------------------------------------------------------------------


def ensure_standins(podman: Podman, workdir: Path, root: Path = ROOT) -> dict[str, float]:
    """Build each missing base image's stand-in, under the image's exact name; seconds per image
    built (the ones already there are not rebuilt)."""
    timings: dict[str, float] = {}
    images = base_images(root)
    # The Debian base first: the others are built on it.
    ordered = sorted(images, key=lambda image: not image.startswith("debian:"))
    if not any(image.startswith("debian:") for image in images):
        ordered.insert(0, "debian:bookworm-slim")
    for image in ordered:
        if podman.has_image(image):
            continue
        started = time.monotonic()
        repository, _, tag = image.rpartition(":")
        name = repository.rsplit("/", 1)[-1]
        if name == "debian":
            _debian_base(podman, workdir, image)
        elif name == "uv":
            _uv_image(podman, workdir, image, tag)
        elif (STANDINS / f"{name}.Containerfile").is_file():
            podman("build", "-q", "-f", str(STANDINS / f"{name}.Containerfile"), "-t", qualified(image), str(STANDINS))
        else:
            raise AssertionError(f"no stand-in for base image {image}: add tests/compose/standins/{name}.Containerfile")
        timings[image] = time.monotonic() - started
    return timings


def _debian_base(podman: Podman, workdir: Path, image: str) -> None:
    suite = image.rpartition(":")[2].split("-")[0]  # bookworm-slim -> bookworm
    sources = debian_sources()
    main = next((uri for uri, s in sources if s == suite), "http://deb.debian.org/debian")
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=workdir))
    try:
        run(
            ["debootstrap", "--variant=minbase", "--include=ca-certificates", suite, str(rootfs), main],
            timeout=900,
        )
        # Every archive apt uses here (updates, security), so `apt-get install` in a build gets
        # the versions this machine has.
        lines = sorted({f"deb {uri} {s} main" for uri, s in sources if s.split("-")[0] == suite})
        (rootfs / "etc/apt/sources.list").write_text("\n".join(lines or [f"deb {main} {suite} main"]) + "\n")
        # This machine's CA bundle (outgoing HTTPS is intercepted here); a real base has the public roots.
        shutil.copy(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "-q", "--change", 'CMD ["bash"]', "-", qualified(image)],
                stdin=tar.stdout,
                env=podman.env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"importing the Debian stand-in failed: {imported.stderr}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _uv_image(podman: Podman, workdir: Path, image: str, version: str) -> None:
    """The uv image holds the uv binary at /uv (and nothing else that the Dockerfile uses)."""
    context = Path(tempfile.mkdtemp(prefix="uv-", dir=workdir))
    host_uv = shutil.which("uv")
    same = host_uv and run([host_uv, "--version"], timeout=30).stdout.split()[1:2] == [version]
    if same and host_uv:
        shutil.copy(host_uv, context / "uv")
    else:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        run([*pip, f"uv=={version}", "-d", str(context)], timeout=300)
        wheel = next(context.glob("uv-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/scripts/uv"))
            (context / "uv").write_bytes(zf.read(member))
        (context / "uv").chmod(0o755)
    (context / "Containerfile").write_text("FROM scratch\nCOPY uv /uv\n")
    podman("build", "-q", "-f", str(context / "Containerfile"), "-t", qualified(image), str(context))
    shutil.rmtree(context, ignore_errors=True)


# --- the compose project ---------------------------------------------------------------------------


def checkout(destination: Path, root: Path = ROOT) -> Path:
    """A clean checkout of the work tree as it is: the files git tracks (with their changes), and
    nothing git ignores (no secrets, no venv)."""
    names = run(["git", "ls-files", "-z", "--cached"], cwd=root, timeout=60).stdout.split("\0")
    for name in filter(None, names):
        source = root / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


class Compose:
    """`docker compose` (docker-compose v1 syntax, which v2 accepts too) on one project."""

    def __init__(self, podman: Podman, project_dir: Path, project: str) -> None:
        self.podman = podman
        self.project_dir = project_dir
        self.project = project
        # The caller's IOTPIPE_* (a developer's shell) must not leak into the compose file's
        # interpolation, nor COMPOSE_*/DOCKER_* point it elsewhere.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTPIPE_", "COMPOSE_", "DOCKER_"))}
        # Builds through the API (docker-py), not the docker CLI.
        self.env |= {
            "DOCKER_HOST": podman.docker_host,
            "COMPOSE_PROJECT_NAME": project,
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            ["docker-compose", "--ansi", "never", *args],
            env=self.env,
            cwd=self.project_dir,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def containers(self, service: str | None = None, running: bool = False) -> list[dict[str, Any]]:
        """podman's view of the project's containers (id, names, state, labels)."""
        args = ["ps", "--format", "json", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if not running:
            args.append("--all")
        out = json.loads(self.podman(*args).stdout or "[]")
        return list(out)

    def inspect(self, container: str) -> dict[str, Any]:
        return dict(json.loads(self.podman("inspect", container).stdout)[0])

    def health(self) -> dict[str, str]:
        """Container name -> health (healthy, starting, unhealthy; `none` without a healthcheck)."""
        out = {}
        for c in self.containers(running=True):
            status = c.get("Status", "")
            match = re.search(r"\((healthy|unhealthy|starting)\)", status)
            out[c["Names"][0]] = match.group(1) if match else "none"
        return out

    def leftovers(self) -> dict[str, list[str]]:
        """What of the project still exists: containers, volumes, networks."""
        volumes = self.podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
        networks = self.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        prefix = f"{self.project}_"
        return {
            "containers": [c["Names"][0] for c in self.containers()],
            "volumes": [v for v in volumes if v.startswith(prefix)],
            "networks": [n for n in networks if n.startswith(prefix)],
        }


class HealthScheduler(threading.Thread):
    """Runs the project's healthchecks as the Docker engine would (see the module docstring)."""

    def __init__(self, compose: Compose, interval: float = 10.0) -> None:
        super().__init__(name="health scheduler", daemon=True)
        self.compose = compose
        self.interval = interval
        self.stopped = threading.Event()
        self._last: dict[str, float] = {}

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                self._round()
            except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
                continue  # podman busy or a container going away: next round

    def _round(self) -> None:
        now = time.monotonic()
        for name, health in self.compose.health().items():
            if health == "none" or self.stopped.is_set():
                continue
            due = FAST_INTERVAL if health != "healthy" else self.interval
            if now - self._last.get(name, 0.0) >= due:
                self._last[name] = now
                self.compose.podman("healthcheck", "run", name, timeout=60, check=False)

    def stop(self) -> None:
        self.stopped.set()
        self.join(120)
