//! Several brokers as one: what a node hands to the other nodes, what it takes from
//! them, and the [`ClusterBackend`] trait an engine implements to carry it.
//!
//! The broker does the meaning, the backend does the moving. A forwarding worker
//! delivers each message to its local members first, exactly as without a cluster,
//! then offers an [`Outbound`] (the message in a compact envelope) to a bounded
//! queue with `try_send`: local delivery never waits on the backend. The backend
//! drains that queue, finds the other nodes that hold members of the session or
//! connections of the user, and carries the envelope to each of them; on a receiving
//! node it hands the envelope back through [`Inbound::deliver`], which queues it
//! on the same worker as local messages to that target, for local members only.
//!
//! # Interest
//!
//! The broker tells the backend when this node's interest changes: a session got its
//! first local member or lost its last, a user got a first connection here or lost
//! the last one ([`Interest`]). The backend keeps a cluster-wide registry from that,
//! so that a message goes only to nodes that want it.
//!
//! # Nothing lost silently
//!
//! A message that cannot be handed to the backend (its queue is full) or that the
//! backend could not carry (the engine is unreachable, a node listed as interested
//! did not receive it) is counted in [`crate::Stats::cluster_failed`] and reported to
//! the `on_cluster_error` hook, with how many messages it concerns.
//!
//! # Message ids
//!
//! Ids stay unique per node: a message from another node gets a new id from the
//! worker that delivers it here, so one message carries a different id on each node.
//! `on_message` runs on the node where the message was published, with the number of
//! members it reached there.
//!
//! The Redis backend lives in `cluster::redis` (feature `redis`).

mod envelope;
#[cfg(feature = "redis")]
pub mod redis;

use crate::broker::Inner;
use crate::connection::ConnectionState;
use crate::frame::{Frame, NoticeKind, Text};
use crate::hooks;
use crate::message::Target;
use crate::stats::Counters;
use crate::worker::Job;
use bytes::Bytes;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::SystemTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use envelope::{Envelope, EnvelopeError};

/// An engine that carries messages between the nodes of a cluster.
///
/// [`crate::Builder::cluster`] takes one; when the broker is built it calls
/// [`ClusterBackend::run`] once, inside the Tokio runtime, and spawns the future it
/// returns. That future should loop on [`ClusterNode::next`] until it returns
/// [`Next::Closed`] (the broker is shutting down), withdraw this node's registrations,
/// and return; shutdown waits for it.
///
/// A backend must:
///
/// - carry the outbound messages of each batch in the order it took them, so that
///   per sender, per session order holds on every node;
/// - carry each message at most once to each node, and never back to this node;
/// - report what it could not carry with [`ClusterNode::lost`];
/// - keep this node's [`Interest`]s registered while the broker runs, and re-register
///   them after it lost and regained its engine;
/// - never block: it runs on the broker's runtime.
pub trait ClusterBackend: Send + 'static {
    /// Runs the backend for `node` until the broker shuts down.
    fn run(self: Box<Self>, node: ClusterNode) -> BoxFuture<'static, ()>;
}

/// Something this node now holds or no longer holds; ask [`ClusterNode::holds`]
/// which, since changes may arrive after the state they announce has changed again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Interest {
    /// A session whose local member count went from 0 to 1 or from 1 to 0.
    Session(Arc<str>),
    /// A user whose local connection count went from 0 to 1 or from 1 to 0.
    User(Arc<str>),
}

/// A message published on this node, for the other nodes.
pub struct Outbound {
    /// The session or user it goes to.
    pub target: Target,
    /// The message, encoded once for every node ([`Envelope::encode`]).
    pub envelope: Bytes,
    /// For a direct message that reached no connection on this node: the sender to
    /// tell when no other node received it either.
    reply: Option<Reply>,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("target", &self.target)
            .field("envelope_bytes", &self.envelope.len())
            .field("waits_for_reply", &self.reply.is_some())
            .finish()
    }
}

impl Outbound {
    /// Tells the sender of a direct message that nobody received it, when this node
    /// did not deliver it either. Call it when no other node received the message;
    /// for a session message it does nothing.
    pub fn unreached(&mut self, node: &ClusterNode) {
        let (Some(reply), Some(inner)) = (self.reply.take(), node.inner.upgrade()) else {
            return;
        };
        let Some(sender) = reply.sender.upgrade() else {
            return;
        };
        sender.control(
            &Frame::Notice {
                kind: NoticeKind::NotDelivered,
                request: reply.request,
                count: 0,
                subject: Text::from(self.target.id()),
                text: Text::from("no live connection of that user received the message"),
            },
            &inner,
        );
    }
}

