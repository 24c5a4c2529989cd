//! Property tests for the frame codec: every frame kind survives encoding and decoding,
//! on a byte stream cut into any pieces and as a message; and no input, random or a
//! damaged valid frame, makes the decoder panic or decode to something that does not
//! encode back to the same bytes.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use switchboard::frame::{
    DecodeError, ErrorCode, Frame, MessageKind, NoticeKind, Text, LENGTH_PREFIX,
};

// Strategies.

/// Strings: empty, id-like, any characters (NUL, multi-byte, astral), and now and
/// then a long one.
fn text() -> impl Strategy<Value = Text> {
    prop_oneof![
        1 => Just(Text::default()),
        4 => "[a-z0-9_.:-]{1,16}".prop_map(Text::from),
        4 => any::<String>().prop_map(Text::from),
        1 => proptest::collection::vec(any::<char>(), 200..400)
            .prop_map(|chars| Text::from(chars.into_iter().collect::<String>())),
    ]
}

/// Opaque bytes: tokens and payloads.
fn bytes() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        6 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        1 => proptest::collection::vec(any::<u8>(), 0..4096).prop_map(Bytes::from),
    ]
}

/// Every code as the decoder would return it: the named ones and `Other` for the
/// numbers it does not know. (`Other(1)` is representable but not what the wire
/// gives back for 1, so it is left out.)
fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        (0u16..16).prop_map(ErrorCode::from_u16),
        (98u16..106).prop_map(ErrorCode::from_u16),
        any::<u16>().prop_map(ErrorCode::from_u16),
    ]
}

fn message_kind() -> impl Strategy<Value = MessageKind> {
    prop_oneof![Just(MessageKind::Session), Just(MessageKind::Direct)]
}

fn notice_kind() -> impl Strategy<Value = NoticeKind> {
    prop_oneof![
        Just(NoticeKind::NotDelivered),
        Just(NoticeKind::SessionClosed),
        Just(NoticeKind::Missed),
        Just(NoticeKind::Left),
        Just(NoticeKind::Joined),
    ]
}

/// Any frame of any kind.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u8>(), text(), bytes()).prop_map(|(version, user, token)| Frame::Hello {
            version,
            user,
            token
        }),
        (
            any::<u8>(),
            any::<u64>(),
            text(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(version, connection, user, heartbeat_ms, max_frame)| {
                Frame::Welcome {
                    version,
                    connection,
                    user,
                    heartbeat_ms,
                    max_frame,
                }
            }),
        (any::<u32>(), text()).prop_map(|(request, session)| Frame::Subscribe { request, session }),
        (any::<u32>(), text())
            .prop_map(|(request, session)| Frame::Unsubscribe { request, session }),
        (any::<u32>(), text(), bytes()).prop_map(|(request, session, payload)| {
            Frame::Publish {
                request,
                session,
                payload,
            }
        }),
        (any::<u32>(), text(), bytes()).prop_map(|(request, user, payload)| Frame::Direct {
            request,
            user,
            payload
        }),
        any::<u32>().prop_map(|request| Frame::Ok { request }),
        (any::<u32>(), error_code(), text()).prop_map(|(request, code, reason)| {
            Frame::Error {
                request,
                code,
                reason,
            }
        }),
        (
            any::<u64>(),
            message_kind(),
            any::<u64>(),
            text(),
            text(),
            bytes()
        )
            .prop_map(
                |(id, kind, sent_at_us, sender, target, payload)| Frame::Deliver {
                    id,
                    kind,
                    sent_at_us,
                    sender,
                    target,
                    payload,
                }
            ),
        (notice_kind(), any::<u32>(), any::<u64>(), text(), text()).prop_map(
            |(kind, request, count, subject, text)| Frame::Notice {
                kind,
                request,
                count,
                subject,
                text,
            }
        ),
        Just(Frame::Ping),
        Just(Frame::Pong),
        (error_code(), text()).prop_map(|(code, reason)| Frame::Close { code, reason }),
    ]
}

/// A maximum frame size for the decoder: tiny, typical, and large but not so large
/// that a random length prefix could make it reserve gigabytes.
fn max_frame() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..16, 0usize..4096, Just(1 << 20), Just(1 << 24)]
}

