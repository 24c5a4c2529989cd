//! Helpers shared by the integration tests: a broker listening on both built-in
//! transports, clients on either, bounded waits, and raw peers that speak the wire
//! protocol byte by byte.
//!
//! Every wait here is bounded, so a bug shows up as a failed test rather than a hung
//! one.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::frame::{Frame, PROTOCOL_VERSION};
use switchboard::transport::{FrameReader, FrameWriter, MemoryReader, MemoryWriter};
use switchboard::{
    Broker, Builder, Client, ClientBuilder, ClientError, ErrorCode, Event, MemoryConnector,
    MemoryTransport, Message, TcpTransport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single step may take before the test fails. Generous, since a debug
/// build on a loaded machine is slow; nothing waits this long when the code works.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long a connection must stay silent to count as "nothing more arrived".
pub const QUIET: Duration = Duration::from_millis(150);

/// Which built-in transport a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The in-process transport.
    Memory,
    /// Loopback TCP.
    Tcp,
}

impl Link {
    /// The other transport, for scenarios that mix them.
    pub fn other(self) -> Link {
        match self {
            Link::Memory => Link::Tcp,
            Link::Tcp => Link::Memory,
        }
    }
}

/// Generates `mod $name { memory, tcp }`: two tests running `async fn $name(Link)`
/// once over each transport. A function and a module may share a name, so the tests
/// show up as `$name::memory` and `$name::tcp`. Test files declare `#[macro_use] mod
/// common;` to use it.
#[allow(unused_macros)]
macro_rules! over_both_links {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name($crate::common::Link::Memory).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tcp() {
                    super::$name($crate::common::Link::Tcp).await
                }
            }
        )*
    };
}

/// A broker serving an in-process transport and a TCP listener on 127.0.0.1:0.
pub struct TestBroker {
    pub broker: Broker,
    pub connector: MemoryConnector,
    pub addr: SocketAddr,
}

impl TestBroker {
    /// A broker with default settings.
    pub async fn start() -> TestBroker {
        TestBroker::with(Broker::builder()).await
    }

    /// A broker built from `builder`, serving both transports.
    pub async fn with(builder: Builder) -> TestBroker {
        let broker = builder.build();
        let (memory, connector) = MemoryTransport::new();
        tokio::spawn(broker.serve(memory));
        let tcp = TcpTransport::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = tcp.local_addr().expect("local address");
        tokio::spawn(broker.serve(tcp));
        TestBroker {
            broker,
            connector,
            addr,
        }
    }

    /// Connects `user` over `link`, failing the test if the broker refuses.
    pub async fn connect(&self, link: Link, user: &str) -> Client {
        match self.try_connect(link, Client::builder(user)).await {
            Ok(client) => client,
            Err(e) => panic!("{user} could not connect over {link:?}: {e}"),
        }
    }

    /// Connects with `builder` over `link`; the handshake's outcome as it is.
    pub async fn try_connect(
        &self,
        link: Link,
        builder: ClientBuilder,
    ) -> Result<Client, ClientError> {
        let connecting = async {
            match link {
                Link::Memory => builder.connect_memory(&self.connector).await,
                Link::Tcp => builder.connect_tcp(self.addr).await,
            }
        };
        within("the handshake", connecting).await
    }

