//! Length-prefixed frames over any byte stream (TCP, TLS, a Unix socket).

use super::{FrameReader, FrameWriter};
use crate::error::ReadError;
use crate::frame::{DecodeError, Frame};
use bytes::{Bytes, BytesMut};
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// How much room a read asks for when part of a frame is buffered and the buffer has
/// less.
const READ_CHUNK: usize = 8 * 1024;

/// The most a read takes while nothing of a frame is buffered. Such a read goes to a
/// buffer on the stack, and only the bytes that arrived are copied to the heap: a
/// connection waiting for its next frame holds no read buffer at all.
const FIRST_READ: usize = 8 * 1024;

/// Frames at least this large are written straight from their shared buffer; smaller
/// ones are gathered into one buffer so that a burst costs one system call.
const GATHER_BELOW: usize = 16 * 1024;

/// A gather buffer grown past this is given back after the batch that needed it.
const GATHER_KEEP: usize = 64 * 1024;

/// Decodes frames from a byte stream.
///
/// Between frames the reader holds no buffer: each burst of bytes is read onto the
/// stack first and moved into an allocation of its own size, which the frames decoded
/// from it share. Only a frame that arrives in parts is read straight into a buffer
/// kept until the frame is whole.
pub struct StreamFrameReader<R> {
    io: R,
    buf: BytesMut,
    read: u64,
}

impl<R: AsyncRead + Unpin + Send + 'static> StreamFrameReader<R> {
    /// Reads frames from `io`.
    pub fn new(io: R) -> Self {
        StreamFrameReader {
            io,
            buf: BytesMut::new(),
            read: 0,
        }
    }

    /// Reads while nothing of a frame is buffered, into a buffer on the stack, and keeps
    /// what arrived in an allocation of its size. A read that filled the stack buffer
    /// may have left more behind, so that allocation gets room for a chunk more.
    fn poll_first_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut first = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut first))?;
        let arrived = first.filled();
        let room = if arrived.len() == FIRST_READ {
            FIRST_READ + READ_CHUNK
        } else {
            arrived.len()
        };
        let mut buf = BytesMut::with_capacity(room);
        buf.extend_from_slice(arrived);
        self.buf = buf;
        Poll::Ready(Ok(arrived.len()))
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> FrameReader for StreamFrameReader<R> {
    async fn read_frame(&mut self, max_frame: usize) -> Result<Option<Frame>, ReadError> {
        loop {
            let large = self.buf.len() > 4 * READ_CHUNK;
            if let Some(frame) = Frame::decode_stream(&mut self.buf, max_frame)? {
                // A buffer grown for one large frame is given back once it is empty:
                // otherwise its allocation is reused, and held, for the connection's life.
                if large && self.buf.len() < READ_CHUNK {
                    self.buf = BytesMut::from(&self.buf[..]);
                }
                return Ok(Some(frame));
            }

            // Whatever is buffered now is less than one frame; read more. Both reads
            // are cancel-safe: bytes are either in the buffer or unread.
            let n = if self.buf.is_empty() {
                // Any room left after the last frame goes too: holding it while the
                // peer is quiet would cost every idle connection a buffer.
                self.buf = BytesMut::new();
                poll_fn(|cx| self.poll_first_read(cx)).await?
            } else {
                if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                    self.buf.reserve(READ_CHUNK);
                }
                self.io.read_buf(&mut self.buf).await?
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(DecodeError::Truncated {
                        buffered: self.buf.len(),
                    }
                    .into())
                };
            }
            self.read += n as u64;
        }
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// Writes encoded frames to a byte stream, a batch at a time.
pub struct StreamFrameWriter<W> {
    io: W,
    gather: Vec<u8>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> StreamFrameWriter<W> {
    /// Writes frames to `io`.
    pub fn new(io: W) -> Self {
        StreamFrameWriter {
            io,
            gather: Vec::new(),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> FrameWriter for StreamFrameWriter<W> {
    async fn write_frames(&mut self, frames: &mut Vec<Bytes>) -> io::Result<()> {
        // A lone frame needs no gathering, whatever its size: it is written from its
        // own buffer, so a connection that is sent little never grows a gather buffer.
        if let [frame] = frames.as_slice() {
            self.io.write_all(frame).await?;
            frames.clear();
            return self.io.flush().await;
        }

        for frame in frames.iter() {
            if frame.len() < GATHER_BELOW {
                self.gather.extend_from_slice(frame);
                // Written out in steps, so a stalled peer never holds more than one
                // step of copies beyond the shared frames themselves.
                if self.gather.len() >= GATHER_KEEP {
                    self.io.write_all(&self.gather).await?;
                    self.gather.clear();
                }
                continue;
            }
            if !self.gather.is_empty() {
                self.io.write_all(&self.gather).await?;
                self.gather.clear();
            }
            self.io.write_all(frame).await?;
        }
        if !self.gather.is_empty() {
            self.io.write_all(&self.gather).await?;
            self.gather.clear();
        }
        if self.gather.capacity() > GATHER_KEEP {
            self.gather = Vec::new();
        }
        frames.clear();
        self.io.flush().await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }

    fn shrink(&mut self) {
        self.gather = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use tokio::io::AsyncWriteExt;

    const MAX: usize = 1 << 20;

    /// Polls `future` once.
    fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        future.as_mut().poll(&mut cx)
    }

    #[tokio::test]
    async fn a_reader_waiting_between_frames_holds_no_buffer() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut reader = StreamFrameReader::new(server);

        // Two frames in one read: both come from one allocation of their size.
        let mut wire = Frame::Ping.encode().to_vec();
        wire.extend_from_slice(&Frame::Pong.encode());
        client.write_all(&wire).await.unwrap();
        assert_eq!(reader.read_frame(MAX).await.unwrap(), Some(Frame::Ping));
        assert_eq!(
            reader.buf.capacity(),
            wire.len() - Frame::Ping.encode().len()
        );
        assert_eq!(reader.read_frame(MAX).await.unwrap(), Some(Frame::Pong));

        assert!(poll_once(reader.read_frame(MAX)).is_pending());
        assert_eq!(reader.buf.capacity(), 0, "nothing buffered while waiting");

        // Part of a frame is kept, with room for the rest.
        let ping = Frame::Ping.encode();
        client.write_all(&ping[..2]).await.unwrap();
        assert!(poll_once(reader.read_frame(MAX)).is_pending());
        assert_eq!(&reader.buf[..], &ping[..2]);
        client.write_all(&ping[2..]).await.unwrap();
        assert_eq!(reader.read_frame(MAX).await.unwrap(), Some(Frame::Ping));
        assert_eq!(reader.bytes_read(), (wire.len() + ping.len()) as u64);
    }

    #[tokio::test]
    async fn a_read_that_fills_the_stack_buffer_reads_on_into_the_heap() {
        let (mut client, server) = tokio::io::duplex(4 * FIRST_READ);
        let mut reader = StreamFrameReader::new(server);
        let big = Frame::Publish {
            request: 1,
            session: "s".into(),
            payload: Bytes::from(vec![7; 3 * FIRST_READ]),
        };
        client.write_all(&big.encode()).await.unwrap();
        assert_eq!(reader.read_frame(MAX).await.unwrap(), Some(big));
    }
}
