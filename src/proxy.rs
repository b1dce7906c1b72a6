//! `Proxy::handle`: the life of a request, top to bottom.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{self, ProxyBody};
use crate::config::{Config, OnUnavailable, Route};
use crate::head_timer::HeadTimer;
use crate::headers::{self, Peer, RequestIds, X_REQUEST_ID};
use crate::linger::Lingering;
use crate::metrics::{Metrics, RouteMetrics};
use crate::path;
use crate::problem::{Code, Problem};
use crate::route::RouteTable;
use crate::store::Store;
use crate::stream_end::{self, StreamEnd};
use crate::tls::TlsError;
use crate::upstream::{
    Bulkhead, Connected, SendError, Silence, Upstream, failed_status, within_response,
};

/// How long after shutdown began a request is still taken on: one round
/// trip for a client to hear of the shutdown (a GOAWAY, `Connection:
/// close`), with room to spare.
const LATE: Duration = Duration::from_secs(1);

/// Everything a request needs, built from the validated config.
pub struct Proxy {
    /// Routes and upstreams; swapped whole by a reload.
    routing: ArcSwap<Routing>,
    /// The configuration the process started with: what a reload cannot
    /// change (listen address, store, ...) is still this one's.
    started: Arc<Config>,
    pub store: Arc<Store>,
    /// Background exchanges (a protected request outlives its client); shutdown waits for them.
    pub exchanges: TaskTracker,
    /// Keys of the running exchanges, for the shutdown log.
    pub running: Arc<crate::running::Running>,
    /// The listener's TLS acceptor when it terminates TLS; certificates
    /// are re-read on reload.
    pub tls: Option<ArcSwap<tokio_rustls::TlsAcceptor>>,
    pub on_unavailable: OnUnavailable,
    /// Cancelled when shutdown begins: `/readyz` then says so, new
    /// connections are refused, request bodies left unread stop lingering.
    pub draining: CancellationToken,
    /// When shutdown began ([`Proxy::begin_draining`]).
    drain_began: std::sync::OnceLock<Instant>,
    /// Set when `shutdown_grace` ended with requests still running: those
    /// are cut off by the server, not abandoned by their clients.
    pub cut_off: std::sync::atomic::AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Each upstream's count of requests in flight, by name, while any
    /// request or upstream holds it: an upstream rebuilt by a reload, or
    /// removed by one and added back by the next, goes on counting the
    /// requests still running to it (`max_in_flight` holds across reloads).
    bulkheads: Mutex<HashMap<String, Weak<Bulkhead>>>,
    /// Reloads in the order they began: each takes a number when it starts
    /// ([`reloads_begun`](Self::reloads_begun)), and this holds the number
    /// of the last one applied, so that an older read is never applied after
    /// a newer one (regression: a SIGHUP and a `POST /reload` at once could
    /// apply the older file last, and it stayed though both said they had
    /// reloaded). Held only to apply, not while a file is read (regression,
    /// the verification audit: a reload stuck reading a file held it, and
    /// every later reload waited out its 10 s and failed).
    reloading: Mutex<u64>,
    reloads_begun: std::sync::atomic::AtomicU64,
}

/// The reloadable part of the configuration.
pub struct Routing {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// Each route's metric series, in the routes' order.
    pub route_metrics: Vec<Arc<RouteMetrics>>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Each route's upstream, in the routes' order (no search by name per request).
    pub route_upstreams: Vec<Arc<Upstream>>,
}

/// The count in flight of the upstream named `name`: the one still held
/// by its requests or its previous build, else a new one.
fn bulkhead_of(bulkheads: &Mutex<HashMap<String, Weak<Bulkhead>>>, name: &str) -> Arc<Bulkhead> {
    let mut all = bulkheads.lock().expect("bulkheads lock");
    all.retain(|_, held| held.strong_count() > 0);
    if let Some(held) = all.get(name).and_then(Weak::upgrade) {
        return held;
    }
    let new = Arc::new(Bulkhead::default());
    all.insert(name.to_owned(), Arc::downgrade(&new));
    new
}

