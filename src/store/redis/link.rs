//! The connection to Redis: one standalone server (a reconnecting
//! `ConnectionManager`) or a Redis Cluster (`ClusterConnection`, made on
//! first use, made anew when the cluster's masters change: `watch.rs`),
//! behind one `ConnectionLike` handle.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, TlsCertificates, Value};
use tokio::time::Instant;

use super::watch;
use crate::store::StoreError;

pub enum Link {
    Single(Arc<SingleLink>),
    Cluster(Arc<ClusterLink>),
}

/// A standalone server's reconnecting connection, made anew after a failed
/// authentication: `ConnectionManager` reconnects after an I/O error only,
/// and kept a failed `AUTH` (a rotated password, an ACL user created after
/// the proxy started) for good, every call failing with it though the
/// password had been put right (regression, an audit: `503
/// store_unavailable` until a restart).
pub struct SingleLink {
    client: redis::Client,
    config: ConnectionManagerConfig,
    conn: ArcSwap<ConnectionManager>,
}

impl SingleLink {
    fn manager(
        client: &redis::Client,
        config: &ConnectionManagerConfig,
    ) -> redis::RedisResult<ConnectionManager> {
        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
    }

    fn handle(self: &Arc<Self>) -> SingleHandle {
        SingleHandle {
            current: self.conn.load_full(),
            link: self.clone(),
            deadline: None,
        }
    }

    /// Replaces `failed` with a new connection (made by the next call),
    /// unless another call did: one new attempt per failed one, as
    /// `ConnectionManager` does after an I/O error.
    fn renew(&self, failed: &Arc<ConnectionManager>) {
        if let Ok(fresh) = Self::manager(&self.client, &self.config) {
            self.conn.compare_and_swap(failed, Arc::new(fresh));
        }
    }
}

/// One call's connection to a standalone server, and where it came from.
#[derive(Clone)]
pub struct SingleHandle {
    current: Arc<ConnectionManager>,
    link: Arc<SingleLink>,
    /// The call's deadline ([`Handle::until`]), within which a command
    /// told of an earlier failed reconnect is sent again.
    deadline: Option<Instant>,
}

/// How long before the call's deadline a command sent again gives up, so
/// that it ends as never sent rather than at the deadline (a timeout there
/// may have landed, and a claim is then undone in the background).
const AGAIN_MARGIN: Duration = Duration::from_millis(2);

impl SingleHandle {
    /// Sends with `send`, once more on the renewed connection when the
    /// connection dropped (see `ConnectionLike for Handle`), and once more,
    /// within the call's deadline, when `ConnectionManager` answered with
    /// an earlier reconnect's failure: it hands a reconnect that failed
    /// (Redis down, or hung, then) to the next command, which never reached
    /// Redis, and only then reconnects (regression, a review: a call made
    /// after Redis was back failed at once: `503`, or forwarded unprotected
    /// under `on_unavailable: forward`).
    async fn send<'a, T, F, Fut>(&'a self, send: F) -> redis::RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + 'a,
    {
        let result = match send(self.conn()).await {
            Err(e) if e.is_connection_dropped() => send(self.conn())
                .await
                .map_err(|again| sent_maybe(e, again)),
            Err(e) if reconnect_failed(&e) => {
                let until = self.deadline.and_then(|d| d.checked_sub(AGAIN_MARGIN));
                match until.filter(|until| *until > Instant::now()) {
                    Some(until) => {
                        (tokio::time::timeout_at(until, send(self.conn())).await).unwrap_or(Err(e))
                    }
                    None => Err(e),
                }
            }
            result => result,
        };
        self.renewed(result)
    }

    /// The connection to send on (`ConnectionManager` sends through `&mut`).
    fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.current)
    }

    /// `result`, after renewing the connection when it failed to authenticate.
    fn renewed<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result
            && e.kind() == redis::ErrorKind::AuthenticationFailed
        {
            self.link.renew(&self.current);
        }
        result
    }
}

