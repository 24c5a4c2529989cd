//! One connection's life: handshake, the reader loop, the writer loop, and cleanup.
//!
//! The reader validates each frame, stamps the sender and queues the message on the
//! ingress queue of the worker that owns its target; it waits there when the workers
//! fall behind, which slows that publisher and nobody else. The writer drains the
//! outbox a batch at a time. Neither ever touches another connection.

use crate::broker::{Inner, PublishRate};
use crate::error::ReadError;
use crate::frame::{ErrorCode, Frame, NoticeKind, Text, PROTOCOL_VERSION};
use crate::heartbeat::Pulse;
use crate::hooks::{self, Admission, ConnectInfo, DisconnectInfo, LagInfo};
use crate::outbox::{Batch, CloseReason, Offer, Outbox};
use crate::session::{JoinError, Place};
use crate::stats::Counters;
use crate::transport::{Connection, FrameReader, FrameWriter, WireFormat};
use crate::worker::Job;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{self, Instant};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, warn};

/// The broker's id for one connection, unique for the broker's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the rest of the broker holds of a live connection.
pub(crate) struct ConnectionState {
    pub id: ConnectionId,
    pub user: Arc<str>,
    pub format: WireFormat,
    /// What is queued for the peer. Its closing also ends the reader, for reasons the
    /// reader cannot see (an overflowing outbox, the host, a failed write, the
    /// heartbeat).
    pub outbox: Outbox,
    pub memberships: Mutex<Memberships>,
    /// Traffic, as the heartbeat sees it.
    pub pulse: Pulse,
}

pub(crate) struct Memberships {
    pub sessions: HashSet<Arc<str>>,
    /// Set once cleanup began; no session may take the connection after that.
    pub gone: bool,
}

impl ConnectionState {
    /// Offers a message frame from forwarding worker `worker` to this member; counts
    /// and reports what was lost. Returns whether it was queued, and whether the
    /// member's writer is due a wake-up ([`Outbox::wake`]), which is left to the
    /// caller so that it can offer a whole batch first.
    pub(crate) fn deliver(&self, frame: Bytes, inner: &Inner, worker: usize) -> (bool, bool) {
        let (offer, wake) = self.outbox.offer_unwoken(frame, worker);
        let delivered = match offer {
            Offer::Queued => true,
            Offer::QueuedDropping(n) => {
                self.lagged(inner, n, false);
                true
            }
            Offer::Dropped => {
                self.lagged(inner, 1, false);
                false
            }
            Offer::Overflowed(freed) => {
                self.overflowed(inner);
                self.lagged(inner, freed + 1, true);
                false
            }
            Offer::Closed => {
                Counters::add(&inner.counters.dropped, 1);
                false
            }
        };
        (delivered, wake)
    }

    fn lagged(&self, inner: &Inner, dropped: u64, disconnected: bool) {
        Counters::add(&inner.counters.dropped, dropped);
        if let Some(hook) = &inner.hooks.on_lag {
            let info = LagInfo {
                connection: self.id,
                user: self.user.clone(),
                dropped,
                disconnected,
            };
            hooks::call("on_lag", &inner.counters, || hook(&info));
        }
    }

    /// Queues a control frame (a reply or a notice).
    pub(crate) fn control(&self, frame: &Frame, inner: &Inner) {
        match self.outbox.control(frame) {
            Offer::Overflowed(freed) => {
                self.overflowed(inner);
                self.lagged(inner, freed, true);
            }
            // DropOldest discarded messages to make room for this frame.
            Offer::QueuedDropping(n) => self.lagged(inner, n, false),
            _ => {}
        }
    }

    fn overflowed(&self, inner: &Inner) {
        inner.counters.slow_consumers.fetch_add(1, Relaxed);
        warn!(connection = %self.id, user = %self.user, "slow consumer: outbox full, closing");
    }

    /// Ends the connection: what is queued is still written, then a `CLOSE` frame.
    /// Returns false when it was closing already, for an earlier reason that stands.
    pub(crate) fn end(&self, code: ErrorCode, reason: impl Into<String>) -> bool {
        self.outbox.close(code, reason)
    }
}

