//! The outbox: the bounded queue of encoded frames between the forwarding workers and
//! one connection's writer.
//!
//! Workers offer frames without ever waiting; the writer takes everything queued at
//! once and writes it as one batch. The outbox is bounded in bytes. When a frame does
//! not fit, the host's [`SlowConsumerPolicy`] decides what gives.

use crate::frame::{ErrorCode, Frame, NoticeKind, Text};
use crate::transport::WireFormat;
use bytes::Bytes;
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// The most bytes the writer takes at once (or one larger frame), each batch written
/// before the next is taken.
pub(crate) const TAKE_BYTES: usize = 64 * 1024;

/// What the broker does when a member's outbox is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SlowConsumerPolicy {
    /// Close the member with the reason "slow consumer" and free what was queued for it.
    #[default]
    Disconnect,
    /// Refuse the new message; the member later gets a notice of how many it missed.
    DropNewest,
    /// Discard the oldest queued messages until the new one fits; the member later gets
    /// a notice of how many it missed.
    DropOldest,
}

/// What became of an offered frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued for the writer.
    Queued,
    /// Queued, after discarding this many older messages to make room.
    QueuedDropping(u64),
    /// Not queued: the outbox was full and the policy drops the newest.
    Dropped,
    /// Not queued: the outbox overflowed and is now closing the connection; this many
    /// queued messages were freed with it.
    Overflowed(u64),
    /// Not queued: the connection is closing already.
    Closed,
}

/// Why a writer stops, and what it tells the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CloseReason {
    pub code: ErrorCode,
    pub reason: String,
}

/// What the writer found when it came for frames.
pub(crate) enum Batch {
    /// Frames were moved into the batch.
    Frames,
    /// Nothing is queued and the outbox is open.
    Empty,
    /// Nothing is queued, the outbox is open and the connection has gone quiet: room
    /// the writer keeps for its next batch can be given back.
    Quiet,
    /// Nothing is queued, the outbox is open and nothing was written for a heartbeat
    /// interval: the writer sends a `PING`.
    Ping,
    /// Nothing is queued and the connection is closing for this reason.
    Closing(CloseReason),
}

pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer.
    ready: Signal,
    /// Set once the outbox starts closing, so the reader can see it without the lock.
    closing: AtomicBool,
    /// The reader's waker, woken when the outbox starts closing.
    reader: AtomicWaker,
    capacity: usize,
    policy: SlowConsumerPolicy,
    /// The format of the notices the outbox writes itself.
    format: WireFormat,
}

/// What a queued frame is, which decides whether it may be discarded to make room.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A message: discarded under `DropOldest`.
    Message,
    /// A reply or notice: never discarded.
    Control,
    /// A `Missed` notice and its count: discarded like a message, its count carried
    /// into the next notice, so notices cannot crowd messages out.
    Missed(u64),
}

struct State {
    /// Each entry is one encoded frame and what it is.
    frames: VecDeque<(Bytes, Entry)>,
    /// Bytes in `frames`.
    bytes: usize,
    /// Bytes the writer took and has not finished writing: still held for the peer,
    /// so they count against the capacity too.
    in_flight: usize,
    missed: u64,
    closing: Option<CloseReason>,
    /// The writer took frames since the heartbeat last asked.
    took: bool,
    /// The writer took frames since the outbox last gave its room back.
    kept: bool,
    /// The writer is to give back the room it keeps, next time it finds nothing queued.
    quiet: bool,
    /// The writer is to send a `PING`, next time it finds nothing queued.
    ping: bool,
    /// The worker that queued frames the writer has not yet been woken for, and owes
    /// it that wake-up at the end of its batch. Another worker, or a reply, that
    /// queues a frame meanwhile wakes the writer itself rather than wait on that one.
    unwoken_by: Option<usize>,
}

