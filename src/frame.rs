//! The byte level of the wire protocol: frames, their encoding and their decoding.
//!
//! Every frame on a byte stream is a big-endian `u32` length `L`, then `L` bytes: one
//! kind byte and the body. `docs/protocol.md` gives each body's layout; this module is
//! the one place that reads and writes them. Message-oriented transports (an in-process
//! link, a WebSocket binary message) carry exactly one frame, length prefix included,
//! per message, so the same decoder serves every transport.
//!
//! Decoding never trusts a length a peer sends: a length above the configured maximum is
//! refused before a byte of the body is buffered, and every field is checked against
//! the bytes that are actually there.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// The protocol version this crate speaks, sent in `HELLO` and `WELCOME`.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes taken by the length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;

/// The most a stream decoder reserves ahead of bytes that have arrived.
const RESERVE_STEP: usize = 64 * 1024;

/// Frame kind bytes, as they appear on the wire.
pub mod kind {
    /// Client to broker: opens a connection (version, user id, token).
    pub const HELLO: u8 = 0x01;
    /// Client to broker: join a session.
    pub const SUBSCRIBE: u8 = 0x02;
    /// Client to broker: leave a session.
    pub const UNSUBSCRIBE: u8 = 0x03;
    /// Client to broker: publish a payload to a session.
    pub const PUBLISH: u8 = 0x04;
    /// Client to broker: send a payload to every connection of a user.
    pub const DIRECT: u8 = 0x05;
    /// Either way: are you there?
    pub const PING: u8 = 0x06;
    /// Either way: the answer to `PING`.
    pub const PONG: u8 = 0x07;
    /// Either way: the sender is closing the connection, with a code and a reason.
    pub const CLOSE: u8 = 0x08;
    /// Broker to client: the handshake succeeded.
    pub const WELCOME: u8 = 0x81;
    /// Broker to client: a request succeeded.
    pub const OK: u8 = 0x82;
    /// Broker to client: a request or the connection failed.
    pub const ERROR: u8 = 0x83;
    /// Broker to client: a message for this connection.
    pub const DELIVER: u8 = 0x84;
    /// Broker to client: something happened that the client should know of.
    pub const NOTICE: u8 = 0x85;
}

/// A UTF-8 string held in a shared byte buffer, so that decoding a frame copies nothing.
///
/// The bytes are checked once, when the value is made; [`Text::as_str`] is then free.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Text(Bytes);

impl Text {
    /// Checks that `bytes` are UTF-8 and wraps them.
    pub fn from_utf8(bytes: Bytes) -> Result<Text, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    /// The text as a string slice.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks, or starts from, valid UTF-8, and the bytes
        // are never changed afterwards.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The most bytes a string field can hold on the wire.
pub const MAX_TEXT: usize = u16::MAX as usize;

/// The longest prefix of `s` that fits a string field, cut at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Makes a `Text` from a string, cut to [`MAX_TEXT`] bytes at a character boundary
/// when it is longer, so that every `Text` fits a string field. Ids are checked
/// against their limits before they get here; only free-form reasons are ever cut.
impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(Bytes::copy_from_slice(clip(s).as_bytes()))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        if s.len() <= MAX_TEXT {
            Text(Bytes::from(s))
        } else {
            Text::from(s.as_str())
        }
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a delivered message was published to a session or sent to a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Published to a session; the target is the session id.
    Session,
    /// Sent to a user; the target is that user's id.
    Direct,
}

impl MessageKind {
    fn to_byte(self) -> u8 {
        match self {
            MessageKind::Session => 1,
            MessageKind::Direct => 2,
        }
    }

    fn from_byte(b: u8) -> Option<MessageKind> {
        match b {
            1 => Some(MessageKind::Session),
            2 => Some(MessageKind::Direct),
            _ => None,
        }
    }
}

