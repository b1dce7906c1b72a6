//! The fast upstream for idemgate's benchmark harness (`bench/run`).
//!
//! A tiny HTTP/1.1 server that answers every request with a small, constant
//! JSON body (`200` for GET and the like, `201` for POST, after reading the
//! request body in full). It counts the requests it served, so the S4
//! scenario can show how many duplicates reached it:
//!
//! - `GET /__count` answers the count as `{"count":N}` (not counted itself);
//! - `POST /__reset` sets it back to zero (not counted).
//!
//! A delay can be applied to every request (`--delay 200ms`) or per request
//! with `X-Bench-Delay-Ms: 200`. It runs on one thread by default (the
//! harness pins it to one core); `--threads N` uses a multi-thread runtime.
//!
//! ```sh
//! cargo run --release --example bench_upstream -- --listen 127.0.0.1:9100
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = br#"{"status":"ok","service":"bench-upstream","items":[1,2,3]}"#;

#[derive(Parser, Debug)]
#[command(about = "Fast upstream for idemgate benchmarks")]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Delay applied to every counted request (e.g. 200ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Worker threads; 1 runs a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct State {
    delay: Duration,
    count: AtomicU64,
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let ct = HeaderValue::from_static("application/json");
    resp.headers_mut().insert(CONTENT_TYPE, ct);
    resp
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/__count") => {
            let n = state.count.load(Ordering::SeqCst);
            return Ok(json(
                StatusCode::OK,
                Bytes::from(format!("{{\"count\":{n}}}")),
            ));
        }
        (&Method::POST, "/__reset") => {
            state.count.store(0, Ordering::SeqCst);
            return Ok(json(StatusCode::OK, Bytes::from_static(b"{\"count\":0}")));
        }
        _ => {}
    }
    state.count.fetch_add(1, Ordering::SeqCst);
    let delay = req
        .headers()
        .get("x-bench-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(state.delay);
    let status = if req.method() == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    // Read the request body in full, as a real API would.
    let _ = req.into_body().collect().await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(json(status, Bytes::from_static(BODY)))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    println!(
        "bench_upstream: listening on http://{}",
        listener.local_addr()?
    );
    let state = Arc::new(State {
        delay: args.delay,
        count: AtomicU64::new(0),
    });
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    eprintln!("bench_upstream: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            // Connection errors (a client going away) are normal under load.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(args))
}
