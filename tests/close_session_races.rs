//! close_session racing with members leaving and rejoining the same session: nobody is
//! listed twice, nobody receives one message twice, nothing is left behind.
#[macro_use]
mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::frame::Frame;
use switchboard::{Broker, ConnectionId, Who};
use tokio::io::AsyncReadExt;

/// A raw TCP peer that says HELLO, returns its connection id, and then reads and
/// discards everything so that notices never fill its outbox.
async fn drained_peer(t: &TestBroker, user: &str) -> (ConnectionId, tokio::task::JoinHandle<()>) {
    let mut raw = t.raw_tcp().await;
    raw.send(&raw_hello(user.as_bytes())).await;
    let id = match raw.frame().await {
        Some(Frame::Welcome { connection, .. }) => ConnectionId(connection),
        other => panic!("expected WELCOME, got {other:?}"),
    };
    let mut stream = raw.stream;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    (id, task)
}

#[test]
fn close_session_racing_with_leave_and_rejoin_leaves_a_ghost_member() {
    run_with_deadline(Duration::from_secs(120), || async {
        let t = TestBroker::start().await;
        let mut tasks = Vec::new();
        for _ in 0..300 {
            tasks.push(drained_peer(&t, "filler").await.1);
        }
        let (alice, alice_task) = drained_peer(&t, "alice").await;
        tasks.push(alice_task);

        let broker: Broker = t.broker.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let doubled = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_secs(4);

        // The host closes the session over and over, alice always last in its list.
        let closer = {
            let (broker, stop) = (broker.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    broker.join(Who::User("filler".into()), "room").unwrap();
                    broker.join(alice, "room").unwrap();
                    broker.close_session("room", "closing");
                    rounds += 1;
                }
                rounds
            })
        };
        // Meanwhile alice leaves and rejoins (the host on her behalf; a client's
        // UNSUBSCRIBE/SUBSCRIBE goes through the same SessionMap calls).
        let churner = {
            let (broker, stop, doubled) = (broker.clone(), stop.clone(), doubled.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    broker.leave(alice, "room");
                    broker.join(alice, "room").unwrap();
                    broker.join(alice, "room").unwrap();
                    if let Some(s) = broker.session("room") {
                        let n = s.members.iter().filter(|m| m.connection == alice).count();
                        if n > 1 {
                            doubled.store(n, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let rounds = tokio::task::spawn_blocking(move || {
            let r = closer.join().unwrap();
            churner.join().unwrap();
            r
        })
        .await
        .unwrap();
        eprintln!(
            "{rounds} close rounds; alice seen {} times in one member list",
            doubled.load(Ordering::Relaxed)
        );

        // Everybody leaves: the broker should hold nothing afterwards.
        broker.leave(alice, "room");
        broker.disconnect(Who::User("filler".into()), "bye");
        broker.disconnect(alice, "bye");
        for task in tasks {
            let _ = within("a peer to see its close", task).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats = broker.stats();
        let ghost = broker.session("room");
        eprintln!("after everyone left: {stats}; room = {ghost:?}");
        assert_eq!(
            doubled.load(Ordering::Relaxed),
            0,
            "alice was in the member list twice"
        );
        assert_eq!(stats.connections, 0);
        assert_eq!(
            stats.sessions, 0,
            "a session with no live member is left behind"
        );
    });
}

/// The same race driven by the client's own UNSUBSCRIBE/SUBSCRIBE over TCP, and what the
/// client then sees: one host publication delivered twice.
#[test]
fn a_client_resubscribing_during_close_session_receives_one_message_twice() {
    run_with_deadline(Duration::from_secs(120), || async {
        let t = TestBroker::start().await;
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            tasks.push(drained_peer(&t, "filler").await.1);
        }
        let alice = t.connect(Link::Tcp, "alice").await;
        let alice_id = alice.connection_id();
        let (handle, mut events) = alice.split();
        // Drain alice's notices in the background, keep her messages.
        let (msg_tx, mut msg_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(ev) = events.next().await {
                if let switchboard::Event::Message(m) = ev {
                    let _ = msg_tx.send(m);
                }
            }
        });

        let broker: Broker = t.broker.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(6);
        let closer = {
            let (broker, stop) = (broker.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    broker.join(Who::User("filler".into()), "room").unwrap();
                    broker.join(alice_id, "room").unwrap();
                    broker.close_session("room", "closing");
                    rounds += 1;
                    if let Some(s) = broker.session("room") {
                        if s.members
                            .iter()
                            .filter(|m| m.connection == alice_id)
                            .count()
                            > 1
                        {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
                rounds
            })
        };
        let mut cycles = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = handle.unsubscribe("room").await;
            let _ = handle.subscribe("room").await;
            let _ = handle.subscribe("room").await;
            cycles += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let rounds = tokio::task::spawn_blocking(move || closer.join().unwrap())
            .await
            .unwrap();
        let snapshot = broker.session("room");
        let times = snapshot.as_ref().map_or(0, |s| {
            s.members
                .iter()
                .filter(|m| m.connection == alice_id)
                .count()
        });
        eprintln!("{rounds} close rounds, {cycles} client cycles; alice in the list {times} times");

        // One publication from the host.
        broker.publish("room", "once").await.unwrap();
        let mut copies = 0;
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), msg_rx.recv()).await
        {
            if &m.payload[..] == b"once" {
                copies += 1;
            }
        }
        eprintln!("alice received the publication {copies} times");
        assert!(
            copies <= 1,
            "one message delivered {copies} times to one member"
        );
        drop(tasks);
    });
}
