//! A streamed upstream body that may go quiet for at most the route's
//! `timeouts.response`, as nginx's `proxy_read_timeout` bounds the time
//! between two reads: an upstream that sends its head and then nothing no
//! longer holds its request's bulkhead slot (and the client) for as long as
//! the client waits (regression, found by an audit: 20 such answers held
//! every slot of `max_in_flight: 20`, and protected requests got `503
//! upstream_overloaded`, for as long as their clients stayed).
//!
//! The silence counts from when the body is next asked for and the
//! upstream has nothing: a client that reads slowly holds the upstream
//! back, and that time is not the upstream's. A body that times out has
//! broken off: the breaker hears of a failure, and hyper closes the
//! client's connection (its answer is cut short, as an upstream's broken
//! body's is).
//!
//! Either way the break is logged, with the request's trace id, as
//! nginx's "upstream prematurely closed connection" is: the access line,
//! written with the head, says the status the client was sent, and the
//! client may have got nothing of it (regression, found by an audit).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::UpstreamBody;
use crate::body::BoxError;
use crate::headers::TraceId;

/// How long after an upstream's break it is told to hyper: time for what
/// came before it to be written (HTTP/1) or flushed by the h2 connection.
const BREAK_TOLD_AFTER: Duration = Duration::from_millis(50);

pub struct Silence {
    body: UpstreamBody,
    limit: Duration,
    /// The silence's limit while the upstream is waited for, or when a
    /// break is told ([`BREAK_TOLD_AFTER`]); made at its first use.
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer runs: the last poll found nothing.
    waiting: bool,
    /// The request's, for the line that says the body broke off.
    trace: TraceId,
    /// The upstream's break, told to hyper once what came before is out.
    broken: Option<BoxError>,
}

impl Silence {
    pub fn new(body: UpstreamBody, limit: Duration, trace: TraceId) -> Silence {
        Silence {
            body,
            limit,
            timer: None,
            waiting: false,
            trace,
            broken: None,
        }
    }

    /// Sets the timer (made once: most bodies are in hand with their head)
    /// to fire `after` from now.
    fn arm(&mut self, after: Duration) {
        let at = Instant::now() + after;
        let timer = (self.timer).get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        timer.as_mut().reset(at);
    }

    fn broke_off(&self, error: &dyn std::fmt::Display) {
        tracing::warn!(
            trace_id = self.trace.as_str(),
            error = %error,
            "the upstream's answer broke off after its head: the client's answer was cut short"
        );
    }
}

impl Body for Silence {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.broken.is_none() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Err(error))) => {
                    this.broke_off(&error);
                    // Told a moment later: hyper drops an HTTP/1 connection
                    // at a body's error without writing what it holds, and
                    // the h2 layer drops a reset stream's unsent frames, so
                    // the head and the bytes before the break go out first
                    // (regression, two audits: such an answer reached its
                    // client as an empty reply, or a bare RST_STREAM).
                    this.broken = Some(error.into());
                    this.arm(BREAK_TOLD_AFTER);
                }
                Poll::Ready(frame) => {
                    this.waiting = false;
                    return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
                }
                // A wait begins: only then is the clock read and the timer set.
                Poll::Pending if !std::mem::replace(&mut this.waiting, true) => {
                    this.arm(this.limit);
                }
                Poll::Pending => {}
            }
        }
        match this.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => match this.broken.take() {
                Some(broken) => Poll::Ready(Some(Err(broken))),
                None => {
                    this.body.give_up();
                    let error = format!(
                        "the upstream sent nothing of its answer's body for {:?} (timeouts.response)",
                        this.limit
                    );
                    this.broke_off(&error);
                    Poll::Ready(Some(Err(error.into())))
                }
            },
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // A break still to be told is not an end.
        self.broken.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
