//! How a record's key and fields travel to and from Redis: the key written
//! into a command piece by piece, the record read back from its fields.

use std::io::Write;

use bytes::Bytes;
use redis::{RedisWrite, ToRedisArgs};

use super::scripts::RECORD_FIELDS;
use crate::idempotency::record::{Record, State, StoredResponse, decode_headers};
use crate::store::StoreError;

/// A record's Redis key, written into a command piece by piece (no
/// intermediate `String`).
pub(super) struct EncodedKey<'a>(pub(super) [&'a str; 8]);

impl EncodedKey<'_> {
    pub(super) fn len(&self) -> usize {
        self.0.iter().map(|part| part.len()).sum()
    }
}

impl ToRedisArgs for EncodedKey<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        for part in self.0 {
            arg.write_all(part.as_bytes())
                .expect("writing to a command buffer cannot fail");
        }
    }
}

/// `text` matched literally in a `SCAN MATCH` pattern.
pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// A record from the values of [`RECORD_FIELDS`], in that order; missing
/// trailing values (a read of the first `SETTLED_FIELDS`) count as absent.
/// None when it has no state field, i.e. the key does not exist.
pub(super) fn parse_record(mut values: Vec<Option<Vec<u8>>>) -> Result<Option<Record>, StoreError> {
    if values.first().is_none_or(Option::is_none) {
        return Ok(None);
    }
    values.resize(RECORD_FIELDS.len(), None);
    let Ok(
        [
            state,
            fp,
            status,
            headers,
            body,
            stored,
            body_size,
            lease_end,
            token,
            created,
        ],
    ) = <[Option<Vec<u8>>; RECORD_FIELDS.len()]>::try_from(values)
    else {
        unreachable!("resized to RECORD_FIELDS.len()")
    };
    let text = |value: Option<Vec<u8>>| value.and_then(|v| String::from_utf8(v).ok());
    let number = |value: Option<Vec<u8>>| {
        value
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let state = state
        .as_deref()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(State::parse)
        .ok_or_else(|| StoreError::Damaged("record without a valid state".into()))?;
    let response = status
        .as_deref()
        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
        .map(|status| StoredResponse {
            status,
            headers: decode_headers(headers.map(Bytes::from).unwrap_or_default()),
            body: (stored.as_deref() == Some(b"1")).then(|| Bytes::from(body.unwrap_or_default())),
            body_size: number(body_size),
        });
    Ok(Some(Record {
        state,
        fingerprint: text(fp).unwrap_or_default(),
        token: text(token).unwrap_or_default(),
        lease_end_ms: number(lease_end),
        created_ms: number(created),
        // The key's TTL, which listings read (`RedisStore::read_listed`).
        expires_ms: 0,
        response,
    }))
}
