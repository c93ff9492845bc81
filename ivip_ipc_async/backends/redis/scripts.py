"""The Lua scripts the Redis backend runs, their SHA-1s, loading them, and
naming the command of ours a Redis error points at (by script line)."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

__all__ = [
    "APPEND",
    "APPEND_SHA",
    "KEEP",
    "KEEP_SHA",
    "PROBE",
    "PROBE_SHA",
    "SCRIPTS",
    "SET_IF_NEWER",
    "SET_IF_NEWER_SHA",
    "load_scripts",
    "script_command",
]

# Both scripts store the record in the stream and publish it, with its stream id, in
# one atomic step: live readers get it pushed, in stream order, and tell a push
# from an entry they already read (while catching up) by its id.
APPEND: Final = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[1])
redis.call('PUBLISH', ARGV[3], id .. ' ' .. ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return id
"""

SET_IF_NEWER: Final = """
local current = redis.call('HGET', KEYS[1], 'v')
if current and current >= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'r', ARGV[1])
local expires = tonumber(ARGV[3])
if expires > 0 then
  redis.call('PEXPIREAT', KEYS[1], expires)
else
  redis.call('PERSIST', KEYS[1])
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[1])
redis.call('PUBLISH', ARGV[5], id .. ' ' .. ARGV[1])
if redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return 1
"""

# The namespace's marker: a token made by the first process; a process that finds
# it gone, or another token in its place, knows that Redis lost the namespace's
# state (FLUSHALL, eviction, a failover) and reloads. It also keeps the stream and
# itself expiring `state_ttl` after the last process stopped refreshing them.
KEEP: Final = """
local ttl = tonumber(ARGV[2])
local token = redis.call('GET', KEYS[1])
if not token then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  token = ARGV[1]
end
for _, key in ipairs(KEYS) do
  local left = redis.call('PTTL', key)
  if left == -1 or (left >= 0 and left < ttl / 2) then
    redis.call('PEXPIRE', key, ttl)
  end
end
return token
"""

# Every write command the backend and its locks send, on a key of the namespace
# that is gone when the script ends, and a PUBLISH of nothing on the channel
# (readers skip it) and on a lock channel nobody waits on (ARGV[2], the locks'
# prefix): a user that lacks one of them is refused at start, before anything is
# stored.
PROBE: Final = """
redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('HSET', KEYS[1], 'v', '')
redis.call('HGET', KEYS[1], 'v')
redis.call('PERSIST', KEYS[1])
redis.call('PEXPIRE', KEYS[1], 60000)
redis.call('PTTL', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1, '*', 'r', '')
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('SET', KEYS[1], '', 'PX', 60000)
redis.call('GET', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('PUBLISH', ARGV[1], '') -- on the namespace's channel
redis.call('PUBLISH', ARGV[2], '') -- on the locks' channels (ivip:{ns}:lk:*)
return 1
"""

SCRIPTS: Final = (APPEND, SET_IF_NEWER, KEEP, PROBE)
APPEND_SHA, SET_IF_NEWER_SHA, KEEP_SHA, PROBE_SHA = (
    hashlib.sha1(script.encode()).hexdigest() for script in SCRIPTS
)


async def load_scripts(client: Any) -> None:
    """SCRIPT LOAD every script, in one round trip (at start, and after NOSCRIPT)."""
    pipe = client.pipeline(transaction=False)  # all in one round trip
    for script in SCRIPTS:
        pipe.script_load(script)
    await pipe.execute()


def script_command(error: str) -> str:
    """The command of ours at the script line a Redis error names (Redis 7.0 says
    only "can't run this command ... script: <sha>, on @user_script:<line>").

    Example:
        >>> script_command(f"script: {PROBE_SHA}, on @user_script:3.")
        ' (the command refused: DEL)'
        >>> script_command(f"script: {PROBE_SHA}, on @user_script:18.")
        " (the command refused: PUBLISH on the locks' channels (ivip:{ns}:lk:*))"
    """
    found = re.search(r"script: ([0-9a-f]{40}), on @user_script:(\d+)", error)
    if found is None:
        return ""
    scripts = dict(zip((APPEND_SHA, SET_IF_NEWER_SHA, KEEP_SHA, PROBE_SHA), SCRIPTS, strict=True))
    lines = scripts.get(found.group(1), "").splitlines()
    line = int(found.group(2))
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    command = re.search(r"redis\.call\('(\w+)'", text)
    where = text.partition(" -- ")[2]  # what the line's comment says it touches
    if command is None:
        return ""
    return f" (the command refused: {command.group(1)}{' ' + where if where else ''})"
