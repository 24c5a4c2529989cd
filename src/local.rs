//! In-process connections: the host's own code as a member of sessions, through the
//! same session map, workers and outboxes as a network connection, without a transport.
//!
//! A [`LocalConnection`] is what a server-side bot, a bridge to another system or a
//! test would otherwise get from
//! [`ClientBuilder::connect_memory`](crate::ClientBuilder::connect_memory): a user's
//! connection that joins sessions, publishes, sends direct messages and receives
//! [`Event`]s. The difference is the path. A memory client's frames go through its
//! connection's task, an in-process link and the client's reader, three hand-overs
//! between tasks, each with its copy of the batch; a local connection's
//! [`recv`](LocalConnection::recv) takes the frames the workers queued straight from
//! its outbox, so a delivery costs one hand-over, from the worker to whoever awaits
//! `recv`. Requests need no round trip either: joining a session changes the session
//! map before [`subscribe`](LocalHandle::subscribe) returns, and a publication
//! goes onto the ingress queue as the reader of a network connection would put it.
//!
//! A local connection counts against `max_connections` and
//! `max_sessions_per_connection`, is found by [`Broker::join`](crate::Broker::join),
//! [`Broker::disconnect`](crate::Broker::disconnect) and direct messages to its user,
//! and its outbox is bounded like any other: one that stops calling `recv` is a slow
//! consumer, under the broker's policy. What guards the broker against a peer across a
//! transport does not apply, because the host is the peer: the `on_connect` hook does
//! not run for it (the host chose its user), there is no handshake or its timeout, the
//! idle timeout never closes it, no heartbeat is sent to it, no write can time out,
//! and `publish_rate` does not limit it. Its sender stamp is the user the host gave.
//! `on_disconnect` runs when it ends, as for every connection.
//!
//! At shutdown a local connection is closed once what was queued before reached its
//! outbox, like every connection, but shutdown does not wait for the host to take
//! those frames: [`recv`](LocalConnection::recv) still hands them out, then the close,
//! after [`Broker::shutdown`](crate::Broker::shutdown) has returned.
//!
//! One task receives, since [`recv`](LocalConnection::recv) takes `&mut self`. Other
//! tasks make requests on the same connection through a [`LocalHandle`] from
//! [`LocalConnection::handle`]. The connection lives as long as its `LocalConnection`.
//! A second local connection of the same user is no substitute for a handle: it is
//! another member, so it receives what the first one publishes.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), switchboard::ClientError> {
//! use switchboard::{Broker, Client, Event, MemoryTransport};
//!
//! let broker = Broker::builder().build();
//! let (transport, connector) = MemoryTransport::new();
//! tokio::spawn(broker.serve(transport));
//!
//! // A bot in the host's process, and a user over a transport.
//! let mut bot = broker.connect_local("bot")?;
//! bot.subscribe("lobby")?;
//! let alice = Client::builder("alice").connect_memory(&connector).await?;
//! alice.publish("lobby", "hello, bot").await?;
//!
//! let Some(Event::Message(message)) = bot.recv().await else { panic!() };
//! assert_eq!(&*message.sender, "alice");
//! assert_eq!(&message.payload[..], b"hello, bot");
//! # Ok(()) }
//! ```

use crate::broker::Inner;
use crate::client::{notice, shared_str, Event};
use crate::connection::{self, ConnectionId, ConnectionState};
use crate::error::ClientError;
use crate::frame::{read_deliver, ErrorCode, Frame, Text};
use crate::heartbeat::Pulse;
use crate::hooks::{self, DisconnectInfo};
use crate::message::{from_unix_micros, Message, MessageKind, Target};
use crate::outbox::Batch;
use crate::session::JoinError;
use crate::transport::WireFormat;
use crate::worker::Job;
use bytes::{Buf, Bytes};
use futures::Stream;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tracing::debug;

