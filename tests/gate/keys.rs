//! Keys and fingerprints end to end: replay byte for byte, bad or missing
//! keys, reuse, scopes, what is forwarded.

use std::time::Duration;

use crate::common::{Backend, eventually};
use crate::{Setup, both_stores};

async fn replay_is_byte_identical(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let first = s.post("k-replay", "{\"a\":1}", &[]).await;
    assert_eq!(first.status, 201);
    assert!(
        first.header("idempotent-replayed").is_none(),
        "the first response is not a replay"
    );
    let second = s.post("k-replay", "{\"a\":1}", &[]).await;
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    let mut replayed = second.headers.clone();
    replayed.remove("idempotent-replayed");
    replayed.remove("x-request-id");
    let mut original = first.headers.clone();
    original.remove("x-request-id");
    assert_eq!(
        replayed, original,
        "headers replayed as they came (incl. both set-cookie lines)"
    );
    assert_eq!(first.headers.get_all("set-cookie").iter().count(), 2);
    assert_eq!(s.upstream.hits(), 1);
}

async fn key_missing_and_invalid_are_400(backend: Backend) {
    let s = Setup::new(backend, "key_max_length: 8", "").await;
    let missing = s.client.send("POST", &s.url(), &[], "{}").await;
    assert_eq!(
        (missing.status.as_u16(), missing.code().as_str()),
        (400, "idempotency_key_missing")
    );
    for bad in ["has space", "waytoolongkey", "\"unterminated"] {
        let reply = s.post(bad, "{}", &[]).await;
        assert_eq!(
            (reply.status.as_u16(), reply.code().as_str()),
            (400, "idempotency_key_invalid"),
            "{bad}"
        );
    }
    let twice = s
        .client
        .send(
            "POST",
            &s.url(),
            &[("idempotency-key", "a"), ("idempotency-key", "b")],
            "{}",
        )
        .await;
    assert_eq!(twice.code(), "idempotency_key_invalid");
    assert_eq!(s.upstream.hits(), 0);
    // A Structured-Field string is the same key unquoted.
    assert_eq!(s.post("\"sf\"", "{}", &[]).await.status, 201);
    assert_eq!(
        s.post("sf", "{}", &[]).await.header("idempotent-replayed"),
        Some("true")
    );
}

async fn keyless_requests_pass_when_not_required(backend: Backend) {
    let s = Setup::new(backend, "require_key: false", "").await;
    assert_eq!(s.client.send("POST", &s.url(), &[], "{}").await.status, 201);
    assert_eq!(s.client.send("POST", &s.url(), &[], "{}").await.status, 201);
    assert_eq!(s.upstream.hits(), 2);
}

async fn methods_outside_the_list_pass_through(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    for _ in 0..2 {
        let reply = s
            .client
            .send("PUT", &s.url(), &[("idempotency-key", "k")], "{}")
            .await;
        assert_eq!(reply.status, 201);
    }
    assert_eq!(s.upstream.hits(), 2);
}

async fn reused_key_with_other_request_is_422(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    // While the first attempt is in flight...
    let slow = {
        let (client, url) = (s.client.clone(), s.url());
        tokio::spawn(async move {
            client
                .send(
                    "POST",
                    &url,
                    &[("idempotency-key", "k-reuse"), ("x-test-delay-ms", "600")],
                    "one",
                )
                .await
        })
    };
    eventually(
        Duration::from_secs(5),
        "first attempt reached the upstream",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    assert_eq!(
        s.post("k-reuse", "two", &[]).await.code(),
        "idempotency_key_reused"
    );
    assert_eq!(slow.await.unwrap().status, 201);
    // ...and after it completed.
    let reply = s.post("k-reuse", "two", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (422, "idempotency_key_reused")
    );
    assert_eq!(s.upstream.hits(), 1);
}

/// Regression: the query went into the fingerprint as sent, so the retry of
/// a client whose library writes escapes in the other case (`%2f`, `%2F`),
/// or escapes an unreserved character (`%41` for `A`), got 422.
async fn a_retry_whose_query_escapes_differ_in_case_is_replayed(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let post = |query: &'static str| {
        let url = s.proxy.url(&format!("/api/orders?{query}"));
        let client = s.client.clone();
        async move {
            let headers = [
                ("idempotency-key", "k-escapes"),
                ("content-type", "application/json"),
            ];
            client.send("POST", &url, &headers, "{}").await
        }
    };
    let first = post("to=a%2fb&n=%41").await;
    assert_eq!(first.status, 201);
    let again = post("to=a%2Fb&n=A").await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    // An escape that names another character is another request.
    assert_eq!(post("to=a/b&n=A").await.code(), "idempotency_key_reused");
    assert_eq!(s.upstream.hits(), 1);
}

