//! Request-response codec for `/vcfed/rpc/1`: opaque byte payloads framed as a
//! big-endian `u32` length followed by that many bytes.
//!
//! The reader checks the announced length against the limit before it
//! allocates, so a peer cannot make us reserve more than `max_bytes` per
//! stream by lying in the prefix.
//!
//! [`read_frame`] and [`write_frame`] are public for the fuzz target
//! `rpc_frame` (`fuzz/`), which reads peers' bytes as the codec does.

use std::{io, sync::Arc};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{StreamProtocol, request_response};

use super::Counters;

/// Protocol name negotiated by multistream-select for our RPC streams.
pub(crate) const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/vcfed/rpc/1");

/// Length-prefixed codec for request and response payloads of at most
/// `max_bytes` bytes each; counts the frames it refuses (request-response
/// reports no failure of its own for a request that did not decode).
#[derive(Debug, Clone)]
pub(crate) struct RpcCodec {
    max_bytes: usize,
    counters: Arc<Counters>,
}

impl RpcCodec {
    pub(crate) fn new(max_bytes: usize, counters: Arc<Counters>) -> Self {
        Self {
            max_bytes,
            counters,
        }
    }

    /// Reads a frame, counting an oversized or truncated one.
    async fn read_counted<T>(&self, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let read = read_frame(io, self.max_bytes).await;
        match &read {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::debug!(error = %e, "oversized RPC frame refused");
                Counters::count(&self.counters.rpc_frames_oversized);
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("truncated RPC frame");
                Counters::count(&self.counters.rpc_frames_truncated);
            }
            _ => {}
        }
        read
    }
}

impl request_response::Codec for RpcCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_counted(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_counted(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &request, self.max_bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &response, self.max_bytes).await
    }
}

/// Reads one frame; a length above `max_bytes` is refused with `InvalidData`
/// before any buffer is allocated for it.
pub async fn read_frame<T>(io: &mut T, max_bytes: usize) -> io::Result<Vec<u8>>
where
    T: AsyncRead + Unpin,
{
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let announced = u32::from_be_bytes(prefix);
    let len = usize::try_from(announced)
        .ok()
        .filter(|len| *len <= max_bytes)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {announced} bytes exceeds the limit of {max_bytes} bytes"),
            )
        })?;
    let mut data = vec![0u8; len];
    io.read_exact(&mut data).await?;
    Ok(data)
}

/// Writes one frame; a payload above `max_bytes` is refused with
/// `InvalidInput` so that we never send what a peer with the same limit would
/// reject.
pub async fn write_frame<T>(io: &mut T, data: &[u8], max_bytes: usize) -> io::Result<()>
where
    T: AsyncWrite + Unpin,
{
    let len = u32::try_from(data.len())
        .ok()
        .filter(|_| data.len() <= max_bytes)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes exceeds the limit of {max_bytes} bytes",
                    data.len()
                ),
            )
        })?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(data).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;

    use super::*;

    #[tokio::test]
    async fn frame_round_trip() {
        let mut wire = Cursor::new(Vec::new());
        write_frame(&mut wire, b"hello", 16).await.unwrap();
        write_frame(&mut wire, b"", 16).await.unwrap();
        assert_eq!(wire.get_ref()[..4], [0, 0, 0, 5]);

        let mut wire = Cursor::new(wire.into_inner());
        assert_eq!(read_frame(&mut wire, 16).await.unwrap(), b"hello");
        assert_eq!(read_frame(&mut wire, 16).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_the_body() {
        // The prefix claims 4 GiB; only the prefix is present, so a reader
        // that trusted it would either allocate or fail with UnexpectedEof.
        let mut wire = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        let error = read_frame(&mut wire, 1024).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(wire.position(), 4);
    }

    #[tokio::test]
    async fn oversized_payload_is_not_written() {
        let mut wire = Cursor::new(Vec::new());
        let error = write_frame(&mut wire, &[0u8; 17], 16).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(wire.get_ref().is_empty());
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut wire = Cursor::new(vec![0, 0, 0, 8, 1, 2, 3]);
        let error = read_frame(&mut wire, 16).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
