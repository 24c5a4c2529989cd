//! One task per connection, a heartbeat per broker, writers woken once per batch:
//! what each of these must still do when a side of the connection is stuck, when a
//! worker is held up, and when outboxes are small.

#[macro_use]
mod common;

use common::*;
use std::sync::mpsc as std_mpsc;
use std::sync::Mutex;
use std::time::Duration;
use switchboard::frame::Frame;
use switchboard::{Broker, Builder, Event};
use tokio::sync::mpsc;

/// A forwarding worker held up by its `on_message` hook: each message to `HELD` blocks
/// the worker that owns that session until the test lets one through. Every other
/// message's session is reported, so a test can find a session another worker owns.
struct HeldWorker {
    /// One unit lets one held message through; dropping it lets them all through.
    release: std_mpsc::Sender<()>,
    /// A unit for each held message whose hook began waiting.
    entered: mpsc::UnboundedReceiver<()>,
    /// The session of each message that was not held.
    passed: mpsc::UnboundedReceiver<String>,
}

const HELD: &str = "held";

/// `builder` with a hook that holds every message to [`HELD`], for at most 20 s each.
fn held_worker(builder: Builder) -> (Builder, HeldWorker) {
    let (release, gate) = std_mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let (passed_tx, passed) = mpsc::unbounded_channel();
    let builder = builder.on_message(move |message, _| {
        let session = message.target.id();
        if session == HELD {
            let _ = entered_tx.send(());
            // Waiting in place would also hold up whatever task the worker woke last,
            // which Tokio keeps for the worker's thread; this hands those on.
            tokio::task::block_in_place(|| {
                let gate = gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let _ = gate.recv_timeout(Duration::from_secs(20));
            });
        } else {
            let _ = passed_tx.send(session.to_string());
        }
    });
    let held = HeldWorker {
        release,
        entered,
        passed,
    };
    (builder, held)
}

impl HeldWorker {
    /// Holds the worker that owns [`HELD`] with a message nobody receives, and returns
    /// a session that another worker owns: the first one whose hook runs meanwhile.
    async fn find_session_of_another_worker(&mut self, broker: &Broker) -> String {
        broker.publish(HELD, "hold").await.unwrap();
        within("the held hook", self.entered.recv()).await.unwrap();
        for i in 0..32 {
            broker
                .publish(&format!("other-{i}"), "probe")
                .await
                .unwrap();
        }
        let other = within("a probe on another worker", self.passed.recv())
            .await
            .unwrap();
        self.release.send(()).unwrap();
        // The held worker goes through its probes too; wait for them all.
        for _ in 1..32 {
            within("the other probes", self.passed.recv())
                .await
                .unwrap();
        }
        other
    }
}

/// A worker wakes each member's writer at the end of its batch. A member of sessions
/// on two workers must not wait for the wake-up of one that is held up (here by its
/// hook) to receive what the other worker offered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_held_by_its_hook_does_not_hold_up_what_another_worker_offered_to_the_same_member()
{
    let (builder, mut held) = held_worker(Broker::builder().workers(2));
    let test = TestBroker::with(builder).await;
    let other = held.find_session_of_another_worker(&test.broker).await;

    let mut member = test.connect(Link::Memory, "member").await;
    within("subscribe", member.subscribe(HELD)).await.unwrap();
    within("subscribe", member.subscribe(&other)).await.unwrap();

    // The held worker offers its message to the member, then waits in its hook.
    test.broker
        .publish(HELD, "from the held worker")
        .await
        .unwrap();
    within("the held hook", held.entered.recv()).await.unwrap();
    test.broker
        .publish(&other, "from the other worker")
        .await
        .unwrap();
    within("the other hook", held.passed.recv()).await.unwrap();

    // Both messages are in the member's outbox; neither needs the held worker to go on.
    let mut got = vec![
        next_payload(&mut member).await,
        next_payload(&mut member).await,
    ];
    got.sort();
    assert_eq!(got, ["from the held worker", "from the other worker"]);
    drop(held.release);
}

/// The worker wakes writers early once it has offered a quarter of `outbox_bytes`, so
/// that members keeping up are not taken for slow consumers while their writers sleep.
/// What fills an outbox is frames, not payload: small messages to a long session id
/// are mostly header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_to_a_long_session_id_do_not_overflow_members_that_keep_up() {
    const OUTBOX: usize = 4096;
    const MESSAGES: usize = 60;
    let session = "s".repeat(200);
    // A hook that takes a few milliseconds per message gives the members' writers all
    // the time they need, once woken; meanwhile the host's messages queue up, so the
    // worker takes them in large batches. Several members, since a writer woken last
    // waits for the worker's thread to be free, where the others can be run elsewhere.
    let builder = Broker::builder()
        .workers(1)
        .outbox_bytes(OUTBOX)
        .on_message(|_, _| std::thread::sleep(Duration::from_millis(10)));
    let test = TestBroker::with(builder).await;
    let mut members = Vec::new();
    for i in 0..3 {
        let member = test.connect(Link::Memory, &format!("member-{i}")).await;
        within("subscribe", member.subscribe(&session))
            .await
            .unwrap();
        members.push(member);
    }

    for i in 0..MESSAGES {
        test.broker
            .publish(&session, format!("{}", i % 10))
            .await
            .unwrap();
    }
    let reading = members
        .into_iter()
        .enumerate()
        .map(|(n, mut member)| async move {
            for i in 0..MESSAGES {
                match next_event(&mut member).await {
                    Event::Message(m) => assert_eq!(m.payload, format!("{}", i % 10)),
                    other => panic!("member {n}, message {i}: expected a message, got {other:?}"),
                }
            }
        });
    futures::future::join_all(reading).await;
    assert_eq!(test.broker.stats().slow_consumers, 0);
}

