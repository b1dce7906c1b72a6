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
//!
//! Progress is also the socket's send queue draining: Linux wakes a
//! waiting writer only once about a third of the send buffer is free, and
//! loopback and LAN buffers grow to megabytes, so a client reading slowly
//! but steadily (tens of KB/s) let no write through for longer than the
//! timeout and was cut off (regression). When the timer fires, the unsent
//! bytes (`SIOCOUTQ`) are compared with those when it was armed: fewer, and
//! it is armed again.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a client may take no byte of what is written to it, unless
/// `send_timeout` says otherwise.
pub const SEND_STALL: Duration = Duration::from_secs(60);

/// `send_timeout`, and the count of client connections it cut off
/// (`idemgate_send_timeouts_total`).
#[derive(Clone, Debug)]
pub struct SendTimeout {
    pub after: Duration,
    pub cut_offs: Counter,
}

impl SendTimeout {
    /// Counts one connection cut off and says so where operators look (the
    /// access line has the answer's status); `what` says how it stalled.
    pub fn cut_off(&self, what: &str) {
        self.cut_offs.inc();
        tracing::info!(send_timeout = ?self.after, "{what}");
    }
}

/// `io`, whose writes must make progress within `timeout.after`.
pub struct SendTimer<S> {
    io: S,
    timeout: SendTimeout,
    /// Made at the first write that waits; armed while writes wait.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// The socket's unsent bytes when the timer was last armed.
    unsent: Option<u32>,
}

/// A stream that can tell how many bytes it has not sent yet.
pub trait Unsent {
    /// `None` when it cannot tell.
    fn unsent(&self) -> Option<u32>;
}

impl Unsent for tokio::net::TcpStream {
    fn unsent(&self) -> Option<u32> {
        unsent_on(self.as_raw_fd())
    }
}

/// The bytes socket `fd` has not delivered (`SIOCOUTQ`: unsent, or sent
/// and not acknowledged); `None` when it cannot tell. `fd` must be open.
pub fn unsent_on(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut unsent: libc::c_int = 0;
    // SAFETY: an ioctl that writes one int, on a socket its caller keeps open.
    let done = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut unsent) };
    (done == 0).then(|| u32::try_from(unsent).unwrap_or(0))
}

#[cfg(test)]
impl Unsent for tokio::io::DuplexStream {
    fn unsent(&self) -> Option<u32> {
        None
    }
}

impl<S> SendTimer<S> {
    pub fn new(io: S, timeout: SendTimeout) -> SendTimer<S> {
        SendTimer {
            io,
            timeout,
            sleep: None,
            armed: false,
            unsent: None,
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
        S: Unpin + Unsent,
    {
        if let Poll::Ready(result) = poll(Pin::new(&mut self.io), cx) {
            self.armed = false;
            return Poll::Ready(result);
        }
        if !self.armed {
            // Armed from now, with the socket's unsent bytes now.
            self.armed = true;
            self.unsent = self.io.unsent();
            let deadline = Instant::now() + self.timeout.after;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let sleep = self.sleep.as_mut().expect("armed");
        loop {
            ready!(sleep.as_mut().poll(cx));
            // The client took some of what the socket held: progress.
            match (self.unsent, self.io.unsent()) {
                (Some(then), Some(now)) if now < then => {
                    self.unsent = Some(now);
                    sleep.as_mut().reset(Instant::now() + self.timeout.after);
                }
                _ => break,
            }
        }
        self.timeout
            .cut_off("client connection cut off: it took no bytes of its answer for send_timeout");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no bytes of its response for {:?}",
                self.timeout.after
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

impl<S: AsyncWrite + Unpin + Unsent> AsyncWrite for SendTimer<S> {
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

    fn stall() -> SendTimeout {
        SendTimeout {
            after: STALL,
            cut_offs: Counter::default(),
        }
    }

    #[tokio::test]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_stall() {
        let (server, _client) = tokio::io::duplex(16);
        let timeout = stall();
        let mut io = SendTimer::new(server, timeout.clone());
        io.write_all(&[0; 16]).await.unwrap(); // fills the pipe
        let write = tokio::time::timeout(Duration::from_secs(10), io.write_all(&[0; 16]));
        let err = write.await.expect("timed out by the stall").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(timeout.cut_offs.get(), 1, "counted");
    }

    /// Regression: a client reading slowly but steadily was cut off behind
    /// a large send buffer: Linux wakes a waiting writer only once a third
    /// of it is free, so no write went through within the timeout though
    /// the client kept reading. The send queue draining is progress.
    #[tokio::test]
    async fn a_steady_reader_behind_a_large_send_buffer_is_not_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let big: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with an int, on this open socket.
        let set = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const big).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        let mut io = SendTimer::new(server, stall());
        let total = 24 << 20;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            let mut read = 0;
            // Slowly (about 1.3 MB/s) for ten times STALL, then at once.
            let slow_until = tokio::time::Instant::now() + STALL * 10;
            while read < total {
                if tokio::time::Instant::now() < slow_until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {read} bytes");
                read += n;
            }
        });
        io.write_all(&vec![0; total]).await.expect("never cut off");
        reader.await.unwrap();
    }

    /// A slow reader that keeps taking bytes is never cut off, however long
    /// the whole write takes: the stall counts from the last progress.
    #[tokio::test]
    async fn a_peer_that_keeps_reading_slowly_is_not_cut_off() {
        let (server, mut client) = tokio::io::duplex(16);
        let mut io = SendTimer::new(server, stall());
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