pub struct ClusterLink {
    client: ClusterClient,
    /// The seeds one by one, for the watch on the cluster's masters.
    seeds: Vec<redis::Client>,
    op_timeout: Duration,
    /// Made on first use; the cluster connection then follows slot moves
    /// and reconnects by itself, but not a failover away from a master
    /// that hangs: the watch makes it anew then ([`ClusterLink::remake`]).
    conn: ArcSwapOption<ClusterConnection>,
    /// Held while the first connection is made: one attempt at a time.
    making: tokio::sync::Mutex<()>,
}

impl ClusterLink {
    fn current(&self) -> Option<ClusterConnection> {
        self.conn.load().as_deref().cloned()
    }

    /// Makes the first connection, unless another call made it meanwhile,
    /// and starts the watch on the cluster's masters.
    async fn make(self: Arc<Self>) -> redis::RedisResult<ClusterConnection> {
        let _one = self.making.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let conn = self.client.get_async_connection().await?;
        self.conn.store(Some(Arc::new(conn.clone())));
        let bound = self.op_timeout.max(Duration::from_secs(1));
        watch::start(Arc::downgrade(&self), self.seeds.clone(), bound);
        Ok(conn)
    }

    /// Makes the connection anew (it reads the slots again) and swaps it in;
    /// calls holding the old one finish on it, which ends with its last clone.
    pub(super) async fn remake(&self) -> redis::RedisResult<()> {
        let conn = self.client.get_async_connection().await?;
        self.conn.store(Some(Arc::new(conn)));
        Ok(())
    }
}

/// A cheap clone of the connection for one call.
#[derive(Clone)]
pub enum Handle {
    Single(SingleHandle),
    Cluster(ClusterConnection),
}

impl Link {
    /// Connects lazily: the proxy starts (and answers per `on_unavailable`)
    /// while Redis is down.
    pub fn single(client: redis::Client, op_timeout: Duration) -> Result<Link, StoreError> {
        // No response timeout here: every call is already bounded by
        // `op_timeout` in the store (one timer per call, not two).
        // One connection attempt per call that needs one, no retries
        // inside it: a call then fails with the reason (refused,
        // authentication failed) instead of waiting out `op_timeout` on
        // retries and saying only that it timed out (regression: a wrong
        // password was logged as "store operation timed out" per request).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(None)
            .set_number_of_retries(0)
            .set_max_delay(Duration::from_secs(2));
        let conn = SingleLink::manager(&client, &config)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Link::Single(Arc::new(SingleLink {
            client,
            config,
            conn: ArcSwap::from_pointee(conn),
        })))
    }

    pub fn cluster(
        urls: &[String],
        tls: Option<TlsCertificates>,
        op_timeout: Duration,
    ) -> Result<Link, StoreError> {
        // The error text of a bad URL may echo it, password included: keep it generic.
        let invalid = |_| StoreError::Backend("store.cluster holds an invalid Redis URL".into());
        let seeds = urls
            .iter()
            .map(|url| client(url, tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let mut builder = ClusterClient::builder(urls.to_vec())
            .connection_timeout(op_timeout)
            .response_timeout(op_timeout);
        // As for one server, only for `rediss://` seeds: given for
        // `redis://` ones, the cluster client spoke TLS to them, which the
        // configuration check said was ignored (regression, the Redis
        // deployments audit).
        if let Some(certs) = tls.filter(|_| urls.iter().any(|u| u.starts_with("rediss://"))) {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(invalid)?;
        Ok(Link::Cluster(Arc::new(ClusterLink {
            client,
            seeds,
            op_timeout,
            conn: ArcSwapOption::empty(),
            making: tokio::sync::Mutex::new(()),
        })))
    }

    /// The connection for one call when it needs no waiting (always for a
    /// standalone server; for a cluster once its connection is made).
    pub fn ready_handle(&self) -> Option<Handle> {
        match self {
            Link::Single(link) => Some(Handle::Single(link.handle())),
            Link::Cluster(cluster) => cluster.current().map(Handle::Cluster),
        }
    }

    /// The connection for one call (the cluster's is made on first use).
    /// A cluster's is made in a task of its own, which the call waits for:
    /// making it asks every seed, and one that accepts connections and
    /// never answers holds it for a few `op_timeout`s. Made within the
    /// call, every call's own deadline cut it short, and it was never made
    /// (regression, found by an audit: a process started while one seed
    /// hung answered `503 store_unavailable` to every request, the cluster
    /// healthy). At most one attempt runs at a time; a failed one is tried
    /// again by the next call.
    pub async fn handle(&self) -> redis::RedisResult<Handle> {
        match self {
            Link::Single(link) => Ok(Handle::Single(link.handle())),
            Link::Cluster(cluster) => {
                if let Some(conn) = cluster.current() {
                    return Ok(Handle::Cluster(conn));
                }
                match tokio::spawn(cluster.clone().make()).await {
                    Ok(conn) => Ok(Handle::Cluster(conn?)),
                    Err(_) => Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "the cluster connection's setup ended without one",
                    ))),
                }
            }
        }
    }
}

