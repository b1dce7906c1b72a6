//! What a protected response carries: hop-by-hop headers never stored or replayed.

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

both_stores!(hop_by_hop_headers_are_neither_stored_nor_replayed);
