//! Direct messages: to every live connection of a user, in a session or not; a "not
//! delivered" notice when the user has none; the host's own pushes to a user. Each
//! scenario runs over the in-process transport and over loopback TCP.

#[macro_use]
mod common;

use common::*;
use switchboard::{Admission, Broker, Client, Event, MessageKind, Notice, Target};

over_both_links!(
    a_direct_message_reaches_every_connection_of_the_user,
    a_direct_message_needs_no_session,
    a_direct_message_to_a_user_with_no_connection_is_not_delivered,
    a_direct_message_to_a_user_who_left_is_not_delivered,
    a_direct_message_is_stamped_with_the_senders_user,
    a_direct_message_to_oneself_reaches_the_other_devices_only,
    host_send_to_reaches_every_connection_with_an_empty_sender,
    direct_messages_from_one_sender_keep_their_order,
    accept_as_names_the_user_that_direct_messages_reach,
);

async fn a_direct_message_reaches_every_connection_of_the_user(link: Link) {
    let t = TestBroker::start().await;
    // Bob's two devices use different transports.
    let mut phone = t.connect(link, "bob").await;
    let mut laptop = t.connect(link.other(), "bob").await;
    let mut alice = t.connect(link, "alice").await;
    assert_eq!(t.broker.stats().users, 2);
    assert_eq!(t.broker.stats().connections, 3);

    alice.send_direct("bob", "to both devices").await.unwrap();
    for device in [&mut phone, &mut laptop] {
        let message = next_message(device).await;
        assert_eq!(&message.payload[..], b"to both devices");
        assert_eq!(message.kind, MessageKind::Direct);
    }
    for device in [&mut phone, &mut laptop] {
        expect_quiet(device).await;
    }
    expect_quiet(&mut alice).await;
}

