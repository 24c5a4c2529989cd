//! A connection's life and the broker's: cleanup on disconnect, no memory left behind,
//! connection limits, slow consumers, idle and handshake timeouts (on paused time),
//! and shutdown.

#[macro_use]
mod common;

use common::*;
use futures::future::join_all;
use futures::StreamExt;
use std::time::Duration;
use switchboard::frame::Frame;
use switchboard::{
    Broker, Client, ClientError, DisconnectInfo, ErrorCode, Event, LagInfo, Notice,
    SlowConsumerPolicy,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

over_both_links!(
    disconnecting_removes_the_connection_from_every_session,
    no_per_connection_memory_is_left_after_everyone_leaves,
    a_dropped_client_is_disconnected,
    what_a_dropping_publisher_sent_still_reaches_the_members,
    shutdown_delivers_what_was_queued_then_closes_with_a_reason,
    max_connections_at_and_past_the_limit,
    outbox_bytes_at_and_past_the_limit,
    a_newer_connection_can_replace_the_older_one,
);

async fn disconnecting_removes_the_connection_from_every_session(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;
    for session in ["shared-1", "shared-2", "bob-only"] {
        within("subscribe", bob.subscribe(session)).await.unwrap();
    }
    for session in ["shared-1", "shared-2"] {
        within("subscribe", alice.subscribe(session)).await.unwrap();
    }
    assert_eq!(t.broker.stats().sessions, 3);

    bob.close().await;
    assert_eq!(closed(&mut bob).await.0, ErrorCode::Normal);
    assert_eq!(within("the end of the stream", bob.next()).await, None);
    match within("a request after the close", bob.subscribe("late")).await {
        Err(ClientError::Closed { .. }) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    let broker = t.broker.clone();
    wait_until("bob's cleanup", move || broker.stats().connections == 1).await;

    for session in ["shared-1", "shared-2"] {
        let members = t.broker.session(session).unwrap().members;
        assert_eq!(members.len(), 1, "{session}");
        assert_eq!(members[0].connection, alice.connection_id(), "{session}");
    }
    assert_eq!(
        t.broker.session("bob-only"),
        None,
        "an empty session is freed"
    );
    let stats = t.broker.stats();
    assert_eq!((stats.users, stats.sessions), (1, 2));

    // Publishing to the sessions bob was in still reaches alice, and only her.
    t.broker.publish("shared-1", "after bob").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "after bob");
    t.broker.publish("bob-only", "to nobody").await.unwrap();
    t.broker.publish("shared-2", "marker").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "marker");
    let broker = t.broker.clone();
    wait_until("the counters", move || {
        broker.stats().messages_received == 3
    })
    .await;
    assert_eq!(
        t.broker.stats().messages_delivered,
        2,
        "one copy each to alice"
    );
}

async fn no_per_connection_memory_is_left_after_everyone_leaves(link: Link) {
    let t = TestBroker::start().await;
    let mut clients = Vec::new();
    for i in 0..24 {
        // Users with two devices on two transports, and sessions shared in patterns.
        let link = if i % 3 == 0 { link.other() } else { link };
        let client = t.connect(link, &format!("user{}", i / 2)).await;
        for s in 0..4 {
            let session = format!("session{}", (i + s) % 7);
            within("subscribe", client.subscribe(&session))
                .await
                .unwrap();
        }
        clients.push(client);
    }
    let stats = t.broker.stats();
    assert_eq!(
        (stats.connections, stats.users, stats.sessions),
        (24, 12, 7)
    );

    for (i, client) in clients.iter().enumerate() {
        client
            .publish(&format!("session{}", i % 7), "hi")
            .await
            .unwrap();
        client
            .send_direct(&format!("user{}", (i + 1) % 12), "psst")
            .await
            .unwrap();
    }
    let broker = t.broker.clone();
    wait_until("every message forwarded", move || {
        broker.stats().messages_received == 48
    })
    .await;

    // Half leave politely; the rest are closed by the host.
    for client in clients.iter().step_by(2) {
        client.close().await;
    }
    for client in clients.iter().skip(1).step_by(2) {
        assert_eq!(t.broker.disconnect(client.connection_id(), "bye"), 1);
    }
    for client in &mut clients {
        closed(client).await;
    }
    t.wait_until_empty().await;
    for s in 0..7 {
        assert_eq!(t.broker.session(&format!("session{s}")), None);
    }
}

