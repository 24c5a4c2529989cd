//! An async Rust client, over TCP or the in-process transport.
//!
//! A [`Client`] is a handle for requests and a [`Stream`] of [`Event`]s. Two tasks run
//! behind it: a reader that answers pings, resolves requests and queues events, and a
//! writer that sends frames in batches. [`Client::split`] gives a cloneable
//! [`ClientHandle`] and the event stream separately, for sending and receiving from
//! different tasks.
//!
//! Events queue up to a bound; a client that stops taking them stops reading its
//! connection, and the broker then treats it as a slow consumer.

use crate::connection::ConnectionId;
use crate::error::{ClientError, ReadError};
use crate::frame::{ErrorCode, Frame, NoticeKind, Text, PROTOCOL_VERSION};
use crate::message::{from_unix_micros, Message, MessageKind, Target};
use crate::transport::{FrameReader, FrameWriter, MemoryConnector, TcpTransport};
use bytes::Bytes;
use futures::{FutureExt, Stream};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{self, Instant};

/// Frames queued for the writer before a request waits.
const OUTGOING: usize = 1024;

/// Largest frame the client accepts from the broker unless told otherwise.
const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Something the broker told this client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A message for this connection.
    Message(Message),
    /// A notice.
    Notice(Notice),
    /// The connection ended; no event follows.
    Closed {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        reason: String,
    },
}

/// A notice from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A direct message reached no connection of `user`.
    NotDelivered {
        /// The request id [`ClientHandle::send_direct`] returned.
        request: u32,
        /// The user it was sent to.
        user: String,
    },
    /// The host closed a session this connection was in.
    SessionClosed {
        /// The session.
        session: String,
        /// Why.
        reason: String,
    },
    /// The broker dropped this many messages for this connection (its outbox was
    /// full).
    Missed {
        /// How many.
        count: u64,
    },
    /// The host added this connection to a session.
    Joined {
        /// The session.
        session: String,
    },
    /// The host removed this connection from a session.
    Left {
        /// The session.
        session: String,
    },
    /// The broker refused a request that has no reply of its own (a publish, say), or
    /// reports an error before closing.
    Error {
        /// The request, or 0.
        request: u32,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        reason: String,
    },
}

/// Settings for a new [`Client`].
pub struct ClientBuilder {
    user: String,
    token: Bytes,
    max_frame: usize,
    event_capacity: usize,
    handshake_timeout: Duration,
}

impl ClientBuilder {
    /// Credentials for the broker's `on_connect` hook.
    pub fn token(mut self, token: impl Into<Bytes>) -> Self {
        self.token = token.into();
        self
    }