/// The connection waiting to hear whether its direct message reached anyone.
struct Reply {
    sender: Weak<ConnectionState>,
    request: u32,
}

/// What [`ClusterNode::next`] found.
#[derive(Debug)]
pub enum Next {
    /// This node's interest in something changed.
    Interest(Interest),
    /// Outbound messages were appended to the batch; this many.
    Outbound(usize),
    /// The broker is shutting down and every outbound message was taken.
    Closed,
}

/// Why a message could not cross to another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterErrorKind {
    /// The queue between the workers and the backend was full.
    QueueFull,
    /// The engine could not be reached or refused the command.
    Unreachable,
    /// A node registered as holding the target did not receive the message (it
    /// crashed, or it is reconnecting).
    NodeMissing,
    /// The backend lost its engine, or could not reach it since the broker was built;
    /// it retries on its own. Reported once per outage, however many attempts fail.
    /// `messages` is 0.
    Disconnected,
    /// An envelope from another node could not be decoded.
    BadEnvelope,
}

/// What `on_cluster_error` is told.
#[derive(Clone, Debug)]
pub struct ClusterErrorInfo {
    /// What went wrong.
    pub kind: ClusterErrorKind,
    /// How many messages (message copies, for [`ClusterErrorKind::NodeMissing`]) did
    /// not cross because of it.
    pub messages: u64,
    /// What went wrong, for people.
    pub detail: String,
}

/// The broker's side of a cluster, held by the broker.
pub(crate) struct Cluster {
    /// This node's id, unique among the nodes with high probability.
    pub node: u64,
    outbound: mpsc::Sender<Outbound>,
    /// Cancelled at shutdown, once the workers are drained.
    pub stop: CancellationToken,
    /// The backend's task.
    pub task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Announces changes of interest from the session map and the registry.
#[derive(Clone)]
pub(crate) struct Watch(mpsc::UnboundedSender<Interest>);

impl Watch {
    pub(crate) fn changed(&self, interest: Interest) {
        // Fails only once the backend is gone, at shutdown.
        let _ = self.0.send(interest);
    }
}

/// The channels between the broker and its backend, made before either exists.
pub(crate) struct Channels {
    outbound: (mpsc::Sender<Outbound>, mpsc::Receiver<Outbound>),
    interest: (
        mpsc::UnboundedSender<Interest>,
        mpsc::UnboundedReceiver<Interest>,
    ),
}

impl Channels {
    pub(crate) fn new(capacity: usize) -> Channels {
        Channels {
            outbound: mpsc::channel(capacity),
            interest: mpsc::unbounded_channel(),
        }
    }

    pub(crate) fn watch(&self) -> Watch {
        Watch(self.interest.0.clone())
    }
}

/// Prepares `backend` for the broker `inner`; returns the broker's side and the
/// backend's future, for the broker to spawn once it is built.
pub(crate) fn prepare(
    backend: Box<dyn ClusterBackend>,
    channels: Channels,
    inner: Weak<Inner>,
) -> (Cluster, BoxFuture<'static, ()>) {
    let node = new_node_id();
    let stop = CancellationToken::new();
    let handle = ClusterNode {
        id: node,
        inner,
        outbound: channels.outbound.1,
        interest: channels.interest.1,
        stop: stop.clone(),
        outage_reported: AtomicBool::new(false),
    };
    let cluster = Cluster {
        node,
        outbound: channels.outbound.0,
        stop,
        task: parking_lot::Mutex::new(None),
    };
    (cluster, backend.run(handle))
}

/// A random node id: the hash of the time, the process and a fresh hasher's keys.
fn new_node_id() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    SystemTime::now().hash(&mut hasher);
    std::process::id().hash(&mut hasher);
    // Zero is kept for "no node".
    hasher.finish().max(1)
}

