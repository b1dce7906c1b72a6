//! Other instances' transitions, heard through Redis pub/sub. A claim that
//! will wait marks the in-flight record (`waited`); the fenced script that
//! ends that attempt, on whichever instance, publishes the record's key
//! name on `<key_prefix>events`; each instance subscribes once and wakes its
//! own waiters of that key. Unmarked records publish nothing, so the common
//! path costs Redis nothing more. Messages are a shortcut, not a contract:
//! a waiter missing one (a reconnect, a message before it began waiting)
//! still sees the change at its next claim.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use tokio::task::AbortHandle;

use crate::idempotency::key::StorageKey;
use crate::store::waiters::Waiters;

/// Pause before subscribing again after the connection failed or ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// The channel the fenced scripts publish on.
pub(super) fn channel(prefix: &str) -> String {
    format!("{prefix}events")
}

/// Listens on `prefix`'s channel in a task of the current Tokio runtime
/// until aborted. `connect_timeout` bounds each attempt to connect.
pub(super) fn listen(
    client: redis::Client,
    prefix: String,
    connect_timeout: Duration,
    waiters: Arc<Waiters>,
) -> AbortHandle {
    let task = tokio::spawn(async move {
        let channel = channel(&prefix);
        let (mut said, mut told_publish) = (false, false);
        loop {
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let subscribed = tokio::time::timeout(connect_timeout, subscribed).await;
            if let Ok(Ok(pubsub)) = subscribed {
                // The outage's warning gets its end (regression: nothing
                // said the subscription had come back).
                if said {
                    tracing::info!(channel, "hearing other instances' transitions again");
                }
                said = false;
                if !told_publish {
                    told_publish = may_not_publish(&client, &channel, connect_timeout).await;
                }
                let mut messages = pubsub.into_on_message();
                while let Some(message) = poll_fn(|cx| Pin::new(&mut messages).poll_next(cx)).await
                {
                    let name = String::from_utf8_lossy(message.get_payload_bytes());
                    if let Some(key) = StorageKey::decode(&prefix, &name) {
                        waiters.wake(&key);
                    }
                }
            } else if !said {
                // Once per outage: waiters fall back to their backoff steps.
                said = true;
                // Its words (regression: its kind alone, `Io`, said nothing
                // of what the other lines called "Connection refused").
                let error = match subscribed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(
                    error,
                    channel,
                    "not hearing other instances' transitions; waiters poll"
                );
            }
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    });
    task.abort_handle()
}

/// Whether the Redis user is refused `PUBLISH` on `channel`, said once in
/// a warning: its scripts' publishes then fail unseen (`pcall`), and other
/// instances' waiters poll (regression, a multi-instance audit: a user
/// without `+publish` but with `SUBSCRIBE` was never told). Tried with an
/// empty message, which names no key: subscribers ignore it.
async fn may_not_publish(client: &redis::Client, channel: &str, bound: Duration) -> bool {
    let publish = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg("")
            .query_async::<i64>(&mut conn)
            .await
    };
    match tokio::time::timeout(bound, publish).await {
        Ok(Err(e)) if e.code() == Some("NOPERM") => {
            tracing::warn!(
                channel,
                error = %e,
                "the Redis user may not PUBLISH on this channel: other instances' waiters do not hear this one's transitions and poll; grant it +publish on &<key_prefix>events (README, waiting duplicates)"
            );
            true
        }
        _ => false,
    }
}
