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

both_stores!(
    hop_by_hop_headers_are_neither_stored_nor_replayed,
    the_upstreams_own_idempotent_replayed_is_dropped,
);
