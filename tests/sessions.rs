//! Sessions: joining and leaving, publishing to every member but the sender, order per
//! sender, server push and host-managed membership, the sender stamp, counters and the
//! limits on sessions and ids. Each scenario runs over the in-process transport and
//! over loopback TCP.

#[macro_use]
mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};
use switchboard::frame::Frame;
use switchboard::{
    Admission, Broker, BrokerError, Client, ClientError, ErrorCode, Event, MessageKind, Notice,
    Target, Who,
};

over_both_links!(
    subscribe_creates_the_session_at_its_first_member,
    unsubscribe_leaves_the_session,
    publish_reaches_every_member_except_the_sender,
    the_sender_need_not_be_a_member,
    a_publication_stays_in_its_session,
    a_delivery_carries_what_the_broker_stamped,
    order_per_sender_is_kept_at_every_member_and_nothing_is_doubled,
    host_publish_reaches_every_member_with_an_empty_sender,
    host_join_and_leave_send_joined_and_left_notices,
    host_join_of_one_connection_leaves_the_users_other_connections_out,
    close_session_notifies_every_member_and_frees_the_session,
    stats_count_messages_deliveries_and_bytes,
    max_sessions_per_connection_at_and_past_the_limit,
    max_id_len_at_and_past_the_limit,
);

async fn subscribe_creates_the_session_at_its_first_member(link: Link) {
    let t = TestBroker::start().await;
    let alice = t.connect(link, "alice").await;
    let bob = t.connect(link.other(), "bob").await;
    assert_eq!(
        t.broker.session("room"),
        None,
        "no session before its first member"
    );
    assert_eq!(t.broker.stats().sessions, 0);

    let before = SystemTime::now();
    within("subscribe", alice.subscribe("room")).await.unwrap();
    let session = t
        .broker
        .session("room")
        .expect("created at the first member");
    assert_eq!(&*session.id, "room");
    assert_eq!(session.members.len(), 1);
    assert_eq!(session.members[0].connection, alice.connection_id());
    assert_eq!(&*session.members[0].user, "alice");
    let skew = Duration::from_secs(60);
    assert!(session.created + skew >= before && session.created <= SystemTime::now() + skew);
    assert_eq!(t.broker.stats().sessions, 1);

    // A second member joins the same session; subscribing twice changes nothing.
    within("subscribe", bob.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();
    let session = t.broker.session("room").unwrap();
    let mut members: Vec<_> = session.members.iter().map(|m| m.connection).collect();
    members.sort();
    let mut expected = vec![alice.connection_id(), bob.connection_id()];
    expected.sort();
    assert_eq!(members, expected);
    assert_eq!(t.broker.stats().sessions, 1);
}

async fn unsubscribe_leaves_the_session(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link, "bob").await;
    let carol = t.connect(link, "carol").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();

    within("unsubscribe", bob.unsubscribe("room"))
        .await
        .unwrap();
    let session = t.broker.session("room").unwrap();
    assert_eq!(session.members.len(), 1);
    assert_eq!(session.members[0].connection, alice.connection_id());

    // Bob no longer receives what is published there; alice still does.
    carol.publish("room", "after bob left").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "after bob left");
    t.broker.publish("room", "marker").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "marker");
    expect_quiet(&mut bob).await;

    // Leaving a session one is not in is harmless; the last member leaving frees it.
    within("unsubscribe", bob.unsubscribe("room"))
        .await
        .unwrap();
    within("unsubscribe", alice.unsubscribe("room"))
        .await
        .unwrap();
    assert_eq!(t.broker.session("room"), None, "an empty session is freed");
    assert_eq!(t.broker.stats().sessions, 0);
}

async fn publish_reaches_every_member_except_the_sender(link: Link) {
    let t = TestBroker::start().await;
    let mut members = Vec::new();
    for (i, user) in ["alice", "bob", "carol", "dave"].iter().enumerate() {
        // Members on both transports share one session.
        let link = if i % 2 == 0 { link } else { link.other() };
        let client = t.connect(link, user).await;
        within("subscribe", client.subscribe("room")).await.unwrap();
        members.push(client);
    }

    members[0].publish("room", "hello").await.unwrap();
    for member in &mut members[1..] {
        let message = next_message(member).await;
        assert_eq!(&message.payload[..], b"hello");
        assert_eq!(&*message.sender, "alice");
    }

    // A host marker published afterwards is the sender's next event: had its own
    // publication come back, it would be queued in front of the marker.
    t.broker.publish("room", "marker").await.unwrap();
    for member in &mut members {
        assert_eq!(next_payload(member).await, "marker");
    }
    for member in &mut members {
        expect_quiet(member).await;
    }
}

