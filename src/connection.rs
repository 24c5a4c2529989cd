//! One connection's life: handshake, the reader loop, the writer loop, and cleanup.
//!
//! The reader validates each frame, stamps the sender and queues the message on the
//! ingress queue of the worker that owns its target; it waits there when the workers
//! fall behind, which slows that publisher and nobody else. The writer drains the
//! outbox a batch at a time. Neither ever touches another connection.

use crate::broker::{Inner, PublishRate};
use crate::error::ReadError;
use crate::frame::{ErrorCode, Frame, NoticeKind, Text, PROTOCOL_VERSION};
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
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::time::{self, Instant};
use tokio_util::sync::CancellationToken;
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
    pub outbox: Outbox,
    pub memberships: Mutex<Memberships>,
    /// Cancelled when the connection must end for a reason its reader cannot see (an
    /// overflowing outbox, the host, a failed write).
    closed: CancellationToken,
}

pub(crate) struct Memberships {
    pub sessions: HashSet<Arc<str>>,
    /// Set once cleanup began; no session may take the connection after that.
    pub gone: bool,
}

impl ConnectionState {
    /// Offers a message frame to this member; counts and reports what was lost.
    /// Returns true when it was queued.
    /// Offers a message frame to this member; counts and reports what was lost.
    /// Returns whether it was queued, and whether the member's writer is due a wake-up
    /// ([`Outbox::wake`]), which is left to the caller so that it can offer a whole
    /// batch first.
    pub(crate) fn deliver(&self, frame: Bytes, inner: &Inner) -> (bool, bool) {
        let (offer, wake) = self.outbox.offer_unwoken(frame);
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
        self.closed.cancel();
        inner.counters.slow_consumers.fetch_add(1, Relaxed);
        warn!(connection = %self.id, user = %self.user, "slow consumer: outbox full, closing");
    }

