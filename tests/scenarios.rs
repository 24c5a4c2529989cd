//! The broker among silent, stalled, crowded, hostile and vanishing peers: one test per
//! scenario, each named after what it shows, each over real parts. Exact scenarios run
//! over the in-process transport (on paused time where a timeout is measured); the ones
//! where the wire matters (a peer whose socket buffers fill, a socket cut mid-frame, a
//! forged frame) run over loopback TCP with raw peers.

mod common;

use bytes::Bytes;
use common::*;
use futures::future::join_all;
use futures::stream::{self, StreamExt};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::frame::{Frame, LENGTH_PREFIX};
use switchboard::transport::{Connection, FrameWriter, MemoryWriter};
use switchboard::{
    Broker, Client, ClientError, DisconnectInfo, ErrorCode, ErrorInfo, Event, LagInfo,
    MemoryTransport, MessageKind, Notice, SlowConsumerPolicy, Target, Transport,
};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// The users who are members of `session` now, sorted; empty when there is no such
/// session.
fn members_of(broker: &Broker, session: &str) -> Vec<String> {
    let mut users: Vec<String> = broker
        .session(session)
        .map(|s| s.members.iter().map(|m| m.user.to_string()).collect())
        .unwrap_or_default();
    users.sort();
    users
}

/// A payload of `size` bytes that starts with its sequence number.
fn numbered(seq: u32, size: usize) -> Vec<u8> {
    let mut payload = vec![b'.'; size];
    payload[..4].copy_from_slice(&seq.to_be_bytes());
    payload
}

fn seq_of(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[..4].try_into().expect("a numbered payload"))
}

/// The size of the `DELIVER` frame the broker makes of a message: length prefix, kind,
/// id, message kind, time, then the sender, target and payload.
fn deliver_len(sender: &str, target: &str, payload: usize) -> usize {
    LENGTH_PREFIX + 1 + 8 + 1 + 8 + 2 + sender.len() + 2 + target.len() + payload
}

// ---------------------------------------------------------------------------------
// 1. An idle member.

const IDLE: Duration = Duration::from_secs(6);
const HEARTBEAT: Duration = Duration::from_secs(2);

#[tokio::test(start_paused = true)]
async fn an_idle_member_is_closed_and_removed_within_timeout_plus_one_heartbeat() {
    let (tx, mut disconnects) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = Broker::builder()
        .idle_timeout(IDLE)
        .heartbeat_interval(HEARTBEAT)
        .on_disconnect(move |info| {
            let _ = tx.send(info.clone());
        });
    let (broker, connector) = memory_broker(builder);

    // A member that stays: the crate's client pings whenever it has been quiet for a
    // heartbeat interval.
    let awake = Client::builder("awake").connect_memory(&connector);
    let mut awake = within("awake's handshake", awake).await.unwrap();
    for session in ["room-a", "room-b"] {
        within("subscribe", awake.subscribe(session)).await.unwrap();
    }

    // The idle member joins three sessions and from then on sends nothing at all.
    let mut idle = RawMemory::connect(&connector).await;
    idle.handshake("idle").await;
    idle.send_all(vec![
        raw_subscribe(1, b"room-a"),
        raw_subscribe(2, b"room-b"),
        raw_subscribe(3, b"idle-only"),
    ])
    .await;
    for request in 1..=3 {
        assert_eq!(idle.frame().await, Some(Frame::Ok { request }));
    }
    let last_heard = Instant::now();

    // Being sent messages is not being heard from.
    tokio::time::sleep(IDLE / 2).await;
    within("publish", awake.publish("room-a", "are you there?"))
        .await
        .unwrap();

    // Just inside the idle timeout it is still a member everywhere.
    tokio::time::sleep_until(last_heard + IDLE - Duration::from_millis(1)).await;
    assert_eq!(members_of(&broker, "room-a"), ["awake", "idle"]);
    assert_eq!(members_of(&broker, "room-b"), ["awake", "idle"]);
    assert_eq!(members_of(&broker, "idle-only"), ["idle"]);
    assert_eq!(broker.stats().connections, 2);

    // One heartbeat interval past the timeout it is gone from every session, and the
    // session it was alone in is freed.
    tokio::time::sleep_until(last_heard + IDLE + HEARTBEAT).await;
    assert_eq!(members_of(&broker, "room-a"), ["awake"]);
    assert_eq!(members_of(&broker, "room-b"), ["awake"]);
    assert_eq!(broker.session("idle-only"), None);
    let stats = broker.stats();
    assert_eq!((stats.connections, stats.users, stats.sessions), (1, 1, 2));

    // It was sent what was published to it, then told why it was closed.
    let mut delivered = Vec::new();
    let (code, reason) = loop {
        match idle.frame().await {
            Some(Frame::Deliver { payload, .. }) => delivered.push(payload),
            Some(Frame::Ping) => {}
            Some(Frame::Close { code, reason }) => break (code, reason),
            other => panic!("expected DELIVER, PING or CLOSE, got {other:?}"),
        }
    };
    assert_eq!(delivered, [Bytes::from_static(b"are you there?")]);
    assert_eq!(code, ErrorCode::IdleTimeout);
    assert_eq!(reason.as_str(), format!("nothing received for {IDLE:?}"));
    assert_eq!(idle.frame().await, None, "the link ends after CLOSE");
    let info = within("on_disconnect", disconnects.recv()).await.unwrap();
    assert_eq!((&*info.user, info.code), ("idle", ErrorCode::IdleTimeout));

    // The member that kept talking was never at risk.
    broker.publish("room-b", "still here").await.unwrap();
    assert_eq!(next_payload(&mut awake).await, "still here");
    assert_eq!(broker.stats().connections, 1);
}

