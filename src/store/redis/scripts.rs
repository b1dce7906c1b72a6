//! The Lua scripts of the Redis store: one per transition, each an atomic
//! step on one record (`compact.rs`'s format), fenced by the attempt's
//! owner token. A new key's claim and a replay need no script (a plain
//! `SET .. NX GET`, `RedisStore::claim`); the claim script judges what that
//! finds in flight, on Redis's clock. Records of earlier versions (one hash
//! each, [`RECORD_FIELDS`]) are still read, settled and taken over; what
//! the scripts write is always a compact record.

/// The fields of a record hash written by an earlier version, in the order
/// `wire::parse_record` and the claim script expect.
pub const RECORD_FIELDS: [&str; 10] = [
    "state",
    "fp",
    "status",
    "headers",
    "body",
    "stored",
    "body_size",
    "lease_end",
    "token",
    "created",
];

/// The fields of a record hash that listings filter on: all but the
/// response, save its status (a completed record without one is damaged).
pub const HEAD_FIELDS: [&str; 6] = ["state", "fp", "status", "lease_end", "token", "created"];

/// The claim script: run when the plain claim found a record in flight for
/// the same request (or a record hash). Mirrors the writing rows of
/// `idempotency::decision::decide`: a missing key is claimed; this
/// attempt's own record (its claim run twice: a cluster client resends a
/// command whose reply it lost) is claimed again; an in-flight attempt whose
/// lease ended is claimed afresh (ARGV[5] == '1', `on_unknown: release`) or
/// turned `unknown`, which then lasts the ttl (ARGV[4] - ARGV[3]) from now.
/// An in-flight attempt that this caller will wait for (ARGV[6] == '1',
/// `concurrent: wait`) is marked `waited`, so that whoever ends it
/// publishes the fact ([`tell_waiters!`]). ARGV[1] is the fingerprint,
/// ARGV[2] the token, ARGV[7] the claim's record (`compact::claim_value`).
///
/// Returns `now_ms` alone when it claimed without a record to report, else
/// {now_ms, claimed, kind, record, pttl}: kind `s` with the record's value
/// and its key's TTL (-1 when not read: a settled record), or kind `h` with
/// a record hash's [`RECORD_FIELDS`]. A key of another type is an error
/// (`DAMAGED`): nothing is claimed, and nothing may be forwarded.
pub fn claim() -> String {
    let fields: Vec<String> = RECORD_FIELDS.iter().map(|f| format!("'{f}'")).collect();
    let at = |name: &str| {
        let i = RECORD_FIELDS.iter().position(|f| *f == name);
        (i.expect("a record field") + 1).to_string() // Lua counts from 1
    };
    CLAIM
        .replace("RECORD_FIELDS", &fields.join(", "))
        .replace("STATE_AT", &at("state"))
        .replace("FP_AT", &at("fp"))
        .replace("LEASE_END_AT", &at("lease_end"))
}

/// The claim's record (ARGV[7]), expiring after ARGV[4] ms: the lease plus
/// the ttl. It outlives its lease, so that when the lease ends it can still
/// turn `unknown` (and then last the ttl) whatever the two settings; its
/// lease has ended once its TTL is at most its ttl.
macro_rules! write_claim {
    () => {
        r"redis.call('SET', KEYS[1], ARGV[7], 'PX', ARGV[4])
"
    };
}

/// After an in-flight attempt's lease ended under `on_unknown: lock`: the
/// record is `unknown` for the ttl from now.
macro_rules! expire_unknown {
    () => {
        r"redis.call('PEXPIRE', KEYS[1], string.format('%d', tonumber(ARGV[4]) - tonumber(ARGV[3])))
"
    };
}

