//! What decoding one JSON text message costs in memory: at most about one copy of the
//! text, whatever shape it has. A message of `max_frame` bytes whose bulk is a key the
//! frame does not have (a long array, thousands of keys) must not cost many times its
//! size while it is read, or a few peers could make the broker hold gigabytes.

#![cfg(feature = "websocket")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use switchboard::frame::Frame;

/// Counts the bytes allocated and not yet freed on the thread that asked for it.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn measuring() -> bool {
    MEASURING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is passed on to the system allocator unchanged; the counters
// only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if measuring() {
            let held = HELD.fetch_add(layout.size(), SeqCst) + layout.size();
            PEAK.fetch_max(held, SeqCst);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if measuring() {
            HELD.fetch_sub(layout.size(), SeqCst);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MAX: usize = 1024 * 1024;

/// The most bytes held at once while `text` is decoded, and what it decoded to.
fn peak_while_decoding(text: &str) -> (usize, Frame) {
    HELD.store(0, SeqCst);
    PEAK.store(0, SeqCst);
    MEASURING.with(|m| m.set(true));
    let decoded = switchboard::json::decode(text, MAX);
    MEASURING.with(|m| m.set(false));
    let frame = decoded.unwrap_or_else(|e| panic!("{e}"));
    (PEAK.load(SeqCst), frame)
}

/// A `publish` of `payload`, padded to almost `MAX` bytes by `filler` under a key the
/// frame does not have.
fn padded_publish(payload: &str, filler: impl Fn(usize) -> String) -> String {
    let mut text = format!(r#"{{"type":"publish","session":"s","payload":"{payload}""#);
    let mut i = 0;
    let mut padding = String::new();
    while text.len() + padding.len() < MAX - 64 {
        padding.push_str(&filler(i));
        i += 1;
    }
    text.push_str(&format!(r#","pad":[{}0]}}"#, padding));
    assert!(text.len() <= MAX);
    text
}

#[test]
fn a_text_message_of_max_frame_bytes_costs_at_most_about_its_own_size_to_decode() {
    let shapes = [
        (
            "an ignored array of numbers",
            padded_publish("hi", |_| "0,".into()),
        ),
        (
            "an ignored array of empty objects",
            padded_publish("hi", |_| "{},".into()),
        ),
        (
            "an ignored array of empty strings",
            padded_publish("hi", |_| "\"\",".into()),
        ),
        (
            "an ignored array of small objects",
            padded_publish("hi", |i| format!("{{\"{i:x}\":0}},")),
        ),
        (
            "a payload of almost max_frame bytes",
            padded_publish(&"x".repeat(MAX - 100), |_| "0,".into()),
        ),
    ];
    for (what, text) in shapes {
        let (peak, frame) = peak_while_decoding(&text);
        assert!(
            matches!(frame, Frame::Publish { .. }),
            "{what}: decoded to {frame:?}"
        );
        assert!(
            peak <= text.len() + 4096,
            "{what}: decoding {} bytes of text held {peak} bytes at once",
            text.len()
        );
    }
}
