//! The watch on a Redis Cluster's masters: every few seconds it reads
//! which nodes hold slots (`CLUSTER NODES`, from a seed), and when that set
//! changes it makes the cluster connection anew.
//!
//! Why: the cluster client sends a slot's commands to the master it knows
//! until that master answers or its connection breaks (a timeout is retried
//! on the same node, the slots are not read again). A master that hangs (a
//! stopped process, a partition dropping packets) kept its slots failing
//! (`503 store_unavailable`) for as long as it hung, its replica promoted.
//! A connection made anew reads the slots again, but only after the
//! promotion: made while the hung master still holds its slots, its slot
//! refreshes stall on that master and hold up every slot's commands
//! (regression, found by the audit of an earlier attempt that made it anew
//! after repeated timeouts: half of the healthy masters' keys got 503).
//! So the set compared is that of the masters holding slots, a master
//! flagged `fail` included: it changes when a replica takes the slots
//! over, not when the master is first suspected.
//!
//! The watch runs always, not only after calls timed out: some timeouts
//! are reported by the cluster client's own response timer and not seen as
//! such here (the earlier attempt missed them), and a quiet process should
//! not meet its first calls on a stale connection. It costs one
//! `CLUSTER NODES` every [`EVERY`] on one kept connection, and logs only
//! when the masters change, or once when no seed answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::time::{MissedTickBehavior, timeout};

use super::link::ClusterLink;

/// How often the masters are read.
const EVERY: Duration = Duration::from_secs(2);

/// Watches `link`'s cluster until the link is dropped. `bound` bounds each
/// attempt to read the masters from one seed (connecting and answering).
pub(super) fn start(link: Weak<ClusterLink>, seeds: Vec<redis::Client>, bound: Duration) {
    let mut seeds = Seeds {
        clients: seeds,
        bound,
        kept: None,
        next: 0,
        lost: false,
    };
    tokio::spawn(async move {
        // Those the current connection was made with (as near as the
        // watch can tell: the first read follows its making).
        let mut seen: Option<BTreeSet<String>> = None;
        let mut failing = false;
        let mut unaddressed = false;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if link.strong_count() == 0 {
                return;
            }
            let Some(masters) = seeds.masters().await else {
                continue;
            };
            // A master holding slots that has no address (`noaddr`): a
            // connection made now is made around it, and the cluster
            // client then refreshed its slots without end, failing every
            // slot's commands (regression, an audit: a master restarted
            // with its nodes.conf lost left its old identity listed as
            // `:0` with its slots). The connection is kept: the other
            // masters' slots keep working.
            if let Some(master) = masters.iter().find(|m| has_no_address(m)) {
                if !unaddressed {
                    unaddressed = true;
                    tracing::warn!(
                        node = %master,
                        "a Redis Cluster master holding slots has no address (flag noaddr: a node restarted with its nodes.conf lost?): its slots fail until its replica takes them over (CLUSTER FAILOVER TAKEOVER) or they are given to another master; the connection is kept meanwhile"
                    );
                }
                continue;
            }
            unaddressed = false;
            let Some(before) = &seen else {
                seen = Some(masters);
                continue;
            };
            if *before == masters {
                continue;
            }
            let Some(link) = link.upgrade() else { return };
            match link.remake().await {
                Ok(()) => {
                    tracing::warn!(
                        was = joined(before),
                        now = joined(&masters),
                        "the Redis Cluster's masters changed (a failover, or masters added or removed): its connection was made anew, its slots read again"
                    );
                    seen = Some(masters);
                    failing = false;
                }
                // Kept unseen: the next read tries again. Said once.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(
                        error = %e,
                        "the Redis Cluster's masters changed, and its connection could not be made anew; the old one stays, tried again in a few seconds"
                    );
                }
                Err(_) => {}
            }
        }
    });
}

/// The seeds, read one at a time: the one that answered last is kept.
struct Seeds {
    clients: Vec<redis::Client>,
    bound: Duration,
    kept: Option<MultiplexedConnection>,
    /// The seed to try first when none is kept.
    next: usize,
    /// No seed answered the last time (said once).
    lost: bool,
}