async fn a_dropped_client_is_disconnected(link: Link) {
    let t = TestBroker::start().await;
    let alice = t.connect(link, "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    assert_eq!(t.broker.stats().connections, 1);

    // Dropping every handle of a client is how Rust code lets go of a connection.
    drop(alice);
    t.wait_until_empty().await;
}

async fn what_a_dropping_publisher_sent_still_reaches_the_members(link: Link) {
    const MESSAGES: usize = 200;
    let t = TestBroker::start().await;
    let mut alice = t.connect(link.other(), "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    // The publisher writes its frames and vanishes right after, without a CLOSE.
    let frames: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|i| raw_publish(b"room", i.to_string().as_bytes()))
        .collect();
    match link {
        Link::Tcp => {
            let mut raw = t.raw_tcp().await;
            raw.handshake("dropper").await;
            raw.send(&frames.concat()).await;
            drop(raw);
        }
        Link::Memory => {
            let mut raw = t.raw_memory().await;
            raw.handshake("dropper").await;
            raw.send_all(frames).await;
            drop(raw);
        }
    }

    for i in 0..MESSAGES {
        let message = next_message(&mut alice).await;
        assert_eq!(&*message.sender, "dropper");
        assert_eq!(message.payload, i.to_string().as_bytes());
    }
    let broker = t.broker.clone();
    wait_until("the dropper's cleanup", move || {
        broker.stats().connections == 1
    })
    .await;
}

async fn shutdown_delivers_what_was_queued_then_closes_with_a_reason(link: Link) {
    const MESSAGES: usize = 300;
    let (tx, mut rx) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = Broker::builder()
        .workers(1)
        // A host hook that takes its time keeps the host's messages queued for a while,
        // so that a shutdown that did not wait for them would be caught closing early.
        .on_message(|message, _| {
            if message.is_from_host() {
                std::thread::sleep(Duration::from_micros(500));
            }
        })
        .on_disconnect(move |info| {
            let _ = tx.send(info.clone());
        });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;
    let mut carol = t.connect(link, "carol").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();

    // Carol's messages are forwarded already; the host's are only queued when the
    // shutdown begins.
    for i in 0..MESSAGES {
        carol.publish("room", format!("carol {i}")).await.unwrap();
    }
    let broker = t.broker.clone();
    wait_until("carol's messages forwarded", move || {
        broker.stats().messages_received == MESSAGES as u64
    })
    .await;
    for i in 0..MESSAGES {
        t.broker.publish("room", format!("host {i}")).await.unwrap();
    }
    within("shutdown", t.broker.shutdown()).await;

    for member in [&mut alice, &mut bob] {
        let (mut from_carol, mut from_host) = (0, 0);
        loop {
            match next_event(member).await {
                Event::Message(message) if &*message.sender == "carol" => {
                    assert_eq!(message.payload, format!("carol {from_carol}").as_bytes());
                    from_carol += 1;
                }
                Event::Message(message) => {
                    assert!(message.is_from_host());
                    assert_eq!(message.payload, format!("host {from_host}").as_bytes());
                    from_host += 1;
                }
                Event::Notice(notice) => panic!("unexpected {notice:?}"),
                Event::Closed { code, reason } => {
                    assert_eq!(code, ErrorCode::ShuttingDown);
                    assert!(!reason.is_empty());
                    break;
                }
            }
        }
        assert_eq!((from_carol, from_host), (MESSAGES, MESSAGES));
    }
    assert_eq!(closed(&mut carol).await.0, ErrorCode::ShuttingDown);

    let stats = t.broker.stats();
    assert_eq!((stats.connections, stats.users, stats.sessions), (0, 0, 0));
    for _ in 0..3 {
        let info = within("on_disconnect", rx.recv()).await.unwrap();
        assert_eq!(info.code, ErrorCode::ShuttingDown, "{}", info.user);
    }

    // Nothing new is taken: no pushes, no connections. Shutting down again is done.
    assert_eq!(
        t.broker.publish("room", "late").await,
        Err(switchboard::BrokerError::ShuttingDown)
    );
    let late = Client::builder("late").handshake_timeout(Duration::from_secs(2));
    assert!(t.try_connect(link, late).await.is_err());
    within("a second shutdown", t.broker.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_all_resolve() {
    let t = TestBroker::start().await;
    let mut alice = t.connect(Link::Tcp, "alice").await;
    let first = tokio::spawn({
        let broker = t.broker.clone();
        async move { broker.shutdown().await }
    });
    let second = tokio::spawn({
        let broker = t.broker.clone();
        async move { broker.shutdown().await }
    });
    within("the first shutdown", first).await.unwrap();
    within("the second shutdown", second).await.unwrap();
    assert_eq!(closed(&mut alice).await.0, ErrorCode::ShuttingDown);
}

async fn max_connections_at_and_past_the_limit(link: Link) {
    let t = TestBroker::with(Broker::builder().max_connections(3)).await;
    let mut a = t.connect(link, "a").await;
    let b = t.connect(link.other(), "b").await;
    let mut c = t.connect(link, "a").await;
    assert_eq!(t.broker.stats().connections, 3);

    match t.try_connect(link, Client::builder("d")).await {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::TooManyConnections);
            assert!(reason.contains('3'), "the reason names the limit: {reason}");
        }
        Err(other) => panic!("expected TooManyConnections, got {other}"),
        Ok(_) => panic!("a fourth connection was accepted"),
    }
    let stats = t.broker.stats();
    assert_eq!((stats.connections, stats.connections_refused), (3, 1));

    // The three carry on.
    b.send_direct("a", "still here").await.unwrap();
    assert_eq!(next_payload(&mut a).await, "still here");
    assert_eq!(next_payload(&mut c).await, "still here");

    // One leaves; the next may come in.
    c.close().await;
    closed(&mut c).await;
    let broker = t.broker.clone();
    wait_until("a free place", move || broker.stats().connections == 2).await;
    let mut d = t.connect(link.other(), "d").await;
    b.send_direct("d", "welcome").await.unwrap();
    assert_eq!(next_payload(&mut d).await, "welcome");
}

async fn outbox_bytes_at_and_past_the_limit(link: Link) {
    const OUTBOX: usize = 4096;
    // A host push to "room" is a DELIVER of 30 bytes plus the payload: the length
    // prefix, kind, id, message kind, time, an empty sender and the session id.
    const FITTING_PAYLOAD: usize = OUTBOX - 30;
    let (tx, mut rx) = mpsc::unbounded_channel::<LagInfo>();
    let builder = Broker::builder().outbox_bytes(OUTBOX).on_lag(move |info| {
        let _ = tx.send(info.clone());
    });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(link, "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    // An idle member's outbox is empty, so a message of exactly its size fits.
    let out = t.broker.stats().bytes_out;
    t.broker
        .publish("room", vec![b'x'; FITTING_PAYLOAD])
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut alice).await.payload.len(),
        FITTING_PAYLOAD
    );
    // The client can hold the message before the broker's writer has seen its write
    // complete and given the room back; bytes_out counts it only after that.
    wait_until("the message counted as written", || {
        t.broker.stats().bytes_out >= out + OUTBOX as u64
    })
    .await;

    // An empty outbox takes any one frame, so a message one byte over the cap still
    // reaches a member that keeps up.
    t.broker
        .publish("room", vec![b'x'; FITTING_PAYLOAD + 1])
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut alice).await.payload.len(),
        FITTING_PAYLOAD + 1
    );

    // Past the cap with frames already held, the member is a slow consumer: a member
    // that stops reading is closed once what it holds passes the cap.
    let slow = Client::builder("slow").event_capacity(1);
    let mut slow = t.try_connect(link, slow).await.unwrap();
    within("subscribe", slow.subscribe("backlog"))
        .await
        .unwrap();
    for _ in 0..64 {
        t.broker.publish("backlog", vec![b'y'; 1024]).await.unwrap();
    }
    let lag = within("on_lag", rx.recv()).await.unwrap();
    assert_eq!(&*lag.user, "slow");
    assert!(lag.disconnected);
    assert_eq!(t.broker.stats().slow_consumers, 1);
    let mut got = 0;
    let (code, reason) = loop {
        match next_event(&mut slow).await {
            Event::Message(_) => got += 1,
            Event::Closed { code, reason } => break (code, reason),
            Event::Notice(notice) => panic!("unexpected {notice:?}"),
        }
    };
    assert!(got < 64, "the slow member got {got} of 64");
    assert_eq!(code, ErrorCode::SlowConsumer);
    assert_eq!(reason, "slow consumer");
    drop(alice);
    t.wait_until_empty().await;
}

