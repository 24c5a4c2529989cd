//! An in-process transport: connections with no sockets, for hosts that want a local
//! client and for tests that want exact, fast scenarios.
//!
//! Each direction is a bounded channel of frame batches, so a peer that stops reading
//! pushes back on its writer exactly as a full socket buffer would.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), switchboard::ClientError> {
//! use switchboard::{Broker, Client, MemoryTransport};
//!
//! let broker = Broker::builder().build();
//! let (transport, connector) = MemoryTransport::new();
//! tokio::spawn(broker.serve(transport));
//!
//! let alice = Client::builder("alice").connect_memory(&connector).await?;
//! alice.subscribe("lobby").await?;
//! assert_eq!(broker.session("lobby").map(|s| s.members.len()), Some(1));
//! # Ok(()) }
//! ```

use super::{Connection, FrameReader, FrameWriter, Transport};
use crate::error::ReadError;
use crate::frame::Frame;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use tokio::sync::mpsc;

/// Batches each direction of a link may hold before its writer waits.
const LINK_BATCHES: usize = 64;

/// Connections waiting for the broker to accept them.
const PENDING_CONNECTIONS: usize = 1024;

/// The broker's side: yields the connections that [`MemoryConnector::connect`] opens.
pub struct MemoryTransport {
    incoming: mpsc::Receiver<Connection<MemoryReader, MemoryWriter>>,
}

/// The clients' side: opens connections to the broker serving the paired
/// [`MemoryTransport`]. Cheap to clone.
#[derive(Clone)]
pub struct MemoryConnector {
    outgoing: mpsc::Sender<Connection<MemoryReader, MemoryWriter>>,
}

impl MemoryTransport {
    /// A transport and the connector that reaches it.
    pub fn new() -> (MemoryTransport, MemoryConnector) {
        let (outgoing, incoming) = mpsc::channel(PENDING_CONNECTIONS);
        (MemoryTransport { incoming }, MemoryConnector { outgoing })
    }
}

impl Transport for MemoryTransport {
    type Reader = MemoryReader;
    type Writer = MemoryWriter;

    async fn accept(&mut self) -> io::Result<Option<Connection<MemoryReader, MemoryWriter>>> {
        Ok(self.incoming.recv().await)
    }
}

impl MemoryConnector {
    /// Opens a connection; returns the client's halves.
    ///
    /// # Errors
    ///
    /// Fails with [`io::ErrorKind::ConnectionRefused`] when the transport is gone.
    pub async fn connect(&self) -> io::Result<(MemoryReader, MemoryWriter)> {
        let (client, server) = link_pair();
        self.outgoing
            .send(Connection::new(server.0, server.1, "memory"))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "transport closed"))?;
        Ok(client)
    }
}

/// Two connected ends: each end's writer feeds the other end's reader.
fn link_pair() -> ((MemoryReader, MemoryWriter), (MemoryReader, MemoryWriter)) {
    let (a_tx, a_rx) = mpsc::channel(LINK_BATCHES);
    let (b_tx, b_rx) = mpsc::channel(LINK_BATCHES);
    (
        (MemoryReader::new(b_rx), MemoryWriter { tx: Some(a_tx) }),
        (MemoryReader::new(a_rx), MemoryWriter { tx: Some(b_tx) }),
    )
}

/// The inbound half of an in-process connection.
pub struct MemoryReader {
    rx: mpsc::Receiver<Vec<Bytes>>,
    pending: VecDeque<Bytes>,
    read: u64,
}

impl MemoryReader {
    fn new(rx: mpsc::Receiver<Vec<Bytes>>) -> Self {
        MemoryReader {
            rx,
            pending: VecDeque::new(),
            read: 0,
        }
    }
}

impl FrameReader for MemoryReader {
    async fn read_frame(&mut self, max_frame: usize) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                self.read += message.len() as u64;
                return Frame::decode_message(message, max_frame)
                    .map(Some)
                    .map_err(ReadError::from);
            }
            match self.rx.recv().await {
                Some(batch) => self.pending.extend(batch),
                None => return Ok(None),
            }
        }
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// The outbound half of an in-process connection.
pub struct MemoryWriter {
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
}

impl MemoryWriter {
    fn closed() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "in-process link closed")
    }
}

impl FrameWriter for MemoryWriter {
    async fn write_frames(&mut self, frames: &mut Vec<Bytes>) -> io::Result<()> {
        let tx = self.tx.as_ref().ok_or_else(MemoryWriter::closed)?;
        tx.send(std::mem::take(frames))
            .await
            .map_err(|_| MemoryWriter::closed())
    }

    async fn close(&mut self) -> io::Result<()> {
        self.tx = None;
        Ok(())
    }
}
