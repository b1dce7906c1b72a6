//! The floor of a hyper 1 reverse proxy, for `bench/instructions`: what
//! hyper, tokio and the allocator cost per request with none of
//! idemgate's work (no routing, no header rewriting, no timeouts, no
//! metrics, no logging). Not a product: it forwards every request to the
//! one upstream on pooled HTTP/1.1 connections, as idemgate does, on the
//! same single-threaded runtime and allocator.
//!
//! It takes idemgate's command line as `bench/instructions` gives it
//! (`--log-level L serve --config FILE`) and reads `listen:` and the first
//! `url:` of that file.
//!
//! ```sh
//! bench/instructions idemgate=target/release/idemgate bare=target/release/examples/bare_proxy
//! ```
//!
//! `BARE_SPIN_NS=N` makes it spin N ns of CPU per request: a proxy as
//! costly per request as idemgate, for asking whether a latency figure is
//! the cost per request or something else (bench/PROFILE.md, 22nd round).

use std::cell::RefCell;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Pool = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("--config FILE");
    let text = std::fs::read_to_string(config).expect("a readable config");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("no {name} in the config"))
    };
    let listen = value("listen:");
    let upstream = value("url:")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(listen, upstream));
}

async fn serve(listen: String, upstream: String) {
    let listener = TcpListener::bind(&listen).await.expect("listen");
    let upstream: Rc<str> = upstream.into();
    let pool: Pool = Rc::default();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (pool, upstream) = (pool.clone(), upstream.clone());
        tokio::task::spawn_local(async move {
            let service =
                service_fn(move |request| forward(request, pool.clone(), upstream.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    mut request: Request<Incoming>,
    pool: Pool,
    upstream: Rc<str>,
) -> Result<Response<Pooled>, Infallible> {
    *request.uri_mut() = request
        .uri()
        .path_and_query()
        .map_or("/".parse().expect("a path"), |p| {
            p.as_str().parse().expect("a path")
        });
    spin();
    let mut sender = checkout(&pool, &upstream).await;
    let response = sender
        .send_request(request)
        .await
        .expect("an upstream answer");
    Ok(response.map(|body| Pooled {
        body,
        sender: Some(sender),
        pool,
    }))
}

/// Busy for `BARE_SPIN_NS` nanoseconds (0 when unset).
fn spin() {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    let spin = *SPIN.get_or_init(|| {
        let ns = std::env::var("BARE_SPIN_NS")
            .ok()
            .and_then(|v| v.parse().ok());
        std::time::Duration::from_nanos(ns.unwrap_or(0))
    });
    if !spin.is_zero() {
        let start = std::time::Instant::now();
        while start.elapsed() < spin {
            std::hint::spin_loop();
        }
    }
}

/// The upstream's answer; its connection back to the pool at the end.
struct Pooled {
    body: Incoming,
    sender: Option<SendRequest<Incoming>>,
    pool: Pool,
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if (this.body.is_end_stream() || matches!(frame, Poll::Ready(None)))
            && let Some(sender) = this.sender.take()
        {
            this.pool.borrow_mut().push(sender);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

async fn checkout(pool: &Pool, upstream: &str) -> SendRequest<Incoming> {
    loop {
        let Some(mut sender) = pool.borrow_mut().pop() else {
            break;
        };
        if sender.ready().await.is_ok() {
            return sender;
        }
    }
    let stream = TcpStream::connect(upstream).await.expect("the upstream");
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("a handshake");
    tokio::task::spawn_local(connection);
    sender
}
