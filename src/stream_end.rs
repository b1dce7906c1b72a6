//! An HTTP/2 request body that ends only where its stream did.
//!
//! hyper ends a request body whose stream the client reset with `NO_ERROR`
//! as if it were whole (RFC 9113 8.1 lets a *server* stop an upload that
//! way once it has answered; hyper applies the rule to requests too). A
//! client that cancelled its upload then had the part it sent forwarded as
//! the whole request: on a protected route claimed, run and recorded, so
//! that its retry with the real body met `422`; on a pass-through route
//! sent with a clean last chunk (regressions: an HTTP/2 audit, and its
//! verification). So a body is whole only when the client's END_STREAM
//! came (the h2 crate's `is_end_stream`, which a reset stream is not);
//! else it broke off, and an upstream it was streaming to sees it break.
//!
//! The last bytes of a declared length are held back until the stream ends:
//! an upstream counting the bytes of its `Content-Length` would otherwise
//! have the whole request before the client's reset (regression, an audit:
//! a pass-through upload reset after its last byte ran upstream).
//!
//! HTTP/1 has no such end: a connection that closes early breaks the body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::body::BoxError;

pub struct StreamEnd {
    body: Incoming,
    /// The last bytes of the declared length, until the stream ends.
    held: Option<Bytes>,
    /// A frame that came after the held bytes, given after them.
    next: Option<Frame<Bytes>>,
}

impl StreamEnd {
    pub fn new(body: Incoming) -> StreamEnd {
        StreamEnd {
            body,
            held: None,
            next: None,
        }
    }
}

impl Body for StreamEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.next.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                // The held bytes are dropped: the body broke off.
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None if this.body.is_end_stream() => {
                    return Poll::Ready(this.held.take().map(|held| Ok(Frame::data(held))));
                }
                None => {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the client reset its HTTP/2 stream before the body's end",
                    )
                    .into())));
                }
            };
            // END_STREAM on an empty DATA frame of its own.
            if this.held.is_some() && frame.data_ref().is_some_and(|data| data.is_empty()) {
                continue;
            }
            if let Some(held) = this.held.take() {
                this.next = Some(frame);
                return Poll::Ready(Some(Ok(Frame::data(held))));
            }
            let last = this.body.size_hint().exact() == Some(0) && !this.body.is_end_stream();
            match frame.into_data() {
                Ok(data) if last && !data.is_empty() => this.held = Some(data),
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            }
        }
    }

    /// True once the client's END_STREAM came and every byte was given,
    /// never for a reset stream.
    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.next.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        let held = self.held.as_ref().map_or(0, |held| held.len() as u64);
        if let Some(exact) = hint.exact() {
            hint.set_exact(exact + held);
        }
        hint
    }
}

/// An HTTP/2 request's `Content-Length` as one field: the h2 crate checks
/// the first against the stream's data and lets copies of it through, and
/// an HTTP/1.1 upstream may refuse a request with two (Node's does), or
/// frame it by another. The first, the one checked, is kept.
pub fn one_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    if let (Some(first), Some(_)) = (values.next(), values.next()) {
        let first = first.clone();
        headers.insert(CONTENT_LENGTH, first);
    }
}