/// A client for one Redis URL: with `store.tls`'s certificates for a
/// `rediss://` one; they are ignored, with a warning from the configuration
/// check, for `redis://` (regression, an audit: `check` said so, and
/// `serve` refused the `redis://` URL).
pub fn client(url: &str, tls: Option<&TlsCertificates>) -> redis::RedisResult<redis::Client> {
    match tls {
        Some(certs) if url.starts_with("rediss://") => {
            redis::Client::build_with_tls(url, certs.clone())
        }
        _ => redis::Client::open(url),
    }
}

impl Handle {
    /// This handle for a call that ends at `deadline`.
    pub fn until(mut self, deadline: Instant) -> Handle {
        if let Handle::Single(h) = &mut self {
            h.deadline = Some(deadline);
        }
        self
    }

    /// The nodes to SCAN: none named for a standalone server; a cluster's
    /// masters holding slots, with the slots each holds, to be compared
    /// after the SCAN. A master that failed and still holds its slots is
    /// among them, so that the listing fails rather than leave its records
    /// out (regression, the cluster operations audit: a `200` without a
    /// failed master's records).
    pub async fn scan_targets(&mut self) -> redis::RedisResult<ScanTargets> {
        match self {
            Handle::Single(_) => Ok(ScanTargets::default()),
            Handle::Cluster(conn) => {
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
                Ok(ScanTargets(watch::slots_held(&nodes)))
            }
        }
    }

    /// PINGs the server, or every master of a cluster that holds slots,
    /// a failed one too: a cluster's own PING goes only to the masters its
    /// connection still reaches, and `/readyz` said ready while a dead
    /// master's slots refused every claim (regression, the Redis
    /// deployments audit).
    pub async fn ping(&mut self) -> redis::RedisResult<()> {
        let Handle::Cluster(conn) = self else {
            let _: String = redis::cmd("PING").query_async(self).await?;
            return Ok(());
        };
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
        for address in watch::slot_masters(&nodes) {
            if let Err(e) = conn
                .route_command(redis::cmd("PING"), to_node(&address))
                .await
            {
                let detail = format!("the master at {address}, which holds slots: {e}");
                return Err((
                    redis::ErrorKind::Io,
                    "a Redis Cluster master does not answer",
                    detail,
                )
                    .into());
            }
        }
        Ok(())
    }

    /// One SCAN step on one node.
    pub async fn scan(
        &mut self,
        node: &Option<String>,
        cursor: u64,
        pattern: &str,
    ) -> redis::RedisResult<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500);
        match (self, node) {
            (Handle::Cluster(conn), Some(address)) => {
                let value = conn.route_command(cmd, to_node(address)).await?;
                Ok(redis::from_redis_value(value)?)
            }
            (handle, _) => cmd.query_async(handle).await,
        }
    }
}

/// What a listing SCANs: each master holding slots (`host:port`) with the
/// slots it holds; empty for a standalone server, which is SCANned as is.
#[derive(Debug, Default, PartialEq)]
pub struct ScanTargets(pub BTreeMap<String, Vec<String>>);

