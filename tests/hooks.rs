//! The host's hooks: what each is told and when, refusals, panics that are caught and
//! counted, and hooks that call back into the broker without deadlocking it.

#[macro_use]
mod common;

use common::*;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use switchboard::{
    Admission, Broker, Client, ClientError, ConnectInfo, DisconnectInfo, ErrorCode, MessageKind,
    Target, Who,
};
use tokio::sync::mpsc;

over_both_links!(
    on_message_runs_once_per_message_with_the_members_it_reached,
    on_connect_sees_the_user_the_token_and_the_connection,
    an_on_connect_refusal_gives_the_client_its_reason,
    on_disconnect_is_told_why,
    a_panicking_on_message_hook_is_caught_and_counted,
    a_panicking_on_connect_hook_refuses_that_connection_only,
    a_panicking_on_disconnect_hook_is_caught_and_cleanup_completes,
);

/// What `on_message` was called with.
#[derive(Debug)]
struct Seen {
    id: u64,
    kind: MessageKind,
    sender: String,
    target: Target,
    reached: usize,
}

async fn on_message_runs_once_per_message_with_the_members_it_reached(link: Link) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let builder = Broker::builder().on_message(move |message, reached| {
        let payload = String::from_utf8_lossy(&message.payload).into_owned();
        let seen = Seen {
            id: message.id,
            kind: message.kind,
            sender: message.sender.to_string(),
            target: message.target.clone(),
            reached,
        };
        let _ = tx.send((payload, seen));
    });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;
    let mut bob2 = t.connect(link, "bob").await;
    let dave = t.connect(link.other(), "dave").await;
    for member in [&alice, &bob] {
        within("subscribe", member.subscribe("room")).await.unwrap();
    }

    dave.publish("room", "to the room").await.unwrap(); // alice, bob
    alice.publish("room", "from a member").await.unwrap(); // bob
    dave.publish("empty", "to nobody").await.unwrap(); // nobody
    dave.send_direct("bob", "to bob").await.unwrap(); // both of bob's connections
    dave.send_direct("ghost", "to a ghost").await.unwrap(); // nobody
    t.broker.publish("room", "from the host").await.unwrap(); // alice, bob

    let mut seen = HashMap::new();
    for _ in 0..6 {
        let (payload, call) = within("an on_message call", rx.recv()).await.unwrap();
        assert!(
            seen.insert(payload.clone(), call).is_none(),
            "{payload:?} seen twice"
        );
    }
    tokio::time::sleep(QUIET).await;
    assert!(rx.try_recv().is_err(), "one call per message, no more");

    let expect = |payload: &str, kind, sender: &str, target: Target, reached| {
        let call = &seen[payload];
        assert_eq!(call.kind, kind, "{payload}");
        assert_eq!(call.sender, sender, "{payload}");
        assert_eq!(call.target, target, "{payload}");
        assert_eq!(call.reached, reached, "{payload}");
    };
    let room = || Target::Session("room".into());
    expect("to the room", MessageKind::Session, "dave", room(), 2);
    expect("from a member", MessageKind::Session, "alice", room(), 1);
    expect(
        "to nobody",
        MessageKind::Session,
        "dave",
        Target::Session("empty".into()),
        0,
    );
    expect(
        "to bob",
        MessageKind::Direct,
        "dave",
        Target::User("bob".into()),
        2,
    );
    expect(
        "to a ghost",
        MessageKind::Direct,
        "dave",
        Target::User("ghost".into()),
        0,
    );
    expect("from the host", MessageKind::Session, "", room(), 2);

    // The hook saw the ids the members received.
    let mut ids: Vec<_> = seen.values().map(|call| call.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "message ids are unique");
    let received = next_message(&mut alice).await;
    assert_eq!(
        received.id,
        seen[&*String::from_utf8_lossy(&received.payload)].id
    );
    for _ in 0..3 {
        let received = next_message(&mut bob).await;
        assert_eq!(
            received.id,
            seen[&*String::from_utf8_lossy(&received.payload)].id
        );
    }
    let received = next_message(&mut bob2).await;
    assert_eq!(received.id, seen["to bob"].id);
}

async fn on_connect_sees_the_user_the_token_and_the_connection(link: Link) {
    let (tx, mut rx) = mpsc::unbounded_channel::<ConnectInfo>();
    let builder = Broker::builder().on_connect(move |info| {
        let _ = tx.send(info);
        async { Admission::Accept }
    });
    let t = TestBroker::with(builder).await;

    let alice = t
        .try_connect(link, Client::builder("alice").token("s3cret"))
        .await
        .unwrap();
    let info = within("on_connect", rx.recv()).await.unwrap();
    assert_eq!(&*info.user, "alice");
    assert_eq!(&info.token[..], b"s3cret");
    assert_eq!(info.connection, alice.connection_id());
    assert!(!info.peer.is_empty());
    if link == Link::Tcp {
        assert!(info.peer.starts_with("127.0.0.1:"), "peer {}", info.peer);
    }

    let bob = t.connect(link, "bob").await;
    let info = within("on_connect", rx.recv()).await.unwrap();
    assert!(info.token.is_empty(), "no token sent, an empty one seen");
    assert_eq!(info.connection, bob.connection_id());
    assert_ne!(alice.connection_id(), bob.connection_id());
}

