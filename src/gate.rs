//! The protected path: key, fingerprint, claim, then replay, reject or forward.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};

use crate::body::{self, BODY_STALL, ProxyBody, ReadError};
use crate::config::{Concurrent, OnUnavailable, OnUnknown, Policy, Route};
use crate::exchange::{Exchange, Settle};
use crate::headers::IDEMPOTENT_REPLAYED;
use crate::idempotency::decision::{Decision, decide};
use crate::idempotency::fingerprint::fingerprint;
use crate::idempotency::key::{KeyError, StorageKey, read_key, scope_hash};
use crate::idempotency::record::{Record, StoredResponse};
use crate::metrics::Metrics;
use crate::problem::{Code, Problem};
use crate::proxy::{Ctx, Proxy};
use crate::running::Held;
use crate::store::{ClaimReply, ClaimRequest, StoreError};
use crate::upstream::Upstream;

/// The longest pause between two claim attempts of a waiting duplicate.
const MAX_WAIT_STEP: Duration = Duration::from_millis(100);

impl Proxy {
    pub async fn protect(
        &self,
        route: Arc<Route>,
        policy: Arc<Policy>,
        upstream: Arc<Upstream>,
        request: Request<ProxyBody>,
        ctx: &mut Ctx,
    ) -> Response<ProxyBody> {
        let key = match read_key(request.headers(), &policy.header, policy.key_max_length) {
            Ok(key) => key,
            Err(KeyError::Missing) if !policy.require_key => {
                return self.pass_through(&upstream, request, ctx).await;
            }
            Err(KeyError::Missing) => {
                ctx.outcome = "rejected";
                let detail = format!("send a unique {} header with this request", policy.header);
                return Problem::new(Code::IdempotencyKeyMissing, detail).into_response();
            }
            Err(KeyError::Invalid(why)) => {
                ctx.outcome = "rejected";
                return Problem::new(Code::IdempotencyKeyInvalid, why).into_response();
            }
        };
        ctx.key = Some(key.clone());
        let (parts, body) = request.into_parts();
        // The body within the route's `total` too (SPEC 4.4: from the
        // request's arrival), not only within 10 s between its pieces.
        let total = (ctx.arrived + route.timeouts.total).into();
        let read = body::read_limited(body, policy.max_request_body, BODY_STALL);
        let read = tokio::time::timeout_at(total, read);
        // Nothing is claimed yet: a shutdown answers at once rather than
        // wait out a slow body (regression: it held the drain, up to the
        // body's 10 s stall or the grace's end).
        let read = tokio::select! {
            biased;
            read = read => read,
            () = self.draining.cancelled() => {
                ctx.outcome = "rejected";
                return Problem::new(
                    Code::ShuttingDown,
                    "this instance began shutting down while the request body arrived; nothing was claimed or forwarded: retry",
                )
                .retry_after(Duration::from_secs(1))
                .into_response();
            }
        };
        let body = match read {
            Ok(Ok(body)) => body,
            Ok(Err(error)) => {
                ctx.outcome = "rejected";
                ctx.client_gone = matches!(error, ReadError::Broken);
                return read_error_problem(error, policy.max_request_body);
            }
            Err(_) => {
                ctx.outcome = "rejected";
                return budget_spent().into_response();
            }
        };
        let fp = fingerprint(
            &parts.method,
            &parts.uri,
            policy.fingerprint_query,
            &parts.headers,
            &policy.fingerprint_headers,
            &body,
        );
        let storage_key = Arc::new(StorageKey {
            route: route.name.to_string(),
            scope: scope_hash(&parts.headers, &policy.scope_headers),
            key,
        });
        let token = crate::headers::random_id();
        let created_ms = crate::store::memory::now_ms();
        let claim = ClaimRequest {
            key: &storage_key,
            fingerprint: &fp,
            token: &token,
            lease: policy.lease,
            ttl: policy.ttl,
            created_ms,
            on_unknown: policy.on_unknown,
            waits: policy.concurrent == Concurrent::Wait,
        };
        let deadline = ctx.arrived + route.timeouts.total;
        // Armed before the claim: if the client goes away while the claim
        // (or the release of a turned-away claim) is awaited, hyper drops
        // this future, and the guard undoes whatever claim the store made.
        let mut undo = ClaimGuard::arm(self, &storage_key, &token);
        let (reply, claimed_at, uncertain) = match self
            .claim_or_wait(&claim, policy.concurrent, deadline, ctx)
            .await
        {
            Ok(reply) => reply,
            Err(StoreError::Damaged(why)) => {
                // The store is up; the key's record is unreadable: never
                // forward around it (nothing of ours was claimed).
                undo.disarm();
                ctx.outcome = "error";
                tracing::error!(key = %storage_key.key, route = %storage_key.route, why, "damaged record in the store");
                return damaged_record();
            }
            Err(error) => {
                // A claim never sent has nothing to undo; one that failed
                // on the way may have landed.
                if error.never_sent() {
                    undo.disarm();
                } else {
                    undo.release_now();
                }
                let request = Request::from_parts(parts, body::full(body));
                return self.store_failed(error, &upstream, request, ctx).await;
            }
        };
        if reply.decision != Decision::Claim {
            if uncertain {
                // A claim of ours failed while waiting: it may have landed.
                undo.release_now();
            } else {
                // Nothing of ours is in the store.
                undo.disarm();
            }
        }
        let record = reply.record;
        match reply.decision {
            Decision::Claim => {
                // The budget and the guards stand between the claim and the
                // forward: a request turned away releases its key at once.
                let now = Instant::now();
                let admission = match budget_left(now, deadline)
                    .and_then(|()| upstream.admit(route.timeouts.response))
                {
                    Ok(admission) => admission,
                    Err(problem) => {
                        ctx.outcome = "rejected";
                        match self.store.release(&storage_key, &token).await {
                            Ok(_) => undo.disarm(),
                            // The guard goes on trying in the background.
                            Err(error) => {
                                tracing::error!(error = %error, "could not release a turned-away key");
                            }
                        }
                        return problem.into_response();
                    }
                };
                // From here the exchange task owns the key (and completes,
                // releases or settles it): `start` spawns it on its first
                // poll, which comes without a yield in between.
                undo.disarm();
                drop(undo);
                ctx.outcome = "forwarded";
                let head = parts.method == http::Method::HEAD;
                // SPEC 9: the key goes upstream unchanged, also when the
                // client names it in `Connection` (regression: removed
                // there as hop-by-hop, after the gate had used it).
                let key_header = (parts.headers.contains_key(http::header::CONNECTION))
                    .then(|| parts.headers.get(&policy.header).cloned())
                    .flatten();
                let mut request = self.upstream_request(
                    &upstream,
                    Request::from_parts(parts, body::full(body)),
                    ctx,
                    &route,
                    now,
                );
                if let Some(value) = key_header {
                    request.headers_mut().insert(policy.header.clone(), value);
                }
                crate::headers::frame_an_empty_upload(&mut request);
                let exchange = Exchange {
                    store: self.store.clone(),
                    upstream,
                    // The store's lease runs from its claim, a little
                    // before we heard of it: ours must not end after it.
                    lease_deadline: claimed_at + policy.lease,
                    admission: Some(admission),
                    running: self.running.clone(),
                    hold: Default::default(),
                    metrics: self.metrics.clone(),
                    route_metrics: ctx.metrics.clone(),
                    tasks: self.exchanges.clone(),
                    policy,
                    key: storage_key.clone(),
                    token,
                    fingerprint: fp,
                    created_ms,
                    head,
                    trace: ctx.ids.trace(),
                };
                exchange.start(request, ctx, &route).await
            }
            Decision::Replay => match record.and_then(|r| r.response) {
                Some(stored) => {
                    ctx.outcome = "replayed";
                    replay(stored, parts.method == http::Method::HEAD)
                }
                // Only a record damaged in the store gets here: never panic on it.
                None => {
                    tracing::error!(key = %storage_key.key, "completed record without a response in the store");
                    damaged_record()
                }
            },
            Decision::NotStored { status } => {
                ctx.outcome = "conflict";
                Problem::new(
                    Code::ResponseNotStored,
                    "the first response was too large to store; it is not sent again",
                )
                .with("original_status", status.into())
                .into_response()
            }
            Decision::InProgress { .. }
                if policy.concurrent == Concurrent::Wait && self.draining.is_cancelled() =>
            {
                ctx.outcome = "conflict";
                Problem::new(
                    Code::RequestInProgress,
                    "this instance is shutting down: retry, and another instance waits for the first attempt",
                )
                .retry_after(Duration::from_secs(1))
                .into_response()
            }
            Decision::InProgress { lease_left_ms } => {
                ctx.outcome = "conflict";
                Problem::new(
                    Code::RequestInProgress,
                    "retry after the first attempt completes",
                )
                .retry_after(Duration::from_millis(lease_left_ms))
                .into_response()
            }
            Decision::BecomeUnknown | Decision::Unknown => {
                if reply.decision == Decision::BecomeUnknown {
                    Metrics::route_counter(&self.metrics.unknown_outcomes, &route.name);
                }
                ctx.outcome = "unknown";
                Problem::new(
                    Code::OutcomeUnknown,
                    "an earlier attempt may or may not have taken effect; an operator must resolve it",
                )
                .into_response()
            }
            Decision::Mismatch => {
                ctx.outcome = "mismatch";
                Problem::new(
                    Code::IdempotencyKeyReused,
                    "this key was used for a different request; use a new key",
                )
                .into_response()
            }
        }
    }