async fn scopes_keep_callers_apart(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let alice = s
        .post("k-scope", "{\"a\":1}", &[("authorization", "Bearer alice")])
        .await;
    let bob = s
        .post("k-scope", "{\"b\":2}", &[("authorization", "Bearer bob")])
        .await;
    assert_eq!((alice.status.as_u16(), bob.status.as_u16()), (201, 201));
    assert!(
        bob.header("idempotent-replayed").is_none(),
        "bob never sees alice's record"
    );
    let again = s
        .post("k-scope", "{\"a\":1}", &[("authorization", "Bearer alice")])
        .await;
    assert_eq!(again.body, alice.body);
    assert_eq!(s.upstream.hits(), 2);
}

async fn forwarded_request_carries_key_budget_and_forwarding_headers(backend: Backend) {
    let s = Setup::new(backend, "", "total: 10s").await;
    assert_eq!(s.post("\"k-fwd\"", "{}", &[]).await.status, 201);
    let h = s.upstream.last_headers();
    assert_eq!(
        h.get("idempotency-key").unwrap(),
        "\"k-fwd\"",
        "the key is forwarded unchanged"
    );
    let budget: u64 = h
        .get("x-request-timeout-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(budget > 0 && budget <= 10_000);
    assert!(h.get("x-forwarded-for").is_some());
    assert!(h.get("traceparent").is_some());
}

/// SPEC 9: a protected request gets the forwarding headers of a
/// passed-through one (section 3): `Host` set to the upstream's authority,
/// `X-Forwarded-Host` / `-Proto` / `-For`, the `X-Request-Id` the client
/// gets back (generated, or the client's own), and no hop-by-hop headers.
async fn protected_request_gets_the_pass_through_forwarding_headers(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let reply = s
        .post(
            "k-hdrs",
            "{}",
            &[
                ("connection", "x-drop"),
                ("x-drop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic c2VjcmV0"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-kept", "yes"),
            ],
        )
        .await;
    assert_eq!(reply.status, 201);
    assert!(reply.header("idempotent-replayed").is_none());
    let h = s.upstream.last_headers();
    assert_eq!(
        h.get("host").unwrap(),
        s.upstream.addr.to_string().as_str(),
        "Host is the upstream's authority"
    );
    assert_eq!(
        h.get("x-forwarded-host").unwrap(),
        s.proxy.addr.to_string().as_str(),
        "X-Forwarded-Host is the Host the client sent"
    );
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
    for name in [
        "connection",
        "x-drop",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(h.get(name).is_none(), "{name} reached the upstream: {h:?}");
    }
    assert_eq!(h.get("x-kept").unwrap(), "yes", "end-to-end headers go on");
    let id = reply
        .header("x-request-id")
        .expect("a generated request id is echoed");
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(h.get("x-request-id").unwrap(), id, "the id the client got");

    // The client's own id is forwarded and echoed as it came.
    let reply = s
        .post("k-hdrs-2", "{}", &[("x-request-id", "req-protected-7")])
        .await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.header("x-request-id"), Some("req-protected-7"));
    assert_eq!(
        s.upstream.last_headers().get("x-request-id").unwrap(),
        "req-protected-7"
    );
    assert_eq!(s.upstream.hits(), 2);
}

both_stores!(
    replay_is_byte_identical,
    key_missing_and_invalid_are_400,
    keyless_requests_pass_when_not_required,
    methods_outside_the_list_pass_through,
    reused_key_with_other_request_is_422,
    a_retry_whose_query_escapes_differ_in_case_is_replayed,
    scopes_keep_callers_apart,
    forwarded_request_carries_key_budget_and_forwarding_headers,
    protected_request_gets_the_pass_through_forwarding_headers,
);