// ---------------------------------------------------------------------------------
// 2. A member that stops reading while the others read everything.

const STALL_MEMBERS: usize = 20;
const STALL_MESSAGES: u32 = 10_000;
const STALL_SIZE: usize = 16 * 1024;

/// How many messages a reading member may be behind the publisher. The broker never
/// waits for a member (that is the point), so a publisher that outran the members that
/// do read would make slow consumers of them too; this window, half of the default
/// outbox, is how the test publishes as fast as the readers read and no faster.
const WINDOW: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_reading_is_closed_as_a_slow_consumer_while_19_others_get_every_message(
) {
    let (lag_tx, mut lags) = mpsc::unbounded_channel::<LagInfo>();
    let (gone_tx, mut gone) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = Broker::builder()
        .on_lag(move |info| {
            let _ = lag_tx.send(info.clone());
        })
        .on_disconnect(move |info| {
            let _ = gone_tx.send(info.clone());
        });
    let t = TestBroker::with(builder).await;
    let cap = t.broker.config().outbox_bytes;
    assert_eq!(
        t.broker.config().slow_consumer,
        SlowConsumerPolicy::Disconnect
    );

    // The stalled member: a raw socket that joins the session and then reads nothing,
    // so its kernel buffers fill and the broker's writes to it stop completing.
    let mut stalled = t.raw_tcp().await;
    stalled.handshake("stalled").await;
    stalled.send(&raw_subscribe(1, b"room")).await;
    assert_eq!(stalled.frame().await, Some(Frame::Ok { request: 1 }));

    // Once the broker reports giving up on it, it reads again: what was already on its
    // way, then the close.
    let stalled = tokio::spawn(async move {
        let lag = within("on_lag", lags.recv()).await.expect("a lag report");
        let mut received = 0;
        let close = loop {
            match stalled.frame().await {
                Some(Frame::Deliver { payload, .. }) => {
                    assert_eq!(seq_of(&payload), received, "an unbroken prefix");
                    assert_eq!(payload.len(), STALL_SIZE);
                    received += 1;
                }
                Some(Frame::Ping) => {}
                Some(Frame::Close { code, reason }) => break (code, reason.to_string()),
                other => panic!("expected DELIVER or CLOSE, got {other:?}"),
            }
        };
        assert_eq!(stalled.frame().await, None, "the stream ends after CLOSE");
        (lag, lags, received, close)
    });

    // Nineteen members that read, each with a window of messages it may be behind.
    let mut windows = Vec::new();
    let mut readers = Vec::new();
    for i in 0..STALL_MEMBERS - 1 {
        let member = t.connect(Link::Tcp, &format!("member{i}")).await;
        within("subscribe", member.subscribe("room")).await.unwrap();
        let window = Arc::new(Semaphore::new(WINDOW));
        windows.push(window.clone());
        let (handle, mut events) = member.split();
        readers.push(tokio::spawn(async move {
            for seq in 0..STALL_MESSAGES {
                let message = next_message(&mut events).await;
                assert_eq!(seq_of(&message.payload), seq, "member{i}");
                assert_eq!(message.payload.len(), STALL_SIZE, "member{i}");
                window.add_permits(1);
            }
            expect_quiet(&mut events).await;
            (handle, events)
        }));
    }

    let publisher = t.connect(Link::Tcp, "publisher").await;
    for seq in 0..STALL_MESSAGES {
        for window in &windows {
            within("room in a member's window", window.acquire())
                .await
                .unwrap()
                .forget();
        }
        within(
            "publish",
            publisher.publish("room", numbered(seq, STALL_SIZE)),
        )
        .await
        .unwrap();
    }

    // Every reading member got every message, in order, and nothing more.
    let mut members = Vec::new();
    for reader in readers {
        members.push(within("a member's messages", reader).await.unwrap());
    }

    // The stalled member was closed as a slow consumer, and the broker said so.
    let (lag, mut lags, received, (code, reason)) = within("the stalled member's frames", stalled)
        .await
        .unwrap();
    assert_eq!(&*lag.user, "stalled");
    assert!(lag.disconnected);
    assert!(lags.try_recv().is_err(), "no reading member lagged");
    assert_eq!(code, ErrorCode::SlowConsumer);
    assert_eq!(reason, "slow consumer");
    let info = within("on_disconnect", gone.recv()).await.unwrap();
    assert_eq!(
        (&*info.user, info.code, info.reason.as_str()),
        ("stalled", ErrorCode::SlowConsumer, "slow consumer")
    );
    let room = members_of(&t.broker, "room");
    assert_eq!(room.len(), STALL_MEMBERS - 1);
    assert!(!room.contains(&"stalled".to_string()));

    // What the broker held for the stalled member, seen through its counters. Every copy
    // queued for a reading member reached it, so the rest of `messages_delivered` was
    // queued for the stalled one; of that, what never reached it is what its outbox held
    // when it overflowed and was freed, which must fit in the outbox.
    let stats = t.broker.stats();
    assert_eq!(stats.slow_consumers, 1);
    assert_eq!(stats.messages_received, u64::from(STALL_MESSAGES));
    let reading_copies = (STALL_MEMBERS as u64 - 1) * u64::from(STALL_MESSAGES);
    let queued_for_stalled = stats.messages_delivered - reading_copies;
    let freed = queued_for_stalled - u64::from(received);
    let frame = deliver_len("publisher", "room", STALL_SIZE) as u64;
    assert!(
        freed * frame <= cap as u64,
        "{freed} frames of {frame} bytes were freed at the overflow, over the outbox cap \
         of {cap}"
    );
    assert!(stats.messages_dropped >= 1, "{stats}");
    assert!(
        queued_for_stalled + stats.messages_dropped <= u64::from(STALL_MESSAGES),
        "every message was either queued for the stalled member or counted as dropped, \
         once: {stats}"
    );
    assert!(
        received < STALL_MESSAGES,
        "the stalled member was cut off long before the end"
    );
    drop(members);
}