async fn the_sender_need_not_be_a_member(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;
    let mut outsider = t.connect(link, "outsider").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();

    outsider.publish("room", "from outside").await.unwrap();
    for member in [&mut alice, &mut bob] {
        let message = next_message(member).await;
        assert_eq!(&message.payload[..], b"from outside");
        assert_eq!(&*message.sender, "outsider");
    }
    let session = t.broker.session("room").unwrap();
    assert_eq!(session.members.len(), 2, "publishing does not join");
    expect_quiet(&mut outsider).await;
}

async fn a_publication_stays_in_its_session(link: Link) {
    let t = TestBroker::start().await;
    let mut red = t.connect(link, "red").await;
    let mut blue = t.connect(link, "blue").await;
    let sender = t.connect(link, "sender").await;
    within("subscribe", red.subscribe("red-room"))
        .await
        .unwrap();
    within("subscribe", blue.subscribe("blue-room"))
        .await
        .unwrap();

    sender.publish("red-room", "for red").await.unwrap();
    sender.publish("blue-room", "for blue").await.unwrap();
    sender.publish("nobody-here", "for nobody").await.unwrap();
    assert_eq!(next_payload(&mut red).await, "for red");
    assert_eq!(next_payload(&mut blue).await, "for blue");
    expect_quiet(&mut red).await;
    expect_quiet(&mut blue).await;
    assert_eq!(
        t.broker.session("nobody-here"),
        None,
        "publishing to a session with no members does not create it"
    );
}

async fn a_delivery_carries_what_the_broker_stamped(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let bob = t.connect(link.other(), "bob").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    let before = SystemTime::now();
    bob.publish("room", vec![0u8, 255, 1, 2]).await.unwrap();
    bob.publish("room", "second").await.unwrap();
    let first = next_message(&mut alice).await;
    let second = next_message(&mut alice).await;

    assert_eq!(first.kind, MessageKind::Session);
    assert_eq!(&*first.sender, "bob");
    assert!(!first.is_from_host());
    assert_eq!(first.target, Target::Session("room".into()));
    assert_eq!(
        &first.payload[..],
        &[0u8, 255, 1, 2],
        "payloads are bytes, not text"
    );
    // A clock sanity check, not a speed check: the stamp is today's time.
    let skew = Duration::from_secs(60);
    assert!(first.sent_at + skew >= before && first.sent_at <= SystemTime::now() + skew);
    assert_ne!(first.id, second.id, "message ids are unique");
}

async fn order_per_sender_is_kept_at_every_member_and_nothing_is_doubled(link: Link) {
    const PUBLISHERS: usize = 3;
    const MEMBERS: usize = 5;
    const MESSAGES: u32 = 2000;

    let t = TestBroker::start().await;
    let mut handles = Vec::new();
    let mut readers = Vec::new();
    for m in 0..MEMBERS {
        // Members alternate transports; the first PUBLISHERS members also publish.
        let link = if m % 2 == 0 { link } else { link.other() };
        let client = t.connect(link, &format!("member{m}")).await;
        within("subscribe", client.subscribe("busy")).await.unwrap();
        let (handle, mut events) = client.split();
        handles.push(handle);

        let expected = if m < PUBLISHERS {
            (PUBLISHERS - 1) * MESSAGES as usize
        } else {
            PUBLISHERS * MESSAGES as usize
        };
        readers.push(tokio::spawn(async move {
            let mut next_seq: HashMap<String, u32> = HashMap::new();
            let mut ids = HashSet::new();
            for _ in 0..expected {
                let message = next_message(&mut events).await;
                assert!(
                    ids.insert(message.id),
                    "member{m} got message {} twice",
                    message.id
                );
                assert_ne!(
                    &*message.sender,
                    format!("member{m}"),
                    "member{m} got its own"
                );
                let seq = u32::from_be_bytes(message.payload[..4].try_into().unwrap());
                let next = next_seq.entry(message.sender.to_string()).or_default();
                assert_eq!(seq, *next, "member{m}: {} out of order", message.sender);
                *next += 1;
            }
            (next_seq, events)
        }));
    }

    let mut publishers = Vec::new();
    for handle in handles.iter().take(PUBLISHERS) {
        let handle = handle.clone();
        publishers.push(tokio::spawn(async move {
            for seq in 0..MESSAGES {
                let mut payload = seq.to_be_bytes().to_vec();
                payload.extend_from_slice(b" padding to look like a real message");
                handle.publish("busy", payload).await.unwrap();
            }
        }));
    }
    for publisher in publishers {
        within("the publishers", publisher).await.unwrap();
    }

    let mut streams = Vec::new();
    for (m, reader) in readers.into_iter().enumerate() {
        let (next_seq, events) = within("every delivery", reader).await.unwrap();
        for p in (0..PUBLISHERS).filter(|&p| p != m) {
            assert_eq!(
                next_seq[&format!("member{p}")],
                MESSAGES,
                "member{m} from member{p}"
            );
        }
        streams.push(events);
    }

    // Nothing beyond what was expected is queued behind: the host's marker comes next.
    t.broker.publish("busy", "marker").await.unwrap();
    for (m, events) in streams.iter_mut().enumerate() {
        let marker = next_message(events).await;
        assert_eq!(
            &marker.payload[..],
            b"marker",
            "member{m} got more than expected"
        );
    }
    assert_eq!(t.broker.stats().messages_dropped, 0);
}

