//! In-process connections (`Broker::connect_local`): members of the same sessions as
//! network clients, through the same workers and outboxes, held to the same limits,
//! and taken out of the broker whichever way they end.

mod common;

use common::*;
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::{
    Broker, ClientError, DisconnectInfo, ErrorCode, Event, MessageKind, Notice, SlowConsumerPolicy,
    Target,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_member_and_network_clients_reach_each_other_but_never_the_sender() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = seen.clone();
    let t = TestBroker::with(Broker::builder().on_message(move |message, reached| {
        hook.lock()
            .unwrap()
            .push((message.sender.to_string(), reached));
    }))
    .await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    let mut alice = t.connect(Link::Tcp, "alice").await;
    let mut bob = t.connect(Link::Memory, "bob").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();
    assert_eq!(t.broker.session("room").map(|s| s.members.len()), Some(3));

    alice.publish("room", "from alice").await.unwrap();
    let message = next_message(&mut bot).await;
    assert_eq!(&*message.sender, "alice");
    assert_eq!(message.kind, MessageKind::Session);
    assert_eq!(message.target, Target::Session("room".into()));
    assert_eq!(&message.payload[..], b"from alice");
    assert_eq!(next_payload(&mut bob).await, "from alice");

    bot.publish("room", "from bot").await.unwrap();
    for client in [&mut alice, &mut bob] {
        let message = next_message(client).await;
        assert_eq!(&*message.sender, "bot");
        assert_eq!(&message.payload[..], b"from bot");
    }
    expect_quiet(&mut bot).await;
    expect_quiet(&mut alice).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [("alice".to_string(), 2), ("bot".to_string(), 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_sender_is_kept_at_local_and_network_members_and_nothing_is_doubled() {
    const MESSAGES: u32 = 5_000;
    let t = TestBroker::start().await;
    let publisher = t.broker.connect_local("publisher").unwrap();
    let mut local = t.broker.connect_local("local").unwrap();
    local.subscribe("feed").unwrap();
    let mut tcp = t.connect(Link::Tcp, "tcp").await;
    within("subscribe", tcp.subscribe("feed")).await.unwrap();

    let sending = tokio::spawn(async move {
        for seq in 0..MESSAGES {
            publisher
                .publish("feed", seq.to_be_bytes().to_vec())
                .await
                .unwrap();
        }
        publisher
    });
    for seq in 0..MESSAGES {
        let at_local = next_message(&mut local).await;
        let at_tcp = next_message(&mut tcp).await;
        for (name, message) in [("local", at_local), ("tcp", at_tcp)] {
            let got = u32::from_be_bytes(message.payload[..].try_into().unwrap());
            assert_eq!(got, seq, "{name} got message {got} where {seq} was due");
        }
    }
    let _publisher = sending.await.unwrap();
    expect_quiet(&mut local).await;
    assert_eq!(t.broker.stats().messages_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_reach_a_local_user_and_one_to_nobody_comes_back_not_delivered() {
    let t = TestBroker::start().await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    let mut alice = t.connect(Link::Tcp, "alice").await;

    alice.send_direct("bot", "psst").await.unwrap();
    let message = next_message(&mut bot).await;
    assert_eq!(message.kind, MessageKind::Direct);
    assert_eq!(message.target, Target::User("bot".into()));
    assert_eq!(&*message.sender, "alice");

    bot.send_direct("alice", "hello").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "hello");

    let request = bot.send_direct("nobody", "anyone?").await.unwrap();
    let not_delivered = Notice::NotDelivered {
        request,
        user: "nobody".into(),
    };
    assert_eq!(next_event(&mut bot).await, Event::Notice(not_delivered));

    // The host's own push reaches it too, with the host's empty sender.
    t.broker.send_to("bot", "from the host").await.unwrap();
    assert!(next_message(&mut bot).await.is_from_host());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_join_leave_close_session_and_disconnect_reach_a_local_connection() {
    let disconnects = Arc::new(Mutex::new(Vec::<DisconnectInfo>::new()));
    let hook = disconnects.clone();
    let t = TestBroker::with(Broker::builder().on_disconnect(move |info| {
        hook.lock().unwrap().push(info.clone());
    }))
    .await;
    let mut bot = t.broker.connect_local("bot").unwrap();

    assert_eq!(t.broker.join("bot", "news").unwrap(), 1);
    let joined = Notice::Joined {
        session: "news".into(),
    };
    assert_eq!(next_event(&mut bot).await, Event::Notice(joined));
    t.broker.publish("news", "headline").await.unwrap();
    assert_eq!(next_payload(&mut bot).await, "headline");

    assert_eq!(t.broker.leave(bot.connection_id(), "news"), 1);
    let left = Notice::Left {
        session: "news".into(),
    };
    assert_eq!(next_event(&mut bot).await, Event::Notice(left));

    bot.subscribe("standup").unwrap();
    assert_eq!(t.broker.close_session("standup", "over"), 1);
    let closed = Notice::SessionClosed {
        session: "standup".into(),
        reason: "over".into(),
    };
    assert_eq!(next_event(&mut bot).await, Event::Notice(closed));

    assert_eq!(t.broker.disconnect("bot", "go away"), 1);
    let Event::Closed { code, reason } = next_event(&mut bot).await else {
        panic!("expected the close");
    };
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::ClosedByHost, "go away")
    );
    assert_eq!(within("the end", bot.recv()).await, None);
    assert!(matches!(
        bot.subscribe("news"),
        Err(ClientError::Closed {
            code: ErrorCode::ClosedByHost,
            ..
        })
    ));
    t.wait_until_empty().await;
    wait_until("on_disconnect ran", || {
        !disconnects.lock().unwrap().is_empty()
    })
    .await;
    let info = disconnects.lock().unwrap()[0].clone();
    assert_eq!((&*info.user, info.code), ("bot", ErrorCode::ClosedByHost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_counts_local_connections_and_gives_their_place_back() {
    let t = TestBroker::with(Broker::builder().max_connections(2)).await;
    let first = t.broker.connect_local("first").unwrap();
    let _tcp = t.connect(Link::Tcp, "tcp").await;
    match t.broker.connect_local("second") {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::TooManyConnections),
        other => panic!("expected a refusal past the limit, got {other:?}"),
    }
    // A network client is refused too: the local one holds a place.
    let refused = t.try_connect(Link::Memory, switchboard::Client::builder("third"));
    assert!(matches!(
        refused.await,
        Err(ClientError::Refused {
            code: ErrorCode::TooManyConnections,
            ..
        })
    ));

    drop(first);
    wait_until("the place is given back", || {
        t.broker.stats().connections == 1
    })
    .await;
    let second = t.broker.connect_local("second").unwrap();
    assert_eq!(second.user(), "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_and_past_the_limits_of_a_local_connection() {
    let t = TestBroker::with(
        Broker::builder()
            .max_sessions_per_connection(2)
            .max_id_len(8)
            .max_frame(1024),
    )
    .await;
    let bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("one").unwrap();
    bot.subscribe("two").unwrap();
    bot.subscribe("two").unwrap(); // a member already: no error, no new place
    match bot.subscribe("three") {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::TooManySessions),
        other => panic!("expected the session limit, got {other:?}"),
    }
    bot.unsubscribe("one").unwrap();
    bot.subscribe("three").unwrap();

    assert!(matches!(bot.subscribe(""), Err(ClientError::InvalidId(_))));
    assert!(matches!(
        bot.subscribe("123456789"),
        Err(ClientError::InvalidId(_))
    ));
    bot.publish("12345678", vec![0u8; 1024]).await.unwrap();
    assert!(matches!(
        bot.publish("12345678", vec![0u8; 1025]).await,
        Err(ClientError::Rejected {
            code: ErrorCode::FrameTooLarge,
            ..
        })
    ));
    assert!(matches!(
        bot.send_direct("", "x").await,
        Err(ClientError::InvalidId(_))
    ));
    for user in ["", "123456789"] {
        assert!(matches!(
            t.broker.connect_local(user),
            Err(ClientError::Refused {
                code: ErrorCode::InvalidId,
                ..
            })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_connection_that_stops_reading_is_closed_as_a_slow_consumer_alone() {
    let disconnects = Arc::new(Mutex::new(Vec::<DisconnectInfo>::new()));
    let hook = disconnects.clone();
    let t = TestBroker::with(
        Broker::builder()
            .outbox_bytes(16 * 1024)
            .on_disconnect(move |info| hook.lock().unwrap().push(info.clone())),
    )
    .await;
    let mut stalled = t.broker.connect_local("stalled").unwrap();
    stalled.subscribe("room").unwrap();
    let mut reader = t.broker.connect_local("reader").unwrap();
    reader.subscribe("room").unwrap();
    let publisher = t.connect(Link::Tcp, "publisher").await;

    // The reader takes each message before the next is sent; the stalled one never
    // calls recv while 64 KiB arrive.
    for _ in 0..64 {
        publisher.publish("room", vec![1u8; 1024]).await.unwrap();
        next_message(&mut reader).await;
    }

    wait_until("the stalled member is gone", || {
        t.broker.session("room").map(|s| s.members.len()) == Some(1)
    })
    .await;
    assert_eq!(t.broker.stats().slow_consumers, 1);
    // What was queued was freed with the overflow; the close is what is left.
    let (code, _) = closed(&mut stalled).await;
    assert_eq!(code, ErrorCode::SlowConsumer);
    assert_eq!(within("the end", stalled.recv()).await, None);
    let info = disconnects.lock().unwrap()[0].clone();
    assert_eq!(
        (&*info.user, info.code),
        ("stalled", ErrorCode::SlowConsumer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_drop_newest_a_local_member_learns_how_many_it_missed() {
    let t = TestBroker::with(
        Broker::builder()
            .outbox_bytes(8 * 1024)
            .slow_consumer(SlowConsumerPolicy::DropNewest),
    )
    .await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    for _ in 0..32 {
        t.broker.publish("room", vec![2u8; 1024]).await.unwrap();
    }
    // Every message is forwarded, and the drops counted, before the member reads.
    wait_until("all 32 are forwarded", || {
        t.broker.stats().messages_received == 32
    })
    .await;
    let dropped = t.broker.stats().messages_dropped;
    assert!(dropped > 0, "32 KiB went to an outbox of 8 KiB");

    let mut received = 0;
    while received < 32 - dropped {
        next_message(&mut bot).await;
        received += 1;
    }
    t.broker.publish("room", "after").await.unwrap();
    assert_eq!(
        next_event(&mut bot).await,
        Event::Notice(Notice::Missed { count: dropped })
    );
    assert_eq!(next_payload(&mut bot).await, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_hands_out_what_was_queued_then_the_close_and_dropping_frees_everything() {
    let t = TestBroker::start().await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    for text in ["one", "two", "three"] {
        t.broker.publish("room", text).await.unwrap();
    }
    wait_until("all three are forwarded", || {
        t.broker.stats().messages_delivered == 3
    })
    .await;
    bot.close();
    assert!(matches!(
        bot.publish("room", "late").await,
        Err(ClientError::Closed { .. })
    ));
    for text in ["one", "two", "three"] {
        assert_eq!(next_payload(&mut bot).await, text);
    }
    assert!(!futures::stream::FusedStream::is_terminated(&bot));
    let (code, reason) = closed(&mut bot).await;
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::Normal, "closed by the host")
    );
    assert!(futures::stream::FusedStream::is_terminated(&bot));
    assert_eq!(within("the end", bot.next()).await, None);
    t.wait_until_empty().await;

    // A connection simply dropped is taken out the same way.
    let other = t.broker.connect_local("other").unwrap();
    other.subscribe("room").unwrap();
    assert_eq!(t.broker.stats().sessions, 1);
    drop(other);
    t.wait_until_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_what_was_queued_then_closes_and_refuses_new_local_connections() {
    let t = TestBroker::start().await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("news").unwrap();
    t.broker.publish("news", "last edition").await.unwrap();

    within("shutdown", t.broker.shutdown()).await;
    assert_eq!(next_payload(&mut bot).await, "last edition");
    let (code, _) = closed(&mut bot).await;
    assert_eq!(code, ErrorCode::ShuttingDown);
    match t.broker.connect_local("late") {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("expected a refusal after shutdown, got {other:?}"),
    }
    assert_eq!(t.broker.stats().connections, 0);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_never_closes_a_local_connection() {
    let broker = Broker::builder()
        .idle_timeout(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(500))
        .build();
    let mut bot = broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;

    assert_eq!(broker.stats().connections, 1);
    broker.publish("room", "still here").await.unwrap();
    // The heartbeat's pings and releases of room in between are not events.
    assert_eq!(next_payload(&mut bot).await, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_replaces_a_local_one_when_the_broker_says_so() {
    let t = TestBroker::with(Broker::builder().replace_older_connections(true)).await;
    let mut old = t.broker.connect_local("bot").unwrap();
    let _new = t.connect(Link::Tcp, "bot").await;
    let (code, _) = closed(&mut old).await;
    assert_eq!(code, ErrorCode::Replaced);
    wait_until("one connection of bot", || {
        t.broker.stats().connections == 1
    })
    .await;
}

/// Reads events until the close; fails on anything but a close within [`WAIT`].
async fn closed(local: &mut switchboard::LocalConnection) -> (ErrorCode, String) {
    loop {
        match within("the close", local.next()).await {
            Some(Event::Closed { code, reason }) => return (code, reason),
            Some(Event::Message(_)) | Some(Event::Notice(_)) => continue,
            None => panic!("the stream ended without a close"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_sends_from_another_task_and_fails_once_its_connection_is_dropped() {
    let t = TestBroker::start().await;
    let mut bot = t.broker.connect_local("bot").unwrap();
    bot.subscribe("room").unwrap();
    let mut alice = t.connect(Link::Tcp, "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    // One task receives while another sends as the same connection.
    let handle = bot.handle();
    assert_eq!(handle.connection_id(), bot.connection_id());
    let sender = tokio::spawn(async move {
        for n in 0..100u32 {
            handle
                .publish("room", n.to_be_bytes().to_vec())
                .await
                .unwrap();
        }
        handle
    });
    for n in 0..100u32 {
        let message = next_message(&mut alice).await;
        assert_eq!(&*message.sender, "bot");
        assert_eq!(message.payload[..], n.to_be_bytes());
    }
    let handle = within("the sender", sender).await.unwrap();
    alice.publish("room", "to the bot").await.unwrap();
    assert_eq!(next_payload(&mut bot).await, "to the bot");
    // The connection's own publications reached it through neither side.
    expect_quiet(&mut bot).await;

    // The handle does not keep the connection open.
    drop(bot);
    assert_eq!(t.broker.session("room").map(|s| s.members.len()), Some(1));
    assert!(matches!(
        handle.publish("room", "too late").await,
        Err(ClientError::Closed { .. })
    ));
    assert!(matches!(
        handle.subscribe("room"),
        Err(ClientError::Closed { .. })
    ));
}
