//! The record format of the Redis store: one string per record, so that a
//! claim is a plain `SET key value NX PX ms GET` (no script for a new key or
//! a replay) and a record takes a third of a hash's memory.
//!
//! ```text
//! 2 <state> <waited> <token> \n <fp> \n <lease ms> \n <ttl ms> \n <created ms> \n    head
//! <status> \n <stored 0|1> \n <body size> \n <headers length> \n <headers><body>       completed only
//! ```
//!
//! `2` is the format; the state is `F` (in flight), `C` (completed) or `U`
//! (unknown); `waited` is `1` once a waiting claim asked to be told (see
//! `events.rs`). An in-flight record is its head alone and expires `lease +
//! ttl` after its claim, on Redis's clock: its lease has ended when its TTL
//! is at most its `ttl` (the scripts' `PTTL` test). `created` is the claiming
//! instance's clock, shown in listings only. The scripts (`scripts.rs`)
//! read the state and waited bytes and the token at fixed places, and keep
//! the head as it is when they change the state.

use std::io::Write;

use bytes::Bytes;
use redis::{RedisWrite, ToRedisArgs};

use crate::idempotency::record::{Record, State, StoredResponse, decode_headers};
use crate::store::StoreError;

/// An in-flight record's head, as a claim writes it (waited `0`).
pub(super) fn claim_value(
    fingerprint: &str,
    token: &str,
    lease_ms: u64,
    ttl_ms: u64,
    created_ms: u64,
) -> Vec<u8> {
    head(b'F', fingerprint, token, lease_ms, ttl_ms, created_ms)
}

/// A record's head in `state` (waited `0`).
pub(super) fn head(
    state: u8,
    fingerprint: &str,
    token: &str,
    lease_ms: u64,
    ttl_ms: u64,
    created_ms: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + token.len() + fingerprint.len() + 5 + 3 * 20);
    out.extend_from_slice(&[b'2', state, b'0']);
    for field in [token.as_bytes(), fingerprint.as_bytes()] {
        out.extend_from_slice(field);
        out.push(b'\n');
    }
    let mut numbers = itoa::Buffer::new();
    for number in [lease_ms, ttl_ms, created_ms] {
        out.extend_from_slice(numbers.format(number).as_bytes());
        out.push(b'\n');
    }
    out
}

/// A response as a record holds it after its head, written straight into
/// the command (one argument, no intermediate buffer): status, whether the
/// body is kept, its size, the encoded headers' length, headers and body;
/// after `head` when there is one (a completion sends the whole record).
pub(super) struct ResponsePart<'a> {
    pub head: &'a [u8],
    pub status: u16,
    pub headers: &'a [u8],
    pub body: Option<&'a [u8]>,
    pub body_size: u64,
}

impl<'a> ResponsePart<'a> {
    pub(super) fn new(response: &'a StoredResponse, headers: &'a [u8]) -> ResponsePart<'a> {
        ResponsePart {
            head: &[],
            status: response.status,
            headers,
            body: response.body.as_deref(),
            body_size: response.body_size,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.head.len() + 4 + 2 + 21 + 21 + self.headers.len() + self.body.map_or(0, <[u8]>::len)
    }
}

impl ToRedisArgs for ResponsePart<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut numbers = itoa::Buffer::new();
        let stored: &[u8] = if self.body.is_some() { b"1\n" } else { b"0\n" };
        let mut arg = out.writer_for_next_arg();
        let mut put = |bytes: &[u8]| {
            arg.write_all(bytes)
                .expect("writing to a command buffer cannot fail");
        };
        put(self.head);
        put(numbers.format(self.status).as_bytes());
        put(b"\n");
        put(stored);
        for number in [self.body_size, self.headers.len() as u64] {
            put(numbers.format(number).as_bytes());
            put(b"\n");
        }
        put(self.headers);
        put(self.body.unwrap_or_default());
    }
}

/// How an in-flight record's lease is read: its key's TTL (`PTTL`) at
/// `now_ms`, Redis's clock. Unknown in a claim's plain `SET .. GET`, whose
/// in-flight answers the claim script judges.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lease {
    pub now_ms: u64,
    pub pttl_ms: i64,
}