/// The broker's side of an in-process link whose peer stops reading when messages
/// start: the first write carrying a `DELIVER` never completes, as a write to a socket
/// whose peer reads nothing never does. Everything handed to the broker's writer past
/// that point stays held, in the batch it is writing or in the outbox behind it.
struct StallingWriter {
    link: MemoryWriter,
    stalled: Arc<AtomicBool>,
}

impl FrameWriter for StallingWriter {
    async fn write_frames(&mut self, frames: &mut Vec<Bytes>) -> io::Result<()> {
        if frames
            .iter()
            .any(|f| f.get(LENGTH_PREFIX) == Some(&kind::DELIVER))
        {
            self.stalled.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.link.write_frames(frames).await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.link.close().await
    }
}

/// The memory part of the stalled-member scenario, measured exactly: no socket buffer
/// stands between the broker and a peer that reads nothing, so every message the broker
/// queued for the member is still held for it, in the writer's batch or in the outbox.
/// A single-threaded runtime makes the worst case exact: the worker forwards a whole
/// burst before the writer runs, so the writer takes it all as the batch it stalls on.
#[tokio::test]
async fn the_memory_held_for_a_stalled_member_stays_under_its_outbox_cap() {
    const CAP: usize = 64 * 1024;
    const FRAME: usize = 4096;
    let payload = FRAME - deliver_len("", "room", 0);
    let (lag_tx, mut lags) = mpsc::unbounded_channel::<LagInfo>();
    let broker = Broker::builder()
        .outbox_bytes(CAP)
        // Long enough that only the outbox can end the stall during the test.
        .write_timeout(Duration::from_secs(120))
        .on_lag(move |info| {
            let _ = lag_tx.send(info.clone());
        })
        .build();

    // The host accepts the connection itself, so that the broker writes through a
    // writer that stalls.
    let (mut transport, connector) = MemoryTransport::new();
    let mut peer = RawMemory::connect(&connector).await;
    let accepted = within("accept", transport.accept())
        .await
        .unwrap()
        .expect("a connection");
    let stalled = Arc::new(AtomicBool::new(false));
    let writer = StallingWriter {
        link: accepted.writer,
        stalled: stalled.clone(),
    };
    broker.accept(Connection::new(accepted.reader, writer, accepted.peer));
    peer.handshake("stalled").await;
    peer.send(raw_subscribe(1, b"room")).await;
    assert_eq!(peer.frame().await, Some(Frame::Ok { request: 1 }));

    // A burst just under the cap, which the writer takes and never finishes writing.
    let mut published = 0;
    for _ in 0..CAP / FRAME - 1 {
        broker.publish("room", vec![b'x'; payload]).await.unwrap();
        published += 1;
    }
    wait_until("the writer to stall", || stalled.load(Ordering::SeqCst)).await;

    // Then one message at a time until the broker gives up on the member. Nothing was
    // written past the stall, so each copy queued for it is held for it.
    let mut most_held = 0;
    loop {
        let forwarded = {
            let broker = broker.clone();
            move || broker.stats().messages_received == published
        };
        wait_until("the message forwarded", forwarded).await;
        let stats = broker.stats();
        if stats.slow_consumers > 0 {
            break;
        }
        most_held = most_held.max(stats.messages_delivered as usize * FRAME);
        assert!(published < 4 * (CAP / FRAME) as u64, "never closed");
        broker.publish("room", vec![b'x'; payload]).await.unwrap();
        published += 1;
    }
    assert!(
        most_held <= CAP,
        "{most_held} bytes ({} messages) were held for a member that had read none of \
         them, over its outbox cap of {CAP} bytes, while it was still a member",
        most_held / FRAME
    );
    let lag = within("on_lag", lags.recv()).await.unwrap();
    assert!(lag.disconnected);
    assert_eq!(broker.session("room"), None);
}

// ---------------------------------------------------------------------------------
// 3. One connection past the limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_the_next_client_is_refused_with_a_reason_and_the_others_carry_on() {
    const MAX: usize = 8;
    let t = TestBroker::with(Broker::builder().max_connections(MAX)).await;

