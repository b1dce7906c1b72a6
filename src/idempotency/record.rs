//! What the store keeps per key: the attempt's state and, once completed, the response.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    InFlight,
    Completed,
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::InFlight => "in_flight",
            State::Completed => "completed",
            State::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        match text {
            "in_flight" => Some(State::InFlight),
            "completed" => Some(State::Completed),
            "unknown" => Some(State::Unknown),
            _ => None,
        }
    }
}

/// One key's record. Times are milliseconds since the Unix epoch on the store's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub state: State,
    pub fingerprint: String,
    /// The owner token of the attempt that claimed the key.
    pub token: String,
    pub lease_end_ms: u64,
    pub created_ms: u64,
    /// When the record goes. Redis keeps it as the key's TTL: read for
    /// listings and lookups (`Store::get`, `Store::records`), 0 in claims.
    pub expires_ms: u64,
    /// Set once `completed`.
    pub response: Option<StoredResponse>,
}

impl Record {
    /// A record in `state` with fingerprint `f`, token `t`, no times, and
    /// a stored `201 {}` when completed: for unit tests.
    #[cfg(test)]
    pub fn bare(state: State) -> Record {
        Record {
            state,
            fingerprint: "f".into(),
            token: "t".into(),
            lease_end_ms: 0,
            created_ms: 0,
            expires_ms: 0,
            response: (state == State::Completed).then(|| StoredResponse {
                status: 201,
                headers: Default::default(),
                body: Some(bytes::Bytes::from_static(b"{}")),
                body_size: 2,
            }),
        }
    }

    /// As a listing holds it: its response [`StoredResponse::listed`].
    pub fn listed(&self) -> Record {
        Record {
            state: self.state,
            fingerprint: self.fingerprint.clone(),
            token: self.token.clone(),
            response: self.response.as_ref().map(StoredResponse::listed),
            ..*self
        }
    }
}

/// A recorded upstream response.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    /// The upstream's headers minus hop-by-hop ones, in arrival order.
    pub headers: HeaderMap,
    /// `None` when the body was over `max_response_body` (a tombstone).
    pub body: Option<Bytes>,
    /// The body's length; for a body not stored, its `Content-Length`, or
    /// [`SIZE_UNKNOWN`] when it came without one.
    pub body_size: u64,
}

/// The `body_size` of a body too large to store that came without a
/// `Content-Length`: it was streamed to the client after the record was
/// written, and its length is known to no one who reads the record.
pub const SIZE_UNKNOWN: u64 = u64::MAX;

impl StoredResponse {
    /// As a listing shows it: [`Self::detached`] (on Redis, the header
    /// values are slices of the whole value, body included), with the
    /// body's bytes left out but whether one was stored kept (regression,
    /// the bounds audit: a Redis listing of 1,000 records of 60 KB held
    /// every body at once, +66 MB of RSS for a 480 KB answer).
    pub fn listed(&self) -> StoredResponse {
        StoredResponse {
            body: self.body.as_ref().map(|_| Bytes::new()),
            ..self.detached()
        }
    }

    /// A copy that owns its header bytes. hyper's header values are slices
    /// of the connection's read buffer: a record that kept them would keep
    /// that whole buffer alive for its `ttl` (kilobytes per record in the
    /// memory store). The body is shared, not copied.
    pub fn detached(&self) -> StoredResponse {
        // By names: `len` counts every value, and a map made for more than
        // 24,576 panics (regression, the panics audit: 40,000 `set-cookie`
        // values recorded by hand broke every listing).
        let mut headers = HeaderMap::with_capacity(self.headers.keys_len());
        for (name, value) in &self.headers {
            let value = HeaderValue::from_bytes(value.as_bytes())
                .expect("a valid header value stays valid");
            headers.append(name.clone(), value);
        }
        StoredResponse {
            status: self.status,
            headers,
            body: self.body.clone(),
            body_size: self.body_size,
        }
    }
}

/// Headers as `name: value\r\n` lines; names and values can hold neither CR nor LF.
pub fn encode_headers(headers: &HeaderMap) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(size);
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The most header fields a stored response holds: hyper refuses an
/// upstream's answer with more, and the admin API a response recorded by
/// hand.
pub const MAX_FIELDS: usize = 100;

/// The inverse of [`encode_headers`]; lines that do not parse are skipped,
/// and so are lines past what a header map holds (a record no version
/// writes: regression, the panics audit: a record of 30,000 lines in Redis
/// panicked every request and listing that read it).
/// The values are slices of `bytes` (one buffer for them all, no copy each).
pub fn decode_headers(bytes: Bytes) -> HeaderMap {
    let lines = bytes.iter().filter(|&&b| b == b'\n').count();
    let mut headers = HeaderMap::with_capacity(lines.min(MAX_FIELDS));
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = &line[colon + 1..];
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_maybe_shared(bytes.slice_ref(value)),
        ) && headers.try_append(name, value).is_err()
        {
            break;
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (the panics audit): a record of more lines than a header
    /// map holds (none written so) panicked every read of it; 40,000 values
    /// of one name (recorded by hand) panicked every listing.
    #[test]
    fn more_fields_than_a_map_holds_never_panic() {
        let lines: String = (0..30_000).map(|i| format!("x-h{i}: v\n")).collect();
        let decoded = decode_headers(Bytes::from(lines));
        assert!(
            decoded.len() > 20_000 && decoded.len() < 30_000,
            "{}",
            decoded.len()
        );
        let mut headers = HeaderMap::new();
        for _ in 0..40_000 {
            headers.append("set-cookie", HeaderValue::from_static("c=v"));
        }
        let stored = StoredResponse {
            status: 200,
            headers,
            body: None,
            body_size: 0,
        };
        assert_eq!(stored.detached().headers.len(), 40_000);
    }

    #[test]
    fn headers_round_trip_with_repeats_and_odd_bytes() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.append("x-empty", HeaderValue::from_static(""));
        h.append("x-colon", HeaderValue::from_static("a: b:c"));
        h.append("x-latin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(decode_headers(encode_headers(&h).into()), h);
    }

    #[test]
    fn a_detached_response_keeps_no_slice_of_the_buffer_it_was_read_from() {
        // As hyper hands them over: every value a slice of one read buffer.
        let buffer = Bytes::from_static(b"application/json;set-cookie-value").slice(..);
        let mut headers = HeaderMap::new();
        headers.append(
            "content-type",
            HeaderValue::from_maybe_shared(buffer.slice(..16)).unwrap(),
        );
        headers.append(
            "set-cookie",
            HeaderValue::from_maybe_shared(buffer.slice(17..)).unwrap(),
        );
        let read = StoredResponse {
            status: 201,
            headers,
            body: Some(Bytes::from_static(b"{}")),
            body_size: 2,
        };
        let kept = read.detached();
        assert_eq!(kept, read);
        let within = buffer.as_ptr_range();
        for value in kept.headers.values() {
            assert!(
                !within.contains(&value.as_bytes().as_ptr()),
                "{value:?} still points into the read buffer"
            );
        }
    }
}
