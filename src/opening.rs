//! A client connection's opening bytes, within the head's deadline.
//!
//! hyper-util's `auto` builder reads a connection's first bytes to tell
//! HTTP/1 from HTTP/2 (the 24-byte preface) before any HTTP timer runs, and
//! waits for them as long as the client likes: a connection that sent
//! nothing, or part of the preface, was held open forever (one file
//! descriptor each). [`Opening`] fails the read with `TimedOut` when the
//! opening is not in by its deadline: the first byte that is not the
//! preface's (an HTTP/1 request), or the whole preface. After that it
//! passes reads through: on HTTP/1 hyper's own head timer takes over; on
//! HTTP/2, which hyper gives no idle timer, each read is noted in
//! [`Activity`] for the connection's idle timer (`drain::Watched`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::activity::Activity;

/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `io`, whose opening must arrive by `deadline`.
pub struct Opening<S> {
    io: S,
    /// Until the opening is in: its deadline, and the timer once a read waits.
    pending: Option<(Instant, Option<Pin<Box<Sleep>>>)>,
    /// Bytes of the preface seen so far.
    seen: usize,
    /// Told of every read once the whole preface is in (HTTP/2); dropped
    /// when the opening turns out to be HTTP/1.
    activity: Option<Arc<Activity>>,
}

impl<S> Opening<S> {
    pub fn new(io: S, deadline: Instant, activity: Arc<Activity>) -> Opening<S> {
        Opening {
            io,
            pending: Some((deadline, None)),
            seen: 0,
            activity: Some(activity),
        }
    }

    /// Notes bytes read: the opening is in once they leave the preface or
    /// complete it.
    fn saw(&mut self, bytes: &[u8]) {
        let left = &PREFACE[self.seen..];
        let n = bytes.len().min(left.len());
        if bytes[..n] != left[..n] {
            self.pending = None;
            self.activity = None;
        } else if self.seen + n == PREFACE.len() {
            self.pending = None;
            if let Some(activity) = &self.activity {
                activity.speaks_h2();
            }
        } else {
            self.seen += n;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opening<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_none() {
            let Some(activity) = &this.activity else {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            };
            let before = buf.filled().len();
            let read = ready!(Pin::new(&mut this.io).poll_read(cx, buf));
            if buf.filled().len() > before {
                activity.read();
            }
            return Poll::Ready(read);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() {
                    this.pending = None; // closed: hyper sees the end
                    this.activity = None;
                } else {
                    this.saw(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let (deadline, sleep) = this.pending.as_mut().expect("pending");
                let sleep =
                    sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within 10 s of the connection opening",
                )))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opening<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn opening(
        deadline_in: Duration,
    ) -> (Opening<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::new());
        (
            Opening::new(server, Instant::now() + deadline_in, activity),
            client,
        )
    }

    #[test]
    fn the_opening_is_in_at_the_first_byte_off_the_preface_or_the_whole_preface() {
        // (reads, still pending, HTTP/2: reads noted for the idle timer)
        let cases: [(&[&[u8]], bool, bool); 6] = [
            (&[b"GET / HTTP/1.1\r\n"], false, false),
            (&[b"P"], true, false),
            (&[b"PRI * HTTP"], true, false),
            (&[b"PRI * HTTP", b"/1.1"], false, false),
            (&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n", b"\r\n"], false, true),
            (&[PREFACE, b"rest"], false, true),
        ];
        for (reads, still_pending, h2) in cases {
            let (mut io, _client) = opening(Duration::from_secs(10));
            let activity = io.activity.clone().unwrap();
            for read in reads {
                if io.pending.is_some() {
                    io.saw(read);
                }
            }
            assert_eq!(io.pending.is_some(), still_pending, "{reads:?}");
            assert_eq!(activity.last_read().is_some(), h2, "{reads:?}");
            assert_eq!(io.activity.is_some(), h2 || still_pending, "{reads:?}");
        }
    }

    #[tokio::test]
    async fn a_silent_or_partial_opening_times_out_and_a_request_does_not() {
        let deadline = Duration::from_millis(200);
        for sent in [&b""[..], b"PRI * HTTP/2"] {
            let (mut io, mut client) = opening(deadline);
            client.write_all(sent).await.unwrap();
            let mut buf = [0u8; 64];
            if !sent.is_empty() {
                assert_eq!(io.read(&mut buf).await.unwrap(), sent.len());
            }
            let read = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf));
            let err = read.await.expect("timed out by the deadline").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{sent:?}");
        }
        // A request in time: later reads wait as long as they like.
        let (mut io, mut client) = opening(deadline);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 16);
        let later = tokio::spawn(async move { io.read(&mut buf).await });
        tokio::time::sleep(deadline * 3).await; // past the deadline under test
        client.write_all(b"x").await.unwrap();
        assert_eq!(later.await.unwrap().unwrap(), 1);
    }
}