impl Routing {
    /// Builds routing for `config`, keeping the upstreams (pools, breaker
    /// state) of `previous` whose settings did not change.
    fn new(
        config: &Config,
        previous: Option<&Routing>,
        bulkheads: &Mutex<HashMap<String, Weak<Bulkhead>>>,
        metrics: &Arc<Metrics>,
    ) -> Result<Routing, TlsError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(
                |u| match previous.and_then(|p| p.upstreams.iter().find(|old| old.serves(u))) {
                    Some(kept) => Ok(kept.clone()),
                    // Rebuilt (or new): the count in flight goes on under its name.
                    None => Upstream::new(u, bulkhead_of(bulkheads, &u.name)).map(Arc::new),
                },
            )
            .collect::<Result<Vec<Arc<Upstream>>, _>>()?;
        let route_upstreams = (config.routes.iter())
            .map(|r| {
                (upstreams.iter())
                    .find(|u| *u.config.name == *r.upstream)
                    .cloned()
                    .expect("routes name defined upstreams (checked by config validation)")
            })
            .collect();
        Ok(Routing {
            config: Arc::new(config.clone()),
            routes: RouteTable::new(&config.routes),
            route_metrics: config
                .routes
                .iter()
                .map(|r| {
                    if r.idempotency.is_some() {
                        metrics.open_protected_route(&r.name);
                    }
                    Arc::new(RouteMetrics::new(
                        metrics,
                        r.name.clone(),
                        r.upstream.clone(),
                    ))
                })
                .collect(),
            upstreams,
            route_upstreams,
        })
    }
}

/// One request as it travels: its arrival, ids and what the access log will say.
pub struct Ctx {
    pub arrived: Instant,
    pub peer: Peer,
    /// Its HTTP/1 connection's response timer, which it may use while it
    /// runs (never a task that outlives it).
    pub responses: Option<HeadTimer>,
    pub ids: RequestIds,
    pub route: Option<Arc<Route>>,
    /// The host the client addressed (`Host`, or the target's authority),
    /// as routed by: sent upstream as `X-Forwarded-Host`.
    pub host: Option<HeaderValue>,
    /// The matched route's metric series.
    pub metrics: Option<Arc<RouteMetrics>>,
    pub outcome: &'static str,
    pub key: Option<String>,
    pub upstream_time: Option<std::time::Duration>,
    /// The upstream's answer is still awaited (a protected request's 504):
    /// `upstream_time` is the wait, logged; the exchange puts the real
    /// time into the latency histogram when the answer comes.
    pub upstream_pending: bool,
    /// The client's request body broke off (it went away): logged and
    /// counted as [`CLIENT_CLOSED`], whatever the answer that nobody reads.
    pub client_gone: bool,
}

impl Proxy {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, TlsError> {
        let bulkheads = Mutex::default();
        let routing = Routing::new(config, None, &bulkheads, &metrics)?;
        Ok(Proxy {
            started: routing.config.clone(),
            routing: ArcSwap::from_pointee(routing),
            store,
            exchanges: TaskTracker::new(),
            running: Default::default(),
            tls: match &config.listen.tls {
                Some(files) => Some(ArcSwap::from_pointee(
                    crate::tls::server_config(files)?.into(),
                )),
                None => None,
            },
            on_unavailable: config.store.on_unavailable,
            draining: Default::default(),
            drain_began: Default::default(),
            cut_off: Default::default(),
            bulkheads,
            reloading: Mutex::default(),
            reloads_begun: std::sync::atomic::AtomicU64::new(0),
            metrics,
        })
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Swaps routes, upstreams and the listener's certificates for new
    /// requests; requests in flight keep the routing they started with.
    /// Listen address and store changes need a restart.
    pub fn reload(&self, config: &Config) -> Result<(), TlsError> {
        let old = self.routing.load_full();
        // Compared with what runs, not with the last file reloaded (which
        // made the same warning once, then none, though it never applied).
        for field in self.started.restart_needed(config) {
            tracing::warn!(
                field,
                "reload: this setting takes effect only after a restart"
            );
        }
        for change in old.config.record_changes(config) {
            tracing::warn!(
                change,
                "reload: records made before it are keyed, matched or used differently"
            );
        }
        let routing = Routing::new(config, Some(&old), &self.bulkheads, &self.metrics)?;
        if let (Some(acceptor), Some(files)) = (&self.tls, &config.listen.tls) {
            acceptor.store(Arc::new(crate::tls::server_config(files)?.into()));
        }
        let kept = routing
            .upstreams
            .iter()
            .filter(|u| old.upstreams.iter().any(|o| Arc::ptr_eq(o, u)))
            .count();
        self.routing.store(Arc::new(routing));
        tracing::info!(
            routes = config.routes.len(),
            upstreams = config.upstreams.len(),
            upstreams_kept = kept,
            "configuration reloaded"
        );
        Ok(())
    }

