//! The envelope: one message as it travels between nodes.
//!
//! ```text
//! version  u8    1
//! kind     u8    1 session, 2 direct
//! origin   u64   the publishing node's id
//! sent_at  u64   microseconds since the Unix epoch
//! sender   u16 length, then UTF-8 bytes (empty for the host)
//! target   u16 length, then UTF-8 bytes (the session or user id)
//! payload  the rest
//! ```
//!
//! Integers are big-endian, as in the client protocol. The payload is not copied when
//! decoding: it is a slice of the envelope's buffer.

use crate::message::{from_unix_micros, unix_micros, MessageKind};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::time::SystemTime;

const VERSION: u8 = 1;

/// Fixed part: version, kind, origin, sent_at, the two length prefixes.
const HEADER: usize = 1 + 1 + 8 + 8 + 2 + 2;

/// One message between nodes. Encoded by the publishing node, decoded by the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The node where the message was published.
    pub origin: u64,
    /// Session publication or direct message.
    pub kind: MessageKind,
    /// When the publishing node accepted it.
    pub sent_at: SystemTime,
    /// The sending user; empty for the host.
    pub sender: &'a str,
    /// The session or user id.
    pub target: &'a str,
    /// The message's bytes.
    pub payload: Bytes,
}

/// Why bytes from another node are not an envelope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Fewer bytes than the header and the lengths it announces.
    #[error("envelope truncated: {0} bytes")]
    Truncated(usize),
    /// An envelope version this node does not read.
    #[error("envelope version {0} is not supported")]
    Version(u8),
    /// A kind byte that is neither session nor direct.
    #[error("unknown message kind {0} in an envelope")]
    Kind(u8),
    /// A sender or target that is not UTF-8.
    #[error("an envelope's sender or target is not UTF-8")]
    Utf8,
}

impl<'a> Envelope<'a> {
    /// Encodes the envelope into one buffer.
    ///
    /// # Panics
    ///
    /// Panics when the sender or target is longer than 65,535 bytes; the broker's ids
    /// never are ([`crate::Config::max_id_len`]).
    pub fn encode(&self) -> Bytes {
        let sender = u16::try_from(self.sender.len()).expect("sender id fits a u16 length");
        let target = u16::try_from(self.target.len()).expect("target id fits a u16 length");
        let len = HEADER + self.sender.len() + self.target.len() + self.payload.len();
        let mut buf = BytesMut::with_capacity(len);
        buf.put_u8(VERSION);
        buf.put_u8(match self.kind {
            MessageKind::Session => 1,
            MessageKind::Direct => 2,
        });
        buf.put_u64(self.origin);
        buf.put_u64(unix_micros(self.sent_at));
        buf.put_u16(sender);
        buf.put_slice(self.sender.as_bytes());
        buf.put_u16(target);
        buf.put_slice(self.target.as_bytes());
        buf.put_slice(&self.payload);
        buf.freeze()
    }

    /// Decodes an envelope; the payload is a slice of `bytes`.
    ///
    /// # Errors
    ///
    /// Fails on a truncated envelope, an unknown version or kind, or ids that are not
    /// UTF-8.
    pub fn decode(bytes: &'a Bytes) -> Result<Envelope<'a>, EnvelopeError> {
        let truncated = || EnvelopeError::Truncated(bytes.len());
        let mut buf = &bytes[..];
        if buf.len() < HEADER {
            return Err(truncated());
        }
        let version = buf.get_u8();
        if version != VERSION {
            return Err(EnvelopeError::Version(version));
        }
        let kind = match buf.get_u8() {
            1 => MessageKind::Session,
            2 => MessageKind::Direct,
            other => return Err(EnvelopeError::Kind(other)),
        };
        let origin = buf.get_u64();
        let sent_at = from_unix_micros(buf.get_u64());

        let string = |buf: &mut &'a [u8]| -> Result<&'a str, EnvelopeError> {
            if buf.len() < 2 {
                return Err(truncated());
            }
            let len = buf.get_u16() as usize;
            if buf.len() < len {
                return Err(truncated());
            }
            let (s, rest) = buf.split_at(len);
            *buf = rest;
            std::str::from_utf8(s).map_err(|_| EnvelopeError::Utf8)
        };
        let sender = string(&mut buf)?;
        let target = string(&mut buf)?;
        let payload = bytes.slice(bytes.len() - buf.len()..);

        Ok(Envelope {
            origin,
            kind,
            sent_at,
            sender,
            target,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn round_trip() {
        let envelope = Envelope {
            origin: 7,
            kind: MessageKind::Direct,
            sent_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            sender: "alice",
            target: "bob",
            payload: Bytes::from_static(b"hello"),
        };
        let bytes = envelope.encode();
        assert_eq!(Envelope::decode(&bytes), Ok(envelope));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = Envelope {
            origin: 1,
            kind: MessageKind::Session,
            sent_at: UNIX_EPOCH,
            sender: "",
            target: "room",
            payload: Bytes::new(),
        }
        .encode();
        for len in 0..bytes.len() {
            let cut = bytes.slice(..len);
            assert!(Envelope::decode(&cut).is_err(), "{len} bytes decoded");
        }
    }

    #[test]
    fn unknown_version_and_kind() {
        let mut bytes = Envelope {
            origin: 1,
            kind: MessageKind::Session,
            sent_at: UNIX_EPOCH,
            sender: "a",
            target: "b",
            payload: Bytes::new(),
        }
        .encode()
        .to_vec();
        bytes[1] = 9;
        let b = Bytes::from(bytes.clone());
        assert_eq!(Envelope::decode(&b), Err(EnvelopeError::Kind(9)));
        bytes[0] = 2;
        let b = Bytes::from(bytes);
        assert_eq!(Envelope::decode(&b), Err(EnvelopeError::Version(2)));
    }
}
