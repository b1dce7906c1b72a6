//! The Lua scripts of the Redis store: one per transition, each an atomic
//! step on one record hash, fenced by the attempt's owner token.

/// The fields read back from a record hash (`HMGET`), in the order
/// `parse_record` and the claim script (`rec[1]` state, `rec[2]` fp,
/// `rec[4]` lease_end) expect. A record's expiry is its key's TTL: no field
/// repeats it (writing one cost each script a `TIME` and a formatted
/// number: claim 7.8 -> 7.1 us, completion 8.5 -> 6.7 us of Redis time).
/// Records written by earlier versions keep an `expires` field, unread.
pub const RECORD_FIELDS: [&str; 10] = [
    "state",
    "fp",
    "token",
    "lease_end",
    "created",
    "status",
    "headers",
    "body",
    "stored",
    "body_size",
];

/// Claims a key, or reports the record that holds it. Mirrors the writing
/// rows of `idempotency::decision::decide`: a missing key is claimed; an
/// in-flight attempt with the same fingerprint whose lease ended is claimed
/// afresh (ARGV[5] == '1', `on_unknown: release`) or turned `unknown`.
/// Returns `now_ms` alone when it claimed a key that held nothing (the
/// common case, taken the short way: no record read, no table built or
/// parsed, no closures made; about a fifth less Redis CPU per new key),
/// else {now_ms, claimed, previous record}: the values of [`RECORD_FIELDS`]
/// in order.
pub fn claim() -> String {
    let fields: Vec<String> = RECORD_FIELDS.iter().map(|f| format!("'{f}'")).collect();
    CLAIM.replace("RECORD_FIELDS", &fields.join(", "))
}

/// `now`, Redis `TIME` in ms. Times are written with `string.format('%d')`:
/// Lua numbers are doubles, and passed to `redis.call` as they are they go
/// through `%.17g`, whose float formatting cost the claim script 5%.
macro_rules! redis_now {
    () => {
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"
    };
}

/// The in-flight record of ARGV[2]'s attempt (ARGV[1] fingerprint, ARGV[3]
/// lease and ARGV[4] ttl in ms), written at `now`.
macro_rules! write_claim {
    () => {
        r"
redis.call('HSET', KEYS[1], 'state', 'in_flight', 'fp', ARGV[1], 'token', ARGV[2],
  'lease_end', string.format('%d', now + tonumber(ARGV[3])), 'created', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
"
    };
}

const CLAIM: &str = concat!(
    redis_now!(),
    r"
if redis.call('EXISTS', KEYS[1]) == 0 then
",
    write_claim!(),
    r"
  return now
end
local rec = redis.call('HMGET', KEYS[1], RECORD_FIELDS)
if not rec[1] then
  redis.call('DEL', KEYS[1])
",
    write_claim!(),
    r"
  return now
end
if rec[2] == ARGV[1] and rec[1] == 'in_flight' and tonumber(rec[4]) <= now then
  if ARGV[5] == '1' then
    redis.call('DEL', KEYS[1])
",
    write_claim!(),
    r"
    return {now, 1, rec}
  end
  redis.call('HSET', KEYS[1], 'state', 'unknown')
end
return {now, 0, rec}
"
);

/// The start of every fenced script: return 0 unless the attempt owned by
/// ARGV[1] still holds the key, in flight.
macro_rules! owner_guard {
    () => {
        r"
local owner = redis.call('HMGET', KEYS[1], 'token', 'state')
if owner[1] ~= ARGV[1] or owner[2] ~= 'in_flight' then
  return 0
end
"
    };
}

/// Completes the attempt owned by ARGV[1]; 0 when it no longer owns the key.
pub const COMPLETE: &str = concat!(
    owner_guard!(),
    r"
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[2], 'headers', ARGV[3],
  'body', ARGV[4], 'stored', ARGV[5], 'body_size', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
"
);

/// Deletes the attempt owned by ARGV[1].
pub const RELEASE: &str = concat!(
    owner_guard!(),
    r"
redis.call('DEL', KEYS[1])
return 1
"
);

/// Turns the attempt owned by ARGV[1] `unknown`.
pub const MARK_UNKNOWN: &str = concat!(
    owner_guard!(),
    r"
redis.call('HSET', KEYS[1], 'state', 'unknown')
return 1
"
);

/// An operator's answer for an existing record, whatever its state.
pub const RESOLVE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[1], 'headers', ARGV[2],
  'body', ARGV[3], 'stored', '1', 'body_size', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";
