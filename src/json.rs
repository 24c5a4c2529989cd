//! The JSON form of the protocol, carried by WebSocket text messages.
//!
//! Each text message is one JSON object whose `"type"` names the frame kind; the other
//! fields are the binary frame's fields under the same names (`docs/protocol.md`,
//! "The JSON form"). Payloads travel as a JSON string in `"payload"` when they are
//! UTF-8, and as standard base64 in `"payload_base64"` otherwise, so a browser can
//! send and receive text without ever touching base64, and binary payloads still
//! arrive intact.
//!
//! Decoding produces the same [`Frame`]s the binary decoder does, so the broker treats
//! both forms alike; a JSON object that is not a valid frame is a
//! [`DecodeError::Malformed`] frame like any other.

use crate::frame::{DecodeError, ErrorCode, Frame, MessageKind, NoticeKind, Text};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One frame as a JSON object, for both directions.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JsonFrame {
    Hello {
        version: u8,
        user: String,
        #[serde(default)]
        token: String,
    },
    Welcome {
        version: u8,
        connection: u64,
        user: String,
        heartbeat_ms: u32,
        max_frame: u32,
    },
    Subscribe {
        #[serde(default)]
        request: u32,
        session: String,
    },
    Unsubscribe {
        #[serde(default)]
        request: u32,
        session: String,
    },
    Publish {
        #[serde(default)]
        request: u32,
        session: String,
        #[serde(flatten)]
        payload: Payload,
    },
    Direct {
        #[serde(default)]
        request: u32,
        user: String,
        #[serde(flatten)]
        payload: Payload,
    },
    Ok {
        request: u32,
    },
    Error {
        request: u32,
        code: u16,
        reason: String,
    },
    Deliver {
        id: u64,
        kind: JsonKind,
        sent_at_us: u64,
        sender: String,
        target: String,
        #[serde(flatten)]
        payload: Payload,
    },
    Notice {
        kind: JsonNotice,
        #[serde(default)]
        request: u32,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        subject: String,
        #[serde(default)]
        text: String,
    },
    Ping,
    Pong,
    Close {
        #[serde(default)]
        code: u16,
        #[serde(default)]
        reason: String,
    },
}

/// A payload: text when it is UTF-8, base64 otherwise. Exactly one is present.
#[derive(Serialize, Deserialize, Default)]
struct Payload {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    payload_base64: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum JsonKind {
    Session,
    Direct,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum JsonNotice {
    NotDelivered,
    SessionClosed,
    Missed,
    Left,
    Joined,
}

/// The JSON field names of a `DELIVER`, borrowed, so that the forwarding worker
/// encodes a message without building owned strings first.
#[derive(Serialize)]
struct DeliverOut<'a> {
    #[serde(rename = "type")]
    kind_of_frame: &'static str,
    id: u64,
    kind: JsonKind,
    sent_at_us: u64,
    sender: &'a str,
    target: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

fn malformed(what: &'static str) -> DecodeError {
    DecodeError::Malformed { kind: "JSON", what }
}

impl Payload {
    fn of(bytes: &[u8]) -> Payload {
        match std::str::from_utf8(bytes) {
            Ok(text) => Payload {
                payload: Some(text.to_string()),
                payload_base64: None,
            },
            Err(_) => Payload {
                payload: None,
                payload_base64: Some(BASE64.encode(bytes)),
            },
        }
    }