/// How long a refused peer is read from, at most, before its socket is closed.
const REFUSAL_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// A token bucket limiting the messages one connection sends.
struct RateLimit {
    tokens: f64,
    per_second: f64,
    burst: f64,
    refilled: Instant,
}

impl RateLimit {
    fn new(rate: PublishRate) -> RateLimit {
        RateLimit {
            tokens: f64::from(rate.burst),
            per_second: rate.per_second,
            burst: f64::from(rate.burst),
            refilled: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How the read loop ended.
enum ReadEnd {
    /// The connection is over for this reason.
    Close(CloseReason),
    /// The broker is shutting down: wait for the queued messages, then close.
    Shutdown,
}

fn reason(code: ErrorCode, reason: impl Into<String>) -> CloseReason {
    CloseReason {
        code,
        reason: reason.into(),
    }
}

/// Runs one connection from handshake to cleanup.
///
/// This future lives as long as the connection, so its size is part of what every
/// connection costs. It is an `async move` block rather than an `async fn` because an
/// `async fn` keeps each argument twice, once as passed and once as bound; the block
/// keeps what it captures once.
pub(crate) fn run<R: FrameReader, W: FrameWriter>(
    inner: Arc<Inner>,
    conn: Connection<R, W>,
    reading: TaskTrackerToken,
) -> impl Future<Output = ()> + Send {
    let Connection {
        mut reader,
        mut writer,
        peer,
    } = conn;
    // The peer's address is only for logs; it is kept without spare room.
    let peer = peer.into_boxed_str();

    async move {
        // The handshake runs on the heap: its timer, the host's hook and a refusal
        // would otherwise stay part of this future.
        let Some(state) = Box::pin(admit(&inner, &mut reader, &mut writer, &peer)).await else {
            return;
        };
        debug!(connection = %state.id, user = %state.user, %peer, "connected");

        // The writer runs in this task beside the reader, polled with it until it ends:
        // a task of its own would cost every connection a second task header and a
        // second future. Each wake-up polls both, which costs a look at the socket or
        // the outbox, not a system call.
        let mut writing = pin!(write_loop(&mut writer, &state, &inner));
        let mut written = false;
        {
            let mut read = pin!(read_loop(&inner, &state, &mut reader, &peer, reading));
            let end = poll_fn(|cx| {
                written = written || writing.as_mut().poll(cx).is_ready();
                read.as_mut().poll(cx)
            })
            .await;

            inner.sessions.leave_all(&state);
            inner.registry.remove(&state);
            state.outbox.close(end.code, end.reason);
        }
        if !written {
            writing.await;
        }

        let end = state
            .outbox
            .closing()
            .unwrap_or_else(|| reason(ErrorCode::Normal, ""));
        debug!(connection = %state.id, user = %state.user, code = ?end.code, reason = %end.reason, "disconnected");
        if let Some(hook) = &inner.hooks.on_disconnect {
            let info = DisconnectInfo {
                connection: state.id,
                user: state.user.clone(),
                code: end.code,
                reason: end.reason,
            };
            hooks::call("on_disconnect", &inner.counters, || hook(&info));
        }
    }
}

/// Takes a place among `max_connections` and completes the handshake, or refuses the
/// peer. Returns the registered connection.
async fn admit<R: FrameReader, W: FrameWriter>(
    inner: &Arc<Inner>,
    reader: &mut R,
    writer: &mut W,
    peer: &str,
) -> Option<Arc<ConnectionState>> {
    let id = ConnectionId(inner.next_connection.fetch_add(1, Relaxed));

    // The place is taken before the handshake, so peers that open sockets and never
    // finish a HELLO count against max_connections like everyone else.
    let Some(place) = inner.registry.reserve(inner.config.max_connections) else {
        let detail = format!(
            "the broker is at its limit of {} connections",
            inner.config.max_connections
        );
        let refusal = (reason(ErrorCode::TooManyConnections, detail), false);
        refuse(inner, writer, reader.format(), refusal).await;
        // The peer's HELLO may still be on its way; reading it for a moment lets the
        // peer read the refusal instead of a reset.
        let limit = first_frame_limit(&inner.config, reader.may_speak_json());
        let drain = async { while let Ok(Some(_)) = reader.read_frame(limit).await {} };
        let _ = time::timeout(REFUSAL_DRAIN, drain).await;
        return None;
    };

    match handshake(inner, id, reader, peer, place).await {
        Ok(state) => {
            // WELCOME is written from here, before the writer starts: what was offered
            // to the connection since it was registered waits in the outbox behind it,
            // and a connection that is sent nothing more never gives its outbox or its
            // writer any room. A failed write ends the connection like any other.
            let config = &inner.config;
            let welcome = state.format.encode(&Frame::Welcome {
                version: PROTOCOL_VERSION,
                connection: id.0,
                user: Text::from(&*state.user),
                heartbeat_ms: config.heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
                max_frame: config.max_frame.min(u32::MAX as usize) as u32,
            });
            write_batch(writer, &mut vec![welcome], false, &state, inner).await;
            Some(state)
        }
        Err(Some(refusal)) => {
            refuse(inner, writer, reader.format(), refusal).await;
            None
        }
        Err(None) => None,
    }
}

/// Why a handshake failed, for the client; `None` when there is nobody to tell.
type Refusal = Option<(CloseReason, bool)>;

/// Reads `HELLO`, asks the host, registers the connection and queues `WELCOME`.
async fn handshake<R: FrameReader>(
    inner: &Arc<Inner>,
    id: ConnectionId,
    reader: &mut R,
    peer: &str,
    place: Place<'_>,
) -> Result<Arc<ConnectionState>, Refusal> {
    let config = &inner.config;
    let first = tokio::select! {
        _ = inner.stop_reading.cancelled() => {
            return Err(Some((reason(ErrorCode::ShuttingDown, "broker shutting down"), false)));
        }
        first = time::timeout(config.handshake_timeout, reader.read_frame(first_frame_limit(config, reader.may_speak_json()))) => first,
    };
    let bad = |code, detail: String| Err(Some((reason(code, detail), true)));
    let (user, token) = match first {
        Err(_) => {
            let detail = format!("no HELLO within {:?}", config.handshake_timeout);
            return Err(Some((reason(ErrorCode::HandshakeTimeout, detail), false)));
        }
        Ok(Ok(None)) | Ok(Err(ReadError::Io(_))) => return Err(None),
        Ok(Err(ReadError::Decode(e))) => return bad(e.code(), e.to_string()),
        Ok(Ok(Some(Frame::Hello {
            version,
            user,
            token,
        }))) => {
            if version != PROTOCOL_VERSION {
                let detail = format!(
                    "protocol version {version} is not supported; this broker speaks {PROTOCOL_VERSION}"
                );
                return bad(ErrorCode::UnsupportedVersion, detail);
            }
            (user, token)
        }
        Ok(Ok(Some(other))) => {
            let detail = format!("expected HELLO, got {}", other.name());
            return bad(ErrorCode::HandshakeRequired, detail);
        }
    };
    if let Err(detail) = inner.check_id("user", user.as_str()) {
        return bad(ErrorCode::InvalidId, detail);
    }

    // The host may refuse the connection or name its user.
    let mut user: Arc<str> = Arc::from(user.as_str());
    if let Some(hook) = &inner.hooks.on_connect {
        let info = ConnectInfo {
            connection: id,
            user: user.clone(),
            token,
            peer: peer.to_string(),
        };
        let refuse = |detail: String| Err(Some((reason(ErrorCode::Refused, detail), false)));
        // A hook still deciding when shutdown begins is dropped: shutdown waits for
        // every handshake, and must not wait on the host for ever.
        let admission = tokio::select! {
            _ = inner.stop_reading.cancelled() => None,
            admission = hooks::call_async("on_connect", &inner.counters, || hook(info)) => {
                Some(admission)
            }
        };
        let Some(admission) = admission else {
            return Err(Some((
                reason(ErrorCode::ShuttingDown, "broker shutting down"),
                false,
            )));
        };
        match admission {
            Some(Admission::Accept) => {}
            Some(Admission::AcceptAs(name)) => {
                if let Err(detail) = inner.check_id("user", &name) {
                    return refuse(format!("the host named an invalid user: {detail}"));
                }
                user = Arc::from(name);
            }
            Some(Admission::Refuse(why)) => return refuse(why),
            None => return refuse("the host failed to check the connection".to_string()),
        }
    }
    if inner.stop_reading.is_cancelled() {
        return Err(Some((
            reason(ErrorCode::ShuttingDown, "broker shutting down"),
            false,
        )));
    }

    let pulse = Pulse::new(inner);
    Ok(register(inner, id, user, reader.format(), pulse, place))
}

/// Registers a connection in the place it reserved, once its user is known (after the
/// handshake, or at once for a local connection), and ends the user's older
/// connections when the broker replaces them.
pub(crate) fn register(
    inner: &Inner,
    id: ConnectionId,
    user: Arc<str>,
    format: WireFormat,
    pulse: Pulse,
    place: Place<'_>,
) -> Arc<ConnectionState> {
    let config = &inner.config;
    let state = Arc::new(ConnectionState {
        id,
        user,
        format,
        outbox: Outbox::new(config.outbox_bytes, config.slow_consumer, format),
        memberships: Mutex::new(Memberships {
            sessions: HashSet::new(),
            gone: false,
        }),
        pulse,
    });
    let older = inner.registry.insert(&state, place);
    if config.replace_older_connections {
        for old in older {
            old.end(
                ErrorCode::Replaced,
                "replaced by a newer connection of the same user",
            );
        }
    }
    state
}

/// The largest first frame worth reading: a HELLO with the longest user id and token.
///
/// The JSON form spends bytes on keys and quotes, so a transport that may carry it is
/// allowed twice the binary size; that covers any id and token written without
/// escapes. A token written mostly in `\u` escapes, six bytes each, can still exceed it.
fn first_frame_limit(config: &crate::broker::Config, json: bool) -> usize {
    let hello = 1 + 1 + 2 + config.max_id_len + 2 + u16::MAX as usize;
    let hello = if json { 2 * hello } else { hello };
    config.max_frame.min(hello)
}

/// Tells a client its handshake failed, and closes.
async fn refuse<W: FrameWriter>(
    inner: &Inner,
    writer: &mut W,
    format: WireFormat,
    refusal: (CloseReason, bool),
) {
    let (why, bad_input) = refusal;
    inner.counters.refused.fetch_add(1, Relaxed);
    if bad_input {
        inner.counters.rejected.fetch_add(1, Relaxed);
    }
    warn!(code = ?why.code, reason = %why.reason, "handshake refused");
    if bad_input {
        inner.report_error(None, None, "", why.code, &why.reason);
    }

    let mut frames = vec![
        format.encode(&Frame::Error {
            request: 0,
            code: why.code,
            reason: Text::from(why.reason.as_str()),
        }),
        format.encode(&Frame::Close {
            code: why.code,
            reason: Text::from(why.reason),
        }),
    ];
    let limit = inner.config.write_timeout;
    let _ = time::timeout(limit, writer.write_frames(&mut frames)).await;
    let _ = time::timeout(limit, writer.close()).await;
}

/// Reads frames until the connection ends, and returns why it ended. Like [`run`], an
/// `async move` block, so that what it captures is kept once.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep each argument twice"
)]
fn read_loop<'a, R: FrameReader>(
    inner: &'a Inner,
    state: &'a Arc<ConnectionState>,
    reader: &'a mut R,
    peer: &'a str,
    reading: TaskTrackerToken,
) -> impl Future<Output = CloseReason> + Send + 'a {
    async move {
        // A block, so that nothing in it keeps its room in this future across the wait
        // at the end.
        {
            let config = &inner.config;
            let mut rate = config.publish_rate.map(RateLimit::new);
            let mut counted = reader.bytes_read();
            Counters::add(&inner.counters.bytes_in, counted);

            let end = loop {
                // Checked before each frame, so a peer whose frames are always ready is
                // still stopped; waiting for one, the reader is woken to look again.
                if state.outbox.is_closing() {
                    break ReadEnd::Close(reason(ErrorCode::Normal, "closed"));
                }
                if inner.reads_stopped() {
                    break ReadEnd::Shutdown;
                }
                // A block, so that nothing of the frame keeps its room in this future
                // across the wait for the ingress queue below, though moved out by then.
                let (worker, job) = {
                    let read = {
                        let mut read = pin!(reader.read_frame(config.max_frame));
                        poll_fn(|cx| {
                            if let Poll::Ready(read) = read.as_mut().poll(cx) {
                                return Poll::Ready(Some(read));
                            }
                            if state.outbox.poll_closed(cx).is_ready() || inner.reads_stopped() {
                                return Poll::Ready(None);
                            }
                            Poll::Pending
                        })
                        .await
                    };
                    let Some(read) = read else {
                        continue;
                    };
                    let total = reader.bytes_read();
                    Counters::add(&inner.counters.bytes_in, total - counted);
                    counted = total;

                    match on_frame(inner, state, peer, &mut rate, read) {
                        Ok(Some(queued)) => queued,
                        Ok(None) => continue,
                        Err(end) => break end,
                    }
                };
                let job = match inner.try_enqueue(worker, job) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(job)) => job,
                    Err(TrySendError::Closed(_)) => break ReadEnd::Shutdown,
                };
                // Only a full queue needs a waiting send. It goes on the heap, so that its
                // size is not part of every connection's future.
                if Box::pin(inner.enqueue(worker, job)).await.is_err() {
                    break ReadEnd::Shutdown;
                }
            };
            drop(reading);
            if let ReadEnd::Close(end) = end {
                return end;
            }
        }

        // A shutdown waits until every message already queued has reached the
        // outboxes, so this connection still gets what was sent to it before it is
        // closed.
        inner.drained.cancelled().await;
        reason(ErrorCode::ShuttingDown, "broker shutting down")
    }
}