    /// Largest frame accepted from the broker. Default 16 MiB.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Events queued before the client stops reading its connection. Default 8,192.
    ///
    /// A request resolves only once the events that arrived before its reply are in
    /// the event stream, so a task that awaits a request while nothing reads a full
    /// event stream waits until something does. Read events on a task of their own
    /// (see [`Client::split`]) when the capacity is small.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n.max(1);
        self
    }

    /// Time allowed for the broker's `WELCOME`. Default 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Connects over TCP.
    ///
    /// # Errors
    ///
    /// Fails when the connection fails or the broker refuses the handshake.
    pub async fn connect_tcp(self, addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        let connection = TcpTransport::connection(stream);
        self.connect(connection.reader, connection.writer).await
    }

    /// Connects through an in-process [`crate::MemoryTransport`].
    ///
    /// # Errors
    ///
    /// Fails when the transport is gone or the broker refuses the handshake.
    pub async fn connect_memory(self, connector: &MemoryConnector) -> Result<Client, ClientError> {
        let (reader, writer) = connector.connect().await?;
        self.connect(reader, writer).await
    }

    /// Connects over any frame transport: the halves of a connection the caller
    /// opened.
    ///
    /// # Errors
    ///
    /// Fails when the transport fails or the broker refuses the handshake.
    pub async fn connect<R: FrameReader, W: FrameWriter>(
        self,
        mut reader: R,
        mut writer: W,
    ) -> Result<Client, ClientError> {
        if self.user.is_empty() || self.user.len() > u16::MAX as usize {
            return Err(ClientError::InvalidId(self.user));
        }
        if self.token.len() > u16::MAX as usize {
            return Err(ClientError::Protocol(format!(
                "a token is at most 65535 bytes, this one is {}",
                self.token.len()
            )));
        }
        let mut hello = vec![Frame::Hello {
            version: PROTOCOL_VERSION,
            user: Text::from(self.user.as_str()),
            token: self.token.clone(),
        }
        .encode()];
        writer.write_frames(&mut hello).await?;

        let welcome = time::timeout(self.handshake_timeout, reader.read_frame(self.max_frame))
            .await
            .map_err(|_| ClientError::Protocol("no WELCOME within the handshake timeout".into()))?;
        let (connection, user, heartbeat_ms, max_frame) = match welcome {
            Ok(Some(Frame::Welcome {
                connection,
                user,
                heartbeat_ms,
                max_frame,
                ..
            })) => (connection, user, heartbeat_ms, max_frame),
            Ok(Some(Frame::Error { code, reason, .. }))
            | Ok(Some(Frame::Close { code, reason })) => {
                return Err(ClientError::Refused {
                    code,
                    reason: reason.to_string(),
                })
            }
            Ok(Some(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected WELCOME, got {}",
                    other.name()
                )))
            }
            Ok(None) => {
                return Err(ClientError::Closed {
                    code: ErrorCode::Normal,
                    reason: "the broker closed the connection during the handshake".into(),
                })
            }
            Err(ReadError::Io(e)) => return Err(e.into()),
            Err(ReadError::Decode(e)) => return Err(e.into()),
        };

        let heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(1)));
        let (out_tx, out_rx) = mpsc::channel(OUTGOING);
        // Events travel in batches of what one read brought, so the channel's cost is
        // paid per batch; its bound in batches keeps the bound in events.
        let batch = self.event_capacity.min(EVENT_BATCH);
        let (event_tx, event_rx) = mpsc::channel((self.event_capacity / batch).max(1));
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU32::new(1),
            closed: Mutex::new(None),
        });
        tokio::spawn(write_loop(writer, out_rx, heartbeat));
        tokio::spawn(read_loop(
            reader,
            self.max_frame,
            shared.clone(),
            out_tx.downgrade(),
            EventSender {
                tx: event_tx,
                batch: Vec::new(),
                limit: batch,
            },
            heartbeat,
        ));

        Ok(Client {
            handle: ClientHandle {
                out: out_tx,
                shared,
                user: Arc::from(user.as_str()),
                connection: ConnectionId(connection),
                max_frame: max_frame as usize,
            },
            events: Events {
                rx: event_rx,
                ready: Vec::new().into_iter(),
            },
        })
    }
}

/// A connection to a broker: requests through its methods, events as a [`Stream`].
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), switchboard::ClientError> {
/// use futures::StreamExt;
/// use switchboard::{Broker, Client, Event, MemoryTransport};
///
/// let broker = Broker::builder().build();
/// let (transport, connector) = MemoryTransport::new();
/// tokio::spawn(broker.serve(transport));
///
/// let mut alice = Client::builder("alice").connect_memory(&connector).await?;
/// let bob = Client::builder("bob").connect_memory(&connector).await?;
/// alice.subscribe("lobby").await?;
/// bob.publish("lobby", "hello").await?;
///
/// match alice.next().await {
///     Some(Event::Message(m)) => assert_eq!(&m.payload[..], b"hello"),
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok(()) }
/// ```
pub struct Client {
    handle: ClientHandle,
    events: Events,
}

/// The request side of a [`Client`]. Cheap to clone.
#[derive(Clone)]
pub struct ClientHandle {
    out: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
    user: Arc<str>,
    connection: ConnectionId,
    max_frame: usize,
}

/// The event side of a [`Client`].
pub struct Events {
    rx: mpsc::Receiver<Vec<Event>>,
    /// The rest of the batch last received.
    ready: std::vec::IntoIter<Event>,
}

/// Most events handed from the reader to the event stream at once.
const EVENT_BATCH: usize = 64;

