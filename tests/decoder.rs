//! The decoder at the byte level: streams split at every byte and merged into one read,
//! truncated and oversized frames, every way a body can be malformed, message
//! transports, and the worked examples and tables of `docs/protocol.md`, which are
//! checked against the encoder here so that the document cannot drift from the code.

use bytes::{BufMut, Bytes, BytesMut};
use std::time::Duration;
use switchboard::frame::{
    kind, kind_name, DecodeError, ErrorCode, Frame, MessageKind, NoticeKind, Text, LENGTH_PREFIX,
};
use switchboard::transport::{FrameReader, StreamFrameReader};
use switchboard::ReadError;
use tokio::io::AsyncWriteExt;

/// The broker's default maximum frame size.
const MAX: usize = 1024 * 1024;

/// One frame of every kind, several of them a few bytes long, with empty and non-ASCII
/// strings, empty payloads and payloads holding bytes that look like frame headers.
fn every_kind() -> Vec<Frame> {
    vec![
        Frame::Hello {
            version: 1,
            user: "alice".into(),
            token: Bytes::from_static(b"tk"),
        },
        Frame::Ping,
        Frame::Welcome {
            version: 1,
            connection: 7,
            user: "alice".into(),
            heartbeat_ms: 20_000,
            max_frame: 1 << 20,
        },
        Frame::Pong,
        Frame::Subscribe {
            request: 1,
            session: "lobby".into(),
        },
        Frame::Ok { request: 1 },
        Frame::Unsubscribe {
            request: u32::MAX,
            session: "zoë's room ☕".into(),
        },
        Frame::Publish {
            request: 0,
            session: "lobby".into(),
            payload: Bytes::from_static(b"hi"),
        },
        Frame::Ping,
        Frame::Ping,
        Frame::Publish {
            request: 3,
            session: "lobby".into(),
            payload: Bytes::new(),
        },
        Frame::Direct {
            request: 4,
            user: "bob".into(),
            // Bytes that would read as a frame header if the payload were misframed.
            payload: Bytes::from_static(&[0, 0, 0, 1, kind::PING, 0xff, 0x00]),
        },
        Frame::Error {
            request: 0,
            code: ErrorCode::Malformed,
            reason: "malformed SUBSCRIBE frame".into(),
        },
        Frame::Error {
            request: 9,
            code: ErrorCode::Other(4242),
            reason: Text::default(),
        },
        Frame::Deliver {
            id: u64::MAX,
            kind: MessageKind::Session,
            sent_at_us: 1_700_000_000_000_000,
            sender: "bob".into(),
            target: "lobby".into(),
            payload: Bytes::from(vec![0xab; 300]),
        },
        Frame::Deliver {
            id: 2,
            kind: MessageKind::Direct,
            sent_at_us: 0,
            sender: Text::default(),
            target: "alice".into(),
            payload: Bytes::new(),
        },
        Frame::Notice {
            kind: NoticeKind::NotDelivered,
            request: 4,
            count: 0,
            subject: "carol".into(),
            text: "no live connection of that user received the message".into(),
        },
        Frame::Notice {
            kind: NoticeKind::SessionClosed,
            request: 0,
            count: 0,
            subject: "lobby".into(),
            text: "closing time".into(),
        },
        Frame::Notice {
            kind: NoticeKind::Missed,
            request: 0,
            count: 5,
            subject: Text::default(),
            text: "outbox full".into(),
        },
        Frame::Notice {
            kind: NoticeKind::Left,
            request: 0,
            count: 0,
            subject: "lobby".into(),
            text: Text::default(),
        },
        Frame::Notice {
            kind: NoticeKind::Joined,
            request: 0,
            count: 0,
            subject: "lobby".into(),
            text: Text::default(),
        },
        Frame::Pong,
        Frame::Ok { request: 2 },
        Frame::Close {
            code: ErrorCode::Normal,
            reason: "bye".into(),
        },
        Frame::Ping,
    ]
}

/// The frames one after another, as a byte stream carries them, and the offset at
/// which each one ends.
fn stream_of(frames: &[Frame]) -> (Vec<u8>, Vec<usize>) {
    let mut wire = BytesMut::new();
    let mut ends = Vec::new();
    for frame in frames {
        frame.encode_into(&mut wire);
        ends.push(wire.len());
    }
    (wire.to_vec(), ends)
}

/// Takes every whole frame off the front of `buf`.
fn decode_all(buf: &mut BytesMut, out: &mut Vec<Frame>) {
    while let Some(frame) = Frame::decode_stream(buf, MAX).unwrap() {
        out.push(frame);
    }
}

