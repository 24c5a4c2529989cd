//! The WebSocket transport over real sockets: the Rust client speaking binary frames
//! in binary messages, a raw client speaking the JSON form in text messages, both
//! beside TCP clients on one broker; bad input of every kind; a WebSocket the host
//! upgraded itself; one encoding per format; and the JSON examples of
//! `docs/protocol.md`, checked against the decoder and the encoder.

#![cfg(feature = "websocket")]

mod common;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::frame::{Frame, MessageKind, NoticeKind, Text};
use switchboard::transport::websocket::{self, WebSocketStream};
use switchboard::{Broker, Builder, Client, ErrorCode, Event, Notice, WebSocketTransport};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// The broker's default maximum frame size.
const MAX: usize = 1024 * 1024;

/// A broker serving in-process, TCP and WebSocket listeners.
struct WsBroker {
    t: TestBroker,
    /// The WebSocket listener's address.
    ws: SocketAddr,
}

impl WsBroker {
    async fn start() -> WsBroker {
        WsBroker::with(Broker::builder(), |transport| transport).await
    }

    /// A broker built from `builder`, its WebSocket listener set up by `listener`.
    async fn with(
        builder: Builder,
        listener: impl FnOnce(WebSocketTransport) -> WebSocketTransport,
    ) -> WsBroker {
        let t = TestBroker::with(builder).await;
        let transport = WebSocketTransport::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let ws = transport.local_addr().expect("local address");
        tokio::spawn(t.broker.serve(listener(transport)));
        WsBroker { t, ws }
    }

    /// The Rust client over a WebSocket, as `user`.
    async fn ws_client(&self, user: &str) -> Client {
        ws_client_at(self.ws, user).await
    }

    async fn tcp_client(&self, user: &str) -> Client {
        self.t.connect(Link::Tcp, user).await
    }

    async fn json_peer(&self) -> JsonPeer {
        JsonPeer::connect(self.ws).await
    }
}

/// A client-side WebSocket to `addr`, past the WebSocket handshake.
async fn open_ws(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    let stream = within("a TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let (ws, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream),
    )
    .await
    .expect("WebSocket handshake");
    ws
}

/// The Rust client over a WebSocket: binary frames in binary messages.
async fn ws_client_at(addr: SocketAddr, user: &str) -> Client {
    let connection = websocket::connection(open_ws(addr).await, "test peer");
    within(
        "the handshake",
        Client::builder(user).connect(connection.reader, connection.writer),
    )
    .await
    .unwrap_or_else(|e| panic!("{user} could not connect over WebSocket: {e}"))
}

/// What a raw WebSocket peer received.
#[derive(Debug)]
enum Got {
    /// A text message, parsed as JSON.
    Json(Value),
    /// A binary message.
    Binary(Bytes),
    /// The WebSocket close message.
    Close,
    /// The end of the connection.
    End,
}

/// A raw WebSocket peer: the JSON form written by hand, or any bytes at all.
struct JsonPeer {
    ws: WebSocketStream<TcpStream>,
}

impl JsonPeer {
    async fn connect(addr: SocketAddr) -> JsonPeer {
        JsonPeer {
            ws: open_ws(addr).await,
        }
    }

    async fn send_message(&mut self, message: WsMessage) {
        within("a WebSocket write", self.ws.send(message))
            .await
            .expect("WebSocket write");
    }

    async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    async fn send_text(&mut self, text: &str) {
        self.send_message(WsMessage::text(text)).await;
    }

    async fn send_binary(&mut self, bytes: impl Into<Bytes>) {
        self.send_message(WsMessage::binary(bytes)).await;
    }

    /// The next thing the broker sent. A reset after the close counts as the end.
    async fn next(&mut self) -> Got {
        within("a message from the broker", async {
            loop {
                return match self.ws.next().await {
                    None => Got::End,
                    Some(Ok(WsMessage::Text(text))) => Got::Json(
                        serde_json::from_str(text.as_str())
                            .unwrap_or_else(|e| panic!("the broker sent bad JSON {text}: {e}")),
                    ),
                    Some(Ok(WsMessage::Binary(bytes))) => Got::Binary(bytes),
                    Some(Ok(WsMessage::Close(_))) => Got::Close,
                    Some(Ok(_)) => continue,
                    Some(Err(tungstenite::Error::Io(_)))
                    | Some(Err(tungstenite::Error::ConnectionClosed))
                    | Some(Err(tungstenite::Error::AlreadyClosed)) => Got::End,
                    Some(Err(e)) => panic!("WebSocket read failed: {e}"),
                };
            }
        })
        .await
    }

