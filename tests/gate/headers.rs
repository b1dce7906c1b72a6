//! What a protected response carries: hop-by-hop headers never stored or
//! replayed, and `Idempotent-Replayed` only on replays.

use crate::common::Backend;
use crate::{Setup, both_stores};

const HOP: [&str; 3] = ["connection", "x-hop", "keep-alive"];

/// The upstream's `Connection` (naming `x-hop`), `X-Hop` and `Keep-Alive`
/// reach neither the first answer nor the stored one that is replayed.
async fn hop_by_hop_headers_are_neither_stored_nor_replayed(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let first = s.post("k-hop", "{}", &[("x-test-hop", "1")]).await;
    assert_eq!(first.status, 201);
    let replay = s.post("k-hop", "{}", &[]).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    for (which, reply) in [("first", &first), ("replay", &replay)] {
        for name in HOP {
            assert!(
                reply.header(name).is_none(),
                "{which} answer carries {name}: {reply:?}"
            );
        }
        assert_eq!(reply.header("x-upstream-hit"), Some("1"), "end-to-end kept");
    }
    assert_eq!(s.upstream.hits(), 1);
}

/// "The first response carries no such header": not even the upstream's own
/// `Idempotent-Replayed`, which is neither passed on nor stored; a replay
/// carries idemgate's, once. Regression: the upstream's went out on the
/// first answer.
async fn the_upstreams_own_idempotent_replayed_is_dropped(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let first = s
        .post("k-says", "{}", &[("x-test-says-replayed", "1")])
        .await;
    assert_eq!(first.status, 201);
    assert!(first.header("idempotent-replayed").is_none(), "{first:?}");
    let replay = s.post("k-says", "{}", &[]).await;
    let values: Vec<_> = replay
        .headers
        .get_all("idempotent-replayed")
        .iter()
        .collect();
    assert_eq!(values, ["true"], "{replay:?}");
    assert_eq!(s.upstream.hits(), 1);
}

/// Regression: a protected HEAD lost the upstream's Content-Length, on the
/// first answer and on replays (it was taken for a wrong length of the
/// empty body sent from memory); it tells the length a GET would get.
async fn a_protected_head_keeps_its_content_length(backend: Backend) {
    let s = Setup::new(backend, "methods: [HEAD, POST]", "").await;
    let url = s.url();
    let head = || {
        s.client
            .send("HEAD", &url, &[("idempotency-key", "k-head")], "")
    };
    let first = head().await;
    let replay = head().await;
    assert_eq!(
        replay.header("idempotent-replayed"),
        Some("true"),
        "{replay:?}"
    );
    for answer in [&first, &replay] {
        let length: usize = answer
            .header("content-length")
            .unwrap_or_else(|| panic!("no content-length: {answer:?}"))
            .parse()
            .unwrap();
        assert!(length > 0, "{answer:?}");
        assert!(answer.body.is_empty());
    }
    assert_eq!(
        first.header("content-length"),
        replay.header("content-length")
    );
    assert_eq!(s.upstream.hits(), 1);
}

/// Regression: a status with no standard reason phrase (299) went out as
/// `HTTP/1.1 299 <none>`, hyper's placeholder, first answer and replay.
async fn a_status_without_a_standard_reason_says_none(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::new(backend, "", "").await;
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
        let request = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-299\r\nx-test-status: 299\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 299 \r\n"), "{answer}");
    }
    assert_eq!(s.upstream.hits(), 1, "the second was a replay");
}

/// Regression (audit): a client that named the key header in `Connection`
/// had it removed before forwarding (hop-by-hop), after the gate had used
/// it; SPEC 9 says the key goes upstream unchanged.
async fn the_key_goes_upstream_even_when_named_in_connection(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let first = s
        .post("k-conn", "{}", &[("connection", "idempotency-key")])
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let forwarded = s.upstream.last_headers();
    assert_eq!(
        forwarded.get("idempotency-key").map(|v| v.as_bytes()),
        Some(&b"k-conn"[..]),
        "{forwarded:?}"
    );
}

both_stores!(
    the_key_goes_upstream_even_when_named_in_connection,
    a_status_without_a_standard_reason_says_none,
    hop_by_hop_headers_are_neither_stored_nor_replayed,
    the_upstreams_own_idempotent_replayed_is_dropped,
    a_protected_head_keeps_its_content_length,
);