impl Cluster {
    /// Offers a message published here to the other nodes, without waiting; counts
    /// and reports it when the queue is full.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        inner: &Inner,
        target: Target,
        sent_at: SystemTime,
        sender: &str,
        payload: &Bytes,
        from: Option<&Arc<ConnectionState>>,
        request: Option<u32>,
    ) {
        let envelope = Envelope {
            origin: self.node,
            kind: target.kind(),
            sent_at,
            sender,
            target: target.id(),
            payload: payload.clone(),
        }
        .encode();
        let reply = match (from, request) {
            (Some(from), Some(request)) => Some(Reply {
                sender: Arc::downgrade(from),
                request,
            }),
            _ => None,
        };
        let outbound = Outbound {
            target,
            envelope,
            reply,
        };
        if let Err(e) = self.outbound.try_send(outbound) {
            let (mut outbound, detail) = match e {
                mpsc::error::TrySendError::Full(o) => (o, "the queue to other nodes is full"),
                mpsc::error::TrySendError::Closed(o) => (o, "the cluster backend has stopped"),
            };
            lost(inner, ClusterErrorKind::QueueFull, 1, detail);
            if let Some(reply) = outbound.reply.take() {
                if let Some(sender) = reply.sender.upgrade() {
                    sender.control(
                        &Frame::Notice {
                            kind: NoticeKind::NotDelivered,
                            request: reply.request,
                            count: 0,
                            subject: Text::from(outbound.target.id()),
                            text: Text::from("the message could not reach the other nodes"),
                        },
                        inner,
                    );
                }
            }
        }
    }
}

/// Counts and reports messages that did not cross.
fn lost(inner: &Inner, kind: ClusterErrorKind, messages: u64, detail: &str) {
    Counters::add(&inner.counters.cluster_failed, messages);
    warn!(
        ?kind,
        messages, detail, "messages did not reach other nodes"
    );
    report(inner, kind, messages, detail);
}

fn report(inner: &Inner, kind: ClusterErrorKind, messages: u64, detail: &str) {
    if let Some(hook) = &inner.hooks.on_cluster_error {
        let info = ClusterErrorInfo {
            kind,
            messages,
            detail: detail.to_string(),
        };
        hooks::call("on_cluster_error", &inner.counters, || hook(&info));
    }
}

/// The backend's handle on its broker: what to send, what this node holds, and where
/// to hand what other nodes sent.
pub struct ClusterNode {
    id: u64,
    inner: Weak<Inner>,
    outbound: mpsc::Receiver<Outbound>,
    interest: mpsc::UnboundedReceiver<Interest>,
    stop: CancellationToken,
    /// Whether the current outage, if any, was reported already.
    outage_reported: AtomicBool,
}

impl fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterNode").field("id", &self.id).finish()
    }
}

impl ClusterNode {
    /// This node's id, unique among the nodes of a cluster with high probability.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the next thing to do: a change of interest first, else up to
    /// `limit` outbound messages appended to `batch`. Cancel-safe.
    pub async fn next(&mut self, batch: &mut Vec<Outbound>, limit: usize) -> Next {
        if let Ok(interest) = self.interest.try_recv() {
            return Next::Interest(interest);
        }
        if self.stop.is_cancelled() {
            // Workers are drained before the stop: what is queued is all there is.
            let n = drain(&mut self.outbound, batch, limit);
            return if n > 0 {
                Next::Outbound(n)
            } else {
                Next::Closed
            };
        }
        tokio::select! {
            biased;
            Some(interest) = self.interest.recv() => Next::Interest(interest),
            n = self.outbound.recv_many(batch, limit.max(1)) => {
                if n == 0 { Next::Closed } else { Next::Outbound(n) }
            }
            _ = self.stop.cancelled() => {
                let n = drain(&mut self.outbound, batch, limit);
                if n > 0 { Next::Outbound(n) } else { Next::Closed }
            }
        }
    }

    /// Waits for the next change of interest only, leaving outbound messages queued:
    /// for a backend that keeps its registrations current while it may not carry
    /// messages yet. Returns `None` once the broker is shutting down and every change
    /// was taken; [`ClusterNode::next`] then gives the outbound messages left.
    /// Cancel-safe.
    pub async fn next_interest(&mut self) -> Option<Interest> {
        if let Ok(interest) = self.interest.try_recv() {
            return Some(interest);
        }
        if self.stop.is_cancelled() {
            return None;
        }
        tokio::select! {
            biased;
            Some(interest) = self.interest.recv() => Some(interest),
            _ = self.stop.cancelled() => None,
        }
    }