    /// One claim; under `concurrent: wait` a duplicate of an in-flight
    /// attempt claims again (backing off) until the attempt completes, is
    /// released (then one waiter wins the new claim), or the budget ends.
    /// With the reply, when its claim was sent, and whether a claim of this
    /// request failed on the way (it may have landed: the caller undoes it
    /// unless it goes on as the key's owner).
    ///
    /// Once the key is known to be another attempt's, a store error does not
    /// end the wait: a duplicate must never be forwarded around the store
    /// (`on_unavailable: forward`) nor refused while its budget lasts; it
    /// waits on, and gets `409 request_in_progress` if the budget ends first.
    async fn claim_or_wait(
        &self,
        claim: &ClaimRequest<'_>,
        concurrent: Concurrent,
        deadline: Instant,
        ctx: &mut Ctx,
    ) -> Result<(ClaimReply, Instant, bool), StoreError> {
        let mut step = Duration::from_millis(5);
        let (mut last, mut uncertain) = (None, false);
        let left = || deadline.saturating_duration_since(Instant::now());
        loop {
            let sent = Instant::now();
            let held = match &last {
                Some(_) => self.running.held(claim.key),
                // A new arrival too takes an ended attempt's record on its
                // way to the store (regression, the verification audit:
                // Redis back empty, a duplicate sent then claimed the key
                // and ran the request again): one atomic load while none is.
                None => self.running.ended(claim.key).map(Held::Ended),
            };
            let (reply, at) = match (last.take(), held) {
                // The attempt it waits on runs in this process: the store is
                // not asked until it has ended (regression, found by an
                // audit: Redis restarted empty under a running attempt, its
                // waiters found no record, and one claimed the key and ran
                // the request again). Its end wakes the waiters.
                (Some(waited), Some(Held::Running)) => waited,
                // It ended here, and the store has not taken its record yet
                // (it is tried again in the background): that record is the
                // answer (regression, an audit: Redis died under the attempt
                // and came back empty, and a waiter ran it again).
                (_, Some(Held::Ended(record))) => {
                    let decision = decide(
                        Some(&record),
                        claim.fingerprint,
                        claim.token,
                        0,
                        OnUnknown::Lock,
                    );
                    let record = Some(Record::clone(&record));
                    (ClaimReply { decision, record }, sent)
                }
                (last, _) => match (self.store.claim(claim).await, last) {
                    (Ok(reply), _) => (reply, sent),
                    (Err(error), None) => return Err(error),
                    (Err(error @ StoreError::Damaged(_)), Some(_)) => return Err(error),
                    // Still the in-progress reply it was waiting on.
                    // Said once per waiter, at each poll in debug only
                    // (regression, the Redis deployments audit: 16 waiters
                    // logged 1,200 warnings in a 30 s outage).
                    (Err(error), Some(waited)) => {
                        if uncertain {
                            tracing::debug!(key = %claim.key.key, route = %claim.key.route, error = %error, "a waiting duplicate's claim failed again; waiting on");
                        } else {
                            tracing::warn!(key = %claim.key.key, route = %claim.key.route, error = %error, "a waiting duplicate's claim failed; waiting on (said once per waiter)");
                        }
                        uncertain = true;
                        waited
                    }
                },
            };
            let waiting = matches!(reply.decision, Decision::InProgress { .. })
                && concurrent == Concurrent::Wait;
            // A shutdown ends the wait: the duplicate is told to retry (on
            // another instance) rather than held until the grace ends and
            // then cut off without an answer (regression).
            if !waiting || left().is_zero() || self.draining.is_cancelled() {
                return Ok((aged(reply, at), at, uncertain));
            }
            // A duplicate waiting on the first attempt: so logged and
            // counted if its client leaves now (regression: `error`, as if
            // the store had failed).
            ctx.outcome = "conflict";
            tokio::select! {
                () = self.store.changed(claim.key, step.min(left())) => {}
                () = self.draining.cancelled() => {}
            }
            step = (step * 2).min(MAX_WAIT_STEP);
            last = Some((reply, at));
        }
    }

