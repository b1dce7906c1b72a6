//! A real HTTP upstream on port 0 whose behaviour each request picks with
//! `x-test-*` headers: delay, status, body size, echo, reset (before the
//! answer, or in its body), a slow body after a prompt head.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Default)]
pub struct Seen {
    /// Requests that reached the upstream.
    pub hits: AtomicUsize,
    /// Requests that it finished answering.
    pub answered: AtomicUsize,
    /// Head of every request received, in order.
    pub heads: Mutex<Vec<(String, HeaderMap)>>,
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        TestUpstream::start_with(None).await
    }

    /// An HTTPS upstream with this server config.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> TestUpstream {
        TestUpstream::start_with(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let state = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, tls) = (state.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(state.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            // A failed handshake (e.g. no client certificate) just closes.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        TestUpstream { addr, seen, task }
    }

    pub fn hits(&self) -> usize {
        self.seen.hits.load(Ordering::SeqCst)
    }

    pub fn answered(&self) -> usize {
        self.seen.answered.load(Ordering::SeqCst)
    }

    /// Headers of the last request that reached the upstream.
    pub fn last_headers(&self) -> HeaderMap {
        self.last().1
    }

    pub fn last_uri(&self) -> String {
        self.last().0
    }

    fn last(&self) -> (String, HeaderMap) {
        let heads = self.seen.heads.lock().unwrap();
        heads
            .last()
            .expect("a request reached the upstream")
            .clone()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn answer(seen: Arc<Seen>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    let hit = seen.hits.fetch_add(1, Ordering::SeqCst) + 1;
    seen.heads
        .lock()
        .unwrap()
        .push((req.uri().to_string(), req.headers().clone()));
    let delay = header(&req, "x-test-delay-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let status: u16 = header(&req, "x-test-status")
        .and_then(|v| v.parse().ok())
        .unwrap_or(201);
    let body_bytes: Option<usize> = header(&req, "x-test-body-bytes").and_then(|v| v.parse().ok());
    let reset = header(&req, "x-test-reset").is_some();
    let reset_mid_body = header(&req, "x-test-reset-mid-body").is_some();
    let break_body_after: Option<u64> =
        header(&req, "x-test-break-body-after-ms").and_then(|v| v.parse().ok());
    // The head goes out at once, the (whole, usual) body only this much later.
    let slow_body: Option<u64> = header(&req, "x-test-slow-body-ms").and_then(|v| v.parse().ok());
    let echo = header(&req, "x-test-echo").is_some();
    let hop = header(&req, "x-test-hop").is_some();
    // An upstream that sets idemgate's own header on a first answer.
    let says_replayed = header(&req, "x-test-says-replayed").is_some();
    if echo {
        // Streams the request body straight back.
        let body = req.into_body().map_err(std::io::Error::other).boxed();
        seen.answered.fetch_add(1, Ordering::SeqCst);
        return Ok(Response::builder().status(200).body(body).unwrap());
    }
    let method = req.method().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if reset {
        // Drop the connection without an answer: the upstream may have acted.
        return Err(std::io::Error::other("reset by test"));
    }
    let mut response = Response::builder()
        .status(status)
        .header("x-upstream-hit", hit.to_string())
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2");
    if says_replayed {
        response = response.header("idempotent-replayed", "true");
    }
    if hop {
        response = response
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5");
    }
    let body: Body = if let Some(ms) = break_body_after {
        // The head and a first chunk go out (and arrive) before the
        // connection breaks off in the middle of the (chunked) body.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"partial"))))
                .await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = tx.send(Err(std::io::Error::other("broken by test"))).await;
        });
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
    } else if let (true, Some(n)) = (reset_mid_body, body_bytes) {
        // `n` bytes of the declared 100000 go out (and arrive), then the
        // connection breaks off.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(vec![b'x'; n].into()))).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err(std::io::Error::other("broken by test"))).await;
        });
        response = response.header("content-length", "100000");
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
    } else if reset_mid_body {
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
            vec![Ok(Frame::data(Bytes::from_static(b"partial")))];
        let stream = futures_lite_stream(chunks);
        response = response.header("content-length", "100000");
        StreamBody::new(stream)
            .map_err(|never| match never {})
            .boxed()
    } else {
        let bytes = if let Some(n) = body_bytes {
            Bytes::from(vec![b'x'; n])
        } else {
            let json = serde_json::json!({ "hit": hit, "method": method, "body_len": body.len() });
            response = response.header("content-type", "application/json");
            Bytes::from(json.to_string())
        };
        match slow_body {
            Some(ms) => {
                // No content-length: the head is sent (chunked) at once,
                // the body in one chunk after `ms`, then the end.
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = tx.send(Ok(Frame::data(bytes))).await;
                });
                StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
            }
            None => Full::new(bytes).map_err(|never| match never {}).boxed(),
        }
    };
    seen.answered.fetch_add(1, Ordering::SeqCst);
    Ok(response.body(body).unwrap())
}

/// A stream of the given frames, then the end; with a declared
/// content-length longer than the data, the client sees a broken body.
fn futures_lite_stream(
    frames: Vec<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    tokio_stream::iter(frames)
}
