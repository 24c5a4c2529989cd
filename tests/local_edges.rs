//! In-process connections at their edges: ending them in every way while other tasks
//! use the broker, slow consumers under each policy, many at once, limits at and past
//! their values, and receiving that is cancelled half-way.

mod common;

use common::*;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::{
    Broker, ClientError, ErrorCode, Event, LocalConnection, Notice, SlowConsumerPolicy,
};

// ---------------------------------------------------------------------------------
// Ending a local connection.

#[tokio::test]
async fn close_takes_the_connection_out_of_its_sessions_before_it_returns() {
    let broker = Broker::builder().build();
    let bot = broker.connect_local("bot").unwrap();
    let mut other = broker.connect_local("other").unwrap();
    bot.subscribe("room").unwrap();
    other.subscribe("room").unwrap();

    bot.close();
    let members = broker.session("room").map(|s| s.members.len());
    assert_eq!(
        members,
        Some(1),
        "the closed member is still in the session"
    );

    // A message published after the close is not offered to the closed member, so
    // nothing counts as dropped.
    broker.publish("room", "after the close").await.unwrap();
    assert_eq!(next_payload(&mut other).await, "after the close");
    assert_eq!(broker.stats().messages_dropped, 0);
}

#[tokio::test]
async fn a_dropped_connection_gives_its_place_and_its_sessions_back_at_once() {
    let broker = Broker::builder().max_connections(1).build();
    let bot = broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    drop(bot);

    assert!(broker.session("room").is_none());
    let again = broker.connect_local("bot");
    assert!(again.is_ok(), "the place is still held: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_local_connections_opened_and_dropped_leave_nothing_behind() {
    let t = TestBroker::start().await;
    let mut connections = Vec::new();
    for i in 0..5_000 {
        let local = t
            .broker
            .connect_local(&format!("user-{}", i % 700))
            .unwrap();
        local.subscribe(&format!("room-{}", i % 300)).unwrap();
        local.subscribe("everyone").unwrap();
        connections.push(local);
    }
    let stats = t.broker.stats();
    assert_eq!(
        (stats.connections, stats.users, stats.sessions),
        (5_000, 700, 301)
    );
    t.broker.publish("everyone", "hello").await.unwrap();
    wait_until("everyone got it", || {
        t.broker.stats().messages_delivered == 5_000
    })
    .await;

    // Half are dropped, half closed and read to their end.
    let mut closing = Vec::new();
    for (i, local) in connections.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(local);
        } else {
            local.close();
            closing.push(local);
        }
    }
    for local in &mut closing {
        assert_eq!(next_payload(local).await, "hello");
        assert!(matches!(next_event(local).await, Event::Closed { .. }));
    }
    t.wait_until_empty().await;
    drop(closing);
    assert_eq!(t.broker.stats().messages_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_local_connection_from_the_host_while_it_receives_and_is_joined() {
    let t = TestBroker::start().await;
    for round in 0..200 {
        let user = format!("bot-{round}");
        let mut bot = t.broker.connect_local(&user).unwrap();
        bot.subscribe("room").unwrap();
        let id = bot.connection_id();

        // The connection receives while another task joins it to sessions, publishes
        // to it and closes those sessions, and the host ends it meanwhile.
        let receiving = tokio::spawn(async move { closed(&mut bot).await });
        let broker = t.broker.clone();
        let hosting = tokio::spawn(async move {
            for n in 0..5 {
                let session = format!("extra-{n}");
                broker.join(id, &session).unwrap();
                broker.publish("room", "x").await.unwrap();
                broker.close_session(&session, "done");
            }
        });
        tokio::task::yield_now().await;
        match round % 3 {
            0 => t.broker.disconnect(id, "go"),
            1 => {
                t.broker.close_session("room", "over");
                t.broker.disconnect(&*user, "go")
            }
            _ => {
                t.broker.join(id, "late").unwrap();
                t.broker.disconnect(id, "go")
            }
        };
        let (code, reason) = within("the close", receiving).await.unwrap();
        assert_eq!((code, reason.as_str()), (ErrorCode::ClosedByHost, "go"));
        within("the host is done", hosting).await.unwrap();
    }
    t.wait_until_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_racing_the_hosts_joins_leaves_the_connection_in_no_session() {
    let t = TestBroker::start().await;
    for round in 0..200 {
        let bot = Arc::new(t.broker.connect_local(&format!("bot-{round}")).unwrap());
        let id = bot.connection_id();
        let broker = t.broker.clone();
        let joining = tokio::spawn(async move {
            for n in 0..20 {
                let session = format!("room-{}", n % 4);
                broker.join(id, &session).unwrap();
                if n % 3 == 0 {
                    broker.close_session(&session, "again");
                }
                tokio::task::yield_now().await;
            }
        });
        let subscribing = tokio::spawn({
            let bot = bot.clone();
            async move {
                for n in 0..20 {
                    if bot.subscribe(&format!("own-{n}")).is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            }
        });
        tokio::task::yield_now().await;
        bot.close();
        within("the joins", joining).await.unwrap();
        within("the subscribes", subscribing).await.unwrap();

        assert_eq!(t.broker.join(id, "after").unwrap(), 0);
        assert_eq!(
            t.broker.stats().sessions,
            0,
            "a closed connection is in a session"
        );
    }
    t.wait_until_empty().await;
}

#[test]
fn a_disconnect_hook_that_panics_is_counted_and_the_broker_goes_on() {
    let panics = run_counting_panics("local-hook-panic", Duration::from_secs(30), || async {
        let t = TestBroker::with(Broker::builder().on_disconnect(|info| {
            if &*info.user == "bot" {
                panic!("the host's hook fails");
            }
        }))
        .await;
        let bot = t.broker.connect_local("bot").unwrap();
        bot.subscribe("room").unwrap();
        drop(bot);
        wait_until("the hook panicked", || t.broker.stats().hook_panics == 1).await;
        t.wait_until_empty().await;

        let mut next = t.broker.connect_local("next").unwrap();
        next.subscribe("room").unwrap();
        let tcp = t.connect(Link::Tcp, "tcp").await;
        tcp.publish("room", "still working").await.unwrap();
        assert_eq!(next_payload(&mut next).await, "still working");
    });
    assert_eq!(panics, 1, "only the hook panicked");
}

#[test]
fn a_local_connection_dropped_inside_hooks_ends_without_a_deadlock() {
    type Held = Arc<Mutex<Option<LocalConnection>>>;
    run_with_deadline(Duration::from_secs(30), || async {
        let (in_message, in_disconnect, in_lag): (Held, Held, Held) = Default::default();
        let (message_hook, disconnect_hook, lag_hook) =
            (in_message.clone(), in_disconnect.clone(), in_lag.clone());
        let t = TestBroker::with(
            Broker::builder()
                .outbox_bytes(1024)
                .slow_consumer(SlowConsumerPolicy::DropNewest)
                .on_message(move |message, _| {
                    if &message.payload[..] == b"drop" {
                        message_hook.lock().unwrap().take();
                    }
                })
                .on_disconnect(move |info| {
                    if &*info.user == "trigger" {
                        disconnect_hook.lock().unwrap().take();
                    }
                })
                // The member that lags is dropped inside the worker's offer to it.
                .on_lag(move |info| {
                    if &*info.user == "laggard" {
                        lag_hook.lock().unwrap().take();
                    }
                }),
        )
        .await;
        for (user, held) in [
            ("in-message", &in_message),
            ("in-disconnect", &in_disconnect),
            ("laggard", &in_lag),
        ] {
            let local = t.broker.connect_local(user).unwrap();
            local.subscribe("room").unwrap();
            *held.lock().unwrap() = Some(local);
        }
        let members = |t: &TestBroker| t.broker.session("room").map_or(0, |s| s.members.len());
        let publisher = t.broker.connect_local("publisher").unwrap();

        publisher.publish("room", "drop").await.unwrap();
        wait_until("dropped in on_message", || {
            in_message.lock().unwrap().is_none() && members(&t) == 2
        })
        .await;

        drop(t.broker.connect_local("trigger").unwrap());
        wait_until("dropped in on_disconnect", || {
            in_disconnect.lock().unwrap().is_none() && members(&t) == 1
        })
        .await;

        // Nobody reads the laggard's outbox of 1 KiB.
        for _ in 0..4 {
            publisher.publish("room", vec![0u8; 512]).await.unwrap();
        }
        wait_until("dropped in on_lag", || {
            in_lag.lock().unwrap().is_none() && members(&t) == 0
        })
        .await;

        assert_eq!(t.broker.stats().connections, 1);
        drop(publisher);
        t.wait_until_empty().await;
    });
}

#[test]
fn a_local_connection_works_on_a_current_thread_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let t = TestBroker::start().await;
        let mut bot = t.broker.connect_local("bot").unwrap();
        bot.subscribe("room").unwrap();
        let mut tcp = t.connect(Link::Tcp, "tcp").await;
        within("subscribe", tcp.subscribe("room")).await.unwrap();
        let echo = tokio::spawn(async move {
            for _ in 0..100 {
                let message = next_message(&mut bot).await;
                bot.publish("room", message.payload).await.unwrap();
            }
            bot
        });
        for i in 0..100u32 {
            tcp.publish("room", i.to_be_bytes().to_vec()).await.unwrap();
            let echoed = next_message(&mut tcp).await;
            assert_eq!(&echoed.payload[..], i.to_be_bytes());
        }
        let bot = within("the echo", echo).await.unwrap();
        drop(bot);
        within("shutdown", t.broker.shutdown()).await;
        assert_eq!(t.broker.stats().connections, 0);
    });
}

