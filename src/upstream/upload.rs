//! A request body still streaming from the client when the request goes
//! out (pass-through): the response timer starts once it has been sent
//! whole. Until then the upstream cannot answer, and a slow client is not
//! the upstream's failure (SPEC 4.4: `timeouts.response` runs "from the
//! request being sent"); a client uploading slowly got `504` and counted
//! towards opening the circuit for everyone.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use crate::body::{BoxError, ProxyBody};

/// `body`, which tells `sent` when it has been read to its end.
pub struct Uploading {
    body: ProxyBody,
    sent: Option<Arc<Sent>>,
}

/// Whether an [`Uploading`] body has been sent whole, and the news of it;
/// and, while it has not, whether it waits on its client (its last read
/// found no bytes) or on the upstream (which stopped taking them).
#[derive(Default)]
pub struct Sent {
    pub notify: Notify,
    /// When it was sent whole, once it has been.
    whole_at: OnceLock<Instant>,
    client_owes: AtomicBool,
}

impl Sent {
    pub fn whole(&self) -> bool {
        self.whole_at.get().is_some()
    }

    /// When the body was sent whole, if it has been.
    pub fn whole_at(&self) -> Option<Instant> {
        self.whole_at.get().copied()
    }

    /// Not sent whole, and waiting for the client's next bytes.
    pub fn waits_on_client(&self) -> bool {
        !self.whole() && self.client_owes.load(Ordering::Acquire)
    }
}

impl Uploading {
    /// Wraps a body that is not at its end yet; `Sent` says when it is.
    pub fn wrap(body: ProxyBody) -> (ProxyBody, Arc<Sent>) {
        let sent = Arc::new(Sent::default());
        let body = Uploading {
            body,
            sent: Some(sent.clone()),
        };
        (body.boxed(), sent)
    }
}

impl Body for Uploading {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        if let Some(sent) = &self.sent {
            sent.client_owes.store(poll.is_pending(), Ordering::Release);
        }
        let frame = ready!(poll);
        // An error ends the body but is no whole one (regression, an
        // observability audit: an upload its client broke off was "sent
        // whole", and logged an upstream time).
        let whole = match &frame {
            None => true,
            Some(Ok(_)) => self.body.is_end_stream(),
            Some(Err(_)) => false,
        };
        if whole && let Some(sent) = self.sent.take() {
            let _ = sent.whole_at.set(Instant::now());
            // A stored permit if nobody waits yet: the news is not lost.
            sent.notify.notify_one();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