    /// [`reload_from`](Self::reload_from) off the runtime, on a thread of
    /// its own (a large file takes a while to read and check; requests went
    /// on waiting), given up after [`RELOAD_LIMIT`]: a file on a hung mount
    /// (or a FIFO) held the reload forever, and the runtime's wait for its
    /// blocking task kept the process from exiting, even on a second signal
    /// (regression, found by an audit). A reload given up is not applied
    /// when its read ends after all.
    pub async fn reload_file(
        self: &Arc<Self>,
        path: &std::path::Path,
    ) -> Result<Reloaded, Vec<String>> {
        let (proxy, path) = (self.clone(), path.to_owned());
        let given_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let abandoned = given_up.clone();
        let thread = std::thread::Builder::new()
            .name("idemgate-reload".into())
            .spawn(move || {
                let _ = tx.send(proxy.reload_from(&path, &abandoned));
            });
        if let Err(e) = thread {
            return Err(vec![format!("the reload could not start: {e}")]);
        }
        match tokio::time::timeout(RELOAD_LIMIT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(vec!["the reload ended without a result".to_owned()]),
            Err(_) => {
                given_up.store(true, std::sync::atomic::Ordering::Release);
                let error = format!(
                    "reading and checking the configuration took longer than {RELOAD_LIMIT:?} (a file on a hung mount?): the reload is given up, and the running configuration stays"
                );
                tracing::error!(error = %error, "reload rejected");
                Err(vec![error])
            }
        }
    }

    /// Reads, validates and applies a configuration file, unless `given_up`
    /// by then or a reload that began later was applied first (which read
    /// the file later: its configuration runs); an invalid one changes
    /// nothing and its errors are logged and returned.
    fn reload_from(
        &self,
        path: &std::path::Path,
        given_up: &std::sync::atomic::AtomicBool,
    ) -> Result<Reloaded, Vec<String>> {
        use std::sync::atomic::Ordering;
        let number = self.reloads_begun.fetch_add(1, Ordering::AcqRel) + 1;
        let result = Config::load(path)
            .map_err(|errors| errors.0.iter().map(ToString::to_string).collect())
            .and_then(|config| {
                if given_up.load(Ordering::Acquire) {
                    return Err(Vec::new());
                }
                let mut applied = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
                // Not a failure: the file as read later runs (regression,
                // an audit: concurrent `POST /reload`s of a valid file got
                // 400, and an error was logged).
                if *applied > number {
                    tracing::info!("a reload that began later was applied first: this one's older read is not applied");
                    return Ok(Reloaded::Overtaken);
                }
                for warning in &config.warnings {
                    tracing::warn!(warning = %warning, "configuration");
                }
                self.reload(&config).map_err(|e| vec![e.to_string()])?;
                *applied = number;
                Ok(Reloaded::Applied)
            });
        // A read that ends after it was given up says only that (regression,
        // an audit: a FIFO's EOF was logged as an empty file's errors).
        if result.is_err() && given_up.load(Ordering::Acquire) {
            tracing::warn!("a reload given up earlier has finished reading: not applied");
            return Err(vec![
                "read after the reload was given up: not applied".to_owned(),
            ]);
        }
        if let Err(errors) = &result {
            tracing::error!(errors = ?errors, "reload rejected; the running configuration stays");
        }
        result
    }

