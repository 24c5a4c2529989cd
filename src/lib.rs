//! switchboard is an embeddable message-push broker.
//!
//! A host application builds a [`Broker`], registers hooks, hands it transports (a
//! TCP listener, an in-process link, connections its own server accepted) and gets a
//! push service: publish/subscribe sessions, direct messages between users, and
//! server push from the host itself.
//!
//! Every inbound message is queued on a bounded ingress queue; a forwarding worker
//! finds its session, encodes it once and offers the same buffer to the outbox of
//! every member except the sender, then calls the host's `on_message` hook. Each
//! connection's writer drains its outbox in batches.
//!
//! # Embedding
//!
//! ```
//! use futures::StreamExt;
//! use switchboard::{Broker, Client, Event, MemoryTransport, TcpTransport};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Broker::builder()
//!     .on_message(|message, reached| {
//!         tracing::info!(id = message.id, reached, "forwarded");
//!     })
//!     .build();
//!
//! // Network clients over TCP, local ones in-process, one broker.
//! let tcp = TcpTransport::bind("127.0.0.1:0").await?;
//! let addr = tcp.local_addr()?;
//! tokio::spawn(broker.serve(tcp));
//! let (local, connector) = MemoryTransport::new();
//! tokio::spawn(broker.serve(local));
//!
//! let mut alice = Client::builder("alice").connect_tcp(addr).await?;
//! let bob = Client::builder("bob").connect_memory(&connector).await?;
//! alice.subscribe("lobby").await?;
//!
//! bob.publish("lobby", "hi from bob").await?;
//! broker.publish("lobby", "hi from the host").await?;
//!
//! // Order holds per sender; two senders may interleave.
//! let mut senders = Vec::new();
//! for _ in 0..2 {
//!     let Some(Event::Message(m)) = alice.next().await else { panic!() };
//!     senders.push(m.sender.to_string());
//! }
//! senders.sort();
//! assert_eq!(senders, ["", "bob"]); // the host's messages have an empty sender
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`broker`]: the builder, the limits, the host's handle and shutdown.
//! - `connection`: one connection's handshake, reader, writer and cleanup.
//! - `worker`: the forwarding workers behind the ingress queues.
//! - `session`: the session map and the registry of connections by user.
//! - `outbox`: the bounded queue in front of each connection's writer.
//! - `heartbeat`: one task that closes silent connections and pings quiet ones.
//! - [`frame`]: the wire protocol's bytes (`docs/protocol.md` specifies them).
//! - `json`: the JSON form of the same frames, for WebSocket text messages (feature
//!   `websocket`).
//! - [`transport`]: where connections come from: TCP, WebSocket, in-process, or the
//!   host's own.
//! - [`client`]: an async client.
//! - [`local`]: connections of the host's own process, with no transport.
//! - [`cluster`]: several brokers as one, through a [`cluster::ClusterBackend`]; the Redis
//!   backend is `cluster::redis` (feature `redis`).
//! - [`hooks`], [`message`], [`stats`], [`error`]: what the host sees.

pub mod broker;
pub mod client;
pub mod cluster;
mod connection;
pub mod error;
pub mod frame;
mod heartbeat;
pub mod hooks;
#[cfg(feature = "websocket")]
pub mod json;
pub mod local;
pub mod message;
mod outbox;
mod session;
pub mod stats;
pub mod transport;
mod worker;

pub use broker::{Broker, Builder, Config, PublishRate, Who};
pub use bytes::Bytes;
pub use client::{Client, ClientBuilder, ClientHandle, Event, Events, Notice};
pub use connection::ConnectionId;
pub use error::{BrokerError, ClientError, ReadError};
pub use frame::ErrorCode;
pub use hooks::{Admission, ConnectInfo, DisconnectInfo, ErrorInfo, LagInfo};
pub use local::{LocalConnection, LocalHandle};
pub use message::{Message, MessageKind, Target};
pub use outbox::SlowConsumerPolicy;
pub use session::{Session, SessionMember};
pub use stats::Stats;
#[cfg(feature = "websocket")]
pub use transport::WebSocketTransport;
pub use transport::{
    Connection, MemoryConnector, MemoryTransport, TcpTransport, Transport, WireFormat,
};

/// The README's examples run as doctests, so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
