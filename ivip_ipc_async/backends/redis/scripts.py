"""The Lua scripts the Redis backend runs, their SHA-1s, loading them, and
naming the command of ours a Redis error points at (by script line)."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

__all__ = [
    "APPEND",
    "APPEND_SHA",
    "CONDITIONAL",
    "CONDITIONAL_SHA",
    "FETCH",
    "FETCH_SHA",
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
# from an entry they already read (while catching up) by its id. A cache write
# (SET_IF_NEWER, CONDITIONAL) also adds the entry to the namespace's index
# (KEYS[3], the set `ivip:{ns}:ix` of the entries' keys without their prefix,
# whose length it is given), which expires with the namespace's other keys.
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
if redis.call('SADD', KEYS[3], string.sub(KEYS[1], ARGV[7] + 1)) == 1
    and redis.call('PTTL', KEYS[3]) == -1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
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

# Every write command the backend and its locks send (and a load's SSCAN), on a
# key of the namespace that is gone when the script ends, and a PUBLISH of
# nothing on the channel (readers skip it) and on a lock channel nobody waits on
# (ARGV[2], the locks' prefix): a user that lacks one of them is refused at
# start, before anything is stored.
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
redis.call('SREM', KEYS[1], '')
redis.call('SSCAN', KEYS[1], 0)
redis.call('SISMEMBER', KEYS[1], '')
redis.call('SADD', KEYS[1], '')
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('PUBLISH', ARGV[1], '') -- on the namespace's channel
redis.call('PUBLISH', ARGV[2], '') -- on the locks' channels (ivip:{ns}:lk:*)
return 1
"""


def _crc_table() -> str:
    """CRC-32's table (zlib's polynomial) as a Lua table constructor."""
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(str(c))
    return "{" + ",".join(table) + "}"


# A conditional cache write (add, versioned set, incr; `conditions.decide` is the
# same rule in Python), stored and published as SET_IF_NEWER stores a write. The
# client packs the header's fields; the script may raise the clock above the
# current entry's (the mirrors keep the greatest (hlc, node): a stored record must
# win there too), and for incr writes the data itself, so it computes the CRCs of
# the header and of the digits (the client gives the CRC of topic + key, or of the
# whole body for add and the versioned set). Numbers above 2**53 never pass through
# Lua's doubles: the clock is bumped as bytes and as decimal digits.
# Returns {1, frame} stored, {0, frame or ''} refused (the live entry), {-1} the
# entry is not an integer, {-2} the sum is out of range.
CONDITIONAL: Final = (
    """
local T = """
    + _crc_table()
    + """
local function crc(c, s)
  c = bit.bnot(c)
  for i = 1, #s do
    c = bit.bxor(bit.rshift(c, 8), T[bit.band(bit.bxor(c, string.byte(s, i)), 255) + 1])
  end
  c = bit.bnot(c)
  if c < 0 then c = c + 4294967296 end
  return c
end
local function bump_bytes(s)
  local out = {string.byte(s, 1, 8)}
  for i = 1, 8 do
    if out[i] < 255 then out[i] = out[i] + 1 break end
    out[i] = 0
  end
  return string.char(unpack(out))
end
local function bump_digits(s)
  local out = {string.byte(s, 1, -1)}
  for i = #out, 1, -1 do
    if out[i] < 57 then out[i] = out[i] + 1 break end
    out[i] = 48
  end
  return string.char(unpack(out))
end
local held = redis.call('HMGET', KEYS[1], 'r', 'v')
local r, v = held[1], held[2]
local mode = ARGV[1]
local live = false
if r and string.byte(r, 3) == 2 then
  local expires = struct.unpack('<d', r, 33)
  live = expires == 0 or expires * 1000 > tonumber(ARGV[14])
end
local data = ARGV[12]
local expires8 = ARGV[8]
local body_crc = tonumber(ARGV[18])
if mode == 'a' then
  if live then return {0, r} end
elseif mode == 'v' then
  local version = ''
  if live then version = v end
  if version ~= ARGV[13] then
    if live then return {0, r} end
    return {0, ''}
  end
else
  local base = 0
  if live then
    local tl, kl = struct.unpack('<HH', r, 41)
    local digits = string.sub(r, 53 + tl + kl)
    if string.byte(r, 4) ~= 1 or not string.find(digits, '^%-?%d+$') or #digits > 17 then
      return {-1}
    end
    base = tonumber(digits)
    if math.abs(base) > 9007199254740991 then return {-1} end
    expires8 = string.sub(r, 33, 40)
  end
  local sum = base + tonumber(data)
  if math.abs(sum) > 9007199254740991 then return {-2} end
  data = string.format('%.0f', sum)
  body_crc = crc(body_crc, data)
end
local hlc8, hlc20 = ARGV[4], ARGV[5]
if v and hlc20 <= string.sub(v, 1, 20) then
  hlc8, hlc20 = bump_bytes(string.sub(r, 17, 24)), bump_digits(string.sub(v, 1, 20))
end
local topic, key = ARGV[10], ARGV[11]
local body = topic .. key .. data
local head = ARGV[2] .. struct.pack('<I4', #body) .. ARGV[3] .. hlc8 .. ARGV[6] .. expires8
  .. struct.pack('<HHI4', #topic, #key, body_crc)
local frame = head .. struct.pack('<I4', crc(0, head)) .. body
redis.call('HSET', KEYS[1], 'v', hlc20 .. ARGV[7], 'r', frame)
if mode ~= 'i' or not live then
  local expires = tonumber(ARGV[9])
  if expires > 0 then
    redis.call('PEXPIREAT', KEYS[1], expires)
  else
    redis.call('PERSIST', KEYS[1])
  end
end
if redis.call('SADD', KEYS[3], string.sub(KEYS[1], ARGV[19] + 1)) == 1
    and redis.call('PTTL', KEYS[3]) == -1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[17])
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[15], '*', 'r', frame)
redis.call('PUBLISH', ARGV[16], id .. ' ' .. frame)
if redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[17])
end
return {1, frame}
"""
)

