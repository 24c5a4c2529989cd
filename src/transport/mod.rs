//! Transports: where connections come from and how their frames travel.
//!
//! The broker works on frames, not bytes. A transport yields [`Connection`]s; each is a
//! [`FrameReader`] (decoded frames in) and a [`FrameWriter`] (encoded frames out). A byte
//! stream such as TCP frames itself with the length prefix ([`StreamFrameReader`],
//! [`StreamFrameWriter`]); a message-oriented link carries one frame per message
//! ([`memory`]). The broker does not care which.
//!
//! Built in: [`TcpTransport`], the in-process [`MemoryTransport`], and with the
//! `websocket` feature `WebSocketTransport`.

use crate::error::ReadError;
use crate::frame::Frame;
use bytes::Bytes;
use std::future::Future;
use std::io;

pub mod memory;
mod stream;
mod tcp;
#[cfg(feature = "websocket")]
pub mod websocket;

pub use memory::{MemoryConnector, MemoryReader, MemoryTransport, MemoryWriter};
pub use stream::{StreamFrameReader, StreamFrameWriter};
pub use tcp::TcpTransport;
#[cfg(feature = "websocket")]
pub use websocket::WebSocketTransport;

/// How frames are encoded on a connection. The forwarding worker encodes each message
/// once per format in use among a session's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WireFormat {
    /// The binary frames of `docs/protocol.md`.
    Binary,
    /// The JSON form of the same frames, one JSON object per WebSocket text message.
    #[cfg(feature = "websocket")]
    Json,
}

impl WireFormat {
    /// Encodes one frame in this format.
    pub fn encode(self, frame: &Frame) -> Bytes {
        match self {
            WireFormat::Binary => frame.encode(),
            #[cfg(feature = "websocket")]
            WireFormat::Json => crate::json::encode(frame),
        }
    }
}

/// The inbound half of a connection: decoded frames.
pub trait FrameReader: Send + 'static {
    /// The next frame, or `Ok(None)` when the peer ended the connection cleanly.
    ///
    /// A frame whose announced length is over `max_frame` must be refused with
    /// [`crate::frame::DecodeError::TooLarge`] before its body is buffered.
    ///
    /// Must be cancel-safe: the broker races it against timers and shutdown, and a
    /// call dropped before it completes must lose no frame.
    fn read_frame(
        &mut self,
        max_frame: usize,
    ) -> impl Future<Output = Result<Option<Frame>, ReadError>> + Send;

    /// Bytes received so far on this connection, for the broker's statistics.
    fn bytes_read(&self) -> u64;

    /// The format the peer speaks, as learned from what it sent so far; the broker
    /// asks after the handshake and answers in the same format. Byte streams only
    /// ever speak [`WireFormat::Binary`].
    fn format(&self) -> WireFormat {
        WireFormat::Binary
    }
}

/// The outbound half of a connection: encoded frames.
pub trait FrameWriter: Send + 'static {
    /// Writes every frame, in order, then flushes once. Each element is one whole
    /// encoded frame. The writer takes the frames: `frames` is empty when it returns
    /// `Ok`, and its allocation may be kept for the next batch.
    fn write_frames(
        &mut self,
        frames: &mut Vec<Bytes>,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Ends the connection after what was written.
    fn close(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Gives back room kept for the next batch. The broker calls it when the connection
    /// has gone quiet, so that an idle connection holds no buffers; the default does
    /// nothing.
    fn shrink(&mut self) {}
}

/// One accepted connection, ready to hand to [`crate::Broker::accept`].
pub struct Connection<R, W> {
    /// Frames from the peer.
    pub reader: R,
    /// Frames to the peer.
    pub writer: W,
    /// Who the peer is, for logs (an address, say).
    pub peer: String,
}

impl<R: FrameReader, W: FrameWriter> Connection<R, W> {
    /// Puts a connection together from its halves.
    pub fn new(reader: R, writer: W, peer: impl Into<String>) -> Self {
        Connection {
            reader,
            writer,
            peer: peer.into(),
        }
    }
}

/// A source of connections, such as a listening socket.
pub trait Transport: Send + 'static {
    /// The inbound half of the connections this transport yields.
    type Reader: FrameReader;
    /// The outbound half of the connections this transport yields.
    type Writer: FrameWriter;

    /// Waits for the next connection.
    ///
    /// An error is logged by [`crate::Broker::serve`], which then goes on accepting;
    /// a transport that can yield no more connections returns `Ok(None)`.
    fn accept(
        &mut self,
    ) -> impl Future<Output = io::Result<Option<Connection<Self::Reader, Self::Writer>>>> + Send;
}