    // The limit counts connections on every transport together.
    let mut members = Vec::new();
    for i in 0..MAX {
        let link = if i % 2 == 0 { Link::Memory } else { Link::Tcp };
        let member = t.connect(link, &format!("user{i}")).await;
        within("subscribe", member.subscribe("room")).await.unwrap();
        members.push(member);
    }
    let why = format!("the broker is at its limit of {MAX} connections");

    // One more, through the crate's client...
    match t
        .try_connect(Link::Tcp, Client::builder("one-too-many"))
        .await
    {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::TooManyConnections);
            assert_eq!(reason, why);
        }
        Err(other) => panic!("expected TooManyConnections, got {other}"),
        Ok(_) => panic!("a connection past the limit was accepted"),
    }
    // ...and on the wire: ERROR, CLOSE with the same code and reason, the end.
    let mut raw = t.raw_tcp().await;
    raw.send(&raw_hello(b"raw-too-many")).await;
    let expected_error = Frame::Error {
        request: 0,
        code: ErrorCode::TooManyConnections,
        reason: why.as_str().into(),
    };
    assert_eq!(raw.frame().await, Some(expected_error));
    let expected_close = Frame::Close {
        code: ErrorCode::TooManyConnections,
        reason: why.as_str().into(),
    };
    assert_eq!(raw.frame().await, Some(expected_close));
    assert_eq!(raw.frame().await, None);
    let stats = t.broker.stats();
    assert_eq!((stats.connections, stats.connections_refused), (MAX, 2));

    // Every member publishes once and hears each of the others once.
    for (i, member) in members.iter().enumerate() {
        let publishing = member.publish("room", format!("from user{i}"));
        within("publish", publishing).await.unwrap();
    }
    for (i, member) in members.iter_mut().enumerate() {
        let mut heard = Vec::new();
        for _ in 0..MAX - 1 {
            heard.push(next_payload(member).await);
        }
        heard.sort();
        let mut expected: Vec<String> = (0..MAX)
            .filter(|&j| j != i)
            .map(|j| format!("from user{j}"))
            .collect();
        expected.sort();
        assert_eq!(heard, expected, "user{i}");
    }

    // Direct messages go round the ring.
    for (i, member) in members.iter().enumerate() {
        let next = format!("user{}", (i + 1) % MAX);
        let sending = member.send_direct(&next, format!("from user{i}"));
        within("send_direct", sending).await.unwrap();
    }
    for i in 0..MAX {
        let member = &mut members[(i + 1) % MAX];
        assert_eq!(next_payload(member).await, format!("from user{i}"));
    }
    join_all(members.iter_mut().map(expect_quiet)).await;
    assert_eq!(t.broker.stats().connections, MAX);
}

