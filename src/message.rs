//! The meaning level: a message as the broker and the host see it.

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::frame::MessageKind;

/// Where a message goes: every member of a session, or every connection of a user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A session id.
    Session(Arc<str>),
    /// A user id.
    User(Arc<str>),
}

impl Target {
    /// The session or user id.
    pub fn id(&self) -> &str {
        match self {
            Target::Session(id) | Target::User(id) => id,
        }
    }

    /// The message kind that goes with this target.
    pub fn kind(&self) -> MessageKind {
        match self {
            Target::Session(_) => MessageKind::Session,
            Target::User(_) => MessageKind::Direct,
        }
    }
}

/// One message: what the broker forwards, what `on_message` sees and what a
/// [`crate::Client`] receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Unique among the messages of one broker.
    pub id: u64,
    /// Session publication or direct message.
    pub kind: MessageKind,
    /// The sending user, stamped by the broker from the connection's handshake; never
    /// read from the wire. Empty for a message the host pushed itself.
    pub sender: Arc<str>,
    /// The session or user the message was sent to.
    pub target: Target,
    /// When the broker accepted the message.
    pub sent_at: SystemTime,
    /// The message's bytes, shared and never copied per recipient.
    pub payload: Bytes,
}

impl Message {
    /// Whether the host pushed this message rather than a connection.
    pub fn is_from_host(&self) -> bool {
        self.sender.is_empty()
    }
}

/// Microseconds since the Unix epoch, as carried on the wire.
pub(crate) fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The time for a wire timestamp.
pub(crate) fn from_unix_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}
