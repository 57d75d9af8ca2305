"""The Redis ACL (iotpipe._redis, written by iotpipe.devstack.ensure_secrets) on the real redis-server:
`reader` and `cache-writer` may run exactly what they need, on keys under the prefix only.

Issue 10 case 3: `reader` could CLIENT PAUSE every write, CLIENT KILL the cache-writer's connection
and CLIENT LIST everyone's connections; `cache-writer` could run any Lua, KEYS, SCAN and write any
key. Every dangerous command is tried as each user and must be refused with NOPERM, while the
cache-writer still writes windows and `reader` still reads them as docs/contract.md and the README
say. An ACL file from an older version is brought up to date with every password unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from cache_writer.service import CacheWriter, Settings
from iotpipe import WRITE_WINDOWS, KeyRing, Opened, Processed, RetryableError, Runtime, Topics, counter, decode
from iotpipe._redis import WRITE_WINDOWS_SHA1, redis_acl_rules
from iotpipe.devstack import Ports, ensure_secrets, redis_password_file, render_redis_config
from servers import (
    ROOT,
    Server,
    Stack,
    bus_for,
    free_port,
    processed_payload,
    service_env,
    spawn,
    stop_all,
    wait_online,
    wait_until,
    window_payload,
)

import redis

USERS = ("reader", "cache-writer")

# Refused for both users. `{p}` is the test's own key prefix (inside the ACL's key patterns), so a
# refusal is about the command, not the key. Arguments are the least harmful form of each command.
DANGEROUS: dict[str, tuple[str, ...]] = {
    "client-pause": ("CLIENT", "PAUSE", "30000", "WRITE"),
    "client-kill-user": ("CLIENT", "KILL", "USER", "cache-writer"),
    "client-kill-id": ("CLIENT", "KILL", "ID", "999999999"),
    "client-list": ("CLIENT", "LIST"),
    "client-tracking-bcast": ("CLIENT", "TRACKING", "on", "BCAST"),  # every modified key's name
    "config-get": ("CONFIG", "GET", "aclfile"),
    "config-set": ("CONFIG", "SET", "maxmemory-samples", "5"),
    "config-rewrite": ("CONFIG", "REWRITE"),
    "debug": ("DEBUG", "SLEEP", "0"),
    "flushall": ("FLUSHALL",),
    "flushdb": ("FLUSHDB",),
    "keys": ("KEYS", "{p}:*"),
    "scan": ("SCAN", "0"),
    "randomkey": ("RANDOMKEY",),
    "monitor": ("MONITOR",),
    "shutdown": ("SHUTDOWN", "ABORT"),
    "acl-list": ("ACL", "LIST"),
    "acl-setuser": ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all", "~*"),
    "acl-log": ("ACL", "LOG"),
    "acl-load": ("ACL", "LOAD"),
    "script-flush": ("SCRIPT", "FLUSH"),
    "script-kill": ("SCRIPT", "KILL"),
    "eval": ("EVAL", "return 1", "0"),
    "function-flush": ("FUNCTION", "FLUSH"),
    "module": ("MODULE", "LIST"),
    "save": ("SAVE",),
    "bgsave": ("BGSAVE",),
    "bgrewriteaof": ("BGREWRITEAOF",),
    "replicaof": ("REPLICAOF", "NO", "ONE"),
    "migrate": ("MIGRATE", "127.0.0.1", "1", "{p}:latest:d1", "0", "100"),
    "swapdb": ("SWAPDB", "0", "1"),
    "info": ("INFO",),
    "slowlog": ("SLOWLOG", "GET"),
    "sort": ("SORT", "{p}:series:d1:temp", "BY", "nosort", "GET", "*"),
    "subscribe": ("SUBSCRIBE", "{p}"),
    "psubscribe": ("PSUBSCRIBE", "*"),
    "publish": ("PUBLISH", "{p}", "x"),
    "set": ("SET", "{p}:latest:d1", "1"),
    "del": ("DEL", "{p}:latest:d1"),
    "unlink": ("UNLINK", "{p}:series:d1:temp"),
    "expire": ("EXPIRE", "{p}:latest:d1", "1"),
    "rename": ("RENAME", "{p}:latest:d1", "{p}:gone"),
    "hdel": ("HDEL", "{p}:latest:d1", "temp"),
    "zrem": ("ZREM", "{p}:series:d1:temp", "x"),
}
# Refused for `reader` only: the writes the cache-writer's script makes, and its script.
READER_ONLY: dict[str, tuple[str, ...]] = {
    "hset": ("HSET", "{p}:latest:d1", "temp", "99"),
    "zadd": ("ZADD", "{p}:series:d1:temp", "1", "x"),
    "zremrangebyrank": ("ZREMRANGEBYRANK", "{p}:series:d1:temp", "0", "-1"),
    "evalsha-writer-script": ("EVALSHA", WRITE_WINDOWS_SHA1, "0"),
    "script-load": ("SCRIPT", "LOAD", "return 1"),
    "outside-prefix-hget": ("HGET", "other:latest:d1", "temp"),
    "outside-prefix-zrange": ("ZRANGE", "other:series:d1:temp", "0", "-1"),
    "outside-prefix-production": ("HGETALL", "iotpipe:latest:d1"),  # the tests' ACL is for t*/f* only
}
# Refused for `cache-writer` only: reads it does not make, and keys outside its prefix, directly or
# through its own script (Redis checks the script's declared keys and its calls).
WRITER_ONLY: dict[str, tuple[str, ...]] = {
    "get": ("GET", "{p}:latest:d1"),
    "hgetall": ("HGETALL", "{p}:latest:d1"),
    "zrange": ("ZRANGE", "{p}:series:d1:temp", "0", "-1"),
    "outside-prefix-hset": ("HSET", "other:latest:d1", "temp", "1"),
    "outside-prefix-zadd": ("ZADD", "other:series:d1:temp", "1", "x"),
    "outside-prefix-script": (
        "EVALSHA",
        WRITE_WINDOWS_SHA1,
        "3",
        "other:series:d1:temp",
        "other:latest:d1",
        "other:latest_start:d1",
        "3",
        "1000",
        "{}",
        "temp",
        "1.0",
    ),
}
# Refused by the server before the ACL is consulted (enable-debug-command is off): a plain ERR.
SERVER_REFUSED = {"debug"}
REFUSED = [
    *((user, name, args) for user in USERS for name, args in DANGEROUS.items()),
    *(("reader", name, args) for name, args in READER_ONLY.items()),
    *(("cache-writer", name, args) for name, args in WRITER_ONLY.items()),
]


def connect(stack: Stack, user: str, **kwargs: object) -> redis.Redis:
    password = redis_password_file(stack.secrets_dir, user).read_text().strip()
    return redis.Redis(port=stack.ports.redis, username=user, password=password, socket_timeout=10, **kwargs)


@pytest.fixture(scope="module")
def clients(stack: Stack) -> Iterator[dict[str, redis.Redis]]:
    made = {user: connect(stack, user) for user in USERS}
    yield made
    for client in made.values():
        client.close()


@pytest.mark.parametrize(("user", "name", "args"), REFUSED, ids=[f"{u}-{n}" for u, n, _ in REFUSED])
def test_refused(clients: dict[str, redis.Redis], base: str, user: str, name: str, args: tuple[str, ...]) -> None:
    client = clients[user]
    refusal = redis.exceptions.ResponseError if name in SERVER_REFUSED else redis.exceptions.NoPermissionError
    with pytest.raises(refusal):
        client.execute_command(*(a.replace("{p}", base) for a in args))
    assert client.ping()  # refused, not disconnected: the user's own work goes on


def test_cache_writer_runs_only_its_own_script(clients: dict[str, redis.Redis], base: str) -> None:
    """SCRIPT LOAD cannot be limited by the ACL, so any script may be loaded; only the write script
    may run. A busy loop would otherwise hold Redis for everyone (SCRIPT KILL is not granted)."""
    writer = clients["cache-writer"]
    assert writer.script_load(WRITE_WINDOWS) == WRITE_WINDOWS_SHA1  # what redis-py loads after a flush
    assert writer.script_exists(WRITE_WINDOWS_SHA1) == [True]
    other = writer.script_load(f"return redis.call('HGET', KEYS[1], '{base}')")
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer.evalsha(other, 1, f"{base}:latest:d1")


def test_the_write_script_calls_only_what_is_granted() -> None:
    """Redis checks the ACL inside scripts: every command the script calls is granted."""
    called = {c.lower() for c in re.findall(r"redis\.call\('(\w+)'", WRITE_WINDOWS)}
    granted = set(re.findall(r"\+([\w|]+)", redis_acl_rules()["cache-writer"]))
    assert called and called <= granted, called - granted
    assert f"evalsha|{WRITE_WINDOWS_SHA1}" in granted and "eval" not in granted


def test_shipped_rules_reach_only_the_product_prefix() -> None:
    rules = redis_acl_rules()
    assert re.findall(r"(\S*~\S+)", rules["cache-writer"]) == ["~iotpipe:*"]
    assert re.findall(r"(\S*~\S+)", rules["reader"]) == ["%R~iotpipe:*"]  # read-only keys
    for text in rules.values():
        assert "resetchannels" in text and "&" not in text  # no pub/sub channel
        assert "@" not in text.replace("-@all", "")  # commands named one by one, no category


def window(start: int, mean: float) -> dict[str, object]:
    return {**window_payload(start), "mean": mean, "median": mean, "min": mean, "max": mean}


def message(base: str, windows: list[dict[str, object]], seq: int = 1) -> Opened[Processed]:
    topic = f"{base}/v2/processed/d1"
    data = decode(orjson.dumps(processed_payload("d1", windows)), Processed, topic)
    return Opened(topic, "preprocessor/x", "boot", seq, 0, data)


@pytest.fixture
async def writer(
    stack: Stack, keyring: KeyRing, base: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[CacheWriter]:
    for key, value in stack.env(IOTPIPE_BASE_TOPIC=base, IOTPIPE_REDIS_PREFIX=base).items():
        monkeypatch.setenv(key, value)
    component = CacheWriter(Runtime(Settings.load(instance="acl"), keyring=keyring))
    yield component
    await component.close()


async def test_reader_reads_what_the_contract_documents(stack: Stack, writer: CacheWriter, base: str) -> None:
    """The cache-writer writes through its ACL; `reader` reads every documented key in the ways the
    contract shows, and the commands a dashboard reaches for, including a MULTI/EXEC snapshot."""
    await writer.handle([message(base, [window(1000 * i, 20.0 + i) for i in range(1, 6)])])
    latest, starts, series = f"{base}:latest:d1", f"{base}:latest_start:d1", f"{base}:series:d1:temp"
    reader = aioredis.Redis(
        port=stack.ports.redis,
        username="reader",
        password=redis_password_file(stack.secrets_dir, "reader").read_text().strip(),
        decode_responses=True,
    )
    try:
        assert await reader.ping()
        assert await reader.hget(latest, "temp") == "25.0"
        assert await reader.hgetall(starts) == {"temp": "5000"}
        assert await reader.hmget(latest, ["temp", "none"]) == ["25.0", None]
        assert (await reader.hkeys(latest), await reader.hvals(latest), await reader.hlen(latest)) == (
            ["temp"],
            ["25.0"],
            1,
        )
        assert await reader.hexists(latest, "temp")
        newest = await reader.zrange(series, -10, -1, withscores=True)
        assert [int(score) for _, score in newest] == [1000, 2000, 3000, 4000, 5000]
        assert orjson.loads(newest[-1][0])["mean"] == 25.0
        assert len(await reader.zrangebyscore(series, 2000, 4000)) == 3
        assert [int(s) for _, s in await reader.zrevrangebyscore(series, "+inf", 0, 0, 1, withscores=True)] == [5000]
        assert len(await reader.zrevrange(series, 0, 1)) == 2
        assert (await reader.zcard(series), await reader.zcount(series, 3000, "+inf")) == (5, 3)
        assert await reader.zscore(series, newest[0][0]) == 1000
        assert await reader.zrank(series, newest[0][0]) == 0
        assert (await reader.exists(latest, series), await reader.type(series)) == (2, "zset")
        async with reader.pipeline(transaction=True) as snapshot:  # MULTI ... EXEC
            snapshot.hgetall(latest).hgetall(starts)
            assert await snapshot.execute() == [{"temp": "25.0"}, {"temp": "5000"}]
    finally:
        await reader.aclose()


async def test_redis_cli_as_documented(stack: Stack, writer: CacheWriter, base: str) -> None:
    """The README's redis-cli example and the compose healthcheck, password through REDISCLI_AUTH."""
    await writer.handle([message(base, [window(1000, 21.5)])])
    env = {**os.environ, "REDISCLI_AUTH": redis_password_file(stack.secrets_dir, "reader").read_text().strip()}
    cli = ["redis-cli", "-p", str(stack.ports.redis), "--user", "reader", "--no-auth-warning"]
    run = lambda *args: subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=30)  # noqa: E731
    assert run("ping").stdout.strip() == "PONG"
    assert run("HGETALL", f"{base}:latest:d1").stdout.split() == ["temp", "21.5"]
    assert len(run("ZRANGE", f"{base}:series:d1:temp", "-10", "-1").stdout.split()) == 1
    assert "NOPERM" in run("CLIENT", "PAUSE", "30000", "WRITE").stdout