/// Takes what one read gave: a frame is checked against the rate limit and acted on,
/// the end of the stream or an error ends the connection. A message comes back as a
/// job for the ingress queue of the worker that owns its target.
fn on_frame(
    inner: &Inner,
    state: &Arc<ConnectionState>,
    peer: &str,
    rate: &mut Option<RateLimit>,
    read: Result<Option<Frame>, ReadError>,
) -> Result<Option<(usize, Job)>, ReadEnd> {
    let frame = match read {
        Ok(Some(frame)) => frame,
        Ok(None) => {
            return Err(ReadEnd::Close(reason(
                ErrorCode::Normal,
                "closed by the client",
            )))
        }
        Err(ReadError::Io(e)) => {
            return Err(ReadEnd::Close(reason(
                ErrorCode::Normal,
                format!("transport error: {e}"),
            )))
        }
        Err(ReadError::Decode(e)) => {
            return Err(ReadEnd::Close(reject(
                inner,
                state,
                peer,
                e.code(),
                e.to_string(),
            )));
        }
    };
    // Silence is the heartbeat's to judge; a frame only sets a flag for it.
    state.pulse.heard();

    if let (Some(rate), Frame::Publish { request, .. } | Frame::Direct { request, .. }) =
        (rate, &frame)
    {
        if !rate.take() {
            let detail = "over this connection's message rate; message dropped".to_string();
            refuse_request(inner, state, *request, ErrorCode::RateLimited, detail);
            Counters::add(&inner.counters.dropped, 1);
            return Ok(None);
        }
    }
    handle(inner, state, peer, frame)
}

