//! An HTTP/2 request body that ends only where its stream did.
//!
//! hyper ends a request body whose stream the client reset with `NO_ERROR`
//! as if it were whole (RFC 9113 8.1 lets a *server* stop an upload that
//! way once it has answered; hyper applies the rule to requests too). A
//! client that cancelled its upload then had the part it sent forwarded as
//! the whole request: claimed, run and recorded, so that its retry with
//! the real body met `422` (regression: an HTTP/2 audit). So:
//!
//! - a body shorter than its `Content-Length` is broken, not ended;
//! - the end of any other body waits one poll. The request's future is
//!   then pending, hyper looks at the stream, and a stream the client reset
//!   drops the request (nothing claimed, nothing forwarded, logged 499).
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
    /// The bytes its `Content-Length` still promises.
    left: Option<u64>,
    /// The end was seen and held back for one poll.
    ended: bool,
}

impl StreamEnd {
    pub fn new(body: Incoming) -> StreamEnd {
        StreamEnd {
            left: body.size_hint().exact(),
            body,
            ended: false,
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
        if self.ended {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(left), Some(data)) = (&mut self.left, frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            None if self.left.is_some_and(|left| left > 0) => {
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the HTTP/2 stream ended before its Content-Length",
                )
                .into())))
            }
            None => {
                self.ended = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// Never before the held-back end: hyper's own answer is true as soon
    /// as a reset stream has nothing left, and a client sending the body
    /// upstream would then end it there.
    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