async def test_reader_cannot_stall_or_cut_the_running_writer(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """Case 3 against the cache-writer as it runs: `reader` tries to pause every write and to kill
    the writer's connection; both are refused, and windows published after keep reaching Redis at
    once (a 30 s pause would have held them past the wait)."""
    topics = Topics(base)
    proc = spawn("cache_writer", service_env(stack, base, tmp_path, "acl", IOTPIPE_STATUS_INTERVAL="0.2"), tmp_path)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    attacker = connect(stack, "reader", decode_responses=True)
    try:
        await wait_online(stack, topics.service_status("cache-writer", "acl"))
        await producer.start()
        await producer.wait_connected()
        series = f"{base}:series:d1:temp"
        await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(1000, 1.0)]))
        await wait_until(lambda: attacker.zcard(series) == 1, 30, "the first window in Redis")
        for attack in (("CLIENT", "PAUSE", "30000", "WRITE"), ("CLIENT", "KILL", "USER", "cache-writer")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attacker.execute_command(*attack)
        await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(2000, 2.0)]))
        await wait_until(lambda: attacker.zcard(series) == 2, 15, "the window after the attacks in Redis")
        assert attacker.hget(f"{base}:latest:d1", "temp") == "2.0"
    finally:
        attacker.close()
        await producer.stop()
        stop_all([proc])


