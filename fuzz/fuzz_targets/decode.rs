//! Feeds arbitrary bytes to the frame decoder the way each transport would: as a byte
//! stream arriving in pieces, and as one whole message.
//!
//! The decoder must never panic, and whatever it accepts must be exactly what the
//! encoder produces for the decoded frame: a frame taken off a stream is its own
//! encoding, and a message that decodes encodes back to the same bytes.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use switchboard::frame::Frame;

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };

    // The first byte picks the limit and how the stream is cut, so the fuzzer can
    // steer both: limits from 1 byte to 1 MiB, pieces of 1 to 16 bytes.
    let max_frame = 1usize << (control & 0x0f).min(20);
    let piece = usize::from(control >> 4) + 1;

    // A byte stream, read a piece at a time.
    let mut buf = BytesMut::new();
    'stream: for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match Frame::decode_stream(&mut buf, max_frame) {
                Ok(Some(frame)) => {
                    let taken = before.len() - buf.len();
                    assert_eq!(&before[..taken], &frame.encode()[..]);
                    assert!(taken - 4 <= max_frame);
                }
                Ok(None) => {
                    assert_eq!(before, buf);
                    break;
                }
                Err(_) => break 'stream,
            }
        }
    }

    // A message transport: the whole input is one message.
    if let Ok(frame) = Frame::decode_message(Bytes::copy_from_slice(data), max_frame) {
        assert_eq!(&frame.encode()[..], data);
    }
});