/// A connection of the host's own process: a member of sessions and a user's
/// connection, with no transport between it and the broker. Made by
/// [`Broker::connect_local`](crate::Broker::connect_local); see the [module
/// docs](self) for what it shares with a network connection and what not.
///
/// [`recv`](LocalConnection::recv) takes `&mut self`, so one task receives; the same
/// events come from its [`Stream`] implementation. The requests are
/// [`LocalHandle`]'s, which this dereferences to; [`handle`] gives a clone for other
/// tasks. The connection lives as long as this value: dropping it closes the
/// connection, as [`close`](LocalHandle::close) does but with the reason "dropped by
/// the host" (`close` gives "closed by the host"), and handles left over then fail
/// with [`ClientError::Closed`].
///
/// [`handle`]: LocalConnection::handle
pub struct LocalConnection {
    handle: LocalHandle,
    /// Frames taken from the outbox and not yet handed out: `batch[next..]`.
    batch: Vec<Bytes>,
    next: usize,
    /// The sender and target of the last delivery, shared with the next one that
    /// repeats them instead of allocating two strings per message.
    last_sender: Option<Arc<str>>,
    last_target: Option<Arc<str>>,
    /// `Event::Closed` was handed out; nothing follows.
    ended: bool,
}

/// The request side of a [`LocalConnection`]: joining and leaving sessions, publishing,
/// direct messages and closing, from any task. Cheap to clone. See
/// [`LocalConnection::handle`] for an example.
///
/// A handle does not keep the connection open. Once the connection has ended, for
/// whatever reason (its `LocalConnection` dropped, [`close`](LocalHandle::close), a
/// slow-consumer close, the host's [`disconnect`](crate::Broker::disconnect), a
/// replacement, shutdown), every request fails with [`ClientError::Closed`], carrying
/// that reason.
#[derive(Clone)]
pub struct LocalHandle {
    core: Arc<Core>,
}

/// What the handles of one local connection share.
struct Core {
    inner: Arc<Inner>,
    state: Arc<ConnectionState>,
    next_request: AtomicU32,
}

impl LocalConnection {
    /// Registers a new local connection of `user` and starts the task that removes it
    /// from the broker once it ends.
    pub(crate) fn open(inner: &Arc<Inner>, user: &str) -> Result<LocalConnection, ClientError> {
        let refused = |code, reason: String| ClientError::Refused { code, reason };
        let config = &inner.config;
        // Outside a runtime the task below cannot start: fail before anything is
        // registered, rather than leave a connection nothing would ever take out.
        let runtime = tokio::runtime::Handle::current();
        inner
            .check_id("user", user)
            .map_err(|detail| refused(ErrorCode::InvalidId, detail))?;
        if inner.reads_stopped() {
            return Err(refused(
                ErrorCode::ShuttingDown,
                "broker shutting down".into(),
            ));
        }
        let Some(place) = inner.registry.reserve(config.max_connections) else {
            let detail = format!(
                "the broker is at its limit of {} connections",
                config.max_connections
            );
            return Err(refused(ErrorCode::TooManyConnections, detail));
        };

        let id = ConnectionId(inner.next_connection.fetch_add(1, Ordering::Relaxed));
        let pulse = Pulse::never_idle(inner);
        let state =
            connection::register(inner, id, Arc::from(user), WireFormat::Binary, pulse, place);
        debug!(connection = %id, user = %state.user, "connected in process");
        inner
            .connections
            .spawn_on(watch(inner.clone(), state.clone()), &runtime);

        Ok(LocalConnection {
            handle: LocalHandle {
                core: Arc::new(Core {
                    inner: inner.clone(),
                    state,
                    next_request: AtomicU32::new(1),
                }),
            },
            batch: Vec::new(),
            next: 0,
            last_sender: None,
            last_target: None,
            ended: false,
        })
    }

    /// A handle for requests on this connection from other tasks.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), switchboard::ClientError> {
    /// use std::time::Duration;
    /// use switchboard::{Broker, Event};
    ///
    /// let broker = Broker::builder().build();
    /// let mut alice = broker.connect_local("alice")?;
    /// alice.subscribe("room")?;
    ///
    /// // A bot receives in one task and ticks from another, as one connection.
    /// let mut bot = broker.connect_local("bot")?;
    /// bot.subscribe("room")?;
    /// let ticker = bot.handle();
    /// tokio::spawn(async move {
    ///     let mut every = tokio::time::interval(Duration::from_millis(10));
    ///     // Ends once the bot's connection is gone.
    ///     while ticker.publish("room", "tick").await.is_ok() {
    ///         every.tick().await;
    ///     }
    /// });
    ///
    /// alice.publish("room", "hello").await?;
    /// let Some(Event::Message(hello)) = bot.recv().await else { panic!() };
    /// assert_eq!(&*hello.sender, "alice");
    /// let Some(Event::Message(tick)) = alice.recv().await else { panic!() };
    /// assert_eq!((&*tick.sender, &tick.payload[..]), ("bot", &b"tick"[..]));
    /// # Ok(()) }
    /// ```
    pub fn handle(&self) -> LocalHandle {
        self.handle.clone()
    }