async fn a_newer_connection_can_replace_the_older_one(link: Link) {
    let t = TestBroker::with(Broker::builder().replace_older_connections(true)).await;
    let mut phone = t.connect(link, "alice").await;
    within("subscribe", phone.subscribe("room")).await.unwrap();
    let mut laptop = t.connect(link.other(), "alice").await;

    let (code, reason) = closed(&mut phone).await;
    assert_eq!(code, ErrorCode::Replaced);
    assert!(!reason.is_empty());
    let broker = t.broker.clone();
    wait_until("the older connection's cleanup", move || {
        let s = broker.stats();
        s.connections == 1 && s.sessions == 0
    })
    .await;

    t.broker.send_to("alice", "to the laptop").await.unwrap();
    assert_eq!(next_payload(&mut laptop).await, "to the laptop");
}

/// `Broker::accept`: the host runs its own accept loop (inside its own server, say) and
/// hands the broker each connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_host_accepted_itself_are_served() {
    let broker = Broker::builder().build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let host = broker.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            host.accept(switchboard::TcpTransport::connection(stream));
        }
    });
    let (mut memory, connector) = switchboard::MemoryTransport::new();
    let host = broker.clone();
    tokio::spawn(async move {
        use switchboard::Transport;
        while let Ok(Some(connection)) = memory.accept().await {
            host.accept(connection);
        }
    });

    let mut alice = within("alice", Client::builder("alice").connect_tcp(addr))
        .await
        .unwrap();
    let bob = within("bob", Client::builder("bob").connect_memory(&connector))
        .await
        .unwrap();
    within("subscribe", alice.subscribe("room")).await.unwrap();
    bob.publish("room", "through the host's loops")
        .await
        .unwrap();
    assert_eq!(next_payload(&mut alice).await, "through the host's loops");
    assert_eq!(broker.stats().connections, 2);

    // During shutdown a connection handed over is refused.
    within("shutdown", broker.shutdown()).await;
    let late = Client::builder("late").handshake_timeout(Duration::from_secs(2));
    match within("a late connection", late.connect_tcp(addr)).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::ShuttingDown),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a connection was accepted after shutdown"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_a_connection_still_in_its_handshake() {
    let t = TestBroker::start().await;
    let mut raw = t.raw_memory().await;
    let mut alice = t.connect(Link::Tcp, "alice").await;
    within("shutdown", t.broker.shutdown()).await;

    match raw.frame().await {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("expected ERROR, got {other:?}"),
    }
    match raw.frame().await {
        Some(Frame::Close { code, .. }) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("expected CLOSE, got {other:?}"),
    }
    assert_eq!(raw.frame().await, None);
    assert_eq!(closed(&mut alice).await.0, ErrorCode::ShuttingDown);
}

