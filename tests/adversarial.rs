//! Hostile peers and hostile hosts: hooks that panic outside their future or never
//! answer, WebSocket peers that never finish the upgrade or break the WebSocket
//! protocol itself, bursts of handshakes at the connection limit, many connections of
//! one user at once, and frames split at every byte. Each check is that the offending
//! connection, and only it, is told and closed, that the counters say so, and that a
//! broker left with no connections holds nothing for them.

mod common;

use common::*;
use switchboard::frame::Frame;
use switchboard::{Admission, Broker, Client, ClientError, ErrorCode};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_connect_hook_that_panics_before_returning_its_future_refuses_that_connection_only() {
    // The panic happens in the hook's own body, before it hands back a future.
    let builder = Broker::builder().on_connect(|info| {
        if &*info.user == "boom" {
            panic!("the host's on_connect hook failed");
        }
        async { Admission::Accept }
    });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(Link::Memory, "alice").await;

    for link in [Link::Memory, Link::Tcp] {
        match t.try_connect(link, Client::builder("boom")).await {
            Err(ClientError::Refused { code, reason }) => {
                assert_eq!(code, ErrorCode::Refused);
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("expected a refusal over {link:?}, got {other}"),
            Ok(_) => panic!("a connection whose hook panicked was accepted"),
        }
    }
    let stats = t.broker.stats();
    assert_eq!(stats.hook_panics, 2);
    assert_eq!(stats.connections_refused, 2);
    assert_eq!(stats.connections, 1);

    let bob = t.connect(Link::Tcp, "bob").await;
    bob.send_direct("alice", "still working").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "still working");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_resolves_while_an_on_connect_hook_never_answers() {
    let (asked, mut waiting) = mpsc::unbounded_channel();
    let builder = Broker::builder().on_connect(move |info| {
        let asked = asked.clone();
        async move {
            if &*info.user == "stuck" {
                let _ = asked.send(());
                std::future::pending::<()>().await;
            }
            Admission::Accept
        }
    });
    let t = TestBroker::with(builder).await;
    let mut alice = t.connect(Link::Tcp, "alice").await;
    let mut stuck = t.raw_tcp().await;
    stuck.send(&raw_hello(b"stuck")).await;
    within("the hook to be asked", waiting.recv()).await;

    within("shutdown", t.broker.shutdown()).await;
    assert_eq!(
        closed(&mut alice).await,
        (ErrorCode::ShuttingDown, "broker shutting down".to_string())
    );
    match stuck.frame().await {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("expected ERROR ShuttingDown, got {other:?}"),
    }
    t.wait_until_empty().await;
}