async fn host_publish_reaches_every_member_with_an_empty_sender(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;
    within("subscribe", alice.subscribe("news")).await.unwrap();
    within("subscribe", bob.subscribe("news")).await.unwrap();

    for i in 0..10 {
        t.broker
            .publish("news", format!("bulletin {i}"))
            .await
            .unwrap();
    }
    for member in [&mut alice, &mut bob] {
        for i in 0..10 {
            let message = next_message(member).await;
            assert_eq!(
                &*message.sender, "",
                "the host's messages have an empty sender"
            );
            assert!(message.is_from_host());
            assert_eq!(message.kind, MessageKind::Session);
            assert_eq!(message.target, Target::Session("news".into()));
            assert_eq!(message.payload, format!("bulletin {i}").as_bytes());
        }
        expect_quiet(member).await;
    }
}

async fn host_join_and_leave_send_joined_and_left_notices(link: Link) {
    let t = TestBroker::start().await;
    let mut phone = t.connect(link, "alice").await;
    let mut laptop = t.connect(link.other(), "alice").await;
    let bob = t.connect(link, "bob").await;

    // Joining a user adds every connection of that user.
    assert_eq!(t.broker.join("alice", "team"), Ok(2));
    for device in [&mut phone, &mut laptop] {
        let expected = Notice::Joined {
            session: "team".into(),
        };
        assert_eq!(next_event(device).await, Event::Notice(expected));
    }
    assert_eq!(t.broker.session("team").unwrap().members.len(), 2);
    assert_eq!(t.broker.join("alice", "team"), Ok(0), "members already");

    bob.publish("team", "welcome").await.unwrap();
    assert_eq!(next_payload(&mut phone).await, "welcome");
    assert_eq!(next_payload(&mut laptop).await, "welcome");

    assert_eq!(t.broker.leave("alice", "team"), 2);
    for device in [&mut phone, &mut laptop] {
        let expected = Notice::Left {
            session: "team".into(),
        };
        assert_eq!(next_event(device).await, Event::Notice(expected));
    }
    assert_eq!(t.broker.session("team"), None, "the last member left");
    assert_eq!(t.broker.leave("alice", "team"), 0, "not members any more");

    bob.publish("team", "nobody hears").await.unwrap();
    expect_quiet(&mut phone).await;
    expect_quiet(&mut laptop).await;

    // A user with no connection joins nothing.
    assert_eq!(t.broker.join("nobody", "team"), Ok(0));
    assert_eq!(t.broker.session("team"), None);
}

async fn host_join_of_one_connection_leaves_the_users_other_connections_out(link: Link) {
    let t = TestBroker::start().await;
    let mut phone = t.connect(link, "alice").await;
    let mut laptop = t.connect(link.other(), "alice").await;
    let bob = t.connect(link, "bob").await;

    let joined = t
        .broker
        .join(Who::Connection(laptop.connection_id()), "team");
    assert_eq!(joined, Ok(1));
    let expected = Notice::Joined {
        session: "team".into(),
    };
    assert_eq!(next_event(&mut laptop).await, Event::Notice(expected));
    let session = t.broker.session("team").unwrap();
    assert_eq!(session.members.len(), 1);
    assert_eq!(session.members[0].connection, laptop.connection_id());

    bob.publish("team", "laptop only").await.unwrap();
    assert_eq!(next_payload(&mut laptop).await, "laptop only");
    expect_quiet(&mut phone).await;

    assert_eq!(
        t.broker
            .leave(Who::Connection(phone.connection_id()), "team"),
        0
    );
    assert_eq!(
        t.broker
            .leave(Who::Connection(laptop.connection_id()), "team"),
        1
    );
    assert_eq!(t.broker.session("team"), None);
}