    /// match route → pass through, or protect (key, fingerprint, claim,
    /// replay / reject / forward, record) → respond and log.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Peer,
        responses: Option<HeadTimer>,
    ) -> Response<ProxyBody> {
        let ctx = Ctx {
            arrived: Instant::now(),
            peer,
            responses,
            ids: RequestIds::from_headers(request.headers()),
            route: None,
            host: None,
            metrics: None,
            outcome: "error",
            key: None,
            upstream_time: None,
            upstream_pending: false,
            client_gone: false,
        };
        let path = tracing::enabled!(target: "idemgate::access", tracing::Level::INFO)
            .then(|| request.uri().path().to_owned());
        // Logs and counts the request once, even when the client goes away
        // and hyper drops this future before it answers.
        let mut access = Access {
            proxy: &self,
            method: request.method().clone(),
            path,
            ctx,
            done: false,
        };
        // Every log line of this request (the exchange task's too) carries its trace id.
        let span = tracing::info_span!("request", trace_id = access.ctx.ids.trace_id());
        // HTTP/1: a body the answer leaves unread is read to its end, so that
        // the client can finish sending it and read the answer.
        let lingers = request.version() != http::Version::HTTP_2
            && !hyper::body::Body::is_end_stream(request.body());
        // Whether a body its client holds back for `100 Continue` is still
        // unasked when the answer goes: hyper then closes the connection.
        let mut held_back = None;
        let request = match lingers {
            true => {
                // Any line, as hyper reads the last (regression: the first
                // was read, and `Expect: x` then `Expect: 100-continue`
                // desynced the connection again); HTTP/1.0 has none.
                // A list (`100-continue, x`) too: its client waits as well.
                let expects_continue = request.version() == http::Version::HTTP_11
                    && (request.headers().get_all(http::header::EXPECT).iter()).any(|v| {
                        (v.as_bytes().split(|&b| b == b','))
                            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
                    });
                held_back = expects_continue.then(|| Arc::new(AtomicBool::new(true)));
                let held = held_back.clone();
                request.map(|body| body::boxed(Lingering::new(body, &self.draining, held)))
            }
            // HTTP/2: a stream the client reset is not a whole body.
            false
                if request.version() == http::Version::HTTP_2
                    && !hyper::body::Body::is_end_stream(request.body()) =>
            {
                request.map(|body| body::boxed(StreamEnd::new(body)))
            }
            false => request.map(body::boxed),
        };
        let mut response = self
            .dispatch(request, &mut access.ctx)
            .instrument(span)
            .await;
        response
            .headers_mut()
            .insert(&X_REQUEST_ID, access.ctx.ids.request_id.clone());
        // Said, as RFC 9112 9.6 asks of a server that will close (the wire
        // audit: closed without a word after a 404, a 400, a 413).
        if held_back.is_some_and(|held| held.load(Ordering::Relaxed)) {
            (response.headers_mut()).insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        access.finish(response.status().as_u16());
        response
    }

    fn count(&self, ctx: &Ctx, method: &http::Method, status: u16) {
        match &ctx.metrics {
            Some(route) => {
                let observed = ctx.upstream_time.filter(|_| !ctx.upstream_pending);
                route.count(method, ctx.outcome, status, observed)
            }
            None => self.metrics.unrouted(method, ctx.outcome, status),
        }
    }

    /// Shutdown begins: requests that come from now on are answered as
    /// [`Proxy::too_late`] says.
    pub fn begin_draining(&self) {
        let _ = self.drain_began.set(Instant::now());
        self.draining.cancel();
    }

    /// A request that comes more than [`LATE`] after shutdown began is not
    /// taken on (an HTTP/2 client that never acknowledges the GOAWAY's
    /// PING may open streams until the grace ends: h2 takes them until it
    /// has the ack; regression, an audit: they ran upstream and were cut
    /// off unanswered at the grace's end). One that comes sooner was on
    /// its way when shutdown began, and is served.
    fn too_late(&self) -> bool {
        (self.drain_began.get()).is_some_and(|began| began.elapsed() > LATE)
    }

    async fn dispatch(
        &self,
        mut request: Request<ProxyBody>,
        ctx: &mut Ctx,
    ) -> Response<ProxyBody> {
        if self.too_late() {
            ctx.outcome = "rejected";
            return Problem::new(
                Code::ShuttingDown,
                "this instance is shutting down; nothing was claimed or forwarded: retry (another instance takes it)",
            )
            .retry_after(Duration::from_secs(1))
            .into_response();
        }
        // Matched and forwarded in its normal form: `/a/../orders` must not
        // miss the `/orders` route that the upstream will take it for.
        let malformed = path::malformed(request.uri().path());
        if let Some(uri) = path::normalized(request.uri()) {
            *request.uri_mut() = uri;
        }
        if let Some(why) = malformed.or_else(|| path::ambiguous(request.uri().path())) {
            ctx.outcome = "rejected";
            return Problem::new(
                Code::BadRequest,
                format!("this path holds {why}: upstreams may read it as another path than the one it is routed as"),
            )
            .into_response();
        }
        if request.version() == http::Version::HTTP_2 {
            headers::join_cookies(request.headers_mut());
            stream_end::one_content_length(request.headers_mut());
        }
        // HTTP/1 too: a POST with neither Content-Length nor
        // Transfer-Encoding (regression, an audit: passed through unframed).
        headers::frame_an_empty_upload(&mut request);
        if request.method() == http::Method::CONNECT {
            // A tunnel, not a request for a route: no upstream takes one.
            ctx.outcome = "rejected";
            return Problem::new(
                Code::NoRoute,
                "CONNECT is not proxied: idemgate is a reverse proxy",
            )
            .into_response();
        }
        let host = match routing_host(&request) {
            Ok(host) => host,
            Err(problem) => {
                ctx.outcome = "rejected";
                return problem.into_response();
            }
        };
        let routing = self.routing();
        let Some(index) = routing.routes.find_index(
            request.method(),
            host.as_ref().and_then(|v| v.to_str().ok()),
            &path::for_routing(request.uri().path()),
        ) else {
            ctx.outcome = "rejected";
            return Problem::new(Code::NoRoute, "no route matches this method, host and path")
                .into_response();
        };
        let route = routing.routes.get(index);
        ctx.route = Some(route.clone());
        ctx.host = host;
        ctx.metrics = Some(routing.route_metrics[index].clone());
        // RFC 9112 6.1: a transfer coding the proxy cannot undo (`gzip,
        // chunked`) would reach the upstream unlabelled, the body's meaning
        // changed. Only a body of no exact size has a transfer coding.
        // Checked once routed: counted and logged with its route
        // (regression, an audit: `route=""`, out of the route's dashboards).
        if hyper::body::Body::size_hint(request.body())
            .exact()
            .is_none()
            && !headers::other_transfer_codings(request.headers()).is_empty()
        {
            ctx.outcome = "rejected";
            return Problem::new(
                Code::BadRequest,
                "only the chunked transfer coding is supported: send the body chunked or with a Content-Length (a compressed body as Content-Encoding)",
            )
            .into_response();
        }
        let upstream = routing.route_upstreams[index].clone();
        match route
            .idempotency
            .clone()
            .filter(|p| crate::route::has_method(&p.methods, request.method()))
        {
            None => self.pass_through(&upstream, request, ctx).await,
            // Boxed: the gate's future is large, and pass-through requests
            // would otherwise carry (and copy) its size too.
            Some(policy) => {
                Box::pin(self.protect(route.clone(), policy, upstream, request, ctx)).await
            }
        }
    }

    /// Plain reverse proxying: bodies streamed both ways, no store access.
    pub async fn pass_through(
        &self,
        upstream: &Arc<Upstream>,
        request: Request<ProxyBody>,
        ctx: &mut Ctx,
    ) -> Response<ProxyBody> {
        let route = ctx
            .route
            .clone()
            .expect("pass_through runs on a matched route");
        let admission = match upstream.admit(route.timeouts.response) {
            Ok(admission) => admission,
            Err(problem) => {
                ctx.outcome = "rejected";
                return problem.into_response();
            }
        };
        ctx.outcome = "passthrough";
        let sent = Instant::now();
        let total = (ctx.arrived + route.timeouts.total).into();
        let mut request = self.upstream_request(upstream, request, ctx, &route, sent);
        let connected = Connected::for_request(&mut request);
        let send = std::pin::pin!(upstream.send(request, &connected));
        let (start, response) = (sent.into(), route.timeouts.response);
        let shared = ctx.responses.as_ref();
        let result = within_response(send, &connected, start, response, total, shared).await;
        // No latency for a request that never went out (a connect failure),
        // nor for one whose client never sent its body whole; an answer
        // that came before the body's end counts from the send.
        if !matches!(&result, Some(Err(error)) if error.unsent()) {
            let answered = matches!(&result, Some(Ok(_)));
            let since = connected.whole_since(sent).or(answered.then_some(sent));
            ctx.upstream_time = since.map(|at| at.elapsed());
        }
        match result {
            Some(Ok(response)) => {
                let (mut parts, mut incoming) = response.into_parts();
                incoming.streamed(admission.finish_streamed(!failed_status(parts.status.as_u16())));
                headers::strip_hop_by_hop(&mut parts.headers);
                headers::frame_passed_answer(&mut parts.headers, parts.status);
                let body = Silence::new(incoming, route.timeouts.response, ctx.ids.trace());
                Response::from_parts(parts, body::boxed(body))
            }
            // Unjudged: the upstream did nothing wrong.
            Some(Err(error @ SendError::ClientBody { malformed })) => {
                admission.cancel();
                // A malformed body's client is there for its 400
                // (regression: logged as 499).
                ctx.client_gone = !malformed;
                send_error_problem(error, &upstream.config.name)
            }
            // This process's own exhaustion: unjudged.
            Some(Err(error @ SendError::Local(_))) => {
                admission.cancel();
                send_error_problem(error, &upstream.config.name)
            }
            Some(Err(error)) => {
                admission.finish(false);
                send_error_problem(error, &upstream.config.name)
            }
            // The body was still coming when `total` passed: the client's
            // slowness (the upstream could not answer yet), never a failure
            // for its breaker (regression: slow uploads opened the circuit
            // for everyone, with a 504 that blamed the upstream). Unjudged.
            None if connected.body_still_arriving() => {
                admission.cancel();
                Problem::new(
                    Code::RequestTimeout,
                    "the request body was still arriving when this route's total timeout passed",
                )
                .into_response()
            }
            None => {
                admission.finish(false);
                timeout_problem()
            }
        }
    }

    /// The client's request rewritten for the upstream, to be sent at `now`
    /// (its `X-Request-Timeout-Ms` is what is left of `total` then).
    pub fn upstream_request(
        &self,
        upstream: &Upstream,
        request: Request<ProxyBody>,
        ctx: &Ctx,
        route: &Route,
        now: Instant,
    ) -> Request<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        parts.uri = upstream.uri_for(&parts.uri);
        parts.version = http::Version::HTTP_11;
        let budget = route.timeouts.total.saturating_sub(now - ctx.arrived);
        headers::forward_headers(
            &mut parts.headers,
            &ctx.peer,
            self.tls.is_some(),
            &upstream.authority,
            &ctx.ids,
            budget.as_millis() as u64,
            ctx.host.clone(),
        );
        Request::from_parts(parts, body)
    }
}

