"""Lua scripts of the stream broker. Each states its KEYS, ARGV and return value.

They exist so that "check that I still own this entry, then act" is atomic: a worker that
was frozen past its lease and lost an entry to another worker can neither ack it, renew it,
nor dead-letter it.
"""

# KEYS[1] = events stream
# ARGV[1] = group, ARGV[2] = consumer, ARGV[3] = smallest id, ARGV[4] = largest id,
# ARGV[5..n] = entry ids (at most ~1000 per call)
# Acks every id still pending for ARGV[2] (one XPENDING range, one XACK); returns the ids that
# are not (lost to another consumer, or already acked).
ACK_OWNED = """
local owned = {}
for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], 1000000, ARGV[2])) do
  owned[e[1]] = true
end
local ack, lost = {}, {}
for i = 5, #ARGV do
  if owned[ARGV[i]] then ack[#ack + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
end
if #ack > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ack)) end
return lost
"""

# KEYS[1] = events stream
# ARGV[1] = group, ARGV[2] = consumer, ARGV[3] = idle ms to set (0 = renew, >0 = hand back),
# ARGV[4] = smallest id, ARGV[5] = largest id, ARGV[6..n] = entry ids
# Resets the idle time of every id still owned by ARGV[2] (XCLAIM ... JUSTID does not count a
# delivery); returns the ids that are no longer ours.
RENEW_OWNED = """
local owned = {}
for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[5], 1000000, ARGV[2])) do
  owned[e[1]] = true
end
local mine, lost = {}, {}
for i = 6, #ARGV do
  if owned[ARGV[i]] then mine[#mine + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
end
if #mine > 0 then
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(mine) do args[#args + 1] = id end
  args[#args + 1] = 'IDLE'
  args[#args + 1] = ARGV[3]
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return lost
"""

# KEYS[1] = events stream
# ARGV[1] = group, ARGV[2] = consumer, ARGV[3] = min idle ms, ARGV[4] = count, ARGV[5] = cursor
# XAUTOCLAIMs entries idle longer than ARGV[3] to ARGV[2]; returns
# {next_cursor, entries, delivery_counts, deleted_ids}.
RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[5], 'COUNT', ARGV[4])
local entries = r[2]
local counts = {}
for i, e in ipairs(entries) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  if p[1] then counts[i] = p[1][4] else counts[i] = 0 end
end
return {r[1], entries, counts, r[3] or {}}
"""

# KEYS[1] = events stream, KEYS[2] = dead-letter stream
# ARGV[1] = group, ARGV[2] = consumer, ARGV[3] = entry id, ARGV[4] = dead maxlen,
# ARGV[5..n] = field/value pairs for the dead entry (bounded by the caller: unpack overflows
# near 8,000 values)
# If ARGV[3] is still pending for ARGV[2]: XACK it and XADD it to the dead stream; returns the
# dead entry's id, or false when the entry is no longer ours.
# Everything that can fail is checked before the first write (the dead key's type; the
# fields were bounded by the caller), so an entry is never acked without its dead letter. The
# XACK comes first on purpose: Redis lets a script that has already written finish even when
# memory is full (maxmemory, noeviction), so dead-lettering moves an entry on a full Redis,
# and the trim that follows frees the original.
DEAD_LETTER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return false end
local t = redis.call('TYPE', KEYS[2])
if type(t) == 'table' then t = t['ok'] end
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE dead-letter key ' .. KEYS[2] .. ' is a ' .. t .. ', not a stream')
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
"""

# KEYS[1] = events stream
# ARGV[1] = acked entries to keep for inspection (approximate; 0 = none),
# ARGV[2] = most entries to drop in one call
# Trims with MINID below the oldest entry that any group still needs (pending, or not yet
# delivered) and, when ARGV[1] > 0, below the entry that keeps ~ARGV[1] entries. Only XLEN,
# XRANGE, XINFO, XPENDING and XTRIM: nothing that a full Redis (maxmemory, noeviction) refuses,
# so trimming goes on and frees memory while writes fail. Returns the number of entries removed.
TRIM_SAFE = """
local len = redis.call('XLEN', KEYS[1])
if len == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
local cut = nil
local keep = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
local drop = len - keep
if drop <= 0 then return 0 end
if drop > most then drop = most end
local r = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', drop + 1)
if #r <= drop then
  -- every entry may go: cut just above the last one
  local ms, seq = parts(r[#r][1])
  cut = ms .. '-' .. tostring(tonumber(seq) + 1)
else
  cut = r[#r][1]
end
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local ms, seq = parts(last)
  local after = ms .. '-' .. tostring(tonumber(seq) + 1)
  if less(after, cut) then cut = after end
  local p = redis.call('XPENDING', KEYS[1], name)
  if tonumber(p[1]) > 0 and less(p[2], cut) then cut = p[2] end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', cut)
"""

# seconds a conversation order list lives after its last append: ids leave it as their turns
# end, so this only bounds a list whose ids were never taken (a route removed meanwhile)
ORDER_LIST_TTL_S = 7 * 24 * 3600

# KEYS[1] = events stream, KEYS[2] = the event's marker ({ns}:published:{event_id}),
# KEYS[3..n] = conversation order lists
# ARGV[1] = marker lifetime in ms (0 = no marker), ARGV[2..n] = the entry's field/value pairs
# Publishes an event once: when the marker exists (this event id was published within its
# lifetime, say by a publish resent after a timeout), returns the stream id it holds and adds
# nothing. Otherwise XADDs the entry, sets the marker to its id and RPUSHes the id to every
# conversation order list, atomically (the order lists follow stream order). Returns the
# entry id. The XADD is the first write, so a full Redis (OOM) refuses the whole publish. Each
# order list expires :data:`ORDER_LIST_TTL_S` after its last append.
PUBLISH_ONCE = """
local ttl = ARGV[1]
if ttl ~= '0' then
  local known = redis.call('GET', KEYS[2])
  if known then return known end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
if ttl ~= '0' then redis.call('SET', KEYS[2], id, 'PX', ttl) end
for i = 3, #KEYS do
  redis.call('RPUSH', KEYS[i], id)
  redis.call('EXPIRE', KEYS[i], __ORDER_TTL_S__)
end
return id
""".replace("__ORDER_TTL_S__", str(ORDER_LIST_TTL_S))

# KEYS[1] = events stream
# ARGV[1] = group name prefix ("{prefix}:"), ARGV[2] = idle ms
# Removes, from every group whose name starts with ARGV[1], the consumers that hold no pending
# entry and have not read for ARGV[2] ms: workers that exited (their entries were reclaimed
# by others). A consumer with pending entries is never removed (XGROUP DELCONSUMER would drop
# them). Only reads and DELCONSUMER, so it also runs on a full Redis. Returns how many it
# removed.
DELETE_IDLE_CONSUMERS = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return 0 end
local removed = 0
local prefix = ARGV[1]
local idle_max = tonumber(ARGV[2])
for _, g in ipairs(groups) do
  local name
  for i = 1, #g, 2 do if g[i] == 'name' then name = g[i + 1] end end
  if name and string.sub(name, 1, #prefix) == prefix then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], name)) do
      local cname, pending, idle
      for i = 1, #c, 2 do
        if c[i] == 'name' then cname = c[i + 1]
        elseif c[i] == 'pending' then pending = tonumber(c[i + 1])
        elseif c[i] == 'idle' then idle = tonumber(c[i + 1]) end
      end
      if cname and pending == 0 and idle and idle > idle_max then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], name, cname)
        removed = removed + 1
      end
    end
  end
end
return removed
"""
