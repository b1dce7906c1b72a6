//! Keep-alive HTTP/1.1 connections to one upstream, driven by the task that
//! uses them: a request and its response body poll the connection
//! themselves, so there is no connection task and no channel hop per request.

use std::future::{Future, poll_fn};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::SendError;
use crate::body::ProxyBody;

/// How often idle connections are checked for expiry and for a close by
/// the upstream (at most; sooner for a shorter `idle_timeout`).
const REAP_EVERY: Duration = Duration::from_secs(5);

/// A connection idle this long is asked of its socket before any request
/// goes out on it ([`Conn::closed_by_peer`]): an upstream's own keep-alive
/// timeout (2 s for gunicorn, 5 s for Node and Apache, 75 s for nginx)
/// closes it at about the moment it is reused. Under load connections are
/// idle for microseconds and skip the system call.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(100);

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// One connection: the handle that sends requests and the state machine
/// that does its I/O whenever it is polled. Kept boxed: it is a few KB (TLS
/// state, buffers) and moves between the pool, a request and its body.
struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    driver: http1::Connection<Io, ProxyBody>,
    /// The TCP socket under it (TLS or not), for [`Conn::closed_by_peer`].
    fd: RawFd,
}

impl Conn {
    /// Moves the connection's I/O along; false once the connection has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(&mut self.driver).poll(cx).is_pending()
    }

    /// Whether the connection is open and idle, ready for a request.
    fn ready(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Whether the upstream has closed this idle connection (or written to
    /// it unasked, as a server does with a `408` before it closes), asked of
    /// the socket itself: tokio hears of a close only when its I/O driver
    /// next polls, which on a busy worker can be after the connection has
    /// been taken for the next request. A request written to it then met a
    /// reset, and a protected key turned `unknown` for a request the
    /// upstream never saw (regression: an upstream that closes after each
    /// answer without `Connection: close`).
    fn closed_by_peer(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: `fd` is this connection's open socket (closed only when
        // `driver` is dropped); a one-byte peek that does not block.
        let read = unsafe {
            libc::recv(
                self.fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        read >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/` of the upstream, what the connector dials.
    target: Uri,
    /// Bounds TCP connect and TLS handshake together (SPEC.md 4.4, 9).
    connect_timeout: Duration,
    /// How long an unused connection is kept for reuse.
    idle_timeout: Duration,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
    reaping: AtomicBool,
}

impl Pool {
    /// Connections to `target` (`scheme://authority/`): TCP, then TLS with
    /// `tls` for `https://` (HTTP/1.1 by ALPN), both within `connect_timeout`.
    pub fn new(
        target: Uri,
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> Arc<Pool> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        Arc::new(Pool {
            connector,
            target,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            reaping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (origin-form URI, Host set) on an idle connection or
    /// a new one. A request goes out again only when hyper hands it back
    /// unsent, which happens when a pooled connection turned out to be closed.
    #[cfg(test)]
    pub async fn send(
        self: &Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        self.send_noting(request, &super::Connected::default())
            .await
    }

    /// [`Pool::send`], noting in `connected` when it had a new connection to
    /// send on (not for a pooled one, ready at once): where the response
    /// timeout starts.
    pub async fn send_noting(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
        connected: &super::Connected,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            // A request the upstream may act on (not a GET, or protected)
            // never goes out on a connection the upstream has closed:
            // the socket is asked (a system call). A safe method skips it
            // (S1's path) unless the connection has been idle for
            // `PEEK_AFTER_IDLE`: a connection closed in the microseconds
            // before its reuse then costs a `502`, which its client may retry.
            let careful = connected.is_protected() || !request.method().is_safe();
            let (mut conn, reused) = match self.checkout(careful) {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its future is large.
                None => {
                    connected.making();
                    let conn = Box::pin(self.connect()).await?;
                    connected.ready();
                    (conn, false)
                }
            };
            let mut response = pin!(conn.sender.try_send_request(request));
            let mut open = true;
            let result = poll_fn(|cx| {
                if open {
                    open = conn.drive(cx);
                }
                response.as_mut().poll(cx)
            })
            .await;
            match result {
                // Nothing asked it to (Upgrade is never forwarded): what
                // follows is not HTTP, and no final answer will come.
                Ok(response) if response.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    return Err(SendError::Broken(
                        "the upstream switched protocols unasked (101)".into(),
                    ));
                }
                // RFC 9110 15: outside 100-599 a status is invalid, and its
                // meaning unknown (regression, an audit: `600` was passed on,
                // and recorded and replayed as a protected key's outcome).
                Ok(response) if response.status().as_u16() > 599 => {
                    return Err(SendError::Broken(format!(
                        "the upstream answered with status {}, outside 100-599",
                        response.status().as_u16()
                    )));
                }
                Ok(response) => {
                    // An answer before the whole body: the upstream may not
                    // read the rest as this request's (regression, an
                    // audit: a client paused its body until after the
                    // answer, then sent a request as the body; the pooled
                    // connection gave that request's answer to another
                    // client, whose protected key stored and replayed it).
                    // The body still goes out whole, as the upstream may
                    // be reading it, but the connection is then closed.
                    let pool = match connected.sent_whole() {
                        true => Arc::downgrade(self),
                        false => Weak::new(),
                    };
                    let checkout = open.then(|| Checkout { conn, pool });
                    return Ok(response.map(|body| UpstreamBody {
                        body,
                        conn: checkout,
                        streamed: None,
                    }));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    Some(_) => return Err(SendError::connect(&error.into_error())),
                    None => return Err(SendError::after_send(&error.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open, asked of
    /// its socket too when `careful` or idle for [`PEEK_AFTER_IDLE`]
    /// ([`Conn::closed_by_peer`]).
    fn checkout(&self, careful: bool) -> Option<Box<Conn>> {
        loop {
            let Idle { mut conn, since } = self.idle.lock().expect("pool lock").pop()?;
            let idle = since.elapsed();
            if idle < self.idle_timeout
                && conn.ready()
                && !((careful || idle >= PEEK_AFTER_IDLE) && conn.closed_by_peer())
            {
                return Some(conn);
            }
        }
    }

    /// A new connection within `connect_timeout`, TLS handshake included:
    /// an upstream that accepts TCP and then stalls the handshake has seen
    /// no request, so running out of time is a connect failure (never a
    /// response timeout, which would make the key `unknown`). The TCP
    /// connector keeps its own timeout too: it splits the time between the
    /// addresses of a name, so one dead address does not use it all.
    async fn connect(&self) -> Result<Box<Conn>, SendError> {
        match tokio::time::timeout(self.connect_timeout, self.establish()).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Connect(format!(
                "no connection within connect_timeout ({:?})",
                self.connect_timeout
            ))),
        }
    }

    async fn establish(&self) -> Result<Box<Conn>, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| SendError::connect(&*e))?;
        let io = connector
            .call(self.target.clone())
            .await
            .map_err(|e| SendError::connect(&*e))?;
        let fd = match &io {
            MaybeHttpsStream::Http(tcp) => tcp.inner().as_raw_fd(),
            MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner().as_raw_fd(),
        };
        let (sender, driver) = http1::Builder::new()
            // One buffer, one `write` (see `server::connection_builder`).
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| SendError::connect(&e))?;
        Ok(Box::new(Conn { sender, driver, fd }))
    }

    fn put(self: &Arc<Self>, conn: Box<Conn>) {
        if conn.sender.is_closed() {
            return;
        }
        let since = Instant::now();
        self.idle
            .lock()
            .expect("pool lock")
            .push(Idle { conn, since });
        self.start_reaper();
    }

    /// A task that closes expired idle connections and drops those the
    /// upstream closed, until the pool is gone (after a reload).
    fn start_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = REAP_EVERY.min(self.idle_timeout);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let mut cx = Context::from_waker(Waker::noop());
                pool.idle.lock().expect("pool lock").retain_mut(|idle| {
                    idle.since.elapsed() < pool.idle_timeout && idle.conn.drive(&mut cx)
                });
            }
        });
    }

    /// Idle connections right now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

/// A connection lent to one exchange, on its way back to the pool.
struct Checkout {
    conn: Box<Conn>,
    /// Where it goes back to; none for a connection not to be reused.
    pool: Weak<Pool>,
}

/// An upstream response body. Polling it also drives its connection, which
/// goes back to the pool once the body has been read to its end; a body
/// dropped before its end closes the connection.
pub struct UpstreamBody {
    body: Incoming,
    conn: Option<Checkout>,
    /// The bulkhead slot and the breaker's verdict, given up at the body's
    /// end (streamed bodies only).
    streamed: Option<super::Streamed>,
}

impl UpstreamBody {
    /// Has this body hold its request's bulkhead slot and tell the breaker
    /// how it ended (see [`super::Streamed`]).
    pub fn streamed(&mut self, streamed: super::Streamed) {
        self.streamed = Some(streamed);
    }

    /// The body broke off on this side (the upstream went quiet too long):
    /// a failure for the breaker, the connection closed.
    pub fn give_up(&mut self) {
        self.conn = None;
        if let Some(streamed) = self.streamed.take() {
            streamed.end(false);
        }
    }

    /// Gives the connection back at the response's end. An upstream may
    /// answer before it has read the whole request body: the connection is
    /// then driven in the background until the body is all sent, and only
    /// then pooled (regression: pooled at once, nothing drove it, the
    /// upload stalled, and the next checkout found it busy and dropped it,
    /// cutting the upload off).
    fn release(&mut self) {
        let Some(Checkout { mut conn, pool }) = self.conn.take() else {
            return;
        };
        // Usually the connection has asked for its next request already
        // (one atomic load); else it is driven once to see.
        if conn.sender.is_ready() || conn.ready() {
            if let Some(pool) = pool.upgrade() {
                pool.put(conn);
            }
            return;
        }
        tokio::spawn(async move {
            let sent = poll_fn(|cx| {
                if !conn.drive(cx) {
                    return Poll::Ready(false);
                }
                conn.sender.poll_ready(cx).map(|ready| ready.is_ok())
            })
            .await;
            if sent && let Some(pool) = pool.upgrade() {
                pool.put(conn);
            }
        });
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // What the connection has read already is taken first; the
        // connection is driven only when the body waits for more. A small
        // answer is whole before its body is polled, and its connection
        // idle again: driving it once more found nothing to do (S1 -2%
        // instructions).
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending()
            && let Some(checkout) = &mut this.conn
        {
            if !checkout.conn.drive(cx) {
                this.conn = None;
            }
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        let frame = ready!(polled);
        let whole = match &frame {
            Some(Err(_)) => {
                this.conn = None;
                Some(false)
            }
            _ if frame.is_none() || this.body.is_end_stream() => {
                this.release();
                Some(true)
            }
            _ => None,
        };
        if let Some(whole) = whole
            && let Some(streamed) = this.streamed.take()
        {
            streamed.end(whole);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    /// Servers stop polling a body whose size says it is complete.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
