//! One upstream: its connection pool, URL joining, the send step, and
//! the two guards in front of it (bulkhead and circuit breaker).

pub mod breaker;
mod pool;
mod silence;
mod upload;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri};

use crate::body::ProxyBody;
use crate::config::UpstreamConfig;
use crate::head_timer::{HeadSleep, HeadTimer};
use crate::problem::{Code, Problem};
use breaker::{Admit, Breaker};
use pool::Pool;
pub use pool::UpstreamBody;
pub use silence::Silence;

/// How sending a request failed, which decides what the client is told.
#[derive(Debug)]
pub enum SendError {
    /// The connection was never established: the upstream saw nothing.
    Connect(String),
    /// This process could not open a connection (no file descriptors or
    /// memory left): the upstream saw nothing and is not to blame.
    Local(String),
    /// The connection broke after (part of) the request may have been sent.
    Broken(String),
    /// The client's request body broke off while it was being sent (the
    /// client went away), or its framing was invalid (`malformed`: the
    /// client is still there): not the upstream's failure.
    ClientBody { malformed: bool },
}

pub struct Upstream {
    pub config: UpstreamConfig,
    /// The `Host` header for the upstream.
    pub authority: HeaderValue,
    pool: Arc<Pool>,
    /// Requests in flight to this upstream, at most `max_in_flight`; no
    /// queueing beyond them. Shared by the builds of the same name
    /// (`Proxy::bulkheads`), so a reload keeps counting them.
    bulkhead: Arc<Bulkhead>,
    pub breaker: Breaker,
}

/// A request let through both guards. Report its answer with [`Admission::finish`];
/// dropped unfinished (it never reached the upstream), it counts for nothing.
pub struct Admission {
    upstream: Arc<Upstream>,
    admit: Admit,
    /// Whether it holds its bulkhead slot: freed with the admission, or
    /// carried by a streamed body to its end ([`Streamed`]).
    slot: bool,
    finished: bool,
    /// How long the upstream may take to answer (the route's response
    /// timeout): a half-open probe dropped unanswered holds its turn as long.
    answer_within: Duration,
}

impl Admission {
    /// Success resets the breaker; failure (connect failure, timeout,
    /// broken connection, 502/503/504) counts towards opening it.
    pub fn finish(mut self, success: bool) {
        self.report(success);
    }

    /// Reports a failure now (the response timeout passed) while the
    /// request goes on holding its bulkhead permit; its later `finish`
    /// reports nothing more.
    pub fn fail_now(&mut self) {
        self.report(false);
    }

    /// Finishes on a response's head whose body is then streamed to the
    /// client. What the body carries to its end ([`Streamed`]): the bulkhead
    /// slot, for the upstream is still answering (SPEC 5: "concurrent
    /// requests to this upstream"), and for a healthy head the breaker's
    /// verdict, told when the body ends whole, or breaks off (none with the
    /// breaker off: nothing to tell). A failed head is reported now. A
    /// half-open probe's healthy head is its answer (SPEC 9: the rest are
    /// turned away "until it answers"): its body may last as long as its
    /// client takes to read it, and must not keep the circuit half-open.
    pub fn finish_streamed(mut self, success: bool) -> Streamed {
        // The slot goes with the body: `Streamed` gives it back.
        self.slot = false;
        let probe = matches!(self.admit, Admit::Probe { .. });
        let judged_at_end = !self.finished && success && !probe && self.upstream.breaker.counts();
        if judged_at_end {
            self.finished = true;
        } else {
            self.report(success);
        }
        Streamed {
            upstream: self.upstream.clone(),
            admit: self.admit,
            judged_at_end,
        }
    }

    /// A request that never reached the upstream, or that it could not act
    /// on (a broken or late upload): nothing to judge, a probe's turn goes
    /// to the next request at once.
    pub fn cancel(mut self) {
        self.upstream.breaker.cancel(self.admit);
        self.finished = true;
    }

    /// The breaker hears of each admission once.
    fn report(&mut self, success: bool) {
        if !self.finished {
            self.upstream
                .breaker
                .record(self.admit, success, Instant::now);
            self.finished = true;
        }
    }
}

