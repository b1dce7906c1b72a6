//! A protected request's upstream exchange. It runs as its own task so that
//! neither a client-facing timeout nor a client disconnect cancels it: it
//! goes on until the response is recorded or the lease ends.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{self, Collected, ProxyBody};
use crate::config::{OnUnknown, Policy, Route};
use crate::headers::{IDEMPOTENT_REPLAYED, frame_whole, strip_hop_by_hop};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, SIZE_UNKNOWN, State, StoredResponse};
use crate::metrics::{Metrics, RouteMetrics};
use crate::problem::{Code, Problem};
use crate::proxy::{Ctx, send_error_problem, timeout_problem};
use crate::running::{Hold, Running};
use crate::store::{Attempt, Store, StoreError};
use crate::upstream::{
    Admission, Connected, SendError, Silence, Upstream, UpstreamBody, failed_status,
    within_response,
};

/// An attempt that owns its key (by `token`) until `lease_deadline`.
pub struct Exchange {
    pub store: Arc<Store>,
    pub upstream: Arc<Upstream>,
    pub policy: Arc<Policy>,
    pub key: Arc<StorageKey>,
    pub token: String,
    /// The request's fingerprint and the claim's time, for a completion
    /// that must write the record whole ([`Attempt`]).
    pub fingerprint: String,
    pub created_ms: u64,
    /// A `HEAD` request: its answer's Content-Length stays (no body is sent).
    pub head: bool,
    /// The request's trace id, for what is logged outside its span.
    pub trace: crate::headers::TraceId,
    pub lease_deadline: Instant,
    /// Finished (and its bulkhead permit freed) when the upstream's answer
    /// is known; a response timeout reports its failure earlier.
    pub admission: Option<Admission>,
    pub running: Arc<Running>,
    /// Its slot in `running` while it runs (made by `run`), handed to the
    /// background task that writes its record if the store failed it.
    pub hold: Mutex<Option<Hold>>,
    pub metrics: Arc<Metrics>,
    /// The route's series, for the latency of an exchange nobody waits for.
    pub route_metrics: Option<Arc<RouteMetrics>>,
    /// The background tasks (shutdown waits for them): this exchange, and
    /// transitions it tries again ([`settle_later`]).
    pub tasks: TaskTracker,
}

/// What the exchange hands back to the waiting client, if it is still there.
struct Reply {
    response: Response<ProxyBody>,
    /// The time waited for the upstream's answer (`None`: it was not reached).
    upstream_time: Option<Duration>,
    /// Still awaited: the exchange observes its latency when it comes.
    pending: bool,
    /// Whether the request went out (false: no connection could be made).
    went_out: bool,
}

impl Exchange {
    /// Starts the exchange in the background (now) and waits for its answer
    /// within the route's client-facing timeouts: `total` here, `response`
    /// in the exchange, which tells the breaker of a response timeout
    /// before it answers the client's 504.
    pub async fn start(
        self,
        request: Request<ProxyBody>,
        ctx: &mut Ctx,
        route: &Route,
    ) -> Response<ProxyBody> {
        let (tx, rx) = oneshot::channel();
        // Boxed: the exchange's future is a few KB, and spawning copies what
        // it is given several times over (into the task, into its cell).
        let tasks = self.tasks.clone();
        tasks.spawn(
            Box::pin(self.run(request, tx, route.timeouts.response))
                .instrument(tracing::Span::current()),
        );
        let total_deadline = ctx.arrived + route.timeouts.total;
        let began = Instant::now();
        match tokio::time::timeout_at(total_deadline.into(), rx).await {
            Ok(Ok(reply)) => {
                ctx.upstream_time = reply.upstream_time;
                ctx.upstream_pending = reply.pending;
                if !reply.went_out {
                    // Not forwarded after all: the upstream could not be reached.
                    ctx.outcome = "error";
                }
                reply.response
            }
            Ok(Err(_)) => Problem::new(
                Code::Internal,
                "the upstream exchange ended without an answer",
            )
            .into_response(),
            Err(_) => {
                ctx.upstream_time = Some(began.elapsed());
                ctx.upstream_pending = true;
                timeout_problem()
            }
        }
    }

