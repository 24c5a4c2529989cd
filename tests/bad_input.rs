//! Bad input over real sockets: each kind of broken or hostile traffic gets an `ERROR`
//! frame with the right code, then a `CLOSE`, then the end of the stream, and is
//! counted. Meanwhile two well-behaved clients on the same broker keep sending and
//! receiving, before, during and after.

#[macro_use]
mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use switchboard::frame::Frame;
use switchboard::{Broker, BrokerError, Client, ClientError, ErrorCode, ErrorInfo};
use tokio::sync::mpsc;

/// Two clients exchanging a publication and a direct message, round after round, on a
/// task of their own until told to stop.
struct Bystanders {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u32>,
}

impl Bystanders {
    async fn start(t: &TestBroker) -> Bystanders {
        let mut alice = t.connect(Link::Tcp, "alice").await;
        let mut bob = t.connect(Link::Tcp, "bob").await;
        within("subscribe", bob.subscribe("room")).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0;
            // At least one round, and always one more after being told to stop, so
            // that the last round happens after the bad connection is gone.
            loop {
                let last = stopping.load(Ordering::Acquire);
                alice
                    .publish("room", format!("round {rounds}"))
                    .await
                    .unwrap();
                assert_eq!(next_payload(&mut bob).await, format!("round {rounds}"));
                bob.send_direct("alice", format!("reply {rounds}"))
                    .await
                    .unwrap();
                assert_eq!(next_payload(&mut alice).await, format!("reply {rounds}"));
                rounds += 1;
                if last {
                    return rounds;
                }
            }
        });
        Bystanders { stop, task }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Release);
        let rounds = within("the bystanders", self.task).await.unwrap();
        assert!(rounds >= 1);
    }
}

/// What a misbehaving peer does.
struct Case {
    /// Whether it completes a handshake (as "bad") first.
    handshake: bool,
    /// The bytes it sends.
    bytes: Vec<u8>,
    /// Whether it then ends its side of the stream.
    eof: bool,
    /// The code the broker must answer with.
    code: ErrorCode,
}

/// Runs one case against a fresh broker with bystanders, and checks the answer, the
/// counters and the `on_error` hook.
async fn check(case: Case) {
    count_panics();
    let (tx, mut errors) = mpsc::unbounded_channel::<ErrorInfo>();
    let builder = Broker::builder().on_error(move |info| {
        let _ = tx.send(info.clone());
    });
    let t = TestBroker::with(builder).await;
    let bystanders = Bystanders::start(&t).await;

    let mut raw = t.raw_tcp().await;
    if case.handshake {
        raw.handshake("bad").await;
    }
    raw.send(&case.bytes).await;
    if case.eof {
        raw.shutdown_write().await;
    }
    raw.expect_rejected(case.code).await;
    bystanders.finish().await;

    let info = within("on_error", errors.recv()).await.unwrap();
    assert_eq!(info.code, case.code);
    assert!(!info.detail.is_empty());
    if case.handshake {
        assert_eq!(info.user.as_deref(), Some("bad"));
        assert!(info.connection.is_some());
    }
    let stats = t.broker.stats();
    assert_eq!(stats.frames_rejected, 1, "{stats}");
    assert_eq!(stats.slow_consumers, 0);
    let broker = t.broker.clone();
    wait_until("the bad connection's cleanup", move || {
        broker.stats().connections == 2
    })
    .await;
    assert_eq!(t.broker.session("room").unwrap().members.len(), 1);
    assert_eq!(count_panics(), 0, "nothing panicked in this binary");
}

#[tokio::test]
async fn an_http_request_instead_of_hello_is_refused_as_too_large() {
    // "GET " read as a length is over a gigabyte.
    check(Case {
        handshake: false,
        bytes: b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        eof: false,
        code: ErrorCode::FrameTooLarge,
    })
    .await;
}

#[tokio::test]
async fn a_length_prefix_of_u32_max_before_hello_is_refused() {
    check(Case {
        handshake: false,
        bytes: u32::MAX.to_be_bytes().to_vec(),
        eof: false,
        code: ErrorCode::FrameTooLarge,
    })
    .await;
}