    /// A claim that failed (e.g. timed out) may still have been applied by
    /// the store later: undo it, fenced by our own token, so that it does
    /// not block the client's retry until the lease ends.
    fn release_in_background(&self, key: Arc<StorageKey>, token: String) {
        let store = self.store.clone();
        let metrics = &self.metrics;
        let settle = Settle::Release;
        crate::exchange::settle_later(&self.exchanges, store, metrics, key, token, settle, None);
    }

    /// The store failed: fail closed (503) or forward unprotected, per `on_unavailable`.
    async fn store_failed(
        &self,
        error: StoreError,
        upstream: &Arc<Upstream>,
        request: Request<ProxyBody>,
        ctx: &mut Ctx,
    ) -> Response<ProxyBody> {
        tracing::error!(error = %error, "idempotency store unavailable");
        match self.on_unavailable {
            OnUnavailable::Reject => {
                ctx.outcome = "error";
                Problem::new(
                    Code::StoreUnavailable,
                    "the idempotency store is unavailable; nothing was forwarded",
                )
                .into_response()
            }
            OnUnavailable::Forward => {
                // Its outcome is pass_through's: `passthrough`, or `rejected`
                // when the bulkhead or the breaker turns it away (then it
                // was not forwarded, and not counted as such). Nor is one
                // whose connection could not be made: nothing was sent
                // (regression: counted, firing the critical alert).
                let response = self.pass_through(upstream, request, ctx).await;
                let went_out = ctx.outcome == "passthrough" && ctx.upstream_time.is_some();
                if let Some(route) = ctx.route.as_ref().filter(|_| went_out) {
                    Metrics::route_counter(&self.metrics.fail_open_forwards, &route.name);
                    // Said of requests that went out only (regression: of
                    // those turned away or unreachable too).
                    tracing::warn!(
                        key = ctx.key.as_deref(),
                        "forwarded without idempotency protection (store.on_unavailable: forward)"
                    );
                }
                response
            }
        }
    }
}