// ---------------------------------------------------------------------------------
// 4. A connection in very many sessions.

const MANY_SESSIONS: usize = 100_000;

fn session_name(i: usize) -> String {
    format!("session-{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_100_000_sessions_leaves_no_session_behind_when_it_disconnects() {
    let builder = Broker::builder().max_sessions_per_connection(MANY_SESSIONS);
    let t = TestBroker::with(builder).await;

    // A bystander shares three of the sessions, so that the disconnect must remove one
    // member from those rather than drop whole sessions.
    let shared = [0, MANY_SESSIONS / 2, MANY_SESSIONS - 1];
    let mut bystander = t.connect(Link::Memory, "bystander").await;
    for i in shared {
        within("subscribe", bystander.subscribe(&session_name(i)))
            .await
            .unwrap();
    }

    // Many SUBSCRIBEs in flight at once, as a client restoring its sessions sends them.
    let mut joiner = t.connect(Link::Memory, "joiner").await;
    let handle = joiner.handle();
    let mut joins = stream::iter(0..MANY_SESSIONS)
        .map(|i| {
            let handle = handle.clone();
            async move { handle.subscribe(&session_name(i)).await }
        })
        .buffer_unordered(256);
    let mut joined = 0;
    while let Some(result) = within("a subscribe", joins.next()).await {
        result.unwrap();
        joined += 1;
    }
    assert_eq!(joined, MANY_SESSIONS);
    assert_eq!(t.broker.stats().sessions, MANY_SESSIONS);
    assert_eq!(
        members_of(&t.broker, &session_name(shared[1])),
        ["bystander", "joiner"]
    );

    // At the limit, and one past it.
    match within("subscribe", joiner.subscribe("one-more")).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::TooManySessions),
        other => panic!("expected TooManySessions, got {other:?}"),
    }

    joiner.close().await;
    closed(&mut joiner).await;
    let broker = t.broker.clone();
    wait_until("the joiner's cleanup", move || {
        let stats = broker.stats();
        stats.connections == 1 && stats.sessions == shared.len()
    })
    .await;
    for i in (0..MANY_SESSIONS).step_by(997).chain(shared) {
        let members = members_of(&t.broker, &session_name(i));
        if shared.contains(&i) {
            assert_eq!(members, ["bystander"], "{}", session_name(i));
        } else {
            assert!(
                members.is_empty(),
                "{} outlived its only member",
                session_name(i)
            );
        }
    }

    bystander.close().await;
    closed(&mut bystander).await;
    t.wait_until_empty().await;
    for i in shared {
        assert_eq!(t.broker.session(&session_name(i)), None);
    }
}