/// What a `NOTICE` frame tells the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// A direct message reached no connection; `subject` is the user, `request` the
    /// request id of the `DIRECT` frame.
    NotDelivered,
    /// The host closed a session this connection was a member of; `subject` is the
    /// session, `text` the reason.
    SessionClosed,
    /// The broker dropped `count` messages meant for this connection because its outbox
    /// was full.
    Missed,
    /// The host removed this connection from the session `subject`.
    Left,
    /// The host added this connection to the session `subject`.
    Joined,
}

impl NoticeKind {
    fn to_byte(self) -> u8 {
        match self {
            NoticeKind::NotDelivered => 1,
            NoticeKind::SessionClosed => 2,
            NoticeKind::Missed => 3,
            NoticeKind::Left => 4,
            NoticeKind::Joined => 5,
        }
    }

    fn from_byte(b: u8) -> Option<NoticeKind> {
        match b {
            1 => Some(NoticeKind::NotDelivered),
            2 => Some(NoticeKind::SessionClosed),
            3 => Some(NoticeKind::Missed),
            4 => Some(NoticeKind::Left),
            5 => Some(NoticeKind::Joined),
            _ => None,
        }
    }
}

/// The reason codes carried by `ERROR` and `CLOSE` frames.
///
/// Codes below 100 end the connection; codes from 100 refuse one request and the
/// connection goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A normal close, by either side.
    Normal,
    /// A frame whose body does not match its kind's layout.
    Malformed,
    /// A length prefix above the maximum frame size.
    FrameTooLarge,
    /// A kind byte this version does not know, or one only the other side may send.
    UnknownKind,
    /// Traffic before the handshake, or a second `HELLO`.
    HandshakeRequired,
    /// A `HELLO` with a protocol version this broker does not speak.
    UnsupportedVersion,
    /// The host's `on_connect` hook refused the connection.
    Refused,
    /// The broker is at its maximum number of connections.
    TooManyConnections,
    /// Nothing was received for longer than the idle timeout.
    IdleTimeout,
    /// No `HELLO` arrived within the handshake timeout.
    HandshakeTimeout,
    /// The connection's outbox overflowed under the disconnect policy.
    SlowConsumer,
    /// The broker is shutting down.
    ShuttingDown,
    /// A newer connection of the same user replaced this one.
    Replaced,
    /// The stream ended inside a frame.
    Truncated,
    /// The host closed the connection.
    ClosedByHost,
    /// A session or user id that is empty or too long.
    InvalidId,
    /// The connection already belongs to the maximum number of sessions.
    TooManySessions,
    /// The connection is publishing faster than its allowed rate.
    RateLimited,
    /// The broker cannot take the request now (it is shutting down, say).
    Unavailable,
    /// A code this version does not know; kept so that newer peers can be understood.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Normal => 0,
            ErrorCode::Malformed => 1,
            ErrorCode::FrameTooLarge => 2,
            ErrorCode::UnknownKind => 3,
            ErrorCode::HandshakeRequired => 4,
            ErrorCode::UnsupportedVersion => 5,
            ErrorCode::Refused => 6,
            ErrorCode::TooManyConnections => 7,
            ErrorCode::IdleTimeout => 8,
            ErrorCode::HandshakeTimeout => 9,
            ErrorCode::SlowConsumer => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::Replaced => 12,
            ErrorCode::Truncated => 13,
            ErrorCode::ClosedByHost => 14,
            ErrorCode::InvalidId => 100,
            ErrorCode::TooManySessions => 101,
            ErrorCode::RateLimited => 102,
            ErrorCode::Unavailable => 103,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a number read from the wire.
    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            0 => ErrorCode::Normal,
            1 => ErrorCode::Malformed,
            2 => ErrorCode::FrameTooLarge,
            3 => ErrorCode::UnknownKind,
            4 => ErrorCode::HandshakeRequired,
            5 => ErrorCode::UnsupportedVersion,
            6 => ErrorCode::Refused,
            7 => ErrorCode::TooManyConnections,
            8 => ErrorCode::IdleTimeout,
            9 => ErrorCode::HandshakeTimeout,
            10 => ErrorCode::SlowConsumer,
            11 => ErrorCode::ShuttingDown,
            12 => ErrorCode::Replaced,
            13 => ErrorCode::Truncated,
            14 => ErrorCode::ClosedByHost,
            100 => ErrorCode::InvalidId,
            101 => ErrorCode::TooManySessions,
            102 => ErrorCode::RateLimited,
            103 => ErrorCode::Unavailable,
            n => ErrorCode::Other(n),
        }
    }

    /// Whether this code ends the connection.
    pub fn is_fatal(self) -> bool {
        self.to_u16() < 100
    }
}