    async fn run(
        mut self,
        request: Request<ProxyBody>,
        reply: oneshot::Sender<Reply>,
        response_timeout: Duration,
    ) {
        *self.held() = Some(self.running.hold(&self.key));
        let mut reply = Some(reply);
        let sent = Instant::now();
        let result = {
            let connected = Connected::protected();
            let send = self.upstream.send(request, &connected);
            tokio::pin!(send);
            let lease_deadline = self.lease_deadline.into();
            let start = sent.into();
            match within_response(
                send.as_mut(),
                &connected,
                start,
                response_timeout,
                lease_deadline,
                // It outlives its request: never the connection's timer.
                None,
            )
            .await
            {
                Some(result) => Ok(result),
                None if tokio::time::Instant::now() < lease_deadline => {
                    // The response timeout: a failure for the breaker now,
                    // while it can still act on it (and before the client
                    // hears of it), then the client's 504. The exchange goes
                    // on waiting, holding its bulkhead permit, and records
                    // what comes.
                    if let Some(admission) = self.admission.as_mut() {
                        admission.fail_now();
                    }
                    if let Some(reply) = reply.take() {
                        // The time waited, as a pass-through 504 logs it
                        // (regression, found by an audit: no `upstream_ms`).
                        let _ = reply.send(Reply {
                            response: timeout_problem(),
                            upstream_time: Some(sent.elapsed()),
                            pending: true,
                            went_out: true,
                        });
                    }
                    tokio::time::timeout_at(lease_deadline, send)
                        .await
                        .map_err(drop)
                }
                None => Err(()),
            }
        };
        let upstream_time = sent.elapsed();
        let went_out = !matches!(&result, Ok(Err(error)) if error.unsent());
        let (response, recorded) = match result {
            Ok(Ok(response)) => self.record(response, response_timeout).await,
            Ok(Err(error @ (SendError::Connect(_) | SendError::Local(_)))) => {
                // Not the upstream's failure when the proxy was out of descriptors.
                match error {
                    SendError::Local(_) => {
                        if let Some(admission) = self.admission.take() {
                            admission.cancel();
                        }
                    }
                    _ => self.finish_admission(false),
                }
                // The upstream never saw the request: a retry may try again.
                self.release().await;
                (
                    send_error_problem(error, &self.upstream.config.name),
                    Recorded::No,
                )
            }
            // (A protected request's body is in memory: it cannot break off.)
            Ok(Err(error @ (SendError::Broken(_) | SendError::ClientBody { .. }))) => {
                self.finish_admission(false);
                self.settle_unknown("the upstream connection broke after the request was sent")
                    .await;
                (
                    send_error_problem(error, &self.upstream.config.name),
                    Recorded::No,
                )
            }
            Err(_) => {
                self.finish_admission(false);
                self.settle_unknown("no response before the lease ended")
                    .await;
                (lease_end_problem(self.policy.on_unknown), Recorded::No)
            }
        };
        // Ended: unless its record went to the background, which holds it on.
        drop(self.held().take());
        // The client may be gone (timeout, disconnect); the record is what counts.
        let delivered = reply.is_some_and(|reply| {
            reply
                .send(Reply {
                    response,
                    upstream_time: went_out.then_some(upstream_time),
                    pending: false,
                    went_out,
                })
                .is_ok()
        });
        if !delivered {
            // The client's answer went without it (504, disconnect): the
            // slow tail still counts in the upstream's latency.
            if let Some(route) = &self.route_metrics {
                route.observe_upstream(upstream_time);
            }
            if recorded.late() {
                Metrics::route_counter(&self.metrics.late_completions, &self.key.route);
            }
        }
    }

    /// Tells the breaker how the upstream did (once: a response timeout
    /// already told it) and frees the bulkhead permit.
    fn finish_admission(&mut self, success: bool) {
        if let Some(admission) = self.admission.take() {
            admission.finish(success);
        }
    }