/// Acts on one frame from a connection past its handshake. A message comes back as a
/// job for the ingress queue of the worker that owns its target.
fn handle(
    inner: &Inner,
    state: &Arc<ConnectionState>,
    peer: &str,
    frame: Frame,
) -> Result<Option<(usize, Job)>, ReadEnd> {
    let config = &inner.config;
    match frame {
        Frame::Publish {
            request,
            session,
            payload,
        } => {
            if let Err(detail) = inner.check_id("session", session.as_str()) {
                refuse_request(inner, state, request, ErrorCode::InvalidId, detail);
                return Ok(None);
            }
            let worker = inner.worker_for(session.as_str());
            let job = Job::Publish {
                from: Some(state.clone()),
                session,
                payload,
            };
            Ok(Some((worker, job)))
        }
        Frame::Direct {
            request,
            user,
            payload,
        } => {
            if let Err(detail) = inner.check_id("user", user.as_str()) {
                refuse_request(inner, state, request, ErrorCode::InvalidId, detail);
                return Ok(None);
            }
            let worker = inner.worker_for(user.as_str());
            let job = Job::Direct {
                from: Some(state.clone()),
                user,
                payload,
                request,
            };
            Ok(Some((worker, job)))
        }
        Frame::Subscribe { request, session } => {
            if let Err(detail) = inner.check_id("session", session.as_str()) {
                refuse_request(inner, state, request, ErrorCode::InvalidId, detail);
                return Ok(None);
            }
            match inner
                .sessions
                .join(state, session.as_str(), config.max_sessions_per_connection)
            {
                Ok(_) => state.control(&Frame::Ok { request }, inner),
                Err(JoinError::TooMany) => {
                    let detail = format!(
                        "this connection is already in {} sessions, the limit",
                        config.max_sessions_per_connection
                    );
                    refuse_request(inner, state, request, ErrorCode::TooManySessions, detail);
                }
                Err(JoinError::Gone) => {}
            }
            Ok(None)
        }
        Frame::Unsubscribe { request, session } => {
            inner.sessions.leave(state, session.as_str());
            state.control(&Frame::Ok { request }, inner);
            Ok(None)
        }
        Frame::Ping => {
            state.control(&Frame::Pong, inner);
            Ok(None)
        }
        Frame::Pong => Ok(None),
        Frame::Close { .. } => Err(ReadEnd::Close(reason(
            ErrorCode::Normal,
            "closed by the client",
        ))),
        Frame::Hello { .. } => Err(ReadEnd::Close(reject(
            inner,
            state,
            peer,
            ErrorCode::HandshakeRequired,
            "HELLO after the handshake".to_string(),
        ))),
        other => {
            let detail = format!("{} frames are sent by the broker, not to it", other.name());
            Err(ReadEnd::Close(reject(
                inner,
                state,
                peer,
                ErrorCode::UnknownKind,
                detail,
            )))
        }
    }
}

