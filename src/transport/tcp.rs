//! The binary protocol over TCP.

use super::{Connection, StreamFrameReader, StreamFrameWriter, Transport};
use std::io;
use std::net::SocketAddr;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

/// A TCP listener whose connections speak the binary protocol of `docs/protocol.md`.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use switchboard::{Broker, TcpTransport};
///
/// let broker = Broker::builder().build();
/// let transport = TcpTransport::bind("127.0.0.1:7878").await?;
/// broker.serve(transport).await;
/// # Ok(()) }
/// ```
pub struct TcpTransport {
    listener: TcpListener,
}

impl TcpTransport {
    /// Binds a listener.
    ///
    /// # Errors
    ///
    /// Fails as [`TcpListener::bind`] does.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpTransport> {
        Ok(TcpTransport {
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// Uses a listener the host bound itself.
    pub fn from_listener(listener: TcpListener) -> TcpTransport {
        TcpTransport { listener }
    }

    /// The address the listener is bound to (useful after binding port 0).
    ///
    /// # Errors
    ///
    /// Fails as [`TcpListener::local_addr`] does.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Turns an accepted stream into a connection for [`crate::Broker::accept`].
    pub fn connection(
        stream: TcpStream,
    ) -> Connection<StreamFrameReader<OwnedReadHalf>, StreamFrameWriter<OwnedWriteHalf>> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".to_string());

        // The writer gathers a batch before each write, so Nagle's delay would only
        // add latency.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Connection::new(
            StreamFrameReader::new(read),
            StreamFrameWriter::new(write),
            peer,
        )
    }
}

impl Transport for TcpTransport {
    type Reader = StreamFrameReader<OwnedReadHalf>;
    type Writer = StreamFrameWriter<OwnedWriteHalf>;

    async fn accept(&mut self) -> io::Result<Option<Connection<Self::Reader, Self::Writer>>> {
        let (stream, _) = self.listener.accept().await?;
        Ok(Some(TcpTransport::connection(stream)))
    }
}