async fn close_session_notifies_every_member_and_frees_the_session(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;
    let carol = t.connect(link, "carol").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();
    within("subscribe", alice.subscribe("other")).await.unwrap();

    assert_eq!(t.broker.close_session("room", "the meeting is over"), 2);
    for member in [&mut alice, &mut bob] {
        let expected = Notice::SessionClosed {
            session: "room".into(),
            reason: "the meeting is over".into(),
        };
        assert_eq!(next_event(member).await, Event::Notice(expected));
    }
    assert_eq!(t.broker.session("room"), None);
    assert_eq!(
        t.broker.close_session("room", "again"),
        0,
        "no such session now"
    );
    assert!(
        t.broker.session("other").is_some(),
        "other sessions are untouched"
    );
    assert_eq!(t.broker.stats().sessions, 1);

    carol.publish("room", "too late").await.unwrap();
    carol.publish("other", "still here").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "still here");
    expect_quiet(&mut bob).await;

    // The session can start again from scratch.
    within("subscribe", bob.subscribe("room")).await.unwrap();
    assert_eq!(t.broker.session("room").unwrap().members.len(), 1);
}

/// A `PUBLISH` frame has no sender field: the broker stamps the handshake's user, or
/// the user the host's `on_connect` chose.
#[tokio::test]
async fn a_raw_publish_is_stamped_with_the_connections_user() {
    let t = TestBroker::with(Broker::builder().on_connect(|info| async move {
        if &*info.user == "mallory" {
            Admission::AcceptAs("mallory-verified".into())
        } else {
            Admission::Accept
        }
    }))
    .await;
    let mut alice = t.connect(Link::Tcp, "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    // A peer that claims to be "admin" in its payload is still "eve".
    let mut eve = t.raw_tcp().await;
    eve.handshake("eve").await;
    eve.send(&raw_publish(b"room", b"\x00\x05admin I am the admin"))
        .await;
    let message = next_message(&mut alice).await;
    assert_eq!(&*message.sender, "eve");
    assert_eq!(&message.payload[..], b"\x00\x05admin I am the admin");

    // A user renamed by the host is stamped with the host's name.
    let mut mallory = t.raw_tcp().await;
    mallory.send(&raw_hello(b"mallory")).await;
    match mallory.frame().await {
        Some(Frame::Welcome { user, .. }) => assert_eq!(user.as_str(), "mallory-verified"),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    mallory.send(&raw_publish(b"room", b"hi")).await;
    let message = next_message(&mut alice).await;
    assert_eq!(&*message.sender, "mallory-verified");

    // The same holds for the crate's client.
    let renamed = t.connect(Link::Memory, "mallory").await;
    assert_eq!(renamed.user(), "mallory-verified");
    renamed.publish("room", "hi again").await.unwrap();
    assert_eq!(&*next_message(&mut alice).await.sender, "mallory-verified");
}

async fn stats_count_messages_deliveries_and_bytes(link: Link) {
    let t = TestBroker::start().await;
    let before = t.broker.stats();
    assert_eq!(before.messages_received, 0);
    assert_eq!(before.bytes_in, 0);

    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link, "bob").await;
    let carol = t.connect(link.other(), "carol").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();
    within("subscribe", bob.subscribe("room")).await.unwrap();
    let stats = t.broker.stats();
    assert_eq!((stats.connections, stats.users, stats.sessions), (3, 3, 1));

    // 3 publications to 2 members, 1 of them by a member: 2 + 2 + 1 copies; a direct
    // message to alice: 1; a publication to an empty session: 0.
    carol.publish("room", "one").await.unwrap();
    carol.publish("room", "two").await.unwrap();
    alice.publish("room", "three").await.unwrap();
    carol.send_direct("alice", "psst").await.unwrap();
    carol.publish("empty", "void").await.unwrap();
    for _ in 0..3 {
        next_message(&mut bob).await;
    }
    for _ in 0..3 {
        next_message(&mut alice).await;
    }

    let broker = t.broker.clone();
    wait_until("the counters to catch up", || {
        let s = broker.stats();
        s.messages_received == 5 && s.messages_delivered == 6
    })
    .await;
    let stats = t.broker.stats();
    assert!(stats.bytes_in > 0, "{stats}");
    assert!(stats.bytes_out > 0, "{stats}");
    assert_eq!(stats.messages_dropped, 0);
    assert_eq!(stats.frames_rejected, 0);
    assert_eq!(stats.connections_refused, 0);
    assert_eq!(stats.hook_panics, 0);
}

async fn max_sessions_per_connection_at_and_past_the_limit(link: Link) {
    let t = TestBroker::with(Broker::builder().max_sessions_per_connection(3)).await;
    let mut alice = t.connect(link, "alice").await;
    let bob = t.connect(link, "bob").await;

    for room in ["a", "b", "c"] {
        within("subscribe", alice.subscribe(room)).await.unwrap();
    }
    match within("subscribe", alice.subscribe("d")).await {
        Err(ClientError::Rejected { code, reason }) => {
            assert_eq!(code, ErrorCode::TooManySessions);
            assert!(!reason.is_empty());
        }
        other => panic!("expected TooManySessions, got {other:?}"),
    }
    assert_eq!(t.broker.session("d"), None);
    // Joining a session it is already in is not a new one.
    within("subscribe", alice.subscribe("c")).await.unwrap();
    // The host cannot push it past the limit either.
    assert_eq!(t.broker.join("alice", "d"), Ok(0));
    assert_eq!(t.broker.session("d"), None);

    // The refusal cost only that request: the connection works.
    bob.publish("c", "still member").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "still member");

    // Leaving one makes room for another.
    within("unsubscribe", alice.unsubscribe("a")).await.unwrap();
    within("subscribe", alice.subscribe("d")).await.unwrap();
    bob.publish("d", "in d").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "in d");
}

