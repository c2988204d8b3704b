//! The RPC codec's length-prefixed frames (`registry/src/p2p/codec.rs`,
//! `read_frame`), read from a stream that hands over its bytes a few at a
//! time and sometimes not at all (`Pending`), as a network stream does.
//!
//! Input: byte 0 is the most bytes one read returns (0: no limit), byte 1
//! bit 0 says whether every other read is `Pending`; the rest is the stream.
//!
//! Asserts: no panic; frames are read until the stream ends or is refused,
//! each at most the limit long; the only errors are a short stream and an
//! oversized frame; writing a frame that was read gives back the very bytes
//! it was read from, and reading those gives the frame.

#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::AsyncRead;
use futures::executor::block_on;
use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use vcfed_fuzz::MESSAGE_MAX_BYTES;
use vcfed_registry::p2p::codec::{read_frame, write_frame};

/// A stream over `data` that returns at most `chunk` bytes per read and,
/// with `stall`, `Pending` (with a wake-up) before every other read.
struct Trickle<'a> {
    data: &'a [u8],
    read: usize,
    chunk: usize,
    stall: bool,
    stalled: bool,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.stall && !self.stalled {
            self.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.stalled = false;
        let rest = &self.data[self.read..];
        let len = rest.len().min(buf.len()).min(self.chunk);
        buf[..len].copy_from_slice(&rest[..len]);
        self.read += len;
        Poll::Ready(Ok(len))
    }
}

fuzz_target!(|data: &[u8]| {
    let [chunk, flags, stream @ ..] = data else {
        return;
    };
    let mut io = Trickle {
        data: stream,
        read: 0,
        chunk: if *chunk == 0 {
            usize::MAX
        } else {
            usize::from(*chunk)
        },
        stall: flags & 1 == 1,
        stalled: false,
    };
    loop {
        let start = io.read;
        let frame = match block_on(read_frame(&mut io, MESSAGE_MAX_BYTES)) {
            Ok(frame) => frame,
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                    ),
                    "unexpected error: {e}"
                );
                break;
            }
        };
        assert!(frame.len() <= MESSAGE_MAX_BYTES);
        let mut wire = Cursor::new(Vec::new());
        block_on(write_frame(&mut wire, &frame, MESSAGE_MAX_BYTES)).expect("a frame read fits");
        assert_eq!(wire.get_ref()[..], stream[start..io.read]);
        let mut wire = Cursor::new(wire.into_inner());
        assert_eq!(
            block_on(read_frame(&mut wire, MESSAGE_MAX_BYTES)).expect("a frame written reads"),
            frame
        );
    }
});
