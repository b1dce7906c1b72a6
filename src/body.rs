//! The one body type that flows through the proxy, and helpers to build it.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

use crate::upstream::{Silence, UpstreamBody};

/// Errors of any body source (client, upstream) share one boxed type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request and response bodies, streamed or in memory.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes any body whose error converts into [`BoxError`] (e.g. hyper's `Incoming`).
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Why a protected request's body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Over the limit (declared or counted).
    TooLarge,
    /// No data for [`BODY_STALL`].
    Stalled,
    /// The client's stream broke.
    Broken,
    /// The body's framing is invalid (a bad chunk): the client's request is
    /// malformed, and the client is still there for its 400.
    Malformed,
}

/// Whether a body's error says its framing was invalid (hyper's decoder:
/// an I/O error of kind `InvalidInput` or `InvalidData` among its
/// sources), rather than that its stream broke off (`UnexpectedEof`, a reset).
pub fn malformed(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        })
    })
}

/// How long a protected request's body may stall between frames.
pub const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// The most of a body's declared size reserved before its bytes come.
const RESERVED_AT_MOST: u64 = 16 << 20;

/// Reads a whole body of at most `limit` bytes, each frame within `stall`.
pub async fn read_limited<B>(
    mut body: B,
    limit: u64,
    stall: std::time::Duration,
) -> Result<Bytes, ReadError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit {
        return Err(ReadError::TooLarge);
    }
    // Its declared size at once (regression, an audit: grown by doubling,
    // a body just under a power of two held twice its size), up to
    // `RESERVED_AT_MOST`: a larger one grows as it comes (regression, an
    // audit: with `max_request_body: 1PiB`, one request declaring 1 PiB
    // aborted the process, its allocation refused).
    let declared = body.size_hint().exact().unwrap_or(0);
    let mut buf = bytes::BytesMut::with_capacity(declared.min(RESERVED_AT_MOST) as usize);
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(ReadError::Stalled),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(error))) => {
                let error: BoxError = error.into();
                return Err(match malformed(&*error) {
                    true => ReadError::Malformed,
                    false => ReadError::Broken,
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() as u64 + data.len() as u64 > limit {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
}

/// A response body read up to a limit.
pub enum Collected {
    Whole(Bytes),
    /// Over the limit: what was read, and the rest still to stream.
    Over {
        prefix: Bytes,
        rest: UpstreamBody,
    },
    Broken,
}

pub async fn collect_up_to(mut body: UpstreamBody, limit: u64) -> Collected {
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Collected::Whole(buf.freeze()),
            Some(Err(_)) => return Collected::Broken,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > limit {
                        return Collected::Over {
                            prefix: buf.freeze(),
                            rest: body,
                        };
                    }
                }
            }
        }
    }
}

/// `prefix` followed by the rest of a body.
pub fn prefixed(prefix: Bytes, rest: Silence) -> ProxyBody {
    Prefixed {
        prefix: Some(prefix),
        rest,
    }
    .boxed()
}

struct Prefixed {
    prefix: Option<Bytes>,
    rest: Silence,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        // None for a body streamed from its first byte (declared too large).
        if let Some(prefix) = self.prefix.take().filter(|p| !p.is_empty()) {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(prefix))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }
}