#[test]
fn connect_local_outside_a_runtime_panics_without_leaving_a_connection_behind() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let broker = runtime.block_on(async { Broker::builder().max_connections(1).build() });

    let outside = broker.clone();
    let attempt = std::thread::spawn(move || outside.connect_local("bot").map(drop));
    assert!(attempt.join().is_err(), "documented to panic");

    let stats = broker.stats();
    assert_eq!((stats.connections, stats.users), (0, 0));
    let again = runtime.block_on(async { broker.connect_local("bot").map(drop) });
    assert!(again.is_ok(), "the place was given back: {again:?}");
}

// ---------------------------------------------------------------------------------
// Replacing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_connection_replaces_older_ones_of_its_user() {
    let t = TestBroker::with(Broker::builder().replace_older_connections(true)).await;
    let mut tcp = t.connect(Link::Tcp, "bot").await;
    within("subscribe", tcp.subscribe("room")).await.unwrap();
    let mut first = t.broker.connect_local("bot").unwrap();
    assert_eq!(closed(&mut tcp).await.0, ErrorCode::Replaced);

    let second = t.broker.connect_local("bot").unwrap();
    assert_eq!(closed(&mut first).await.0, ErrorCode::Replaced);
    wait_until("one connection of bot", || {
        let stats = t.broker.stats();
        (stats.connections, stats.users, stats.sessions) == (1, 1, 0)
    })
    .await;
    assert!(matches!(
        first.publish("room", "x").await,
        Err(ClientError::Closed {
            code: ErrorCode::Replaced,
            ..
        })
    ));
    drop(second);
    t.wait_until_empty().await;
}