    /// As [`Self::finish_admission`] for a body streamed to the client:
    /// judged by its head, and a failure if it breaks off later; its
    /// bulkhead slot is held until it ends.
    fn finish_streamed(&mut self, body: &mut UpstreamBody, success: bool) {
        if let Some(admission) = self.admission.take() {
            body.streamed(admission.finish_streamed(success));
        }
    }

    /// Stores the response (when its status is stored) before it is sent;
    /// says whether it was recorded. The breaker hears of a stored status
    /// once its body is whole: a connection that breaks in the body is a
    /// failure. A body streamed to the client is judged by its head, and
    /// by its break if it breaks off.
    /// A body streamed to the client may be quiet for `response` at most
    /// ([`Silence`]).
    async fn record(
        &mut self,
        response: Response<UpstreamBody>,
        quiet: Duration,
    ) -> (Response<ProxyBody>, Recorded) {
        let (mut parts, mut incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // A replay says the status's standard reason phrase: so does the first answer.
        crate::headers::standard_reason(parts.status, &mut parts.extensions);
        // idemgate's to say, on replays only (SPEC 9, stored headers).
        parts.headers.remove(&IDEMPOTENT_REPLAYED);
        let status = parts.status.as_u16();
        if !self.policy.stores(status) {
            self.finish_streamed(&mut incoming, !failed_status(status));
            self.release().await;
            let body = body::boxed(Silence::new(incoming, quiet, self.trace));
            return (Response::from_parts(parts, body), Recorded::No);
        }
        // A body declared larger than can be stored is not read first: its
        // head goes to the client at once, and its outcome is the same
        // wherever it breaks off (regression, an audit: broken before the
        // limit it was `unknown`, after it `response_not_stored`).
        let declared = hyper::body::Body::size_hint(&incoming).lower();
        let mut collected = if declared > self.policy.max_response_body {
            Ok(Collected::Over {
                prefix: bytes::Bytes::new(),
                rest: incoming,
            })
        } else {
            tokio::time::timeout_at(
                self.lease_deadline.into(),
                body::collect_up_to(incoming, self.policy.max_response_body),
            )
            .await
        };
        match &mut collected {
            Ok(Collected::Whole(_)) => self.finish_admission(!failed_status(status)),
            Ok(Collected::Over { rest, .. }) => self.finish_streamed(rest, !failed_status(status)),
            Ok(Collected::Broken) | Err(_) => self.finish_admission(false),
        }
        match collected {
            Ok(Collected::Whole(bytes)) => {
                let size = bytes.len() as u64;
                let (recorded, headers) = self
                    .complete(status, parts.headers, Some(bytes.clone()), size)
                    .await;
                parts.headers = headers;
                frame_whole(&mut parts.headers, bytes.len(), self.head);
                (Response::from_parts(parts, body::full(bytes)), recorded)
            }
            Ok(Collected::Over { prefix, rest }) => {
                let size = content_length(&parts.headers).unwrap_or(SIZE_UNKNOWN);
                let (recorded, headers) = self.complete(status, parts.headers, None, size).await;
                parts.headers = headers;
                (
                    Response::from_parts(
                        parts,
                        body::prefixed(prefix, Silence::new(rest, quiet, self.trace)),
                    ),
                    recorded,
                )
            }
            Ok(Collected::Broken) => {
                self.settle_unknown("the upstream response body broke off")
                    .await;
                let problem = send_error_problem(
                    SendError::Broken("response body incomplete".into()),
                    &self.upstream.config.name,
                );
                (problem, Recorded::No)
            }
            Err(_) => {
                self.settle_unknown("the response body was not whole before the lease ended")
                    .await;
                (lease_end_problem(self.policy.on_unknown), Recorded::No)
            }
        }
    }

    /// Records the response; gives its headers back for the client's answer.
    async fn complete(
        &self,
        status: u16,
        headers: http::HeaderMap,
        body: Option<Bytes>,
        body_size: u64,
    ) -> (Recorded, http::HeaderMap) {
        let stored = StoredResponse {
            status,
            headers,
            body,
            body_size,
        };
        let recorded = match self
            .store
            .complete(&self.key, &self.attempt(), &stored, self.policy.ttl)
            .await
        {
            Ok(true) => Recorded::Now,
            Ok(false) => {
                Metrics::route_counter(&self.metrics.superseded, &self.key.route);
                tracing::warn!(
                    key = %self.key.key,
                    route = %self.key.route,
                    "the attempt no longer owned its key (its lease ended, or its record was lost, by a flush, an eviction or a purge, and the key claimed again: the request may then have run twice); response delivered but not recorded"
                );
                Recorded::No
            }
            Err(error) => {
                tracing::error!(
                    key = %self.key.key,
                    route = %self.key.route,
                    error = %error,
                    "could not record the response; trying again in the background (the record turns unknown when its lease ends if the store does not take it)"
                );
                let late = Arc::new(Late::default());
                let settle = Settle::Complete {
                    response: Arc::new(stored.clone()),
                    ttl: self.policy.ttl,
                    claimed: self.claimed(),
                    late: late.clone(),
                };
                self.settle_in_background(settle);
                Recorded::Later(late)
            }
        };
        (recorded, stored.headers)
    }

    /// [`settle_later`] for this attempt. Its waiting duplicates here are
    /// told its outcome meanwhile (regression, an audit: Redis died under
    /// an attempt and came back empty; the completion failed, the waiters
    /// asked the store, found no record, and one ran the request again).
    fn settle_in_background(&self, settle: Settle) {
        let hold = self.held().take();
        if let (Some(hold), Some(record)) = (&hold, settle.record(&self.token)) {
            hold.end(record);
            self.store.wake(&self.key);
        }
        let (store, key) = (self.store.clone(), self.key.clone());
        let token = self.token.clone();
        settle_later(&self.tasks, store, &self.metrics, key, token, settle, hold);
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Hold>> {
        self.hold.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attempt(&self) -> Attempt<'_> {
        Attempt {
            token: &self.token,
            fingerprint: &self.fingerprint,
            lease: self.policy.lease,
            created_ms: self.created_ms,
        }
    }

    /// What this attempt's claim wrote, for a transition made later.
    fn claimed(&self) -> Claimed {
        Claimed {
            fingerprint: self.fingerprint.clone(),
            lease: self.policy.lease,
            created_ms: self.created_ms,
        }
    }

    async fn release(&self) {
        self.settle(Settle::Release).await;
    }

    /// Nobody knows whether the upstream acted: lock the key as `unknown`,
    /// or release it, per `on_unknown`.
    async fn settle_unknown(&self, why: &str) {
        tracing::warn!(key = %self.key.key, route = %self.key.route, reason = why, "outcome unknown");
        let settle = match self.policy.on_unknown {
            OnUnknown::Lock => Settle::Unknown {
                ttl: self.policy.ttl,
                claimed: self.claimed(),
            },
            OnUnknown::Release => Settle::Release,
        };
        self.settle(settle).await;
    }

    /// Makes a fenced transition of this attempt's record now, or, when the
    /// store fails, in the background ([`settle_later`]); whether it was
    /// made now.
    async fn settle(&self, settle: Settle) -> bool {
        match settle.apply(&self.store, &self.key, &self.token).await {
            Ok(done) => {
                settle.count(done, &self.metrics, &self.key);
                done
            }
            Err(error) => {
                tracing::warn!(key = %self.key.key, route = %self.key.route, error = %error, ?settle, "could not settle the attempt's record; trying again in the background");
                self.settle_in_background(settle);
                false
            }
        }
    }
}

/// A fenced transition that ends an attempt.
#[derive(Clone)]
pub enum Settle {
    Release,
    /// `unknown`, for the ttl.
    Unknown {
        ttl: Duration,
        claimed: Claimed,
    },
    /// Completed with the response, kept for the ttl (tried again in the
    /// background when the store failed the first time).
    Complete {
        response: Arc<StoredResponse>,
        ttl: Duration,
        claimed: Claimed,
        /// Whether its client went without it, for the late count.
        late: Arc<Late>,
    },
}

/// Whether an exchange's response was recorded when it was delivered.
enum Recorded {
    Now,
    No,
    /// The store failed it: tried again in the background.
    Later(Arc<Late>),
}

impl Recorded {
    /// Called when the client went without the response (timeout,
    /// disconnect): whether to count a late completion now. One recorded
    /// in the background counts when both are known, whichever comes
    /// second (regression, the focused check of the background writes: a
    /// late answer recorded in the background was never counted).
    fn late(&self) -> bool {
        match self {
            Recorded::Now => true,
            Recorded::No => false,
            Recorded::Later(late) => late.mark(Late::UNDELIVERED),
        }
    }
}

/// A completion made in the background, and a client that went without
/// it: a late completion once both are so.
#[derive(Default)]
pub struct Late(AtomicU8);

impl Late {
    const RECORDED: u8 = 1;
    const UNDELIVERED: u8 = 2;

    /// Marks one of the two; true for whichever makes both.
    fn mark(&self, bit: u8) -> bool {
        let both = Self::RECORDED | Self::UNDELIVERED;
        let before = self.0.fetch_or(bit, Ordering::AcqRel);
        before != both && before | bit == both
    }
}

impl Settle {
    /// The record this transition writes, as a claim reads it back; none
    /// for a release.
    fn record(&self, token: &str) -> Option<Record> {
        let (state, claimed, response) = match self {
            Settle::Release => return None,
            Settle::Unknown { claimed, .. } => (State::Unknown, claimed, None),
            Settle::Complete {
                response, claimed, ..
            } => (State::Completed, claimed, Some((**response).clone())),
        };
        Some(Record {
            state,
            fingerprint: claimed.fingerprint.clone(),
            token: token.to_owned(),
            lease_end_ms: 0,
            created_ms: claimed.created_ms,
            expires_ms: 0,
            response,
        })
    }
}

/// What an attempt's claim wrote besides its token: a record whose key is
/// gone when the attempt ends is written whole from it ([`Attempt`]).
#[derive(Clone)]
pub struct Claimed {
    fingerprint: String,
    lease: Duration,
    created_ms: u64,
}

impl Claimed {
    fn attempt<'a>(&'a self, token: &'a str) -> Attempt<'a> {
        Attempt {
            token,
            fingerprint: &self.fingerprint,
            lease: self.lease,
            created_ms: self.created_ms,
        }
    }
}

/// For logs: never the response's headers or body.
impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Settle::Release => f.write_str("Release"),
            Settle::Unknown { ttl, .. } => write!(f, "Unknown({ttl:?})"),
            Settle::Complete { response, ttl, .. } => {
                write!(f, "Complete({}, {ttl:?})", response.status)
            }
        }
    }
}

