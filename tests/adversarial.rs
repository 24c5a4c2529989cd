//! Hostile peers and hostile hosts: hooks that panic outside their future or never
//! answer, WebSocket peers that never finish the upgrade or break the WebSocket
//! protocol itself, bursts of handshakes at the connection limit, many connections of
//! one user at once, and frames split at every byte. Each check is that the offending
//! connection, and only it, is told and closed, that the counters say so, and that a
//! broker left with no connections holds nothing for them.

mod common;

use common::*;
use futures::future::join_all;
use futures::StreamExt;
use std::time::Duration;
use switchboard::frame::Frame;
use switchboard::{Admission, Broker, Client, ClientError, ErrorCode, Event};
use tokio::io::AsyncWriteExt;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_handshakes_past_max_connections_lets_exactly_the_limit_in() {
    const MAX: usize = 10;
    const BURST: usize = 40;
    let t = TestBroker::with(Broker::builder().max_connections(MAX)).await;

    let attempts = (0..BURST).map(|i| {
        let link = if i % 2 == 0 { Link::Memory } else { Link::Tcp };
        t.try_connect(link, Client::builder(format!("user{i}")))
    });
    let outcomes = join_all(attempts).await;
    let mut admitted = Vec::new();
    let mut refused = 0;
    for outcome in outcomes {
        match outcome {
            Ok(client) => admitted.push(client),
            Err(ClientError::Refused { code, .. }) => {
                assert_eq!(code, ErrorCode::TooManyConnections);
                refused += 1;
            }
            Err(other) => panic!("expected a welcome or TooManyConnections, got {other}"),
        }
    }
    assert_eq!(admitted.len(), MAX);
    assert_eq!(refused, BURST - MAX);
    let stats = t.broker.stats();
    assert_eq!(stats.connections, MAX);
    assert_eq!(stats.connections_refused, (BURST - MAX) as u64);

    // Those admitted all work, and once they leave the broker is empty and takes
    // new connections again.
    for client in &admitted {
        within("subscribe", client.subscribe("room")).await.unwrap();
    }
    within("a host publish", t.broker.publish("room", "to all"))
        .await
        .unwrap();
    for client in &mut admitted {
        assert_eq!(next_payload(client).await, "to all");
    }
    drop(admitted);
    t.wait_until_empty().await;
    let _late = t.connect(Link::Tcp, "late").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_of_one_user_at_once_leave_exactly_one_when_each_replaces_the_older() {
    const AT_ONCE: usize = 24;
    let t = TestBroker::with(Broker::builder().replace_older_connections(true)).await;

    let attempts = (0..AT_ONCE).map(|i| {
        let link = if i % 2 == 0 { Link::Memory } else { Link::Tcp };
        t.try_connect(link, Client::builder("dup"))
    });
    let mut clients: Vec<Client> = join_all(attempts)
        .await
        .into_iter()
        .map(|outcome| outcome.expect("every handshake is welcomed"))
        .collect();

    // Exactly one is left: every other one is told it was replaced.
    let broker = t.broker.clone();
    wait_until("one connection of dup is left", move || {
        broker.stats().connections == 1
    })
    .await;
    let survivor = t.broker.stats();
    assert_eq!((survivor.connections, survivor.users), (1, 1));

    let mut replaced = 0;
    let mut alive = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        match tokio::time::timeout(QUIET, client.next()).await {
            Ok(Some(Event::Closed { code, .. })) => {
                assert_eq!(code, ErrorCode::Replaced, "client {i}");
                replaced += 1;
            }
            Ok(other) => panic!("client {i}: expected Closed or nothing, got {other:?}"),
            Err(_) => alive.push(i),
        }
    }
    assert_eq!(replaced, AT_ONCE - 1);
    assert_eq!(alive.len(), 1);

    // The one left is the live connection and receives direct messages.
    let survivor = &mut clients[alive[0]];
    within("send_to", t.broker.send_to("dup", "you are the one"))
        .await
        .unwrap();
    assert_eq!(next_payload(survivor).await, "you are the one");
    drop(clients);
    t.wait_until_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_split_at_every_byte_over_tcp_are_read_whole() {
    let t = TestBroker::start().await;
    let mut member = t.connect(Link::Memory, "member").await;
    within("subscribe", member.subscribe("room")).await.unwrap();

    // HELLO, SUBSCRIBE, two PUBLISHes and a PING, one byte per write.
    let mut raw = t.raw_tcp().await;
    let mut bytes = raw_hello(b"slow-typist");
    bytes.extend(raw_subscribe(7, "other".as_bytes()));
    bytes.extend(raw_publish(b"room", b"first"));
    bytes.extend(raw_publish(b"room", "second \0 with a NUL".as_bytes()));
    bytes.extend(raw_frame(kind::PING, &[]));
    raw.stream.set_nodelay(true).unwrap();
    for byte in bytes {
        raw.stream.write_all(&[byte]).await.unwrap();
        raw.stream.flush().await.unwrap();
    }

    assert!(matches!(raw.frame().await, Some(Frame::Welcome { .. })));
    assert_eq!(raw.frame().await, Some(Frame::Ok { request: 7 }));
    assert_eq!(raw.frame().await, Some(Frame::Pong));
    assert_eq!(next_payload(&mut member).await, "first");
    assert_eq!(next_payload(&mut member).await, "second \0 with a NUL");
    assert_eq!(t.broker.stats().frames_rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_connection_can_end_gives_its_place_back() {
    // Two places only: a single leaked place among the rounds below would lock the
    // broker out for good.
    let builder = Broker::builder()
        .max_connections(2)
        .handshake_timeout(Duration::from_millis(100))
        .outbox_bytes(1024)
        .replace_older_connections(true)
        .on_connect(|info| {
            if &*info.user == "panics-now" {
                panic!("the host's on_connect hook failed");
            }
            async move {
                match &*info.user {
                    "refused" => Admission::Refuse("not today".into()),
                    "panics-later" => panic!("the host's on_connect future failed"),
                    _ => Admission::Accept,
                }
            }
        });
    let t = TestBroker::with(builder).await;

    for round in 0..3 {
        // Refused during the handshake: bad bytes, the host, a panicking hook, silence.
        let mut raw = t.raw_tcp().await;
        raw.send(&raw_frame(0x7f, b"")).await;
        raw.expect_rejected(ErrorCode::UnknownKind).await;
        for user in ["refused", "panics-now", "panics-later"] {
            let mut raw = t.raw_memory().await;
            raw.send(raw_hello(user.as_bytes())).await;
            assert!(
                matches!(raw.frame().await, Some(Frame::Error { .. })),
                "{user}"
            );
        }
        let mut silent = t.raw_memory().await;
        match silent.frame().await {
            Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::HandshakeTimeout),
            other => panic!("expected ERROR HandshakeTimeout, got {other:?}"),
        }

        // Ended after the handshake: bad input, the client, the host, a newer
        // connection of the same user, an outbox that overflows.
        let mut raw = t.raw_tcp().await;
        raw.handshake("bad").await;
        raw.send(&raw_frame(kind::DELIVER, b"")).await;
        raw.expect_rejected(ErrorCode::Malformed).await;

        let client = t.connect(Link::Tcp, "polite").await;
        client.close().await;
        drop(client);

        let mut kicked = t.connect(Link::Memory, "kicked").await;
        let broker = t.broker.clone();
        wait_until("kicked is registered", move || {
            broker.stats().connections == 1
        })
        .await;
        assert_eq!(t.broker.disconnect("kicked", "go away"), 1);
        assert_eq!(closed(&mut kicked).await.0, ErrorCode::ClosedByHost);

        let mut older = t.connect(Link::Memory, "twice").await;
        let newer = t.connect(Link::Tcp, "twice").await;
        assert_eq!(closed(&mut older).await.0, ErrorCode::Replaced);
        drop(newer);

        let mut stalled = t.raw_memory().await;
        stalled.handshake("stalled").await;
        stalled
            .send(raw_subscribe(1, format!("flood{round}").as_bytes()))
            .await;
        assert_eq!(stalled.frame().await, Some(Frame::Ok { request: 1 }));
        let slow_before = t.broker.stats().slow_consumers;
        let broker = t.broker.clone();
        within("the stalled member to overflow", async {
            while broker.stats().slow_consumers == slow_before {
                broker
                    .publish(&format!("flood{round}"), vec![0u8; 512])
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        })
        .await;
        drop(stalled);

        t.wait_until_empty().await;
    }

    // Both places are free again.
    let mut a = t.connect(Link::Tcp, "a").await;
    let b = t.connect(Link::Memory, "b").await;
    b.send_direct("a", "the last two").await.unwrap();
    assert_eq!(next_payload(&mut a).await, "the last two");
    let stats = t.broker.stats();
    assert_eq!((stats.connections, stats.users, stats.sessions), (2, 2, 0));
    assert_eq!(stats.hook_panics, 6);
    assert_eq!(stats.slow_consumers, 3);
    assert_eq!(stats.frames_rejected, 6);
    assert_eq!(stats.connections_refused, 3 * 5);
    for id in ["flood0", "flood1", "flood2"] {
        assert_eq!(t.broker.session(id), None);
    }
}

// ---------------------------------------------------------------------------------
// WebSocket peers that misbehave below the protocol: at the upgrade, or in the
// WebSocket framing itself.

#[cfg(feature = "websocket")]
mod websocket {
    use super::common::*;
    use futures::{SinkExt, StreamExt};
    use std::net::SocketAddr;
    use std::time::Duration;
    use switchboard::WebSocketTransport;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::WebSocketStream;

    async fn ws_broker(
        transport: impl FnOnce(WebSocketTransport) -> WebSocketTransport,
    ) -> (TestBroker, SocketAddr) {
        let t = TestBroker::start().await;
        let listener = WebSocketTransport::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(t.broker.serve(transport(listener)));
        (t, addr)
    }

    async fn open_ws(addr: SocketAddr) -> WebSocketStream<TcpStream> {
        let stream = within("a TCP connect", TcpStream::connect(addr))
            .await
            .unwrap();
        let (ws, _) = within(
            "the WebSocket handshake",
            tokio_tungstenite::client_async(format!("ws://{addr}/"), stream),
        )
        .await
        .expect("WebSocket handshake");
        ws
    }

    /// Writes one masked client frame by hand (mask key zero), bypassing tungstenite's
    /// own checks.
    async fn raw_ws_frame(ws: &mut WebSocketStream<TcpStream>, first: u8, payload: &[u8]) {
        assert!(payload.len() < 126);
        let mut frame = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        let stream = ws.get_mut();
        stream.write_all(&frame).await.unwrap();
        stream.flush().await.unwrap();
    }

    /// Says HELLO in JSON, then writes one raw frame (`first` is its FIN and opcode
    /// byte), and returns the broker and what arrived until the end.
    async fn hello_then_raw_frame(
        first: u8,
        payload: &[u8],
    ) -> (TestBroker, Vec<serde_json::Value>) {
        let (t, addr) = ws_broker(|ws| ws).await;
        let mut ws = open_ws(addr).await;
        ws.send(WsMessage::text(
            r#"{"type":"hello","version":1,"user":"bad"}"#,
        ))
        .await
        .unwrap();
        raw_ws_frame(&mut ws, first, payload).await;
        let got = json_until_end(&mut ws).await;
        (t, got)
    }

    /// What arrived as text, parsed, until the end of the connection.
    async fn json_until_end(ws: &mut WebSocketStream<TcpStream>) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        within("the end of the WebSocket", async {
            while let Some(Ok(message)) = ws.next().await {
                if let WsMessage::Text(text) = message {
                    got.push(serde_json::from_str(text.as_str()).unwrap());
                }
            }
        })
        .await;
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_sends_the_websocket_upgrade_is_closed() {
        let (t, addr) = ws_broker(|ws| ws.handshake_timeout(Duration::from_millis(200))).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let read = within("the broker to close a silent socket", silent.read(&mut buf)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(t.broker.stats().connections, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_text_message_that_is_not_utf8_is_malformed() {
        // FIN and opcode 1 (text), with bytes that are not UTF-8.
        let (t, got) = hello_then_raw_frame(0x81, b"{\"type\":\"ping\xff\"}").await;
        let kinds: Vec<_> = got.iter().map(|v| v["type"].clone()).collect();
        assert_eq!(kinds, ["welcome", "error", "close"], "{got:?}");
        assert_eq!(got[1]["code"], 1, "{got:?}");
        assert_eq!(got[2]["code"], 1, "{got:?}");
        assert_eq!(t.broker.stats().frames_rejected, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_protocol_violation_is_refused_as_malformed() {
        // FIN and opcode 3, which WebSocket reserves.
        let (t, got) = hello_then_raw_frame(0x83, b"").await;
        let kinds: Vec<_> = got.iter().map(|v| v["type"].clone()).collect();
        assert_eq!(kinds, ["welcome", "error", "close"], "{got:?}");
        assert_eq!(got[1]["code"], 1, "{got:?}");
        assert_eq!(t.broker.stats().frames_rejected, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_drops_its_socket_without_a_websocket_close_is_not_bad_input() {
        let (t, addr) = ws_broker(|ws| ws).await;
        let mut ws = open_ws(addr).await;
        ws.send(WsMessage::text(
            r#"{"type":"hello","version":1,"user":"gone"}"#,
        ))
        .await
        .unwrap();
        match within("the welcome", ws.next()).await {
            Some(Ok(WsMessage::Text(text))) => assert!(text.as_str().contains("welcome")),
            other => panic!("expected the welcome, got {other:?}"),
        }
        // Half a frame, then the socket goes: the broker reads the end of the stream
        // where a WebSocket close should have been.
        let stream = ws.get_mut();
        stream.write_all(&[0x81]).await.unwrap();
        stream.shutdown().await.unwrap();
        drop(ws);

        t.wait_until_empty().await;
        assert_eq!(t.broker.stats().frames_rejected, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_json_hello_with_the_longest_user_and_token_is_welcomed_like_its_binary_twin() {
        let (t, addr) = ws_broker(|ws| ws).await;
        let user = "u".repeat(256);
        let token = "t".repeat(u16::MAX as usize);
        let mut ws = open_ws(addr).await;
        let hello =
            serde_json::json!({"type": "hello", "version": 1, "user": user, "token": token});
        ws.send(WsMessage::text(hello.to_string())).await.unwrap();
        match within("the welcome", ws.next()).await {
            Some(Ok(WsMessage::Text(text))) => {
                let welcome: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(welcome["type"], "welcome", "{welcome}");
            }
            other => panic!("expected the welcome, got {other:?}"),
        }
        assert_eq!(t.broker.stats().frames_rejected, 0);
    }
}