async fn a_direct_message_needs_no_session(link: Link) {
    let t = TestBroker::start().await;
    let mut loner = t.connect(link, "loner").await;
    let mut alice = t.connect(link.other(), "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    alice.send_direct("loner", "hello loner").await.unwrap();
    assert_eq!(next_payload(&mut loner).await, "hello loner");
    assert_eq!(
        t.broker.stats().sessions,
        1,
        "nobody joined anything for it"
    );

    // A member of a session gets direct messages as well, not as a publication.
    loner.send_direct("alice", "hello member").await.unwrap();
    let message = next_message(&mut alice).await;
    assert_eq!(message.kind, MessageKind::Direct);
    assert_eq!(message.target, Target::User("alice".into()));
    expect_quiet(&mut loner).await;
}

async fn a_direct_message_to_a_user_with_no_connection_is_not_delivered(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;

    let first = alice.send_direct("ghost", "anyone?").await.unwrap();
    let second = alice.send_direct("phantom", "anyone?").await.unwrap();
    assert_ne!(first, second, "each direct message has its own request id");
    assert_ne!(first, 0);
    // Two targets may be forwarded by two workers, so the notices come in either order.
    let mut notices = vec![next_event(&mut alice).await, next_event(&mut alice).await];
    notices.sort_by_key(|event| match event {
        Event::Notice(Notice::NotDelivered { request, .. }) => *request,
        other => panic!("expected NotDelivered, got {other:?}"),
    });
    let expected: Vec<_> = [(first, "ghost"), (second, "phantom")]
        .into_iter()
        .map(|(request, user)| {
            Event::Notice(Notice::NotDelivered {
                request,
                user: user.into(),
            })
        })
        .collect();
    assert_eq!(notices, expected);
    expect_quiet(&mut alice).await;
}

async fn a_direct_message_to_a_user_who_left_is_not_delivered(link: Link) {
    let t = TestBroker::start().await;
    let mut alice = t.connect(link, "alice").await;
    let mut bob = t.connect(link.other(), "bob").await;

    alice.send_direct("bob", "still there?").await.unwrap();
    assert_eq!(next_payload(&mut bob).await, "still there?");
    bob.close().await;
    closed(&mut bob).await;
    let broker = t.broker.clone();
    wait_until("bob's connection to end", move || broker.stats().users == 1).await;

    let request = alice.send_direct("bob", "gone?").await.unwrap();
    let expected = Notice::NotDelivered {
        request,
        user: "bob".into(),
    };
    assert_eq!(next_event(&mut alice).await, Event::Notice(expected));
}

async fn a_direct_message_is_stamped_with_the_senders_user(link: Link) {
    let t = TestBroker::start().await;
    let mut bob = t.connect(link, "bob").await;
    let alice = t.connect(link.other(), "alice").await;

    alice.send_direct("bob", "from alice").await.unwrap();
    let message = next_message(&mut bob).await;
    assert_eq!(&*message.sender, "alice");
    assert!(!message.is_from_host());
    assert_eq!(message.kind, MessageKind::Direct);
    assert_eq!(message.target, Target::User("bob".into()));
    assert_eq!(&message.payload[..], b"from alice");
}

async fn a_direct_message_to_oneself_reaches_the_other_devices_only(link: Link) {
    let t = TestBroker::start().await;
    let mut phone = t.connect(link, "alice").await;
    let mut laptop = t.connect(link.other(), "alice").await;

    phone.send_direct("alice", "note to self").await.unwrap();
    let message = next_message(&mut laptop).await;
    assert_eq!(&message.payload[..], b"note to self");
    assert_eq!(&*message.sender, "alice");

    // The sending connection does not get its own message back: the host's marker is
    // its next event.
    t.broker.send_to("alice", "marker").await.unwrap();
    assert_eq!(next_payload(&mut phone).await, "marker");
    assert_eq!(next_payload(&mut laptop).await, "marker");
}

async fn host_send_to_reaches_every_connection_with_an_empty_sender(link: Link) {
    let t = TestBroker::start().await;
    let mut phone = t.connect(link, "bob").await;
    let mut laptop = t.connect(link.other(), "bob").await;
    let mut alice = t.connect(link, "alice").await;

    t.broker.send_to("bob", "from the host").await.unwrap();
    for device in [&mut phone, &mut laptop] {
        let message = next_message(device).await;
        assert_eq!(&*message.sender, "");
        assert!(message.is_from_host());
        assert_eq!(message.kind, MessageKind::Direct);
        assert_eq!(message.target, Target::User("bob".into()));
        assert_eq!(&message.payload[..], b"from the host");
    }
    expect_quiet(&mut alice).await;

    // Nobody to tell when a host push reaches nobody; it is simply not delivered.
    t.broker.send_to("ghost", "lost").await.unwrap();
    expect_quiet(&mut alice).await;
}

async fn direct_messages_from_one_sender_keep_their_order(link: Link) {
    const MESSAGES: u32 = 1000;
    let t = TestBroker::start().await;
    let mut phone = t.connect(link, "bob").await;
    let mut laptop = t.connect(link.other(), "bob").await;
    let alice = t.connect(link, "alice").await;

    for seq in 0..MESSAGES {
        alice.send_direct("bob", seq.to_string()).await.unwrap();
    }
    for device in [&mut phone, &mut laptop] {
        for seq in 0..MESSAGES {
            assert_eq!(next_payload(device).await, seq.to_string());
        }
        expect_quiet(device).await;
    }
}

async fn accept_as_names_the_user_that_direct_messages_reach(link: Link) {
    let builder = Broker::builder().on_connect(|info| async move {
        match info.token.as_ref() {
            b"token-of-carol" => Admission::AcceptAs("carol".into()),
            _ => Admission::Accept,
        }
    });
    let t = TestBroker::with(builder).await;
    let asked = Client::builder("anonymous").token("token-of-carol");
    let mut carol = t.try_connect(link, asked).await.unwrap();
    assert_eq!(carol.user(), "carol");
    let mut alice = t.connect(link.other(), "alice").await;

    alice.send_direct("carol", "hi carol").await.unwrap();
    assert_eq!(next_payload(&mut carol).await, "hi carol");
    let request = alice.send_direct("anonymous", "hi?").await.unwrap();
    let expected = Notice::NotDelivered {
        request,
        user: "anonymous".into(),
    };
    assert_eq!(next_event(&mut alice).await, Event::Notice(expected));

    carol.send_direct("alice", "carol here").await.unwrap();
    let message = next_message(&mut alice).await;
    assert_eq!(&*message.sender, "carol", "stamped with the host's choice");
}