/// One frame of the protocol, in either direction.
///
/// Strings and payloads share the buffer the frame was decoded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens a connection. `token` is handed to the host's `on_connect` hook.
    Hello {
        /// Protocol version the client speaks.
        version: u8,
        /// The user id the client asks for.
        user: Text,
        /// Credentials for the host to check; empty when the client has none.
        token: Bytes,
    },
    /// The broker accepted the handshake.
    Welcome {
        /// Protocol version the broker speaks.
        version: u8,
        /// The broker's id for this connection.
        connection: u64,
        /// The user id the connection acts as (the host may have chosen it).
        user: Text,
        /// How often each side should send something, in milliseconds.
        heartbeat_ms: u32,
        /// The largest frame the broker accepts, length prefix excluded.
        max_frame: u32,
    },
    /// Join a session.
    Subscribe {
        /// Echoed in the `OK` or `ERROR` that answers it.
        request: u32,
        /// The session to join.
        session: Text,
    },
    /// Leave a session.
    Unsubscribe {
        /// Echoed in the `OK` or `ERROR` that answers it.
        request: u32,
        /// The session to leave.
        session: Text,
    },
    /// Publish to every member of a session but the sender.
    Publish {
        /// Named in an `ERROR` or notice about this publication; no `OK` answers it.
        request: u32,
        /// The target session.
        session: Text,
        /// The message's bytes.
        payload: Bytes,
    },
    /// Send to every connection of a user.
    Direct {
        /// Named in a `NotDelivered` notice or an `ERROR`; no `OK` answers it.
        request: u32,
        /// The target user.
        user: Text,
        /// The message's bytes.
        payload: Bytes,
    },
    /// A request succeeded.
    Ok {
        /// The request id it answers.
        request: u32,
    },
    /// A request failed, or (with a fatal code) the connection is about to close.
    Error {
        /// The request id it answers; 0 when it answers no request.
        request: u32,
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        reason: Text,
    },
    /// A message delivered to this connection.
    Deliver {
        /// Unique per broker.
        id: u64,
        /// Session publication or direct message.
        kind: MessageKind,
        /// When the broker accepted it, in microseconds since the Unix epoch.
        sent_at_us: u64,
        /// The sending user, stamped by the broker; empty for a push from the host.
        sender: Text,
        /// The session or user it was sent to.
        target: Text,
        /// The message's bytes.
        payload: Bytes,
    },
    /// Something the client should know of.
    Notice {
        /// What happened.
        kind: NoticeKind,
        /// The request it concerns, or 0.
        request: u32,
        /// A count (messages missed), or 0.
        count: u64,
        /// The session or user it concerns, or empty.
        subject: Text,
        /// A reason for people, or empty.
        text: Text,
    },
    /// Are you there?
    Ping,
    /// Yes.
    Pong,
    /// The sender is closing the connection.
    Close {
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        reason: Text,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is above the maximum.
    #[error("frame of {length} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The length the peer announced.
        length: u64,
        /// The limit in force.
        max: usize,
    },
    /// The length prefix is zero, so there is not even a kind byte.
    #[error("frame has length 0")]
    Empty,
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A JSON text message names a `"type"` that is no frame of this version.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// The body does not match its kind's layout.
    #[error("malformed {kind} frame: {what}")]
    Malformed {
        /// The frame kind's name.
        kind: &'static str,
        /// What was wrong.
        what: &'static str,
    },
    /// A message-oriented transport delivered a message whose length prefix disagrees
    /// with its size.
    #[error("frame length prefix says {announced} bytes but the message holds {actual}")]
    LengthMismatch {
        /// What the prefix said.
        announced: usize,
        /// What was there.
        actual: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// How many bytes of the partial frame had arrived.
        buffered: usize,
    },
}