/// Undoes this attempt's claim unless disarmed: the key and owner token of
/// an attempt whose claim's fate is not settled yet. Dropped armed (the
/// client went away while the claim or a release was awaited, or the claim
/// failed), it releases the key in the background, fenced by the token: a
/// no-op when the claim never landed or the key has another owner.
struct ClaimGuard<'a> {
    proxy: &'a Proxy,
    key: &'a Arc<StorageKey>,
    token: &'a str,
    armed: bool,
}

impl<'a> ClaimGuard<'a> {
    fn arm(proxy: &'a Proxy, key: &'a Arc<StorageKey>, token: &'a str) -> ClaimGuard<'a> {
        ClaimGuard {
            proxy,
            key,
            token,
            armed: true,
        }
    }

    /// The key is settled (released, or owned by the exchange task), or was never ours.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Undoes the claim now, in the background.
    fn release_now(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.proxy
                .release_in_background(self.key.clone(), self.token.to_owned());
        }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        // A drop while the runtime shuts down has nowhere to spawn; the
        // claim then turns unknown or expires with its lease.
        if self.armed && tokio::runtime::Handle::try_current().is_ok() {
            self.release_now();
        }
    }
}

/// The answer for a key whose record the store holds but idemgate cannot
/// read: nothing is forwarded until an operator purges it.
#[cold]
fn damaged_record() -> Response<ProxyBody> {
    Problem::new(
        Code::Internal,
        "the stored record of this key is damaged; an operator must purge it",
    )
    .into_response()
}

