from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from iotpipe import KeyRing
from iotpipe.devstack import ensure_secrets, redis_password_file
from servers import Stack, run_servers

# The Redis key prefixes of the tests' own: `base` below (t...) and the fault battery's (f...). The
# ACL lets the Redis users reach only keys under these, as it lets them reach only `iotpipe:` when shipped.
TEST_REDIS_PREFIXES = ("t*", "f*")


@pytest.fixture(scope="session")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_secrets(tmp_path_factory.mktemp("secrets"), redis_prefixes=TEST_REDIS_PREFIXES)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, secrets_dir: Path) -> Iterator[Stack]:
    """One real mosquitto + redis-server per test session; tests isolate by topic base / key prefix."""
    with run_servers(tmp_path_factory.mktemp("servers"), secrets_dir) as servers:
        yield servers


@pytest.fixture
def base() -> str:
    """A topic base (first topic level) and Redis key prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def keyring(secrets_dir: Path) -> KeyRing:
    return KeyRing.from_file(secrets_dir / "keyring")


@pytest.fixture
def redis_reader_password(secrets_dir: Path) -> str:
    return redis_password_file(secrets_dir, "reader").read_text().strip()