/// The answer to a send to `upstream` (by name, for the log) that failed.
#[cold]
pub fn send_error_problem(error: SendError, upstream: &str) -> Response<ProxyBody> {
    match error {
        SendError::Connect(detail) => {
            // Which upstream: a handshake's reason alone ("UnknownIssuer")
            // did not say (regression, the TLS audit).
            tracing::warn!(upstream, error = %detail, "upstream connect failed");
            Problem::new(
                Code::UpstreamUnreachable,
                "the upstream could not be reached; nothing was sent",
            )
            .into_response()
        }
        SendError::Local(detail) => {
            tracing::error!(upstream, error = %detail, "could not open a connection to the upstream: this process is out of file descriptors (raise its limit, ulimit -n / LimitNOFILE)");
            Problem::new(
                Code::UpstreamOverloaded,
                "this instance could not open a connection to the upstream (out of file descriptors); nothing was sent",
            )
            .retry_after(std::time::Duration::from_secs(1))
            .into_response()
        }
        SendError::Broken(detail) => {
            tracing::warn!(upstream, error = %detail, "upstream connection broke");
            Problem::new(
                Code::UpstreamFailed,
                "the upstream connection broke before a whole response arrived",
            )
            .into_response()
        }
        SendError::ClientBody { malformed: false } => Problem::new(
            Code::BadRequest,
            "the request body broke off before it was sent whole",
        )
        .into_response(),
        SendError::ClientBody { malformed: true } => Problem::new(
            Code::BadRequest,
            "the request body's framing is invalid (a bad chunk); it was not sent whole",
        )
        .into_response(),
    }
}

