//! Every response idemgate itself makes: RFC 9457 `application/problem+json` with a stable `code`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::body::ProxyBody;

/// The catalogue of problem codes. Each has one status and one title; the
/// `code` strings are part of the public contract (SPEC.md section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    NoRoute,
    IdempotencyKeyMissing,
    IdempotencyKeyInvalid,
    RequestTooLarge,
    RequestTimeout,
    IdempotencyKeyReused,
    RequestInProgress,
    OutcomeUnknown,
    ResponseNotStored,
    UpstreamUnreachable,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamOverloaded,
    UpstreamCircuitOpen,
    StoreUnavailable,
    ShuttingDown,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    Internal,
}

impl Code {
    /// All codes, for documentation and tests.
    pub const ALL: [Code; 22] = [
        Code::NoRoute,
        Code::IdempotencyKeyMissing,
        Code::IdempotencyKeyInvalid,
        Code::RequestTooLarge,
        Code::RequestTimeout,
        Code::IdempotencyKeyReused,
        Code::RequestInProgress,
        Code::OutcomeUnknown,
        Code::ResponseNotStored,
        Code::UpstreamUnreachable,
        Code::UpstreamFailed,
        Code::UpstreamTimeout,
        Code::UpstreamOverloaded,
        Code::UpstreamCircuitOpen,
        Code::StoreUnavailable,
        Code::ShuttingDown,
        Code::Unauthorized,
        Code::Forbidden,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::BadRequest,
        Code::Internal,
    ];

    /// The stable machine-readable code.
    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self.entry().1).expect("catalogue statuses are valid")
    }

    pub fn title(self) -> &'static str {
        self.entry().2
    }

    fn entry(self) -> (&'static str, u16, &'static str) {
        match self {
            Code::NoRoute => ("no_route", 404, "No route matches this request"),
            Code::IdempotencyKeyMissing => (
                "idempotency_key_missing",
                400,
                "This request needs an idempotency key",
            ),
            Code::IdempotencyKeyInvalid => (
                "idempotency_key_invalid",
                400,
                "The idempotency key is not valid",
            ),
            Code::RequestTooLarge => ("request_too_large", 413, "The request body is too large"),
            Code::RequestTimeout => ("request_timeout", 408, "The request body stalled"),
            Code::IdempotencyKeyReused => (
                "idempotency_key_reused",
                422,
                "The idempotency key was used for a different request",
            ),
            Code::RequestInProgress => (
                "request_in_progress",
                409,
                "A request with this idempotency key is in progress",
            ),
            Code::OutcomeUnknown => (
                "outcome_unknown",
                409,
                "The outcome of the request with this idempotency key is unknown",
            ),
            Code::ResponseNotStored => (
                "response_not_stored",
                409,
                "The response to this idempotency key was too large to store",
            ),
            Code::UpstreamUnreachable => (
                "upstream_unreachable",
                502,
                "The upstream could not be reached",
            ),
            Code::UpstreamFailed => (
                "upstream_failed",
                502,
                "The connection to the upstream broke before a whole response arrived",
            ),
            Code::UpstreamTimeout => (
                "upstream_timeout",
                504,
                "The upstream did not answer in time",
            ),
            Code::UpstreamOverloaded => (
                "upstream_overloaded",
                503,
                "The upstream has too many requests in flight",
            ),
            Code::UpstreamCircuitOpen => (
                "upstream_circuit_open",
                503,
                "The upstream's circuit breaker is open",
            ),
            Code::StoreUnavailable => (
                "store_unavailable",
                503,
                "The idempotency store is unavailable",
            ),
            Code::ShuttingDown => ("shutting_down", 503, "idemgate is shutting down"),
            Code::Unauthorized => ("unauthorized", 401, "A valid bearer token is required"),
            Code::Forbidden => ("forbidden", 403, "This operation is disabled"),
            Code::NotFound => ("not_found", 404, "Not found"),
            Code::MethodNotAllowed => (
                "method_not_allowed",
                405,
                "This endpoint does not take this method",
            ),
            Code::BadRequest => ("bad_request", 400, "The request is not valid"),
            Code::Internal => ("internal_error", 500, "Internal error"),
        }
    }
}

/// One problem response under construction.
#[derive(Debug)]
pub struct Problem {
    pub code: Code,
    pub detail: String,
    /// Whole seconds for the `Retry-After` header (at least 1 when set).
    pub retry_after: Option<u64>,
    /// Extension members added to the JSON body (e.g. `original_status`).
    pub extra: Vec<(&'static str, serde_json::Value)>,
}

impl Problem {
    /// `store_unavailable` always says `Retry-After: 1` (SPEC 9), wherever
    /// it is made (proxy or admin listener); other codes add theirs with
    /// [`Problem::retry_after`].
    #[cold]
    pub fn new(code: Code, detail: impl Into<String>) -> Problem {
        Problem {
            code,
            detail: detail.into(),
            retry_after: (code == Code::StoreUnavailable).then_some(1),
            extra: Vec::new(),
        }
    }

    /// Adds `Retry-After`, rounded up to whole seconds and at least 1.
    pub fn retry_after(mut self, wait: std::time::Duration) -> Problem {
        let secs = wait.as_millis().div_ceil(1000).max(1);
        self.retry_after = Some(u64::try_from(secs).unwrap_or(u64::MAX));
        self
    }

    pub fn with(mut self, name: &'static str, value: serde_json::Value) -> Problem {
        self.extra.push((name, value));
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "type": format!("https://idemgate.dev/problems/{}", self.code.as_str()),
            "title": self.code.title(),
            "status": self.code.status().as_u16(),
            "detail": self.detail,
            "code": self.code.as_str(),
        });
        for (name, value) in &self.extra {
            body[*name] = value.clone();
        }
        body
    }

    #[cold]
    pub fn into_response(self) -> Response<ProxyBody> {
        let body = Bytes::from(self.to_json().to_string());
        let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *response.status_mut() = self.code.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // The body it waited for is still owed: the connection is not
        // kept for a next request (RFC 9110 15.5.9; an audit: closed
        // unsaid some 5 s later, after the answer).
        if self.code == Code::RequestTimeout {
            (response.headers_mut()).insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.code == Code::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_unavailable_always_says_retry_after() {
        let response = Problem::new(Code::StoreUnavailable, "down").into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = Problem::new(Code::NoRoute, "none").into_response();
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn codes_are_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {}", code.as_str());
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        let p = Problem::new(Code::RequestInProgress, "x").retry_after(Default::default());
        assert_eq!(p.retry_after, Some(1));
        let p = Problem::new(Code::RequestInProgress, "x")
            .retry_after(std::time::Duration::from_millis(1500));
        assert_eq!(p.retry_after, Some(2));
    }
}