impl DecodeError {
    /// The code a broker sends when closing a connection for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownKind(_) | DecodeError::UnknownType(_) => ErrorCode::UnknownKind,
            DecodeError::Truncated { .. } => ErrorCode::Truncated,
            _ => ErrorCode::Malformed,
        }
    }
}

impl Frame {
    /// The frame kind's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind_byte())
    }

    /// The kind byte this frame is sent with.
    pub fn kind_byte(&self) -> u8 {
        match self {
            Frame::Hello { .. } => kind::HELLO,
            Frame::Welcome { .. } => kind::WELCOME,
            Frame::Subscribe { .. } => kind::SUBSCRIBE,
            Frame::Unsubscribe { .. } => kind::UNSUBSCRIBE,
            Frame::Publish { .. } => kind::PUBLISH,
            Frame::Direct { .. } => kind::DIRECT,
            Frame::Ok { .. } => kind::OK,
            Frame::Error { .. } => kind::ERROR,
            Frame::Deliver { .. } => kind::DELIVER,
            Frame::Notice { .. } => kind::NOTICE,
            Frame::Ping => kind::PING,
            Frame::Pong => kind::PONG,
            Frame::Close { .. } => kind::CLOSE,
        }
    }

    /// Encodes the frame, length prefix included, into one buffer.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }

    /// The number of bytes [`Frame::encode`] produces.
    pub fn encoded_len(&self) -> usize {
        LENGTH_PREFIX + 1 + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            Frame::Hello { user, token, .. } => 1 + 2 + user.len() + 2 + token.len(),
            Frame::Welcome { user, .. } => 1 + 8 + 2 + user.len() + 4 + 4,
            Frame::Subscribe { session, .. } | Frame::Unsubscribe { session, .. } => {
                4 + 2 + session.len()
            }
            Frame::Publish {
                session, payload, ..
            } => 4 + 2 + session.len() + payload.len(),
            Frame::Direct { user, payload, .. } => 4 + 2 + user.len() + payload.len(),
            Frame::Ok { .. } => 4,
            Frame::Error { reason, .. } => 4 + 2 + 2 + reason.len(),
            Frame::Deliver {
                sender,
                target,
                payload,
                ..
            } => deliver_body_len(sender.as_str(), target.as_str(), payload.len()),
            Frame::Notice { subject, text, .. } => 1 + 4 + 8 + 2 + subject.len() + 2 + text.len(),
            Frame::Ping | Frame::Pong => 0,
            Frame::Close { reason, .. } => 2 + 2 + reason.len(),
        }
    }

    /// Appends the encoded frame, length prefix included, to `buf`.
    ///
    /// # Panics
    ///
    /// Panics when a string field is longer than 65,535 bytes or the frame longer than
    /// `u32::MAX`; the broker and [`crate::Client`] check lengths before they get here.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        let body = self.body_len();
        buf.reserve(LENGTH_PREFIX + 1 + body);
        buf.put_u32(u32::try_from(1 + body).expect("frame longer than u32::MAX"));
        buf.put_u8(self.kind_byte());
        match self {
            Frame::Hello {
                version,
                user,
                token,
            } => {
                buf.put_u8(*version);
                put_str16(buf, user.as_str());
                put_bytes16(buf, token);
            }
            Frame::Welcome {
                version,
                connection,
                user,
                heartbeat_ms,
                max_frame,
            } => {
                buf.put_u8(*version);
                buf.put_u64(*connection);
                put_str16(buf, user.as_str());
                buf.put_u32(*heartbeat_ms);
                buf.put_u32(*max_frame);
            }
            Frame::Subscribe { request, session } | Frame::Unsubscribe { request, session } => {
                buf.put_u32(*request);
                put_str16(buf, session.as_str());
            }
            Frame::Publish {
                request,
                session,
                payload,
            } => {
                buf.put_u32(*request);
                put_str16(buf, session.as_str());
                buf.put_slice(payload);
            }
            Frame::Direct {
                request,
                user,
                payload,
            } => {
                buf.put_u32(*request);
                put_str16(buf, user.as_str());
                buf.put_slice(payload);
            }
            Frame::Ok { request } => buf.put_u32(*request),
            Frame::Error {
                request,
                code,
                reason,
            } => {
                buf.put_u32(*request);
                buf.put_u16(code.to_u16());
                put_str16(buf, reason.as_str());
            }
            Frame::Deliver {
                id,
                kind,
                sent_at_us,
                sender,
                target,
                payload,
            } => {
                put_deliver_body(
                    buf,
                    *id,
                    *kind,
                    *sent_at_us,
                    sender.as_str(),
                    target.as_str(),
                    payload,
                );
            }
            Frame::Notice {
                kind,
                request,
                count,
                subject,
                text,
            } => {
                buf.put_u8(kind.to_byte());
                buf.put_u32(*request);
                buf.put_u64(*count);
                put_str16(buf, subject.as_str());
                put_str16(buf, text.as_str());
            }
            Frame::Ping | Frame::Pong => {}
            Frame::Close { code, reason } => {
                buf.put_u16(code.to_u16());
                put_str16(buf, reason.as_str());
            }
        }
    }

    /// Decodes one whole frame, length prefix included, as carried by a
    /// message-oriented transport.
    ///
    /// # Errors
    ///
    /// Fails when the prefix disagrees with the message's size, when the frame is over
    /// `max_frame`, or when its body is not a valid frame.
    pub fn decode_message(mut message: Bytes, max_frame: usize) -> Result<Frame, DecodeError> {
        if message.len() < LENGTH_PREFIX {
            return Err(DecodeError::Truncated {
                buffered: message.len(),
            });
        }
        let announced = message.get_u32() as usize;
        if announced > max_frame {
            return Err(DecodeError::TooLarge {
                length: announced as u64,
                max: max_frame,
            });
        }
        if announced != message.len() {
            return Err(DecodeError::LengthMismatch {
                announced,
                actual: message.len(),
            });
        }
        Frame::decode_body(message)
    }

    /// Decodes a frame from the front of a stream buffer, removing its bytes.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame. When it holds
    /// the start of a frame, room for more of it is reserved, at most 64 KiB ahead of
    /// what has arrived, so a peer's claim alone never sizes an allocation.
    ///
    /// # Errors
    ///
    /// Fails as soon as the length prefix is over `max_frame` (the body is not
    /// waited for), or when a whole frame is not valid.
    pub fn decode_stream(
        buf: &mut BytesMut,
        max_frame: usize,
    ) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if length > max_frame {
            return Err(DecodeError::TooLarge {
                length: length as u64,
                max: max_frame,
            });
        }
        let total = LENGTH_PREFIX + length;
        if buf.len() < total {
            // Room for the rest, but only a bounded step at a time: a peer that
            // announces a large frame and sends nothing more costs little.
            buf.reserve((total - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        buf.advance(LENGTH_PREFIX);
        let body = buf.split_to(length).freeze();
        Frame::decode_body(body).map(Some)
    }

    /// Decodes a frame from its kind byte and body (no length prefix).
    ///
    /// # Errors
    ///
    /// Fails when `body` is empty, its kind unknown or its layout wrong.
    pub fn decode_body(mut body: Bytes) -> Result<Frame, DecodeError> {
        if body.is_empty() {
            return Err(DecodeError::Empty);
        }
        let kind_byte = body.get_u8();
        let mut r = Reader {
            buf: body,
            kind: kind_name(kind_byte),
        };
        let frame = match kind_byte {
            kind::HELLO => Frame::Hello {
                version: r.u8()?,
                user: r.str16()?,
                token: r.bytes16()?,
            },
            kind::WELCOME => Frame::Welcome {
                version: r.u8()?,
                connection: r.u64()?,
                user: r.str16()?,
                heartbeat_ms: r.u32()?,
                max_frame: r.u32()?,
            },
            kind::SUBSCRIBE => Frame::Subscribe {
                request: r.u32()?,
                session: r.str16()?,
            },
            kind::UNSUBSCRIBE => Frame::Unsubscribe {
                request: r.u32()?,
                session: r.str16()?,
            },
            kind::PUBLISH => Frame::Publish {
                request: r.u32()?,
                session: r.str16()?,
                payload: r.rest(),
            },
            kind::DIRECT => Frame::Direct {
                request: r.u32()?,
                user: r.str16()?,
                payload: r.rest(),
            },
            kind::OK => Frame::Ok { request: r.u32()? },
            kind::ERROR => Frame::Error {
                request: r.u32()?,
                code: ErrorCode::from_u16(r.u16()?),
                reason: r.str16()?,
            },
            kind::DELIVER => Frame::Deliver {
                id: r.u64()?,
                kind: MessageKind::from_byte(r.u8()?).ok_or(r.malformed("unknown message kind"))?,
                sent_at_us: r.u64()?,
                sender: r.str16()?,
                target: r.str16()?,
                payload: r.rest(),
            },
            kind::NOTICE => Frame::Notice {
                kind: NoticeKind::from_byte(r.u8()?).ok_or(r.malformed("unknown notice kind"))?,
                request: r.u32()?,
                count: r.u64()?,
                subject: r.str16()?,
                text: r.str16()?,
            },
            kind::PING => Frame::Ping,
            kind::PONG => Frame::Pong,
            kind::CLOSE => Frame::Close {
                code: ErrorCode::from_u16(r.u16()?),
                reason: r.str16()?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

/// The body length of a `DELIVER` frame with these fields.
pub(crate) fn deliver_body_len(sender: &str, target: &str, payload: usize) -> usize {
    8 + 1 + 8 + 2 + sender.len() + 2 + target.len() + payload
}

/// Encodes a `DELIVER` frame without building a [`Frame`] first, so that the
/// forwarding worker can encode a message from the parts it already holds.
pub(crate) fn encode_deliver(
    id: u64,
    kind: MessageKind,
    sent_at_us: u64,
    sender: &str,
    target: &str,
    payload: &[u8],
) -> Bytes {
    let body = 1 + deliver_body_len(sender, target, payload.len());
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX + body);
    buf.put_u32(u32::try_from(body).expect("frame longer than u32::MAX"));
    buf.put_u8(kind::DELIVER);
    put_deliver_body(&mut buf, id, kind, sent_at_us, sender, target, payload);
    buf.freeze()
}

fn put_deliver_body(
    buf: &mut BytesMut,
    id: u64,
    kind: MessageKind,
    sent_at_us: u64,
    sender: &str,
    target: &str,
    payload: &[u8],
) {
    buf.put_u64(id);
    buf.put_u8(kind.to_byte());
    buf.put_u64(sent_at_us);
    put_str16(buf, sender);
    put_str16(buf, target);
    buf.put_slice(payload);
}

/// The fields of an encoded `DELIVER` frame, read in place by [`read_deliver`]: the
/// ids borrow the frame, and the payload is what follows `payload_at`.
pub(crate) struct DeliverHeader<'a> {
    pub id: u64,
    pub kind: MessageKind,
    pub sent_at_us: u64,
    pub sender: &'a str,
    pub target: &'a str,
    pub payload_at: usize,
}

/// Reads the header of a whole encoded `DELIVER` frame, length prefix first, as
/// [`encode_deliver`] writes it, without slicing the buffer: a frame shared by every
/// member of a session is then read without touching its reference count. `None` for
/// anything else, or a header cut short. The length prefix is not checked; the caller
/// holds the frame whole.
pub(crate) fn read_deliver(frame: &[u8]) -> Option<DeliverHeader<'_>> {
    let u64_at = |at: usize| Some(u64::from_be_bytes(frame.get(at..at + 8)?.try_into().ok()?));
    let str_at = |at: usize| -> Option<(&str, usize)> {
        let len = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?) as usize;
        let text = std::str::from_utf8(frame.get(at + 2..at + 2 + len)?).ok()?;
        Some((text, at + 2 + len))
    };
    if frame.get(LENGTH_PREFIX) != Some(&kind::DELIVER) {
        return None;
    }
    // After the kind byte: id, message kind, time sent, then the two ids.
    let at = LENGTH_PREFIX + 1;
    let id = u64_at(at)?;
    let kind = MessageKind::from_byte(*frame.get(at + 8)?)?;
    let sent_at_us = u64_at(at + 9)?;
    let (sender, at) = str_at(at + 17)?;
    let (target, payload_at) = str_at(at)?;
    Some(DeliverHeader {
        id,
        kind,
        sent_at_us,
        sender,
        target,
        payload_at,
    })
}

/// The name of a frame kind byte, for logs and errors.
pub fn kind_name(kind_byte: u8) -> &'static str {
    match kind_byte {
        kind::HELLO => "HELLO",
        kind::WELCOME => "WELCOME",
        kind::SUBSCRIBE => "SUBSCRIBE",
        kind::UNSUBSCRIBE => "UNSUBSCRIBE",
        kind::PUBLISH => "PUBLISH",
        kind::DIRECT => "DIRECT",
        kind::OK => "OK",
        kind::ERROR => "ERROR",
        kind::DELIVER => "DELIVER",
        kind::NOTICE => "NOTICE",
        kind::PING => "PING",
        kind::PONG => "PONG",
        kind::CLOSE => "CLOSE",
        _ => "unknown",
    }
}