#[cold]
pub fn timeout_problem() -> Response<ProxyBody> {
    Problem::new(
        Code::UpstreamTimeout,
        "the upstream did not answer within this route's timeouts",
    )
    .retry_after(std::time::Duration::from_secs(1))
    .into_response()
}

/// [`request_host_value`] for routing, read with the check of RFC 9112 3.2:
/// an HTTP/1.1 request names its host in exactly one `Host` line (or in an
/// absolute-form target), and no request has two: which one the proxy
/// routes by, and the upstream believes, must not be a guess.
fn routing_host<B>(request: &Request<B>) -> Result<Option<HeaderValue>, Problem> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(Problem::new(
            Code::BadRequest,
            "two Host header lines: send one",
        ));
    }
    // RFC 9112 3.2: an HTTP/1.1 request without Host, or with one that is
    // no host[:port], is answered 400, absolute-form target or not
    // (regression: both were served, the bad value forwarded as
    // X-Forwarded-Host).
    match first {
        None if request.version() == http::Version::HTTP_11 => {
            return Err(Problem::new(
                Code::BadRequest,
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        Some(host) if !host.is_empty() && !is_host_and_port(host.as_bytes()) => {
            return Err(Problem::new(
                Code::BadRequest,
                "the Host header is not a host name or address with an optional port",
            ));
        }
        _ => {}
    }
    match request.uri().authority() {
        // The target's authority is checked as a Host is (regression, a
        // verification audit: `http://example.com:abc/` and HTTP/2's
        // `:authority` were not).
        Some(_) => match request_host_value(request.headers(), request.uri()) {
            Some(host) if !is_host_and_port(host.as_bytes()) => Err(Problem::new(
                Code::BadRequest,
                "the request target's authority is not a host name or address with an optional port",
            )),
            host => Ok(host),
        },
        None => Ok(first.cloned()),
    }
}

/// The bytes of a host name or IPv4 address (RFC 3986 `reg-name`: unreserved,
/// sub-delims, `%`), as a table: read per byte of every request's Host.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    table
};

/// `host[:port]` (RFC 9110 7.2): a registered name or IPv4 address of
/// RFC 3986's characters (no userinfo), or an IPv6 literal in brackets, then
/// an optional port of digits (regression, a verification audit:
/// `example.com:abc` and `[::1]x` passed). Checked byte by byte, with no
/// allocation: it runs on every request that has a Host.
fn is_host_and_port(value: &[u8]) -> bool {
    let (host_ok, port) = match value.strip_prefix(b"[") {
        Some(v6) => match v6.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &v6[..end];
                let ok = !literal.is_empty()
                    && literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                (ok, &v6[end + 1..])
            }
            None => (false, &[][..]),
        },
        None => {
            let colon = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            let name = &value[..colon];
            let ok = name.iter().all(|&b| REG_NAME[usize::from(b)]);
            (ok, &value[colon..])
        }
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    host_ok && port_ok
}