// ---------------------------------------------------------------------------------
// 5. A large message to many members.

const FAN_OUT: usize = 1_000;
const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_mib_message_to_1000_members_is_encoded_once_and_its_payload_allocated_once() {
    // The DELIVER of a 1 MiB payload is over the default frame and outbox limits, so both
    // are raised: what is measured here is the message, not the limits.
    let (broker, connector) =
        memory_broker(Broker::builder().max_frame(2 * MIB).outbox_bytes(2 * MIB));
    let mut members = Vec::with_capacity(FAN_OUT);
    for i in 0..FAN_OUT {
        let connecting = Client::builder(format!("member{i}")).connect_memory(&connector);
        members.push(within("a member's handshake", connecting).await.unwrap());
    }
    for chunk in members.chunks(100) {
        let joins = join_all(chunk.iter().map(|member| member.subscribe("stadium")));
        for joined in within("a hundred subscribes", joins).await {
            joined.unwrap();
        }
    }
    let publisher = Client::builder("publisher").connect_memory(&connector);
    let publisher = within("the publisher's handshake", publisher)
        .await
        .unwrap();

    let payload: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    within("publish", publisher.publish("stadium", payload.clone()))
        .await
        .unwrap();

    // Over the in-process link a member's payload is a slice of the very buffer the
    // broker's worker encoded, so one buffer for every member means the message was
    // encoded once and its payload allocated once. Every payload is kept until the end,
    // so that no address can be freed and reused in between.
    let mut payloads = Vec::with_capacity(FAN_OUT);
    for member in &mut members {
        payloads.push(next_message(member).await.payload);
    }
    assert_eq!(&payloads[0][..], &payload[..]);
    let shared = payloads[0].as_ptr() as usize;
    for (i, delivered) in payloads.iter().enumerate() {
        assert_eq!(delivered.len(), MIB, "member{i}");
        assert_eq!(
            delivered.as_ptr() as usize,
            shared,
            "member{i} got a payload of its own"
        );
    }
    let stats = broker.stats();
    assert_eq!(stats.messages_received, 1);
    assert_eq!(stats.messages_delivered, FAN_OUT as u64);
}

