//! What a client connection that speaks HTTP/2 is doing, for its idle
//! timer (`drain::Watched`): when it last sent bytes, how many of its
//! streams are open, and since when the oldest stalled answer has waited
//! for the client to take it. hyper has a head timer for HTTP/1 but no idle
//! timer for HTTP/2, so an idle HTTP/2 client would hold its connection
//! (and a file descriptor) for good; and a client that keeps a stream's
//! flow-control window shut while it reads the socket (so `send_timer`
//! never sees a write wait) would hold that answer's bulkhead slot for
//! good. HTTP/1 connections leave it unset.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};

pub struct Activity {
    h2: AtomicBool,
    /// Milliseconds from `base` to the last read.
    read_ms: AtomicU64,
    base: Instant,
    /// Streams whose request the proxy took and whose answer is not all sent.
    streams: AtomicUsize,
    /// The answers being sent, for [`Activity::stalled_since`].
    answers: Mutex<Vec<Weak<Owed>>>,
    /// The connection's socket, for the bytes it has yet to deliver
    /// ([`Activity::unsent`]); `None` when there is none to ask.
    socket: Option<std::os::fd::RawFd>,
}

/// Since when (ms from the connection's `base`) an answer has waited for
/// hyper to ask for its next frame; [`NOT_OWED`] while hyper is waiting
/// on the answer instead (its upstream is slow, which is no stall).
struct Owed(AtomicU64);

const NOT_OWED: u64 = u64::MAX;

impl Activity {
    pub fn new() -> Activity {
        Activity::on(None)
    }

    /// For a connection on `socket` (open as long as the connection is).
    pub fn on(socket: Option<std::os::fd::RawFd>) -> Activity {
        Activity {
            h2: AtomicBool::new(false),
            read_ms: AtomicU64::new(0),
            base: Instant::now(),
            streams: AtomicUsize::new(0),
            answers: Mutex::new(Vec::new()),
            socket,
        }
    }

    /// The bytes the socket holds that its client has not acknowledged yet
    /// (0 when there is no socket to ask): an answer a stream no longer
    /// counts for may still be on its way (hyper and h2 buffer its end).
    pub fn unsent(&self) -> u32 {
        self.socket
            .and_then(crate::send_timer::unsent_on)
            .unwrap_or(0)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Since when the answer that has waited longest for its client to
    /// take its next frame (or its first: a stream whose window the client
    /// keeps shut is never asked for one) has waited; `None` when no answer
    /// waits on its client.
    pub fn stalled_since(&self) -> Option<Instant> {
        let mut answers = self.answers.lock().expect("answers lock");
        answers.retain(|owed| owed.strong_count() > 0);
        let oldest = (answers.iter())
            .filter_map(Weak::upgrade)
            .map(|owed| owed.0.load(Ordering::Relaxed))
            .min()
            .filter(|&ms| ms != NOT_OWED)?;
        Some(self.base + Duration::from_millis(oldest))
    }

    /// The connection sent HTTP/2's whole preface (now).
    pub fn speaks_h2(&self) {
        self.read();
        self.h2.store(true, Ordering::Relaxed);
    }

    /// The connection sent bytes (now).
    pub fn read(&self) {
        self.read_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// When an HTTP/2 connection last sent bytes; `None` for HTTP/1 (or
    /// before its opening is in).
    pub fn last_read(&self) -> Option<Instant> {
        self.h2
            .load(Ordering::Relaxed)
            .then(|| self.base + Duration::from_millis(self.read_ms.load(Ordering::Relaxed)))
    }

    /// Open streams (HTTP/2).
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// On an HTTP/2 connection, a stream's request taken: open until the
    /// guard drops (give it to [`Activity::answer`]). `None` on HTTP/1.
    pub fn stream(self: &Arc<Self>) -> Option<StreamGuard> {
        self.h2.load(Ordering::Relaxed).then(|| {
            self.streams.fetch_add(1, Ordering::Relaxed);
            StreamGuard(self.clone())
        })
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// An open HTTP/2 stream; closed when dropped.
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `response`, its stream open until its body is all sent (or dropped),
/// and owed to its client from now until hyper asks for its body.
pub fn answer(
    response: http::Response<ProxyBody>,
    stream: Option<StreamGuard>,
) -> http::Response<ProxyBody> {
    match stream {
        None => response,
        Some(stream) => response.map(|body| {
            let activity = stream.0.clone();
            let owed = Arc::new(Owed(AtomicU64::new(activity.now_ms())));
            (activity.answers.lock().expect("answers lock")).push(Arc::downgrade(&owed));
            ProxyBody::new(Guarded {
                body,
                owed,
                stream,
                rest: Bytes::new(),
            })
        }),
    }
}

/// A response body that holds its stream open, and notes whether hyper
/// owes it a poll (it handed hyper a frame) or it owes hyper a frame.
struct Guarded {
    body: ProxyBody,
    owed: Arc<Owed>,
    stream: StreamGuard,
    /// What is left of a large data frame, handed over [`PIECE`] at a time.
    rest: Bytes,
}

/// The most handed to hyper at once: hyper asks for the next piece once
/// the client's flow-control window has let most of this one through, so
/// the stall clock measures how long `PIECE` takes (regression: one frame
/// of hundreds of KB had to pass the window within `send_timeout`, and a
/// client reading slowly but steadily was cut off). HTTP/2's own frames
/// are 16 KiB by default.
const PIECE: usize = 16 * 1024;

impl Guarded {
    /// The next piece of `rest`.
    fn piece(&mut self) -> Frame<Bytes> {
        let at = self.rest.len().min(PIECE);
        Frame::data(self.rest.split_to(at))
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = if self.rest.is_empty() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame)))
                    if frame.data_ref().is_some_and(|d| d.len() > PIECE) =>
                {
                    self.rest = frame.into_data().unwrap_or_default();
                    Poll::Ready(Some(Ok(self.piece())))
                }
                other => other,
            }
        } else {
            Poll::Ready(Some(Ok(self.piece())))
        };
        let owed = match &poll {
            // Handed over: the client must make room for the next one.
            Poll::Ready(Some(Ok(_))) => self.stream.0.now_ms(),
            _ => NOT_OWED,
        };
        self.owed.0.store(owed, Ordering::Relaxed);
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let inner = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}