    /// A raw TCP peer, not yet past the handshake.
    pub async fn raw_tcp(&self) -> RawTcp {
        let stream = within("a TCP connect", TcpStream::connect(self.addr))
            .await
            .expect("connect to the broker");
        RawTcp {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// A raw in-process peer, not yet past the handshake.
    pub async fn raw_memory(&self) -> RawMemory {
        RawMemory::connect(&self.connector).await
    }

    /// Waits until the broker's gauges show nobody: no connection, no user, no session.
    pub async fn wait_until_empty(&self) {
        let broker = self.broker.clone();
        wait_until(
            "the broker holds no connection, user or session",
            move || {
                let stats = broker.stats();
                stats.connections == 0 && stats.users == 0 && stats.sessions == 0
            },
        )
        .await;
    }
}

/// A broker serving only an in-process transport: what tests on paused time use, since
/// no socket is involved.
pub fn memory_broker(builder: Builder) -> (Broker, MemoryConnector) {
    let broker = builder.build();
    let (memory, connector) = MemoryTransport::new();
    tokio::spawn(broker.serve(memory));
    (broker, connector)
}

/// Awaits `fut`, failing the test after [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Polls `done` every few milliseconds until it holds, failing the test after [`WAIT`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// The next event, failing the test if none arrives within [`WAIT`] or the stream
/// ended.
pub async fn next_event(events: &mut (impl Stream<Item = Event> + Unpin)) -> Event {
    match within("the next event", events.next()).await {
        Some(event) => event,
        None => panic!("the event stream ended"),
    }
}

/// The next event, which must be a message.
pub async fn next_message(events: &mut (impl Stream<Item = Event> + Unpin)) -> Message {
    match next_event(events).await {
        Event::Message(message) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The payload of the next event, which must be a message.
pub async fn next_payload(events: &mut (impl Stream<Item = Event> + Unpin)) -> String {
    let message = next_message(events).await;
    String::from_utf8(message.payload.to_vec()).expect("test payloads are UTF-8")
}

/// Fails the test if an event arrives within [`QUIET`].
pub async fn expect_quiet(events: &mut (impl Stream<Item = Event> + Unpin)) {
    if let Ok(event) = tokio::time::timeout(QUIET, events.next()).await {
        panic!("expected nothing more, got {event:?}");
    }
}

/// Reads events until the connection's `Closed` event and returns its code and reason,
/// failing on anything but messages and notices before it.
pub async fn closed(events: &mut (impl Stream<Item = Event> + Unpin)) -> (ErrorCode, String) {
    loop {
        match next_event(events).await {
            Event::Closed { code, reason } => return (code, reason),
            Event::Message(_) | Event::Notice(_) => {}
        }
    }
}

/// Panics seen anywhere in this test binary since [`count_panics`] was first called.
static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Starts counting panics on every thread, the broker's tasks included (the runtime
/// catches those, so they would otherwise pass unnoticed), and returns the count so
/// far. Only for test binaries in which nothing is meant to panic.
pub fn count_panics() -> usize {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            default(info);
        }));
    });
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs `test` on its own multi-threaded runtime and fails it after `limit`. Unlike a
/// timeout inside `#[tokio::test]`, this also fails, instead of hanging, when a bug
/// blocks a runtime thread for good (a deadlock on a lock): the stuck runtime is
/// abandoned rather than joined.
pub fn run_with_deadline<F>(limit: Duration, test: impl FnOnce() -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let handle = runtime.spawn(test());
    let outcome = runtime.block_on(async { tokio::time::timeout(limit, handle).await });
    match outcome {
        Ok(Ok(())) => runtime.shutdown_timeout(Duration::from_secs(1)),
        Ok(Err(e)) => {
            runtime.shutdown_background();
            std::panic::resume_unwind(e.into_panic());
        }
        Err(_) => {
            runtime.shutdown_background();
            panic!("the test did not finish within {limit:?}: a deadlock?");
        }
    }
}

// ---------------------------------------------------------------------------------
// The wire protocol by hand, for tests that must send what no well-behaved client
// would. Writing the bytes here, rather than with the crate's encoder, also checks
// that the broker speaks the documented layout.

/// Frame kind bytes, as docs/protocol.md lists them.
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const SUBSCRIBE: u8 = 0x02;
    pub const PUBLISH: u8 = 0x04;
    pub const DIRECT: u8 = 0x05;
    pub const PING: u8 = 0x06;
    pub const CLOSE: u8 = 0x08;
    pub const DELIVER: u8 = 0x84;
}

/// One frame: a big-endian `u32` length (kind byte plus body), the kind, the body.
pub fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.put_u32(1 + body.len() as u32);
    frame.put_u8(kind);
    frame.put_slice(body);
    frame
}

/// A string field: a big-endian `u16` length, then the bytes.
pub fn str16(s: &[u8]) -> Vec<u8> {
    let mut field = Vec::with_capacity(2 + s.len());
    field.put_u16(s.len() as u16);
    field.put_slice(s);
    field
}

/// `HELLO` with a user id given as raw bytes (so it may be invalid UTF-8).
pub fn raw_hello(user: &[u8]) -> Vec<u8> {
    raw_hello_version(PROTOCOL_VERSION, user)
}

/// `HELLO` with any protocol version.
pub fn raw_hello_version(version: u8, user: &[u8]) -> Vec<u8> {
    let mut body = vec![version];
    body.extend(str16(user));
    body.extend(str16(b""));
    raw_frame(kind::HELLO, &body)
}

/// `SUBSCRIBE` to a session given as raw bytes.
pub fn raw_subscribe(request: u32, session: &[u8]) -> Vec<u8> {
    let mut body = request.to_be_bytes().to_vec();
    body.extend(str16(session));
    raw_frame(kind::SUBSCRIBE, &body)
}

/// `PUBLISH`; the frame has no sender field, whatever the payload says.
pub fn raw_publish(session: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = 0u32.to_be_bytes().to_vec();
    body.extend(str16(session));
    body.extend_from_slice(payload);
    raw_frame(kind::PUBLISH, &body)
}

/// A raw TCP peer: writes bytes, reads decoded frames.
pub struct RawTcp {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawTcp {
    /// Writes bytes as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        within("a raw write", self.stream.write_all(bytes))
            .await
            .expect("raw write");
    }

    /// Ends this side's writing; the broker reads end-of-stream.
    pub async fn shutdown_write(&mut self) {
        within("a write shutdown", self.stream.shutdown())
            .await
            .expect("shutdown");
    }