impl Settle {
    async fn apply(
        &self,
        store: &Store,
        key: &StorageKey,
        token: &str,
    ) -> Result<bool, StoreError> {
        match self {
            Settle::Release => store.release(key, token).await,
            Settle::Unknown { ttl, claimed } => {
                store.mark_unknown(key, &claimed.attempt(token), *ttl).await
            }
            Settle::Complete {
                response,
                ttl,
                claimed,
                ..
            } => {
                store
                    .complete(key, &claimed.attempt(token), response, *ttl)
                    .await
            }
        }
    }

    /// Counts an unknown outcome this transition made (`done`), or a
    /// completion the store refused (the key had a new owner), whether now
    /// or in the background.
    fn count(&self, done: bool, metrics: &Metrics, key: &StorageKey) {
        match (self, done) {
            (Settle::Unknown { .. }, true) => {
                Metrics::route_counter(&metrics.unknown_outcomes, &key.route);
            }
            (Settle::Complete { late, .. }, true) if late.mark(Late::RECORDED) => {
                Metrics::route_counter(&metrics.late_completions, &key.route);
            }
            (Settle::Complete { .. }, false) => {
                Metrics::route_counter(&metrics.superseded, &key.route);
                tracing::warn!(key = %key.key, route = %key.route, "the attempt no longer owned its key when its response was recorded in the background (the request may have run twice); not recorded");
            }
            _ => {}
        }
    }
}