// ---------------------------------------------------------------------------------
// 6. A forged sender.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_names_another_user_as_sender_reaches_members_with_the_real_sender() {
    let t = TestBroker::start().await;
    let mut alice = t.connect(Link::Tcp, "alice").await;
    let mut mallory = t.connect(Link::Memory, "mallory").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", mallory.subscribe("room"))
        .await
        .unwrap();
    let mut watcher = t.raw_tcp().await;
    watcher.handshake("watcher").await;
    watcher.send(&raw_subscribe(1, b"room")).await;
    assert_eq!(watcher.frame().await, Some(Frame::Ok { request: 1 }));

    // PUBLISH and DIRECT have no sender field: the protocol gives a client no way to
    // name one. The nearest a client can come is to lay its payload out as the body of
    // the DELIVER it wishes members would get, naming "mallory" where the sender sits,
    // in the hope of a relay that splices bytes instead of stamping them.
    let mut forged = Vec::new();
    forged.extend(1u64.to_be_bytes()); // id
    forged.push(1); // a session message
    forged.extend(0u64.to_be_bytes()); // sent at
    forged.extend(str16(b"mallory")); // sender
    forged.extend(str16(b"room")); // target
    forged.extend_from_slice(b"send the money to eve");
    let mut eve = t.raw_tcp().await;
    eve.handshake("eve").await;
    eve.send(&raw_publish(b"room", &forged)).await;
    let mut direct = 7u32.to_be_bytes().to_vec();
    direct.extend(str16(b"alice"));
    direct.extend_from_slice(&forged);
    eve.send(&raw_frame(kind::DIRECT, &direct)).await;

    // On the wire, the sender is the user eve's handshake named, and the payload is
    // passed on untouched.
    match watcher.frame().await {
        Some(Frame::Deliver {
            kind,
            sender,
            target,
            payload,
            ..
        }) => {
            assert_eq!(kind, MessageKind::Session);
            assert_eq!(sender.as_str(), "eve");
            assert_eq!(target.as_str(), "room");
            assert_eq!(payload, forged);
        }
        other => panic!("expected DELIVER, got {other:?}"),
    }
    let message = next_message(&mut mallory).await;
    assert_eq!(
        (&*message.sender, &message.payload[..]),
        ("eve", &forged[..])
    );

    // Alice gets both; the session and the user may be forwarded by different workers,
    // so in either order.
    let mut got = vec![
        next_message(&mut alice).await,
        next_message(&mut alice).await,
    ];
    got.sort_by_key(|m| m.kind == MessageKind::Direct);
    assert_eq!(got[0].target, Target::Session("room".into()));
    assert_eq!(got[1].target, Target::User("alice".into()));
    for message in &got {
        assert_eq!(&*message.sender, "eve");
        assert_eq!(&message.payload[..], &forged[..]);
    }

    // Mallory's own words carry her name; nothing else arrived.
    within("publish", mallory.publish("room", "it was not me"))
        .await
        .unwrap();
    assert_eq!(&*next_message(&mut alice).await.sender, "mallory");
    expect_quiet(&mut alice).await;
    expect_quiet(&mut mallory).await;
}

// ---------------------------------------------------------------------------------
// 7. Direct messages, delivered and not.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_reaches_a_user_in_no_session_and_to_a_user_with_no_connection_is_not_delivered(
) {
    let t = TestBroker::start().await;
    let (sender, mut notices) = t.connect(Link::Memory, "sender").await.split();

    // The recipient has two devices and has joined nothing.
    let mut phone = t.connect(Link::Tcp, "loner").await;
    let mut laptop = t.connect(Link::Memory, "loner").await;
    within("send_direct", sender.send_direct("loner", "found you"))
        .await
        .unwrap();
    for device in [&mut phone, &mut laptop] {
        let message = next_message(device).await;
        assert_eq!(message.kind, MessageKind::Direct);
        assert_eq!(&*message.sender, "sender");
        assert_eq!(message.target, Target::User("loner".into()));
        assert_eq!(&message.payload[..], b"found you");
    }
    assert_eq!(t.broker.stats().sessions, 0, "no session was involved");

    // A user who never connected, and one who did and left.
    let mut gone = t.connect(Link::Tcp, "gone").await;
    gone.close().await;
    closed(&mut gone).await;
    let broker = t.broker.clone();
    wait_until("gone's cleanup", move || broker.stats().connections == 3).await;
    for user in ["ghost", "gone"] {
        let request = within("send_direct", sender.send_direct(user, "anyone?"))
            .await
            .unwrap();
        let expected = Event::Notice(Notice::NotDelivered {
            request,
            user: user.into(),
        });
        assert_eq!(next_event(&mut notices).await, expected);
    }

    // The delivered message drew no notice, and the undelivered ones went nowhere.
    expect_quiet(&mut notices).await;
    expect_quiet(&mut phone).await;
    expect_quiet(&mut laptop).await;
    assert_eq!(t.broker.stats().messages_received, 3);
}