    fn into_bytes(self) -> Result<Bytes, DecodeError> {
        match (self.payload, self.payload_base64) {
            (Some(text), None) => Ok(Bytes::from(text)),
            (None, Some(encoded)) => BASE64
                .decode(encoded)
                .map(Bytes::from)
                .map_err(|_| malformed("payload_base64 is not valid base64")),
            (None, None) => Ok(Bytes::new()),
            (Some(_), Some(_)) => Err(malformed("both payload and payload_base64")),
        }
    }
}

/// A string field, checked against what the binary form can carry.
fn text(s: String) -> Result<Text, DecodeError> {
    if s.len() > crate::frame::MAX_TEXT {
        return Err(malformed("a string field is longer than 65535 bytes"));
    }
    Ok(Text::from(s))
}

/// The `"type"` of every frame, as [`JsonFrame`] names them.
const TYPES: [&str; 13] = [
    "hello",
    "welcome",
    "subscribe",
    "unsubscribe",
    "publish",
    "direct",
    "ok",
    "error",
    "deliver",
    "notice",
    "ping",
    "pong",
    "close",
];

/// Why a text message is not a frame. An unknown `"type"` is told apart from a known
/// one with bad fields, as the binary form tells an unknown kind byte from a malformed
/// body; the second parse happens only for messages that are refused anyway.
fn refusal(message: &str) -> DecodeError {
    #[derive(Deserialize)]
    struct Tagged {
        #[serde(rename = "type")]
        kind: String,
    }
    match serde_json::from_str::<Tagged>(message) {
        Ok(Tagged { mut kind }) if !TYPES.contains(&kind.as_str()) => {
            // The name goes back in the error's reason: keep it short.
            let mut end = kind.len().min(64);
            while !kind.is_char_boundary(end) {
                end -= 1;
            }
            kind.truncate(end);
            DecodeError::UnknownType(kind)
        }
        _ => malformed("not a JSON object of a known frame type with its fields"),
    }
}

/// Decodes one text message into a frame.
///
/// # Errors
///
/// Fails with [`DecodeError::TooLarge`] when the message is longer than `max_frame`
/// bytes, and with [`DecodeError::Malformed`] when it is not a JSON object of a known
/// `"type"` with the fields that type needs.
pub fn decode(message: &str, max_frame: usize) -> Result<Frame, DecodeError> {
    if message.len() > max_frame {
        return Err(DecodeError::TooLarge {
            length: message.len() as u64,
            max: max_frame,
        });
    }
    let parsed: JsonFrame = serde_json::from_str(message).map_err(|_| refusal(message))?;
    Ok(match parsed {
        JsonFrame::Hello {
            version,
            user,
            token,
        } => Frame::Hello {
            version,
            user: text(user)?,
            token: text(token)?.as_str().as_bytes().to_vec().into(),
        },
        JsonFrame::Welcome {
            version,
            connection,
            user,
            heartbeat_ms,
            max_frame,
        } => Frame::Welcome {
            version,
            connection,
            user: text(user)?,
            heartbeat_ms,
            max_frame,
        },
        JsonFrame::Subscribe { request, session } => Frame::Subscribe {
            request,
            session: text(session)?,
        },
        JsonFrame::Unsubscribe { request, session } => Frame::Unsubscribe {
            request,
            session: text(session)?,
        },
        JsonFrame::Publish {
            request,
            session,
            payload,
        } => Frame::Publish {
            request,
            session: text(session)?,
            payload: payload.into_bytes()?,
        },
        JsonFrame::Direct {
            request,
            user,
            payload,
        } => Frame::Direct {
            request,
            user: text(user)?,
            payload: payload.into_bytes()?,
        },
        JsonFrame::Ok { request } => Frame::Ok { request },
        JsonFrame::Error {
            request,
            code,
            reason,
        } => Frame::Error {
            request,
            code: ErrorCode::from_u16(code),
            reason: text(reason)?,
        },
        JsonFrame::Deliver {
            id,
            kind,
            sent_at_us,
            sender,
            target,
            payload,
        } => Frame::Deliver {
            id,
            kind: match kind {
                JsonKind::Session => MessageKind::Session,
                JsonKind::Direct => MessageKind::Direct,
            },
            sent_at_us,
            sender: text(sender)?,
            target: text(target)?,
            payload: payload.into_bytes()?,
        },
        JsonFrame::Notice {
            kind,
            request,
            count,
            subject,
            text: words,
        } => Frame::Notice {
            kind: match kind {
                JsonNotice::NotDelivered => NoticeKind::NotDelivered,
                JsonNotice::SessionClosed => NoticeKind::SessionClosed,
                JsonNotice::Missed => NoticeKind::Missed,
                JsonNotice::Left => NoticeKind::Left,
                JsonNotice::Joined => NoticeKind::Joined,
            },
            request,
            count,
            subject: text(subject)?,
            text: text(words)?,
        },
        JsonFrame::Ping => Frame::Ping,
        JsonFrame::Pong => Frame::Pong,
        JsonFrame::Close { code, reason } => Frame::Close {
            code: ErrorCode::from_u16(code),
            reason: text(reason)?,
        },
    })
}

/// Encodes a frame as one JSON object.
pub fn encode(frame: &Frame) -> Bytes {
    let json = match frame.clone() {
        Frame::Hello {
            version,
            user,
            token,
        } => JsonFrame::Hello {
            version,
            user: user.to_string(),
            token: String::from_utf8_lossy(&token).into_owned(),
        },
        Frame::Welcome {
            version,
            connection,
            user,
            heartbeat_ms,
            max_frame,
        } => JsonFrame::Welcome {
            version,
            connection,
            user: user.to_string(),
            heartbeat_ms,
            max_frame,
        },
        Frame::Subscribe { request, session } => JsonFrame::Subscribe {
            request,
            session: session.to_string(),
        },
        Frame::Unsubscribe { request, session } => JsonFrame::Unsubscribe {
            request,
            session: session.to_string(),
        },
        Frame::Publish {
            request,
            session,
            payload,
        } => JsonFrame::Publish {
            request,
            session: session.to_string(),
            payload: Payload::of(&payload),
        },
        Frame::Direct {
            request,
            user,
            payload,
        } => JsonFrame::Direct {
            request,
            user: user.to_string(),
            payload: Payload::of(&payload),
        },
        Frame::Ok { request } => JsonFrame::Ok { request },
        Frame::Error {
            request,
            code,
            reason,
        } => JsonFrame::Error {
            request,
            code: code.to_u16(),
            reason: reason.to_string(),
        },
        Frame::Deliver {
            id,
            kind,
            sent_at_us,
            sender,
            target,
            payload,
        } => {
            return encode_deliver(
                id,
                kind,
                sent_at_us,
                sender.as_str(),
                target.as_str(),
                &payload,
            )
        }
        Frame::Notice {
            kind,
            request,
            count,
            subject,
            text,
        } => JsonFrame::Notice {
            kind: match kind {
                NoticeKind::NotDelivered => JsonNotice::NotDelivered,
                NoticeKind::SessionClosed => JsonNotice::SessionClosed,
                NoticeKind::Missed => JsonNotice::Missed,
                NoticeKind::Left => JsonNotice::Left,
                NoticeKind::Joined => JsonNotice::Joined,
            },
            request,
            count,
            subject: subject.to_string(),
            text: text.to_string(),
        },
        Frame::Ping => JsonFrame::Ping,
        Frame::Pong => JsonFrame::Pong,
        Frame::Close { code, reason } => JsonFrame::Close {
            code: code.to_u16(),
            reason: reason.to_string(),
        },
    };
    // Serialising these plain structs cannot fail: every key is a string and every
    // value a string or a number.
    Bytes::from(serde_json::to_vec(&json).unwrap_or_default())
}

/// Encodes a `DELIVER` from the parts the forwarding worker holds.
pub(crate) fn encode_deliver(
    id: u64,
    kind: MessageKind,
    sent_at_us: u64,
    sender: &str,
    target: &str,
    payload: &[u8],
) -> Bytes {
    let (text, base64) = match std::str::from_utf8(payload) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(BASE64.encode(payload))),
    };
    let out = DeliverOut {
        kind_of_frame: "deliver",
        id,
        kind: match kind {
            MessageKind::Session => JsonKind::Session,
            MessageKind::Direct => JsonKind::Direct,
        },
        sent_at_us,
        sender,
        target,
        payload: text,
        payload_base64: base64,
    };
    Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payloads_cross_as_base64_and_text_as_text() {
        let text = encode_deliver(1, MessageKind::Session, 2, "a", "r", b"hi");
        assert!(std::str::from_utf8(&text)
            .unwrap()
            .contains(r#""payload":"hi""#));

        let binary = encode_deliver(1, MessageKind::Direct, 2, "a", "b", &[0xff, 0]);
        let json = std::str::from_utf8(&binary).unwrap();
        assert!(json.contains(r#""payload_base64":"/wA=""#), "{json}");
        match decode(json, 1 << 20).unwrap() {
            Frame::Deliver { payload, kind, .. } => {
                assert_eq!(&payload[..], &[0xff, 0]);
                assert_eq!(kind, MessageKind::Direct);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_publish_decodes_like_its_binary_twin() {
        let frame = decode(
            r#"{"type":"publish","request":7,"session":"room","payload":"hello"}"#,
            1024,
        )
        .unwrap();
        assert_eq!(
            frame,
            Frame::Publish {
                request: 7,
                session: "room".into(),
                payload: Bytes::from_static(b"hello"),
            }
        );
    }

    #[test]
    fn invalid_json_is_malformed_and_oversize_is_too_large() {
        assert_eq!(
            decode("{nope", 1024).unwrap_err().code(),
            ErrorCode::Malformed
        );
        assert_eq!(
            decode(r#"{"type":"warp"}"#, 1024).unwrap_err(),
            DecodeError::UnknownType("warp".into())
        );
        assert_eq!(
            decode(r#"{"type":"warp"}"#, 1024).unwrap_err().code(),
            ErrorCode::UnknownKind
        );
        let big = format!(r#"{{"type":"ping","x":"{}"}}"#, "x".repeat(100));
        assert_eq!(
            decode(&big, 50).unwrap_err().code(),
            ErrorCode::FrameTooLarge
        );
    }
}
