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

/// One frame as a JSON object, as the broker writes it. `DELIVER` is written by
/// [`encode_deliver`] instead, from borrowed parts.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JsonFrame {
    Hello(HelloJson),
    Welcome(WelcomeJson),
    Subscribe(MembershipJson),
    Unsubscribe(MembershipJson),
    Publish(PublishJson),
    Direct(DirectJson),
    Ok(OkJson),
    Error(ErrorJson),
    Notice(NoticeJson),
    Ping,
    Pong,
    Close(CloseJson),
}

// The fields of each frame type. Decoding reads one of these straight from the text,
// once the `"type"` is known, rather than through an internally tagged enum: serde
// buffers every key and value of such an object before it looks at the tag, ignored
// ones included, which costs some 25 bytes of memory per byte of text.

#[derive(Serialize, Deserialize)]
struct HelloJson {
    version: u8,
    user: String,
    #[serde(default)]
    token: String,
}

#[derive(Serialize, Deserialize)]
struct WelcomeJson {
    version: u8,
    connection: u64,
    user: String,
    heartbeat_ms: u32,
    max_frame: u32,
}

/// `subscribe` and `unsubscribe`.
#[derive(Serialize, Deserialize)]
struct MembershipJson {
    #[serde(default)]
    request: u32,
    session: String,
}

#[derive(Serialize, Deserialize)]
struct PublishJson {
    #[serde(default)]
    request: u32,
    session: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    payload_base64: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DirectJson {
    #[serde(default)]
    request: u32,
    user: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    payload_base64: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct OkJson {
    request: u32,
}

#[derive(Serialize, Deserialize)]
struct ErrorJson {
    request: u32,
    code: u16,
    reason: String,
}

#[derive(Deserialize)]
struct DeliverJson {
    id: u64,
    kind: JsonKind,
    sent_at_us: u64,
    sender: String,
    target: String,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_base64: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct NoticeJson {
    kind: JsonNotice,
    #[serde(default)]
    request: u32,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    text: String,
}

#[derive(Serialize, Deserialize)]
struct CloseJson {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    reason: String,
}

/// The `"type"` alone; every other key is skipped without being kept.
#[derive(Deserialize)]
struct Tagged {
    #[serde(rename = "type")]
    kind: String,
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

/// A payload as its two JSON fields: text when it is UTF-8, base64 otherwise.
fn payload_fields(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_string()), None),
        Err(_) => (None, Some(BASE64.encode(bytes))),
    }
}

/// The payload of a frame from its two JSON fields, at most one of which may be given.
fn payload_bytes(text: Option<String>, base64: Option<String>) -> Result<Bytes, DecodeError> {
    match (text, base64) {
        (Some(text), None) => Ok(Bytes::from(text)),
        (None, Some(encoded)) => BASE64
            .decode(encoded)
            .map(Bytes::from)
            .map_err(|_| malformed("payload_base64 is not valid base64")),
        (None, None) => Ok(Bytes::new()),
        (Some(_), Some(_)) => Err(malformed("both payload and payload_base64")),
    }
}

/// A string field, checked against what the binary form can carry.
fn text(s: String) -> Result<Text, DecodeError> {
    if s.len() > crate::frame::MAX_TEXT {
        return Err(malformed("a string field is longer than 65535 bytes"));
    }
    Ok(Text::from(s))
}

/// What every text message that is not a frame of a known type is refused as.
fn not_a_frame() -> DecodeError {
    malformed("not a JSON object of a known frame type with its fields")
}

/// Reads `T` from the whole of `message`.
fn fields<'de, T: Deserialize<'de>>(message: &'de str) -> Result<T, DecodeError> {
    serde_json::from_str(message).map_err(|_| not_a_frame())
}

/// Decodes one text message into a frame.
///
/// # Errors
///
/// Fails with [`DecodeError::TooLarge`] when the message is longer than `max_frame`
/// bytes, with [`DecodeError::UnknownType`] when its `"type"` names no frame, and with
/// [`DecodeError::Malformed`] when it is not a JSON object with a `"type"` and the
/// fields that type needs.
pub fn decode(message: &str, max_frame: usize) -> Result<Frame, DecodeError> {
    if message.len() > max_frame {
        return Err(DecodeError::TooLarge {
            length: message.len() as u64,
            max: max_frame,
        });
    }
    // serde reads a struct from a JSON array too, field by field; a frame is an
    // object only.
    if !message
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(not_a_frame());
    }