// ---------------------------------------------------------------------------------
// Limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_and_ids_at_their_limits_reach_local_and_network_members() {
    const MAX_FRAME: usize = 64 * 1024;
    const MAX_ID: usize = 40;
    let t = TestBroker::with(
        Broker::builder()
            .max_frame(MAX_FRAME)
            .max_id_len(MAX_ID)
            .outbox_bytes(16 * 1024),
    )
    .await;
    let long_user = "u".repeat(MAX_ID);
    let long_session = "s".repeat(MAX_ID);
    let sender = t.broker.connect_local(&long_user).unwrap();
    let mut local = t.broker.connect_local("local").unwrap();
    local.subscribe(&long_session).unwrap();
    let mut tcp = t.connect(Link::Tcp, "tcp").await;
    within("subscribe", tcp.subscribe(&long_session))
        .await
        .unwrap();

    let payload = vec![7u8; MAX_FRAME];
    sender
        .publish(&long_session, payload.clone())
        .await
        .unwrap();
    for message in [next_message(&mut local).await, next_message(&mut tcp).await] {
        assert_eq!(&*message.sender, long_user);
        assert_eq!(message.target.id(), long_session);
        assert_eq!(message.payload.len(), MAX_FRAME);
    }
    sender.send_direct("tcp", payload).await.unwrap();
    assert_eq!(next_message(&mut tcp).await.payload.len(), MAX_FRAME);

    // One past each limit is refused before anything is queued.
    assert!(matches!(
        sender
            .publish(&long_session, vec![0u8; MAX_FRAME + 1])
            .await,
        Err(ClientError::Rejected {
            code: ErrorCode::FrameTooLarge,
            ..
        })
    ));
    assert!(matches!(
        sender.send_direct("tcp", vec![0u8; MAX_FRAME + 1]).await,
        Err(ClientError::Rejected {
            code: ErrorCode::FrameTooLarge,
            ..
        })
    ));
    let too_long = "s".repeat(MAX_ID + 1);
    assert!(matches!(
        sender.publish(&too_long, "x").await,
        Err(ClientError::InvalidId(_))
    ));
    assert!(matches!(
        sender.send_direct(&too_long, "x").await,
        Err(ClientError::InvalidId(_))
    ));
    assert!(matches!(
        local.subscribe(&too_long),
        Err(ClientError::InvalidId(_))
    ));
    assert!(matches!(
        t.broker.connect_local(&too_long),
        Err(ClientError::Refused {
            code: ErrorCode::InvalidId,
            ..
        })
    ));
    expect_quiet(&mut local).await;
    expect_quiet(&mut tcp).await;
    assert_eq!(t.broker.stats().messages_received, 2);
    assert_eq!(t.broker.stats().messages_dropped, 0);
}

