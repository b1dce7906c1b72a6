//! A client connection's writes, each within [`SEND_STALL`] of the last
//! progress: a client that stops reading its response is cut off.
//!
//! A passed-through response body is streamed: its upstream request holds
//! a bulkhead slot (`max_in_flight`) until the body's end, which a client
//! that never reads never lets come, so a few such clients turned every
//! other request to the upstream away with `503 upstream_overloaded` for as
//! long as they stayed connected. [`SendTimer`] fails a write with
//! `TimedOut` when the socket has taken no byte for `send_timeout` (60 s
//! by default, as nginx's `send_timeout`): hyper then ends the connection, and
//! the dropped body frees its slot and its upstream connection. A write
//! that goes through at once, every write under load, costs one branch;
//! the timer is made at the first write that waits.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a client may take no byte of what is written to it, unless
/// `send_timeout` says otherwise.
pub const SEND_STALL: Duration = Duration::from_secs(60);

/// `io`, whose writes must make progress within `after`.
pub struct SendTimer<S> {
    io: S,
    after: Duration,
    /// Made at the first write that waits; armed while writes wait.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> SendTimer<S> {
    pub fn new(io: S, after: Duration) -> SendTimer<S> {
        SendTimer {
            io,
            after,
            sleep: None,
            armed: false,
        }
    }

    /// `poll` of a write, timed: progress disarms the timer, waiting arms
    /// it (from now, if it was not armed yet) and fails once it fires.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        if let Poll::Ready(result) = poll(Pin::new(&mut self.io), cx) {
            self.armed = false;
            return Poll::Ready(result);
        }
        let deadline = Instant::now() + self.after;
        let sleep = match &mut self.sleep {
            Some(sleep) if self.armed => sleep,
            Some(sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no bytes of its response for {} s",
                self.after.as_secs()
            ),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.timed(cx, |io, cx| io.poll_flush(cx))
    }

    /// Timed too: on TLS it writes `close_notify`, which a client that
    /// stopped reading never takes (the connection would stay for good).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.timed(cx, |io, cx| io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const STALL: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_stall() {
        let (server, _client) = tokio::io::duplex(16);
        let mut io = SendTimer::new(server, STALL);
        io.write_all(&[0; 16]).await.unwrap(); // fills the pipe
        let write = tokio::time::timeout(Duration::from_secs(10), io.write_all(&[0; 16]));
        let err = write.await.expect("timed out by the stall").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// A slow reader that keeps taking bytes is never cut off, however long
    /// the whole write takes: the stall counts from the last progress.
    #[tokio::test]
    async fn a_peer_that_keeps_reading_slowly_is_not_cut_off() {
        let (server, mut client) = tokio::io::duplex(16);
        let mut io = SendTimer::new(server, STALL);
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut total = 0;
            while total < 16 * 8 {
                tokio::time::sleep(STALL / 2).await;
                total += client.read(&mut buf).await.unwrap();
            }
            total
        });
        // Eight pipe-fulls at one per STALL/2: four stalls' worth in all.
        io.write_all(&[0; 16 * 8]).await.expect("never cut off");
        assert_eq!(reader.await.unwrap(), 16 * 8);
    }
}