    // The text is read twice, each time keeping only what that pass needs: the type,
    // then the fields of that type. An unknown type is told apart from a known one
    // with bad fields, as the binary form tells an unknown kind byte from a malformed
    // body.
    let Tagged { mut kind } = fields(message)?;
    Ok(match kind.as_str() {
        "hello" => {
            let HelloJson {
                version,
                user,
                token,
            } = fields(message)?;
            Frame::Hello {
                version,
                user: text(user)?,
                token: text(token)?.as_str().as_bytes().to_vec().into(),
            }
        }
        "welcome" => {
            let WelcomeJson {
                version,
                connection,
                user,
                heartbeat_ms,
                max_frame,
            } = fields(message)?;
            Frame::Welcome {
                version,
                connection,
                user: text(user)?,
                heartbeat_ms,
                max_frame,
            }
        }
        "subscribe" => {
            let MembershipJson { request, session } = fields(message)?;
            Frame::Subscribe {
                request,
                session: text(session)?,
            }
        }
        "unsubscribe" => {
            let MembershipJson { request, session } = fields(message)?;
            Frame::Unsubscribe {
                request,
                session: text(session)?,
            }
        }
        "publish" => {
            let PublishJson {
                request,
                session,
                payload,
                payload_base64,
            } = fields(message)?;
            Frame::Publish {
                request,
                session: text(session)?,
                payload: payload_bytes(payload, payload_base64)?,
            }
        }
        "direct" => {
            let DirectJson {
                request,
                user,
                payload,
                payload_base64,
            } = fields(message)?;
            Frame::Direct {
                request,
                user: text(user)?,
                payload: payload_bytes(payload, payload_base64)?,
            }
        }
        "ok" => {
            let OkJson { request } = fields(message)?;
            Frame::Ok { request }
        }
        "error" => {
            let ErrorJson {
                request,
                code,
                reason,
            } = fields(message)?;
            Frame::Error {
                request,
                code: ErrorCode::from_u16(code),
                reason: text(reason)?,
            }
        }
        "deliver" => {
            let DeliverJson {
                id,
                kind,
                sent_at_us,
                sender,
                target,
                payload,
                payload_base64,
            } = fields(message)?;
            Frame::Deliver {
                id,
                kind: match kind {
                    JsonKind::Session => MessageKind::Session,
                    JsonKind::Direct => MessageKind::Direct,
                },
                sent_at_us,
                sender: text(sender)?,
                target: text(target)?,
                payload: payload_bytes(payload, payload_base64)?,
            }
        }
        "notice" => {
            let NoticeJson {
                kind,
                request,
                count,
                subject,
                text: words,
            } = fields(message)?;
            Frame::Notice {
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
            }
        }
        "ping" => Frame::Ping,
        "pong" => Frame::Pong,
        "close" => {
            let CloseJson { code, reason } = fields(message)?;
            Frame::Close {
                code: ErrorCode::from_u16(code),
                reason: text(reason)?,
            }
        }
        _ => {
            // The name goes back in the error's reason: keep it short.
            let mut end = kind.len().min(64);
            while !kind.is_char_boundary(end) {
                end -= 1;
            }
            kind.truncate(end);
            return Err(DecodeError::UnknownType(kind));
        }
    })
}

/// Encodes a frame as one JSON object.
pub fn encode(frame: &Frame) -> Bytes {
    let json = match frame.clone() {
        Frame::Hello {
            version,
            user,
            token,
        } => JsonFrame::Hello(HelloJson {
            version,
            user: user.to_string(),
            token: String::from_utf8_lossy(&token).into_owned(),
        }),
        Frame::Welcome {
            version,
            connection,
            user,
            heartbeat_ms,
            max_frame,
        } => JsonFrame::Welcome(WelcomeJson {
            version,
            connection,
            user: user.to_string(),
            heartbeat_ms,
            max_frame,
        }),
        Frame::Subscribe { request, session } => JsonFrame::Subscribe(MembershipJson {
            request,
            session: session.to_string(),
        }),
        Frame::Unsubscribe { request, session } => JsonFrame::Unsubscribe(MembershipJson {
            request,
            session: session.to_string(),
        }),
        Frame::Publish {
            request,
            session,
            payload,
        } => {
            let (payload, payload_base64) = payload_fields(&payload);
            JsonFrame::Publish(PublishJson {
                request,
                session: session.to_string(),
                payload,
                payload_base64,
            })
        }
        Frame::Direct {
            request,
            user,
            payload,
        } => {
            let (payload, payload_base64) = payload_fields(&payload);
            JsonFrame::Direct(DirectJson {
                request,
                user: user.to_string(),
                payload,
                payload_base64,
            })
        }
        Frame::Ok { request } => JsonFrame::Ok(OkJson { request }),
        Frame::Error {
            request,
            code,
            reason,
        } => JsonFrame::Error(ErrorJson {
            request,
            code: code.to_u16(),
            reason: reason.to_string(),
        }),
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
        } => JsonFrame::Notice(NoticeJson {
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
        }),
        Frame::Ping => JsonFrame::Ping,
        Frame::Pong => JsonFrame::Pong,
        Frame::Close { code, reason } => JsonFrame::Close(CloseJson {
            code: code.to_u16(),
            reason: reason.to_string(),
        }),
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