# A load's page: the cache entries KEYS[2..] (from the index KEYS[1], or from a
# SCAN), each one's frame, 0 when there is none, or -1 when the key is no hash
# (garbage); then 1, or 0 when an entry could not be added to the index. An
# entry gone (expired) is removed from the index (in the same atomic step, so a
# write of it meanwhile cannot be undone). With ARGV[2] = '1' (a load through
# SCAN, which builds the index), every entry found is added to the index, which
# then expires `ARGV[3]` ms from now unless it already does; a refusal (OOM:
# Redis is full) leaves it unbuilt (the load then does not mark it complete),
# and the page loaded all the same. ARGV[1] is the length of the entries'
# prefix. With ARGV[2] = '2' (the end of such a load), the same, and the index
# is marked complete (its member '', which no entry's key is: they all hold a
# NUL).
FETCH: Final = """
local cut = tonumber(ARGV[1]) + 1
local build = ARGV[2] ~= '0'
local out = {}
local added = 1
for i = 2, #KEYS do
  local frame = redis.pcall('HGET', KEYS[i], 'r')
  if type(frame) == 'table' then
    out[i - 1] = -1
  elseif frame then
    out[i - 1] = frame
    if build and type(redis.pcall('SADD', KEYS[1], string.sub(KEYS[i], cut))) == 'table' then
      added = 0
    end
  else
    out[i - 1] = 0
    if not build and redis.call('EXISTS', KEYS[i]) == 0 then
      redis.call('SREM', KEYS[1], string.sub(KEYS[i], cut))
    end
  end
end
if ARGV[2] == '2' then redis.pcall('SADD', KEYS[1], '') end
if build and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
out[#KEYS] = added
return out
"""

SCRIPTS: Final = (APPEND, SET_IF_NEWER, KEEP, PROBE, CONDITIONAL, FETCH)
APPEND_SHA, SET_IF_NEWER_SHA, KEEP_SHA, PROBE_SHA, CONDITIONAL_SHA, FETCH_SHA = (
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
        >>> script_command(f"script: {PROBE_SHA}, on @user_script:23.")
        " (the command refused: PUBLISH on the locks' channels (ivip:{ns}:lk:*))"
    """
    found = re.search(r"script: ([0-9a-f]{40}), on @user_script:(\d+)", error)
    if found is None:
        return ""
    shas = (APPEND_SHA, SET_IF_NEWER_SHA, KEEP_SHA, PROBE_SHA, CONDITIONAL_SHA, FETCH_SHA)
    scripts = dict(zip(shas, SCRIPTS, strict=True))
    lines = scripts.get(found.group(1), "").splitlines()
    line = int(found.group(2))
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    command = re.search(r"redis\.call\('(\w+)'", text)
    where = text.partition(" -- ")[2]  # what the line's comment says it touches
    if command is None:
        return ""
    return f" (the command refused: {command.group(1)}{' ' + where if where else ''})"