#[tokio::test]
async fn a_length_prefix_of_u32_max_after_hello_is_refused() {
    let mut bytes = u32::MAX.to_be_bytes().to_vec();
    bytes.push(kind::PUBLISH);
    check(Case {
        handshake: true,
        bytes,
        eof: false,
        code: ErrorCode::FrameTooLarge,
    })
    .await;
}

#[tokio::test]
async fn a_truncated_hello_then_eof_is_reported_as_truncated() {
    let hello = raw_hello(b"alice");
    check(Case {
        handshake: false,
        bytes: hello[..hello.len() - 3].to_vec(),
        eof: true,
        code: ErrorCode::Truncated,
    })
    .await;
}

#[tokio::test]
async fn a_truncated_frame_then_eof_is_reported_as_truncated() {
    let publish = raw_publish(b"room", &[7; 100]);
    check(Case {
        handshake: true,
        bytes: publish[..20].to_vec(),
        eof: true,
        code: ErrorCode::Truncated,
    })
    .await;
}

#[tokio::test]
async fn an_unknown_kind_before_hello_is_refused() {
    check(Case {
        handshake: false,
        bytes: raw_frame(0x7f, b"whatever"),
        eof: false,
        code: ErrorCode::UnknownKind,
    })
    .await;
}

#[tokio::test]
async fn an_unknown_kind_after_hello_is_refused() {
    check(Case {
        handshake: true,
        bytes: raw_frame(0x42, b""),
        eof: false,
        code: ErrorCode::UnknownKind,
    })
    .await;
}

#[tokio::test]
async fn a_publish_before_hello_requires_the_handshake() {
    check(Case {
        handshake: false,
        bytes: raw_publish(b"room", b"too early"),
        eof: false,
        code: ErrorCode::HandshakeRequired,
    })
    .await;
}