/// A reply queued behind messages a held-up worker has not yet woken the writer for
/// goes out at once, with those messages ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_does_not_wait_for_the_wake_up_a_held_worker_owes() {
    let (builder, mut held) = held_worker(Broker::builder().workers(2));
    let test = TestBroker::with(builder).await;
    let mut member = test.connect(Link::Memory, "member").await;
    within("subscribe", member.subscribe(HELD)).await.unwrap();

    test.broker
        .publish(HELD, "offered, then held")
        .await
        .unwrap();
    within("the held hook", held.entered.recv()).await.unwrap();
    within(
        "a subscribe behind the held message",
        member.subscribe("elsewhere"),
    )
    .await
    .unwrap();
    assert_eq!(next_payload(&mut member).await, "offered, then held");
    drop(held.release);
}

/// A reader waiting for room on a full ingress queue (its publisher outran a held-up
/// worker) still has its connection's writer deliver what other workers offer, and
/// the heartbeat's `PING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_on_a_full_ingress_queue_still_gets_deliveries_and_pings() {
    // Which worker owns a session depends only on its id and the number of workers,
    // so a broker of its own finds the session without filling the one under test.
    let (builder, mut probe) = held_worker(Broker::builder().workers(2));
    let other = probe.find_session_of_another_worker(&builder.build()).await;

    let builder = Broker::builder()
        .workers(2)
        .ingress_capacity(1)
        .heartbeat_interval(Duration::from_millis(200));
    let (builder, mut held) = held_worker(builder);
    let (broker, connector) = memory_broker(builder);
    let mut publisher = RawMemory::connect(&connector).await;
    publisher.handshake("publisher").await;
    publisher.send(raw_subscribe(1, other.as_bytes())).await;
    assert_eq!(publisher.frame().await, Some(Frame::Ok { request: 1 }));

    // The held worker takes the first message; the rest fill its queue of one and
    // leave the publisher's reader waiting.
    let flood = (0..8).map(|_| raw_publish(HELD.as_bytes(), b"x")).collect();
    publisher.send_all(flood).await;
    within("the held hook", held.entered.recv()).await.unwrap();

    broker.publish(&other, "while you wait").await.unwrap();
    match publisher.frame().await {
        Some(Frame::Deliver { payload, .. }) => assert_eq!(payload, "while you wait"),
        other => panic!("expected the delivery, got {other:?}"),
    }
    assert_eq!(publisher.frame().await, Some(Frame::Ping));

    // Once the worker goes on, so does the reader: its next request is answered.
    drop(held.release);
    publisher.send(raw_subscribe(2, b"later")).await;
    loop {
        match publisher.frame().await {
            Some(Frame::Ok { request: 2 }) => break,
            Some(Frame::Ping) => {}
            other => panic!("expected OK, got {other:?}"),
        }
    }
}

/// A writer stuck on a socket its peer does not read leaves the reader free: the
/// peer's frames are still read and forwarded, and its leaving is noticed at once,
/// not after the write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_stuck_on_a_full_socket_does_not_stop_its_reader() {
    let builder = Broker::builder()
        .outbox_bytes(64 << 20)
        .write_timeout(Duration::from_secs(120));
    let test = TestBroker::with(builder).await;
    let mut listener = test.connect(Link::Memory, "listener").await;
    within("subscribe", listener.subscribe("side"))
        .await
        .unwrap();
    let mut stuck = test.raw_tcp().await;
    stuck.handshake("stuck").await;
    stuck.send(&raw_subscribe(1, b"flood")).await;
    assert_eq!(stuck.frame().await, Some(Frame::Ok { request: 1 }));

    // Far more than loopback socket buffers hold: the writer is left waiting.
    let chunk = bytes::Bytes::from(vec![7u8; 512 * 1024]);
    for _ in 0..64 {
        test.broker.publish("flood", chunk.clone()).await.unwrap();
    }
    let broker = test.broker.clone();
    let mut last = 0;
    wait_until("the writer to stop getting anywhere", move || {
        std::thread::sleep(Duration::from_millis(100));
        let now = broker.stats().bytes_out;
        std::mem::replace(&mut last, now) == now
    })
    .await;
    assert!(test.broker.stats().bytes_out < 32 << 20);

    stuck
        .send(&raw_publish(b"side", b"read past a stuck writer"))
        .await;
    assert_eq!(
        next_payload(&mut listener).await,
        "read past a stuck writer"
    );

    stuck.shutdown_write().await;
    let broker = test.broker.clone();
    wait_until("the stuck peer to leave its session", move || {
        broker.session("flood").is_none() && broker.stats().connections == 1
    })
    .await;
}
