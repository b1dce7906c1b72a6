//! What a client connection that speaks HTTP/2 is doing, for its idle
//! timer (`drain::Watched`): when it last sent bytes, and how many of its
//! streams are open. hyper has a head timer for HTTP/1 but no idle timer
//! for HTTP/2, so an idle HTTP/2 client would hold its connection (and a
//! file descriptor) for good. HTTP/1 connections leave it unset.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            h2: AtomicBool::new(false),
            read_ms: AtomicU64::new(0),
            base: Instant::now(),
            streams: AtomicUsize::new(0),
        }
    }

    /// The connection sent HTTP/2's whole preface (now).
    pub fn speaks_h2(&self) {
        self.read();
        self.h2.store(true, Ordering::Relaxed);
    }

    /// The connection sent bytes (now).
    pub fn read(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.read_ms.store(ms, Ordering::Relaxed);
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

/// `response`, its stream open until its body is all sent (or dropped).
pub fn answer(
    response: http::Response<ProxyBody>,
    stream: Option<StreamGuard>,
) -> http::Response<ProxyBody> {
    match stream {
        None => response,
        Some(stream) => response.map(|body| {
            ProxyBody::new(Guarded {
                body,
                _stream: stream,
            })
        }),
    }
}

/// A response body that holds its stream open.
struct Guarded {
    body: ProxyBody,
    _stream: StreamGuard,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