/// Wakes one waiting task, or the next one to wait: a waker and a flag, without the
/// list of waiters a `Notify` keeps, for an outbox has one writer.
struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    fn new() -> Signal {
        Signal {
            set: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn notify(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the flag is read, so a notice between the two still wakes.
        self.waker.register(cx.waker());
        if self.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Outbox {
    pub(crate) fn new(capacity: usize, policy: SlowConsumerPolicy, format: WireFormat) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                in_flight: 0,
                missed: 0,
                closing: None,
                took: false,
                kept: false,
                quiet: false,
                ping: false,
                unwoken_by: None,
            }),
            ready: Signal::new(),
            closing: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            capacity,
            policy,
            format,
        }
    }

    /// Offers a message frame and wakes the writer. Never waits.
    #[cfg(test)]
    pub(crate) fn offer(&self, frame: Bytes) -> Offer {
        let (offer, wake) = self.push(frame, Some(0));
        if wake {
            self.wake();
        }
        offer
    }

    /// Offers a message frame from forwarding worker `worker`, never waiting, and
    /// leaves waking the writer to that worker: true means the writer may be waiting
    /// and [`Outbox::wake`] is due. A worker offers a run of messages first and wakes
    /// each writer once, so that the writer finds the run, not its first frame.
    ///
    /// A wake-up another worker owes is taken over: that worker may be held up (by a
    /// long batch, or by its `on_message` hook), and this one's frames must not wait
    /// for it.
    pub(crate) fn offer_unwoken(&self, frame: Bytes, worker: usize) -> (Offer, bool) {
        self.push(frame, Some(worker))
    }

    /// Wakes the writer after [`Outbox::offer_unwoken`].
    pub(crate) fn wake(&self) {
        self.state.lock().unwoken_by = None;
        self.ready.notify();
    }

    /// Queues a control frame (a reply, a notice). It counts against the capacity like
    /// any frame, so a peer that sends requests but never reads is still bounded.
    pub(crate) fn control(&self, frame: &Frame) -> Offer {
        let (offer, wake) = self.push(self.format.encode(frame), None);
        if wake {
            self.ready.notify();
        }
        offer
    }

    /// Queues a frame: a message from forwarding worker `worker`, or with `None` a
    /// control frame, whose caller wakes the writer at once. Also says whether the
    /// writer needs waking for it.
    fn push(&self, frame: Bytes, worker: Option<usize>) -> (Offer, bool) {
        let is_message = worker.is_some();
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return (Offer::Closed, false);
        }
        // The writer needs waking when it may have found the queue empty, or when the
        // worker that owes it a wake-up is not the one offering now.
        let wake = state.frames.is_empty() || state.unwoken_by.is_some_and(|w| worker != Some(w));

        // An outbox holding nothing takes any one frame, so a message larger than the
        // cap still reaches a member that keeps up; the cap bounds what piles up.
        let mut discarded = 0;
        if state.held() > 0 && state.held() + frame.len() > self.capacity {
            if self.policy == SlowConsumerPolicy::DropOldest {
                discarded = state.discard_oldest(self.capacity.saturating_sub(frame.len()));
            }
            if state.held() > 0 && state.held() + frame.len() > self.capacity {
                // A message may be dropped under a dropping policy; a reply or notice
                // never is, so a peer that asks for more than it reads is closed
                // whatever the policy.
                if !is_message || self.policy == SlowConsumerPolicy::Disconnect {
                    let freed = state.overflow();
                    drop(state);
                    self.started_closing();
                    return (Offer::Overflowed(freed), false);
                }
                state.missed += 1;
                return (Offer::Dropped, false);
            }
        }

        // A member that missed messages learns how many before it gets the next one.
        if state.missed > 0 && is_message {
            let notice = self.format.encode(&Frame::Notice {
                kind: NoticeKind::Missed,
                request: 0,
                count: state.missed,
                subject: Text::default(),
                text: Text::from("outbox full"),
            });
            let count = std::mem::take(&mut state.missed);
            state.bytes += notice.len();
            state.frames.push_back((notice, Entry::Missed(count)));
        }
        state.bytes += frame.len();
        let entry = if is_message {
            Entry::Message
        } else {
            Entry::Control
        };
        state.frames.push_back((frame, entry));
        if wake {
            // A control frame's caller wakes the writer now; a worker at its batch's end.
            state.unwoken_by = worker;
        }
        drop(state);

        let offer = if discarded > 0 {
            Offer::QueuedDropping(discarded)
        } else {
            Offer::Queued
        };
        (offer, wake)
    }

    /// Starts closing: the writer sends what is queued, then `reason`, then ends.
    /// Returns false when the outbox was closing already.
    pub(crate) fn close(&self, code: ErrorCode, reason: impl Into<String>) -> bool {
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return false;
        }
        state.closing = Some(CloseReason {
            code,
            reason: reason.into(),
        });
        drop(state);
        self.started_closing();
        true
    }

    /// Tells the writer and the reader that the outbox started closing.
    fn started_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.ready.notify();
        self.reader.wake();
    }

    /// Whether the outbox is closing: the connection is to end.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Ready once the outbox is closing. Only the connection's reader waits on it; it
    /// is also woken by [`Outbox::wake_reader`].
    pub(crate) fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the flag is read, so a close between the two still wakes.
        self.reader.register(cx.waker());
        if self.is_closing() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Wakes the reader waiting in [`Outbox::poll_closed`], so it looks again at why it
    /// might stop (a shutdown, say).
    pub(crate) fn wake_reader(&self) {
        self.reader.wake();
    }

    /// Why the outbox is closing, if it is.
    pub(crate) fn closing(&self) -> Option<CloseReason> {
        self.state.lock().closing.clone()
    }

    /// Moves what is queued into `batch`, up to [`TAKE_BYTES`] of it.
    pub(crate) fn take(&self, batch: &mut Vec<Bytes>) -> Batch {
        let mut state = self.state.lock();
        if state.frames.is_empty() {
            if let Some(reason) = &state.closing {
                return Batch::Closing(reason.clone());
            }
            return if std::mem::take(&mut state.quiet) {
                Batch::Quiet
            } else if std::mem::take(&mut state.ping) {
                Batch::Ping
            } else {
                Batch::Empty
            };
        }
        state.took = true;
        state.kept = true;
        state.quiet = false;
        state.ping = false;
        state.unwoken_by = None;
        // At most TAKE_BYTES at a time (or one larger frame): what the writer holds
        // counts against the cap until it is written, so a member is charged for
        // little more than what has not reached it.
        let mut taken = 0;
        while let Some(len) = state.frames.front().map(|(frame, _)| frame.len()) {
            if taken > 0 && taken + len > TAKE_BYTES {
                break;
            }
            if let Some((frame, _)) = state.frames.pop_front() {
                batch.push(frame);
            }
            taken += len;
        }
        state.in_flight += taken;
        state.bytes -= taken;
        if state.frames.capacity() > 1024 {
            state.frames.shrink_to(64);
        }
        Batch::Frames
    }

    /// The writer finished writing `bytes` of what it took.
    pub(crate) fn written(&self, bytes: usize) {
        let mut state = self.state.lock();
        state.in_flight = state.in_flight.saturating_sub(bytes);
    }

    /// Whether the writer took frames since the last call.
    pub(crate) fn took_since(&self) -> bool {
        std::mem::take(&mut self.state.lock().took)
    }

    /// Gives back the queue's room if nothing is queued, and has the writer give back
    /// the room it keeps for its next batch, unless both were given back already and
    /// nothing was taken since. The heartbeat calls it at each tick that finds the
    /// writer took nothing for a whole tick: a busy connection keeps its room, so
    /// forwarding to it allocates nothing, and an idle one holds none.
    pub(crate) fn release(&self) {
        let mut state = self.state.lock();
        if !state.kept || !state.frames.is_empty() || state.closing.is_some() {
            return;
        }
        state.frames = VecDeque::new();
        state.kept = false;
        state.quiet = true;
        drop(state);
        self.ready.notify();
    }

    /// Has the writer send a `PING` if nothing is queued by then.
    pub(crate) fn ping(&self) {
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return;
        }
        state.ping = true;
        drop(state);
        self.ready.notify();
    }

    /// Resolves once frames are queued, the outbox starts closing or the heartbeat has
    /// something for the writer, after [`Outbox::take`] found nothing to take. Only
    /// the connection's writer waits on it.
    pub(crate) fn ready(&self) -> impl std::future::Future<Output = ()> + '_ {
        poll_fn(|cx| self.ready.poll_wait(cx))
    }

    /// [`Outbox::ready`] as a poll, for an in-process member that takes its frames
    /// itself ([`crate::local`]).
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.ready.poll_wait(cx)
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