/// Builds a stream frame by hand: the prefix counts the kind byte and `body`.
fn raw(kind_byte: u8, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(1 + body.len() as u32);
    buf.put_u8(kind_byte);
    buf.put_slice(body);
    buf
}

/// Decodes one hand-built stream frame, expecting an error.
fn decode_err(mut buf: BytesMut) -> DecodeError {
    Frame::decode_stream(&mut buf, MAX).unwrap_err()
}

/// The kind byte and body of a frame: its encoding without the length prefix.
fn body_of(frame: &Frame) -> Bytes {
    frame.encode().slice(LENGTH_PREFIX..)
}

/// Replaces the only occurrence of `needle` in `frame`'s encoding with `with` (of the
/// same length), giving a frame whose lengths are all still right.
fn patched(frame: &Frame, needle: &[u8], with: &[u8]) -> BytesMut {
    assert_eq!(needle.len(), with.len());
    let mut wire = frame.encode().to_vec();
    let at: Vec<usize> = wire
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the needle must occur once");
    wire[at[0]..at[0] + needle.len()].copy_from_slice(with);
    BytesMut::from(&wire[..])
}

// Streams split and merged.

#[test]
fn a_stream_split_at_every_byte_decodes_to_the_same_frames() {
    let frames = every_kind();
    let (wire, ends) = stream_of(&frames);

    for cut in 0..=wire.len() {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();

        buf.extend_from_slice(&wire[..cut]);
        decode_all(&mut buf, &mut got);
        let complete = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(
            got.len(),
            complete,
            "cut at {cut}: exactly the frames that ended before the cut are out"
        );

        buf.extend_from_slice(&wire[cut..]);
        decode_all(&mut buf, &mut got);
        assert_eq!(got, frames, "cut at {cut}");
        assert!(buf.is_empty(), "cut at {cut}: {} bytes left", buf.len());
    }
}

#[test]
fn a_stream_fed_one_byte_at_a_time_decodes_each_frame_at_its_last_byte() {
    let frames = every_kind();
    let (wire, ends) = stream_of(&frames);

    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for (i, byte) in wire.iter().enumerate() {
        buf.put_u8(*byte);
        let before = got.len();
        decode_all(&mut buf, &mut got);
        let is_end = ends.contains(&(i + 1));
        assert_eq!(got.len() - before, usize::from(is_end), "after byte {i}");
    }
    assert_eq!(got, frames);
    assert!(buf.is_empty());
}

#[test]
fn a_stream_of_only_five_byte_frames_splits_cleanly() {
    let frames: Vec<Frame> = (0..40)
        .map(|i| if i % 3 == 0 { Frame::Pong } else { Frame::Ping })
        .collect();
    let (wire, _) = stream_of(&frames);
    assert_eq!(wire.len(), 5 * frames.len());

    for cut in 0..=wire.len() {
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut got = Vec::new();
        decode_all(&mut buf, &mut got);
        assert_eq!(got.len(), cut / 5, "cut at {cut}");
        buf.extend_from_slice(&wire[cut..]);
        decode_all(&mut buf, &mut got);
        assert_eq!(got, frames, "cut at {cut}");
    }
}

#[test]
fn several_frames_merged_into_one_read_all_decode() {
    let frames = every_kind();
    let (wire, _) = stream_of(&frames);

    let mut buf = BytesMut::from(&wire[..]);
    let mut got = Vec::new();
    decode_all(&mut buf, &mut got);
    assert_eq!(got, frames);
    assert!(buf.is_empty());
}

#[test]
fn a_read_that_ends_in_the_middle_of_the_next_frame_keeps_its_start() {
    let frames = every_kind();
    let (wire, ends) = stream_of(&frames);

    // Two whole frames and the first half of the third, then the rest.
    let cut = ends[1] + (ends[2] - ends[1]) / 2;
    let mut buf = BytesMut::from(&wire[..cut]);
    let mut got = Vec::new();
    decode_all(&mut buf, &mut got);
    assert_eq!(got, frames[..2]);
    assert_eq!(buf.len(), cut - ends[1], "the partial frame stays buffered");

    buf.extend_from_slice(&wire[cut..]);
    decode_all(&mut buf, &mut got);
    assert_eq!(got, frames);
}

#[test]
fn a_partial_frame_gets_room_for_its_whole_length() {
    let frame = Frame::Publish {
        request: 1,
        session: "s".into(),
        payload: Bytes::from(vec![7; 5000]),
    };
    let wire = frame.encode();

    let mut buf = BytesMut::from(&wire[..10]);
    assert_eq!(Frame::decode_stream(&mut buf, MAX).unwrap(), None);
    assert!(
        buf.capacity() >= wire.len(),
        "capacity {} leaves no room for the {} bytes of the frame",
        buf.capacity(),
        wire.len()
    );
}

