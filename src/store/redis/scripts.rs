//! The Lua scripts of the Redis store: one per transition, each an atomic
//! step on one record hash, fenced by the attempt's owner token.

/// The fields read back from a record hash (`HMGET`), in the order
/// `parse_record` and the claim script expect. The first
/// [`SETTLED_FIELDS`] are all that a settled record's answer needs (replay,
/// tombstone, unknown, mismatch), so a plain read takes only those. A
/// record's expiry is its key's TTL: no field repeats it (writing one cost
/// each script a `TIME` and a formatted number: claim 7.8 -> 7.1 us,
/// completion 8.5 -> 6.7 us of Redis time). Records written by earlier
/// versions keep an `expires` field, unread.
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

/// The fields of a record that listings filter on: all but the response.
pub const HEAD_FIELDS: [&str; 5] = ["state", "fp", "lease_end", "token", "created"];

/// How many of [`RECORD_FIELDS`] answer a claim that finds a settled record:
/// an in-flight attempt's lease, owner and age are not among them.
pub const SETTLED_FIELDS: usize = 7;

/// Claims a key, or reports the record that holds it. Mirrors the writing
/// rows of `idempotency::decision::decide`: a missing key is claimed; an
/// in-flight attempt with the same fingerprint whose lease ended is claimed
/// afresh (ARGV[5] == '1', `on_unknown: release`) or turned `unknown`, which
/// then lasts the ttl (ARGV[4] - ARGV[3]) from now.
/// An in-flight attempt that this caller will wait for (ARGV[6] == '1',
/// `concurrent: wait`) is marked `waited`, so that whoever ends it
/// publishes the fact ([`tell_waiters!`]). Returns `now_ms` alone when it claimed a key that held nothing (the
/// common case, taken the short way: no record read, no table built or
/// parsed, no closures made; about a fifth less Redis CPU per new key),
/// else {now_ms, claimed, previous record}: the values of [`RECORD_FIELDS`]
/// in order.
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
        .replace("TOKEN_AT", &at("token"))
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
/// lease in ms), written at `now`. It expires after ARGV[4] ms, the lease
/// plus the ttl: it outlives its lease, so that when the lease ends it can
/// still turn `unknown` (and then last the ttl) whatever the two settings.
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
if not rec[STATE_AT] then
  redis.call('DEL', KEYS[1])
",
    write_claim!(),
    r"
  return now
end
if rec[FP_AT] == ARGV[1] and rec[STATE_AT] == 'in_flight' and rec[TOKEN_AT] == ARGV[2] then
  -- This claim, run twice (a cluster client resends a command whose reply
  -- it lost): still this attempt's claim, its lease from now.
",
    write_claim!(),
    r"
  return now
end
if rec[FP_AT] == ARGV[1] and rec[STATE_AT] == 'in_flight' and tonumber(rec[LEASE_END_AT]) <= now then
  if ARGV[5] == '1' then
    redis.call('DEL', KEYS[1])
",
    write_claim!(),
    r"
    return {now, 1, rec}
  end
  redis.call('HSET', KEYS[1], 'state', 'unknown')
  redis.call('PEXPIRE', KEYS[1], string.format('%d', tonumber(ARGV[4]) - tonumber(ARGV[3])))
elseif ARGV[6] == '1' and rec[FP_AT] == ARGV[1] and rec[STATE_AT] == 'in_flight' then
  redis.call('HSET', KEYS[1], 'waited', '1')
end
return {now, 0, rec}
"
);

/// The start of every fenced script: return 0 unless the attempt owned by
/// ARGV[1] still holds the key, in flight. With the state the script writes:
/// return 1 when the attempt's record is in it already, the script having
/// run before (a cluster client resends a command whose reply it lost).
macro_rules! owner_guard {
    (@read) => {
        r"
local owner = redis.call('HMGET', KEYS[1], 'token', 'state', 'waited')
"
    };
    (@in_flight) => {
        r"if owner[1] ~= ARGV[1] or owner[2] ~= 'in_flight' then
  return 0
end
"
    };
    () => {
        concat!(owner_guard!(@read), owner_guard!(@in_flight))
    };
    ($done:literal) => {
        concat!(
            owner_guard!(@read),
            "if owner[1] == ARGV[1] and owner[2] == '",
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
if owner[3] then
  redis.pcall('PUBLISH', ARGV[#ARGV], KEYS[1])
end
"
    };
}

/// Completes the attempt owned by ARGV[1]; 0 when it no longer owns the key.
/// The last argument (ARGV[8]) names the waiters' channel, as for every
/// fenced script.
pub const COMPLETE: &str = concat!(
    owner_guard!("completed"),
    r"
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[2], 'headers', ARGV[3],
  'body', ARGV[4], 'stored', ARGV[5], 'body_size', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
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
pub const MARK_UNKNOWN: &str = concat!(
    owner_guard!("unknown"),
    r"
redis.call('HSET', KEYS[1], 'state', 'unknown')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
",
    tell_waiters!(),
    r"
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
        // A plain read of the settled fields leaves out only what no answer
        // to a settled record reads: the lease, the owner and the age.
        assert_eq!(
            RECORD_FIELDS[SETTLED_FIELDS..],
            ["lease_end", "token", "created"]
        );
    }
}