/// A streamed response's bulkhead slot and, when its head was healthy, the
/// breaker's verdict on it, carried by its [`UpstreamBody`] and given up
/// when the body ends or is dropped. Whole is a success, broken off a
/// failure ("connections broken before a whole response", SPEC 9); a body
/// dropped unfinished (the client went away) says nothing, as a request
/// that never reached the upstream. The slot is given back to the
/// upstream's bulkhead, so that this stays as small as the verdict alone
/// was (with a permit beside it S1 took 0.9% more instructions, most of
/// them in the allocator's slower paths: bench/PROFILE.md).
pub struct Streamed {
    upstream: Arc<Upstream>,
    admit: Admit,
    judged_at_end: bool,
}

impl Streamed {
    /// The body ended, `whole` or broken off: the verdict is told, the slot freed.
    pub fn end(mut self, whole: bool) {
        if self.judged_at_end {
            self.judged_at_end = false;
            self.upstream
                .breaker
                .record(self.admit, whole, Instant::now);
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if self.judged_at_end {
            self.upstream.breaker.cancel(self.admit);
        }
        self.upstream.bulkhead.free();
    }
}

impl Drop for Admission {
    /// Dropped unjudged and not cancelled: its request was given up (the
    /// client went away) while the upstream may still be at work on it.
    fn drop(&mut self) {
        if !self.finished {
            let within = self.answer_within;
            (self.upstream.breaker).abandon(self.admit, || Instant::now() + within);
        }
        if self.slot {
            self.upstream.bulkhead.free();
        }
    }
}

/// The count of requests in flight to one upstream (by name), shared by
/// its rebuilds: a reload that changed its settings (to lower
/// `max_in_flight` while it struggles, say) started a new count at zero,
/// and the new limit let in that many more beside those still running
/// (regression, found by an audit: 4 in flight against a limit of 2, and
/// the in-flight gauge said 0).
#[derive(Default)]
pub struct Bulkhead {
    in_flight: AtomicUsize,
}

impl Bulkhead {
    /// One slot, unless `max` are taken.
    fn take(&self, max: usize) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn free(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether an upstream's status counts as a failure for the breaker.
pub fn failed_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

impl Upstream {
    /// Pooled HTTP/1.1 connections over `http://` or `https://` (system roots,
    /// or `tls.ca_file`; a client certificate for mutual TLS; SNI from the
    /// URL), counting its requests in flight in `bulkhead` (the previous
    /// one's of this name, after a reload).
    pub fn new(
        config: &UpstreamConfig,
        bulkhead: Arc<Bulkhead>,
    ) -> Result<Upstream, crate::tls::TlsError> {
        let tls = crate::tls::client_config(config.tls.as_ref())?;
        let target = Uri::builder()
            .scheme(config.scheme.clone())
            .authority(config.authority.clone())
            .path_and_query("/")
            .build()
            .expect("a scheme and an authority make a URI");
        Ok(Upstream {
            authority: HeaderValue::from_str(config.authority.as_str())
                .expect("an authority is a valid header value"),
            config: config.clone(),
            pool: Pool::new(target, config.connect_timeout, config.idle_timeout, tls),
            bulkhead,
            breaker: Breaker::new(config.circuit_breaker.clone()),
        })
    }

    /// Whether a reload to `config` can keep this upstream (its pool,
    /// bulkhead and breaker state): the same settings, and TLS files (CA,
    /// client certificate and key) that still hold what they held, so a
    /// certificate rotated in place is taken up by a reload.
    pub fn serves(&self, config: &UpstreamConfig) -> bool {
        self.config == *config
    }

    /// Requests to this upstream right now (under this name: those of the
    /// settings before a reload too).
    pub fn in_flight(&self) -> usize {
        self.bulkhead.in_flight.load(Ordering::Relaxed)
    }

    /// The bulkhead, then the circuit breaker, for a request that the
    /// upstream should answer within `answer_within`; a request turned
    /// away gets its answer at once (no queueing).
    pub fn admit(self: &Arc<Self>, answer_within: Duration) -> Result<Admission, Problem> {
        if !self.bulkhead.take(self.config.max_in_flight as usize) {
            return Err(Problem::new(
                Code::UpstreamOverloaded,
                format!(
                    "{} requests are already in flight to this upstream",
                    self.config.max_in_flight
                ),
            )
            .retry_after(Duration::from_secs(1)));
        }
        match self.breaker.admit(Instant::now) {
            Admit::Reject(wait) => {
                self.bulkhead.free();
                Err(Problem::new(
                    Code::UpstreamCircuitOpen,
                    "the upstream failed repeatedly; requests are paused until a probe succeeds",
                )
                .retry_after(wait))
            }
            admit => Ok(Admission {
                upstream: self.clone(),
                admit,
                slot: true,
                finished: false,
                answer_within,
            }),
        }
    }

    /// The upstream's request target (origin form) for a client's request:
    /// base path joined, query kept.
    pub fn uri_for(&self, original: &Uri) -> Uri {
        let path_and_query = match original.path_and_query() {
            // Without a base path the client's path and query are reused as they are.
            Some(pq) if self.config.base_path.is_empty() => pq.clone(),
            pq => {
                let joined = format!(
                    "{}{}",
                    self.config.base_path,
                    pq.map_or("/", |pq| pq.as_str())
                );
                joined
                    .parse()
                    .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
            }
        };
        Uri::from(path_and_query)
    }

    /// Sends one request (origin-form URI, Host set). A request whose bytes
    /// may have reached the upstream is never sent again; only one that
    /// hyper handed back unwritten goes out on another connection.
    /// `connected` hears of a new connection made for the request (a
    /// pooled one is ready at once).
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        connected: &Connected,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut response = self.pool.send_noting(request, connected).await?;
        // Only a body of no exact size has a transfer coding.
        if hyper::body::Body::size_hint(response.body())
            .exact()
            .is_none()
        {
            crate::headers::transfer_codings_to_content(response.headers_mut());
        }
        // The client hears the proxy's HTTP version (RFC 9110 2.5), not the
        // upstream's: an HTTP/1.0 answer would otherwise go out as one.
        *response.version_mut() = http::Version::HTTP_11;
        Ok(response)
    }
}

/// Whether a request is waiting for a new connection, and since when it has
/// one, and whether its body is still coming from the client: where its
/// response timeout starts. Untouched for a pooled connection and a whole body.
#[derive(Default)]
pub struct Connected {
    making: AtomicBool,
    ready: OnceLock<tokio::time::Instant>,
    /// Told when a body still streaming from the client has been sent whole.
    uploading: Option<Arc<upload::Sent>>,
    /// A protected request's: a pooled connection is checked closed or not
    /// on its socket before it is used, whatever the method.
    protected: bool,
}

impl Connected {
    /// For a protected request (its body in memory).
    pub fn protected() -> Connected {
        Connected {
            protected: true,
            ..Connected::default()
        }
    }