async def test_a_writer_the_acl_was_not_made_for_holds_its_batch(
    stack: Stack, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    """A cache-writer whose prefix the ACL does not cover (IOTPIPE_REDIS_PREFIX changed without
    regenerating the ACL) is refused; that is a deployment to fix, not bad data: the batch is held
    (RetryableError: unacknowledged, retried, health `redis: down`), never dead-lettered."""
    outside = f"o{uuid.uuid4().hex[:10]}"
    for key, value in stack.env(IOTPIPE_BASE_TOPIC=base, IOTPIPE_REDIS_PREFIX=outside).items():
        monkeypatch.setenv(key, value)
    component = CacheWriter(Runtime(Settings.load(instance="acl"), keyring=keyring))
    try:
        with pytest.raises(RetryableError, match=r"no permissions") as refused:
            await component.handle([message(base, [window(1000, 1.0)])])
        assert refused.value.dependency == "Redis" and "iotpipe secrets" in str(refused.value)
        assert counter(component.runtime.metrics.counters(), "windows_written") == 0
    finally:
        await component.close()


# -- an ACL file from an older version -----------------------------------------------------------------

OLD_RULES = {  # what ensure_secrets wrote before the per-command allow-lists
    "cache-writer": "~* &* +@all -@admin -@dangerous",
    "reader": "~* resetchannels -@all +@read +@connection",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_text().strip().encode()).hexdigest()


def password(secrets_dir: Path, user: str) -> str:
    return redis_password_file(secrets_dir, user).read_text().strip()


def test_an_old_acl_file_is_brought_up_to_date_with_the_same_passwords(tmp_path: Path) -> None:
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    acl = secrets_dir / "redis_users_acl"
    default_hash = "#" + hashlib.sha256(b"nobody knows this").hexdigest()
    ops_line = f"user ops on #{hashlib.sha256(b'ops').hexdigest()} ~* &* +@all"  # an operator's own user
    acl.write_text(
        "\n".join(
            [
                f"user default on {default_hash} ~* &* +@all",
                *(f"user {u} on #{sha256(redis_password_file(secrets_dir, u))} {r}" for u, r in OLD_RULES.items()),
                ops_line,
            ]
        )
        + "\n"
    )
    before = {p.name: p.read_bytes() for p in secrets_dir.iterdir() if p.name != "redis_users_acl"}

    port = free_port()
    ports = Ports(mqtt=0, mqtt_tls=0, redis=port, sink=0)
    (tmp_path / "redis").mkdir()
    conf = tmp_path / "redis.conf"

    def start() -> Server:
        conf.write_text(render_redis_config(ROOT / "redis/redis.conf", ports, secrets_dir, tmp_path / "redis"))
        server = Server("redis", ["redis-server", str(conf)], "Ready to accept connections", tmp_path)
        server.start()
        return server

    def client(user: str) -> redis.Redis:
        return redis.Redis(port=port, username=user, password=password(secrets_dir, user), socket_timeout=10)

    server = start()
    try:
        old_reader = client("reader")
        assert old_reader.client_list()  # the old rules really let `reader` see everyone's connections
        old_reader.close()
    finally:
        server.stop()

    ensure_secrets(secrets_dir)
    lines = acl.read_text().splitlines()
    rules = redis_acl_rules()
    assert lines[0] == f"user default on {default_hash} ~* &* +@all"  # its unknowable hash kept
    for user in ("cache-writer", "reader"):
        assert f"user {user} on #{sha256(redis_password_file(secrets_dir, user))} {rules[user]}" in lines
    assert ops_line in lines
    after = {p.name: p.read_bytes() for p in secrets_dir.iterdir() if p.name != "redis_users_acl"}
    assert after == before  # no password (nor any other secret) changed

    upgraded = acl.read_bytes()
    ensure_secrets(secrets_dir)
    assert acl.read_bytes() == upgraded  # up to date: left alone

    server = start()
    try:
        new_reader, new_writer = client("reader"), client("cache-writer")
        assert new_reader.ping() and new_writer.ping()  # the same passwords log in
        with pytest.raises(redis.exceptions.NoPermissionError):
            new_reader.client_list()
        new_reader.close()
        new_writer.close()
    finally:
        server.stop()


def test_the_oldest_acl_file_gets_a_usable_default_line(tmp_path: Path) -> None:
    """`user default off` (the first version; Redis then refused the AOF's MULTI/EXEC on restart):
    replaced by `default` with a new random password nobody knows."""
    secrets_dir = ensure_secrets(tmp_path / "secrets")
    acl = secrets_dir / "redis_users_acl"
    acl.write_text(
        "user default off\n"
        + "".join(f"user {u} on #{sha256(redis_password_file(secrets_dir, u))} {r}\n" for u, r in OLD_RULES.items())
    )
    ensure_secrets(secrets_dir)
    lines = acl.read_text().splitlines()
    assert re.fullmatch(r"user default on #[0-9a-f]{64} ~\* &\* \+@all", lines[0])
    assert len(lines) == 3 and all(OLD_RULES[u] not in acl.read_text() for u in OLD_RULES)


def test_iotpipe_secrets_makes_the_acl_for_another_prefix(tmp_path: Path) -> None:
    """`iotpipe secrets DIR --redis-prefix P`: for a deployment with IOTPIPE_REDIS_PREFIX=P."""
    secrets_dir = tmp_path / "secrets"
    cli = [sys.executable, "-m", "iotpipe.cli", "secrets", str(secrets_dir)]
    made = subprocess.run([*cli, "--redis-prefix", "plant1"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    acl = (secrets_dir / "redis_users_acl").read_text()
    assert "%R~plant1:* " in acl and " ~plant1:* " in acl and "iotpipe:" not in acl
    refused = subprocess.run([*cli, "--redis-prefix", "a*"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--redis-prefix" in refused.stderr
    assert (secrets_dir / "redis_users_acl").read_text() == acl  # a bad prefix changes nothing