async fn an_on_connect_refusal_gives_the_client_its_reason(link: Link) {
    let (tx, mut rx) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = Broker::builder()
        .on_connect(|info| async move {
            if info.token.as_ref() == b"letmein" {
                Admission::Accept
            } else {
                Admission::Refuse(format!("{} has no valid token", info.user))
            }
        })
        .on_disconnect(move |info| {
            let _ = tx.send(info.clone());
        });
    let t = TestBroker::with(builder).await;

    match t.try_connect(link, Client::builder("mallory")).await {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::Refused);
            assert_eq!(reason, "mallory has no valid token");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("the hook's refusal was ignored"),
    }
    let stats = t.broker.stats();
    assert_eq!(stats.connections_refused, 1);
    assert_eq!((stats.connections, stats.users), (0, 0));
    assert_eq!(stats.frames_rejected, 0, "a refusal is not bad input");

    let alice = t
        .try_connect(link, Client::builder("alice").token("letmein"))
        .await
        .unwrap();
    assert_eq!(alice.user(), "alice");
    assert_eq!(t.broker.stats().connections, 1);
    // on_disconnect is for connections that were accepted; the refused one never was.
    alice.close().await;
    let info = within("on_disconnect", rx.recv()).await.unwrap();
    assert_eq!(&*info.user, "alice");
}

async fn on_disconnect_is_told_why(link: Link) {
    let (tx, mut rx) = mpsc::unbounded_channel::<DisconnectInfo>();
    let builder = Broker::builder().on_disconnect(move |info| {
        let _ = tx.send(info.clone());
    });
    let t = TestBroker::with(builder).await;

    // The client closes.
    let mut alice = t.connect(link, "alice").await;
    alice.close().await;
    closed(&mut alice).await;
    let info = within("on_disconnect", rx.recv()).await.unwrap();
    assert_eq!(info.connection, alice.connection_id());
    assert_eq!(&*info.user, "alice");
    assert_eq!(info.code, ErrorCode::Normal);
    assert!(!info.reason.is_empty());

    // The host closes.
    let mut bob = t.connect(link, "bob").await;
    assert_eq!(t.broker.disconnect("bob", "banned for spam"), 1);
    assert_eq!(
        closed(&mut bob).await,
        (ErrorCode::ClosedByHost, "banned for spam".to_string())
    );
    let info = within("on_disconnect", rx.recv()).await.unwrap();
    assert_eq!(info.connection, bob.connection_id());
    assert_eq!(info.code, ErrorCode::ClosedByHost);
    assert_eq!(info.reason, "banned for spam");

    // The peer vanishes without a word.
    match link {
        Link::Tcp => t.raw_tcp().await.handshake("carol").await,
        Link::Memory => t.raw_memory().await.handshake("carol").await,
    }
    let info = within("on_disconnect", rx.recv()).await.unwrap();
    assert_eq!(&*info.user, "carol");
    assert_eq!(info.code, ErrorCode::Normal);

    tokio::time::sleep(QUIET).await;
    assert!(rx.try_recv().is_err(), "once per connection");
}

async fn a_panicking_on_message_hook_is_caught_and_counted(link: Link) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let builder = Broker::builder().on_message(move |message, _| {
        if &message.payload[..] == b"boom" {
            panic!("the host's on_message hook failed");
        }
        let _ = tx.send(message.payload.clone());
    });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(link, "alice").await;
    let bob = t.connect(link.other(), "bob").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    bob.publish("room", "boom").await.unwrap();
    assert_eq!(
        next_payload(&mut alice).await,
        "boom",
        "delivered before the hook ran"
    );
    let broker = t.broker.clone();
    wait_until("the panic to be counted", move || {
        broker.stats().hook_panics == 1
    })
    .await;

    // The worker that ran the hook goes on forwarding, and calling the hook.
    for i in 0..20 {
        bob.publish("room", format!("after {i}")).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(next_payload(&mut alice).await, format!("after {i}"));
        let seen = within("on_message", rx.recv()).await.unwrap();
        assert_eq!(seen, format!("after {i}").as_bytes());
    }
    bob.publish("room", "boom").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "boom");
    let broker = t.broker.clone();
    wait_until(
        "the second panic and every message to be counted",
        move || {
            let stats = broker.stats();
            stats.hook_panics == 2 && stats.messages_received == 22
        },
    )
    .await;
    assert_eq!(t.broker.stats().connections, 2);
}

async fn a_panicking_on_connect_hook_refuses_that_connection_only(link: Link) {
    let builder = Broker::builder().on_connect(|info| async move {
        if &*info.user == "boom" {
            panic!("the host's on_connect hook failed");
        }
        Admission::Accept
    });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(link, "alice").await;

    match t.try_connect(link, Client::builder("boom")).await {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::Refused);
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a connection whose hook panicked was accepted"),
    }
    let stats = t.broker.stats();
    assert_eq!(stats.hook_panics, 1);
    assert_eq!(stats.connections_refused, 1);
    assert_eq!(stats.connections, 1);

    let bob = t.connect(link.other(), "bob").await;
    bob.send_direct("alice", "still working").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "still working");
}

