//! Counters the broker keeps, and the snapshot the host reads.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// A snapshot of the broker's counters, from [`crate::Broker::stats`].
///
/// Gauges (connections, users, sessions) are values now; the rest count since the
/// broker was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live connections (past the handshake).
    pub connections: usize,
    /// Users with at least one live connection.
    pub users: usize,
    /// Sessions with at least one member.
    pub sessions: usize,
    /// Messages accepted for forwarding, from connections and from the host.
    pub messages_received: u64,
    /// Copies of messages queued to members' outboxes.
    pub messages_delivered: u64,
    /// Copies of messages not delivered because a member's outbox was full or
    /// closing.
    pub messages_dropped: u64,
    /// Bytes read from connections.
    pub bytes_in: u64,
    /// Bytes written to connections.
    pub bytes_out: u64,
    /// Frames refused as bad input (each also closed its connection).
    pub frames_rejected: u64,
    /// Connections closed because their outbox overflowed.
    pub slow_consumers: u64,
    /// Handshakes refused (by the host, a limit or bad input).
    pub connections_refused: u64,
    /// Hooks that panicked.
    pub hook_panics: u64,
    /// In a cluster: message copies handed to other nodes.
    pub cluster_sent: u64,
    /// In a cluster: messages received from other nodes.
    pub cluster_received: u64,
    /// In a cluster: messages (or copies, when one node of several missed one) that
    /// did not reach the other nodes that should have had them; each was also
    /// reported to `on_cluster_error`.
    pub cluster_failed: u64,
    /// In a cluster: whether the backend is connected to its engine now.
    pub cluster_connected: bool,
    /// In a cluster: times the backend reconnected after losing its engine.
    pub cluster_reconnects: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections={} users={} sessions={} received={} delivered={} dropped={} \
             bytes_in={} bytes_out={} rejected={} slow={} refused={} hook_panics={} \
             cluster_sent={} cluster_received={} cluster_failed={} cluster_connected={} \
             cluster_reconnects={}",
            self.connections,
            self.users,
            self.sessions,
            self.messages_received,
            self.messages_delivered,
            self.messages_dropped,
            self.bytes_in,
            self.bytes_out,
            self.frames_rejected,
            self.slow_consumers,
            self.connections_refused,
            self.hook_panics,
            self.cluster_sent,
            self.cluster_received,
            self.cluster_failed,
            self.cluster_connected,
            self.cluster_reconnects
        )
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub rejected: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub refused: AtomicU64,
    pub hook_panics: AtomicU64,
    pub cluster_sent: AtomicU64,
    pub cluster_received: AtomicU64,
    pub cluster_failed: AtomicU64,
    pub cluster_connected: AtomicBool,
    /// Successful connections of the cluster backend, the first included.
    pub cluster_connects: AtomicU64,
    pub cluster_reconnects: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn hook_panicked(&self, hook: &'static str) {
        self.hook_panics.fetch_add(1, Relaxed);
        tracing::error!(hook, "hook panicked; the broker goes on");
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            messages_received: self.received.load(Relaxed),
            messages_delivered: self.delivered.load(Relaxed),
            messages_dropped: self.dropped.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            frames_rejected: self.rejected.load(Relaxed),
            slow_consumers: self.slow_consumers.load(Relaxed),
            connections_refused: self.refused.load(Relaxed),
            hook_panics: self.hook_panics.load(Relaxed),
            cluster_sent: self.cluster_sent.load(Relaxed),
            cluster_received: self.cluster_received.load(Relaxed),
            cluster_failed: self.cluster_failed.load(Relaxed),
            cluster_connected: self.cluster_connected.load(Relaxed),
            cluster_reconnects: self.cluster_reconnects.load(Relaxed),
            ..Stats::default()
        }
    }
}