    /// The next message, which must be JSON text.
    async fn json(&mut self) -> Value {
        match self.next().await {
            Got::Json(value) => value,
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }

    /// The next message, which must be a JSON object of `type`.
    async fn expect(&mut self, kind: &str) -> Value {
        let value = self.json().await;
        assert_eq!(value["type"], kind, "{value}");
        value
    }

    /// Sends `hello` as `user` and returns the `welcome`.
    async fn hello(&mut self, user: &str) -> Value {
        self.send(json!({"type": "hello", "version": 1, "user": user}))
            .await;
        let welcome = self.expect("welcome").await;
        assert_eq!(welcome["user"], user);
        welcome
    }

    async fn subscribe(&mut self, request: u32, session: &str) {
        self.send(json!({"type": "subscribe", "request": request, "session": session}))
            .await;
        assert_eq!(self.json().await, json!({"type": "ok", "request": request}));
    }

    /// Expects what the broker sends for bad input from a JSON peer: an `error` with
    /// `code` answering no request, a `close` with the same code, the WebSocket close,
    /// then the end.
    async fn expect_rejected(&mut self, code: u16) {
        let error = self.expect("error").await;
        assert_eq!(error["code"], code, "{error}");
        assert_eq!(error["request"], 0, "{error}");
        assert!(
            !error["reason"].as_str().unwrap_or_default().is_empty(),
            "{error}"
        );
        let close = self.expect("close").await;
        assert_eq!(close["code"], code, "{close}");
        assert_eq!(close["reason"], error["reason"], "{close}");
        self.expect_end().await;
    }

    /// Expects the same from a peer whose first message was binary: binary frames.
    async fn expect_rejected_binary(&mut self, code: ErrorCode) {
        match self.binary_frame().await {
            Frame::Error {
                request,
                code: got,
                reason,
            } => {
                assert_eq!((request, got), (0, code), "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected ERROR, got {other:?}"),
        }
        match self.binary_frame().await {
            Frame::Close { code: got, .. } => assert_eq!(got, code),
            other => panic!("expected CLOSE, got {other:?}"),
        }
        self.expect_end().await;
    }

    async fn binary_frame(&mut self) -> Frame {
        match self.next().await {
            Got::Binary(bytes) => Frame::decode_message(bytes, usize::MAX).expect("a frame"),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    /// The WebSocket close message, then the end of the connection.
    async fn expect_end(&mut self) {
        match self.next().await {
            Got::Close => {}
            other => panic!("expected the WebSocket close, got {other:?}"),
        }
        match self.next().await {
            Got::End => {}
            other => panic!("expected the end of the connection, got {other:?}"),
        }
    }
}

/// The payload of the next event, with its sender, which must be a message.
async fn next_from(client: &mut Client) -> (String, String) {
    let message = next_message(client).await;
    (
        message.sender.to_string(),
        String::from_utf8(message.payload.to_vec()).expect("UTF-8 payload"),
    )
}

// (a) The Rust client over WebSocket binary messages, beside TCP.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_and_a_tcp_client_publish_to_each_other() {
    let b = WsBroker::start().await;
    let mut web = b.ws_client("web").await;
    let mut tcp = b.tcp_client("tcp").await;
    assert_eq!(web.user(), "web");
    within("subscribe", web.subscribe("mixed")).await.unwrap();
    within("subscribe", tcp.subscribe("mixed")).await.unwrap();

    web.publish("mixed", "from the web").await.unwrap();
    assert_eq!(
        next_from(&mut tcp).await,
        ("web".into(), "from the web".into())
    );
    tcp.publish("mixed", "from tcp").await.unwrap();
    assert_eq!(next_from(&mut web).await, ("tcp".into(), "from tcp".into()));

    // Binary payloads cross unchanged in binary messages.
    let bytes = Bytes::from_static(&[0, 0xff, 0xfe, 0, 0, 0, 1, 6]);
    web.publish("mixed", bytes.clone()).await.unwrap();
    let message = next_message(&mut tcp).await;
    assert_eq!(message.payload, bytes);
    assert_eq!(message.kind, MessageKind::Session);

    // Nobody received its own publication.
    expect_quiet(&mut web).await;
    expect_quiet(&mut tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_cross_between_websocket_and_tcp_both_ways() {
    let b = WsBroker::start().await;
    let mut web = b.ws_client("web").await;
    let mut tcp = b.tcp_client("tcp").await;

    web.send_direct("tcp", "to tcp").await.unwrap();
    let message = next_message(&mut tcp).await;
    assert_eq!(message.kind, MessageKind::Direct);
    assert_eq!(&*message.sender, "web");
    assert_eq!(&message.payload[..], b"to tcp");

    tcp.send_direct("web", "to the web").await.unwrap();
    assert_eq!(
        next_from(&mut web).await,
        ("tcp".into(), "to the web".into())
    );

    // A direct message to nobody comes back as a notice over WebSocket too.
    let request = web.send_direct("nobody", "lost").await.unwrap();
    assert_eq!(
        next_event(&mut web).await,
        Event::Notice(Notice::NotDelivered {
            request,
            user: "nobody".into()
        })
    );
}

// (b) The JSON form, written by hand.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_client_handshakes_subscribes_and_receives_text() {
    let b = WsBroker::start().await;
    let mut ann = b.json_peer().await;
    let welcome = ann.hello("ann").await;
    assert_eq!(welcome["version"], 1);
    assert_eq!(welcome["heartbeat_ms"], 20_000);
    assert_eq!(welcome["max_frame"], MAX);
    assert!(welcome["connection"].as_u64().unwrap() >= 1, "{welcome}");
    ann.subscribe(1, "lobby").await;

    let tcp = b.tcp_client("bob").await;
    tcp.publish("lobby", "hi ann").await.unwrap();
    let deliver = ann.expect("deliver").await;
    assert_eq!(deliver["kind"], "session");
    assert_eq!(deliver["sender"], "bob");
    assert_eq!(deliver["target"], "lobby");
    assert_eq!(deliver["payload"], "hi ann");
    assert!(deliver.get("payload_base64").is_none(), "{deliver}");
    assert!(deliver["id"].is_u64() && deliver["sent_at_us"].is_u64());

    // A payload that is not UTF-8 arrives as base64, and nothing else changes.
    let bytes = [0xffu8, 0, 1, 0xc3];
    tcp.publish("lobby", Bytes::copy_from_slice(&bytes))
        .await
        .unwrap();
    let deliver = ann.expect("deliver").await;
    assert!(deliver.get("payload").is_none(), "{deliver}");
    let decoded = BASE64
        .decode(deliver["payload_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, bytes);

    // An empty payload is the empty string.
    tcp.publish("lobby", Bytes::new()).await.unwrap();
    assert_eq!(ann.expect("deliver").await["payload"], "");

    // The heartbeat, in JSON.
    ann.send(json!({"type": "ping"})).await;
    assert_eq!(ann.json().await, json!({"type": "pong"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_client_publishes_and_sends_direct_messages_to_tcp() {
    let b = WsBroker::start().await;
    let mut ann = b.json_peer().await;
    ann.hello("ann").await;
    let mut tcp = b.tcp_client("bob").await;
    within("subscribe", tcp.subscribe("lobby")).await.unwrap();

    // Omitted fields take their defaults: request 0.
    ann.send(json!({"type": "publish", "session": "lobby", "payload": "hello bob"}))
        .await;
    assert_eq!(
        next_from(&mut tcp).await,
        ("ann".into(), "hello bob".into())
    );
    ann.send(json!({"type": "publish", "session": "lobby", "payload_base64": "AAEC/w=="}))
        .await;
    assert_eq!(&next_message(&mut tcp).await.payload[..], &[0, 1, 2, 0xff]);

    ann.send(json!({"type": "direct", "request": 5, "user": "bob", "payload": "psst"}))
        .await;
    let message = next_message(&mut tcp).await;
    assert_eq!(message.kind, MessageKind::Direct);
    assert_eq!(&*message.sender, "ann");
    assert_eq!(&message.payload[..], b"psst");

    tcp.send_direct("ann", "back at you").await.unwrap();
    let deliver = ann.expect("deliver").await;
    assert_eq!(deliver["kind"], "direct");
    assert_eq!(deliver["target"], "ann");
    assert_eq!(deliver["payload"], "back at you");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_direct_message_to_nobody_gets_a_not_delivered_notice() {
    let b = WsBroker::start().await;
    let mut ann = b.json_peer().await;
    ann.hello("ann").await;
    ann.send(json!({"type": "direct", "request": 9, "user": "ghost", "payload": "boo"}))
        .await;
    assert_eq!(
        ann.json().await,
        json!({
            "type": "notice",
            "kind": "not_delivered",
            "request": 9,
            "count": 0,
            "subject": "ghost",
            "text": "no live connection of that user received the message",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_answer_in_json_and_the_connection_goes_on() {
    let b = WsBroker::start().await;
    let mut ann = b.json_peer().await;
    ann.hello("ann").await;
    ann.send(json!({"type": "subscribe", "request": 3, "session": ""}))
        .await;
    assert_eq!(
        ann.json().await,
        json!({"type": "error", "request": 3, "code": 100, "reason": "session id is empty"})
    );
    ann.subscribe(4, "still-here").await;
    ann.send(json!({"type": "unsubscribe", "request": 5, "session": "still-here"}))
        .await;
    assert_eq!(ann.json().await, json!({"type": "ok", "request": 5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_close_is_answered_with_a_close_and_the_end() {
    let b = WsBroker::start().await;
    let mut ann = b.json_peer().await;
    ann.hello("ann").await;
    ann.send(json!({"type": "close"})).await;
    assert_eq!(
        ann.json().await,
        json!({"type": "close", "code": 0, "reason": "closed by the client"})
    );
    ann.expect_end().await;
    b.t.wait_until_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_can_refuse_a_json_client_and_it_is_told_in_json() {
    let b = WsBroker::with(
        Broker::builder().on_connect(|info| async move {
            if info.token.as_ref() == b"letmein" {
                switchboard::Admission::Accept
            } else {
                switchboard::Admission::Refuse("bad token".into())
            }
        }),
        |transport| transport,
    )
    .await;
    let mut ann = b.json_peer().await;
    ann.send(json!({"type": "hello", "version": 1, "user": "ann", "token": "letmein"}))
        .await;
    ann.expect("welcome").await;

    let mut eve = b.json_peer().await;
    eve.send(json!({"type": "hello", "version": 1, "user": "eve", "token": "guess"}))
        .await;
    assert_eq!(
        eve.json().await,
        json!({"type": "error", "request": 0, "code": 6, "reason": "bad token"})
    );
    assert_eq!(
        eve.json().await,
        json!({"type": "close", "code": 6, "reason": "bad token"})
    );
    eve.expect_end().await;
}

// (c) Bad input: an error, a close, the end; nobody else affected.

/// A TCP client and a JSON client that must keep talking while others misbehave.
struct Bystanders {
    tcp: Client,
    json: JsonPeer,
    rounds: u32,
}

impl Bystanders {
    async fn start(b: &WsBroker) -> Bystanders {
        let tcp = b.tcp_client("steady-tcp").await;
        let mut json = b.json_peer().await;
        json.hello("steady-json").await;
        json.subscribe(1, "steady").await;
        let mut bystanders = Bystanders {
            tcp,
            json,
            rounds: 0,
        };
        bystanders.round().await;
        bystanders
    }

    /// One publication from TCP to JSON, one direct message back.
    async fn round(&mut self) {
        let text = format!("round {}", self.rounds);
        self.tcp.publish("steady", text.clone()).await.unwrap();
        let deliver = self.json.expect("deliver").await;
        assert_eq!(deliver["payload"], text.as_str());
        self.json
            .send(json!({"type": "direct", "user": "steady-tcp", "payload": text}))
            .await;
        assert_eq!(next_from(&mut self.tcp).await, ("steady-json".into(), text));
        self.rounds += 1;
    }
}

/// A JSON peer past its handshake, as `user`.
async fn greeted(b: &WsBroker, user: &str) -> JsonPeer {
    let mut peer = b.json_peer().await;
    peer.hello(user).await;
    peer
}

#[test]
fn bad_input_over_websocket_is_refused_and_nobody_else_notices() {
    // Panics are counted on this test's own runtime threads, the broker's tasks
    // included, so a failure elsewhere in this binary does not count.
    let panics = run_counting_panics(
        "ws-bad-input",
        Duration::from_secs(60),
        bad_input_over_websocket,
    );
    assert_eq!(panics, 0, "nothing panicked");
}

async fn bad_input_over_websocket() {
    // A small frame limit, and a transport limit that fits the largest binary frame.
    let max_frame = 1024;
    let b = WsBroker::with(Broker::builder().max_frame(max_frame), |transport| {
        transport.max_message(max_frame + 4)
    })
    .await;
    let mut bystanders = Bystanders::start(&b).await;
    let mut rejected = 0;
    let mut check = |b: &WsBroker| {
        rejected += 1;
        assert_eq!(b.t.broker.stats().frames_rejected, rejected);
    };

    // Invalid JSON, after the handshake.
    let mut peer = greeted(&b, "bad").await;
    peer.send_text(r#"{"type": "publish", "session": "#).await;
    peer.expect_rejected(1).await;
    check(&b);
    bystanders.round().await;

    // JSON that is not an object, and an object without its fields.
    for text in ["[1, 2, 3]", "\"hello\"", r#"{"type": "subscribe"}"#] {
        let mut peer = greeted(&b, "bad").await;
        peer.send_text(text).await;
        peer.expect_rejected(1).await;
        check(&b);
    }
    bystanders.round().await;

    // A text message over max_frame but within the transport's limit: the JSON
    // decoder refuses it.
    let mut peer = greeted(&b, "bad").await;
    let empty = json!({"type": "publish", "session": "s", "payload": ""}).to_string();
    let big = json!({"type": "publish", "session": "s", "payload": "x".repeat(max_frame + 2 - empty.len())});
    let big = big.to_string();
    assert_eq!(big.len(), max_frame + 2);
    peer.send_text(&big).await;
    peer.expect_rejected(2).await;
    check(&b);

    // A text message over the transport's limit: tungstenite refuses it from its
    // header, before buffering it.
    let mut peer = greeted(&b, "bad").await;
    let huge = json!({"type": "publish", "session": "s", "payload": "x".repeat(64 * 1024)});
    peer.send_text(&huge.to_string()).await;
    peer.expect_rejected(2).await;
    check(&b);

    // A binary message over the transport's limit, from a peer that spoke binary.
    let mut peer = b.json_peer().await;
    peer.send_binary(
        Frame::Hello {
            version: 1,
            user: "bad".into(),
            token: Bytes::new(),
        }
        .encode(),
    )
    .await;
    assert!(matches!(peer.binary_frame().await, Frame::Welcome { .. }));
    let frame = raw_frame(
        kind::PUBLISH,
        &[&[0, 0, 0, 0][..], &str16(b"s"), &vec![b'x'; max_frame]].concat(),
    );
    peer.send_binary(frame).await;
    peer.expect_rejected_binary(ErrorCode::FrameTooLarge).await;
    check(&b);
    bystanders.round().await;

    // Binary garbage, after a JSON handshake: the answer is still JSON.
    let mut peer = greeted(&b, "bad").await;
    peer.send_binary(vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x01])
        .await;
    peer.expect_rejected(2).await;
    check(&b);
    let mut peer = greeted(&b, "bad").await;
    peer.send_binary(vec![0, 0, 0, 9, 0x04, 1]).await;
    peer.expect_rejected(1).await;
    check(&b);

    // Binary garbage as the first message: the answer is binary.
    let mut peer = b.json_peer().await;
    peer.send_binary(vec![0, 0, 0, 1, 0x7f]).await;
    peer.expect_rejected_binary(ErrorCode::UnknownKind).await;
    check(&b);
    let mut peer = b.json_peer().await;
    peer.send_binary(vec![1, 2]).await;
    peer.expect_rejected_binary(ErrorCode::Truncated).await;
    check(&b);
    bystanders.round().await;

    // A first message over the transport's limit is refused before it is read, so
    // its form is unknown and the answer is binary.
    let mut peer = b.json_peer().await;
    let huge = json!({"type": "hello", "version": 1, "user": "x".repeat(4096)});
    peer.send_text(&huge.to_string()).await;
    peer.expect_rejected_binary(ErrorCode::FrameTooLarge).await;
    check(&b);

    // A text frame before the handshake.
    let mut peer = b.json_peer().await;
    peer.send(json!({"type": "publish", "session": "steady", "payload": "sneaky"}))
        .await;
    let error = peer.expect("error").await;
    assert_eq!(error["reason"], "expected HELLO, got PUBLISH");
    assert_eq!(peer.expect("close").await["code"], 4);
    peer.expect_end().await;
    check(&b);

    // A second hello, and a kind only the broker sends.
    let mut peer = greeted(&b, "bad").await;
    peer.send(json!({"type": "hello", "version": 1, "user": "bad"}))
        .await;
    peer.expect_rejected(4).await;
    check(&b);
    let mut peer = greeted(&b, "bad").await;
    peer.send(json!({"type": "ok", "request": 1})).await;
    peer.expect_rejected(3).await;
    check(&b);

    // An unsupported version, and an empty user id, in a JSON hello.
    let mut peer = b.json_peer().await;
    peer.send(json!({"type": "hello", "version": 2, "user": "bad"}))
        .await;
    peer.expect_rejected(5).await;
    check(&b);
    let mut peer = b.json_peer().await;
    peer.send(json!({"type": "hello", "version": 1, "user": ""}))
        .await;
    peer.expect_rejected(100).await;
    check(&b);

    // Both payload forms at once, and base64 that is not base64.
    let mut peer = greeted(&b, "bad").await;
    peer.send(json!({"type": "publish", "session": "s", "payload": "a", "payload_base64": "YQ=="}))
        .await;
    peer.expect_rejected(1).await;
    check(&b);
    let mut peer = greeted(&b, "bad").await;
    peer.send(json!({"type": "publish", "session": "s", "payload_base64": "not base64!"}))
        .await;
    peer.expect_rejected(1).await;
    check(&b);

    // Nothing of it reached the steady clients.
    bystanders.round().await;
    expect_quiet(&mut bystanders.tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_json_type_is_an_unknown_kind_like_an_unknown_kind_byte() {
    // The binary form answers an unknown kind byte with code 3 (UnknownKind); the JSON
    // form should answer an unknown "type" the same way.
    for unknown in [r#"{"type":"warp"}"#, r#"{"type":"Ping"}"#] {
        let error = switchboard::json::decode(unknown, MAX).unwrap_err();
        assert_eq!(error.code(), ErrorCode::UnknownKind, "{unknown}: {error}");
    }

    let b = WsBroker::start().await;
    let mut peer = greeted(&b, "bad").await;
    peer.send(json!({"type": "warp", "session": "s"})).await;
    peer.expect_rejected(3).await;
    assert_eq!(b.t.broker.stats().frames_rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_reported_with_its_real_size() {
    // tungstenite knows the size of a message it refused from its header; the reason
    // should name it rather than u64::MAX.
    let b = WsBroker::with(Broker::builder().max_frame(1024), |transport| {
        transport.max_message(1028)
    })
    .await;
    let mut peer = greeted(&b, "bad").await;
    let huge = json!({"type": "publish", "session": "s", "payload": "x".repeat(4000)});
    peer.send_text(&huge.to_string()).await;
    let error = peer.expect("error").await;
    assert_eq!(error["code"], 2);
    let reason = error["reason"].as_str().unwrap();
    assert!(
        !reason.contains(&u64::MAX.to_string()),
        "the reason names a size nobody sent: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_at_the_size_limit_pass_in_both_forms() {
    let max_frame = 1024;
    let b = WsBroker::with(Broker::builder().max_frame(max_frame), |transport| {
        transport.max_message(max_frame + 4)
    })
    .await;
    let mut tcp = b.tcp_client("tcp").await;
    within("subscribe", tcp.subscribe("s")).await.unwrap();

    // A text message of exactly max_frame bytes.
    let mut ann = greeted(&b, "ann").await;
    let empty = json!({"type": "publish", "session": "s", "payload": ""}).to_string();
    let padding = "x".repeat(max_frame - empty.len());
    let text = json!({"type": "publish", "session": "s", "payload": padding}).to_string();
    assert_eq!(text.len(), max_frame);
    ann.send_text(&text).await;
    assert_eq!(next_message(&mut tcp).await.payload.len(), padding.len());

    // A binary frame whose length is exactly max_frame: a message of max_frame + 4.
    let web = b.ws_client("web").await;
    let payload = vec![7u8; max_frame - 1 - 4 - 2 - 1];
    let frame = Frame::Publish {
        request: 0,
        session: "s".into(),
        payload: payload.clone().into(),
    };
    assert_eq!(frame.encoded_len(), max_frame + 4);
    web.publish("s", payload.clone()).await.unwrap();
    assert_eq!(next_message(&mut tcp).await.payload, payload);
    assert_eq!(b.t.broker.stats().frames_rejected, 0);
}

// (d) A WebSocket the host upgraded itself.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_the_host_upgraded_is_a_connection_like_any_other() {
    let b = WsBroker::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = b.t.broker.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            // The host's own server did the upgrade; the broker gets the WebSocket.
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                continue;
            };
            broker.accept(websocket::connection(ws, peer.to_string()));
        }
    });

    let mut json_peer = JsonPeer::connect(addr).await;
    json_peer.hello("hosted-json").await;
    json_peer.subscribe(1, "hosted").await;
    let mut binary = ws_client_at(addr, "hosted-binary").await;
    within("subscribe", binary.subscribe("hosted"))
        .await
        .unwrap();
    let mut tcp = b.tcp_client("tcp").await;

    tcp.publish("hosted", "to both").await.unwrap();
    assert_eq!(json_peer.expect("deliver").await["payload"], "to both");
    assert_eq!(
        next_from(&mut binary).await,
        ("tcp".into(), "to both".into())
    );

    json_peer
        .send(json!({"type": "publish", "session": "hosted", "payload": "from json"}))
        .await;
    assert_eq!(
        next_from(&mut binary).await,
        ("hosted-json".into(), "from json".into())
    );
    assert_eq!(b.t.broker.stats().connections, 3);

    // Bad input on a hosted WebSocket is handled as on any other.
    json_peer.send_text("nope").await;
    json_peer.expect_rejected(1).await;
    binary.send_direct("tcp", "still fine").await.unwrap();
    assert_eq!(
        next_from(&mut tcp).await,
        ("hosted-binary".into(), "still fine".into())
    );
}

// (e) One encoding per format.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_json_and_binary_members_gets_one_message_in_both_forms() {
    let b = WsBroker::start().await;
    let mut json_member = greeted(&b, "j").await;
    json_member.subscribe(1, "both").await;
    let mut ws_member = b.ws_client("w").await;
    within("subscribe", ws_member.subscribe("both"))
        .await
        .unwrap();
    let mut tcp_member = b.tcp_client("t").await;
    within("subscribe", tcp_member.subscribe("both"))
        .await
        .unwrap();
    let publisher = b.tcp_client("p").await;

    for payload in [Bytes::from_static(b"same"), Bytes::from_static(&[0x80, 1])] {
        publisher.publish("both", payload.clone()).await.unwrap();
        let deliver = json_member.expect("deliver").await;
        let in_json = match switchboard::json::decode(&deliver.to_string(), MAX).unwrap() {
            Frame::Deliver {
                id,
                sent_at_us,
                sender,
                target,
                payload,
                ..
            } => (
                id,
                sent_at_us,
                sender.to_string(),
                target.to_string(),
                payload,
            ),
            other => panic!("{other:?}"),
        };
        for member in [&mut ws_member, &mut tcp_member] {
            let m = next_message(member).await;
            let micros = m
                .sent_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64;
            let in_binary = (
                m.id,
                micros,
                m.sender.to_string(),
                m.target.id().to_string(),
                m.payload,
            );
            assert_eq!(in_binary, in_json);
        }
        assert_eq!(in_json.4, payload);
    }

    // And from a JSON publisher to the binary members.
    json_member
        .send(json!({"type": "publish", "session": "both", "payload": "from j"}))
        .await;
    for member in [&mut ws_member, &mut tcp_member] {
        assert_eq!(next_from(member).await, ("j".into(), "from j".into()));
    }
    let stats = b.t.broker.stats();
    assert_eq!(stats.messages_received, 3);
    assert_eq!(stats.messages_delivered, 3 + 3 + 2);
}

// docs/protocol.md: the JSON examples.

const PROTOCOL_MD: &str = include_str!("../docs/protocol.md");

/// The JSON examples of docs/protocol.md, in order, each with the frame it shows.
fn json_examples() -> Vec<(Frame, &'static str)> {
    vec![
        (
            Frame::Hello {
                version: 1,
                user: "alice".into(),
                token: Bytes::from_static(b"tk"),
            },
            r#"{"type":"hello","version":1,"user":"alice","token":"tk"}"#,
        ),
        (
            Frame::Welcome {
                version: 1,
                connection: 7,
                user: "alice".into(),
                heartbeat_ms: 20_000,
                max_frame: 1_048_576,
            },
            r#"{"type":"welcome","version":1,"connection":7,"user":"alice","heartbeat_ms":20000,"max_frame":1048576}"#,
        ),
        (
            Frame::Subscribe {
                request: 1,
                session: "lobby".into(),
            },
            r#"{"type":"subscribe","request":1,"session":"lobby"}"#,
        ),
        (Frame::Ok { request: 1 }, r#"{"type":"ok","request":1}"#),
        (
            Frame::Publish {
                request: 0,
                session: "lobby".into(),
                payload: Bytes::from_static(b"hi"),
            },
            r#"{"type":"publish","session":"lobby","payload":"hi"}"#,
        ),
        (
            Frame::Deliver {
                id: 1,
                kind: MessageKind::Session,
                sent_at_us: 1_700_000_000_000_000,
                sender: "bob".into(),
                target: "lobby".into(),
                payload: Bytes::from_static(b"hi"),
            },
            r#"{"type":"deliver","id":1,"kind":"session","sent_at_us":1700000000000000,"sender":"bob","target":"lobby","payload":"hi"}"#,
        ),
        (
            Frame::Direct {
                request: 2,
                user: "carol".into(),
                payload: Bytes::from_static(&[0, 1, 2, 0xff]),
            },
            r#"{"type":"direct","request":2,"user":"carol","payload_base64":"AAEC/w=="}"#,
        ),
        (
            Frame::Notice {
                kind: NoticeKind::NotDelivered,
                request: 2,
                count: 0,
                subject: "carol".into(),
                text: "no live connection of that user received the message".into(),
            },
            r#"{"type":"notice","kind":"not_delivered","request":2,"count":0,"subject":"carol","text":"no live connection of that user received the message"}"#,
        ),
        (
            Frame::Deliver {
                id: 4,
                kind: MessageKind::Direct,
                sent_at_us: 1_700_000_000_250_000,
                sender: "bob".into(),
                target: "alice".into(),
                payload: Bytes::from_static(&[0, 1, 2, 0xff]),
            },
            r#"{"type":"deliver","id":4,"kind":"direct","sent_at_us":1700000000250000,"sender":"bob","target":"alice","payload_base64":"AAEC/w=="}"#,
        ),
        (Frame::Ping, r#"{"type":"ping"}"#),
        (Frame::Pong, r#"{"type":"pong"}"#),
        (
            Frame::Subscribe {
                request: 3,
                session: "".into(),
            },
            r#"{"type":"subscribe","request":3,"session":""}"#,
        ),
        (
            Frame::Error {
                request: 3,
                code: ErrorCode::InvalidId,
                reason: "session id is empty".into(),
            },
            r#"{"type":"error","request":3,"code":100,"reason":"session id is empty"}"#,
        ),
        (
            Frame::Close {
                code: ErrorCode::Normal,
                reason: Text::default(),
            },
            r#"{"type":"close"}"#,
        ),
        (
            Frame::Close {
                code: ErrorCode::Normal,
                reason: "closed by the client".into(),
            },
            r#"{"type":"close","code":0,"reason":"closed by the client"}"#,
        ),
        (
            Frame::Error {
                request: 0,
                code: ErrorCode::Malformed,
                reason:
                    "malformed JSON frame: not a JSON object of a known frame type with its fields"
                        .into(),
            },
            r#"{"type":"error","request":0,"code":1,"reason":"malformed JSON frame: not a JSON object of a known frame type with its fields"}"#,
        ),
        (
            Frame::Close {
                code: ErrorCode::Malformed,
                reason:
                    "malformed JSON frame: not a JSON object of a known frame type with its fields"
                        .into(),
            },
            r#"{"type":"close","code":1,"reason":"malformed JSON frame: not a JSON object of a known frame type with its fields"}"#,
        ),
    ]
}

/// Frames only the broker sends: the document shows them exactly as it writes them.
fn sent_by_the_broker(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Welcome { .. }
            | Frame::Ok { .. }
            | Frame::Error { .. }
            | Frame::Deliver { .. }
            | Frame::Notice { .. }
    )
}

/// The lines of every ```json block in the document.
fn json_blocks(doc: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        match (inside, line.trim()) {
            (false, "```json") => inside = true,
            (true, "```") => inside = false,
            (true, "") => {}
            (true, text) => lines.push(text.to_string()),
            (false, _) => {}
        }
    }
    lines
}

#[test]
fn the_json_examples_decode_to_their_frames() {
    for (frame, text) in json_examples() {
        assert_eq!(
            switchboard::json::decode(text, MAX).unwrap(),
            frame,
            "{text}"
        );
        // What the broker writes is exactly what the document shows; what a client
        // writes may leave out fields that have defaults.
        let encoded: Value = serde_json::from_slice(&switchboard::json::encode(&frame)).unwrap();
        let shown: Value = serde_json::from_str(text).unwrap();
        if sent_by_the_broker(&frame) {
            assert_eq!(encoded, shown, "{text}");
        }
        assert_eq!(
            switchboard::json::decode(&encoded.to_string(), MAX).unwrap(),
            frame
        );
    }
}

#[test]
fn the_document_shows_exactly_the_checked_json_examples() {
    let documented = json_blocks(PROTOCOL_MD);
    let checked: Vec<String> = json_examples()
        .iter()
        .map(|(_, text)| text.to_string())
        .collect();
    assert_eq!(
        documented, checked,
        "the ```json blocks of docs/protocol.md"
    );
}

#[test]
fn the_json_example_of_bad_input_is_what_the_decoder_says() {
    let error = switchboard::json::decode(r#"{"type":"subscribe","session":"#, MAX).unwrap_err();
    assert_eq!(error.code(), ErrorCode::Malformed);
    assert_eq!(
        error.to_string(),
        "malformed JSON frame: not a JSON object of a known frame type with its fields"
    );
}

#[test]
fn the_json_type_names_are_the_frame_names_in_snake_case() {
    for (frame, text) in json_examples() {
        let shown: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            shown["type"].as_str().unwrap(),
            frame.name().to_ascii_lowercase()
        );
    }
}

#[test]
fn the_json_rules_of_the_document_hold() {
    let decode = |text: &str| switchboard::json::decode(text, MAX);
    let malformed = |text: &str| {
        let error = decode(text).expect_err(text);
        assert_eq!(error.code(), ErrorCode::Malformed, "{text}: {error}");
    };

    // Defaults, key order, and keys a frame does not have.
    assert_eq!(
        decode(r#"{"session":"s","type":"subscribe","colour":"blue"}"#).unwrap(),
        Frame::Subscribe {
            request: 0,
            session: "s".into()
        }
    );
    assert_eq!(
        decode(r#"{"type":"hello","version":1,"user":"u"}"#).unwrap(),
        Frame::Hello {
            version: 1,
            user: "u".into(),
            token: Bytes::new()
        }
    );
    assert_eq!(
        decode(r#"{"type":"close","code":4242}"#).unwrap(),
        Frame::Close {
            code: ErrorCode::Other(4242),
            reason: Text::default()
        }
    );
    for empty in [
        r#"{"type":"publish","session":"s"}"#,
        r#"{"type":"publish","session":"s","payload":null}"#,
        r#"{"type":"publish","session":"s","payload":""}"#,
    ] {
        assert_eq!(
            decode(empty).unwrap(),
            Frame::Publish {
                request: 0,
                session: "s".into(),
                payload: Bytes::new()
            }
        );
    }

    // Keys twice, numbers that are not integers of the field's range, a missing type.
    malformed(r#"{"type":"subscribe","session":"a","session":"b"}"#);
    malformed(r#"{"type":"ping","type":"pong"}"#);
    for request in ["1.0", "1e0", "-1", "\"1\"", "null", "4294967296"] {
        malformed(&format!(
            r#"{{"type":"subscribe","request":{request},"session":"s"}}"#
        ));
    }
    malformed(r#"{"type":"hello","version":256,"user":"u"}"#);
    malformed(r#"{"session":"s"}"#);
    malformed(r#"{"type":7}"#);
    malformed(r#"{"type":"ping"}{"type":"ping"}"#);

    // Payloads: both forms at once, base64 without its padding.
    malformed(r#"{"type":"publish","session":"s","payload":"a","payload_base64":"YQ=="}"#);
    malformed(r#"{"type":"publish","session":"s","payload_base64":"YQ"}"#);

    // Strings: 65,535 bytes at most once UTF-8.
    let at = format!(
        r#"{{"type":"subscribe","session":"{}"}}"#,
        "é".repeat(65_534 / 2)
    );
    assert!(decode(&at).is_ok());
    malformed(&format!(
        r#"{{"type":"subscribe","session":"{}"}}"#,
        "é".repeat(65_536 / 2)
    ));

    // A text message of max_frame bytes passes, one more byte does not.
    let ping = r#"{"type":"ping"}"#;
    assert_eq!(
        switchboard::json::decode(ping, ping.len()).unwrap(),
        Frame::Ping
    );
    assert_eq!(
        switchboard::json::decode(ping, ping.len() - 1)
            .unwrap_err()
            .code(),
        ErrorCode::FrameTooLarge
    );
}