/// The host the client addressed: the request target's authority when it has one, without any
/// userinfo: HTTP/2's `:authority`, or an absolute-form HTTP/1 target, whose
/// Host header a server must ignore (RFC 9112 3.2.2). Else the Host header.
/// Routing by a Host that disagrees would let a request past its route's gate.
fn request_host_value(headers: &http::HeaderMap, uri: &http::Uri) -> Option<HeaderValue> {
    let Some(authority) = uri.authority() else {
        return headers.get(header::HOST).cloned();
    };
    let text = authority.as_str();
    match text.rfind('@') {
        None => HeaderValue::from_str(text).ok(),
        Some(at) => HeaderValue::from_str(&text[at + 1..]).ok(),
    }
}

/// The access log line and the request metrics of one request, written
/// exactly once: by [`Access::finish`] with the answer's status, or, when the
/// client went away first (hyper drops the request's future), on drop with
/// status [`CLIENT_CLOSED`] and the outcome as far as it got.
struct Access<'a> {
    proxy: &'a Proxy,
    method: http::Method,
    /// `None` when access logging is off.
    path: Option<String>,
    ctx: Ctx,
    done: bool,
}

/// How a reload that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// Its read of the file was applied.
    Applied,
    /// A reload that began later (and so read the file later) was applied
    /// first; this one's older read was not.
    Overtaken,
}

