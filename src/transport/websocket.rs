//! WebSocket: binary messages carry the binary frames, text messages the JSON form.
//!
//! [`WebSocketTransport`] is a listener of its own. A host whose HTTP server already
//! upgraded a request hands the resulting [`WebSocketStream`] to [`connection`] and the
//! result to [`crate::Broker::accept`], so the broker can share a port with the host's
//! pages and API.
//!
//! A connection speaks the form of its first message: a client whose `HELLO` came as
//! text gets JSON text messages back, one whose `HELLO` came as binary gets binary
//! frames. Either form is accepted from it afterwards.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use switchboard::{Broker, TcpTransport, WebSocketTransport};
//!
//! let broker = Broker::builder().build();
//! tokio::spawn(broker.serve(TcpTransport::bind("127.0.0.1:7878").await?));
//! broker.serve(WebSocketTransport::bind("127.0.0.1:7879").await?).await;
//! # Ok(()) }
//! ```

use super::{Connection, FrameReader, FrameWriter, Transport, WireFormat};
use crate::error::ReadError;
use crate::frame::{DecodeError, Frame, LENGTH_PREFIX};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
pub use tokio_tungstenite::WebSocketStream;

/// The largest WebSocket message accepted by default: a 1 MiB frame and its prefix.
const DEFAULT_MAX_MESSAGE: usize = 1024 * 1024 + LENGTH_PREFIX;

/// Time allowed for the WebSocket upgrade by default, the broker's own default time
/// for a `HELLO`.
const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Neither form seen yet.
const UNKNOWN: u8 = 0;
const BINARY: u8 = 1;
const JSON: u8 = 2;

/// A WebSocket listener. Each accepted socket completes the WebSocket handshake on its
/// connection's own task, so a slow client never holds up the others.
///
/// A socket is handed to the broker only once its upgrade is done, so the broker's
/// `handshake_timeout` and `max_connections` start counting from there; until then the
/// transport's own [`WebSocketTransport::handshake_timeout`] bounds how long a socket
/// that never completes the upgrade is kept.
pub struct WebSocketTransport {
    listener: TcpListener,
    config: WebSocketConfig,
    upgrade_timeout: Duration,
    handshakes: tokio::task::JoinSet<io::Result<WsConnection<TcpStream>>>,
}

/// The halves of one WebSocket connection.
pub type WsConnection<S> = Connection<WsReader<S>, WsWriter<S>>;

impl WebSocketTransport {
    /// Binds a listener that accepts messages of up to 1 MiB plus the frame prefix
    /// (the broker's default `max_frame`); see [`WebSocketTransport::max_message`].
    ///
    /// # Errors
    ///
    /// Fails as [`TcpListener::bind`] does.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<WebSocketTransport> {
        Ok(WebSocketTransport::from_listener(
            TcpListener::bind(addr).await?,
        ))
    }

    /// Uses a listener the host bound itself.
    pub fn from_listener(listener: TcpListener) -> WebSocketTransport {
        WebSocketTransport {
            listener,
            config: limits(DEFAULT_MAX_MESSAGE),
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            handshakes: tokio::task::JoinSet::new(),
        }
    }

    /// The longest a socket may take to complete the WebSocket upgrade (its HTTP
    /// request, read in full); past it the socket is closed without an answer. Default
    /// 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// The largest WebSocket message, in bytes, the transport reads; a larger one
    /// fails the connection before it is buffered. Set it to the broker's `max_frame`
    /// plus 4, so that binary frames of every allowed size fit.
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.config = limits(bytes);
        self
    }

    /// The address the listener is bound to.
    ///
    /// # Errors
    ///
    /// Fails as [`TcpListener::local_addr`] does.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A tungstenite configuration that refuses messages over `max_message` bytes from
/// their header, before buffering them. A host that upgrades sockets itself passes it
/// to [`WebSocketStream::from_raw_socket`]; use the broker's `max_frame` plus 4.
pub fn limits(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

impl Transport for WebSocketTransport {
    type Reader = WsReader<TcpStream>;
    type Writer = WsWriter<TcpStream>;

    async fn accept(&mut self) -> io::Result<Option<WsConnection<TcpStream>>> {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, peer) = accepted?;
                    let _ = stream.set_nodelay(true);
                    let config = self.config;
                    let limit = self.upgrade_timeout;
                    self.handshakes.spawn(async move {
                        let upgrade = tokio_tungstenite::accept_async_with_config(stream, Some(config));
                        let ws = tokio::time::timeout(limit, upgrade)
                            .await
                            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no WebSocket upgrade in time"))?
                            .map_err(io::Error::other)?;
                        Ok(connection(ws, peer.to_string()))
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok(Ok(connection)) => return Ok(Some(connection)),
                        Ok(Err(e)) => tracing::debug!(cause = %e, "WebSocket handshake failed"),
                        Err(e) => tracing::warn!(cause = %e, "WebSocket handshake task failed"),
                    }
                }
            }
        }
    }
}