/// The default limit of sessions per connection, reached and then released at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_ten_thousand_sessions_leaves_none_behind() {
    let t = TestBroker::start().await;
    let limit = t.broker.config().max_sessions_per_connection;
    assert_eq!(limit, 10_000);
    let mut alice = t.connect(Link::Memory, "alice").await;

    let names: Vec<String> = (0..limit).map(|i| format!("s{i}")).collect();
    for chunk in names.chunks(1000) {
        let joins = join_all(chunk.iter().map(|name| alice.subscribe(name)));
        for joined in within("a thousand subscribes", joins).await {
            joined.unwrap();
        }
    }
    assert_eq!(t.broker.stats().sessions, limit);
    match within("subscribe", alice.subscribe("one-too-many")).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::TooManySessions),
        other => panic!("expected TooManySessions, got {other:?}"),
    }

    alice.close().await;
    closed(&mut alice).await;
    t.wait_until_empty().await;
}

/// Publishes `count` numbered messages of `size` bytes to "room" from a client that is
/// not a member.
async fn publish_numbered(publisher: &Client, count: u32, size: usize) {
    for seq in 0..count {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.resize(size, b'.');
        publisher.publish("room", payload).await.unwrap();
    }
}

fn seq_of(message: &switchboard::Message) -> u32 {
    u32::from_be_bytes(message.payload[..4].try_into().unwrap())
}

