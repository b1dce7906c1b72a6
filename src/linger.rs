//! A client's HTTP/1 request body that its answer left unread (a `413`, a
//! `404`, a `400` for a missing key, an upstream that failed or answered
//! early) is read and thrown away in the background for a while, as
//! nginx's lingering close does.
//!
//! Without it hyper closes the connection with the rest of the body still
//! coming: the client's next write fails (a broken pipe, or a reset), and
//! most clients then report that error and never read the answer that is
//! already waiting for them. Read to its end, the body leaves the
//! connection usable for the client's next request. Lingering ends when
//! shutdown begins: an answered request is not in flight. HTTP/2 needs none
//! of this: a stream's unread body is cancelled on its own.
//!
//! Not a body its client holds back for `Expect: 100-continue` and that was
//! never asked for: no `100 Continue` went out, so the client sends no body
//! and what it sends next is its next request, which lingering would read
//! as this one's body, and the bytes of that request's body as a request
//! (regression: a desync found by an audit, a request smuggled in a body).
//! Dropped unread, hyper closes the connection after the answer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long an unread body is read and discarded at most (nginx's
/// `lingering_time`)...
const LINGER_TIME: Duration = Duration::from_secs(30);
/// ...and how long it may send nothing before the connection is closed
/// (nginx's `lingering_timeout`).
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// An HTTP/1 request body, discarded in the background when dropped before its end.
pub struct Lingering {
    /// Until the body has ended (or failed).
    body: Option<Incoming>,
    /// The proxy's shutdown, which ends the lingering.
    draining: CancellationToken,
    /// With `Expect: 100-continue`: true while nothing has asked for the
    /// body (no `100` went out), and the client holds it back.
    held_back: Option<Arc<AtomicBool>>,
}

impl Lingering {
    /// `held_back`: the request said `Expect: 100-continue`, and this
    /// flag (true) says whether its body is still held back.
    pub fn new(
        body: Incoming,
        draining: &CancellationToken,
        held_back: Option<Arc<AtomicBool>>,
    ) -> Lingering {
        Lingering {
            body: Some(body),
            draining: draining.clone(),
            held_back,
        }
    }

    fn held_back(&self) -> bool {
        (self.held_back.as_ref()).is_some_and(|held| held.load(Ordering::Relaxed))
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Asked for: hyper sends `100 Continue`, and the client its body.
        if let Some(held) = &self.held_back {
            held.store(false, Ordering::Relaxed);
        }
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            self.body = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if body.is_end_stream() || self.held_back() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let draining = self.draining.clone();
            runtime.spawn(async move { draining.run_until_cancelled(discard(body)).await });
        }
    }
}

/// Reads `body` to its end, within [`LINGER_TIME`] and with no pause
/// longer than [`LINGER_IDLE`]; dropping it before then closes the connection.
async fn discard(mut body: Incoming) {
    let until = Instant::now() + LINGER_TIME;
    loop {
        let deadline = until.min(Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            _ => return,
        }
    }
}