fn put_str16(buf: &mut BytesMut, s: &str) {
    put_bytes16(buf, s.as_bytes());
}

fn put_bytes16(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u16(u16::try_from(b.len()).expect("string field longer than 65535 bytes"));
    buf.put_slice(b);
}

/// Reads fields off a frame body, turning a short body into a [`DecodeError`].
struct Reader {
    buf: Bytes,
    kind: &'static str,
}

impl Reader {
    fn malformed(&self, what: &'static str) -> DecodeError {
        DecodeError::Malformed {
            kind: self.kind,
            what,
        }
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(self.malformed("body is shorter than its fields"))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    fn bytes16(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    fn str16(&mut self) -> Result<Text, DecodeError> {
        let bytes = self.bytes16()?;
        Text::from_utf8(bytes).map_err(|_| self.malformed("string is not valid UTF-8"))
    }

    fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            Err(self.malformed("bytes left over after the last field"))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_helper_matches_frame_encoding() {
        let frame = Frame::Deliver {
            id: 7,
            kind: MessageKind::Session,
            sent_at_us: 99,
            sender: "alice".into(),
            target: "room".into(),
            payload: Bytes::from_static(b"hi"),
        };
        let fast = encode_deliver(7, MessageKind::Session, 99, "alice", "room", b"hi");
        assert_eq!(frame.encode(), fast);
        assert_eq!(frame.encoded_len(), fast.len());
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, kind::PING][..]);
        let err = Frame::decode_stream(&mut buf, 1024).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert!(
            buf.capacity() < 1024,
            "nothing was reserved for the claimed length"
        );
    }
}