/// Turns an upgraded WebSocket into a connection for [`crate::Broker::accept`].
pub fn connection<S>(ws: WebSocketStream<S>, peer: impl Into<String>) -> WsConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let format = Arc::new(AtomicU8::new(UNKNOWN));
    Connection::new(
        WsReader {
            stream,
            format: format.clone(),
            read: 0,
        },
        WsWriter { sink, format },
        peer,
    )
}

/// The inbound half of a WebSocket connection.
pub struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    format: Arc<AtomicU8>,
    read: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsReader<S> {
    /// Remembers the form of the first message, which decides the form of replies.
    fn saw(&self, form: u8) {
        let _ = self
            .format
            .compare_exchange(UNKNOWN, form, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> FrameReader for WsReader<S> {
    async fn read_frame(&mut self, max_frame: usize) -> Result<Option<Frame>, ReadError> {
        loop {
            let message = match self.stream.next().await {
                None => return Ok(None),
                Some(Ok(message)) => message,
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    // The message is over the transport's limit; tungstenite refused it
                    // from its header, before buffering it, and knows its size.
                    tracing::debug!(cause = %e, "WebSocket message over the limit");
                    let length = match e {
                        CapacityError::MessageTooLong { size, .. } => size as u64,
                        _ => u64::MAX,
                    };
                    return Err(DecodeError::TooLarge {
                        length,
                        max: max_frame,
                    }
                    .into());
                }
                Some(Err(tungstenite::Error::Utf8(e))) => {
                    // A text message whose bytes are not UTF-8: bad input in the JSON
                    // form, like text that is not JSON.
                    tracing::debug!(cause = %e, "WebSocket text message is not UTF-8");
                    self.saw(JSON);
                    return Err(DecodeError::Malformed {
                        kind: "JSON",
                        what: "text message is not valid UTF-8",
                    }
                    .into());
                }
                Some(Err(tungstenite::Error::Protocol(
                    e @ ProtocolError::ResetWithoutClosingHandshake,
                ))) => {
                    // The peer went away without a WebSocket close: a lost link, not
                    // bad input.
                    return Err(ReadError::Io(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        e,
                    )));
                }
                Some(Err(tungstenite::Error::Protocol(e))) => {
                    // The peer broke the WebSocket framing itself (a reserved opcode, an
                    // unmasked frame, a bad continuation): bad input, answered as such.
                    // tungstenite keeps the socket writable, so the answer gets out.
                    tracing::debug!(cause = %e, "WebSocket protocol violation");
                    return Err(DecodeError::Malformed {
                        kind: "WebSocket",
                        what: "the WebSocket framing breaks RFC 6455",
                    }
                    .into());
                }
                Some(Err(tungstenite::Error::ConnectionClosed))
                | Some(Err(tungstenite::Error::AlreadyClosed)) => return Ok(None),
                Some(Err(e)) => return Err(ReadError::Io(io::Error::other(e))),
            };
            match message {
                Message::Binary(bytes) => {
                    self.read += bytes.len() as u64;
                    self.saw(BINARY);
                    return Frame::decode_message(bytes, max_frame)
                        .map(Some)
                        .map_err(ReadError::from);
                }
                Message::Text(text) => {
                    self.read += text.len() as u64;
                    self.saw(JSON);
                    return crate::json::decode(text.as_str(), max_frame)
                        .map(Some)
                        .map_err(ReadError::from);
                }
                Message::Close(_) => return Ok(None),
                // tungstenite answers pings itself; pongs and raw frames mean nothing here.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }

    fn may_speak_json(&self) -> bool {
        true
    }

    fn format(&self) -> WireFormat {
        match self.format.load(Ordering::Acquire) {
            JSON => WireFormat::Json,
            _ => WireFormat::Binary,
        }
    }
}

/// The outbound half of a WebSocket connection.
pub struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    format: Arc<AtomicU8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> FrameWriter for WsWriter<S> {
    async fn write_frames(&mut self, frames: &mut Vec<Bytes>) -> io::Result<()> {
        let json = self.format.load(Ordering::Acquire) == JSON;
        for frame in frames.drain(..) {
            let message = if json {
                let text = Utf8Bytes::try_from(frame).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "JSON frame is not UTF-8")
                })?;
                Message::Text(text)
            } else {
                Message::Binary(frame)
            };
            self.sink.feed(message).await.map_err(io::Error::other)?;
        }
        self.sink.flush().await.map_err(io::Error::other)
    }

    async fn close(&mut self) -> io::Result<()> {
        // The protocol's own CLOSE frame, already sent, carries the reason; the
        // WebSocket close says only that the end is orderly, so browsers see 1000
        // rather than "no status".
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::default(),
        };
        let _ = self.sink.send(Message::Close(Some(close))).await;
        self.sink.close().await.map_err(io::Error::other)
    }
}