#[tokio::test]
async fn a_second_hello_is_refused() {
    check(Case {
        handshake: true,
        bytes: raw_hello(b"someone-else"),
        eof: false,
        code: ErrorCode::HandshakeRequired,
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_in_the_user_id_is_malformed() {
    check(Case {
        handshake: false,
        bytes: raw_hello(b"al\xffice"),
        eof: false,
        code: ErrorCode::Malformed,
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_in_a_session_id_is_malformed() {
    check(Case {
        handshake: true,
        bytes: raw_subscribe(1, b"ro\xc3\x28om"),
        eof: false,
        code: ErrorCode::Malformed,
    })
    .await;
}

#[tokio::test]
async fn a_deliver_frame_from_a_client_is_refused() {
    // A well-formed DELIVER, which only the broker may send: it would let a client
    // name any sender.
    let mut body = 1u64.to_be_bytes().to_vec();
    body.push(1); // a session message
    body.extend(0u64.to_be_bytes());
    body.extend(str16(b"admin"));
    body.extend(str16(b"room"));
    body.extend_from_slice(b"forged");
    check(Case {
        handshake: true,
        bytes: raw_frame(kind::DELIVER, &body),
        eof: false,
        code: ErrorCode::UnknownKind,
    })
    .await;
}

#[tokio::test]
async fn a_deliver_frame_before_hello_requires_the_handshake() {
    let mut body = 1u64.to_be_bytes().to_vec();
    body.push(1);
    body.extend(0u64.to_be_bytes());
    body.extend(str16(b"admin"));
    body.extend(str16(b"room"));
    check(Case {
        handshake: false,
        bytes: raw_frame(kind::DELIVER, &body),
        eof: false,
        code: ErrorCode::HandshakeRequired,
    })
    .await;
}

#[tokio::test]
async fn a_zero_length_frame_is_malformed() {
    check(Case {
        handshake: true,
        bytes: vec![0, 0, 0, 0],
        eof: false,
        code: ErrorCode::Malformed,
    })
    .await;
}

#[tokio::test]
async fn a_body_shorter_than_its_fields_is_malformed() {
    // A PUBLISH whose session id claims 65,535 bytes and has 3.
    let mut body = 0u32.to_be_bytes().to_vec();
    body.extend([0xff, 0xff, b'a', b'b', b'c']);
    check(Case {
        handshake: true,
        bytes: raw_frame(kind::PUBLISH, &body),
        eof: false,
        code: ErrorCode::Malformed,
    })
    .await;
}

#[tokio::test]
async fn bytes_left_over_after_the_fields_are_malformed() {
    check(Case {
        handshake: true,
        bytes: raw_frame(kind::PING, b"extra"),
        eof: false,
        code: ErrorCode::Malformed,
    })
    .await;
}

#[tokio::test]
async fn an_unsupported_protocol_version_is_refused() {
    check(Case {
        handshake: false,
        bytes: raw_hello_version(99, b"alice"),
        eof: false,
        code: ErrorCode::UnsupportedVersion,
    })
    .await;
}

#[tokio::test]
async fn an_empty_user_id_is_refused() {
    check(Case {
        handshake: false,
        bytes: raw_hello(b""),
        eof: false,
        code: ErrorCode::InvalidId,
    })
    .await;
}

/// A bad request (rather than bad bytes) costs only that request: the answer names it
/// and the connection goes on.
#[tokio::test]
async fn an_invalid_request_is_refused_and_the_connection_goes_on() {
    let t = TestBroker::start().await;
    let mut raw = t.raw_tcp().await;
    raw.handshake("careless").await;
    raw.send(&raw_subscribe(5, b"")).await;
    match raw.frame().await {
        Some(Frame::Error { request, code, .. }) => {
            assert_eq!(request, 5);
            assert_eq!(code, ErrorCode::InvalidId);
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    raw.send(&raw_subscribe(6, b"room")).await;
    assert_eq!(raw.frame().await, Some(Frame::Ok { request: 6 }));
    raw.send(&raw_frame(kind::PING, b"")).await;
    assert_eq!(raw.frame().await, Some(Frame::Pong));
    assert_eq!(t.broker.stats().frames_rejected, 0);
    assert_eq!(t.broker.stats().connections, 1);
}

/// Many tiny frames in one write are each answered; nobody else notices.
#[tokio::test]
async fn a_flood_of_small_frames_is_served_in_order() {
    const PINGS: usize = 20_000;
    let t = TestBroker::start().await;
    let bystanders = Bystanders::start(&t).await;
    let mut raw = t.raw_tcp().await;
    raw.handshake("flooder").await;
    let flood = raw_frame(kind::PING, b"").repeat(PINGS);
    let (mut read, mut write) = raw.stream.into_split();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        write.write_all(&flood).await.unwrap();
        write
    });
    let mut buf = Vec::new();
    within("every PONG", async {
        use tokio::io::AsyncReadExt;
        while buf.len() < PINGS * 5 {
            let mut chunk = [0u8; 16 * 1024];
            let n = read.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the broker closed the flooder");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert_eq!(buf, raw_frame(0x07, b"").repeat(PINGS), "one PONG per PING");
    within("the flood", writer).await.unwrap();
    bystanders.finish().await;
    assert_eq!(t.broker.stats().frames_rejected, 0);
}

// ---------------------------------------------------------------------------------
// The maximum frame size: a frame of exactly the limit is accepted, one byte more is
// refused.

const MAX_FRAME: usize = 1024;

/// The payload that makes a PUBLISH to "room" exactly `MAX_FRAME` bytes long (kind
/// byte, request id, session id and payload; the length prefix is not counted).
const FITTING_PAYLOAD: usize = MAX_FRAME - 1 - 4 - 2 - "room".len();

#[tokio::test]
async fn a_frame_of_exactly_max_frame_is_accepted_and_one_byte_more_refused() {
    let t = TestBroker::with(Broker::builder().max_frame(MAX_FRAME)).await;
    let mut alice = t.connect(Link::Tcp, "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    let mut raw = t.raw_tcp().await;
    raw.handshake("edge").await;
    let at_limit = raw_publish(b"room", &[b'x'; FITTING_PAYLOAD]);
    assert_eq!(at_limit.len(), 4 + MAX_FRAME);
    raw.send(&at_limit).await;
    let message = next_message(&mut alice).await;
    assert_eq!(message.payload.len(), FITTING_PAYLOAD);
    assert_eq!(&*message.sender, "edge");

    let past_limit = raw_publish(b"room", &[b'x'; FITTING_PAYLOAD + 1]);
    raw.send(&past_limit).await;
    raw.expect_rejected(ErrorCode::FrameTooLarge).await;
    assert_eq!(t.broker.stats().frames_rejected, 1);
    expect_quiet(&mut alice).await;
}

async fn the_client_checks_max_frame_before_sending(link: Link) {
    let t = TestBroker::with(Broker::builder().max_frame(MAX_FRAME)).await;
    let mut alice = t.connect(link, "alice").await;
    let bob = t.connect(link.other(), "bob").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    bob.publish("room", vec![b'x'; FITTING_PAYLOAD])
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut alice).await.payload.len(),
        FITTING_PAYLOAD
    );
    match bob.publish("room", vec![b'x'; FITTING_PAYLOAD + 1]).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::FrameTooLarge),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // Refused before it left, so the connection is fine.
    bob.publish("room", "small").await.unwrap();
    assert_eq!(next_payload(&mut alice).await, "small");
    assert_eq!(t.broker.stats().frames_rejected, 0);

    // The host's pushes hold their payloads to the same size.
    let too_large = BrokerError::TooLarge {
        size: MAX_FRAME + 1,
        max: MAX_FRAME,
    };
    let payload = vec![b'x'; MAX_FRAME + 1];
    assert_eq!(
        t.broker.publish("room", payload.clone()).await,
        Err(too_large.clone())
    );
    assert_eq!(t.broker.send_to("alice", payload).await, Err(too_large));
    t.broker
        .publish("room", vec![b'x'; MAX_FRAME])
        .await
        .unwrap();
    assert_eq!(next_message(&mut alice).await.payload.len(), MAX_FRAME);
}

over_both_links!(the_client_checks_max_frame_before_sending);

#[tokio::test]
async fn an_oversized_frame_over_the_in_process_link_is_refused() {
    let t = TestBroker::with(Broker::builder().max_frame(MAX_FRAME)).await;
    let mut alice = t.connect(Link::Memory, "alice").await;
    within("subscribe", alice.subscribe("room")).await.unwrap();

    let mut raw = t.raw_memory().await;
    raw.handshake("edge").await;
    raw.send(raw_publish(b"room", &[b'x'; FITTING_PAYLOAD]))
        .await;
    assert_eq!(
        next_message(&mut alice).await.payload.len(),
        FITTING_PAYLOAD
    );
    raw.send(raw_publish(b"room", &[b'x'; FITTING_PAYLOAD + 1]))
        .await;
    match raw.frame().await {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::FrameTooLarge),
        other => panic!("expected ERROR, got {other:?}"),
    }
    match raw.frame().await {
        Some(Frame::Close { code, .. }) => assert_eq!(code, ErrorCode::FrameTooLarge),
        other => panic!("expected CLOSE, got {other:?}"),
    }
    assert_eq!(raw.frame().await, None);
    assert_eq!(t.broker.stats().frames_rejected, 1);
}

#[tokio::test]
async fn a_message_whose_prefix_disagrees_with_its_size_is_malformed() {
    let t = TestBroker::start().await;
    let mut raw = t.raw_memory().await;
    raw.handshake("liar").await;
    let mut frame = raw_frame(kind::PING, b"");
    frame.extend_from_slice(b"tail");
    raw.send(frame).await;
    match raw.frame().await {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert!(matches!(raw.frame().await, Some(Frame::Close { .. })));
    assert_eq!(raw.frame().await, None);
    assert_eq!(t.broker.stats().frames_rejected, 1);

    // The broker serves the next connection as if nothing happened.
    let client = t.connect(Link::Memory, "fine").await;
    within("subscribe", client.subscribe("room")).await.unwrap();
}

#[tokio::test]
async fn refused_clients_see_the_reason() {
    let t = TestBroker::start().await;
    let long = "x".repeat(t.broker.config().max_id_len + 1);
    match t.try_connect(Link::Tcp, Client::builder(long)).await {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::InvalidId);
            assert!(
                reason.contains("257"),
                "the reason gives the length: {reason}"
            );
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("an over-long user id was accepted"),
    }
}
