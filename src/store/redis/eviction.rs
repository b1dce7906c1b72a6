//! Whether Redis may evict records: read from `INFO` when the store is
//! first reached and again every [`EVERY`] on its pings, told in the log
//! when it changes and kept for the `idemgate_store_evicting` gauge. A
//! policy changed after start (`CONFIG SET`, a failover to a differently
//! configured node) used to go unnoticed: only the first reading warned.

use std::sync::Mutex;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

/// How often the pings read the policy again.
pub(super) const EVERY: Duration = Duration::from_secs(5);

/// How much earlier than [`EVERY`] after a reading the next ping may come:
/// pings tick every 5 s, and a reading noted a little after its tick
/// (its `INFO` round trip) made the next tick seem early by as much, so
/// the policy was read every other ping (regression, an observability
/// audit: every 10 s, the gauge late by as much).
const EARLY: Duration = Duration::from_secs(1);

/// Whether a reading taken at `read_at` (none yet) is due again `now`.
fn due_at(read_at: Option<Instant>, now: Instant) -> bool {
    read_at.is_none_or(|at| now.saturating_duration_since(at) + EARLY >= EVERY)
}

#[derive(Default)]
pub(super) struct Eviction(Mutex<Seen>);

#[derive(Default)]
struct Seen {
    /// When the policy was last read (or tried), none before the first.
    read_at: Option<Instant>,
    /// The evicting policy last read, if any node had one.
    policy: Option<String>,
    /// Whether the last reading was refused (said once until one is taken).
    refused: bool,
}

impl Eviction {
    /// Whether it is time to read the policy again.
    pub(super) fn due(&self) -> bool {
        let seen = self.0.lock().expect("eviction lock");
        due_at(seen.read_at, Instant::now())
    }

    /// A reading that could not be taken: the next is tried after
    /// [`EVERY`], the last policy read stands.
    pub(super) fn unread(&self) {
        self.0.lock().expect("eviction lock").read_at = Some(Instant::now());
    }

    /// [`Self::unread`] for a user not allowed `INFO`, said once
    /// (regression, an audit: the check was off without a word, the gauge
    /// at 0 and its alert silent whatever the policy).
    pub(super) fn refused(&self, why: &str) {
        let mut seen = self.0.lock().expect("eviction lock");
        seen.read_at = Some(Instant::now());
        if !std::mem::replace(&mut seen.refused, true) {
            tracing::warn!(
                error = why,
                "Redis refused INFO: idemgate cannot tell whether Redis evicts records (idemgate_store_evicting stays 0) nor check its version; grant the Redis user +info (README, Redis ACL)"
            );
        }
    }

    /// Notes `INFO` texts (one per node): warns when records became
    /// evictable (the first reading included), says so when they no longer are.
    pub(super) fn note(&self, texts: &[NodeInfo]) {
        let found = evicting_policy(texts);
        let now = found.map(|(_, policy)| policy.to_owned());
        let mut seen = self.0.lock().expect("eviction lock");
        seen.read_at = Some(Instant::now());
        seen.refused = false;
        if seen.policy == now {
            return;
        }
        // Which node, on a cluster (noticed by an audit: unnamed).
        let node = found.and_then(|(node, _)| node).unwrap_or("the server");
        match &now {
            Some(policy) => tracing::warn!(
                maxmemory_policy = policy.as_str(),
                node,
                "Redis evicts keys when it reaches maxmemory: an evicted record lets a retry run the request again; set maxmemory-policy noeviction (docs/operations.md, Redis)"
            ),
            None => tracing::info!(
                "Redis no longer evicts keys (maxmemory-policy noeviction, or no maxmemory)"
            ),
        }
        seen.policy = now;
    }

    /// Whether the last reading found a node that may evict records.
    pub(super) fn evicting(&self) -> bool {
        self.0.lock().expect("eviction lock").policy.is_some()
    }
}

/// One node's `INFO` text, with the node's address on a cluster.
pub(super) struct NodeInfo {
    pub node: Option<String>,
    pub text: String,
}

/// The texts of an `INFO` reply: one from a server, one per node (a map
/// of address to text, or an array) from a cluster. One level deep: no
/// server nests them further (regression, noticed by an audit: read
/// recursively, a hostile reply's nesting was a stack's depth).
pub(super) fn info_texts(reply: Value) -> Vec<NodeInfo> {
    fn text(value: Value) -> Option<String> {
        match value {
            Value::BulkString(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Value::SimpleString(text) | Value::VerbatimString { text, .. } => Some(text),
            _ => None,
        }
    }
    let named = |node: Option<String>| move |text| NodeInfo { node, text };
    match reply {
        Value::Map(pairs) => (pairs.into_iter())
            .filter_map(|(node, value)| text(value).map(named(text(node))))
            .collect(),
        Value::Array(items) => (items.into_iter())
            .filter_map(|value| text(value).map(named(None)))
            .collect(),
        single => text(single).map(named(None)).into_iter().collect(),
    }
}

/// The eviction policy of a node that may evict records (`maxmemory` set
/// and a `maxmemory-policy` other than `noeviction`), from `INFO` texts,
/// with the node.
fn evicting_policy(texts: &[NodeInfo]) -> Option<(Option<&str>, &str)> {
    texts.iter().find_map(|info| {
        let field = |name: &str| {
            (info.text.lines())
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let limited = field("maxmemory").is_some_and(|bytes| bytes != "0");
        let policy = field("maxmemory_policy")?;
        (limited && policy != "noeviction").then_some((info.node.as_deref(), policy))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_that_evicts_is_named_and_nesting_is_not_followed() {
        let info = |policy: &str| {
            Value::BulkString(format!("maxmemory:100\r\nmaxmemory_policy:{policy}\r\n").into())
        };
        let node = |name: &str| Value::SimpleString(name.to_owned());
        let cluster = Value::Map(vec![
            (node("10.0.0.1:7000"), info("noeviction")),
            (node("10.0.0.2:7000"), info("allkeys-lru")),
        ]);
        let texts = info_texts(cluster);
        assert_eq!(
            evicting_policy(&texts),
            Some((Some("10.0.0.2:7000"), "allkeys-lru"))
        );
        assert_eq!(
            evicting_policy(&info_texts(info("volatile-lru"))).map(|f| f.1),
            Some("volatile-lru")
        );
        let nested = Value::Array(vec![Value::Array(vec![info("allkeys-lru")])]);
        assert!(info_texts(nested).is_empty());
    }

    #[test]
    fn the_policy_is_read_on_every_ping_not_every_other() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let cases = [
            (None, 0, true, "never read"),
            (Some(0), 0, false, "just read"),
            (Some(0), 2_000, false, "a ping sooner than its period"),
            (
                Some(30),
                5_000,
                true,
                "the next tick, the reading noted 30 ms after its own",
            ),
            (Some(0), 5_000, true, "one period later"),
            (Some(0), 10_000, true, "two"),
        ];
        for (read, now, want, name) in cases {
            assert_eq!(due_at(read.map(at), at(now)), want, "{name}");
        }
    }
}
