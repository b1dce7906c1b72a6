//! The validated configuration: everything the proxy needs, parsed and merged.
//!
//! `load` reads the YAML file (`file.rs`), expands `${VAR}`, merges the
//! defaults into each route and reports every problem of the file at once
//! (`validate.rs`). Nothing here is read again at request time.

mod check;
mod describe;
mod empty;
mod file;
mod restart;
mod validate;
mod validate_match;
mod validate_policy;
mod validate_upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

pub use check::{ConfigError, ConfigErrors};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub admin: Option<Admin>,
    pub store: StoreConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<Route>,
    pub shutdown_grace: Duration,
    /// How long a client may take no bytes of what is written to it.
    pub send_timeout: Duration,
    /// Non-fatal observations (e.g. a lease shorter than the total timeout).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

/// Shown without the token: a `{config:?}` must not put a secret in a log.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// What a secret is shown as in `Debug` output.
const REDACTED: &str = "<redacted>";

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Backend,
    pub key_prefix: String,
    pub op_timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// Upper bound on records held by the memory store.
    pub max_records: u64,
    /// Custom CA / client certificate for `rediss://`.
    pub tls: Option<UpstreamTls>,
}

#[derive(Clone, PartialEq)]
pub enum Backend {
    Memory,
    Redis { url: String },
    Cluster { urls: Vec<String> },
}

/// Shown without the URLs, which may carry a password.
impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Memory => f.write_str("Memory"),
            Backend::Redis { .. } => f.debug_struct("Redis").field("url", &REDACTED).finish(),
            Backend::Cluster { urls } => f
                .debug_struct("Cluster")
                .field("urls", &vec![REDACTED; urls.len()])
                .finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    Reject,
    Forward,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// The base path without a trailing slash ("" for none).
    pub base_path: String,
    pub connect_timeout: Duration,
    /// How long an unused keep-alive connection is kept for reuse: set it
    /// below the upstream's own keep-alive timeout, or a request may go out
    /// on a connection the upstream is closing (a lost request whose
    /// outcome the proxy cannot know).
    pub idle_timeout: Duration,
    pub max_in_flight: u32,
    pub circuit_breaker: Option<Breaker>,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    pub consecutive_failures: u32,
    pub open_for: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// SHA-256 over what the files held when the configuration was read
    /// (not the bytes: one is a private key), so that a file rotated in
    /// place makes another configuration: a reload rebuilds an upstream
    /// for it, and says that the store's take a restart.
    pub files: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub matcher: RouteMatch,
    pub upstream: Arc<str>,
    pub timeouts: Timeouts,
    /// `None` when the route has `idempotency: off`.
    pub idempotency: Option<Arc<Policy>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Upper-case method names; `None` matches every method.
    pub methods: Option<Vec<Method>>,
    /// Lower-case host, with a port only when the operator wrote one.
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub response: Duration,
    pub total: Duration,
}

/// A route's idempotency settings, defaults merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub methods: Vec<Method>,
    pub header: HeaderName,
    pub require_key: bool,
    pub key_max_length: usize,
    pub ttl: Duration,
    pub lease: Duration,
    pub concurrent: Concurrent,
    pub fingerprint_headers: Vec<HeaderName>,
    pub fingerprint_query: bool,
    pub scope_headers: Vec<HeaderName>,
    pub store_statuses: Vec<StatusPattern>,
    pub release_statuses: Vec<u16>,
    pub on_unknown: OnUnknown,
    pub max_request_body: u64,
    pub max_response_body: u64,
}

impl Policy {
    /// Whether a response with this status is stored and replayed.
    pub fn stores(&self, status: u16) -> bool {
        self.store_statuses.iter().any(|p| p.matches(status))
            && !self.release_statuses.contains(&status)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrent {
    Reject,
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknown {
    Lock,
    Release,
}

/// `"2xx"` (a class) or `201` (one status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    Class(u16),
    Exact(u16),
}

impl std::fmt::Display for StatusPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusPattern::Class(class) => write!(f, "{class}xx"),
            StatusPattern::Exact(status) => write!(f, "{status}"),
        }
    }
}

impl StatusPattern {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusPattern::Class(class) => status / 100 == class,
            StatusPattern::Exact(exact) => status == exact,
        }
    }
}

/// The most bytes a configuration or TLS file is read to.
const MAX_FILE: u64 = 16 << 20;

/// A configuration or TLS file's bytes, refused past [`MAX_FILE`]: a file
/// that never ends (`/dev/zero`) or a wrong path to a huge one is not read
/// until memory runs out (regression, the panics audit: a reload thread
/// given up after 10 s went on reading).
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        let error = format!("larger than {} MiB", MAX_FILE >> 20);
        return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, error));
    }
    Ok(bytes)
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let read = read_bounded(path).and_then(|bytes| {
            String::from_utf8(bytes).map_err(|_| {
                let error = "stream did not contain valid UTF-8";
                std::io::Error::new(std::io::ErrorKind::InvalidData, error)
            })
        });
        let text = read.map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::InvalidData => "save the file as UTF-8",
                std::io::ErrorKind::FileTooLarge => {
                    "a configuration is at most 16 MiB: is this the right file?"
                }
                _ => "pass an existing, readable file with --config or IDEMGATE_CONFIG",
            };
            ConfigErrors::one(ConfigError::new(
                "",
                None,
                format!("cannot read {}: {e}", path.display()),
                hint,
            ))
        })?;
        Config::parse(&text)
    }

    /// Validates configuration text (the environment supplies `${VAR}`).
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        validate::validate(text, &|name| std::env::var(name).ok())
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

impl StoreConfig {
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Memory => "memory",
            Backend::Redis { .. } => "redis",
            Backend::Cluster { .. } => "redis-cluster",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_admin_token_and_no_redis_url() {
        let config = validate::validate(
            "admin: { listen: 127.0.0.1:9090, token: adm1n-s3cret }\nstore: { backend: redis, url: \"redis://:pa55word@10.0.0.7:6379/0\" }\nupstreams: { erp: { url: \"http://127.0.0.1:9000\" } }\nroutes:\n  - { name: a, match: { path_prefix: / }, upstream: erp }\n",
            &|_| None,
        )
        .expect("valid");
        let shown = format!("{config:?}");
        for secret in ["adm1n-s3cret", "pa55word", "10.0.0.7"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("<redacted>"));
        let cluster = Backend::Cluster {
            urls: vec!["redis://:pw@a:7000".into()],
        };
        assert_eq!(format!("{cluster:?}"), "Cluster { urls: [\"<redacted>\"] }");
    }
}