    /// The next event; `None` after [`Event::Closed`]. Cancel-safe: an event is taken
    /// only when this returns it.
    ///
    /// The events are those of a [`Client`](crate::Client): messages, the notices of
    /// the host's changes to its sessions, of messages it missed under a dropping
    /// policy and of direct messages nobody received, and the close. A local
    /// connection's requests are checked as they are made, so no
    /// [`Notice::Error`](crate::Notice::Error) comes for them.
    pub async fn recv(&mut self) -> Option<Event> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            while let Some(frame) = self.batch.get_mut(self.next) {
                let frame = std::mem::take(frame);
                self.next += 1;
                if let Some(event) = self.event(frame) {
                    return Poll::Ready(Some(event));
                }
            }
            if self.ended {
                return Poll::Ready(None);
            }
            self.batch.clear();
            self.next = 0;

            let outbox = &self.handle.core.state.outbox;
            match outbox.take(&mut self.batch) {
                Batch::Frames => {
                    // Taken is as good as written: the frames are out of the broker's
                    // hands, and at most one take's worth waits here.
                    outbox.written(self.batch.iter().map(Bytes::len).sum());
                }
                Batch::Empty => {
                    if outbox.poll_ready(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Batch::Quiet => self.batch = Vec::new(),
                // The heartbeat's `PING` is for a peer across a transport.
                Batch::Ping => {}
                Batch::Closing(end) => {
                    self.ended = true;
                    self.batch = Vec::new();
                    return Poll::Ready(Some(Event::Closed {
                        code: end.code,
                        reason: end.reason,
                    }));
                }
            }
        }
    }

    /// The event one queued frame stands for. The frames are the broker's own
    /// encoding, so none fails to decode; one that did would be skipped.
    fn event(&mut self, frame: Bytes) -> Option<Event> {
        let frame = match self.message(frame) {
            Ok(message) => return Some(Event::Message(message)),
            Err(frame) => frame,
        };
        // Besides deliveries, only the notices the broker queues itself: a local
        // connection's requests are checked as they are made, so no ERROR comes.
        match Frame::decode_message(frame, usize::MAX).ok()? {
            Frame::Notice {
                kind,
                request,
                count,
                subject,
                text,
            } => Some(Event::Notice(notice(kind, request, count, &subject, &text))),
            _ => None,
        }
    }

    /// A `DELIVER` frame as a message, or the frame back when it is none. The payload
    /// is the frame itself, advanced past its header, so taking it costs no reference
    /// count on the buffer that every member of the session shares; the ids are read
    /// in place.
    fn message(&mut self, mut frame: Bytes) -> Result<Message, Bytes> {
        let Some(header) = read_deliver(&frame) else {
            return Err(frame);
        };
        let (kind, id, sent_at_us) = (header.kind, header.id, header.sent_at_us);
        let sender = shared_str(&mut self.last_sender, header.sender);
        let target = shared_str(&mut self.last_target, header.target);
        frame.advance(header.payload_at);
        Ok(Message {
            id,
            kind,
            sender,
            target: match kind {
                MessageKind::Session => Target::Session(target),
                MessageKind::Direct => Target::User(target),
            },
            sent_at: from_unix_micros(sent_at_us),
            payload: frame,
        })
    }
}

impl LocalHandle {
    /// The user this connection acts as.
    pub fn user(&self) -> &str {
        &self.core.state.user
    }

    /// The broker's id for this connection.
    pub fn connection_id(&self) -> ConnectionId {
        self.core.state.id
    }

    /// Joins `session`, creating it at its first member. The session map has changed
    /// when this returns: a message published after it reaches this connection.
    /// Joining a session it is in already is no error.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidId`] for an empty id or one over the broker's
    /// `max_id_len`; [`ClientError::Rejected`] with
    /// [`ErrorCode::TooManySessions`] at `max_sessions_per_connection`;
    /// [`ClientError::Closed`] once the connection has ended.
    pub fn subscribe(&self, session: &str) -> Result<(), ClientError> {
        self.check_open()?;
        self.check_id(session)?;
        let limit = self.core.inner.config.max_sessions_per_connection;
        match self
            .core
            .inner
            .sessions
            .join(&self.core.state, session, limit)
        {
            Ok(_) => Ok(()),
            Err(JoinError::TooMany) => Err(ClientError::Rejected {
                code: ErrorCode::TooManySessions,
                reason: format!("this connection is already in {limit} sessions, the limit"),
            }),
            Err(JoinError::Gone) => Err(self.closed()),
        }
    }

