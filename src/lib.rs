//! idemgate: an idempotency-enforcing HTTP reverse proxy.
//!
//! Modules in the order a request travels:
//!
//! - [`server`]: `run(config, listener, shutdown)`, the accept loop and graceful stop.
//! - [`proxy`]: `Proxy::handle`, the life of a request, and plain pass-through.
//! - [`path`]: request paths made normal before routing (no route side-stepped).
//! - [`route`]: the route table (first match wins).
//! - [`gate`]: the protected path: key, fingerprint, claim, replay / reject / forward.
//! - [`idempotency`]: the pure parts: key, fingerprint, record, decision table.
//! - [`store`]: memory and Redis backends, the only code that talks to a store.
//! - [`exchange`]: a protected request's upstream exchange, recorded in the background.
//! - [`upstream`]: pooled client per upstream and URL joining.
//! - [`headers`]: hop-by-hop removal, forwarding headers, request and trace ids.
//! - [`problem`]: every response idemgate itself makes (problem+json codes).
//! - [`body`]: the body type and bounded readers.
//! - [`linger`]: an HTTP/1 request body its answer left unread, discarded in the background.
//! - [`stream_end`]: an HTTP/2 request body that ends only where its stream did.
//! - [`config`]: the YAML file → validated `Config`.
//! - [`cli`]: the command line.

pub mod activity;
pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod drain;
pub mod exchange;
pub mod gate;
pub mod head_timer;
pub mod headers;
pub mod idempotency;
pub mod keys;
pub mod linger;
pub mod metrics;
pub mod opening;
pub mod path;
pub mod problem;
pub mod proxy;
pub mod route;
pub mod running;
pub mod send_timer;
pub mod server;
pub mod store;
pub mod stream_end;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::run;