impl Seeds {
    /// The addresses of the masters holding slots, from the kept seed or
    /// else the first that answers; `None` when none does.
    async fn masters(&mut self) -> Option<BTreeSet<String>> {
        if let Some(conn) = &mut self.kept {
            if let Ok(Ok(masters)) = timeout(self.bound, read(conn)).await {
                return Some(masters);
            }
            self.kept = None;
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.bound))
            .set_response_timeout(Some(self.bound));
        let mut error = String::from("no seed");
        for _ in 0..self.clients.len() {
            let client = &self.clients[self.next];
            self.next = (self.next + 1) % self.clients.len();
            let attempt = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let masters = read(&mut conn).await?;
                Ok::<_, redis::RedisError>((conn, masters))
            };
            match timeout(self.bound, attempt).await {
                Ok(Ok((conn, masters))) => {
                    self.kept = Some(conn);
                    if self.lost {
                        self.lost = false;
                        tracing::info!("the Redis Cluster's masters are read again");
                    }
                    return Some(masters);
                }
                Ok(Err(e)) => error = e.to_string(),
                Err(_) => error = "timed out".into(),
            }
        }
        if !self.lost {
            self.lost = true;
            tracing::warn!(
                error,
                "no Redis Cluster seed tells its masters: a failover away from a master that hangs is not followed until one does"
            );
        }
        None
    }
}

/// The masters holding slots, read from one node.
async fn read(conn: &mut MultiplexedConnection) -> redis::RedisResult<BTreeSet<String>> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
    let masters = slot_masters(&nodes);
    if masters.is_empty() {
        // A node not (or no longer) part of the cluster: ask another.
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "no master holds slots in this node's view",
        )));
    }
    Ok(masters)
}

/// The `host:port` of each master holding slots, from `CLUSTER NODES`
/// lines: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
/// <pong-recv> <epoch> <link> <slot> ...`. A master flagged `fail` (or
/// `fail?`) counts while it holds slots: its replica has not taken them yet.
/// Slots being imported or migrated (`[..]`) are not held.
pub(super) fn slot_masters(nodes: &str) -> BTreeSet<String> {
    slots_held(nodes).into_keys().collect()
}

/// [`slot_masters`], each with the slots it holds as listed (`0-5460`,
/// `7000`), to tell whether slots moved between two reads.
pub(super) fn slots_held(nodes: &str) -> BTreeMap<String, Vec<String>> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let slots: Vec<String> = (fields.iter().skip(8))
                .filter(|slot| !slot.starts_with('['))
                .map(|slot| slot.to_string())
                .collect();
            if !flags.split(',').any(|f| f == "master") || slots.is_empty() {
                return None;
            }
            Some((fields.get(1)?.split('@').next()?.to_owned(), slots))
        })
        .collect()
}

/// A master listed without an address (`:0`, flag `noaddr`).
fn has_no_address(master: &str) -> bool {
    master.starts_with(':') || master.ends_with(":0")
}

fn joined(masters: &BTreeSet<String>) -> String {
    masters.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masters_holding_slots_are_compared() {
        let before = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                      b2 127.0.0.1:7001@17001,b.example master - 0 0 2 connected 5461-10922\n\
                      c3 127.0.0.1:7003@17003 slave a1 0 0 1 connected\n\
                      d4 127.0.0.1:7002@17002 master,fail? - 0 0 3 connected 10923-16383\n\
                      e5 127.0.0.1:7004@17004 master - 0 0 4 connected [93->-a1]\n";
        let held = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            slot_masters(before),
            held(&["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]),
            "a suspected master holds its slots until its replica takes them"
        );
        let after = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                     d4 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected\n\
                     f6 127.0.0.1:7005@17005 master - 0 0 5 connected 10923-16383\n";
        assert_eq!(
            slot_masters(after),
            held(&["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7005"])
        );
        assert!(slot_masters("").is_empty());
        let lost = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    g7 :0@0 master,noaddr - 0 0 3 connected 10923-16383\n";
        let masters = slot_masters(lost);
        assert_eq!(masters, held(&["127.0.0.1:7000", ":0"]));
        let unaddressed: Vec<&String> = masters.iter().filter(|m| has_no_address(m)).collect();
        assert_eq!(unaddressed, [":0"], "the master listed without an address");
    }

    /// A listing compares the slots each master holds before and after its
    /// SCANs: a slot moved is a change, a slot being imported is not held.
    #[test]
    fn the_slots_held_tell_a_move() {
        let before = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461-<-b2]\n\
                      b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n";
        let after = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5461\n\
                     b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5462-10922\n";
        let held = slots_held(before);
        assert_eq!(held["127.0.0.1:7000"], ["0-5460"]);
        assert_ne!(held, slots_held(after), "slot 5461 moved");
        assert_eq!(held, slots_held(&before.replace(" [5461-<-b2]", "")));
    }
}