/// The reader's end of the event stream: events decoded from what is already read are
/// gathered and handed over together once the next frame would have to be waited for.
struct EventSender {
    tx: mpsc::Sender<Vec<Event>>,
    batch: Vec<Event>,
    limit: usize,
}

impl EventSender {
    /// Adds an event, handing the batch over when it is full.
    async fn push(&mut self, event: Event) {
        // With the event stream dropped, a client that only sends keeps working:
        // events are read and discarded so the broker never sees a slow consumer.
        if self.tx.is_closed() {
            return;
        }
        self.batch.push(event);
        if self.batch.len() >= self.limit {
            self.flush().await;
        }
    }

    /// Hands over what is gathered; waits while the stream is full.
    async fn flush(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let _ = self.tx.send(batch).await;
        }
    }
}

type Reply = oneshot::Sender<Result<(), ClientError>>;

struct Shared {
    pending: Mutex<HashMap<u32, Reply>>,
    next_request: AtomicU32,
    /// Why the connection ended, once it has.
    closed: Mutex<Option<(ErrorCode, String)>>,
}

impl Client {
    /// Starts building a client that will connect as `user`.
    pub fn builder(user: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            user: user.into(),
            token: Bytes::new(),
            max_frame: DEFAULT_MAX_FRAME,
            event_capacity: 8192,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Separates the request side from the event stream.
    pub fn split(self) -> (ClientHandle, Events) {
        (self.handle, self.events)
    }

    /// The request side, cloned.
    pub fn handle(&self) -> ClientHandle {
        self.handle.clone()
    }

    /// The next event; `None` after [`Event::Closed`].
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl std::ops::Deref for Client {
    type Target = ClientHandle;

    fn deref(&self) -> &ClientHandle {
        &self.handle
    }
}

impl Stream for Client {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}

impl Events {
    /// The next event; `None` after [`Event::Closed`].
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            if let Some(event) = self.ready.next() {
                return Poll::Ready(Some(event));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => self.ready = batch.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.poll_event(cx)
    }
}

impl ClientHandle {
    /// The user this connection acts as (the broker's host may have chosen it).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The broker's id for this connection.
    pub fn connection_id(&self) -> ConnectionId {
        self.connection
    }

    /// Joins a session; resolves once the broker has added this connection.
    ///
    /// # Errors
    ///
    /// [`ClientError::Rejected`] when the broker refuses (an invalid id, too many
    /// sessions); [`ClientError::Closed`] when the connection is gone.
    pub async fn subscribe(&self, session: &str) -> Result<(), ClientError> {
        check_id(session)?;
        self.request(|request| Frame::Subscribe {
            request,
            session: Text::from(session),
        })
        .await
    }

    /// Leaves a session; resolves once the broker has removed this connection.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] when the connection is gone.
    pub async fn unsubscribe(&self, session: &str) -> Result<(), ClientError> {
        check_id(session)?;
        self.request(|request| Frame::Unsubscribe {
            request,
            session: Text::from(session),
        })
        .await
    }

    /// Publishes to every member of `session` except this connection. Resolves once
    /// the frame is queued for sending; the broker answers only if it refuses, with a
    /// [`Notice::Error`].
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] when the connection is gone; [`ClientError::InvalidId`]
    /// for an empty or over-long id; [`ClientError::Rejected`] when the frame would be
    /// over the broker's size limit.
    pub async fn publish(
        &self,
        session: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        check_id(session)?;
        let frame = Frame::Publish {
            request: 0,
            session: Text::from(session),
            payload: payload.into(),
        };
        self.send(frame).await
    }

    /// Sends to every live connection of `user`. Returns the request id that a
    /// [`Notice::NotDelivered`] would name.
    ///
    /// # Errors
    ///
    /// As [`ClientHandle::publish`].
    pub async fn send_direct(
        &self,
        user: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u32, ClientError> {
        check_id(user)?;
        let request = self.next_request();
        let frame = Frame::Direct {
            request,
            user: Text::from(user),
            payload: payload.into(),
        };
        self.send(frame).await?;
        Ok(request)
    }

    /// Closes the connection: what was queued is sent first.
    pub async fn close(&self) {
        let frame = Frame::Close {
            code: ErrorCode::Normal,
            reason: Text::from("closed by the client"),
        };
        let _ = self.out.send(frame.encode()).await;
    }

    fn next_request(&self) -> u32 {
        // Zero means "no request"; skip it when the counter wraps.
        loop {
            let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    async fn send(&self, frame: Frame) -> Result<(), ClientError> {
        if frame.encoded_len() - crate::frame::LENGTH_PREFIX > self.max_frame {
            return Err(ClientError::Rejected {
                code: ErrorCode::FrameTooLarge,
                reason: format!(
                    "frame of {} bytes is over the broker's limit of {}",
                    frame.encoded_len() - crate::frame::LENGTH_PREFIX,
                    self.max_frame
                ),
            });
        }
        self.out
            .send(frame.encode())
            .await
            .map_err(|_| self.closed_error())
    }

    async fn request(&self, make: impl FnOnce(u32) -> Frame) -> Result<(), ClientError> {
        let request = self.next_request();
        let (tx, rx) = oneshot::channel();
        {
            // The reader marks the connection closed before it drops every pending
            // reply, so a request registered after that drop sees the mark here.
            let mut pending = self.shared.pending.lock();
            if self.shared.closed.lock().is_some() {
                drop(pending);
                return Err(self.closed_error());
            }
            pending.insert(request, tx);
        }
        if let Err(e) = self.send(make(request)).await {
            self.shared.pending.lock().remove(&request);
            return Err(e);
        }
        rx.await.unwrap_or_else(|_| Err(self.closed_error()))
    }

    fn closed_error(&self) -> ClientError {
        let (code, reason) = self
            .shared
            .closed
            .lock()
            .clone()
            .unwrap_or((ErrorCode::Normal, "connection closed".to_string()));
        ClientError::Closed { code, reason }
    }
}

fn check_id(id: &str) -> Result<(), ClientError> {
    if id.is_empty() || id.len() > u16::MAX as usize {
        return Err(ClientError::InvalidId(id.to_string()));
    }
    Ok(())
}

async fn write_loop<W: FrameWriter>(
    mut writer: W,
    mut out: mpsc::Receiver<Bytes>,
    heartbeat: Duration,
) {
    let mut ticks = time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticks.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut wrote = false;
    let mut batch = Vec::new();

    loop {
        let received = tokio::select! {
            n = out.recv_many(&mut batch, 256) => n,
            _ = ticks.tick() => {
                // A PING only after a quiet interval: traffic is proof of life.
                if !std::mem::take(&mut wrote) {
                    let mut ping = vec![Frame::Ping.encode()];
                    if writer.write_frames(&mut ping).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        if received == 0 {
            break;
        }
        let closing = batch
            .iter()
            .any(|f| f.get(crate::frame::LENGTH_PREFIX) == Some(&crate::frame::kind::CLOSE));
        if writer.write_frames(&mut batch).await.is_err() {
            return;
        }
        batch.clear();
        wrote = true;
        if closing {
            let _ = writer.close().await;
            return;
        }
    }

    // Every handle is gone without a close: say goodbye for the client.
    let mut close = vec![Frame::Close {
        code: ErrorCode::Normal,
        reason: Text::from("client dropped"),
    }
    .encode()];
    let _ = writer.write_frames(&mut close).await;
    let _ = writer.close().await;
}

/// The notice a `NOTICE` frame carries.
pub(crate) fn notice(
    kind: NoticeKind,
    request: u32,
    count: u64,
    subject: &Text,
    text: &Text,
) -> Notice {
    match kind {
        NoticeKind::NotDelivered => Notice::NotDelivered {
            request,
            user: subject.to_string(),
        },
        NoticeKind::SessionClosed => Notice::SessionClosed {
            session: subject.to_string(),
            reason: text.to_string(),
        },
        NoticeKind::Missed => Notice::Missed { count },
        NoticeKind::Joined => Notice::Joined {
            session: subject.to_string(),
        },
        NoticeKind::Left => Notice::Left {
            session: subject.to_string(),
        },
    }
}

/// `text` as an `Arc<str>`, reusing `last` when it holds the same text.
pub(crate) fn shared_str(last: &mut Option<Arc<str>>, text: &str) -> Arc<str> {
    match last {
        Some(kept) if **kept == *text => kept.clone(),
        _ => last.insert(Arc::from(text)).clone(),
    }
}

async fn read_loop<R: FrameReader>(
    mut reader: R,
    max_frame: usize,
    shared: Arc<Shared>,
    out: mpsc::WeakSender<Bytes>,
    mut events: EventSender,
    heartbeat: Duration,
) {
    // The broker pings after each quiet interval, so three silent ones mean it is gone.
    // Silence is checked once per interval; a frame only sets a flag.
    let silence = heartbeat * 3;
    let mut ticks = time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticks.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut heard = false;
    // Deliveries mostly repeat the sender and target of the one before, so the last of
    // each is kept and shared instead of allocating two strings per message.
    let mut last_sender: Option<Arc<str>> = None;
    let mut last_target: Option<Arc<str>> = None;

    let (code, reason) = loop {
        // A frame already read is taken at once; otherwise what was gathered is handed
        // over before waiting. `read_frame` is cancel-safe, so trying it loses nothing.
        let frame = match reader.read_frame(max_frame).now_or_never() {
            Some(frame) => frame,
            None => {
                events.flush().await;
                tokio::select! {
                    now = ticks.tick() => {
                        if std::mem::take(&mut heard) {
                            last_heard = now;
                        } else if now.duration_since(last_heard) >= silence {
                            break (ErrorCode::IdleTimeout, "nothing heard from the broker".to_string());
                        }
                        continue;
                    }
                    frame = reader.read_frame(max_frame) => frame,
                }
            }
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                break (
                    ErrorCode::Normal,
                    "the broker closed the connection".to_string(),
                )
            }
            Err(e) => break (ErrorCode::Normal, e.to_string()),
        };
        heard = true;
        let event = match frame {
            Frame::Deliver {
                id,
                kind,
                sent_at_us,
                sender,
                target,
                payload,
            } => {
                let target = shared_str(&mut last_target, target.as_str());
                let target = match kind {
                    MessageKind::Session => Target::Session(target),
                    MessageKind::Direct => Target::User(target),
                };
                Event::Message(Message {
                    id,
                    kind,
                    sender: shared_str(&mut last_sender, sender.as_str()),
                    target,
                    sent_at: from_unix_micros(sent_at_us),
                    payload,
                })
            }
            Frame::Ok { request } => {
                // Events that came before the reply are in the stream before it resolves.
                events.flush().await;
                if let Some(reply) = shared.pending.lock().remove(&request) {
                    let _ = reply.send(Ok(()));
                }
                continue;
            }
            Frame::Error {
                request,
                code,
                reason,
            } => {
                events.flush().await;
                let reply = shared.pending.lock().remove(&request);
                match reply {
                    Some(reply) => {
                        let _ = reply.send(Err(ClientError::Rejected {
                            code,
                            reason: reason.to_string(),
                        }));
                        continue;
                    }
                    None => Event::Notice(Notice::Error {
                        request,
                        code,
                        reason: reason.to_string(),
                    }),
                }
            }
            Frame::Notice {
                kind,
                request,
                count,
                subject,
                text,
            } => Event::Notice(notice(kind, request, count, &subject, &text)),
            Frame::Ping => {
                // Only a weak sender is kept here, so that dropping every handle
                // still closes the connection.
                if let Some(out) = out.upgrade() {
                    let _ = out.try_send(Frame::Pong.encode());
                }
                continue;
            }
            Frame::Pong => continue,
            Frame::Close { code, reason } => break (code, reason.to_string()),
            other => {
                break (
                    ErrorCode::UnknownKind,
                    format!("unexpected {} frame from the broker", other.name()),
                )
            }
        };
        events.push(event).await;
    };

    // Every waiting request learns the connection is gone, after the events before.
    events.flush().await;
    *shared.closed.lock() = Some((code, reason.clone()));
    shared.pending.lock().clear();
    events.push(Event::Closed { code, reason }).await;
    events.flush().await;
}
