//! The accept loops: the proxy listener (HTTP/1.1 and HTTP/2 cleartext into
//! `Proxy::handle`) and the admin listener, reload on SIGHUP, and a graceful
//! stop that lets in-flight exchanges finish and be recorded.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::activity::{self, Activity};
use crate::admin::Admin;
use crate::body::ProxyBody;
use crate::config::{Backend, Config};
use crate::drain::Drain;
use crate::head_timer::HeadTimer;
use crate::metrics::Metrics;
use crate::opening::Opening;
use crate::proxy::Proxy;
use crate::send_timer::{SendTimeout, SendTimer};
use crate::store::Store;

/// A request head must arrive whole within this time...
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// ...and stay within this size.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How often the store is pinged for the `idemgate_ready` gauge.
const READINESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot bind the admin listener {0}: {1}")]
    AdminBind(std::net::SocketAddr, std::io::Error),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The bound sockets: the proxy's, and the admin API's when configured.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `admin.listen` (when configured) next to an already bound proxy listener.
    pub async fn with_admin(config: &Config, proxy: TcpListener) -> Result<Listeners, RunError> {
        let admin = match &config.admin {
            Some(admin) => Some(
                TcpListener::bind(admin.listen)
                    .await
                    .map_err(|e| RunError::AdminBind(admin.listen, e))?,
            ),
            None => None,
        };
        Ok(Listeners { proxy, admin })
    }
}

/// Serves `config` on `listener` (and `admin.listen`) until `shutdown`
/// completes, then drains: connections and background exchanges get
/// `shutdown_grace` to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let listeners = Listeners::with_admin(&config, listener).await?;
    serve(config, listeners, shutdown, None).await
}

/// Where reloads come from: the configuration file, re-read on `POST
/// /reload` and on SIGHUP, which is listened for from [`Reloads::new`] on
/// (made before the file is loaded, so that a SIGHUP sent once it is
/// loaded is never missed: SIGHUP's default action would end the process,
/// and one that came before the reload task listened was lost).
/// Also what ends a shutdown's grace early (`hurry`: in the binary, a
/// second SIGTERM/SIGINT).
pub struct Reloads {
    path: PathBuf,
    hup: Option<tokio::signal::unix::Signal>,
    hurry: Option<Hurry>,
}

/// What ends a shutdown's grace early when it completes.
type Hurry = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Reloads {
    pub fn new(path: PathBuf) -> Reloads {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|error| {
                tracing::warn!(error = %error, "cannot listen for SIGHUP; reload is unavailable");
            })
            .ok();
        Reloads {
            path,
            hup,
            hurry: None,
        }
    }

    /// Ends a shutdown's grace at once when `hurry` completes.
    pub fn hurry_on(mut self, hurry: impl Future<Output = ()> + Send + 'static) -> Reloads {
        self.hurry = Some(Box::pin(hurry));
        self
    }
}