// ---------------------------------------------------------------------------------
// Slow consumers.

/// A member that never calls `recv` while a fast publisher floods its session, beside
/// members that read along: what the stalled one finally reads, plus what it is told it
/// missed, is every message, in order; the counters add up; nobody else loses anything.
async fn a_local_member_that_never_reads(policy: SlowConsumerPolicy) {
    const MESSAGES: u32 = 2_000;
    // A run of messages is about 5 KB of frames, well within an outbox.
    const RUN: u32 = 40;
    let lags = Arc::new(Mutex::new(Vec::new()));
    let on_lag = lags.clone();
    let t = TestBroker::with(
        Broker::builder()
            .outbox_bytes(16 * 1024)
            .slow_consumer(policy)
            .on_lag(move |info| {
                let lag = (info.user.to_string(), info.dropped, info.disconnected);
                on_lag.lock().unwrap().push(lag);
            }),
    )
    .await;
    let mut stalled = t.broker.connect_local("stalled").unwrap();
    stalled.subscribe("room").unwrap();
    let mut reader = t.broker.connect_local("reader").unwrap();
    reader.subscribe("room").unwrap();
    let mut tcp = t.connect(Link::Tcp, "tcp").await;
    within("subscribe", tcp.subscribe("room")).await.unwrap();

    // The publisher sends as fast as the broker takes its messages, a run at a time;
    // the members reading along keep up with each run, the stalled one never reads.
    let publisher = t.broker.connect_local("publisher").unwrap();
    for run in 0..MESSAGES / RUN {
        for seq in run * RUN..(run + 1) * RUN {
            let mut payload = seq.to_be_bytes().to_vec();
            payload.resize(100, 0);
            publisher.publish("room", payload).await.unwrap();
        }
        for seq in run * RUN..(run + 1) * RUN {
            assert_eq!(
                next_message(&mut reader).await.payload[..4],
                seq.to_be_bytes()
            );
            assert_eq!(next_message(&mut tcp).await.payload[..4], seq.to_be_bytes());
        }
    }
    wait_until("every message is forwarded", || {
        t.broker.stats().messages_received == u64::from(MESSAGES)
    })
    .await;
    let readers = 2 * u64::from(MESSAGES);
    assert!(lags.lock().unwrap().iter().all(|lag| lag.0 == "stalled"));

    if policy == SlowConsumerPolicy::Disconnect {
        let (code, _) = closed(&mut stalled).await;
        assert_eq!(code, ErrorCode::SlowConsumer);
        assert_eq!(within("the end", stalled.recv()).await, None);
        let stats = t.broker.stats();
        assert_eq!(stats.slow_consumers, 1);
        // What was queued for it before the overflow was freed with it, and counted.
        let queued = stats.messages_delivered - readers;
        let lags = lags.lock().unwrap().clone();
        assert_eq!(lags, [("stalled".to_string(), queued + 1, true)]);
        assert!(stats.messages_dropped > queued);
        assert!(stats.messages_dropped <= u64::from(MESSAGES));
        return;
    }

    // A last message brings a count still pending out as a notice.
    let last = u32::MAX.to_be_bytes().to_vec();
    publisher.publish("room", last).await.unwrap();
    let mut got = Vec::new();
    let mut missed = 0;
    loop {
        match next_event(&mut stalled).await {
            Event::Message(m) => {
                let seq = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                if seq == u32::MAX {
                    break;
                }
                got.push(seq);
            }
            Event::Notice(Notice::Missed { count }) => missed += count,
            other => panic!("unexpected {other:?}"),
        }
    }
    expect_quiet(&mut stalled).await;
    assert!(missed > 0, "200 KB went to an outbox of 16 KiB");
    assert_eq!(got.len() as u64 + missed, u64::from(MESSAGES));
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, none twice");

    let stats = t.broker.stats();
    assert_eq!(stats.slow_consumers, 0);
    assert_eq!(stats.messages_dropped, missed);
    let lagged: u64 = lags.lock().unwrap().iter().map(|lag| lag.1).sum();
    assert_eq!(lagged, missed);
    // The last message reached all three members.
    if policy == SlowConsumerPolicy::DropOldest {
        assert_eq!(got.last(), Some(&(MESSAGES - 1)), "the newest are kept");
        // Every message was queued; some were discarded later to make room.
        assert_eq!(stats.messages_delivered, readers + u64::from(MESSAGES) + 3);
    } else {
        assert_eq!(got.first(), Some(&0), "the oldest are kept");
        assert_eq!(stats.messages_delivered, readers + got.len() as u64 + 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_member_that_never_reads_is_disconnected() {
    a_local_member_that_never_reads(SlowConsumerPolicy::Disconnect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_member_that_never_reads_misses_the_newest() {
    a_local_member_that_never_reads(SlowConsumerPolicy::DropNewest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_member_that_never_reads_misses_the_oldest() {
    a_local_member_that_never_reads(SlowConsumerPolicy::DropOldest).await;
}

// ---------------------------------------------------------------------------------
// Receiving.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_cancelled_at_any_point_loses_and_repeats_nothing() {
    const MESSAGES: u32 = 20_000;
    let t = TestBroker::start().await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    let publisher = t.broker.connect_local("publisher").unwrap();
    let publishing = tokio::spawn(async move {
        for seq in 0..MESSAGES {
            publisher
                .publish("room", seq.to_be_bytes().to_vec())
                .await
                .unwrap();
            if seq % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        publisher
    });

    // Polled once and dropped, timed out, or raced against a timer: each recv that
    // does not return is cancelled wherever it was.
    let mut next = 0;
    let mut cancelled = 0;
    while next < MESSAGES {
        let event = match next % 3 {
            0 => bot.recv().now_or_never().flatten(),
            1 => tokio::time::timeout(Duration::from_micros(50), bot.recv())
                .await
                .ok()
                .flatten(),
            _ => tokio::select! {
                event = bot.recv() => event,
                _ = tokio::task::yield_now() => None,
            },
        };
        match event {
            Some(Event::Message(m)) => {
                let seq = u32::from_be_bytes(m.payload[..].try_into().unwrap());
                assert_eq!(seq, next, "lost or repeated across a cancelled recv");
                next += 1;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => cancelled += 1,
        }
    }
    assert!(cancelled > 0, "some receives were cancelled");
    within("the publisher", publishing).await.unwrap();
    expect_quiet(&mut bot).await;
    assert_eq!(t.broker.stats().messages_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_sender_holds_with_local_and_network_publishers_and_receivers() {
    const PER_SENDER: u32 = 2_000;
    let t = TestBroker::start().await;
    let mut receivers: Vec<Box<dyn futures::Stream<Item = Event> + Unpin + Send>> = Vec::new();
    for i in 0..3 {
        let local = t
            .broker
            .connect_local(&format!("local-reader-{i}"))
            .unwrap();
        local.subscribe("feed").unwrap();
        receivers.push(Box::new(local));
    }
    let tcp = t.connect(Link::Tcp, "tcp-reader").await;
    within("subscribe", tcp.subscribe("feed")).await.unwrap();
    receivers.push(Box::new(tcp));

    let mut senders = Vec::new();
    for i in 0..2 {
        let local = t.broker.connect_local(&format!("local-{i}")).unwrap();
        senders.push(tokio::spawn(async move {
            for seq in 0..PER_SENDER {
                local
                    .publish("feed", seq.to_be_bytes().to_vec())
                    .await
                    .unwrap();
            }
        }));
        let tcp = t.connect(Link::Tcp, &format!("tcp-{i}")).await;
        senders.push(tokio::spawn(async move {
            for seq in 0..PER_SENDER {
                tcp.publish("feed", seq.to_be_bytes().to_vec())
                    .await
                    .unwrap();
            }
            // Kept open until its last message is read below.
            tokio::time::sleep(WAIT).await;
        }));
    }

    let reading: Vec<_> = receivers
        .into_iter()
        .map(|mut receiver| {
            tokio::spawn(async move {
                let mut next: HashMap<String, u32> = HashMap::new();
                for _ in 0..4 * PER_SENDER {
                    let message = next_message(&mut receiver).await;
                    let seq = u32::from_be_bytes(message.payload[..].try_into().unwrap());
                    let due = next.entry(message.sender.to_string()).or_default();
                    assert_eq!(seq, *due, "from {}", message.sender);
                    *due += 1;
                }
                expect_quiet(&mut receiver).await;
                next
            })
        })
        .collect();
    for receiving in reading {
        let next = within("a receiver", receiving).await.unwrap();
        assert_eq!(next.len(), 4);
        assert!(next.values().all(|&n| n == PER_SENDER));
    }
    for sending in senders {
        sending.abort();
    }
    assert_eq!(t.broker.stats().messages_dropped, 0);
}

// ---------------------------------------------------------------------------------
// Shutdown.

/// Publishers in tight loops, `locals` of them through local connections and `hosts`
/// through `Broker::publish`, while shutdown begins and connections are still being
/// opened: every message a call accepted reaches the member before its close.
async fn shutdown_racing_publishers(locals: usize, hosts: usize) {
    for _round in 0..20 {
        let t = TestBroker::with(Broker::builder().ingress_capacity(8)).await;
        // The member receives all along, until its close.
        let mut reader = t.broker.connect_local("reader").unwrap();
        reader.subscribe("room").unwrap();
        let reading = tokio::spawn(async move {
            let mut received = 0;
            loop {
                match next_event(&mut reader).await {
                    Event::Message(_) => received += 1,
                    Event::Closed { code, .. } => return (received, code),
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut publishers = Vec::new();
        for i in 0..locals {
            let local = t.broker.connect_local(&format!("publisher-{i}")).unwrap();
            let accepted = accepted.clone();
            publishers.push(tokio::spawn(async move {
                loop {
                    match local.publish("room", "x").await {
                        Ok(()) => accepted.fetch_add(1, Ordering::SeqCst),
                        Err(ClientError::Closed { code, .. }) => {
                            assert_eq!(code, ErrorCode::ShuttingDown);
                            return;
                        }
                        Err(e) => panic!("unexpected {e}"),
                    };
                }
            }));
        }
        for _ in 0..hosts {
            let (broker, accepted) = (t.broker.clone(), accepted.clone());
            publishers.push(tokio::spawn(async move {
                loop {
                    match broker.publish("room", "x").await {
                        Ok(()) => accepted.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            assert_eq!(e, switchboard::BrokerError::ShuttingDown);
                            return;
                        }
                    };
                }
            }));
        }
        // Connections are opened while shutdown runs, too.
        let broker = t.broker.clone();
        let opening = tokio::spawn(async move {
            let mut opened = Vec::new();
            for i in 0.. {
                match broker.connect_local(&format!("late-{i}")) {
                    Ok(local) => opened.push(local),
                    Err(ClientError::Refused { code, .. }) => {
                        assert_eq!(code, ErrorCode::ShuttingDown);
                        return opened;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
                tokio::task::yield_now().await;
            }
            unreachable!()
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        within("shutdown", t.broker.shutdown()).await;
        for publishing in publishers {
            within("a publisher stops", publishing).await.unwrap();
        }
        let (received, code) = within("the member's close", reading).await.unwrap();
        assert_eq!(code, ErrorCode::ShuttingDown);
        assert_eq!(
            received,
            accepted.load(Ordering::SeqCst),
            "accepted but not delivered"
        );
        // Even one opened as shutdown ran is closed by it.
        for mut local in within("opening stops", opening).await.unwrap() {
            assert_eq!(closed(&mut local).await.0, ErrorCode::ShuttingDown);
        }
        wait_until("nobody left", || t.broker.stats().connections == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_racing_local_publishers_delivers_every_message_they_were_told_was_taken() {
    shutdown_racing_publishers(3, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_racing_the_hosts_publish_delivers_every_message_it_was_told_was_taken() {
    shutdown_racing_publishers(0, 3).await;
}

#[test]
fn a_local_connection_dropped_after_its_runtime_is_gone_still_leaves_the_broker() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (broker, local) = runtime.block_on(async {
        let broker = Broker::builder().build();
        let local = broker.connect_local("bot").unwrap();
        local.subscribe("room").unwrap();
        (broker, local)
    });
    drop(runtime);

    drop(local);
    let stats = broker.stats();
    assert_eq!((stats.connections, stats.users, stats.sessions), (0, 0, 0));
}

#[test]
fn shutdown_waits_for_a_publish_waiting_for_room_but_not_for_one_given_up() {
    run_with_deadline(Duration::from_secs(30), || async {
        // The only worker waits in the hook on "hold" until released, so the queue of
        // one job stays full behind it.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let broker = Broker::builder()
            .workers(1)
            .ingress_capacity(1)
            .on_message(move |message, _| {
                if &message.payload[..] == b"hold" {
                    tokio::task::block_in_place(|| {
                        let _ = gate.lock().unwrap().recv();
                    });
                }
            })
            .build();
        let mut reader = broker.connect_local("reader").unwrap();
        reader.subscribe("room").unwrap();
        let bot = Arc::new(broker.connect_local("bot").unwrap());
        bot.publish("room", "hold").await.unwrap();
        bot.publish("room", "fill").await.unwrap();

        let given_up = tokio::time::timeout(QUIET, bot.publish("room", "given up")).await;
        assert!(given_up.is_err(), "the queue is full");
        let waiting = tokio::spawn({
            let bot = bot.clone();
            async move { bot.publish("room", "taken").await }
        });
        tokio::time::sleep(QUIET).await;
        assert!(!waiting.is_finished(), "the queue is still full");

        let shutting_down = tokio::spawn({
            let broker = broker.clone();
            async move { broker.shutdown().await }
        });
        wait_until("shutdown began", || broker.connect_local("late").is_err()).await;
        release.send(()).unwrap();
        within("shutdown", shutting_down).await.unwrap();
        within("the waiting publish", waiting)
            .await
            .unwrap()
            .unwrap();

        for text in ["hold", "fill", "taken"] {
            assert_eq!(next_payload(&mut reader).await, text);
        }
        assert_eq!(closed(&mut reader).await.0, ErrorCode::ShuttingDown);
    });
}