    /// For `request`, whose body may still be streaming from the client
    /// (pass-through): the response timer then waits for it to be sent
    /// whole ([`upload`]).
    pub fn for_request(request: &mut Request<ProxyBody>) -> Connected {
        if hyper::body::Body::is_end_stream(request.body()) {
            return Connected::default();
        }
        let body = std::mem::replace(request.body_mut(), crate::body::empty());
        let (body, sent) = upload::Uploading::wrap(body);
        *request.body_mut() = body;
        Connected {
            uploading: Some(sent),
            ..Connected::default()
        }
    }

    pub(crate) fn is_protected(&self) -> bool {
        self.protected
    }

    /// Whether the request's body was still coming from the client (not
    /// sent whole, and its last read waited for the client's bytes): time
    /// running out then is the client's slowness, not the upstream's. An
    /// upstream that stopped taking the body (it hangs) is its own fault
    /// (regression: a hung upstream's large uploads got `408`, blaming
    /// fast clients, and its breaker never opened).
    pub fn body_still_arriving(&self) -> bool {
        self.uploading
            .as_ref()
            .is_some_and(|sent| sent.waits_on_client())
    }

    /// Whether the request's body has been sent whole (a body in memory is
    /// taken as sent with its head).
    pub(crate) fn sent_whole(&self) -> bool {
        self.uploading.as_ref().is_none_or(|sent| sent.whole())
    }