/// A record from its value. A head cut short (a listing's head read, see
/// [`HEAD_END`]) parses without its response.
pub(super) fn parse(value: Vec<u8>, lease: Option<Lease>) -> Result<Record, StoreError> {
    let damaged = || StoreError::Damaged("record value not in idemgate's format".into());
    let value = Bytes::from(value);
    if value.len() < 3 || value[0] != b'2' {
        return Err(damaged());
    }
    let state = match value[1] {
        b'F' => State::InFlight,
        b'C' => State::Completed,
        b'U' => State::Unknown,
        _ => return Err(damaged()),
    };
    let mut rest = value.slice(3..);
    let field = |rest: &mut Bytes| -> Option<Bytes> {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let field = rest.slice(..end);
        *rest = rest.slice(end + 1..);
        Some(field)
    };
    let text = |field: Bytes| String::from_utf8(field.to_vec()).ok();
    let number =
        |field: Option<Bytes>| -> Option<u64> { std::str::from_utf8(&field?).ok()?.parse().ok() };
    let token = field(&mut rest).and_then(text).ok_or_else(damaged)?;
    let fingerprint = field(&mut rest).and_then(text).ok_or_else(damaged)?;
    let lease_ms = number(field(&mut rest)).ok_or_else(damaged)?;
    let ttl_ms = number(field(&mut rest)).ok_or_else(damaged)?;
    let created_ms = number(field(&mut rest)).ok_or_else(damaged)?;
    let lease_end_ms = match (state, lease) {
        (State::InFlight, Some(Lease { now_ms, pttl_ms })) if pttl_ms >= 0 => now_ms
            .saturating_add(pttl_ms.unsigned_abs())
            .saturating_sub(ttl_ms),
        _ => created_ms.saturating_add(lease_ms),
    };
    let response = match state {
        State::Completed if !rest.is_empty() => {
            let status = number(field(&mut rest))
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(damaged)?;
            let stored = field(&mut rest).ok_or_else(damaged)?;
            let body_size = number(field(&mut rest)).ok_or_else(damaged)?;
            let headers_len = number(field(&mut rest))
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n <= rest.len())
                .ok_or_else(damaged)?;
            let headers = decode_headers(rest.slice(..headers_len));
            let body = (&stored[..] == b"1").then(|| rest.slice(headers_len..));
            Some(StoredResponse {
                status,
                headers,
                body,
                body_size,
            })
        }
        _ => None,
    };
    Ok(Record {
        state,
        fingerprint,
        token,
        lease_end_ms,
        created_ms,
        expires_ms: 0,
        response,
    })
}

/// Whether a record parsed from a whole value is damaged: completed without
/// a response. (A listing's head read leaves the response out on purpose.)
pub(super) fn check_complete(record: &Record) -> Result<(), StoreError> {
    if record.state == State::Completed && record.response.is_none() {
        return Err(StoreError::Damaged(
            "completed record without a response".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn response() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("set-cookie", "a=1".parse().unwrap());
        headers.append("set-cookie", "b=2".parse().unwrap());
        StoredResponse {
            status: 201,
            headers,
            body: Some(Bytes::from_static(b"{\"id\":\n7}")),
            body_size: 9,
        }
    }

    /// A completed value as the completion script makes it: the head with
    /// its state byte changed, then the response part.
    fn completed(head: &[u8], response: &StoredResponse) -> Vec<u8> {
        let headers = crate::idempotency::record::encode_headers(&response.headers);
        let part = ResponsePart::new(response, &headers).to_redis_args();
        let mut value = head.to_vec();
        value[1] = b'C';
        value.extend_from_slice(&part[0]);
        value
    }

    #[test]
    fn a_claim_reads_back_with_its_lease_from_the_keys_ttl() {
        let head = claim_value("fp", "tok", 30_000, 86_400_000, 1_000);
        assert_eq!(head, b"2F0tok\nfp\n30000\n86400000\n1000\n");
        // 10 s into the lease: the key has lease + ttl - 10 s to live.
        let lease = Lease {
            now_ms: 11_000,
            pttl_ms: 86_420_000,
        };
        let record = parse(head.clone(), Some(lease)).unwrap();
        assert_eq!(record.state, State::InFlight);
        assert_eq!(
            (record.token.as_str(), record.fingerprint.as_str()),
            ("tok", "fp")
        );
        assert_eq!((record.created_ms, record.lease_end_ms), (1_000, 31_000));
        assert_eq!(record.response, None);
        // Without the key's TTL the lease is counted from `created`.
        assert_eq!(parse(head.clone(), None).unwrap().lease_end_ms, 31_000);
        // A server's clock and TTL past any sense saturate (regression, the
        // panics audit: an overflow panicked a debug build's request).
        let hostile = Lease {
            now_ms: u64::MAX - 1_000,
            pttl_ms: i64::MAX,
        };
        let record = parse(head, Some(hostile)).unwrap();
        assert_eq!(record.lease_end_ms, u64::MAX - 86_400_000);
    }

    #[test]
    fn a_completed_record_keeps_its_response_byte_for_byte() {
        let head = claim_value("fp", "tok", 30_000, 60_000, 5);
        for response in [
            response(),
            StoredResponse {
                body: None,
                body_size: 1 << 40,
                ..response()
            },
            StoredResponse {
                status: 204,
                headers: HeaderMap::new(),
                body: Some(Bytes::new()),
                body_size: 0,
            },
        ] {
            let record = parse(completed(&head, &response), None).unwrap();
            assert_eq!(record.state, State::Completed);
            assert_eq!(record.response.as_ref(), Some(&response));
            check_complete(&record).unwrap();
        }
    }

    #[test]
    fn values_not_in_the_format_are_damaged_records() {
        let head = claim_value("fp", "tok", 1, 2, 3);
        let mut bad_state = head.clone();
        bad_state[1] = b'X';
        let mut cut = completed(&head, &response());
        cut.truncate(cut.len() - 20); // the headers' length runs past the end
        for value in [
            b"".to_vec(),
            b"1F0tok\nfp\n1\n2\n3\n".to_vec(),
            bad_state,
            b"2F0tok\nfp\n1\n2\n".to_vec(),
            b"2F0tok\nfp\nx\n2\n3\n".to_vec(),
            cut,
        ] {
            let text = String::from_utf8_lossy(&value).into_owned();
            assert!(
                matches!(parse(value, None), Err(StoreError::Damaged(_))),
                "{text:?}"
            );
        }
        let mut no_response = head;
        no_response[1] = b'C';
        let record = parse(no_response, None).unwrap();
        assert!(check_complete(&record).is_err());
    }
}