async fn a_panicking_on_disconnect_hook_is_caught_and_cleanup_completes(link: Link) {
    let builder = Broker::builder().on_disconnect(|_| panic!("the host's on_disconnect failed"));
    let t = TestBroker::with(builder).await;
    for user in ["alice", "bob"] {
        let mut client = t.connect(link, user).await;
        within("subscribe", client.subscribe("room")).await.unwrap();
        client.close().await;
        closed(&mut client).await;
    }
    let broker = t.broker.clone();
    wait_until("both panics to be counted", move || {
        broker.stats().hook_panics == 2
    })
    .await;
    t.wait_until_empty().await;

    let mut carol = t.connect(link, "carol").await;
    within("subscribe", carol.subscribe("room")).await.unwrap();
    t.broker.publish("room", "still working").await.unwrap();
    assert_eq!(next_payload(&mut carol).await, "still working");
}

/// Every hook calls back into the broker: reads a session, reads the counters, changes
/// membership. Had any hook run under one of the broker's locks, one of these calls
/// would wait on it for good; the deadline turns that into a failure.
#[test]
fn hooks_may_call_the_broker_because_no_lock_is_held() {
    run_with_deadline(Duration::from_secs(20), || async {
        let handle: Arc<OnceLock<Broker>> = Arc::new(OnceLock::new());
        let (calls, mut called) = mpsc::unbounded_channel::<&'static str>();

        let (h, c) = (handle.clone(), calls.clone());
        let builder = Broker::builder().on_message(move |message, _| {
            let broker = h.get().expect("the broker is built");
            let session = broker.session(message.target.id());
            let _ = broker.stats();
            if !message.sender.is_empty() {
                // Membership changes take the sender's own lock and the session map's
                // write locks: the target session's shard, and another one.
                broker.join(&*message.sender, message.target.id()).unwrap();
                broker.leave(&*message.sender, message.target.id());
                broker.join(&*message.sender, "audit").unwrap();
            }
            if session.is_some() {
                let _ = c.send("on_message");
            }
        });
        let (h, c) = (handle.clone(), calls.clone());
        let builder = builder.on_connect(move |info| {
            let broker = h.get().expect("the broker is built").clone();
            let c = c.clone();
            async move {
                let _ = broker.stats();
                let _ = broker.session("room");
                let _ = broker.join(Who::User(info.user.to_string()), "lobby");
                let _ = c.send("on_connect");
                Admission::Accept
            }
        });
        let (h, c) = (handle.clone(), calls.clone());
        let builder = builder.on_disconnect(move |info| {
            let broker = h.get().expect("the broker is built");
            let _ = broker.stats();
            let _ = broker.session("room");
            // Alice, still connected, joins a session that is then closed.
            broker.join("alice", "farewell").unwrap();
            broker.close_session("farewell", "closed from on_disconnect");
            let _ = broker.disconnect(info.connection, "already gone");
            let _ = c.send("on_disconnect");
        });
        let (h, c) = (handle.clone(), calls);
        let builder = builder.on_error(move |_| {
            let broker = h.get().expect("the broker is built");
            let _ = broker.stats();
            let _ = broker.session("room");
            let _ = c.send("on_error");
        });

        let t = TestBroker::with(builder).await;
        handle.set(t.broker.clone()).ok().unwrap();

        let mut alice = t.connect(Link::Memory, "alice").await;
        let bob = t.connect(Link::Tcp, "bob").await;
        assert_eq!(within("a hook", called.recv()).await, Some("on_connect"));
        assert_eq!(within("a hook", called.recv()).await, Some("on_connect"));
        within("subscribe", alice.subscribe("room")).await.unwrap();

        for i in 0..50 {
            bob.publish("room", format!("{i}")).await.unwrap();
        }
        for i in 0..50 {
            assert_eq!(next_payload(&mut alice).await, format!("{i}"));
            assert_eq!(within("a hook", called.recv()).await, Some("on_message"));
        }
        let audit = t
            .broker
            .session("audit")
            .expect("the hook joined bob to it");
        assert_eq!(&*audit.members[0].user, "bob");

        let mut raw = t.raw_tcp().await;
        raw.handshake("carol").await;
        assert_eq!(within("a hook", called.recv()).await, Some("on_connect"));
        raw.send(&raw_frame(0x7f, b"")).await;
        raw.expect_rejected(ErrorCode::UnknownKind).await;
        let mut hooks = vec![
            within("a hook", called.recv()).await.unwrap(),
            within("a hook", called.recv()).await.unwrap(),
        ];
        hooks.sort();
        assert_eq!(hooks, ["on_disconnect", "on_error"]);

        bob.close().await;
        alice.close().await;
        for _ in 0..2 {
            assert_eq!(within("a hook", called.recv()).await, Some("on_disconnect"));
        }
        t.wait_until_empty().await;
        assert_eq!(t.broker.stats().hook_panics, 0);
    });
}