/// How often, 500 ms apart (the first 500 ms after the failed try), a
/// transition is tried in the background.
const SETTLE_ATTEMPTS: usize = 20;

/// Makes a fenced transition in the background, tried again on store errors
/// (a lost reply, a reconnect) 20 times, 500 ms apart and each within
/// `op_timeout` (10 to 15 s in all): left undone, the attempt's
/// record would stay in flight, refusing every retry until its lease ends,
/// then turn unknown. For a claim the gate must undo, and for an exchange
/// whose completion, release or `unknown` the store did not take. Transitions are fenced
/// by the token and idempotent, so one that did land is harmless to repeat.
pub fn settle_later(
    tasks: &TaskTracker,
    store: Arc<Store>,
    metrics: &Arc<Metrics>,
    key: Arc<StorageKey>,
    token: String,
    settle: Settle,
    hold: Option<Hold>,
) {
    let metrics = metrics.clone();
    tasks.spawn(async move {
        // The attempt's slot, freed when this ends, however it ends.
        let _hold = hold;
        for _ in 0..SETTLE_ATTEMPTS {
            // The caller's own try has just failed.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(done) = settle.apply(&store, &key, &token).await {
                settle.count(done, &metrics, &key);
                // The caller's failure was logged as an error: say that it
                // came right (regression, an audit: nothing did, and a key
                // that was fine looked lost). Not when the key had another
                // owner by then (`count` says so; regression, the
                // verification audit: both lines were logged).
                if done {
                    tracing::info!(key = %key.key, route = %key.route, ?settle, "settled in the background after all");
                }
                return;
            }
        }
        // An undone claim may never have landed (or found another's record,
        // which the token fences off): nothing of its own is left then
        // (regression, an audit: a replay's failed claim was said to leave
        // a record that "turns unknown").
        let fate = match settle {
            Settle::Release => "could not undo a claim that may have landed; if it did, the key turns unknown or is freed when its lease ends",
            // An outcome the store never took: a retry finds the attempt
            // in flight (then unknown), or, if the store lost it, no record
            // and runs again; counted as the attempt whose record a new
            // owner took is (regression, the verification audit: a second
            // run left no trace but this line).
            _ => {
                Metrics::route_counter(&metrics.superseded, &key.route);
                "could not record the attempt's outcome: a retry finds it in flight and then unknown when its lease ends, or, if the store lost its record, runs the request again"
            }
        };
        tracing::warn!(key = %key.key, route = %key.route, ?settle, "{fate}");
    });
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's `504` when the key's lease ends before a whole response
/// (its head, or a stored status's body) came: not "retry for the real
/// outcome", as other timeouts say, for there will be none.
#[cold]
fn lease_end_problem(on_unknown: OnUnknown) -> Response<ProxyBody> {
    let detail = match on_unknown {
        OnUnknown::Lock => {
            "the upstream did not answer before the key's lease ended: the outcome is unknown, and a retry gets 409 outcome_unknown until an operator resolves it"
        }
        OnUnknown::Release => {
            "the upstream did not answer before the key's lease ended: the outcome is unknown, and the key was released, so a retry makes a new attempt"
        }
    };
    Problem::new(Code::UpstreamTimeout, detail)
        .retry_after(Duration::from_secs(1))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::Late;

    #[test]
    fn a_late_completion_is_counted_once_whichever_is_known_second() {
        for [first, second] in [
            [Late::RECORDED, Late::UNDELIVERED],
            [Late::UNDELIVERED, Late::RECORDED],
        ] {
            let late = Late::default();
            assert!(!late.mark(first));
            assert!(late.mark(second));
        }
        let recorded_only = Late::default();
        assert!(!recorded_only.mark(Late::RECORDED));
    }
}
