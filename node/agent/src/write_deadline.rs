//! A stream whose writes fail once they make no progress for a while.
//!
//! hyper's HTTP/1 server times out reading a request's headers, but has no
//! timeout for writing, and once its write buffer is full it reads no more
//! requests, so that no timer of its own runs. A client that sends requests
//! and never reads the answers (its receive window stays shut; the kernel
//! answers the zero-window probes) would hold its connection for ever, and
//! the server's shutdown with it. [`WriteDeadline`] puts the bound in the
//! stream: hyper sees an I/O error and ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a stalled write fails with, inside an [`io::Error`] of kind
/// `TimedOut`: [`is_write_stalled`] finds it in an error's chain, to tell a
/// client that stopped reading from other I/O errors.
#[derive(Debug, thiserror::Error)]
#[error("the peer took nothing written for {}", humantime::format_duration(*.0))]
pub(crate) struct WriteStalled(pub(crate) Duration);

/// `S` whose writes, flushes and shutdown fail with [`WriteStalled`] once
/// they have been pending for `timeout` with no write completing meanwhile.
/// Reads pass through: a client sending while it does not read is the case
/// this bounds.
#[derive(Debug)]
pub(crate) struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Reset to `timeout` from now when a write starts to wait; one timer
    /// for the life of the stream.
    deadline: Pin<Box<Sleep>>,
    /// Whether writes have been pending since `deadline` was reset.
    stalled: bool,
}

impl<S> WriteDeadline<S> {
    /// `inner`, whose writes may wait at most `timeout` for progress.
    pub(crate) fn new(inner: S, timeout: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            stalled: false,
        }
    }

    /// Passes on `poll`, the inner stream's answer to a write, flush or
    /// shutdown; a pending one fails once writes have been pending for
    /// `timeout`. The deadline's waker is `cx`'s, so the caller polls again
    /// when it expires even if the peer never opens its window.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = false;
            return poll;
        }
        if !self.stalled {
            self.stalled = true;
            self.deadline.as_mut().reset(Instant::now() + self.timeout);
        }
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            WriteStalled(self.timeout),
        )))
    }
}

/// Whether `error` or one of its sources is a write that failed with
/// [`WriteStalled`].
pub(crate) fn is_write_stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .is_some_and(|inner| inner.is::<WriteStalled>())
    })
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUT: Duration = Duration::from_millis(200);

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_write_the_peer_never_takes_fails_after_the_timeout() {
        runtime().block_on(async {
            // A pipe of 64 bytes whose far end never reads.
            let (near, _far) = tokio::io::duplex(64);
            let mut stream = WriteDeadline::new(near, TIMEOUT);
            stream.write_all(&[0; 64]).await.unwrap();
            let started = Instant::now();
            let e = stream.write_all(&[0; 1]).await.unwrap_err();
            let waited = started.elapsed();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(is_write_stalled(&e), "{e}");
            assert!(waited >= TIMEOUT, "failed after {waited:?}");
            assert!(waited < TIMEOUT * 5, "failed after {waited:?}");
        });
    }

    #[test]
    fn a_peer_that_reads_slowly_but_within_the_timeout_is_not_cut() {
        runtime().block_on(async {
            let (near, mut far) = tokio::io::duplex(16);
            let mut stream = WriteDeadline::new(near, TIMEOUT);
            // The far end takes 16 bytes every half timeout: writes wait,
            // in all far longer than the timeout, but never that long at once.
            let reader = tokio::spawn(async move {
                let mut sink = [0; 16];
                let mut read = 0;
                while read < 16 * 8 {
                    tokio::time::sleep(TIMEOUT / 2).await;
                    read += far.read(&mut sink).await.unwrap();
                }
                read
            });
            let started = Instant::now();
            stream.write_all(&[0; 16 * 8]).await.unwrap();
            assert!(started.elapsed() > TIMEOUT * 2);
            assert_eq!(reader.await.unwrap(), 16 * 8);
        });
    }

    #[test]
    fn other_io_errors_are_not_taken_for_a_stall() {
        let e = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
        assert!(!is_write_stalled(&e));
    }
}