    /// When the upstream had the whole request, for its latency: `sent`,
    /// or for a body still streaming from the client when the request went
    /// out, the moment it was sent whole (`None` until then). A client's
    /// slow upload is not the upstream's latency (regression, found by an
    /// audit: a body dripped over 2.5 s logged `upstream_ms: 2501` and fed
    /// the upstream latency histogram, and its alert).
    pub fn whole_since(&self, sent: std::time::Instant) -> Option<std::time::Instant> {
        match &self.uploading {
            None => Some(sent),
            Some(upload) => upload.whole_at().map(|at| at.max(sent)),
        }
    }

    pub(crate) fn making(&self) {
        self.making.store(true, Ordering::Relaxed);
    }

    pub(crate) fn ready(&self) {
        let _ = self.ready.set(tokio::time::Instant::now());
    }
}

/// Polls `send` (an [`Upstream::send`] started at `start`) until it ends,
/// or until `response` has passed since it had a connection (`start` for a
/// pooled one, else `connected`: connecting has its own `connect_timeout`,
/// SPEC 4.4) and its body was sent whole, or `cap`, whichever comes first.
/// `None` when time ran out; `send` can then be polled on. Timed on
/// `shared`, the connection's response timer, when given (one request at a
/// time may use it), else on a tokio timer of its own.
pub async fn within_response<F: Future>(
    mut send: Pin<&mut F>,
    connected: &Connected,
    start: tokio::time::Instant,
    response: Duration,
    cap: tokio::time::Instant,
    shared: Option<&HeadTimer>,
) -> Option<F::Output> {
    // While the body is still coming from the client only `cap` runs.
    let mut uploading = connected
        .uploading
        .as_ref()
        .map(|sent| Box::pin(sent.notify.notified()));
    let first = match uploading {
        Some(_) => cap,
        None => (start + response).min(cap),
    };
    let own = std::pin::pin!(None);
    let mut sleep = Deadline::new(shared, own, first);
    // The deadline while a connection is made (`cap`), then once it is ready.
    let (mut making, mut ready) = (false, false);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = send.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if let Some(sent) = &mut uploading {
            if sent.as_mut().poll(cx).is_ready() {
                // Sent whole, so on a ready connection: the timer starts now.
                uploading = None;
                ready = true;
                sleep.reset((tokio::time::Instant::now() + response).min(cap));
            }
        } else if !ready && let Some(&at) = connected.ready.get() {
            ready = true;
            sleep.reset((at + response).min(cap));
        } else if !making && !ready && connected.making.load(Ordering::Relaxed) {
            making = true;
            sleep.reset(cap);
        }
        sleep.poll(cx).map(|()| None)
    })
    .await
}

/// A response's deadline: a sleep on its connection's timer, or on a
/// tokio timer of its own (made only then).
struct Deadline<'a> {
    shared: Option<HeadSleep>,
    own: Pin<&'a mut Option<tokio::time::Sleep>>,
}

impl<'a> Deadline<'a> {
    fn new(
        shared: Option<&HeadTimer>,
        mut own: Pin<&'a mut Option<tokio::time::Sleep>>,
        at: tokio::time::Instant,
    ) -> Deadline<'a> {
        let shared = shared.map(|timer| timer.sleep_at(at.into_std()));
        if shared.is_none() {
            own.set(Some(tokio::time::sleep_until(at)));
        }
        Deadline { shared, own }
    }

    fn reset(&mut self, at: tokio::time::Instant) {
        match (&mut self.shared, self.own.as_mut().as_pin_mut()) {
            (Some(shared), _) => shared.reset(at.into_std()),
            (None, Some(own)) => own.reset(at),
            (None, None) => {} // `new` made one or the other
        }
    }

    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match (&mut self.shared, self.own.as_mut().as_pin_mut()) {
            (Some(shared), _) => Pin::new(shared).poll(cx),
            (None, Some(own)) => own.poll(cx),
            (None, None) => Poll::Pending, // `new` made one or the other
        }
    }
}

