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

    /// Whether the peer may speak the JSON form, known before its first frame. The
    /// broker then allows a first frame twice the size of the largest binary `HELLO`,
    /// room for the JSON form's keys and quotes.
    fn may_speak_json(&self) -> bool {
        false
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
///
/// [`Broker::serve`](crate::Broker::serve) calls [`accept`](Transport::accept) in a
/// loop and runs every connection it yields. A host implements this trait to serve
/// connections from a source of its own. Each connection is a [`FrameReader`] and a
/// [`FrameWriter`]: a link that carries one frame per message implements those two
/// itself, and a byte stream gets the binary protocol's framing from
/// [`StreamFrameReader`] and [`StreamFrameWriter`].
///
/// Below, the host's own server hands the connections it accepted over a Tokio
/// channel, and the transport yields them to the broker. An in-process pipe stands in
/// for a socket, so the example runs as it is.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::io;
/// use switchboard::transport::{StreamFrameReader, StreamFrameWriter};
/// use switchboard::{Broker, Client, Connection, Transport};
/// use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
/// use tokio::sync::mpsc;
///
/// type Reader = StreamFrameReader<ReadHalf<DuplexStream>>;
/// type Writer = StreamFrameWriter<WriteHalf<DuplexStream>>;
///
/// /// Connections the host accepted, handed over by its server.
/// struct HandedOver(mpsc::Receiver<Connection<Reader, Writer>>);
///
/// impl Transport for HandedOver {
///     type Reader = Reader;
///     type Writer = Writer;
///
///     async fn accept(&mut self) -> io::Result<Option<Connection<Reader, Writer>>> {
///         // `None` once the server dropped its sender: `serve` then finishes.
///         Ok(self.0.recv().await)
///     }
/// }
///
/// let broker = Broker::builder().build();
/// let (server, incoming) = mpsc::channel(16);
/// tokio::spawn(broker.serve(HandedOver(incoming)));
///
/// // The server accepts a peer and hands the broker its end of the pipe.
/// let (broker_end, client_end) = tokio::io::duplex(64 * 1024);
/// let (read, write) = tokio::io::split(broker_end);
/// let reader = StreamFrameReader::new(read);
/// let connection = Connection::new(reader, StreamFrameWriter::new(write), "pipe");
/// server.send(connection).await.map_err(|_| "the transport is gone")?;
///
/// // The peer speaks the binary protocol over the other end.
/// let (read, write) = tokio::io::split(client_end);
/// let alice = Client::builder("alice")
///     .connect(StreamFrameReader::new(read), StreamFrameWriter::new(write))
///     .await?;
/// alice.subscribe("lobby").await?;
/// assert_eq!(broker.session("lobby").map(|s| s.members.len()), Some(1));
/// # Ok(()) }
/// ```
pub trait Transport: Send + 'static {
    /// The inbound half of the connections this transport yields.
    type Reader: FrameReader;
    /// The outbound half of the connections this transport yields.
    type Writer: FrameWriter;

    /// Waits for the next connection.
    ///
    /// An error is logged by [`crate::Broker::serve`] and passed to the `on_error`
    /// hook; `serve` then goes on accepting after a pause of 50 ms. A transport that
    /// can yield no more connections returns `Ok(None)`, and `serve` finishes. When
    /// shutdown begins, `serve` drops a pending call together with the transport.
    fn accept(
        &mut self,
    ) -> impl Future<Output = io::Result<Option<Connection<Self::Reader, Self::Writer>>>> + Send;
}