    /// Whether this node holds the session (has members of it) or the user (has
    /// connections of them) now.
    pub fn holds(&self, interest: &Interest) -> bool {
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        match interest {
            Interest::Session(id) => inner.sessions.members(id).is_some(),
            Interest::User(id) => !inner.registry.of_user(id).is_empty(),
        }
    }

    /// Everything this node holds now: every session with local members and every
    /// user with local connections. For a backend that registers all at once (after
    /// a reconnect, or to refresh registrations that expire).
    pub fn interests(&self) -> Vec<Interest> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let mut all: Vec<Interest> = inner
            .sessions
            .ids()
            .into_iter()
            .map(Interest::Session)
            .collect();
        all.extend(inner.registry.user_ids().into_iter().map(Interest::User));
        all
    }

    /// A handle for the task that receives from other nodes.
    pub fn inbound(&self) -> Inbound {
        Inbound {
            id: self.id,
            inner: self.inner.clone(),
        }
    }

    /// Counts `messages` that did not reach the other nodes, and reports them to
    /// `on_cluster_error`.
    pub fn lost(&self, kind: ClusterErrorKind, messages: u64, detail: &str) {
        if let Some(inner) = self.inner.upgrade() {
            lost(&inner, kind, messages, detail);
        }
    }

    /// Counts message copies handed to other nodes.
    pub fn sent(&self, copies: u64) {
        if let Some(inner) = self.inner.upgrade() {
            Counters::add(&inner.counters.cluster_sent, copies);
        }
    }

    /// Records whether the backend is connected to its engine; call it after every
    /// attempt to connect and when the engine is lost. The first `false` of an outage
    /// is reported to `on_cluster_error` ([`ClusterErrorKind::Disconnected`]), also
    /// when the backend never connected; later ones until the next `true` are not.
    /// Regaining the engine counts a reconnection.
    pub fn set_connected(&self, connected: bool, detail: &str) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let was = inner.counters.cluster_connected.swap(connected, Relaxed);
        if !connected {
            if !self.outage_reported.swap(true, Relaxed) {
                report(&inner, ClusterErrorKind::Disconnected, 0, detail);
            }
            return;
        }
        self.outage_reported.store(false, Relaxed);
        // The first connection is not a reconnection.
        if !was && inner.counters.cluster_connects.fetch_add(1, Relaxed) > 0 {
            Counters::add(&inner.counters.cluster_reconnects, 1);
        }
    }
}

fn drain(queue: &mut mpsc::Receiver<Outbound>, batch: &mut Vec<Outbound>, limit: usize) -> usize {
    let mut n = 0;
    while n < limit.max(1) {
        match queue.try_recv() {
            Ok(outbound) => {
                batch.push(outbound);
                n += 1;
            }
            Err(_) => break,
        }
    }
    n
}

/// Where a backend hands what other nodes sent: cheap to clone, for the task that
/// receives while [`ClusterNode`] sends.
#[derive(Clone)]
pub struct Inbound {
    id: u64,
    inner: Weak<Inner>,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound").field("node", &self.id).finish()
    }
}

impl Inbound {
    /// Hands a message from another node to this node's members or connections. Waits
    /// while the target's worker queue is full. An envelope this node sent itself is
    /// ignored.
    ///
    /// # Errors
    ///
    /// Fails when the envelope cannot be decoded; the failure is also counted and
    /// reported.
    pub async fn deliver(&self, envelope: Bytes) -> Result<(), EnvelopeError> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let message = match Envelope::decode(&envelope) {
            Ok(message) => message,
            Err(e) => {
                lost(&inner, ClusterErrorKind::BadEnvelope, 1, &e.to_string());
                return Err(e);
            }
        };
        if message.origin == self.id {
            return Ok(());
        }
        Counters::add(&inner.counters.cluster_received, 1);
        let worker = inner.worker_for(message.target);
        let job = Job::Remote {
            kind: message.kind,
            sender: Arc::from(message.sender),
            target: Arc::from(message.target),
            sent_at: message.sent_at,
            payload: message.payload,
        };
        // Fails only during shutdown, when nothing more is delivered anyway.
        let _ = inner.enqueue(worker, job).await;
        Ok(())
    }
}