async fn max_id_len_at_and_past_the_limit(link: Link) {
    let t = TestBroker::with(Broker::builder().max_id_len(8)).await;

    // Lengths are in bytes: "éééé" is 8 bytes, four characters.
    let at_limit = "éééé";
    let past_limit = "éééé!";
    assert_eq!(at_limit.len(), 8);

    let mut member = t.connect(link, at_limit).await;
    assert_eq!(member.user(), at_limit);
    match t.try_connect(link, Client::builder(past_limit)).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::InvalidId),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a 9-byte user id was accepted"),
    }

    within("subscribe", member.subscribe(at_limit))
        .await
        .unwrap();
    match within("subscribe", member.subscribe(past_limit)).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::InvalidId),
        other => panic!("expected InvalidId, got {other:?}"),
    }

    // A publish or a direct message to an over-long id is refused with a notice that
    // names the request; the connection goes on.
    let sender = t.connect(link.other(), "sender").await;
    let (sender_handle, mut sender_events) = sender.split();
    sender_handle.publish(past_limit, "x").await.unwrap();
    match next_event(&mut sender_events).await {
        Event::Notice(Notice::Error { code, .. }) => assert_eq!(code, ErrorCode::InvalidId),
        other => panic!("expected an InvalidId notice, got {other:?}"),
    }
    let request = sender_handle.send_direct(past_limit, "x").await.unwrap();
    match next_event(&mut sender_events).await {
        Event::Notice(Notice::Error {
            code, request: r, ..
        }) => {
            assert_eq!(code, ErrorCode::InvalidId);
            assert_eq!(r, request);
        }
        other => panic!("expected an InvalidId notice, got {other:?}"),
    }
    sender_handle.publish(at_limit, "fits").await.unwrap();
    assert_eq!(next_payload(&mut member).await, "fits");
    sender_handle
        .send_direct(at_limit, "direct fits")
        .await
        .unwrap();
    assert_eq!(next_payload(&mut member).await, "direct fits");

    // The host's calls hold to the same limit.
    let too_long = BrokerError::InvalidId {
        id: past_limit.into(),
        max: 8,
    };
    assert_eq!(
        t.broker.publish(past_limit, "x").await,
        Err(too_long.clone())
    );
    assert_eq!(
        t.broker.send_to(past_limit, "x").await,
        Err(too_long.clone())
    );
    assert_eq!(t.broker.join(at_limit, past_limit), Err(too_long));
    assert!(t.broker.publish(at_limit, "ok").await.is_ok());
    assert_eq!(next_payload(&mut member).await, "ok");
}

#[tokio::test]
async fn host_calls_refuse_empty_ids() {
    let t = TestBroker::start().await;
    let empty = BrokerError::InvalidId {
        id: String::new(),
        max: t.broker.config().max_id_len,
    };
    assert_eq!(t.broker.publish("", "x").await, Err(empty.clone()));
    assert_eq!(t.broker.send_to("", "x").await, Err(empty.clone()));
    assert_eq!(t.broker.join("alice", ""), Err(empty));
    assert_eq!(t.broker.stats().messages_received, 0);
}