    /// Leaves `session`; the session is freed when this was its last member. Leaving
    /// a session it is not in is no error.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] once the connection has ended.
    pub fn unsubscribe(&self, session: &str) -> Result<(), ClientError> {
        self.check_open()?;
        self.core.inner.sessions.leave(&self.core.state, session);
        Ok(())
    }

    /// Publishes to every member of `session` but this connection. Resolves once the
    /// message is on the ingress queue, waiting while that queue is full, exactly as
    /// a network connection's reader would. Messages published one after another,
    /// each call awaited before the next, reach every member in that order. A call
    /// dropped before it resolves queues nothing.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidId`] for a bad session id; [`ClientError::Rejected`] with
    /// [`ErrorCode::FrameTooLarge`] for a payload over the broker's `max_frame`;
    /// [`ClientError::Closed`] once the connection has ended or the broker is
    /// shutting down.
    pub async fn publish(
        &self,
        session: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let payload = self.check_message(session, payload.into())?;
        let job = Job::Publish {
            from: Some(self.core.state.clone()),
            session: Text::from(session),
            payload,
        };
        self.enqueue(session, job).await
    }

    /// Sends to every live connection of `user` but this one. Returns the request id
    /// that a [`Notice::NotDelivered`](crate::Notice::NotDelivered) names when no
    /// connection received it.
    ///
    /// # Errors
    ///
    /// As [`LocalHandle::publish`].
    pub async fn send_direct(
        &self,
        user: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u32, ClientError> {
        let payload = self.check_message(user, payload.into())?;
        let request = loop {
            // Zero means "no request"; skip it when the counter wraps.
            let id = self.core.next_request.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        let job = Job::Direct {
            from: Some(self.core.state.clone()),
            user: Text::from(user),
            payload,
            request,
        };
        self.enqueue(user, job).await?;
        Ok(request)
    }

    /// Closes the connection: before this returns it has left its sessions and no
    /// longer counts against `max_connections`, and
    /// [`recv`](LocalConnection::recv) still hands out what was queued for it, then
    /// [`Event::Closed`]. `on_disconnect` runs a moment later, on the broker's task.
    pub fn close(&self) {
        self.end(ErrorCode::Normal, "closed by the host");
    }

    /// Ends the connection and takes it out of its sessions and the registry before
    /// returning, so that nothing sent after it is offered to it and its place among
    /// `max_connections` is free again; `watch` then runs `on_disconnect`.
    fn end(&self, code: ErrorCode, reason: &str) {
        self.core.state.end(code, reason);
        self.core.inner.sessions.leave_all(&self.core.state);
        self.core.inner.registry.remove(&self.core.state);
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.core.state.outbox.is_closing() {
            return Err(self.closed());
        }
        Ok(())
    }

    fn check_id(&self, id: &str) -> Result<(), ClientError> {
        self.core
            .inner
            .check_id("", id)
            .map_err(|_| ClientError::InvalidId(id.to_string()))
    }

    /// Checks a message before it is queued; gives its payload back.
    fn check_message(&self, target: &str, payload: Bytes) -> Result<Bytes, ClientError> {
        self.check_open()?;
        self.check_id(target)?;
        let max = self.core.inner.config.max_frame;
        if payload.len() > max {
            return Err(ClientError::Rejected {
                code: ErrorCode::FrameTooLarge,
                reason: format!(
                    "payload of {} bytes is over the broker's limit of {max}",
                    payload.len()
                ),
            });
        }
        Ok(payload)
    }

    async fn enqueue(&self, target: &str, job: Job) -> Result<(), ClientError> {
        let inner = &self.core.inner;
        inner
            .enqueue_unless_stopped(inner.worker_for(target), job)
            .await
            .map_err(|_| ClientError::Closed {
                code: ErrorCode::ShuttingDown,
                reason: "broker shutting down".to_string(),
            })
    }

    fn closed(&self) -> ClientError {
        let end = self.core.state.outbox.closing();
        ClientError::Closed {
            code: end.as_ref().map_or(ErrorCode::Normal, |e| e.code),
            reason: end.map_or_else(|| "closed".to_string(), |e| e.reason),
        }
    }
}

impl Drop for LocalConnection {
    fn drop(&mut self) {
        self.handle.end(ErrorCode::Normal, "dropped by the host");
    }
}

impl std::ops::Deref for LocalConnection {
    type Target = LocalHandle;

    fn deref(&self) -> &LocalHandle {
        &self.handle
    }
}

impl Stream for LocalConnection {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.poll_event(cx)
    }
}

impl futures::stream::FusedStream for LocalConnection {
    /// True once [`Event::Closed`] has been handed out.
    fn is_terminated(&self) -> bool {
        self.ended && self.next >= self.batch.len()
    }
}

impl std::fmt::Debug for LocalConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalConnection")
            .field("connection", &self.handle.core.state.id)
            .field("user", &self.handle.core.state.user)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LocalHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHandle")
            .field("connection", &self.core.state.id)
            .field("user", &self.core.state.user)
            .finish_non_exhaustive()
    }
}