/// Sizes for the slow-consumer scenarios. A member that stops reading holds at most
/// its outbox plus what the in-process link buffers (64 batches, each at most one
/// outbox's worth), so 2,500 messages of 4 KiB always overflow a 128 KiB outbox. A
/// small ingress queue keeps each forwarding burst well under the outbox of members
/// that do read.
const SLOW_MESSAGES: u32 = 2_500;
const SLOW_SIZE: usize = 4 * 1024;
const SLOW_OUTBOX: usize = 128 * 1024;

#[tokio::test]
async fn a_slow_consumer_is_disconnected_while_the_others_get_everything() {
    let (lag_tx, mut lags) = mpsc::unbounded_channel::<LagInfo>();
    let (gone_tx, mut gone) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = Broker::builder()
        .outbox_bytes(SLOW_OUTBOX)
        .ingress_capacity(8)
        .on_lag(move |info| {
            let _ = lag_tx.send(info.clone());
        })
        .on_disconnect(move |info| {
            let _ = gone_tx.send(info.clone());
        });
    let t = TestBroker::with(builder).await;
    assert_eq!(
        t.broker.config().slow_consumer,
        SlowConsumerPolicy::Disconnect
    );

    // The slow member's client queues one event and is then never polled, so it stops
    // reading its connection.
    let slow = Client::builder("slow").event_capacity(1);
    let mut slow = t.try_connect(Link::Memory, slow).await.unwrap();
    within("subscribe", slow.subscribe("room")).await.unwrap();
    let mut readers = Vec::new();
    for i in 0..4 {
        let member = t.connect(Link::Memory, &format!("fast{i}")).await;
        within("subscribe", member.subscribe("room")).await.unwrap();
        let (_handle, mut events) = member.split();
        readers.push(tokio::spawn(async move {
            for seq in 0..SLOW_MESSAGES {
                assert_eq!(seq_of(&next_message(&mut events).await), seq, "fast{i}");
            }
            (_handle, events)
        }));
    }
    let publisher = t.connect(Link::Memory, "publisher").await;

    publish_numbered(&publisher, SLOW_MESSAGES, SLOW_SIZE).await;
    // The fast members stay connected, so the only disconnect reported is the slow one.
    let mut fast = Vec::new();
    for reader in readers {
        fast.push(
            within("every message at a fast member", reader)
                .await
                .unwrap(),
        );
    }

    // The slow member was closed and left the session; the broker said so.
    let lag = within("on_lag", lags.recv()).await.unwrap();
    assert_eq!(&*lag.user, "slow");
    assert_eq!(lag.connection, slow.connection_id());
    assert!(lag.disconnected);
    let broker = t.broker.clone();
    wait_until("the slow member's removal", move || {
        broker.session("room").map(|s| s.members.len()) == Some(4)
    })
    .await;
    let stats = t.broker.stats();
    assert_eq!(stats.slow_consumers, 1);
    assert!(stats.messages_dropped >= 1, "{stats}");

    // Once it reads again it finds an unbroken prefix of the messages, then the close.
    let mut expected = 0;
    let (code, reason) = loop {
        match next_event(&mut slow).await {
            Event::Message(message) => {
                assert_eq!(seq_of(&message), expected);
                expected += 1;
            }
            Event::Notice(notice) => panic!("unexpected {notice:?}"),
            Event::Closed { code, reason } => break (code, reason),
        }
    };
    assert_eq!(code, ErrorCode::SlowConsumer);
    assert_eq!(reason, "slow consumer");
    assert!(expected < SLOW_MESSAGES);
    let info = within("on_disconnect", gone.recv()).await.unwrap();
    assert_eq!((&*info.user, info.code), ("slow", ErrorCode::SlowConsumer));
}