/// Ways to damage a valid encoding.
#[derive(Clone, Debug)]
enum Damage {
    /// XOR one byte (by index, wrapped to the length) with a non-zero mask.
    Flip(usize, u8),
    /// Keep only this many bytes (wrapped).
    Truncate(usize),
    /// Insert a byte at this index (wrapped).
    Insert(usize, u8),
    /// Remove the byte at this index (wrapped).
    Remove(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, mask)| Damage::Flip(i, mask)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Insert(i, b)),
        any::<usize>().prop_map(Damage::Remove),
    ]
}

impl Damage {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        match *self {
            Damage::Flip(i, mask) => bytes[i % len] ^= mask,
            Damage::Truncate(n) => bytes.truncate(n % len),
            Damage::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Damage::Remove(i) => {
                bytes.remove(i % len);
            }
        }
    }
}

// Helpers.

/// Decodes every frame `decode_stream` will give from `buf`, checking as it goes
/// that each frame took exactly its own encoded length off the buffer and that a
/// `None` left the buffer alone. Returns the frames and the error that stopped it,
/// if one did.
fn drain_stream(
    buf: &mut BytesMut,
    max_frame: usize,
) -> Result<(Vec<Frame>, Option<DecodeError>), TestCaseError> {
    let mut frames = Vec::new();
    loop {
        let before = buf.clone();
        match Frame::decode_stream(buf, max_frame) {
            Ok(Some(frame)) => {
                let taken = before.len() - buf.len();
                prop_assert_eq!(taken, frame.encoded_len());
                prop_assert!(frame.encoded_len() - LENGTH_PREFIX <= max_frame);
                prop_assert_eq!(&before[..taken], &frame.encode()[..]);
                frames.push(frame);
            }
            Ok(None) => {
                prop_assert_eq!(&before[..], &buf[..]);
                return Ok((frames, None));
            }
            Err(e) => return Ok((frames, Some(e))),
        }
    }
}

/// Cuts `wire` into pieces of the given sizes (cycled), the last one whatever is left.
fn chunks<'a>(wire: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = wire;
    let mut sizes = sizes.iter().cycle();
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = sizes
            .next()
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        Some(piece)
    })
}

// Round trips.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn every_frame_round_trips_through_a_stream(frame in frame()) {
        let wire = frame.encode();
        prop_assert_eq!(wire.len(), frame.encoded_len());
        let announced = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
        prop_assert_eq!(announced, wire.len() - LENGTH_PREFIX);
        prop_assert_eq!(wire[LENGTH_PREFIX], frame.kind_byte());

        // At its own size as the limit: the frame is exactly at the limit.
        let mut buf = BytesMut::from(&wire[..]);
        let decoded = Frame::decode_stream(&mut buf, announced).unwrap();
        prop_assert_eq!(decoded.as_ref(), Some(&frame));
        prop_assert!(buf.is_empty());

        // One byte less is one past the limit.
        let mut buf = BytesMut::from(&wire[..]);
        let refused = Frame::decode_stream(&mut buf, announced - 1);
        prop_assert_eq!(
            refused,
            Err(DecodeError::TooLarge { length: announced as u64, max: announced - 1 })
        );
    }

    #[test]
    fn every_frame_round_trips_through_a_message(frame in frame()) {
        let wire = frame.encode();
        let max = wire.len() - LENGTH_PREFIX;
        prop_assert_eq!(Frame::decode_message(wire.clone(), max).unwrap(), frame.clone());
        prop_assert_eq!(Frame::decode_body(wire.slice(LENGTH_PREFIX..)).unwrap(), frame);
    }

    #[test]
    fn encode_into_appends_without_touching_what_is_there(
        frame in frame(),
        before in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut buf = BytesMut::from(&before[..]);
        frame.encode_into(&mut buf);
        prop_assert_eq!(&buf[..before.len()], &before[..]);
        prop_assert_eq!(&buf[before.len()..], &frame.encode()[..]);
    }
}