impl State {
    /// Bytes held for the peer: queued, or taken by a writer still writing them.
    fn held(&self) -> usize {
        self.bytes + self.in_flight
    }

    /// Starts a slow-consumer close: frees the queue and returns how many messages
    /// went with it.
    fn overflow(&mut self) -> u64 {
        let freed = self
            .frames
            .iter()
            .filter(|(_, entry)| *entry == Entry::Message)
            .count() as u64;
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.closing = Some(CloseReason {
            code: ErrorCode::SlowConsumer,
            reason: "slow consumer".to_string(),
        });
        freed
    }

    /// Discards the oldest messages until at most `target` bytes are held, if
    /// discarding can get there; control frames stay. Returns how many went.
    fn discard_oldest(&mut self, target: usize) -> u64 {
        let messages: usize = self
            .frames
            .iter()
            .filter(|(_, entry)| *entry != Entry::Control)
            .map(|(frame, _)| frame.len())
            .sum();
        if self.held() - messages > target {
            return 0;
        }
        let mut discarded = 0;
        let mut kept = VecDeque::with_capacity(self.frames.len());
        while let Some((frame, entry)) = self.frames.pop_front() {
            if entry != Entry::Control && self.held() > target {
                self.bytes -= frame.len();
                match entry {
                    Entry::Missed(n) => self.missed += n,
                    _ => discarded += 1,
                }
            } else {
                kept.push_back((frame, entry));
            }
        }
        self.frames = kept;
        self.missed += discarded;
        discarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn disconnect_policy_frees_the_queue_at_overflow() {
        let outbox = Outbox::new(100, SlowConsumerPolicy::Disconnect, WireFormat::Binary);
        assert_eq!(outbox.offer(frame(60)), Offer::Queued);
        assert_eq!(
            outbox.offer(frame(40)),
            Offer::Queued,
            "exactly at the cap fits"
        );
        assert_eq!(outbox.offer(frame(1)), Offer::Overflowed(2));
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(outbox.closing().unwrap().code, ErrorCode::SlowConsumer);
        assert_eq!(outbox.offer(frame(1)), Offer::Closed);
    }

    #[test]
    fn the_writer_takes_at_most_take_bytes_at_once_or_one_larger_frame() {
        let outbox = Outbox::new(1 << 20, SlowConsumerPolicy::Disconnect, WireFormat::Binary);
        for _ in 0..5 {
            assert_eq!(outbox.offer(frame(TAKE_BYTES / 4)), Offer::Queued);
        }
        let mut batch = Vec::new();
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        assert_eq!(batch.len(), 4, "four quarters fill one take");
        batch.clear();
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        assert_eq!(batch.len(), 1);
        batch.clear();

        assert_eq!(outbox.offer(frame(TAKE_BYTES + 1)), Offer::Queued);
        assert_eq!(outbox.offer(frame(1)), Offer::Queued);
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        assert_eq!(batch.len(), 1, "a frame over the bound goes alone");
        batch.clear();
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn what_is_written_of_a_batch_stops_counting_before_the_rest_is_out() {
        let outbox = Outbox::new(1000, SlowConsumerPolicy::DropNewest, WireFormat::Binary);
        assert_eq!(outbox.offer(frame(300)), Offer::Queued);
        assert_eq!(outbox.offer(frame(300)), Offer::Queued);
        let mut batch = Vec::new();
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        assert_eq!(outbox.offer(frame(500)), Offer::Dropped, "600 taken + 500");

        // The first frame of the batch is out; the second is still being written.
        outbox.written(300);
        assert_eq!(
            outbox.offer(frame(500)),
            Offer::Queued,
            "300 + 500 (and a notice)"
        );
        outbox.written(300);
        assert_eq!(
            outbox.offer(frame(400)),
            Offer::Queued,
            "only the 500 is held"
        );
        assert_eq!(
            outbox.offer(frame(100)),
            Offer::Dropped,
            "the cap still holds"
        );
    }

    #[test]
    fn drop_newest_counts_and_notifies_before_the_next_message() {
        let outbox = Outbox::new(100, SlowConsumerPolicy::DropNewest, WireFormat::Binary);
        assert_eq!(outbox.offer(frame(100)), Offer::Queued);
        assert_eq!(outbox.offer(frame(10)), Offer::Dropped);
        assert_eq!(outbox.offer(frame(10)), Offer::Dropped);

        let mut batch = Vec::new();
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        assert_eq!(
            outbox.offer(frame(10)),
            Offer::Dropped,
            "taken but unwritten still counts"
        );
        outbox.written(100);
        batch.clear();
        assert_eq!(outbox.offer(frame(10)), Offer::Queued);
        outbox.take(&mut batch);
        assert_eq!(batch.len(), 2);
        match Frame::decode_message(batch[0].clone(), 1 << 20).unwrap() {
            Frame::Notice { kind, count, .. } => {
                assert_eq!(kind, NoticeKind::Missed);
                assert_eq!(count, 3);
            }
            other => panic!("expected a notice, got {other:?}"),
        }
    }

    #[test]
    fn drop_oldest_keeps_the_newest() {
        let outbox = Outbox::new(100, SlowConsumerPolicy::DropOldest, WireFormat::Binary);
        for _ in 0..5 {
            assert_eq!(outbox.offer(frame(20)), Offer::Queued);
        }
        assert_eq!(outbox.offer(frame(30)), Offer::QueuedDropping(2));
        assert!(
            outbox.queued_bytes() <= 100 + 64,
            "the notice is the only excess"
        );
    }

    #[test]
    fn an_empty_outbox_takes_one_frame_larger_than_its_cap() {
        let outbox = Outbox::new(100, SlowConsumerPolicy::Disconnect, WireFormat::Binary);
        assert_eq!(outbox.offer(frame(150)), Offer::Queued);
        let mut batch = Vec::new();
        outbox.take(&mut batch);
        assert_eq!(
            outbox.offer(frame(1)),
            Offer::Overflowed(0),
            "still being written"
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_closes_under_every_policy() {
        for policy in [
            SlowConsumerPolicy::DropNewest,
            SlowConsumerPolicy::DropOldest,
        ] {
            let outbox = Outbox::new(20, policy, WireFormat::Binary);
            for _ in 0..4 {
                assert_eq!(outbox.control(&Frame::Pong), Offer::Queued);
            }
            assert_eq!(outbox.control(&Frame::Pong), Offer::Overflowed(0));
            assert_eq!(outbox.closing().unwrap().code, ErrorCode::SlowConsumer);
        }
    }

    #[test]
    fn a_quiet_outbox_gives_its_room_back_once_and_keeps_it_while_busy() {
        let outbox = Outbox::new(1000, SlowConsumerPolicy::Disconnect, WireFormat::Binary);
        let mut batch = Vec::new();
        outbox.release();
        assert!(
            matches!(outbox.take(&mut batch), Batch::Empty),
            "nothing was kept, so nothing to give back"
        );

        assert_eq!(outbox.offer(frame(10)), Offer::Queued);
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        outbox.written(10);
        batch.clear();
        assert!(outbox.state.lock().frames.capacity() > 0);

        // Queued frames keep the room, however quiet the heartbeat thinks it is.
        assert_eq!(outbox.offer(frame(10)), Offer::Queued);
        outbox.release();
        assert!(matches!(outbox.take(&mut batch), Batch::Frames));
        outbox.written(10);
        batch.clear();

        outbox.release();
        assert_eq!(outbox.state.lock().frames.capacity(), 0);
        assert!(matches!(outbox.take(&mut batch), Batch::Quiet));
        assert!(matches!(outbox.take(&mut batch), Batch::Empty));
        outbox.release();
        assert!(
            matches!(outbox.take(&mut batch), Batch::Empty),
            "given back already"
        );
    }

    #[test]
    fn a_ping_waits_behind_queued_frames_and_is_dropped_by_a_close() {
        let outbox = Outbox::new(1000, SlowConsumerPolicy::Disconnect, WireFormat::Binary);
        let mut batch = Vec::new();
        assert_eq!(outbox.offer(frame(10)), Offer::Queued);
        outbox.ping();
        assert!(
            matches!(outbox.take(&mut batch), Batch::Frames),
            "traffic is proof of life"
        );
        assert!(matches!(outbox.take(&mut batch), Batch::Empty));

        outbox.ping();
        assert!(matches!(outbox.take(&mut batch), Batch::Ping));
        assert!(matches!(outbox.take(&mut batch), Batch::Empty));

        outbox.ping();
        outbox.close(ErrorCode::Normal, "bye");
        assert!(matches!(outbox.take(&mut batch), Batch::Closing(_)));
        assert!(outbox.is_closing());
    }
}
