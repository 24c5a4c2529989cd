//! Error types, one enum per area.

use crate::frame::{DecodeError, ErrorCode};
use std::io;

/// Why reading a frame from a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(#[from] io::Error),
}

/// Why the broker refused a call from the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker is shutting down and takes no new messages.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// A payload larger than the broker's frame limit.
    #[error("payload of {size} bytes is over the frame limit of {max} bytes")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The limit in force ([`crate::Config::max_frame`]).
        max: usize,
    },
    /// A session or user id is empty or longer than the limit.
    #[error("invalid id {id:?}: must be 1 to {max} bytes")]
    InvalidId {
        /// The id as given.
        id: String,
        /// The longest id allowed, in bytes.
        max: usize,
    },
}

/// Why a [`crate::Client`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(#[from] io::Error),
    /// The broker sent bytes that are not a valid frame.
    #[error("invalid frame from the broker: {0}")]
    Decode(#[from] DecodeError),
    /// The broker refused the handshake.
    #[error("connection refused ({code:?}): {reason}")]
    Refused {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        reason: String,
    },
    /// The broker refused one request; the connection goes on.
    #[error("request refused ({code:?}): {reason}")]
    Rejected {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        reason: String,
    },
    /// The connection is closed.
    #[error("connection closed ({code:?}): {reason}")]
    Closed {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        reason: String,
    },
    /// The broker broke the protocol (an unexpected frame, say).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A session or user id is empty or longer than the protocol allows.
    #[error("invalid id {0:?}: must be 1 to 65535 bytes")]
    InvalidId(String),
}
