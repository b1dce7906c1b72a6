//! A stand-in "legacy ERP" upstream for idemgate's quick start and demos.
//!
//! Run it with `cargo run --example erp -- --listen 127.0.0.1:9000`, then point
//! an idemgate upstream at `http://127.0.0.1:9000`. It keeps orders in memory:
//!
//! - `POST /api/orders` (JSON body) creates an order: `201` with `Location`
//! - `GET /api/orders`, `GET /api/orders/{id}`, `GET /api/reports/summary`
//! - `GET /healthz` answers `ok`
//!
//! Faults can be injected for every request (`--delay 2s`, `--fail-rate 0.3`)
//! or per request with headers: `X-Erp-Delay: 2s` (sleep first, instead of
//! `--delay`), `X-Erp-Fail: 503` (answer that status) and `X-Erp-Reset: 1`
//! (drop the connection without answering). Every request is printed as one
//! line, so a demo shows that duplicates never reach the ERP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{Value, json};
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(about = "A fake legacy ERP upstream for idemgate demos")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Delay applied to every request (e.g. 500ms, 2s).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Probability (0.0..=1.0) of answering 503 instead of handling a request.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    fail_rate: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a number between 0.0 and 1.0")),
    }
}

struct Erp {
    delay: Duration,
    fail_rate: f64,
    next_id: AtomicU64,
    orders: Mutex<HashMap<u64, Value>>,
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let ct = HeaderValue::from_static("application/json");
    resp.headers_mut().insert(CONTENT_TYPE, ct);
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": message, "status": status.as_u16() }),
    )
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(erp: Arc<Erp>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, BoxError> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let key = header(&req, "idempotency-key").unwrap_or("-").to_owned();
    let result = respond(&erp, req).await;
    let status = match &result {
        Ok(resp) => resp.status().as_u16().to_string(),
        Err(_) => "reset".to_owned(),
    };
    println!("{method} {path} idempotency-key={key} -> {status}");
    result
}

async fn respond(erp: &Erp, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, BoxError> {
    let delay = match header(&req, "x-erp-delay").map(humantime::parse_duration) {
        None => erp.delay,
        Some(Ok(d)) => d,
        Some(Err(_)) => return Ok(error(StatusCode::BAD_REQUEST, "invalid X-Erp-Delay")),
    };
    tokio::time::sleep(delay).await;
    if header(&req, "x-erp-reset") == Some("1") {
        return Err("connection reset requested by X-Erp-Reset".into());
    }
    if let Some(fail) = header(&req, "x-erp-fail") {
        return Ok(match fail.parse::<u16>().map(StatusCode::from_u16) {
            Ok(Ok(status)) => error(status, "failure requested by X-Erp-Fail"),
            _ => error(StatusCode::BAD_REQUEST, "invalid X-Erp-Fail"),
        });
    }
    if erp.fail_rate > 0.0 && fastrand::f64() < erp.fail_rate {
        return Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ERP temporarily unavailable",
        ));
    }

    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Ok(match (method, segments.as_slice()) {
        (Method::GET, ["healthz"]) => Response::new(Full::new(Bytes::from_static(b"ok"))),
        (Method::POST, ["api", "orders"]) => {
            let body = req.into_body().collect().await?.to_bytes();
            let Ok(order) = serde_json::from_slice::<Value>(&body) else {
                return Ok(error(StatusCode::BAD_REQUEST, "body is not valid JSON"));
            };
            let id = erp.next_id.fetch_add(1, Ordering::SeqCst) + 1;
            let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
            let created = json!({ "id": id, "order": order, "created_at": millis.to_string() });
            erp.orders.lock().unwrap().insert(id, created.clone());
            let mut resp = json_response(StatusCode::CREATED, &created);
            let location = HeaderValue::from_str(&format!("/api/orders/{id}"))?;
            resp.headers_mut().insert(LOCATION, location);
            resp
        }
        (Method::GET, ["api", "orders"]) => {
            let orders = erp.orders.lock().unwrap();
            let mut all: Vec<(&u64, &Value)> = orders.iter().collect();
            all.sort_by_key(|(id, _)| **id);
            let list: Vec<&Value> = all.into_iter().map(|(_, order)| order).collect();
            json_response(StatusCode::OK, &json!(list))
        }
        (Method::GET, ["api", "orders", id]) => {
            let order = id
                .parse::<u64>()
                .ok()
                .and_then(|id| erp.orders.lock().unwrap().get(&id).cloned());
            match order {
                Some(order) => json_response(StatusCode::OK, &order),
                None => error(StatusCode::NOT_FOUND, "no such order"),
            }
        }
        (Method::GET, ["api", "reports", "summary"]) => {
            let count = erp.orders.lock().unwrap().len();
            json_response(StatusCode::OK, &json!({ "orders": count }))
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    println!("erp: listening on http://{}", listener.local_addr()?);
    let erp = Arc::new(Erp {
        delay: args.delay,
        fail_rate: args.fail_rate,
        next_id: AtomicU64::new(0),
        orders: Mutex::new(HashMap::new()),
    });
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    eprintln!("erp: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => {
                println!("erp: shutting down");
                return Ok(());
            }
        };
        let erp = erp.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(erp.clone(), req));
            let builder = Builder::new(TokioExecutor::new());
            if let Err(err) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("erp: connection closed: {err}");
            }
        });
    }
}