const CLAIM: &str = concat!(
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  ",
    write_claim!(),
    r"  return now
end
if kind == 'string' then
  local v = redis.call('GET', KEYS[1])
  local a = string.find(v, '\n', 4, true)
  local b = a and string.find(v, '\n', a + 1, true)
  local c = b and string.find(v, '\n', b + 1, true)
  local d = c and string.find(v, '\n', c + 1, true)
  local ttl = d and tonumber(string.sub(v, c + 1, d - 1))
  if not ttl or string.sub(v, 1, 2) ~= '2F' or string.sub(v, a + 1, b - 1) ~= ARGV[1] then
    return {now, 0, 's', v, -1}
  end
  if string.sub(v, 4, a - 1) == ARGV[2] then
    ",
    write_claim!(),
    r"    return now
  end
  -- No expiry (-1: not idemgate's doing) counts as a lease that ended.
  local pttl = math.max(redis.call('PTTL', KEYS[1]), 0)
  if pttl <= ttl then
    if ARGV[5] == '1' then
      ",
    write_claim!(),
    r"      return {now, 1, 's', v, pttl}
    end
    if type(redis.pcall('SETRANGE', KEYS[1], 1, 'U')) == 'table' then
      return {now, 2, 's', v, pttl}
    end
    ",
    expire_unknown!(),
    r"  elseif ARGV[6] == '1' then
    redis.pcall('SETRANGE', KEYS[1], 2, '1')
  end
  return {now, 0, 's', v, pttl}
end
if kind ~= 'hash' then
  return redis.error_reply('DAMAGED the key holds a ' .. kind .. ', not a record')
end
local rec = redis.call('HMGET', KEYS[1], RECORD_FIELDS)
if not rec[STATE_AT] then
  ",
    write_claim!(),
    r"  return now
end
if rec[FP_AT] == ARGV[1] and rec[STATE_AT] == 'in_flight' and tonumber(rec[LEASE_END_AT]) <= now then
  if ARGV[5] == '1' then
    ",
    write_claim!(),
    r"    return {now, 1, 'h', rec}
  end
  if type(redis.pcall('HSET', KEYS[1], 'state', 'unknown')) == 'table' then
    return {now, 2, 'h', rec}
  end
  ",
    expire_unknown!(),
    r"elseif ARGV[6] == '1' and rec[FP_AT] == ARGV[1] and rec[STATE_AT] == 'in_flight' then
  redis.pcall('HSET', KEYS[1], 'waited', '1')
end
return {now, 0, 'h', rec}
"
);

/// The start of every fenced script: return 0 unless the attempt owned by
/// ARGV[1] still holds the key, in flight. With the state the script writes:
/// return 1 when the attempt's record is in it already, the script having
/// run before (a cluster client resends a command whose reply it lost).
/// `pcall`: a key that is not a string (an earlier version's record) is not
/// this attempt's.
macro_rules! owner_guard {
    (@read) => {
        concat!(
            r"
local v = redis.pcall('GET', KEYS[1])",
            owner_guard!(@check)
        )
    };
    (@check) => {
        r"
if type(v) ~= 'string' or string.sub(v, 4, 3 + #ARGV[1]) ~= ARGV[1]
    or string.byte(v, 4 + #ARGV[1]) ~= 10 or string.sub(v, 1, 1) ~= '2' then
  return 0
end
local state = string.sub(v, 2, 2)
"
    };
    (@in_flight) => {
        r"if state ~= 'F' then
  return 0
end
"
    };
    () => {
        concat!(owner_guard!(@read), owner_guard!(@in_flight))
    };
    (@done $done:literal) => {
        concat!(
            "if state == '",
            $done,
            "' then\n  return 1\nend\n",
            owner_guard!(@in_flight)
        )
    };
}

/// After a fenced script's write: when a waiting claim marked the record,
/// publish its key name on the channel named by the last argument, for the
/// other instances' waiters. Unmarked records (the common case) publish
/// nothing. `pcall`: a Redis user not allowed to publish still completes
/// (its waiters then see the change at their next claim).
macro_rules! tell_waiters {
    () => {
        r"
if string.byte(v, 3) == 49 then
  redis.pcall('PUBLISH', ARGV[#ARGV], KEYS[1])
end
"
    };
}

/// A fenced script's read of its record (`v`), where a key that is gone is
/// written whole: the record ARGV[$value], kept ARGV[$ttl] ms.
macro_rules! written_whole_where_gone {
    ($value:literal, $ttl:literal) => {
        concat!(
            r"
local v = redis.pcall('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[",
            $value,
            "], 'PX', ARGV[",
            $ttl,
            r"])
  return 1
end"
        )
    };
}

/// Completes the attempt owned by ARGV[1] with the whole completed record
/// ARGV[2] (head and `compact::ResponsePart`), kept ARGV[3] ms; 0 when it
/// no longer owns the key. A key that is gone (Redis lost it: a restart, a
/// flush, a failover; or an operator purged it) is written too: the
/// outcome is kept, and a retry replays it rather than run again. The last
/// argument (ARGV[4]) names the waiters' channel, as for every fenced
/// script.
pub const COMPLETE: &str = concat!(
    written_whole_where_gone!(2, 3),
    owner_guard!(@check),
    owner_guard!(@done "C"),
    r"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
",
    tell_waiters!(),
    r"
return 1
"
);

/// Deletes the attempt owned by ARGV[1].
pub const RELEASE: &str = concat!(
    owner_guard!(),
    r"
redis.call('DEL', KEYS[1])
",
    tell_waiters!(),
    r"
return 1
"
);

/// Turns the attempt owned by ARGV[1] `unknown`, for ARGV[2] ms (the ttl).
/// A key that is gone (Redis lost it, an operator purged it) is written
/// whole, with the unknown record's head ARGV[3], as a completion is: an
/// unknown outcome dropped would let a retry run again.
pub const MARK_UNKNOWN: &str = concat!(
    written_whole_where_gone!(3, 2),
    owner_guard!(@check),
    owner_guard!(@done "U"),
    r"
redis.call('SETRANGE', KEYS[1], 1, 'U')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
",
    tell_waiters!(),
    r"
return 1
"
);

/// An operator's purge: deletes the record, {1, 0}; {0, 0} when there is
/// none; {2, ms} for an attempt still running (its lease ends in ms),
/// left alone unless ARGV[1] is '1' (forced). The lease is read as RESOLVE
/// reads it; a value in no format of idemgate's is deleted.
pub const PURGE: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  return {0, 0}
end
if ARGV[1] ~= '1' then
  local left = 0
  if kind == 'string' then
    local v = redis.call('GET', KEYS[1])
    if string.sub(v, 1, 2) == '2F' then
      local nl = {}
      local e = 3
      for i = 1, 4 do
        e = e and string.find(v, '\n', e + 1, true)
        nl[i] = e
      end
      -- A ttl field that is no number: a damaged value, deleted.
      local ttl = e and tonumber(string.sub(v, nl[3] + 1, nl[4] - 1))
      if ttl then
        left = redis.call('PTTL', KEYS[1]) - ttl
      end
    end
  elseif kind == 'hash' then
    local r = redis.call('HMGET', KEYS[1], 'lease_end', 'state')
    if r[2] == 'in_flight' then
      local t = redis.call('TIME')
      left = (tonumber(r[1]) or 0) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    end
  end
  if left > 0 then
    return {2, left}
  end
end
redis.call('DEL', KEYS[1])
return {1, 0}
";

/// An operator's answer for an existing record: the record keeps its head
/// (an earlier version's hash gets one made from its fields) and takes the
/// response part ARGV[1], kept ARGV[2] ms: {1, 0}. {0, 0} when there is no
/// record; {2, ms} for an attempt still running (its lease ends in ms),
/// which is left alone: its own answer is coming.
pub const RESOLVE: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
local head
if kind == 'string' then
  local v = redis.call('GET', KEYS[1])
  local nl = {}
  local e = 3
  for i = 1, 5 do
    e = e and string.find(v, '\n', e + 1, true)
    nl[i] = e
  end
  if not e or string.sub(v, 1, 1) ~= '2' then
    return redis.error_reply('DAMAGED the value is not in idemgate\'s format')
  end
  local ttl = tonumber(string.sub(v, nl[3] + 1, nl[4] - 1))
  if not ttl then
    return redis.error_reply('DAMAGED the value is not in idemgate\'s format')
  end
  if string.sub(v, 2, 2) == 'F' then
    local left = redis.call('PTTL', KEYS[1]) - ttl
    if left > 0 then
      return {2, left}
    end
  end
  head = string.sub(v, 3, e)
elseif kind == 'hash' then
  local r = redis.call('HMGET', KEYS[1], 'token', 'fp', 'lease_end', 'created', 'state', 'status')
  -- As a lookup reads it: no state, no record; another state, or a
  -- completed one without its response, damaged (regressions, an audit and
  -- its verification: these were overwritten into a completed record,
  -- whose empty fingerprint then refused every request with 422).
  if not r[5] then
    return {0, 0}
  end
  if (r[5] ~= 'in_flight' and r[5] ~= 'completed' and r[5] ~= 'unknown')
    or (r[5] == 'completed' and not r[6]) then
    return redis.error_reply('DAMAGED the record has no valid state')
  end
  local created = tonumber(r[4]) or 0
  if r[5] == 'in_flight' then
    local t = redis.call('TIME')
    local left = (tonumber(r[3]) or 0) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    if left > 0 then
      return {2, left}
    end
  end
  local lease = math.max((tonumber(r[3]) or created) - created, 0)
  head = '0' .. (r[1] or '') .. '\n' .. (r[2] or '') .. '\n' .. string.format('%d', lease)
    .. '\n' .. ARGV[2] .. '\n' .. string.format('%d', created) .. '\n'
elseif kind == 'none' then
  return {0, 0}
else
  return redis.error_reply('DAMAGED the key holds a ' .. kind .. ', not a record')
end
redis.call('SET', KEYS[1], '2C' .. head .. ARGV[1], 'PX', ARGV[2])
return {1, 0}
";

/// Reads a record of either format with its key's TTL and Redis's time (ms),
/// for lookups and listings: {'s', value, pttl, now}, or {'h', the hash
/// fields named by ARGV[2..], pttl, now}, or {kind} for a key that holds no
/// record. With ARGV[1] == '1' only a value's head is read (its first
/// 4 KiB, cut after the head; the whole value only if the head is longer),
/// and the value's length comes after the time:
/// a listing's first pass moves no response, not even into Lua
/// (regression, found by an audit: 500 records of 1 MiB were each read
/// whole, the pipeline outlasted `op_timeout`, every listing failed and
/// live claims queued behind it). The time is read with the TTL, so that
/// an in-flight record's lease end (`compact::Lease`) is exact however long
/// a listing takes.
pub const READ: &str = r"
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function head_end(v)
  local e = 3
  for _ = 1, 5 do
    e = e and string.find(v, '\n', e + 1, true)
  end
  return e
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local v
  if ARGV[1] == '1' then
    v = redis.call('GETRANGE', KEYS[1], 0, 4095)
    local e = head_end(v)
    if e then
      v = string.sub(v, 1, e)
    else
      v = redis.call('GET', KEYS[1])
      e = head_end(v)
      if e then
        v = string.sub(v, 1, e)
      end
    end
    return {'s', v, redis.call('PTTL', KEYS[1]), now(), redis.call('STRLEN', KEYS[1])}
  else
    v = redis.call('GET', KEYS[1])
  end
  return {'s', v, redis.call('PTTL', KEYS[1]), now()}
elseif kind == 'hash' then
  -- The body's length too, as a value's (regression, a verification
  -- audit: earlier versions' records counted as nothing, and a pipeline of
  -- them read whole outlasted op_timeout).
  return {'h', redis.call('HMGET', KEYS[1], unpack(ARGV, 2)), redis.call('PTTL', KEYS[1]), now(),
    redis.call('HSTRLEN', KEYS[1], 'body')}
end
return {kind}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_script_reads_record_fields_where_the_field_list_puts_them() {
        let script = claim();
        assert!(!script.contains("_AT]") && !script.contains("RECORD_FIELDS"));
        // Lua counts from 1: state first, lease_end eighth.
        assert!(script.contains("if not rec[1] then"));
        assert!(script.contains("tonumber(rec[8]) <= now"));
        assert_eq!(RECORD_FIELDS[7], "lease_end");
    }
}