/// Waits until the connection ends, for whatever reason (the host closed or dropped
/// it, it overflowed as a slow consumer, the host disconnected it, or a newer one
/// replaced it), or until shutdown has delivered what was queued before it; then takes
/// it out of its sessions and the registry, and tells `on_disconnect`. Frames queued
/// for it stay in its outbox for [`LocalConnection::recv`].
async fn watch(inner: Arc<Inner>, state: Arc<ConnectionState>) {
    tokio::select! {
        _ = poll_fn(|cx| state.outbox.poll_closed(cx)) => {}
        _ = inner.drained.cancelled() => {
            state.end(ErrorCode::ShuttingDown, "broker shutting down");
        }
    }
    inner.sessions.leave_all(&state);
    inner.registry.remove(&state);

    let end = state.outbox.closing();
    let (code, reason) = end.map_or((ErrorCode::Normal, String::new()), |e| (e.code, e.reason));
    debug!(connection = %state.id, user = %state.user, ?code, %reason, "disconnected");
    if let Some(hook) = &inner.hooks.on_disconnect {
        let info = DisconnectInfo {
            connection: state.id,
            user: state.user.clone(),
            code,
            reason,
        };
        hooks::call("on_disconnect", &inner.counters, || hook(&info));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::frame::encode_deliver;
    use crate::message::unix_micros;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    proptest! {
        /// The local reader reads a `DELIVER` in place; it must agree with the frame
        /// decoder on every message the broker can encode, and share the ids of
        /// consecutive deliveries that repeat them.
        #[test]
        fn the_in_place_reading_of_a_deliver_agrees_with_the_decoder(
            id in any::<u64>(),
            direct in any::<bool>(),
            sent_at_us in 0u64..(1 << 52),
            sender in ".{0,40}",
            target in ".{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _entered = runtime.enter();
            let broker = Broker::builder().build();
            let mut local = broker.connect_local("reader").unwrap();

            let kind = if direct { MessageKind::Direct } else { MessageKind::Session };
            let frame = encode_deliver(id, kind, sent_at_us, &sender, &target, &payload);
            let first = local.message(frame.clone()).expect("a valid DELIVER");
            let Ok(Frame::Deliver { id: decoded_id, sender: s, target: t, payload: p, .. }) =
                Frame::decode_message(frame.clone(), usize::MAX)
            else {
                panic!("the decoder refused what the encoder wrote");
            };
            prop_assert_eq!(first.id, decoded_id);
            prop_assert_eq!(first.kind, kind);
            prop_assert_eq!(&*first.sender, s.as_str());
            prop_assert_eq!(first.target.id(), t.as_str());
            prop_assert_eq!(&first.payload, &p);
            prop_assert_eq!(unix_micros(first.sent_at), sent_at_us);
            prop_assert_eq!(first.sent_at, UNIX_EPOCH + Duration::from_micros(sent_at_us));

            let second = local.message(frame).expect("a valid DELIVER");
            prop_assert!(Arc::ptr_eq(&first.sender, &second.sender));
        }
    }

    #[tokio::test]
    async fn a_truncated_deliver_is_skipped_not_read_past_its_end() {
        let broker = Broker::builder().build();
        let mut local = broker.connect_local("reader").unwrap();
        let frame = encode_deliver(7, MessageKind::Session, 1, "alice", "room", b"hello");
        // Every cut through the header leaves too little to read; none panics.
        for cut in 0..frame.len() - b"hello".len() {
            assert_eq!(local.message(frame.slice(..cut)).ok(), None, "cut at {cut}");
        }
        let whole = local.message(frame).expect("the whole frame");
        assert_eq!(&whole.payload[..], b"hello");
    }
}
