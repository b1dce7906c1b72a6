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
//! HTTP/1 has no such end: a connection that closes early breaks the body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::body::BoxError;

pub struct StreamEnd(Incoming);

impl StreamEnd {
    pub fn new(body: Incoming) -> StreamEnd {
        StreamEnd(body)
    }
}

impl Body for StreamEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(Pin::new(&mut self.0).poll_frame(cx)) {
            Some(frame) => Poll::Ready(Some(frame.map_err(Into::into))),
            None if self.0.is_end_stream() => Poll::Ready(None),
            None => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the client reset its HTTP/2 stream before the body's end",
            )
            .into()))),
        }
    }

    /// True once the client's END_STREAM came, never for a reset stream.
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
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