#[tokio::test]
async fn the_stream_reader_decodes_a_stream_that_arrives_a_byte_at_a_time() {
    let frames = every_kind();
    let (wire, _) = stream_of(&frames);
    let sent = wire.len() as u64;

    // A duplex buffer of one byte hands the reader one byte per read.
    let (mut client, server) = tokio::io::duplex(1);
    let writer = tokio::spawn(async move {
        client.write_all(&wire).await.unwrap();
    });

    let mut reader = StreamFrameReader::new(server);
    let mut got = Vec::new();
    while let Some(frame) = reader.read_frame(MAX).await.unwrap() {
        got.push(frame);
    }
    writer.await.unwrap();
    assert_eq!(got, frames);
    assert_eq!(reader.bytes_read(), sent);
}

#[tokio::test]
async fn the_stream_reader_decodes_frames_merged_into_one_read() {
    let frames = every_kind();
    let (wire, _) = stream_of(&frames);

    let mut reader = StreamFrameReader::new(std::io::Cursor::new(wire));
    let mut got = Vec::new();
    while let Some(frame) = reader.read_frame(MAX).await.unwrap() {
        got.push(frame);
    }
    assert_eq!(got, frames);
}

// Truncated input.

#[tokio::test]
async fn a_frame_cut_short_by_the_end_of_the_stream_is_truncated() {
    let frames = every_kind();
    let (mut wire, ends) = stream_of(&frames);

    // Lose the last 3 bytes of the frame before the final PING, and the PING.
    let whole = ends.len() - 2;
    wire.truncate(ends[whole] - 3);
    let partial = wire.len() - ends[whole - 1];

    let mut reader = StreamFrameReader::new(std::io::Cursor::new(wire));
    for expected in &frames[..whole] {
        assert_eq!(
            reader.read_frame(MAX).await.unwrap().as_ref(),
            Some(expected)
        );
    }
    match reader.read_frame(MAX).await {
        Err(ReadError::Decode(e)) => {
            assert_eq!(e, DecodeError::Truncated { buffered: partial });
            assert_eq!(e.code(), ErrorCode::Truncated);
            assert_eq!(
                e.to_string(),
                format!("stream ended inside a frame ({partial} bytes buffered)")
            );
        }
        other => panic!("expected a truncated frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_that_ends_inside_a_length_prefix_is_truncated() {
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(&[0, 0, 0]).await.unwrap();
    drop(client);

    let mut reader = StreamFrameReader::new(server);
    match reader.read_frame(MAX).await {
        Err(ReadError::Decode(e)) => assert_eq!(e, DecodeError::Truncated { buffered: 3 }),
        other => panic!("expected a truncated frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_that_ends_between_frames_ends_cleanly() {
    let mut reader = StreamFrameReader::new(std::io::Cursor::new(Frame::Ping.encode().to_vec()));
    assert_eq!(reader.read_frame(MAX).await.unwrap(), Some(Frame::Ping));
    assert_eq!(reader.read_frame(MAX).await.unwrap(), None);

    let mut empty = StreamFrameReader::new(std::io::Cursor::new(Vec::new()));
    assert_eq!(empty.read_frame(MAX).await.unwrap(), None);
}

// Oversized frames.

#[test]
fn a_length_of_u32_max_is_refused_before_the_body_arrives() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    let err = Frame::decode_stream(&mut buf, MAX).unwrap_err();

    assert_eq!(
        err,
        DecodeError::TooLarge {
            length: u64::from(u32::MAX),
            max: MAX
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(
        err.to_string(),
        "frame of 4294967295 bytes is over the limit of 1048576 bytes"
    );
    assert!(
        buf.capacity() <= 64,
        "{} bytes reserved for a frame that was refused",
        buf.capacity()
    );
}

#[test]
fn an_oversized_length_is_refused_whatever_follows_it() {
    // With part of a body behind it, and behind a valid frame in the same read.
    let mut buf = BytesMut::new();
    Frame::Ping.encode_into(&mut buf);
    buf.put_u32(u32::MAX);
    buf.put_slice(&[kind::PUBLISH, 0, 0, 0, 1]);

    assert_eq!(
        Frame::decode_stream(&mut buf, MAX).unwrap(),
        Some(Frame::Ping)
    );
    let capacity = buf.capacity();
    let err = Frame::decode_stream(&mut buf, MAX).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }), "{err:?}");
    assert_eq!(
        buf.capacity(),
        capacity,
        "nothing was reserved for the claim"
    );
}

#[test]
fn a_frame_at_the_limit_is_accepted_and_one_byte_more_is_refused() {
    let limit = 64;
    let at_limit = Frame::Publish {
        request: 1,
        session: "s".into(),
        payload: Bytes::from(vec![1; limit - (1 + 4 + 2 + 1)]),
    };
    assert_eq!(at_limit.encoded_len(), LENGTH_PREFIX + limit);
    let mut buf = BytesMut::from(&at_limit.encode()[..]);
    assert_eq!(
        Frame::decode_stream(&mut buf, limit).unwrap(),
        Some(at_limit.clone())
    );

    let over = Frame::Publish {
        request: 1,
        session: "s".into(),
        payload: Bytes::from(vec![1; limit - (1 + 4 + 2 + 1) + 1]),
    };
    let mut buf = BytesMut::from(&over.encode()[..]);
    assert_eq!(
        Frame::decode_stream(&mut buf, limit).unwrap_err(),
        DecodeError::TooLarge {
            length: limit as u64 + 1,
            max: limit
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_stream_reader_refuses_an_oversized_length_without_waiting_for_the_body() {
    // The writer stays open and sends no body: a reader that waited for it would hang,
    // and the (paused, so instant) timeout would fail the test.
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(&u32::MAX.to_be_bytes()).await.unwrap();

    let mut reader = StreamFrameReader::new(server);
    let read = tokio::time::timeout(Duration::from_secs(60), reader.read_frame(MAX))
        .await
        .expect("the reader waited for a body it should have refused");
    match read {
        Err(ReadError::Decode(e)) => assert_eq!(e.code(), ErrorCode::FrameTooLarge),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(client);
}

// Malformed frames.

#[test]
fn a_zero_length_is_refused() {
    let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
    let err = Frame::decode_stream(&mut buf, MAX).unwrap_err();
    assert_eq!(err, DecodeError::Empty);
    assert_eq!(err.code(), ErrorCode::Malformed);
    assert_eq!(err.to_string(), "frame has length 0");

    assert_eq!(
        Frame::decode_body(Bytes::new()).unwrap_err(),
        DecodeError::Empty
    );
}

#[test]
fn every_unknown_kind_byte_is_refused() {
    let known = [
        kind::HELLO,
        kind::SUBSCRIBE,
        kind::UNSUBSCRIBE,
        kind::PUBLISH,
        kind::DIRECT,
        kind::PING,
        kind::PONG,
        kind::CLOSE,
        kind::WELCOME,
        kind::OK,
        kind::ERROR,
        kind::DELIVER,
        kind::NOTICE,
    ];
    for byte in 0..=u8::MAX {
        if known.contains(&byte) {
            continue;
        }
        let err = decode_err(raw(byte, &[1, 2, 3]));
        assert_eq!(err, DecodeError::UnknownKind(byte));
        assert_eq!(err.code(), ErrorCode::UnknownKind);
        assert_eq!(kind_name(byte), "unknown");
    }
    assert_eq!(
        decode_err(raw(0x09, &[])).to_string(),
        "unknown frame kind 0x09"
    );
}

#[test]
fn invalid_utf8_in_any_string_field_is_refused() {
    // Each frame holds the placeholder "@@" in exactly one string field.
    let cases = [
        Frame::Hello {
            version: 1,
            user: "@@".into(),
            token: Bytes::new(),
        },
        Frame::Welcome {
            version: 1,
            connection: 1,
            user: "@@".into(),
            heartbeat_ms: 1,
            max_frame: 1,
        },
        Frame::Subscribe {
            request: 1,
            session: "@@".into(),
        },
        Frame::Unsubscribe {
            request: 1,
            session: "@@".into(),
        },
        Frame::Publish {
            request: 1,
            session: "@@".into(),
            payload: Bytes::from_static(b"payload"),
        },
        Frame::Direct {
            request: 1,
            user: "@@".into(),
            payload: Bytes::new(),
        },
        Frame::Error {
            request: 1,
            code: ErrorCode::InvalidId,
            reason: "@@".into(),
        },
        Frame::Deliver {
            id: 1,
            kind: MessageKind::Session,
            sent_at_us: 1,
            sender: "@@".into(),
            target: "t".into(),
            payload: Bytes::new(),
        },
        Frame::Deliver {
            id: 1,
            kind: MessageKind::Session,
            sent_at_us: 1,
            sender: "s".into(),
            target: "@@".into(),
            payload: Bytes::new(),
        },
        Frame::Notice {
            kind: NoticeKind::Left,
            request: 0,
            count: 0,
            subject: "@@".into(),
            text: Text::default(),
        },
        Frame::Notice {
            kind: NoticeKind::Left,
            request: 0,
            count: 0,
            subject: Text::default(),
            text: "@@".into(),
        },
        Frame::Close {
            code: ErrorCode::Normal,
            reason: "@@".into(),
        },
    ];
    // A lone continuation byte, an overlong NUL, half a surrogate pair.
    let invalid: [&[u8]; 3] = [&[0x80, 0x41], &[0xc0, 0x80], &[0xed, 0xa0]];

    for frame in &cases {
        for bad in invalid {
            let err = decode_err(patched(frame, b"@@", bad));
            assert_eq!(
                err,
                DecodeError::Malformed {
                    kind: frame.name(),
                    what: "string is not valid UTF-8"
                },
                "{bad:02x?} in {frame:?}"
            );
            assert_eq!(err.code(), ErrorCode::Malformed);
        }
    }
    let hello = patched(&cases[0], b"@@", &[0xff, 0xfe]);
    assert_eq!(
        decode_err(hello).to_string(),
        "malformed HELLO frame: string is not valid UTF-8"
    );
}

#[test]
fn tokens_and_payloads_may_hold_any_bytes() {
    let hello = Frame::Hello {
        version: 1,
        user: "alice".into(),
        token: Bytes::from_static(&[0xff, 0xfe, 0x00, 0xc0, 0x80]),
    };
    let publish = Frame::Publish {
        request: 1,
        session: "lobby".into(),
        payload: Bytes::from_static(&[0xff, 0xfe, 0x00, 0xc0, 0x80]),
    };
    for frame in [hello, publish] {
        let mut buf = BytesMut::from(&frame.encode()[..]);
        assert_eq!(Frame::decode_stream(&mut buf, MAX).unwrap(), Some(frame));
    }
}

#[test]
fn a_string_of_65535_bytes_the_longest_round_trips() {
    let longest = "é".repeat(32_767) + "x";
    assert_eq!(longest.len(), usize::from(u16::MAX));
    let frame = Frame::Close {
        code: ErrorCode::Normal,
        reason: longest.into(),
    };
    let wire = frame.encode();
    assert_eq!(&wire[LENGTH_PREFIX + 1 + 2..][..2], &[0xff, 0xff]);
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(Frame::decode_stream(&mut buf, MAX).unwrap(), Some(frame));
}

#[test]
fn a_nul_character_is_valid_utf8() {
    let frame = Frame::Subscribe {
        request: 1,
        session: "a\0b".into(),
    };
    let mut buf = BytesMut::from(&frame.encode()[..]);
    assert_eq!(Frame::decode_stream(&mut buf, MAX).unwrap(), Some(frame));
}

#[test]
fn bytes_left_over_after_the_last_field_are_refused() {
    // Every kind whose last field has a length of its own; the others end in a payload.
    let strict = every_kind().into_iter().filter(|f| {
        !matches!(
            f,
            Frame::Publish { .. } | Frame::Direct { .. } | Frame::Deliver { .. }
        )
    });
    for frame in strict {
        let mut body = body_of(&frame).to_vec();
        body.push(0);
        let err = decode_err(raw(body[0], &body[1..]));
        assert_eq!(
            err,
            DecodeError::Malformed {
                kind: frame.name(),
                what: "bytes left over after the last field"
            },
            "{frame:?}"
        );
    }
    assert_eq!(
        decode_err(raw(kind::OK, &[0, 0, 0, 1, 0])).to_string(),
        "malformed OK frame: bytes left over after the last field"
    );
}

#[test]
fn bytes_after_the_fields_of_a_publish_are_its_payload() {
    let frame = Frame::Publish {
        request: 1,
        session: "lobby".into(),
        payload: Bytes::from_static(b"hi"),
    };
    let mut body = body_of(&frame).to_vec();
    body.push(b'!');
    let mut buf = raw(body[0], &body[1..]);
    match Frame::decode_stream(&mut buf, MAX).unwrap() {
        Some(Frame::Publish { payload, .. }) => assert_eq!(&payload[..], b"hi!"),
        other => panic!("expected a publish, got {other:?}"),
    }
}

#[test]
fn a_body_cut_anywhere_inside_its_fields_is_refused() {
    for frame in every_kind() {
        let body = body_of(&frame);
        // Where the fields end and a payload (if any) begins.
        let payload = match &frame {
            Frame::Publish { payload, .. }
            | Frame::Direct { payload, .. }
            | Frame::Deliver { payload, .. } => payload.len(),
            _ => 0,
        };
        let fields_end = body.len() - payload;

        for len in 1..fields_end {
            let err = Frame::decode_body(body.slice(..len)).unwrap_err();
            assert_eq!(
                err,
                DecodeError::Malformed {
                    kind: frame.name(),
                    what: "body is shorter than its fields"
                },
                "{frame:?} cut to {len} bytes"
            );
        }
        // Inside the payload, a shorter body is a shorter payload.
        for len in fields_end..body.len() {
            let decoded = Frame::decode_body(body.slice(..len)).unwrap();
            assert_eq!(decoded.encoded_len(), LENGTH_PREFIX + len);
        }
    }
}

#[test]
fn a_string_length_past_the_end_of_the_body_is_refused() {
    // A session that claims 65,535 bytes in a frame of 13.
    let err = decode_err(raw(kind::SUBSCRIBE, &[0, 0, 0, 1, 0xff, 0xff, b'l', b'o']));
    assert_eq!(
        err.to_string(),
        "malformed SUBSCRIBE frame: body is shorter than its fields"
    );
}

#[test]
fn unknown_message_and_notice_kinds_are_refused() {
    let deliver = Frame::Deliver {
        id: 1,
        kind: MessageKind::Session,
        sent_at_us: 1,
        sender: "s".into(),
        target: "t".into(),
        payload: Bytes::new(),
    };
    let notice = Frame::Notice {
        kind: NoticeKind::Missed,
        request: 0,
        count: 1,
        subject: Text::default(),
        text: Text::default(),
    };
    // The message kind follows the kind byte and the 8-byte id.
    for bad in [0u8, 3, 0xff] {
        let mut body = body_of(&deliver).to_vec();
        body[1 + 8] = bad;
        let err = decode_err(raw(body[0], &body[1..]));
        assert_eq!(
            err.to_string(),
            "malformed DELIVER frame: unknown message kind"
        );
        assert_eq!(err.code(), ErrorCode::Malformed);
    }
    // The notice kind opens the body.
    for bad in [0u8, 6, 0xff] {
        let mut body = body_of(&notice).to_vec();
        body[1] = bad;
        let err = decode_err(raw(body[0], &body[1..]));
        assert_eq!(
            err.to_string(),
            "malformed NOTICE frame: unknown notice kind"
        );
        assert_eq!(err.code(), ErrorCode::Malformed);
    }
}

#[test]
fn a_failed_frame_leaves_the_frames_before_it_decoded() {
    let mut buf = BytesMut::new();
    Frame::Ok { request: 1 }.encode_into(&mut buf);
    Frame::Pong.encode_into(&mut buf);
    buf.extend_from_slice(&raw(0x42, &[]));

    let mut got = Vec::new();
    let err = loop {
        match Frame::decode_stream(&mut buf, MAX) {
            Ok(Some(frame)) => got.push(frame),
            Ok(None) => panic!("the unknown kind was not refused"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, [Frame::Ok { request: 1 }, Frame::Pong]);
    assert_eq!(err, DecodeError::UnknownKind(0x42));
}

// Message transports.

#[test]
fn every_kind_decodes_from_a_message() {
    for frame in every_kind() {
        assert_eq!(Frame::decode_message(frame.encode(), MAX).unwrap(), frame);
    }
}

#[test]
fn a_message_whose_prefix_disagrees_with_its_size_is_refused() {
    let ping = Frame::Ping.encode();

    // The prefix claims more than the message holds.
    let mut short = BytesMut::new();
    short.put_u32(10);
    short.put_slice(&[kind::OK, 0, 0, 0, 1]);
    let err = Frame::decode_message(short.freeze(), MAX).unwrap_err();
    assert_eq!(
        err,
        DecodeError::LengthMismatch {
            announced: 10,
            actual: 5
        }
    );
    assert_eq!(err.code(), ErrorCode::Malformed);
    assert_eq!(
        err.to_string(),
        "frame length prefix says 10 bytes but the message holds 5"
    );

    // Two frames in one message.
    let mut two = BytesMut::from(&ping[..]);
    two.extend_from_slice(&ping);
    assert_eq!(
        Frame::decode_message(two.freeze(), MAX).unwrap_err(),
        DecodeError::LengthMismatch {
            announced: 1,
            actual: 6
        }
    );

    // A zero prefix on a message that holds a frame.
    let mut zero = BytesMut::new();
    zero.put_u32(0);
    zero.put_u8(kind::PING);
    assert_eq!(
        Frame::decode_message(zero.freeze(), MAX).unwrap_err(),
        DecodeError::LengthMismatch {
            announced: 0,
            actual: 1
        }
    );
}

#[test]
fn a_message_shorter_than_a_prefix_is_truncated() {
    for len in 0..LENGTH_PREFIX {
        let message = Bytes::from(vec![0; len]);
        assert_eq!(
            Frame::decode_message(message, MAX).unwrap_err(),
            DecodeError::Truncated { buffered: len }
        );
    }
}

#[test]
fn a_message_is_checked_against_the_limit_before_its_size() {
    let mut message = BytesMut::new();
    message.put_u32(u32::MAX);
    message.put_u8(kind::PING);
    assert_eq!(
        Frame::decode_message(message.freeze(), MAX).unwrap_err(),
        DecodeError::TooLarge {
            length: u64::from(u32::MAX),
            max: MAX
        }
    );

    let ok = Frame::Ok { request: 1 }.encode();
    assert!(Frame::decode_message(ok.clone(), 5).is_ok(), "at the limit");
    assert_eq!(
        Frame::decode_message(ok, 4).unwrap_err(),
        DecodeError::TooLarge { length: 5, max: 4 },
        "one past it"
    );
}

#[test]
fn a_message_with_an_empty_frame_or_a_bad_body_is_refused() {
    let empty = Bytes::from_static(&[0, 0, 0, 0]);
    assert_eq!(
        Frame::decode_message(empty, MAX).unwrap_err(),
        DecodeError::Empty
    );
    let unknown = raw(0x7f, &[]).freeze();
    assert_eq!(
        Frame::decode_message(unknown, MAX).unwrap_err(),
        DecodeError::UnknownKind(0x7f)
    );
}

// docs/protocol.md: the worked examples and the tables.

const PROTOCOL_MD: &str = include_str!("../docs/protocol.md");

/// The worked examples of docs/protocol.md, each with the frame it shows.
fn examples() -> Vec<(Frame, &'static str)> {
    vec![
        (
            Frame::Hello {
                version: 1,
                user: "alice".into(),
                token: Bytes::from_static(b"tk"),
            },
            "00 00 00 0d 01 01 00 05 61 6c 69 63 65 00 02 74 6b",
        ),
        (
            Frame::Welcome {
                version: 1,
                connection: 7,
                user: "alice".into(),
                heartbeat_ms: 20_000,
                max_frame: 1_048_576,
            },
            "00 00 00 19 81 01 00 00 00 00 00 00 00 07 00 05 61 6c 69 63 65 00 00 4e 20 00 10 \
             00 00",
        ),
        (
            Frame::Subscribe {
                request: 1,
                session: "lobby".into(),
            },
            "00 00 00 0c 02 00 00 00 01 00 05 6c 6f 62 62 79",
        ),
        (Frame::Ok { request: 1 }, "00 00 00 05 82 00 00 00 01"),
        (
            Frame::Publish {
                request: 0,
                session: "lobby".into(),
                payload: Bytes::from_static(b"hi"),
            },
            "00 00 00 0e 04 00 00 00 00 00 05 6c 6f 62 62 79 68 69",
        ),
        (
            Frame::Deliver {
                id: 1,
                kind: MessageKind::Session,
                sent_at_us: 1_700_000_000_000_000,
                sender: "bob".into(),
                target: "lobby".into(),
                payload: Bytes::from_static(b"hi"),
            },
            "00 00 00 20 84 00 00 00 00 00 00 00 01 01 00 06 0a 24 18 1e 40 00 00 03 62 6f 62 \
             00 05 6c 6f 62 62 79 68 69",
        ),
        (Frame::Ping, "00 00 00 01 06"),
        (
            Frame::Error {
                request: 2,
                code: ErrorCode::InvalidId,
                reason: "session id is empty".into(),
            },
            "00 00 00 1c 83 00 00 00 02 00 64 00 13 73 65 73 73 69 6f 6e 20 69 64 20 69 73 20 \
             65 6d 70 74 79",
        ),
        (
            Frame::Notice {
                kind: NoticeKind::Missed,
                request: 0,
                count: 5,
                subject: Text::default(),
                text: "outbox full".into(),
            },
            "00 00 00 1d 85 03 00 00 00 00 00 00 00 00 00 00 00 05 00 00 00 0b 6f 75 74 62 6f \
             78 20 66 75 6c 6c",
        ),
        (
            Frame::Close {
                code: ErrorCode::IdleTimeout,
                reason: format!("nothing received for {:?}", Duration::from_secs(60)).into(),
            },
            "00 00 00 1d 08 00 08 00 18 6e 6f 74 68 69 6e 67 20 72 65 63 65 69 76 65 64 20 66 \
             6f 72 20 36 30 73",
        ),
    ]
}

fn parse_hex(hex: &str) -> Vec<u8> {
    hex.split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).unwrap())
        .collect()
}

/// The contents of every ```hex block in the document.
fn hex_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```hex") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), text) => {
                block.push(' ');
                block.push_str(text);
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn the_worked_examples_encode_and_decode_exactly() {
    for (frame, hex) in examples() {
        let bytes = parse_hex(hex);
        assert_eq!(&frame.encode()[..], &bytes[..], "{frame:?}");
        assert_eq!(frame.encoded_len(), bytes.len());

        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            Frame::decode_stream(&mut buf, MAX).unwrap(),
            Some(frame.clone())
        );
        assert!(buf.is_empty());
        assert_eq!(
            Frame::decode_message(Bytes::from(bytes), MAX).unwrap(),
            frame
        );
    }
}

#[test]
fn the_document_shows_exactly_the_checked_examples() {
    let documented: Vec<Vec<u8>> = hex_blocks(PROTOCOL_MD)
        .iter()
        .map(|b| parse_hex(b))
        .collect();
    let checked: Vec<Vec<u8>> = examples().iter().map(|(_, hex)| parse_hex(hex)).collect();
    assert_eq!(documented, checked, "the ```hex blocks of docs/protocol.md");
}

#[test]
fn the_deliver_example_is_what_the_broker_makes_of_the_publish_example() {
    // The DELIVER example is what the broker makes of the PUBLISH example: same target,
    // same payload, a sender the PUBLISH does not carry, 15 + len(sender) bytes longer.
    let examples = examples();
    let (publish, deliver) = (&examples[4].0, &examples[5].0);
    match (publish, deliver) {
        (
            Frame::Publish {
                session, payload, ..
            },
            Frame::Deliver {
                target,
                payload: delivered,
                sender,
                ..
            },
        ) => {
            assert_eq!(session, target);
            assert_eq!(payload, delivered);
            assert_eq!(
                deliver.encoded_len(),
                publish.encoded_len() + 15 + sender.len()
            );
        }
        other => panic!("the examples moved: {other:?}"),
    }
}

/// The rows of the Markdown table that follows `heading`, split into trimmed cells.
fn table_after(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in docs/protocol.md"));
    doc[start..]
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2) // The header and its rule.
        .map(|line| {
            line.trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn the_frame_kind_table_matches_the_code() {
    let rows = table_after(PROTOCOL_MD, "## Frame kinds");
    assert_eq!(rows.len(), 13);
    for row in rows {
        let byte = u8::from_str_radix(row[0].trim_start_matches("0x"), 16).unwrap();
        assert_eq!(kind_name(byte), row[1], "kind {}", row[0]);
    }
}

#[test]
fn the_error_code_table_matches_the_code() {
    let rows = table_after(PROTOCOL_MD, "## Error codes");

    // Every number the code knows by name is in the table, and nothing else.
    let known: Vec<String> = (0..=u16::MAX)
        .filter(|&n| !matches!(ErrorCode::from_u16(n), ErrorCode::Other(_)))
        .map(|n| n.to_string())
        .collect();
    let documented: Vec<String> = rows.iter().map(|row| row[0].clone()).collect();
    assert_eq!(documented, known);

    for row in rows {
        let number: u16 = row[0].parse().unwrap();
        let code = ErrorCode::from_u16(number);
        assert_eq!(format!("{code:?}"), row[1], "code {number}");
        assert_eq!(code.to_u16(), number);
        assert_eq!(code.is_fatal(), number < 100);
    }
    assert_eq!(ErrorCode::from_u16(104), ErrorCode::Other(104));
    assert!(!ErrorCode::Other(104).is_fatal());
    assert!(ErrorCode::Other(99).is_fatal());
}

#[test]
fn the_notice_table_matches_the_code() {
    let rows = table_after(PROTOCOL_MD, "## Notices");
    let kinds = [
        NoticeKind::NotDelivered,
        NoticeKind::SessionClosed,
        NoticeKind::Missed,
        NoticeKind::Left,
        NoticeKind::Joined,
    ];
    assert_eq!(rows.len(), kinds.len());
    for kind in kinds {
        let wire = Frame::Notice {
            kind,
            request: 0,
            count: 0,
            subject: Text::default(),
            text: Text::default(),
        }
        .encode();
        // After the length prefix and the frame kind byte comes the notice kind.
        let value = wire[LENGTH_PREFIX + 1].to_string();
        let row = rows.iter().find(|r| r[0] == value).unwrap();
        assert_eq!(row[1], format!("{kind:?}"));
    }
}

#[test]
fn message_kinds_are_one_and_two() {
    for (kind, byte) in [(MessageKind::Session, 1u8), (MessageKind::Direct, 2)] {
        let wire = Frame::Deliver {
            id: 0,
            kind,
            sent_at_us: 0,
            sender: Text::default(),
            target: Text::default(),
            payload: Bytes::new(),
        }
        .encode();
        assert_eq!(wire[LENGTH_PREFIX + 1 + 8], byte);
    }
}