// ---------------------------------------------------------------------------------
// 8. A publisher whose connection drops.

/// Payloads of several sizes, so that frames end at many places within socket reads.
fn dropper_payload(i: usize) -> Vec<u8> {
    let mut payload = format!("{i}:").into_bytes();
    payload.resize(payload.len() + i % 300, b'~');
    payload
}

#[test]
fn what_a_publisher_sent_before_its_connection_dropped_reaches_every_member_and_nothing_panics() {
    const COMPLETE: usize = 1_000;
    let panics = run_counting_panics(
        "scenario-dropping-publisher",
        Duration::from_secs(60),
        || async {
            let (tx, mut errors) = mpsc::unbounded_channel::<ErrorInfo>();
            let builder = Broker::builder().on_error(move |info| {
                let _ = tx.send(info.clone());
            });
            let t = TestBroker::with(builder).await;
            let mut members = vec![
                t.connect(Link::Tcp, "member0").await,
                t.connect(Link::Tcp, "member1").await,
                t.connect(Link::Memory, "member2").await,
            ];
            for member in &members {
                within("subscribe", member.subscribe("room")).await.unwrap();
            }

            // The publisher writes COMPLETE whole frames and the first half of a large
            // one, and its connection drops in the middle of that frame.
            let mut bytes: Vec<u8> = (0..COMPLETE)
                .flat_map(|i| raw_publish(b"room", &dropper_payload(i)))
                .collect();
            let cut = raw_publish(b"room", &vec![b'x'; 256 * 1024]);
            bytes.extend_from_slice(&cut[..cut.len() / 2]);
            let mut dropper = t.raw_tcp().await;
            dropper.handshake("dropper").await;
            dropper.send(&bytes).await;
            drop(dropper);

            // Every member gets exactly the whole frames, in order, and nothing of the
            // cut one.
            for (n, member) in members.iter_mut().enumerate() {
                for i in 0..COMPLETE {
                    let message = next_message(member).await;
                    assert_eq!(&*message.sender, "dropper", "member{n}");
                    assert_eq!(
                        message.payload,
                        dropper_payload(i),
                        "member{n}, message {i}"
                    );
                }
            }
            join_all(members.iter_mut().map(expect_quiet)).await;

            // The cut frame is reported as what it is, and the connection is cleaned up.
            let info = within("on_error", errors.recv()).await.unwrap();
            assert_eq!(info.code, ErrorCode::Truncated);
            assert_eq!(info.user.as_deref(), Some("dropper"));
            let broker = t.broker.clone();
            wait_until("the dropper's cleanup", move || {
                broker.stats().connections == 3
            })
            .await;
            assert_eq!(members_of(&t.broker, "room").len(), 3);

            // The broker goes on serving: members talk, and a newcomer gets in.
            let publishing = members[0].publish("room", "after the drop");
            within("publish", publishing).await.unwrap();
            assert_eq!(next_payload(&mut members[1]).await, "after the drop");
            assert_eq!(next_payload(&mut members[2]).await, "after the drop");
            let mut newcomer = t.connect(Link::Tcp, "newcomer").await;
            let greeting = members[2].send_direct("newcomer", "welcome");
            within("send_direct", greeting).await.unwrap();
            assert_eq!(next_payload(&mut newcomer).await, "welcome");
            let stats = t.broker.stats();
            assert_eq!((stats.connections, stats.hook_panics), (4, 0));
            assert_eq!(stats.messages_received, COMPLETE as u64 + 2);
        },
    );
    assert_eq!(panics, 0, "nothing panicked on the broker's threads");
}