/// Under a dropping policy nothing is lost silently: every message is either delivered
/// or counted in a `Missed` notice that arrives ahead of the next delivery.
async fn dropped_messages_are_all_accounted_for(policy: SlowConsumerPolicy) {
    let t = TestBroker::with(
        Broker::builder()
            .outbox_bytes(SLOW_OUTBOX)
            .ingress_capacity(8)
            .slow_consumer(policy),
    )
    .await;
    let slow = Client::builder("slow").event_capacity(1);
    let mut slow = t.try_connect(Link::Memory, slow).await.unwrap();
    within("subscribe", slow.subscribe("room")).await.unwrap();
    let publisher = t.connect(Link::Memory, "publisher").await;
    publish_numbered(&publisher, SLOW_MESSAGES, SLOW_SIZE).await;
    let broker = t.broker.clone();
    wait_until("every message forwarded", move || {
        broker.stats().messages_received == u64::from(SLOW_MESSAGES)
    })
    .await;

    // Drain what reached the member, then send one more so that the last misses are
    // reported too.
    let mut seen = Vec::new();
    let mut missed = 0;
    let mut last: Option<u32> = None;
    let mut record = |event: Event, seen: &mut Vec<u32>, missed: &mut u64| match event {
        Event::Message(message) => {
            let seq = seq_of(&message);
            if let Some(last) = last {
                assert!(seq > last, "{policy:?}: {seq} after {last}");
            }
            last = Some(seq);
            seen.push(seq);
        }
        Event::Notice(Notice::Missed { count }) => *missed += count,
        other => panic!("{policy:?}: unexpected {other:?}"),
    };
    while let Ok(Some(event)) = tokio::time::timeout(QUIET * 2, slow.recv()).await {
        record(event, &mut seen, &mut missed);
    }
    publish_numbered(&publisher, 1, 8).await;
    loop {
        let event = next_event(&mut slow).await;
        let is_last = matches!(&event, Event::Message(m) if seq_of(m) == 0);
        if is_last {
            break;
        }
        record(event, &mut seen, &mut missed);
    }

    assert!(
        missed > 0,
        "{policy:?}: the member was slow enough to miss messages"
    );
    assert_eq!(
        seen.len() as u64 + missed,
        u64::from(SLOW_MESSAGES),
        "{policy:?}"
    );
    let stats = t.broker.stats();
    assert_eq!(stats.messages_dropped, missed, "{policy:?}");
    assert_eq!(
        stats.slow_consumers, 0,
        "{policy:?}: nobody was disconnected"
    );
    assert_eq!(stats.connections, 2);
}

#[tokio::test]
async fn drop_newest_counts_and_reports_every_missed_message() {
    dropped_messages_are_all_accounted_for(SlowConsumerPolicy::DropNewest).await;
}

#[tokio::test]
async fn drop_oldest_counts_and_reports_every_missed_message() {
    dropped_messages_are_all_accounted_for(SlowConsumerPolicy::DropOldest).await;
}

