//! DropOldest under pressure: every discarded message is counted and announced, replies
//! never discard uncounted messages, and the newest message survives.
#[macro_use]
mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::frame::{Frame, NoticeKind};
use switchboard::{Broker, SlowConsumerPolicy};

#[test]
fn drop_oldest_discards_messages_for_control_frames_without_counting_them() {
    run_with_deadline(Duration::from_secs(60), || async {
        let lagged = Arc::new(AtomicU64::new(0));
        let l = lagged.clone();
        let t = TestBroker::with(
            Broker::builder()
                .slow_consumer(SlowConsumerPolicy::DropOldest)
                .outbox_bytes(4096)
                .on_disconnect(|info| eprintln!("disconnect: {info:?}"))
                .on_lag(move |info| {
                    l.fetch_add(info.dropped, Ordering::Relaxed);
                }),
        )
        .await;

        // The member: in-process, so that its link fills after 64 batches.
        let mut member = t.raw_memory().await;
        member.handshake("m").await;
        member.send(raw_subscribe(1, b"room")).await;
        assert!(matches!(
            member.frame().await,
            Some(Frame::Ok { request: 1 })
        ));

        // Fill the link and then the outbox; the member reads nothing from here on.
        let publisher = t.connect(Link::Tcp, "p").await;
        // 70 messages one at a time: one batch each, so the link's 64 batches fill
        // and the writer stalls holding a single message. Then 28 more, which fit in
        // the outbox (4096 bytes, 131 bytes each) without any drop.
        const N: u64 = 98;
        for i in 0..N {
            publisher
                .publish("room", format!("{i:0100}"))
                .await
                .unwrap();
            if i < 70 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let broker = t.broker.clone();
        wait_until("every publication forwarded", || {
            broker.stats().messages_received == N
        })
        .await;
        let before = t.broker.stats();

        // The member keeps talking: every PING queues a PONG in the full outbox.
        for _ in 0..200 {
            member.send(raw_frame(kind::PING, &[])).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // One more message so that a Missed notice is queued ahead of it.
        publisher
            .publish("room", format!("{N:0100}"))
            .await
            .unwrap();
        let broker = t.broker.clone();
        wait_until("the last publication forwarded", || {
            broker.stats().messages_received == N + 1
        })
        .await;

        // Now the member reads everything.
        let (mut delivered, mut missed, mut pongs, mut notices) = (0u64, 0u64, 0u64, 0u64);
        while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_millis(500), member.reader_frame()).await
        {
            match frame {
                Frame::Deliver { .. } => delivered += 1,
                Frame::Notice {
                    kind: NoticeKind::Missed,
                    count,
                    ..
                } => {
                    missed += count;
                    notices += 1;
                }
                Frame::Pong => pongs += 1,
                Frame::Close { code, reason } => panic!("closed: {code:?} {reason}"),
                _ => {}
            }
        }
        let stats = t.broker.stats();
        eprintln!("before pings: {before}");
        eprintln!("after:        {stats}");
        eprintln!(
            "member got {delivered} messages, {pongs} pongs, {notices} Missed notices totalling \
             {missed}; on_lag reported {}",
            lagged.load(Ordering::Relaxed)
        );
        assert_eq!(
            delivered + missed,
            N + 1,
            "every message arrived or was reported missed"
        );
        assert_eq!(
            stats.messages_dropped, missed,
            "messages_dropped counts every message the member was told it missed"
        );
        assert_eq!(
            lagged.load(Ordering::Relaxed),
            missed,
            "on_lag was told of every loss"
        );
    });
}

trait ReaderFrame {
    async fn reader_frame(&mut self) -> Option<Frame>;
}
impl ReaderFrame for RawMemory {
    async fn reader_frame(&mut self) -> Option<Frame> {
        use switchboard::transport::FrameReader;
        self.reader.read_frame(usize::MAX).await.ok().flatten()
    }
}

/// Under DropOldest every queued message after a discard carries its own `Missed`
/// notice, and those notices are never discarded: a stalled member's outbox fills with
/// notices, after which DropOldest drops the newest message like DropNewest and a single
/// reply closes the member.
#[test]
fn drop_oldest_outbox_fills_with_missed_notices_and_loses_the_newest_messages() {
    run_with_deadline(Duration::from_secs(60), || async {
        let t = TestBroker::with(
            Broker::builder()
                .slow_consumer(SlowConsumerPolicy::DropOldest)
                .outbox_bytes(4096),
        )
        .await;
        let mut member = t.raw_memory().await;
        member.handshake("m").await;
        member.send(raw_subscribe(1, b"room")).await;
        assert!(matches!(
            member.frame().await,
            Some(Frame::Ok { request: 1 })
        ));

        let publisher = t.connect(Link::Tcp, "p").await;
        const N: u64 = 1000;
        for i in 0..N {
            publisher
                .publish("room", format!("{i:0100}"))
                .await
                .unwrap();
            if i < 70 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let broker = t.broker.clone();
        wait_until("every publication forwarded", || {
            broker.stats().messages_received == N
        })
        .await;

        let (mut last, mut delivered, mut notices, mut missed) = (None, 0u64, 0u64, 0u64);
        while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_millis(500), member.reader_frame()).await
        {
            match frame {
                Frame::Deliver { payload, .. } => {
                    delivered += 1;
                    last = Some(
                        String::from_utf8(payload.to_vec())
                            .unwrap()
                            .parse::<u64>()
                            .unwrap(),
                    );
                }
                Frame::Notice {
                    kind: NoticeKind::Missed,
                    count,
                    ..
                } => {
                    notices += 1;
                    missed += count;
                }
                _ => {}
            }
        }
        eprintln!(
            "{delivered} messages (last {last:?}), {notices} Missed notices totalling {missed}; {}",
            t.broker.stats()
        );
        assert_eq!(last, Some(N - 1), "DropOldest keeps the newest message");
    });
}