/// [`run`] on bound listeners, plus reloads (SIGHUP and `POST /reload`)
/// when they are given.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: Option<Reloads>,
) -> Result<(), RunError> {
    if config.store.backend == Backend::Memory {
        tracing::warn!(
            "store backend is memory: idempotency records live in this process only and do not survive a restart"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(Store::open(&config.store, metrics.clone())?);
    store.hear_other_instances();
    let proxy = Arc::new(Proxy::new(&config, store, metrics)?);
    let mut hurry = None;
    let config_path = reloads.map(
        |Reloads {
             path,
             hup,
             hurry: h,
         }| {
            if let Some(hup) = hup {
                tokio::spawn(reload_on_sighup(hup, proxy.clone(), path.clone()));
            }
            hurry = h;
            path
        },
    );
    let readiness = tokio::spawn(watch_readiness(proxy.clone()));
    let send_timeout = SendTimeout {
        after: config.send_timeout,
        cut_offs: proxy.metrics.send_timeouts.clone(),
    };
    let admin_task = listeners.admin.map(|listener| {
        let admin = Arc::new(Admin {
            proxy: proxy.clone(),
            config_path: config_path.clone(),
        });
        tokio::spawn(serve_admin(listener, admin, send_timeout.clone()))
    });

    let connections = Arc::new(Drain::default());
    let builder = Arc::new(connection_builder());
    let mut accept_errors = AcceptErrors::new("proxy");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listeners.proxy.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        accept_errors.back_off(&error).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // Timed under TLS, on the socket itself: rustls takes
                // plaintext into its own buffer whether or not the socket
                // takes anything (regression: TLS cut a non-reader off only
                // after several times `send_timeout`).
                let socket = Some(std::os::fd::AsRawFd::as_raw_fd(&stream));
                let stream = SendTimer::new(stream, send_timeout.clone());
                // The handshake, the opening and the first head share the
                // connection's first 10 s.
                let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
                let (proxy, send_timeout) = (proxy.clone(), send_timeout.clone());
                let (builder, drain) = (builder.clone(), connections.clone());
                connections.spawn(async move {
                    // `Proxy::handle` for each request of the connection
                    // (its future not boxed: it lives in hyper's dispatcher).
                    let handler = {
                        let (proxy, peer) = (proxy.clone(), crate::headers::Peer::new(peer));
                        // The connection's response timer (HTTP/1: one
                        // request at a time; see `head_timer`).
                        let responses = HeadTimer::default();
                        // `handle`'s own future, not one wrapped in another
                        // (each wrapping is one more copy of its 4.5 KB).
                        move |request: Request<Incoming>| {
                            let responses = (request.version() != http::Version::HTTP_2)
                                .then(|| responses.clone());
                            proxy.clone().handle(request, peer.clone(), responses)
                        }
                    };
                    let refused = match &proxy.tls {
                        None => serve_connection(stream, socket, deadline, send_timeout, &builder, &drain, handler).await,
                        Some(acceptor) => {
                            let acceptor = acceptor.load_full();
                            let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
                            // No request of it can be in flight: a shutdown
                            // cuts it short (regression, an audit: a client
                            // silent in its handshake held shutdown for up to
                            // the head's 10 s).
                            let stopping = drain.stopping();
                            tokio::select! {
                                done = handshake => match done {
                                    Ok(Ok(tls)) => serve_connection(tls, socket, deadline, send_timeout, &builder, &drain, handler).await,
                                    Ok(Err(error)) => {
                                        tracing::debug!(error = %error, %peer, "TLS handshake failed");
                                        None
                                    }
                                    Err(_) => {
                                        tracing::debug!(%peer, "TLS handshake timed out");
                                        None
                                    }
                                },
                                () = stopping.begun() => {
                                    tracing::debug!(%peer, "TLS handshake cut short by the shutdown");
                                    None
                                }
                            }
                        }
                    };
                    if let Some(reason) = refused {
                        proxy.metrics.refused_heads.get_or_create(&crate::metrics::ReasonLabels { reason }).inc();
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listeners.proxy);
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections, draining in-flight requests");
    // Connections are told to finish before waiting duplicates are let go:
    // a waiter's `409` then says `Connection: close` (regression, an audit:
    // one answered before its connection heard of the stop went out
    // without it, the connection closed right after).
    let connections_ended = connections.stop();
    proxy.begin_draining();
    drain(&proxy, connections_ended, config.shutdown_grace, hurry).await;
    readiness.abort();
    if let Some(task) = admin_task {
        task.abort();
    }
    Ok(())
}

/// One client connection (plain or TLS, the proxy's or the admin
/// listener's) into `handler`, drained on shutdown: its opening and first
/// head by `deadline`, each later head within 10 s, an HTTP/2 connection
/// idle for 10 s told to go away, an HTTP/2 answer its client takes
/// nothing of for `send_timeout` closing the connection. `stream` is a
/// [`SendTimer`] (under TLS when there is TLS): a client whose socket
/// takes nothing for `send_timeout` is cut off.
async fn serve_connection<S, H, F>(
    stream: S,
    socket: Option<std::os::fd::RawFd>,
    deadline: tokio::time::Instant,
    send_timeout: SendTimeout,
    builder: &auto::Builder<TokioExecutor>,
    drain: &Drain,
    handler: H,
) -> Option<&'static str>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let conn_activity = Arc::new(Activity::on(socket));
    let streams = conn_activity.clone();
    let handler = Arc::new(handler);
    // hyper holds a head to `MAX_HEADER_BYTES` only while it is still
    // arriving: one read whole at once on a connection whose buffer had
    // grown passed up to twice that (regression, an audit). Every request's
    // is checked here, refused as hyper refuses it, and counted so too.
    let too_large = Arc::new(AtomicBool::new(false));
    let refused = too_large.clone();
    let service = service_fn(move |request| {
        let handler = handler.clone();
        let stream = streams.stream();
        // Only a refusal touches the flag (no count per request).
        let over = crate::headers::head_over(&request, MAX_HEADER_BYTES).then(|| refused.clone());
        async move {
            if let Some(refused) = over {
                refused.store(true, Ordering::Relaxed);
                return Ok(head_too_large());
            }
            // The handler's future made here, in this one's state: made
            // outside and moved in, its 4.5 KB were copied once more per
            // request (S1 +6% instructions).
            let mut handling = std::pin::pin!(handler(request));
            let response = std::future::poll_fn(|cx| {
                let poll = || handling.as_mut().poll(cx);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(poll))
                    .unwrap_or_else(|_| std::task::Poll::Ready(panicked()))
            })
            .await;
            Ok::<_, std::convert::Infallible>(activity::answer(response, stream))
        }
    });
    // Each connection its own header-read timer (see `head_timer`).
    let mut builder = builder.clone();
    builder
        .http1()
        .timer(HeadTimer::for_connection(deadline, drain.stopping()));
    // The opening (HTTP/1 or HTTP/2?) within the head's 10 s too (see
    // `opening`); an HTTP/2 connection idle for as long is told to go away.
    let stream = Opening::new(stream, deadline, conn_activity.clone());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let watched = drain.watch(
        connection.into_owned(),
        conn_activity,
        HEADER_READ_TIMEOUT,
        send_timeout,
    );
    let ended = watched.await;
    if too_large.load(Ordering::Relaxed) {
        return Some("too_large");
    }
    let error = ended.err()?;
    tracing::debug!(error = %error, "connection ended with an error");
    refused_head(&*error)
}

/// The answer to a request whose handling panicked (a defect: none is
/// known): `500 internal_error`, where the connection was dropped without
/// a word. The panic is logged by the hook `main` sets, the request by its
/// access line (status 500).
fn panicked() -> Response<ProxyBody> {
    crate::problem::Problem::new(
        crate::problem::Code::Internal,
        "this request's handling failed unexpectedly (a defect: the log says where)",
    )
    .into_response()
}

/// hyper's own answer to a head over its bound: a bare `431`, the
/// connection closed.
fn head_too_large() -> Response<ProxyBody> {
    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    let close = http::HeaderValue::from_static("close");
    response
        .headers_mut()
        .insert(http::header::CONNECTION, close);
    response
}

/// Why hyper refused a request head itself, with a bare `400` (malformed)
/// or `431` (too large), if it did: no request reached the handler, so no
/// access line says so, and they are counted instead (regression, an
/// audit: a flood of them was invisible but at debug level).
fn refused_head(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let error = error.downcast_ref::<hyper::Error>()?;
    if error.is_parse_too_large() {
        Some("too_large")
    } else if error.is_parse() {
        Some("malformed")
    } else {
        None
    }
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Head and body copied into one buffer and sent with one `write`:
        // for small responses cheaper than queueing buffers for `writev`
        // (S1 -1.5% instructions per request; the same syscalls).
        .writev(false)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// Waits for open connections (told to finish) to end, then for
/// background exchanges, within `grace`.
async fn drain(
    proxy: &Proxy,
    connections_ended: impl Future<Output = ()>,
    grace: Duration,
    mut hurry: Option<Hurry>,
) {
    let mut deadline = tokio::time::Instant::now() + grace;
    if within(connections_ended, &mut deadline, &mut hurry)
        .await
        .is_none()
    {
        proxy
            .cut_off
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::warn!(
            "connections still open at the end of shutdown_grace: their requests are cut off (logged as 503)"
        );
    }
    proxy.exchanges.close();
    if within(proxy.exchanges.wait(), &mut deadline, &mut hurry)
        .await
        .is_none()
    {
        let held = proxy.running.named();
        // The memory store's records end with the process (regression: it
        // said they would turn unknown).
        let fate = if proxy.store.outlives_the_process() {
            "its record turns unknown when its lease ends"
        } else {
            "its record is lost with the memory store: a retry after the restart is forwarded again"
        };
        let mut running = 0;
        for (key, ended) in &held {
            match ended.as_ref().map(|record| &record.response) {
                None => {
                    running += 1;
                    tracing::warn!(
                        exchange = %key,
                        "upstream exchange still running at the end of shutdown_grace; {fate}"
                    );
                }
                Some(response) => {
                    let ended = match response {
                        Some(response) => format!("the upstream answered {}", response.status),
                        None => "its outcome is unknown".to_owned(),
                    };
                    tracing::warn!(
                        exchange = %key,
                        "{ended}, but the store had not taken its record at the end of shutdown_grace; {fate}"
                    );
                }
            }
        }
        // The rest are store writes retried in the background (a claim
        // undone, a completion) while the store does not answer.
        let pending = proxy.exchanges.len().saturating_sub(running);
        if pending > 0 {
            tracing::warn!(
                pending,
                "store writes still retried at the end of shutdown_grace (the store did not answer); their keys settle when their leases end"
            );
        }
    }
}

/// `work`'s output, unless `deadline` comes first; `hurry` completing
/// brings the deadline to now (once).
async fn within<T>(
    work: impl Future<Output = T>,
    deadline: &mut tokio::time::Instant,
    hurry: &mut Option<Hurry>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        let hurried = async {
            match hurry.as_mut() {
                Some(hurry) => hurry.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            output = &mut work => return Some(output),
            () = tokio::time::sleep_until(*deadline) => return None,
            () = hurried => {}
        }
        *hurry = None;
        *deadline = tokio::time::Instant::now();
    }
}

/// The admin listener's connections, with the proxy listener's limits: a
/// connection that sends nothing (or half a head) was held open for good,
/// and enough of them ran the process out of file descriptors, so that
/// the proxy listener could accept no client.
async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, send_timeout: SendTimeout) {
    let builder = Arc::new(connection_builder());
    let connections = Arc::new(Drain::default());
    let mut accept_errors = AcceptErrors::new("admin");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                accept_errors.back_off(&error).await;
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
        let (admin, send_timeout) = (admin.clone(), send_timeout.clone());
        let (builder, drain) = (builder.clone(), connections.clone());
        connections.spawn(async move {
            let handler = move |request| {
                let admin = admin.clone();
                async move { admin.handle(request, peer).await }
            };
            let socket = Some(std::os::fd::AsRawFd::as_raw_fd(&stream));
            let stream = SendTimer::new(stream, send_timeout.clone());
            serve_connection(
                stream,
                socket,
                deadline,
                send_timeout,
                &builder,
                &drain,
                handler,
            )
            .await;
        });
    }
}

/// A listener's failed accepts (out of file descriptors, mostly): each
/// backs off 50 ms, and they are warned of at most once a second, with how
/// many there were (regression, an audit: the proxy listener warned 20
/// times a second for as long as the descriptors ran out, without saying
/// what to do, and the admin listener said nothing, so `/metrics` and
/// `/healthz` went unreachable unexplained).
struct AcceptErrors {
    listener: &'static str,
    warned: Option<tokio::time::Instant>,
    unwarned: u64,
}

impl AcceptErrors {
    const WARN_EVERY: Duration = Duration::from_secs(1);

    fn new(listener: &'static str) -> AcceptErrors {
        AcceptErrors {
            listener,
            warned: None,
            unwarned: 0,
        }
    }

    async fn back_off(&mut self, error: &std::io::Error) {
        self.unwarned += 1;
        let now = tokio::time::Instant::now();
        if self.warned.is_none_or(|at| at + Self::WARN_EVERY <= now) {
            let hint = match error.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE) => {
                    "; this process is out of file descriptors: connections wait in the listen backlog until some close (raise its limit: ulimit -n / LimitNOFILE)"
                }
                _ => "",
            };
            tracing::warn!(
                listener = self.listener,
                error = %error,
                failed = self.unwarned,
                "accept failed (failed: how many times since the last such warning; retried every 50 ms){hint}"
            );
            self.warned = Some(now);
            self.unwarned = 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keeps `idemgate_ready` current whether or not anything calls `/readyz`.
async fn watch_readiness(proxy: Arc<Proxy>) {
    let mut tick = tokio::time::interval(READINESS_EVERY);
    loop {
        tick.tick().await;
        let ready = proxy.store.ping().await.is_ok();
        proxy.metrics.ready.set(i64::from(ready));
    }
}

/// Re-reads the configuration file on every SIGHUP.
async fn reload_on_sighup(mut hup: tokio::signal::unix::Signal, proxy: Arc<Proxy>, path: PathBuf) {
    while hup.recv().await.is_some() {
        tracing::info!(path = %path.display(), "SIGHUP: reloading configuration");
        let _ = proxy.reload_file(&path).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Regression (the panics audit): a request whose handling panicked had
    /// its connection dropped without an answer. It gets `500
    /// internal_error`, and the connection serves its next request.
    #[tokio::test]
    async fn a_request_whose_handling_panics_is_answered_500() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let send_timeout = SendTimeout {
                after: Duration::from_secs(10),
                cut_offs: Default::default(),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let handler = |request: Request<Incoming>| async move {
                assert_ne!(request.uri().path(), "/panic", "a defect under test");
                Response::new(crate::body::full("fine"))
            };
            let (builder, drain) = (connection_builder(), Drain::default());
            serve_connection(
                stream,
                None,
                deadline,
                send_timeout,
                &builder,
                &drain,
                handler,
            )
            .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let requests = "GET /panic HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        client.write_all(requests.as_bytes()).await.unwrap();
        let mut answers = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answers));
        read.await.expect("answered").unwrap();
        assert!(answers.starts_with("HTTP/1.1 500"), "{answers}");
        assert!(answers.contains("internal_error"), "{answers}");
        assert!(answers.ends_with("fine"), "{answers}");
    }
}
