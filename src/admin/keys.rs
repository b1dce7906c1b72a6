//! The admin API's record endpoints: list, get, purge, and recording a
//! response by hand to resolve an unknown outcome.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::{Admin, json_response, param};
use crate::body::{self, ProxyBody};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{MAX_FIELDS, State, StoredResponse};
use crate::keys::{is_unknown, listing_json, no_such_route, record_json, unlisted_route};
use crate::problem::{Code, Problem};
use crate::store::{Listing, Resolved, StoreError};

/// What `GET /keys?state=` selects by.
const LISTED_STATES: [&str; 4] = ["in_flight", "completed", "unknown", "damaged"];

/// How many records `GET /keys` lists unless `?limit=` says otherwise, and
/// the most it may ask for: a listing of a million records was held whole,
/// with its JSON, in the serving process (regression, found by an audit:
/// 100k records on Redis took 800 MB; a pod's memory limit kills it).
const DEFAULT_LIST_LIMIT: usize = 10_000;
const MAX_LIST_LIMIT: usize = 1_000_000;

/// Set on a listing that stopped at its limit: more records match.
const MORE: http::HeaderName = http::HeaderName::from_static("idemgate-more");

/// The largest body a `PUT /keys/...` may carry.
const MAX_ADMIN_BODY: u64 = 16 * 1024 * 1024;

impl Admin {
    pub(super) async fn list(&self, query: &str) -> Result<Response<ProxyBody>, Problem> {
        // `?State=unknown` or a bare `?state` read every record, unfiltered
        // (regression, the verification audit).
        super::only_params(query, &["state", "route", "limit"])?;
        let state = param(query, "state");
        let route = param(query, "route");
        // A typo must not read as "nothing to resolve".
        if let Some(s) = state.as_deref()
            && !LISTED_STATES.contains(&s)
        {
            return Err(Problem::new(
                Code::BadRequest,
                format!("state {s:?} is not one of {}", LISTED_STATES.join(", ")),
            ));
        }
        let limit = match param(query, "limit") {
            None => DEFAULT_LIST_LIMIT,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
                _ => {
                    return Err(Problem::new(
                        Code::BadRequest,
                        format!("limit must be a number from 1 to {MAX_LIST_LIMIT}"),
                    ));
                }
            },
        };
        let config = self.proxy.routing().config.clone();
        let now = self.proxy.store.now_ms().await.map_err(store_problem)?;
        // One more than asked: whether there are more is said.
        let mut records = self
            .proxy
            .store
            .records_up_to(
                route.as_deref(),
                None,
                |k, r| match state.as_deref() {
                    None => true,
                    Some("unknown") => is_unknown(&config, k, r, now),
                    // Not one whose lease has ended: it is listed as unknown
                    // (regression, an audit: listed under both).
                    Some("in_flight") => {
                        r.state == State::InFlight && !is_unknown(&config, k, r, now)
                    }
                    Some(s) => r.state.as_str() == s,
                },
                limit + 1,
            )
            .await
            .map_err(store_problem)?;
        let more = records.found.len() > limit;
        records.found.truncate(limit);
        if let Some(route) = route.as_deref().filter(|_| records.is_empty())
            && let Some(why) = unlisted_route(&config, &self.proxy.store, route)
                .await
                .map_err(store_problem)?
        {
            return Err(Problem::new(Code::NotFound, why));
        }
        // A damaged record's outcome is as unknown to the operator as an
        // unknown one's: both need a hand.
        let damaged = matches!(state.as_deref(), None | Some("unknown" | "damaged"));
        let mut response = json_response(StatusCode::OK, &json!(listing_json(&records, damaged)));
        if more {
            response
                .headers_mut()
                .insert(MORE, http::HeaderValue::from_static("true"));
        }
        Ok(response)
    }

    pub(super) async fn get(
        &self,
        route: &str,
        key: &str,
        scope: Option<String>,
    ) -> Result<Response<ProxyBody>, Problem> {
        let found = self.find(route, key, scope.as_deref()).await?;
        let list = listing_json(&found, true);
        let body = if scope.is_some() {
            list[0].clone()
        } else {
            json!(list)
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    pub(super) async fn purge(
        &self,
        route: &str,
        key: &str,
        scope: Option<String>,
        force: bool,
    ) -> Result<Response<ProxyBody>, Problem> {
        let found = self.find(route, key, scope.as_deref()).await?;
        let purged = crate::keys::purge(&self.proxy.store, found.keys(), force, true)
            .await
            .map_err(store_problem)?;
        if let Some(refused) = purged.refused() {
            return Err(Problem::new(
                Code::RequestInProgress,
                format!("{refused}; or purge with ?force=true (keys purge --force)"),
            )
            .retry_after(std::time::Duration::from_millis(purged.lease_left_ms)));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({ "purged": purged.done }),
        ))
    }

    pub(super) async fn put(
        &self,
        route: &str,
        key: &str,
        scope: Option<String>,
        body: Incoming,
    ) -> Result<Response<ProxyBody>, Problem> {
        let Some(scope) = scope else {
            return Err(Problem::new(
                Code::BadRequest,
                "PUT needs ?scope=HEX (see GET /keys/{route}/{key})",
            ));
        };
        // Each failure said as such (regression, found by an audit: all
        // were "the body could not be read", the limit nowhere).
        let bytes = body::read_limited(body, MAX_ADMIN_BODY, body::BODY_STALL)
            .await
            .map_err(|error| match error {
                body::ReadError::TooLarge => Problem::new(
                    Code::RequestTooLarge,
                    format!("a recorded response is at most {MAX_ADMIN_BODY} bytes of JSON"),
                ),
                body::ReadError::Stalled => Problem::new(
                    Code::RequestTimeout,
                    "the body stalled for 10 s; nothing was recorded",
                ),
                body::ReadError::Broken | body::ReadError::Malformed => {
                    Problem::new(Code::BadRequest, "the body broke off or was malformed")
                }
            })?;
        let response = manual_response(&bytes)?;
        // A route a reload removed: the default ttl.
        let ttl = (self.proxy.routing().config.routes.iter())
            .find(|r| &*r.name == route)
            .and_then(|r| r.idempotency.as_ref())
            .map_or(std::time::Duration::from_secs(86_400), |p| p.ttl);
        let storage_key = StorageKey {
            route: route.to_owned(),
            scope,
            key: key.to_owned(),
        };
        match self
            .proxy
            .store
            .resolve(&storage_key, &response, ttl)
            .await
            .map_err(store_problem)?
        {
            Resolved::Done => {}
            Resolved::Missing => {
                return Err(Problem::new(
                    Code::NotFound,
                    "no record for this route, scope and key",
                ));
            }
            Resolved::InFlight { lease_left_ms } => {
                return Err(Problem::new(
                    Code::RequestInProgress,
                    "this key's attempt is still running: its own answer will be recorded; resolve it only once it is unknown (its lease ends first)",
                )
                .retry_after(std::time::Duration::from_millis(lease_left_ms)));
            }
        }
        tracing::info!(
            route,
            key,
            status = response.status,
            "response recorded by an operator"
        );
        let record = self
            .proxy
            .store
            .get(&storage_key)
            .await
            .map_err(store_problem)?;
        let body = record.map_or(json!(null), |r| record_json(&storage_key, &r));
        Ok(json_response(StatusCode::OK, &body))
    }

    async fn find(&self, route: &str, key: &str, scope: Option<&str>) -> Result<Listing, Problem> {
        let found = self
            .proxy
            .store
            .find(route, key, scope)
            .await
            .map_err(store_problem)?;
        if found.is_empty() {
            if let Some(why) = no_such_route(&self.proxy.routing().config, route) {
                return Err(Problem::new(Code::NotFound, why));
            }
            return Err(Problem::new(
                Code::NotFound,
                "no record for this route and key",
            ));
        }
        Ok(found)
    }
}

