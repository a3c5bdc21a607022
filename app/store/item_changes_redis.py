"""The item change log in Redis (standalone or Redis Cluster): four keys under one hash tag
(`models.redis_keys.item_change_keys`), each change written and each page read by one Lua
script, so a change is atomic and a page consistent on a cluster too (one slot, one node).

    {prefix}:catalogue:{items}:seq      INCR counter: the last sequence number given
    {prefix}:catalogue:{items}:changes  hash: item id -> its latest change (JSON)
    {prefix}:catalogue:{items}:order    sorted set: item id -> that change's number
    {prefix}:catalogue:{items}:epoch    random token, set with the log's first change

Calls are control plane (an admin write, a watcher's poll), bounded like the version pin's.
"""

from __future__ import annotations

import uuid
from typing import Any

from app.config import RedisConfig
from app.errors import ItemChangesUnavailable
from app.store.item_changes import ChangePage, ItemChange, ItemChangeLog
from app.store.redis_client import control_call, control_client
from models.redis_keys import check_prefix, item_change_keys

# KEYS: seq, changes, order, epoch. ARGV: item id, record, a new epoch (used if none yet).
APPEND = """
if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('SET', KEYS[4], ARGV[3]) end
local seq = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return {seq, redis.call('GET', KEYS[4])}
"""
# KEYS: as APPEND. ARGV: after, limit, the item read as number `after` ('': unknown).
# -> {epoch | nil, head, follows (1 | 0), id, seq, record, id, ...}. The item still holds
# number `after`, or a later one (it changed again) with no other item holding `after`;
# otherwise the log lost changes the reader read (a failover) and numbered new ones anew.
READ = """
local follows = 1
if ARGV[3] ~= '' then
  local score = redis.call('ZSCORE', KEYS[3], ARGV[3])
  local there = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[1], ARGV[1], 'LIMIT', 0, 1)
  if not score or tonumber(score) < tonumber(ARGV[1]) or (there[1] and there[1] ~= ARGV[3]) then
    follows = 0
  end
end
local out = {redis.call('GET', KEYS[4]) or false, tonumber(redis.call('GET', KEYS[1]) or '0'),
             follows}
local found = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf', 'WITHSCORES',
                         'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #found, 2 do
  out[#out + 1] = found[i]
  out[#out + 1] = found[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], found[i]) or false
end
return out
"""


def _unavailable(reason: str) -> ItemChangesUnavailable:
    return ItemChangesUnavailable(f"the item change log is unavailable: {reason}")


class RedisItemChangeLog(ItemChangeLog):
    """The change log every worker of every replica reads (REDIS_URL set)."""

    shared = True

    def __init__(self, config: RedisConfig) -> None:
        self.keys = item_change_keys(check_prefix(config.prefix))
        self.timeout_s = config.control_timeout_s
        self.client = control_client(config)

    async def _eval(self, script: str, *args: str | int) -> Any:
        # Every Redis error is the log's unavailability to the caller (a 503 for a write, a
        # retry for a poll); the reason says which (e.g. OOM, READONLY, a timeout).
        call = self.client.eval(script, len(self.keys), *self.keys, *args)
        return await control_call(call, self.timeout_s, _unavailable)

    async def append(self, change: ItemChange) -> tuple[str, ItemChange]:
        record = change.record().decode()
        seq, epoch = await self._eval(APPEND, change.item_id, record, uuid.uuid4().hex)
        return str(epoch), ItemChange(change.item_id, int(seq), change.attributes, change.at)

    async def read(self, after: int, limit: int, last_item: str | None = None) -> ChangePage:
        reply = await self._eval(READ, after, limit, last_item or "")
        epoch, head, follows, rest = reply[0], int(reply[1]), bool(reply[2]), reply[3:]
        changes, last = [], after
        for i in range(0, len(rest), 3):
            item_id, seq, raw = rest[i], int(float(rest[i + 1])), rest[i + 2]
            change = ItemChange.parse(item_id, seq, raw) if raw is not None else None
            if change is not None:
                changes.append(change)
            last = max(last, seq)
        return ChangePage(epoch if isinstance(epoch, str) else None, head, changes, last, follows)

    async def aclose(self) -> None:
        await self.client.aclose()