/// Refuses one request; the connection goes on.
fn refuse_request(
    inner: &Inner,
    state: &ConnectionState,
    request: u32,
    code: ErrorCode,
    detail: String,
) {
    debug!(connection = %state.id, ?code, reason = %detail, "request refused");
    state.control(
        &Frame::Error {
            request,
            code,
            reason: Text::from(detail),
        },
        inner,
    );
}

/// Handles bad input past the handshake: counts it, tells the client, and returns
/// the reason to close with.
fn reject(
    inner: &Inner,
    state: &ConnectionState,
    peer: &str,
    code: ErrorCode,
    detail: String,
) -> CloseReason {
    inner.counters.rejected.fetch_add(1, Relaxed);
    warn!(connection = %state.id, user = %state.user, %peer, ?code, reason = %detail, "bad input; closing");
    inner.report_error(
        Some(state.id),
        Some(state.user.clone()),
        peer,
        code,
        &detail,
    );
    state.control(
        &Frame::Error {
            request: 0,
            code,
            reason: Text::from(detail.as_str()),
        },
        inner,
    );
    reason(code, detail)
}

/// Writes the outbox to the peer, a batch at a time, until the outbox closes. Like
/// [`run`], an `async move` block, so that what it captures is kept once.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep each argument twice"
)]
fn write_loop<'a, W: FrameWriter>(
    writer: &'a mut W,
    state: &'a ConnectionState,
    inner: &'a Inner,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let mut batch = Vec::new();
        loop {
            // What to do is decided apart from doing it: a value matched on here would
            // otherwise keep its room in this future across each wait.
            let step = match state.outbox.take(&mut batch) {
                Batch::Frames => Step::Write,
                Batch::Empty => Step::Wait,
                Batch::Quiet => {
                    batch = Vec::new();
                    writer.shrink();
                    continue;
                }
                Batch::Ping => {
                    batch.push(state.format.encode(&Frame::Ping));
                    Step::Ping
                }
                Batch::Closing(end) => {
                    batch.push(state.format.encode(&Frame::Close {
                        code: end.code,
                        reason: Text::from(end.reason),
                    }));
                    Step::Close
                }
            };

            match step {
                Step::Wait => state.outbox.ready().await,
                Step::Write => {
                    if !write_batch(writer, &mut batch, true, state, inner).await {
                        return;
                    }
                }
                Step::Ping => {
                    if !write_batch(writer, &mut batch, false, state, inner).await {
                        return;
                    }
                    // A ping comes when the connection is quiet and its room was given
                    // back; it takes none for itself.
                    batch = Vec::new();
                }
                Step::Close => {
                    if write_batch(writer, &mut batch, false, state, inner).await {
                        let limit = inner.config.write_timeout;
                        let _ = Box::pin(time::timeout(limit, writer.close())).await;
                    }
                    return;
                }
            }
        }
    }
}