/// `{"status": 201, "headers": {"content-type": "..."}, "body": "..."}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManualResponse {
    status: u16,
    /// A header's value, or its values in order (`Set-Cookie`), as
    /// [`crate::keys::headers_json`] shows them.
    #[serde(default)]
    headers: std::collections::BTreeMap<String, OneOrMany>,
    #[serde(default)]
    body: String,
    /// A body that is not text (protobuf, CBOR, an image), base64-encoded
    /// (standard alphabet, padded); instead of `body`.
    #[serde(default)]
    body_base64: Option<String>,
}

/// Its errors name what was expected, not this type (regression, an
/// audit: "did not match any variant of untagged enum OneOrMany" reached
/// the problem's detail).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a header value: a string, or a list of strings (Set-Cookie)"
)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(one) => std::slice::from_ref(one),
            OneOrMany::Many(many) => many,
        }
    }
}

fn manual_response(bytes: &Bytes) -> Result<StoredResponse, Problem> {
    // An object, not serde's other form of a struct: `[201]` was a 201
    // with no headers and no body, recorded (regression, the config audit).
    if bytes.trim_ascii_start().first() == Some(&b'[') {
        return Err(Problem::new(
            Code::BadRequest,
            "expected a JSON object {\"status\":..,\"headers\":{..},\"body\":\"..\"} (or \"body_base64\"), not a list",
        ));
    }
    let manual: ManualResponse = serde_json::from_slice(bytes).map_err(|e| {
        // The status in the API's words, not serde's type (regression, the
        // verification audit: "expected u16").
        let e = e.to_string().replace("expected u16", "expected a status, a number such as 201");
        Problem::new(
            Code::BadRequest,
            format!("expected {{\"status\":..,\"headers\":{{..}},\"body\":\"..\"}} (or \"body_base64\"): {e}"),
        )
    })?;
    // A final answer: an informational status (1xx) replayed as one
    // would leave the client waiting for the real one.
    if !(200..=599).contains(&manual.status) {
        return Err(Problem::new(
            Code::BadRequest,
            "status must be a final one, between 200 and 599",
        ));
    }
    let fields: usize = manual.headers.values().map(|v| v.values().len()).sum();
    if fields > MAX_FIELDS {
        // Regression, the panics audit: 25,000 names panicked the PUT, and
        // 40,000 values of one were stored, then broke every read of them.
        return Err(Problem::new(
            Code::BadRequest,
            format!(
                "a recorded response has at most {MAX_FIELDS} header fields, as an upstream's answer may (this one has {fields})"
            ),
        ));
    }
    let mut headers = http::HeaderMap::new();
    for (name, values) in &manual.headers {
        for value in values.values() {
            let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) else {
                return Err(Problem::new(
                    Code::BadRequest,
                    format!("header {name:?} is not valid"),
                ));
            };
            headers.append(name, value);
        }
    }
    // As from an upstream's answer: a replay must not say `connection:
    // close` or `transfer-encoding: chunked` about a message it frames itself.
    crate::headers::strip_hop_by_hop(&mut headers);
    // Any bytes (regression, noted by an audit: only a JSON string, so a
    // binary answer could not be recorded by hand).
    let body = match manual.body_base64 {
        None => Bytes::from(manual.body),
        Some(_) if !manual.body.is_empty() => {
            return Err(Problem::new(
                Code::BadRequest,
                "give body or body_base64, not both",
            ));
        }
        Some(encoded) => {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| {
                    Problem::new(Code::BadRequest, format!("body_base64 is not base64: {e}"))
                })?;
            Bytes::from(decoded)
        }
    };
    Ok(StoredResponse {
        status: manual.status,
        headers,
        body_size: body.len() as u64,
        body: Some(body),
    })
}

