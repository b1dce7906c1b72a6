//! The accept loop: HTTP/1.1 and HTTP/2 (cleartext) connections into `Proxy::handle`,
//! and a graceful stop that lets in-flight exchanges finish and be recorded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::{Backend, Config};
use crate::proxy::Proxy;
use crate::store::Store;

/// A request head must arrive whole within this time...
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// ...and stay within this size.
const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Serves `config` on `listener` until `shutdown` completes, then drains:
/// connections and background exchanges get `shutdown_grace` to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    if config.store.backend == Backend::Memory {
        tracing::warn!(
            "store backend is memory: idempotency records live in this process only and do not survive a restart"
        );
    }
    let store = Arc::new(Store::open(&config.store)?);
    let proxy = Arc::new(Proxy::new(&config, store));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let service = service_fn(move |request| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(proxy.handle(request, peer).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(error = %error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(grace = ?grace, "shutting down: no new connections, draining in-flight requests");
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the end of shutdown_grace");
    }
    proxy.exchanges.close();
    if tokio::time::timeout_at(deadline, proxy.exchanges.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = proxy.exchanges.len(),
            "upstream exchanges still running at the end of shutdown_grace; their records turn unknown when their leases end"
        );
    }
    Ok(())
}