/// Whether the client's budget (`timeouts.total`) has time left to forward
/// in. Receiving the body, or waiting for a duplicate (`concurrent: wait`),
/// may have taken it all: such a request is not sent (the upstream would get
/// `X-Request-Timeout-Ms: 0` for a client that has stopped waiting).
fn budget_left(now: Instant, deadline: Instant) -> Result<(), Problem> {
    if now < deadline {
        return Ok(());
    }
    Err(budget_spent())
}

/// A client-facing timeout (SPEC 4.4: `504`, with `Retry-After`) before
/// anything was sent.
fn budget_spent() -> Problem {
    Problem::new(
        Code::UpstreamTimeout,
        "this route's total timeout passed before the request could be forwarded; it was not sent",
    )
    .retry_after(Duration::from_secs(1))
}

/// The stored response, byte for byte, plus `Idempotent-Replayed: true`;
/// moved into the reply (the claim handed the gate its own copy).
pub fn replay(stored: StoredResponse, head: bool) -> Response<ProxyBody> {
    let body = stored.body.unwrap_or_default();
    let mut headers = stored.headers;
    crate::headers::frame_whole(&mut headers, body.len(), head);
    let mut response = Response::new(body::full(body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    crate::headers::standard_reason(response.status(), response.extensions_mut());
    *response.headers_mut() = headers;
    response
        .headers_mut()
        .insert(&IDEMPOTENT_REPLAYED, http::HeaderValue::from_static("true"));
    response
}

#[cold]
fn read_error_problem(error: ReadError, limit: u64) -> Response<ProxyBody> {
    match error {
        ReadError::TooLarge => Problem::new(
            Code::RequestTooLarge,
            format!("protected request bodies are limited to {limit} bytes on this route"),
        ),
        ReadError::Stalled => Problem::new(
            Code::RequestTimeout,
            "the request body did not arrive in time; nothing was claimed or forwarded",
        ),
        // Said as a pass-through's is (regression, a verification audit: a
        // client that half-closed mid-body got 408 "did not arrive in time"
        // here, 400 "broke off" there).
        ReadError::Broken => Problem::new(
            Code::BadRequest,
            "the request body broke off before its end; nothing was claimed or forwarded",
        ),
        // Regression: answered 408 ("did not arrive in time") and logged 499.
        ReadError::Malformed => Problem::new(
            Code::BadRequest,
            "the request body's framing is invalid (a bad chunk); nothing was claimed or forwarded",
        ),
    }
    .into_response()
}

/// A claim's reply as of now, `at` being when the store gave it: a reply
/// kept while its duplicate waited (the attempt running in this process,
/// or the store failing) is older than the wait, and an in-progress one's
/// lease has run on since (regression, an audit: `Retry-After: 8` when the
/// lease ended 3 s later).
fn aged(mut reply: ClaimReply, at: Instant) -> ClaimReply {
    if let Decision::InProgress { lease_left_ms } = &mut reply.decision {
        let since = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
        *lease_left_ms = lease_left_ms.saturating_sub(since);
    }
    reply
}