impl ScanTargets {
    /// The nodes to SCAN one after another (`None`: the standalone server).
    pub fn nodes(&self) -> Vec<Option<String>> {
        if self.0.is_empty() {
            return vec![None];
        }
        self.0.keys().cloned().map(Some).collect()
    }
}

/// The route of a cluster command to the node at `address` (`host:port`,
/// as `CLUSTER NODES` lists it).
fn to_node(address: &str) -> RoutingInfo {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "0"));
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.to_owned(),
        port: port.parse().unwrap_or_default(),
    })
}

/// Whether `e` says that no connection could be made, so the command was
/// never sent: refused, authentication failed, a host name that does not
/// resolve, a TLS handshake that failed: an I/O error other than a
/// connection dropping or timing out (regression: a name that did not
/// resolve was taken for a command that may have landed, and every claim
/// refused was undone 20 times in the background, holding shutdown). A
/// command that did land but is taken for never sent only waits out its
/// lease; one never sent but taken for landed costs the undoing.
pub fn never_sent(e: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
        )
        || (e.is_io_error() && !e.is_connection_dropped() && !e.is_timeout())
}

/// An error a standalone connection's command gets when no connection
/// could be made (refused, unreachable, its making timed out), as opposed
/// to one Redis answered or a connection that dropped: a new connection
/// may do better. Not a failed authentication (renewed apart).
fn reconnect_failed(e: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    (never_sent(e) || e.is_timeout())
        && !matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
        )
}

impl Link {
    /// [`never_sent`], knowing the link: a standalone server's connection
    /// has no response timeout (`Link::single`), so a timeout from it is its
    /// connection's: a server that accepts and never finishes the handshake
    /// (TLS, `HELLO`) was sent nothing (regression, the TLS audit: each
    /// claim was undone in the background, holding a shutdown 10-15 s).
    pub fn never_sent(&self, e: &redis::RedisError) -> bool {
        never_sent(e) || (matches!(self, Link::Single(_)) && e.is_timeout())
    }
}

/// The error of a command resent after its connection dropped: when the
/// resend could not connect, the first error (the command may have reached
/// Redis before the drop), never one that says it was never sent.
fn sent_maybe(first: redis::RedisError, again: redis::RedisError) -> redis::RedisError {
    if never_sent(&again) { first } else { again }
}

/// A standalone server's command whose connection turns out dropped (Redis
/// restarted, a `CLIENT KILL`, an idle connection cut by a firewall) is
/// sent once more: `ConnectionManager` reconnects only after a command has
/// failed on the dead connection, and that command would otherwise be lost
/// though Redis is back. Every command idemgate sends is safe to run twice
/// (a claim finds its own record, a fenced script finds its own state, a
/// read reads). The cluster connection retries by itself.
impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Single(h) => {
                Box::pin(h.send(move |mut conn| async move { conn.send_packed_command(cmd).await }))
            }
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Single(h) => Box::pin(h.send(move |mut conn| async move {
                conn.send_packed_commands(pipeline, offset, count).await
            })),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(h) => h.current.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_that_say_a_command_was_never_sent() {
        use std::io::{Error, ErrorKind};
        let io = |kind, text: &str| redis::RedisError::from(Error::new(kind, text.to_owned()));
        let never = [
            io(ErrorKind::ConnectionRefused, "refused"),
            // What getaddrinfo's failure is, through tokio's lookup_host.
            io(ErrorKind::Other, "failed to lookup address information"),
            io(
                ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            ),
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "No address found for host",
            )),
            redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "WRONGPASS")),
        ];
        for e in &never {
            assert!(never_sent(e), "{e:?}");
        }
        let maybe = [
            io(ErrorKind::ConnectionReset, "reset"),
            io(ErrorKind::BrokenPipe, "pipe"),
            io(ErrorKind::UnexpectedEof, "eof"),
            io(ErrorKind::TimedOut, "timed out"),
            redis::RedisError::from((redis::ErrorKind::Io, "connection dropped")),
            redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
                "LOADING",
            )),
        ];
        for e in &maybe {
            assert!(!never_sent(e), "{e:?}");
        }
    }
}