proptest! {
    #[test]
    fn a_stream_of_frames_cut_anywhere_decodes_to_the_same_frames(
        frames in proptest::collection::vec(frame(), 1..12),
        sizes in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode_into(&mut wire);
        }

        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in chunks(&wire, &sizes) {
            buf.extend_from_slice(piece);
            let (decoded, error) = drain_stream(&mut buf, 1 << 20)?;
            prop_assert_eq!(error, None);
            got.extend(decoded);
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_stream_of_frames_cut_at_each_byte_decodes_to_the_same_frames(
        frames in proptest::collection::vec(frame(), 1..6),
    ) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode_into(&mut wire);
        }
        // Keep the quadratic cost in bounds for the occasional large frame.
        let step = (wire.len() / 512).max(1);

        for cut in (0..=wire.len()).step_by(step) {
            let mut buf = BytesMut::from(&wire[..cut]);
            let (mut got, error) = drain_stream(&mut buf, 1 << 20)?;
            prop_assert_eq!(error, None);
            buf.extend_from_slice(&wire[cut..]);
            let (rest, error) = drain_stream(&mut buf, 1 << 20)?;
            prop_assert_eq!(error, None);
            got.extend(rest);
            prop_assert_eq!(&got, &frames);
        }
    }
}

// Arbitrary and damaged input.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn decoding_arbitrary_bytes_from_a_stream_never_panics(
        data in proptest::collection::vec(any::<u8>(), 0..512),
        sizes in proptest::collection::vec(1usize..32, 1..8),
        max in max_frame(),
    ) {
        // All at once, then piece by piece: both stop at the same frames.
        let mut whole = BytesMut::from(&data[..]);
        let (frames, _) = drain_stream(&mut whole, max)?;

        let mut buf = BytesMut::new();
        let mut pieces = Vec::new();
        for piece in chunks(&data, &sizes) {
            buf.extend_from_slice(piece);
            let (decoded, error) = drain_stream(&mut buf, max)?;
            pieces.extend(decoded);
            if error.is_some() {
                break;
            }
        }
        prop_assert_eq!(pieces, frames);
    }

    #[test]
    fn decoding_arbitrary_bytes_as_a_body_never_panics_and_is_canonical(
        data in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(frame) = Frame::decode_body(Bytes::from(data.clone())) {
            prop_assert_eq!(&frame.encode()[LENGTH_PREFIX..], &data[..]);
        }
    }

    #[test]
    fn decoding_an_arbitrary_message_never_panics_and_is_canonical(
        data in proptest::collection::vec(any::<u8>(), 0..256),
        max in max_frame(),
    ) {
        if let Ok(frame) = Frame::decode_message(Bytes::from(data.clone()), max) {
            prop_assert_eq!(&frame.encode()[..], &data[..]);
        }
    }

    #[test]
    fn a_body_with_a_valid_kind_and_random_fields_never_panics(
        kind_byte in prop_oneof![0x01u8..=0x08, 0x81u8..=0x85],
        fields in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // Random bytes rarely start with a known kind; these always do, so every
        // field reader meets short, long and invalid input.
        let mut body = vec![kind_byte];
        body.extend_from_slice(&fields);
        if let Ok(frame) = Frame::decode_body(Bytes::from(body.clone())) {
            prop_assert_eq!(&frame.encode()[LENGTH_PREFIX..], &body[..]);
        }
    }

    #[test]
    fn a_damaged_frame_never_panics_and_is_canonical_when_it_decodes(
        frame in frame(),
        damage in proptest::collection::vec(damage(), 1..4),
        max in max_frame(),
    ) {
        let mut wire = frame.encode().to_vec();
        for d in &damage {
            if wire.is_empty() {
                break;
            }
            d.apply(&mut wire);
        }

        if let Ok(decoded) = Frame::decode_message(Bytes::from(wire.clone()), max) {
            prop_assert_eq!(&decoded.encode()[..], &wire[..]);
        }
        let mut buf = BytesMut::from(&wire[..]);
        drain_stream(&mut buf, max)?;
    }

    #[test]
    fn a_length_above_the_limit_is_refused_without_reserving_it(
        max in 0usize..(1 << 16),
        excess in 1u64..(1 << 31),
        body in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let length = (max as u64 + excess).min(u64::from(u32::MAX));
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u32(length as u32);
        buf.put_slice(&body);
        let capacity = buf.capacity();

        prop_assert_eq!(
            Frame::decode_stream(&mut buf, max),
            Err(DecodeError::TooLarge { length, max })
        );
        prop_assert_eq!(buf.capacity(), capacity);
    }
}
