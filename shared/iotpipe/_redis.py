"""The Redis side of the contract (docs/contract.md, "Redis"): the default key prefix, the
cache-writer's write script and what the Redis ACL grants each user.

They live together because the ACL is derived from the other two: it pins the cache-writer's
EVALSHA to this script's SHA1 and grants exactly the commands the script calls, limited to keys
under the prefix. Change the script and the rules follow; `iotpipe.devstack.ensure_secrets`
rewrites an ACL file whose rules are out of date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

REDIS_PREFIX = "iotpipe"

# The cache-writer's write, atomic and idempotent per window (see cache_writer.service).
# KEYS: per window its series, latest and latest_start keys; ARGV: the history length, then per
# window its start, JSON member, sensor and mean. Returns per window 1 (written) or 0 (already there).
WRITE_WINDOWS = """
local history = tonumber(ARGV[1])
local written = {}
for i = 1, #KEYS / 3 do
  local series, latest, latest_start = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local start, member, sensor, mean = ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1]
  if redis.call('ZCOUNT', series, start, start) > 0 then
    written[i] = 0
  else
    redis.call('ZADD', series, start, member)
    redis.call('ZREMRANGEBYRANK', series, 0, -(history + 1))
    local newest = redis.call('HGET', latest_start, sensor)
    if not newest or tonumber(newest) < tonumber(start) then
      redis.call('HSET', latest, sensor, mean)
      redis.call('HSET', latest_start, sensor, start)
    end
    written[i] = 1
  end
end
return written
"""
WRITE_WINDOWS_SHA1 = hashlib.sha1(WRITE_WINDOWS.encode()).hexdigest()  # what Redis names it by

REDIS_USERS = ("cache-writer", "reader")

# Both users: PING (redis-py's health check, the compose healthcheck) and SELECT (IOTPIPE_REDIS__DB).
# AUTH and HELLO need no grant: Redis lets every connection authenticate. redis-py also sends CLIENT
# SETINFO on connect and ignores a refusal; it is not granted because Redis 7.0 does not know it and
# would refuse to load an ACL file naming it. No other CLIENT subcommand (PAUSE, KILL, LIST act on
# other users' connections), no pub/sub channel, no KEYS or SCAN (keyspace-wide: they list names
# outside the prefix), nothing of @admin or @dangerous.
_SESSION = ("ping", "select")
_COMMANDS = {
    # redis-py runs a registered script in a pipeline as SCRIPT EXISTS, SCRIPT LOAD if missing, then
    # EVALSHA; Redis checks the ACL inside scripts too, so the script's own calls are granted. EVALSHA
    # is pinned to this script: any other script (a busy loop stalls Redis for everyone until SCRIPT
    # KILL, which nobody may send) is refused even if loaded; EVAL is not granted at all.
    "cache-writer": (
        f"evalsha|{WRITE_WINDOWS_SHA1}",
        "script|exists",
        "script|load",
        "zcount",
        "zadd",
        "zremrangebyrank",
        "hget",
        "hset",
    ),
    # Reads of the documented keys (hashes latest/latest_start, sorted sets series), and MULTI/EXEC
    # for a consistent snapshot (redis-py's pipelines are transactions by default).
    "reader": (
        "hget",
        "hmget",
        "hgetall",
        "hkeys",
        "hvals",
        "hlen",
        "hexists",
        "zrange",
        "zrangebyscore",
        "zrevrange",
        "zrevrangebyscore",
        "zcard",
        "zcount",
        "zscore",
        "zmscore",
        "zrank",
        "zrevrank",
        "exists",
        "type",
        "multi",
        "exec",
        "discard",
    ),
}
# `%R~`: the reader's keys are read-only whatever command reaches them.
_KEY_ACCESS = {"cache-writer": "~", "reader": "%R~"}


def redis_acl_rules(prefixes: Sequence[str] = (REDIS_PREFIX,)) -> dict[str, str]:
    """Redis user -> its ACL rules (after `on` and the password hash), keys limited to
    `<prefix>:*` for each of `prefixes` (a prefix, or a glob such as the tests' `t*`)."""
    rules = {}
    for user in REDIS_USERS:
        keys = " ".join(f"{_KEY_ACCESS[user]}{prefix}:*" for prefix in prefixes)
        commands = " ".join(f"+{c}" for c in (*_SESSION, *_COMMANDS[user]))
        rules[user] = f"{keys} resetchannels -@all {commands}"
    return rules