// ---------------------------------------------------------------------------------
// Timeouts, on paused time: the clock only moves when every task waits, so these run
// in an instant and measure the broker's timers exactly.

const IDLE: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(1);

fn timed_builder() -> switchboard::Builder {
    Broker::builder()
        .idle_timeout(IDLE)
        .heartbeat_interval(HEARTBEAT)
        .handshake_timeout(Duration::from_secs(3))
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_closed_after_the_idle_timeout_and_cleaned_up() {
    let (tx, mut rx) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = timed_builder().on_disconnect(move |info| {
        let _ = tx.send(info.clone());
    });
    let (broker, connector) = memory_broker(builder);
    let mut raw = RawMemory::connect(&connector).await;
    raw.handshake("sleepy").await;
    raw.send(raw_subscribe(7, b"room")).await;
    assert_eq!(raw.frame().await, Some(Frame::Ok { request: 7 }));
    let last_heard = Instant::now();

    // The broker pings while it waits; a peer that never answers is closed.
    let (code, reason) = loop {
        match raw.frame().await {
            Some(Frame::Ping) => {}
            Some(Frame::Close { code, reason }) => break (code, reason),
            other => panic!("expected PING or CLOSE, got {other:?}"),
        }
    };
    let silent_for = last_heard.elapsed();
    assert_eq!(code, ErrorCode::IdleTimeout);
    assert!(!reason.is_empty());
    assert!(silent_for >= IDLE, "closed after {silent_for:?}");
    assert!(
        silent_for <= IDLE + HEARTBEAT,
        "closed after {silent_for:?}"
    );
    assert_eq!(raw.frame().await, None);

    let info = within("on_disconnect", rx.recv()).await.unwrap();
    assert_eq!(info.code, ErrorCode::IdleTimeout);
    assert_eq!(broker.session("room"), None);
    let stats = broker.stats();
    assert_eq!((stats.connections, stats.users, stats.sessions), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_connection_heard_within_the_idle_timeout_stays_open() {
    let (broker, connector) = memory_broker(timed_builder());

    // A raw peer that speaks just before each idle timeout runs out.
    let mut raw = RawMemory::connect(&connector).await;
    raw.handshake("chatty").await;
    for _ in 0..6 {
        tokio::time::sleep(IDLE - Duration::from_millis(100)).await;
        raw.send(raw_frame(kind::PING, b"")).await;
        loop {
            match raw.frame().await {
                Some(Frame::Pong) => break,
                Some(Frame::Ping) => {}
                other => panic!("expected PONG, got {other:?}"),
            }
        }
    }

    assert_eq!(
        broker.stats().connections,
        1,
        "the raw peer is still connected"
    );
    raw.send(raw_subscribe(1, b"room")).await;
    assert_eq!(raw.frame().await, Some(Frame::Ok { request: 1 }));
    drop(raw);
    let broker_ = broker.clone();
    wait_until("the raw peer's cleanup", move || {
        broker_.stats().connections == 0
    })
    .await;

    // The crate's client heartbeats by itself.
    let mut client = Client::builder("client")
        .connect_memory(&connector)
        .await
        .unwrap();
    within("subscribe", client.subscribe("room")).await.unwrap();
    tokio::time::sleep(IDLE * 6).await;

    assert_eq!(
        broker.stats().connections,
        1,
        "the client is still connected"
    );
    broker.publish("room", "still here").await.unwrap();
    assert_eq!(next_payload(&mut client).await, "still here");
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_says_hello_is_closed_after_the_handshake_timeout() {
    let (broker, connector) = memory_broker(timed_builder());
    let started = Instant::now();
    let mut raw = RawMemory::connect(&connector).await;

    match raw.frame().await {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::HandshakeTimeout),
        other => panic!("expected ERROR, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(3), "closed after {waited:?}");
    assert!(waited < Duration::from_secs(4), "closed after {waited:?}");
    match raw.frame().await {
        Some(Frame::Close { code, .. }) => assert_eq!(code, ErrorCode::HandshakeTimeout),
        other => panic!("expected CLOSE, got {other:?}"),
    }
    assert_eq!(raw.frame().await, None);
    let stats = broker.stats();
    assert_eq!(stats.connections_refused, 1);
    assert_eq!(stats.frames_rejected, 0, "silence is not bad input");
    assert_eq!(stats.connections, 0);
}

#[tokio::test(start_paused = true)]
async fn a_hello_just_inside_the_handshake_timeout_is_accepted() {
    let (broker, connector) = memory_broker(timed_builder());
    let mut raw = RawMemory::connect(&connector).await;
    tokio::time::sleep(Duration::from_secs(3) - Duration::from_millis(10)).await;
    raw.handshake("late-but-fine").await;
    assert_eq!(broker.stats().connections, 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_up_on_a_stalled_member_after_the_write_timeout() {
    const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
    let (broker, connector) = memory_broker(Broker::builder().write_timeout(WRITE_TIMEOUT));
    let stalled = Client::builder("stalled").event_capacity(1);
    let mut stalled = stalled.connect_memory(&connector).await.unwrap();
    within("subscribe", stalled.subscribe("room"))
        .await
        .unwrap();

    // One message per writer batch, many more than the in-process link holds: the
    // broker's writer ends up waiting on a peer that does not read.
    for i in 0..1000 {
        broker
            .publish("room", format!("message {i}"))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }

    let started = Instant::now();
    within("shutdown", broker.shutdown()).await;
    let waited = started.elapsed();
    assert!(
        waited > Duration::ZERO,
        "the member was stalled, so shutdown waited"
    );
    assert!(waited <= WRITE_TIMEOUT, "shutdown waited {waited:?}");
    let stats = broker.stats();
    assert_eq!((stats.connections, stats.sessions), (0, 0));

    // What the member had received ends, and its stream with it.
    loop {
        match next_event(&mut stalled).await {
            Event::Message(_) => {}
            Event::Closed { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn publish_rate_at_and_past_the_limit() {
    // A burst of 5, then 10 messages a second.
    let (broker, connector) = memory_broker(Broker::builder().publish_rate(10.0, 5));
    let mut member = Client::builder("member")
        .connect_memory(&connector)
        .await
        .unwrap();
    within("subscribe", member.subscribe("room")).await.unwrap();
    let publisher = Client::builder("publisher")
        .connect_memory(&connector)
        .await
        .unwrap();
    let (publisher, mut refusals) = publisher.split();

    // The burst passes; the message after it is refused and the connection goes on.
    for i in 0..6 {
        publisher.publish("room", format!("{i}")).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(next_payload(&mut member).await, format!("{i}"));
    }
    match next_event(&mut refusals).await {
        Event::Notice(Notice::Error { code, .. }) => assert_eq!(code, ErrorCode::RateLimited),
        other => panic!("expected a RateLimited notice, got {other:?}"),
    }
    let request = publisher.send_direct("member", "direct").await.unwrap();
    match next_event(&mut refusals).await {
        Event::Notice(Notice::Error {
            code, request: r, ..
        }) => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert_eq!(r, request, "the refusal names the direct message");
        }
        other => panic!("expected a RateLimited notice, got {other:?}"),
    }

    // A tenth of a second (and a half) earns one message again, not two.
    tokio::time::sleep(Duration::from_millis(150)).await;
    publisher.publish("room", "after a pause").await.unwrap();
    publisher.publish("room", "one too many").await.unwrap();
    assert_eq!(next_payload(&mut member).await, "after a pause");
    match next_event(&mut refusals).await {
        Event::Notice(Notice::Error { code, .. }) => assert_eq!(code, ErrorCode::RateLimited),
        other => panic!("expected a RateLimited notice, got {other:?}"),
    }
    broker.publish("room", "marker").await.unwrap();
    assert_eq!(
        next_payload(&mut member).await,
        "marker",
        "nothing refused arrived"
    );
    assert_eq!(broker.stats().connections, 2);
}
