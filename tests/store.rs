//! The store transitions against both real backends: claims, fencing by
//! owner token, and the same answers from memory and Redis.

mod common;

use std::time::Duration;

use common::Backend;
use idemgate::config::{Config, OnUnknown};
use idemgate::idempotency::decision::Decision;
use idemgate::idempotency::key::StorageKey;
use idemgate::idempotency::record::{State, StoredResponse};
use idemgate::store::{ClaimRequest, Store};

fn open(backend: &Backend) -> Store {
    let yaml = format!(
        "{}\nupstreams: {{ up: {{ url: \"http://127.0.0.1:1\" }} }}\nroutes: [ {{ name: r, match: {{ path_prefix: / }}, upstream: up }} ]\n",
        backend.store_yaml()
    );
    let config = Config::parse(&yaml).expect("valid");
    Store::open(&config.store, Default::default()).expect("store opens")
}

fn key(name: &str) -> StorageKey {
    StorageKey {
        route: "r".into(),
        scope: "s".into(),
        key: name.into(),
    }
}

fn claim<'a>(
    key: &'a StorageKey,
    token: &'a str,
    lease_ms: u64,
    on_unknown: OnUnknown,
) -> ClaimRequest<'a> {
    ClaimRequest {
        key,
        fingerprint: "fp",
        token,
        lease: Duration::from_millis(lease_ms),
        ttl: Duration::from_secs(60),
        on_unknown,
    }
}

fn response(status: u16) -> StoredResponse {
    StoredResponse {
        status,
        headers: Default::default(),
        body: Some(format!("{status}").into()),
        body_size: 3,
    }
}

async fn taken_over_attempt_never_overwrites_the_new_owner(backend: Backend) {
    let store = open(&backend);
    let k = key("takeover");
    assert_eq!(
        store
            .claim(&claim(&k, "A", 100, OnUnknown::Release))
            .await
            .unwrap()
            .decision,
        Decision::Claim
    );
    tokio::time::sleep(Duration::from_millis(150)).await; // the lease under test
    assert_eq!(
        store
            .claim(&claim(&k, "B", 10_000, OnUnknown::Release))
            .await
            .unwrap()
            .decision,
        Decision::Claim
    );
    let ttl = Duration::from_secs(60);
    assert!(
        !store.complete(&k, "A", &response(201), ttl).await.unwrap(),
        "A lost the key"
    );
    assert!(!store.release(&k, "A").await.unwrap());
    assert!(!store.mark_unknown(&k, "A").await.unwrap());
    assert!(store.complete(&k, "B", &response(202), ttl).await.unwrap());
    let record = store.get(&k).await.unwrap().expect("record");
    assert_eq!(record.state, State::Completed);
    assert_eq!(record.token, "B");
    assert_eq!(record.response.unwrap().status, 202);
}

async fn lease_end_under_lock_turns_unknown_once(backend: Backend) {
    let store = open(&backend);
    let k = key("lock");
    store
        .claim(&claim(&k, "A", 50, OnUnknown::Lock))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // the lease under test
    let reply = store
        .claim(&claim(&k, "B", 1000, OnUnknown::Lock))
        .await
        .unwrap();
    assert_eq!(reply.decision, Decision::BecomeUnknown);
    assert_eq!(store.get(&k).await.unwrap().unwrap().state, State::Unknown);
    let again = store
        .claim(&claim(&k, "C", 1000, OnUnknown::Lock))
        .await
        .unwrap();
    assert_eq!(again.decision, Decision::Unknown);
    assert!(
        !store
            .complete(&k, "A", &response(201), Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(store.purge(&k).await.unwrap(), "an operator's purge");
    assert_eq!(
        store
            .claim(&claim(&k, "D", 1000, OnUnknown::Lock))
            .await
            .unwrap()
            .decision,
        Decision::Claim
    );
}

async fn mismatch_and_in_progress(backend: Backend) {
    let store = open(&backend);
    let k = key("mm");
    store
        .claim(&claim(&k, "A", 10_000, OnUnknown::Lock))
        .await
        .unwrap();
    let mut other = claim(&k, "B", 10_000, OnUnknown::Lock);
    other.fingerprint = "other";
    assert_eq!(
        store.claim(&other).await.unwrap().decision,
        Decision::Mismatch
    );
    match store
        .claim(&claim(&k, "C", 10_000, OnUnknown::Lock))
        .await
        .unwrap()
        .decision
    {
        Decision::InProgress { lease_left_ms } => {
            assert!(lease_left_ms > 0 && lease_left_ms <= 10_000)
        }
        d => panic!("{d:?}"),
    }
    let mut big = response(201);
    big.body = None;
    big.body_size = 5_000_000;
    assert!(
        store
            .complete(&k, "A", &big, Duration::from_secs(60))
            .await
            .unwrap()
    );
    let d = store
        .claim(&claim(&k, "D", 10_000, OnUnknown::Lock))
        .await
        .unwrap()
        .decision;
    assert_eq!(d, Decision::NotStored { status: 201 });
    let records = store.records(Some("r")).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0, k);
    assert_eq!(records[0].1.response.as_ref().unwrap().body_size, 5_000_000);
}

both_stores!(
    taken_over_attempt_never_overwrites_the_new_owner,
    lease_end_under_lock_turns_unknown_once,
    mismatch_and_in_progress,
);
