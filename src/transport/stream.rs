//! Length-prefixed frames over any byte stream (TCP, TLS, a Unix socket).

use super::{FrameReader, FrameWriter};
use crate::error::ReadError;
use crate::frame::{DecodeError, Frame};
use bytes::{Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How much room a read asks for when the buffer has less.
const READ_CHUNK: usize = 8 * 1024;

/// Frames at least this large are written straight from their shared buffer; smaller
/// ones are gathered into one buffer so that a burst costs one system call.
const GATHER_BELOW: usize = 16 * 1024;

/// A gather buffer grown past this is given back after the batch that needed it.
const GATHER_KEEP: usize = 64 * 1024;

/// Decodes frames from a byte stream.
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

            // Whatever is buffered now is less than one frame; read more. Reading
            // into `buf` is cancel-safe: bytes are either in the buffer or unread.
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.io.read_buf(&mut self.buf).await?;
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
}