    /// The next frame from the broker; `None` at end of stream. A reset after the
    /// broker closed counts as the end too: what matters is that the frames before it
    /// arrived.
    pub async fn frame(&mut self) -> Option<Frame> {
        within("a frame from the broker", async {
            loop {
                if let Some(frame) =
                    Frame::decode_stream(&mut self.buf, usize::MAX).expect("the broker's frame")
                {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => {
                        assert!(
                            self.buf.is_empty(),
                            "the broker's stream ended inside a frame"
                        );
                        return None;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Err(e) => panic!("raw read failed: {e}"),
                }
            }
        })
        .await
    }

    /// Sends `HELLO` as `user` and expects `WELCOME`.
    pub async fn handshake(&mut self, user: &str) {
        self.send(&raw_hello(user.as_bytes())).await;
        match self.frame().await {
            Some(Frame::Welcome { user: u, .. }) => assert_eq!(u.as_str(), user),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Expects what the broker sends for bad input: `ERROR` with `code` (answering no
    /// request), then `CLOSE` with the same code, then the end of the stream.
    pub async fn expect_rejected(&mut self, code: ErrorCode) {
        match self.frame().await {
            Some(Frame::Error {
                request,
                code: got,
                reason,
            }) => {
                assert_eq!(got, code, "ERROR code (reason {reason:?})");
                assert_eq!(request, 0, "the ERROR answers no request");
                assert!(!reason.is_empty(), "the ERROR says why");
            }
            other => panic!("expected ERROR {code:?}, got {other:?}"),
        }
        match self.frame().await {
            Some(Frame::Close { code: got, reason }) => {
                assert_eq!(got, code, "CLOSE code (reason {reason:?})");
                assert!(!reason.is_empty(), "the CLOSE says why");
            }
            other => panic!("expected CLOSE {code:?}, got {other:?}"),
        }
        assert_eq!(
            self.frame().await,
            None,
            "the broker ends the stream after CLOSE"
        );
    }
}

/// A raw in-process peer: whole frames in, decoded frames out.
pub struct RawMemory {
    pub reader: MemoryReader,
    pub writer: MemoryWriter,
}

impl RawMemory {
    /// Opens an in-process connection; no frame is sent yet.
    pub async fn connect(connector: &MemoryConnector) -> RawMemory {
        let (reader, writer) = within("an in-process connect", connector.connect())
            .await
            .expect("connect to the broker");
        RawMemory { reader, writer }
    }

    /// Sends one frame's bytes as one message of the link.
    pub async fn send(&mut self, frame: Vec<u8>) {
        let mut batch = vec![Bytes::from(frame)];
        within(
            "a raw in-process write",
            self.writer.write_frames(&mut batch),
        )
        .await
        .expect("raw write");
    }

    /// Sends several frames as one batch of the link, as a writer that found them all
    /// queued at once would.
    pub async fn send_all(&mut self, frames: Vec<Vec<u8>>) {
        let mut batch = frames.into_iter().map(Bytes::from).collect();
        within(
            "a raw in-process write",
            self.writer.write_frames(&mut batch),
        )
        .await
        .expect("raw write");
    }

    /// The next frame from the broker; `None` when the broker closed the link.
    pub async fn frame(&mut self) -> Option<Frame> {
        within(
            "a frame from the broker",
            self.reader.read_frame(usize::MAX),
        )
        .await
        .expect("the broker's frame")
    }

    /// Sends `HELLO` as `user` and expects `WELCOME`.
    pub async fn handshake(&mut self, user: &str) {
        self.send(raw_hello(user.as_bytes())).await;
        match self.frame().await {
            Some(Frame::Welcome { user: u, .. }) => assert_eq!(u.as_str(), user),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }
}

/// Names of the threads that panicked since [`run_counting_panics`] was first called.
static PANICKED_THREADS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Runs `test` as [`run_with_deadline`] does, on a runtime whose threads are all named
/// `name`, and returns how many panics happened on those threads: the broker's tasks
/// included, which the runtime would otherwise catch unnoticed. Unlike
/// [`count_panics`], a test that fails elsewhere in the same binary does not count, as
/// long as `name` is unique to the caller.
pub fn run_counting_panics<F>(
    name: &'static str,
    limit: Duration,
    test: impl FnOnce() -> F,
) -> usize
where
    F: Future<Output = ()> + Send + 'static,
{
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(thread) = std::thread::current().name() {
                PANICKED_THREADS
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(thread.to_string());
            }
            previous(info);
        }));
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a runtime");
    let handle = runtime.spawn(test());
    let outcome = runtime.block_on(async { tokio::time::timeout(limit, handle).await });
    match outcome {
        Ok(Ok(())) => runtime.shutdown_timeout(Duration::from_secs(1)),
        Ok(Err(e)) => {
            runtime.shutdown_background();
            std::panic::resume_unwind(e.into_panic());
        }
        Err(_) => {
            runtime.shutdown_background();
            panic!("the test did not finish within {limit:?}: a deadlock?");
        }
    }
    PANICKED_THREADS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .filter(|thread| thread.as_str() == name)
        .count()
}