/// What the writer does next.
enum Step {
    /// Write the batch taken from the outbox.
    Write,
    /// Wait for the outbox.
    Wait,
    /// Write the `PING` in the batch.
    Ping,
    /// Write the batch, which ends with `CLOSE`, and close the transport.
    Close,
}

/// Writes one batch within the write timeout; on failure ends the connection and
/// returns false. With `taken`, the frames came from the outbox, which stops counting
/// them once they are written: before `bytes_out` counts them, so that whoever sees
/// them counted sees the room they held given back.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep each argument twice"
)]
fn write_batch<'a, W: FrameWriter>(
    writer: &'a mut W,
    batch: &'a mut Vec<Bytes>,
    taken: bool,
    state: &'a ConnectionState,
    inner: &'a Inner,
) -> impl Future<Output = bool> + Send + 'a {
    async move {
        let bytes = batch.iter().map(|f| f.len() as u64).sum();

        // Most writes finish at once. Only one that has to wait gets a timer, on the
        // heap, so neither the timer nor its size are part of every connection.
        let result = {
            let mut write = pin!(writer.write_frames(batch));
            let mut timer: Option<Pin<Box<time::Sleep>>> = None;
            poll_fn(|cx| {
                if let Poll::Ready(result) = write.as_mut().poll(cx) {
                    return Poll::Ready(Ok(result));
                }
                let limit = inner.config.write_timeout;
                let timer = timer.get_or_insert_with(|| Box::pin(time::sleep(limit)));
                timer.as_mut().poll(cx).map(Err)
            })
            .await
        };
        batch.clear();
        match result {
            Ok(Ok(())) => {
                if taken {
                    state.outbox.written(bytes as usize);
                }
                Counters::add(&inner.counters.bytes_out, bytes);
                true
            }
            Ok(Err(e)) => {
                debug!(connection = %state.id, cause = %e, "write failed");
                state.end(ErrorCode::Normal, format!("transport error: {e}"));
                false
            }
            Err(()) => {
                let limit = inner.config.write_timeout;
                warn!(connection = %state.id, timeout = ?limit, "write timed out; closing");
                state.end(ErrorCode::SlowConsumer, "write timed out");
                false
            }
        }
    }
}

/// Tells a member of a change the host made to its sessions.
pub(crate) fn notify(
    inner: &Inner,
    state: &ConnectionState,
    kind: NoticeKind,
    subject: &str,
    text: &str,
) {
    state.control(
        &Frame::Notice {
            kind,
            request: 0,
            count: 0,
            subject: Text::from(subject),
            text: Text::from(text),
        },
        inner,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TcpTransport;
    use tokio_util::task::TaskTracker;

    /// Every connection holds the future of `run` for its whole life, in a task Tokio
    /// aligns to 128 bytes and adds about 110 bytes of its own to: up to 656 bytes, the
    /// task takes 768. Growing it past that costs every idle connection 128 bytes more.
    #[tokio::test]
    async fn the_future_of_a_tcp_connection_fits_its_budget() {
        let broker = crate::Broker::builder().build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let connection = TcpTransport::connection(server);

        let future = run(
            broker.inner().clone(),
            connection,
            TaskTracker::new().token(),
        );
        let size = std::mem::size_of_val(&future);
        assert!(size <= 656, "the connection's future takes {size} bytes");
    }
}