    /// Ends the connection: what is queued is still written, then a `CLOSE` frame.
    /// Returns false when it was closing already, for an earlier reason that stands.
    pub(crate) fn end(&self, code: ErrorCode, reason: impl Into<String>) -> bool {
        let first = self.outbox.close(code, reason);
        self.closed.cancel();
        first
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
pub(crate) async fn run<R: FrameReader, W: FrameWriter>(
    inner: Arc<Inner>,
    conn: Connection<R, W>,
    reading: TaskTrackerToken,
) {
    let Connection {
        mut reader,
        mut writer,
        peer,
    } = conn;
    let id = ConnectionId(inner.next_connection.fetch_add(1, Relaxed));

    // The place is taken before the handshake, so peers that open sockets and never
    // finish a HELLO count against max_connections like everyone else.
    let Some(place) = inner.registry.reserve(inner.config.max_connections) else {
        let detail = format!(
            "the broker is at its limit of {} connections",
            inner.config.max_connections
        );
        let refusal = (reason(ErrorCode::TooManyConnections, detail), false);
        refuse(&inner, &mut writer, reader.format(), refusal).await;
        // The peer's HELLO may still be on its way; reading it for a moment lets the
        // peer read the refusal instead of a reset.
        let limit = first_frame_limit(&inner.config, reader.may_speak_json());
        let drain = async { while let Ok(Some(_)) = reader.read_frame(limit).await {} };
        let _ = time::timeout(REFUSAL_DRAIN, drain).await;
        return;
    };

    let state = match handshake(&inner, id, &mut reader, &peer, place).await {
        Ok(state) => state,
        Err(Some(refusal)) => {
            refuse(&inner, &mut writer, reader.format(), refusal).await;
            return;
        }
        Err(None) => return,
    };
    debug!(connection = %id, user = %state.user, %peer, "connected");

    let writer = tokio::spawn(write_loop(writer, state.clone(), inner.clone()));
    let end = read_loop(&inner, &state, &mut reader, &peer).await;
    drop(reader);
    drop(reading);

    // A shutdown waits until every message already queued has reached the outboxes,
    // so this connection still gets what was sent to it before it is closed.
    let end = match end {
        ReadEnd::Close(end) => end,
        ReadEnd::Shutdown => {
            inner.drained.cancelled().await;
            reason(ErrorCode::ShuttingDown, "broker shutting down")
        }
    };

    inner.sessions.leave_all(&state);
    inner.registry.remove(&state);
    state.outbox.close(end.code, end.reason);
    let end = state
        .outbox
        .closing()
        .unwrap_or_else(|| reason(ErrorCode::Normal, ""));
    let _ = writer.await;

    debug!(connection = %id, user = %state.user, code = ?end.code, reason = %end.reason, "disconnected");
    if let Some(hook) = &inner.hooks.on_disconnect {
        let info = DisconnectInfo {
            connection: id,
            user: state.user.clone(),
            code: end.code,
            reason: end.reason,
        };
        hooks::call("on_disconnect", &inner.counters, || hook(&info));
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

    let format = reader.format();
    let state = Arc::new(ConnectionState {
        id,
        user,
        format,
        outbox: Outbox::new(config.outbox_bytes, config.slow_consumer, format),
        memberships: Mutex::new(Memberships {
            sessions: HashSet::new(),
            gone: false,
        }),
        closed: CancellationToken::new(),
    });
    // WELCOME goes first in the outbox: once registered, the connection can be sent
    // messages and notices at any moment.
    state.control(
        &Frame::Welcome {
            version: PROTOCOL_VERSION,
            connection: id.0,
            user: Text::from(&*state.user),
            heartbeat_ms: config.heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
            max_frame: config.max_frame.min(u32::MAX as usize) as u32,
        },
        inner,
    );
    let older = inner.registry.insert(&state, place);
    if config.replace_older_connections {
        for old in older {
            old.end(
                ErrorCode::Replaced,
                "replaced by a newer connection of the same user",
            );
        }
    }

    Ok(state)
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

/// Reads frames until the connection ends.
async fn read_loop<R: FrameReader>(
    inner: &Inner,
    state: &Arc<ConnectionState>,
    reader: &mut R,
    peer: &str,
) -> ReadEnd {
    let config = &inner.config;

    // Silence is checked on a tick instead of arming a timer per frame: a frame only
    // sets a flag, and the tick that sees it takes its own time as the last time
    // heard, up to one tick late. Ticking at half the heartbeat interval closes a
    // silent peer within the idle timeout plus one heartbeat interval.
    let tick = config.heartbeat_interval.min(config.idle_timeout) / 2;
    let mut ticks = time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut heard = false;
    let mut rate = config.publish_rate.map(RateLimit::new);
    let mut counted = reader.bytes_read();
    Counters::add(&inner.counters.bytes_in, counted);

    loop {
        let frame = tokio::select! {
            biased;
            _ = state.closed.cancelled() => {
                return ReadEnd::Close(reason(ErrorCode::Normal, "closed"));
            }
            _ = inner.stop_reading.cancelled() => return ReadEnd::Shutdown,
            now = ticks.tick() => {
                if heard {
                    heard = false;
                    last_heard = now;
                } else if now.duration_since(last_heard) >= config.idle_timeout {
                    let detail = format!("nothing received for {:?}", config.idle_timeout);
                    debug!(connection = %state.id, "idle timeout");
                    return ReadEnd::Close(reason(ErrorCode::IdleTimeout, detail));
                }
                continue;
            }
            frame = reader.read_frame(config.max_frame) => frame,
        };
        let total = reader.bytes_read();
        Counters::add(&inner.counters.bytes_in, total - counted);
        counted = total;

        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return ReadEnd::Close(reason(ErrorCode::Normal, "closed by the client")),
            Err(ReadError::Io(e)) => {
                return ReadEnd::Close(reason(ErrorCode::Normal, format!("transport error: {e}")))
            }
            Err(ReadError::Decode(e)) => {
                return ReadEnd::Close(reject(inner, state, peer, e.code(), e.to_string()));
            }
        };
        heard = true;

        if let (Some(rate), Frame::Publish { request, .. } | Frame::Direct { request, .. }) =
            (&mut rate, &frame)
        {
            if !rate.take() {
                let detail = "over this connection's message rate; message dropped".to_string();
                refuse_request(inner, state, *request, ErrorCode::RateLimited, detail);
                Counters::add(&inner.counters.dropped, 1);
                continue;
            }
        }
        if let Err(end) = handle(inner, state, peer, frame).await {
            return end;
        }
    }
}

/// Acts on one frame from a connection past its handshake.
async fn handle(
    inner: &Inner,
    state: &Arc<ConnectionState>,
    peer: &str,
    frame: Frame,
) -> Result<(), ReadEnd> {
    let config = &inner.config;
    match frame {
        Frame::Publish {
            request,
            session,
            payload,
        } => {
            if let Err(detail) = inner.check_id("session", session.as_str()) {
                refuse_request(inner, state, request, ErrorCode::InvalidId, detail);
                return Ok(());
            }
            let worker = inner.worker_for(session.as_str());
            let job = Job::Publish {
                from: Some(state.clone()),
                session,
                payload,
            };
            inner
                .enqueue(worker, job)
                .await
                .map_err(|_| ReadEnd::Shutdown)
        }
        Frame::Direct {
            request,
            user,
            payload,
        } => {
            if let Err(detail) = inner.check_id("user", user.as_str()) {
                refuse_request(inner, state, request, ErrorCode::InvalidId, detail);
                return Ok(());
            }
            let worker = inner.worker_for(user.as_str());
            let job = Job::Direct {
                from: Some(state.clone()),
                user,
                payload,
                request,
            };
            inner
                .enqueue(worker, job)
                .await
                .map_err(|_| ReadEnd::Shutdown)
        }
        Frame::Subscribe { request, session } => {
            if let Err(detail) = inner.check_id("session", session.as_str()) {
                refuse_request(inner, state, request, ErrorCode::InvalidId, detail);
                return Ok(());
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
            Ok(())
        }
        Frame::Unsubscribe { request, session } => {
            inner.sessions.leave(state, session.as_str());
            state.control(&Frame::Ok { request }, inner);
            Ok(())
        }
        Frame::Ping => {
            state.control(&Frame::Pong, inner);
            Ok(())
        }
        Frame::Pong => Ok(()),
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

/// Bytes handed to the transport in one write, at most (or one frame, when larger).
const WRITE_CHUNK: usize = 64 * 1024;

/// Writes the outbox to the peer, a batch at a time, until the outbox closes.
async fn write_loop<W: FrameWriter>(mut writer: W, state: Arc<ConnectionState>, inner: Arc<Inner>) {
    let heartbeat = inner.config.heartbeat_interval;
    let limit = inner.config.write_timeout;
    let mut ticks = time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticks.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut wrote = false;
    let mut batch = Vec::new();
    let mut chunk = Vec::new();

    loop {
        match state.outbox.take(&mut batch) {
            Batch::Frames => {}
            Batch::Empty => {
                tokio::select! {
                    _ = state.outbox.ready() => {}
                    _ = ticks.tick() => {
                        // A PING only after a quiet interval: traffic is proof of life.
                        if !std::mem::take(&mut wrote) {
                            let mut ping = vec![state.format.encode(&Frame::Ping)];
                            if !write_batch(&mut writer, &mut ping, &state, &inner).await {
                                return;
                            }
                        }
                    }
                }
                continue;
            }
            Batch::Closing(end) => {
                batch.push(state.format.encode(&Frame::Close {
                    code: end.code,
                    reason: Text::from(end.reason),
                }));
                if write_batch(&mut writer, &mut batch, &state, &inner).await {
                    let _ = time::timeout(limit, writer.close()).await;
                }
                return;
            }
        }

        // Written a chunk at a time, each released from the outbox's count once it is
        // out: a member is charged for what it has not received, not for the part of a
        // large batch that already reached it.
        let mut next = 0;
        while next < batch.len() {
            let mut bytes = 0;
            while next < batch.len()
                && (chunk.is_empty() || bytes + batch[next].len() <= WRITE_CHUNK)
            {
                bytes += batch[next].len();
                chunk.push(std::mem::take(&mut batch[next]));
                next += 1;
            }
            if !write_batch(&mut writer, &mut chunk, &state, &inner).await {
                return;
            }
            state.outbox.written(bytes);
        }
        batch.clear();
        wrote = true;
    }
}

/// Writes one batch within the write timeout; on failure ends the connection and
/// returns false.
async fn write_batch<W: FrameWriter>(
    writer: &mut W,
    batch: &mut Vec<Bytes>,
    state: &ConnectionState,
    inner: &Inner,
) -> bool {
    let limit = inner.config.write_timeout;
    let bytes = batch.iter().map(|f| f.len() as u64).sum();
    let result = time::timeout(limit, writer.write_frames(batch)).await;
    batch.clear();
    match result {
        Ok(Ok(())) => {
            Counters::add(&inner.counters.bytes_out, bytes);
            true
        }
        Ok(Err(e)) => {
            debug!(connection = %state.id, cause = %e, "write failed");
            let _ = state.end(ErrorCode::Normal, format!("transport error: {e}"));
            false
        }
        Err(_) => {
            warn!(connection = %state.id, timeout = ?limit, "write timed out; closing");
            let _ = state.end(ErrorCode::SlowConsumer, "write timed out");
            false
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