impl SendError {
    /// A failure before anything was written: this process's own when it
    /// ran out of descriptors (regression, found by an audit:
    /// at its file-descriptor limit the proxy answered `502
    /// upstream_unreachable` and opened a healthy upstream's circuit).
    fn connect(error: &(dyn std::error::Error + 'static)) -> SendError {
        match local_exhaustion(error) {
            true => SendError::Local(error_chain(error)),
            false => SendError::Connect(error_chain(error)),
        }
    }

    /// Whether the upstream never saw the request.
    pub fn unsent(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Local(_))
    }

    /// A failure once the request may have been written: broken, unless the
    /// upstream refused the TLS handshake (its application saw nothing).
    fn after_send(error: &(dyn std::error::Error + 'static)) -> SendError {
        if client_body_broke(error) {
            SendError::ClientBody {
                malformed: crate::body::malformed(error),
            }
        } else if handshake_rejected(error) {
            SendError::connect(error)
        } else {
            SendError::Broken(error_chain(error))
        }
    }
}

/// hyper's "user body" error: the request body being sent (the client's,
/// streamed) failed with an error of its own, its source.
fn client_body_broke(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<hyper::Error>()
        .is_some_and(|e| e.is_user() && std::error::Error::source(e).is_some())
}

/// Under TLS 1.3 a server that refuses the client's certificate says so
/// after the client has sent its request; the server never completed the
/// handshake, so its application never saw the request: a connect failure.
fn handshake_rejected(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut next = Some(error);
    while let Some(e) = next {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return matches!(
                alert,
                A::CertificateRequired
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::HandshakeFailure
                    | A::AccessDenied
            );
        }
        next = e.source();
    }
    false
}

/// An I/O error among `error`'s sources that says this process is out of
/// descriptors (`EMFILE`, `ENFILE`), socket buffers or memory. Not
/// `EADDRNOTAVAIL` (local ports used up): a connect to an IPv6 address on a host
/// without IPv6 (Docker's default, where `localhost` is also `::1`) says
/// it too, for an upstream that is down (regression, the verification
/// audit: its circuit never opened).
fn local_exhaustion(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| {
                [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&code)
            })
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn only_this_process_s_exhaustion_is_local() {
        let os = |code| std::io::Error::from_raw_os_error(code);
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(
                matches!(SendError::connect(&os(code)), SendError::Local(_)),
                "{code}"
            );
        }
        // Also what a connect to ::1 says on a host without IPv6, for an
        // upstream that is down (regression: its circuit never opened).
        for code in [libc::EADDRNOTAVAIL, libc::ECONNREFUSED, libc::EHOSTUNREACH] {
            assert!(
                matches!(SendError::connect(&os(code)), SendError::Connect(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn base_path_is_joined_on_a_segment() {
        for (base, path, want) in [
            (
                "http://127.0.0.1:9000",
                "/api/orders?x=1",
                "/api/orders?x=1",
            ),
            ("http://127.0.0.1:9000/", "/a", "/a"),
            (
                "http://127.0.0.1:9000/erp",
                "/api/orders/7",
                "/erp/api/orders/7",
            ),
            ("http://127.0.0.1:9000/erp/", "/", "/erp/"),
        ] {
            let yaml = format!(
                "upstreams: {{ u: {{ url: \"{base}\" }} }}\nroutes: [ {{ name: r, match: {{ path_prefix: / }}, upstream: u }} ]\n"
            );
            let config = Config::parse(&yaml).expect("valid");
            let upstream = Upstream::new(&config.upstreams[0], Default::default()).unwrap();
            assert_eq!(upstream.uri_for(&path.parse().unwrap()).to_string(), want);
        }
    }
}