/// How long a reload may take to read and check its files.
pub const RELOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The status logged and counted for a request whose client went away
/// before its answer (nginx's "client closed request"); never sent.
pub const CLIENT_CLOSED: u16 = 499;

/// The status logged and counted for a request cut off unanswered at the
/// end of `shutdown_grace` (regression: logged as [`CLIENT_CLOSED`], which
/// blamed clients that had stayed, and counted as a 4xx, out of sight of
/// the 5xx alerts); never sent.
pub const CUT_OFF_AT_SHUTDOWN: u16 = 503;

impl Access<'_> {
    fn finish(&mut self, status: u16) {
        self.done = true;
        let status = if self.ctx.client_gone {
            CLIENT_CLOSED
        } else {
            status
        };
        if let Some(path) = &self.path {
            log_request(&self.ctx, &self.method, path, status);
        }
        self.proxy.count(&self.ctx, &self.method, status);
    }
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        if !self.done {
            let cut_off = self
                .proxy
                .cut_off
                .load(std::sync::atomic::Ordering::Acquire);
            // Its handling panicked: answered 500 (`server::panicked`).
            let status = match (std::thread::panicking(), cut_off) {
                (true, _) => 500,
                (false, true) => CUT_OFF_AT_SHUTDOWN,
                (false, false) => CLIENT_CLOSED,
            };
            self.finish(status);
        }
    }
}

/// One structured line per request. Never header values or bodies.
fn log_request(ctx: &Ctx, method: &http::Method, path: &str, status: u16) {
    tracing::info!(
        target: "idemgate::access",
        client = ctx.peer.ip.to_str().unwrap_or("-"),
        route = ctx.route.as_ref().map(|r| &*r.name),
        method = %method,
        path,
        status,
        outcome = ctx.outcome,
        key = ctx.key.as_deref(),
        upstream_ms = ctx.upstream_time.map(|t| t.as_millis() as u64),
        total_ms = ctx.arrived.elapsed().as_millis() as u64,
        trace_id = ctx.ids.trace_id(),
        request_id = ctx.ids.request_id.to_str().unwrap_or("-"),
        "request"
    );
}