fn store_problem(error: StoreError) -> Problem {
    if let StoreError::Damaged(why) = &error {
        tracing::error!(error = %why, "admin: damaged record");
        return Problem::new(
            Code::Internal,
            "the record at this key is damaged (not in idemgate's format); DELETE /keys/{route}/{key} removes it",
        );
    }
    tracing::error!(error = %error, "admin: store operation failed");
    Problem::new(
        Code::StoreUnavailable,
        "the idempotency store is unavailable",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (the panics audit): 25,000 header names panicked the
    /// PUT; 40,000 values of one were stored, and broke every read.
    #[test]
    fn a_recorded_response_has_at_most_100_header_fields() {
        let names: Vec<String> = (0..25_000).map(|i| format!("\"x-h{i}\": \"v\"")).collect();
        let cookies = vec!["\"c=v\""; 40_000].join(",");
        let hundred = vec!["\"c=v\""; 100].join(",");
        for (headers, taken) in [
            (names.join(","), false),
            (format!("\"set-cookie\": [{cookies}]"), false),
            (
                format!("\"set-cookie\": [{hundred}], \"x-one\": \"more\""),
                false,
            ),
            (format!("\"set-cookie\": [{hundred}]"), true),
        ] {
            let body = Bytes::from(format!(r#"{{"status": 200, "headers": {{{headers}}}}}"#));
            match manual_response(&body) {
                Ok(response) => assert!(taken, "{} fields taken", response.headers.len()),
                Err(problem) => {
                    assert!(!taken, "{}", problem.detail);
                    assert!(problem.detail.contains("at most 100"), "{}", problem.detail);
                }
            }
        }
    }

    /// Regression (an audit): a header value that is neither a string nor a
    /// list of strings was refused with serde's words for a Rust type.
    #[test]
    fn a_bad_header_value_is_refused_in_the_api_s_words() {
        let body = Bytes::from_static(br#"{"status": 200, "headers": {"a": 1}, "body": "x"}"#);
        let Err(problem) = manual_response(&body) else {
            panic!("a number as a header value was taken");
        };
        assert_eq!(problem.code, Code::BadRequest);
        assert!(
            problem
                .detail
                .contains("a header value: a string, or a list of strings"),
            "{}",
            problem.detail
        );
        assert!(!problem.detail.contains("OneOrMany"), "{}", problem.detail);
        assert!(!problem.detail.contains("untagged"), "{}", problem.detail);
        // Nor a status of the wrong type or size (the verification audit).
        for body in [r#"{"status": "201"}"#, r#"{"status": 70000}"#] {
            let Err(problem) = manual_response(&Bytes::from(body)) else {
                panic!("{body} was taken");
            };
            assert!(!problem.detail.contains("u16"), "{}", problem.detail);
            assert!(
                problem.detail.contains("a status, a number"),
                "{}",
                problem.detail
            );
        }
    }
}
