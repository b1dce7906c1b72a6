//! The decision table of SPEC.md 4.3 as a pure function of (record, fingerprint, time).
//!
//! Both stores apply it atomically: the memory store calls [`decide`] under
//! its shard lock; the Redis claim script mirrors the two rows that write
//! (claim, and lease end under `lock`) and the proxy calls [`decide`] on the
//! record the script returns.

use super::record::{Record, State};
use crate::config::OnUnknown;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No record, or a lease-ended attempt under `on_unknown: release`: this request owns the key.
    Claim,
    /// Completed with a stored body: replay it.
    Replay,
    /// Completed, but the body was too large to keep.
    NotStored { status: u16 },
    /// Another attempt holds the lease.
    InProgress { lease_left_ms: u64 },
    /// The lease ended under `on_unknown: lock`: the record turns `unknown` now.
    BecomeUnknown,
    /// Already `unknown`.
    Unknown,
    /// Same key, different request.
    Mismatch,
}

impl Decision {
    /// Whether the store must write the claim (owner token, new lease).
    pub fn claims(self) -> bool {
        self == Decision::Claim
    }
}

/// `token` is the claiming attempt's own: an in-flight record that already
/// holds it is this attempt's claim, run twice (a Redis Cluster client sends
/// a command again when the connection drops before its reply), and stays
/// its claim.
pub fn decide(
    record: Option<&Record>,
    fingerprint: &str,
    token: &str,
    now_ms: u64,
    on_unknown: OnUnknown,
) -> Decision {
    let Some(record) = record else {
        return Decision::Claim;
    };
    if record.fingerprint != fingerprint {
        return Decision::Mismatch;
    }
    match record.state {
        State::Completed => match &record.response {
            Some(response) if response.body.is_none() => Decision::NotStored {
                status: response.status,
            },
            _ => Decision::Replay,
        },
        State::InFlight if record.token == token => Decision::Claim,
        State::InFlight if now_ms < record.lease_end_ms => Decision::InProgress {
            lease_left_ms: record.lease_end_ms - now_ms,
        },
        State::InFlight => match on_unknown {
            OnUnknown::Lock => Decision::BecomeUnknown,
            OnUnknown::Release => Decision::Claim,
        },
        State::Unknown => Decision::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::StoredResponse;
    use Decision::*;
    use OnUnknown::*;

    fn record(state: State, stored: Option<bool>) -> Record {
        Record {
            state,
            fingerprint: "fp".into(),
            token: "t".into(),
            lease_end_ms: 1_000,
            created_ms: 0,
            expires_ms: 10_000,
            response: stored.map(|stored| StoredResponse {
                status: 201,
                headers: Default::default(),
                body: stored.then(|| "{}".into()),
                body_size: 2,
            }),
        }
    }

    #[test]
    fn decision_table() {
        let in_flight = record(State::InFlight, None);
        let completed = record(State::Completed, Some(true));
        let tombstone = record(State::Completed, Some(false));
        let unknown = record(State::Unknown, None);
        // (record, fingerprint, now, on_unknown, decision); the claim's token is "mine"
        let mine = Record {
            token: "mine".into(),
            ..in_flight.clone()
        };
        let rows: &[(Option<&Record>, &str, u64, OnUnknown, Decision)] = &[
            (Some(&mine), "fp", 400, Lock, Claim),
            (Some(&mine), "fp", 1_500, Lock, Claim),
            (Some(&mine), "other", 400, Lock, Mismatch),
            (None, "fp", 0, Lock, Claim),
            (None, "fp", 0, Release, Claim),
            (Some(&completed), "fp", 5_000, Lock, Replay),
            (Some(&completed), "other", 5_000, Lock, Mismatch),
            (
                Some(&tombstone),
                "fp",
                5_000,
                Lock,
                NotStored { status: 201 },
            ),
            (Some(&tombstone), "other", 5_000, Lock, Mismatch),
            (
                Some(&in_flight),
                "fp",
                400,
                Lock,
                InProgress { lease_left_ms: 600 },
            ),
            (
                Some(&in_flight),
                "fp",
                400,
                Release,
                InProgress { lease_left_ms: 600 },
            ),
            (Some(&in_flight), "other", 400, Lock, Mismatch),
            (Some(&in_flight), "fp", 1_000, Lock, BecomeUnknown),
            (Some(&in_flight), "fp", 1_500, Release, Claim),
            (Some(&in_flight), "other", 1_500, Release, Mismatch),
            (Some(&unknown), "fp", 5_000, Lock, Unknown),
            (Some(&unknown), "fp", 5_000, Release, Unknown),
            (Some(&unknown), "other", 5_000, Lock, Mismatch),
        ];
        for (i, (rec, fp, now, mode, want)) in rows.iter().enumerate() {
            assert_eq!(decide(*rec, fp, "mine", *now, *mode), *want, "row {i}");
        }
    }
}
