//! The broker: its builder, its limits, the handle the host keeps, and shutdown.

use crate::cluster::{self, Cluster, ClusterBackend, ClusterErrorInfo};
use crate::connection::{self, ConnectionId, ConnectionState};
use crate::error::BrokerError;
use crate::frame::{ErrorCode, NoticeKind};
use crate::heartbeat;
use crate::hooks::{self, Admission, ConnectInfo, DisconnectInfo, ErrorInfo, Hooks, LagInfo};
use crate::message::Message;
use crate::outbox::SlowConsumerPolicy;
use crate::session::{self, Registry, Session, SessionMap};
use crate::stats::{Counters, Stats};
use crate::transport::{Connection, FrameReader, FrameWriter, Transport};
use crate::worker::{self, Job};
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long shutdown waits for a cluster backend to withdraw this node.
const CLUSTER_STOP: Duration = Duration::from_secs(5);

/// The broker's limits and tuning. Every field has a default and a builder setting;
/// docs/limits.md says what a client sees past each limit.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest frame accepted, length prefix excluded. Default 1 MiB.
    pub max_frame: usize,
    /// Live connections at most; the next handshake is refused. Default 100,000.
    pub max_connections: usize,
    /// Sessions one connection may belong to at once. Default 10,000.
    pub max_sessions_per_connection: usize,
    /// Longest session or user id, in bytes (at most 65,535). Default 256.
    pub max_id_len: usize,
    /// Bytes queued for one connection before the slow-consumer policy applies.
    /// Default 1 MiB. An empty outbox takes any one frame, so a message larger than
    /// this still reaches a member that keeps up.
    pub outbox_bytes: usize,
    /// What happens to a member whose outbox is full. Default
    /// [`SlowConsumerPolicy::Disconnect`].
    pub slow_consumer: SlowConsumerPolicy,
    /// Time allowed between accepting a connection and its `HELLO`. Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Each side sends a `PING` after this long without writing. Default 20 s. The
    /// interval in force is at most half of `idle_timeout`, so that clients that ping
    /// on it are never closed as idle; `build()` lowers it when needed.
    pub heartbeat_interval: Duration,
    /// One batch write that takes longer than this closes the connection. Default 10 s.
    pub write_timeout: Duration,
    /// Forwarding workers. Default: one per core.
    pub workers: usize,
    /// Messages each worker's ingress queue holds before readers wait. Default 4,096.
    pub ingress_capacity: usize,
    /// Whether a new connection of a user closes that user's older ones. Default
    /// false: a user may hold several connections (devices).
    pub replace_older_connections: bool,
    /// Messages (publishes and direct messages) one connection may send per second,
    /// with the burst it may send at once; `None` for no limit. Default `None`. A
    /// message over the rate is refused with an `ERROR` (code `RateLimited`) naming
    /// its request, and the connection goes on.
    pub publish_rate: Option<PublishRate>,
    /// In a cluster: messages waiting for the backend to carry them to other nodes.
    /// Default 65,536. A message that finds the queue full is not sent to other nodes;
    /// it is counted in [`Stats::cluster_failed`] and reported to `on_cluster_error`.
    pub cluster_queue: usize,
}

/// A per-connection limit on messages sent: a token bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PublishRate {
    /// Tokens added per second.
    pub per_second: f64,
    /// The bucket's size: how many messages may be sent at once after a quiet spell.
    pub burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame: 1024 * 1024,
            max_connections: 100_000,
            max_sessions_per_connection: 10_000,
            max_id_len: 256,
            outbox_bytes: 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(20),
            write_timeout: Duration::from_secs(10),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ingress_capacity: 4096,
            replace_older_connections: false,
            publish_rate: None,
            cluster_queue: 65_536,
        }
    }
}

/// Builds a [`Broker`]: limits and hooks.
///
/// ```
/// # #[tokio::main] async fn main() {
/// use std::time::Duration;
/// use switchboard::{Admission, Broker};
///
/// let broker = Broker::builder()
///     .max_frame(64 * 1024)
///     .idle_timeout(Duration::from_secs(30))
///     .on_connect(|info| async move {
///         if info.token.as_ref() == b"secret" {
///             Admission::Accept
///         } else {
///             Admission::Refuse("bad token".into())
///         }
///     })
///     .on_message(|message, reached| {
///         println!("{} -> {}: {} members", message.sender, message.target.id(), reached);
///     })
///     .build();
/// # drop(broker); }
/// ```
#[derive(Default)]
pub struct Builder {
    config: Config,
    hooks: Hooks,
    cluster: Option<Box<dyn ClusterBackend>>,
}

impl Builder {
    /// Replaces every setting at once.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// See [`Config::max_frame`].
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.config.max_frame = bytes;
        self
    }

    /// See [`Config::max_connections`].
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// See [`Config::max_sessions_per_connection`].
    pub fn max_sessions_per_connection(mut self, n: usize) -> Self {
        self.config.max_sessions_per_connection = n;
        self
    }

    /// See [`Config::max_id_len`].
    pub fn max_id_len(mut self, bytes: usize) -> Self {
        self.config.max_id_len = bytes;
        self
    }

    /// See [`Config::outbox_bytes`].
    pub fn outbox_bytes(mut self, bytes: usize) -> Self {
        self.config.outbox_bytes = bytes;
        self
    }

    /// See [`Config::slow_consumer`].
    pub fn slow_consumer(mut self, policy: SlowConsumerPolicy) -> Self {
        self.config.slow_consumer = policy;
        self
    }

    /// See [`Config::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.config.handshake_timeout = timeout;
        self
    }

    /// See [`Config::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// See [`Config::heartbeat_interval`].
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self
    }

    /// See [`Config::write_timeout`].
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// See [`Config::workers`].
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// See [`Config::ingress_capacity`].
    pub fn ingress_capacity(mut self, n: usize) -> Self {
        self.config.ingress_capacity = n;
        self
    }

    /// See [`Config::replace_older_connections`].
    pub fn replace_older_connections(mut self, replace: bool) -> Self {
        self.config.replace_older_connections = replace;
        self
    }

    /// See [`Config::publish_rate`].
    pub fn publish_rate(mut self, per_second: f64, burst: u32) -> Self {
        self.config.publish_rate = Some(PublishRate { per_second, burst });
        self
    }

    /// Called once for every message the broker forwards, after it was offered to
    /// every recipient, with how many took it.
    pub fn on_message(mut self, hook: impl Fn(&Message, usize) + Send + Sync + 'static) -> Self {
        self.hooks.on_message = Some(Arc::new(hook));
        self
    }

    /// Called for every handshake, before the connection is registered; decides
    /// whether it is accepted and as which user.
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(ConnectInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Admission> + Send + 'static,
    {
        self.hooks.on_connect = Some(Arc::new(move |info| Box::pin(hook(info))));
        self
    }

    /// Called once when a connection that completed its handshake ends.
    pub fn on_disconnect(mut self, hook: impl Fn(&DisconnectInfo) + Send + Sync + 'static) -> Self {
        self.hooks.on_disconnect = Some(Arc::new(hook));
        self
    }

    /// Called when a connection sends bad input or a transport fails to accept.
    pub fn on_error(mut self, hook: impl Fn(&ErrorInfo) + Send + Sync + 'static) -> Self {
        self.hooks.on_error = Some(Arc::new(hook));
        self
    }

    /// Called when a member could not keep up and lost messages or its connection.
    pub fn on_lag(mut self, hook: impl Fn(&LagInfo) + Send + Sync + 'static) -> Self {
        self.hooks.on_lag = Some(Arc::new(hook));
        self
    }

    /// Called when messages could not reach other nodes of a cluster, and when the
    /// cluster backend loses its engine. See [`crate::cluster`].
    pub fn on_cluster_error(
        mut self,
        hook: impl Fn(&ClusterErrorInfo) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_cluster_error = Some(Arc::new(hook));
        self
    }

    /// Makes this broker one node of a cluster: messages published here also reach
    /// members and users on the other nodes, through `backend`. See
    /// [`crate::cluster`], and [`crate::cluster::redis::RedisCluster`] (feature
    /// `redis`).
    pub fn cluster(mut self, backend: impl ClusterBackend) -> Self {
        self.cluster = Some(Box::new(backend));
        self
    }

    /// See [`Config::cluster_queue`].
    pub fn cluster_queue(mut self, messages: usize) -> Self {
        self.config.cluster_queue = messages;
        self
    }

    /// Builds the broker and starts its forwarding workers.
    ///
    /// # Panics
    ///
    /// Panics outside a Tokio runtime; when `workers`, `ingress_capacity` or
    /// `max_frame` is zero; when `max_id_len` is over 65,535; when
    /// `heartbeat_interval` or `idle_timeout` is under 1 ms; and when a publish rate
    /// is not positive.
    pub fn build(self) -> Broker {
        let config = self.config;
        assert!(config.workers > 0, "workers must be at least 1");
        assert!(
            config.ingress_capacity > 0,
            "ingress_capacity must be at least 1"
        );
        assert!(config.max_frame > 0, "max_frame must be at least 1");
        assert!(
            config.max_id_len <= u16::MAX as usize,
            "max_id_len is at most 65535"
        );
        assert!(
            config.heartbeat_interval >= Duration::from_millis(1)
                && config.idle_timeout >= Duration::from_millis(1),
            "heartbeat_interval and idle_timeout are at least 1 ms"
        );
        // F4: the largest DELIVER the broker can make must fit a u32 length.
        assert!(
            config.max_frame <= u32::MAX as usize - 27 - 2 * config.max_id_len,
            "max_frame leaves no room for a DELIVER's header within u32::MAX"
        );
        if let Some(rate) = config.publish_rate {
            assert!(
                rate.per_second > 0.0 && rate.burst > 0,
                "publish_rate needs a positive rate and burst"
            );
        }

        // Each side pings after a quiet heartbeat interval, so a heartbeat longer than
        // half the idle timeout would get well-behaved clients closed as idle.
        let mut config = config;
        config.heartbeat_interval = config.heartbeat_interval.min(config.idle_timeout / 2);

        let workers = config.workers;
        let mut queues = Vec::with_capacity(workers);
        let mut ingress = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel(config.ingress_capacity);
            ingress.push(tx);
            queues.push(rx);
        }

        assert!(config.cluster_queue > 0, "cluster_queue must be at least 1");
        let channels = self
            .cluster
            .is_some()
            .then(|| cluster::Channels::new(config.cluster_queue));
        let watch = channels.as_ref().map(|c| c.watch());
        let mut backend_task = None;
        let inner = Arc::new_cyclic(|weak| Inner {
            cluster: self.cluster.zip(channels).map(|(backend, channels)| {
                let (cluster, task) = cluster::prepare(backend, channels, weak.clone());
                backend_task = Some(task);
                cluster
            }),
            config,
            hooks: self.hooks,
            sessions: SessionMap::new(watch.clone()),
            registry: Registry::new(watch),
            counters: Counters::default(),
            ingress,
            host_sender: Arc::from(""),
            next_connection: AtomicU64::new(1),
            epoch: tokio::time::Instant::now(),
            stop_reading: CancellationToken::new(),
            drained: CancellationToken::new(),
            finished: CancellationToken::new(),
            shutting_down: AtomicBool::new(false),
            reading: TaskTracker::new(),
            connections: TaskTracker::new(),
        });
        for (index, queue) in queues.into_iter().enumerate() {
            tokio::spawn(worker::run(Arc::downgrade(&inner), index, workers, queue));
        }
        let tick = heartbeat::tick(&inner.config);
        tokio::spawn(heartbeat::run(Arc::downgrade(&inner), tick));
        if let (Some(cluster), Some(task)) = (&inner.cluster, backend_task) {
            *cluster.task.lock() = Some(tokio::spawn(task));
        }
        Broker { inner }
    }
}

/// Who a host call is about: every connection of a user, or one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// Every live connection of this user.
    User(String),
    /// One connection.
    Connection(ConnectionId),
}

impl From<&str> for Who {
    fn from(user: &str) -> Who {
        Who::User(user.to_string())
    }
}

impl From<String> for Who {
    fn from(user: String) -> Who {
        Who::User(user)
    }
}

impl From<&String> for Who {
    fn from(user: &String) -> Who {
        Who::User(user.clone())
    }
}

impl From<Arc<str>> for Who {
    fn from(user: Arc<str>) -> Who {
        Who::User(user.to_string())
    }
}

impl From<&Arc<str>> for Who {
    fn from(user: &Arc<str>) -> Who {
        Who::User(user.to_string())
    }
}

impl From<ConnectionId> for Who {
    fn from(id: ConnectionId) -> Who {
        Who::Connection(id)
    }
}

/// What the broker's parts share.
pub(crate) struct Inner {
    pub config: Config,
    pub hooks: Hooks,
    pub sessions: SessionMap,
    pub registry: Registry,
    pub counters: Counters,
    /// This node's side of a cluster, when it is one.
    pub cluster: Option<Cluster>,
    ingress: Vec<mpsc::Sender<Job>>,
    /// The sender of messages the host pushes: empty, which no user id can be.
    pub host_sender: Arc<str>,
    pub next_connection: AtomicU64,
    /// Where the heartbeat's clock starts.
    pub epoch: tokio::time::Instant,
    /// Cancelled when shutdown begins: accept loops and readers stop.
    pub stop_reading: CancellationToken,
    /// Cancelled once every message queued before shutdown reached the outboxes.
    pub drained: CancellationToken,
    /// Cancelled once shutdown is complete.
    finished: CancellationToken,
    shutting_down: AtomicBool,
    /// One token per connection still reading.
    reading: TaskTracker,
    /// One task per connection.
    connections: TaskTracker,
}

impl Inner {
    pub(crate) fn worker_for(&self, target: &str) -> usize {
        session::worker_of(target, self.ingress.len())
    }

    /// Queues a job, waiting while the worker's queue is full.
    pub(crate) async fn enqueue(&self, worker: usize, job: Job) -> Result<(), BrokerError> {
        self.ingress[worker]
            .send(job)
            .await
            .map_err(|_| BrokerError::ShuttingDown)
    }

    /// Whether readers are to stop: shutdown has begun.
    pub(crate) fn reads_stopped(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Queues a job if the worker's queue has room now.
    pub(crate) fn try_enqueue(&self, worker: usize, job: Job) -> Result<(), TrySendError<Job>> {
        self.ingress[worker].try_send(job)
    }

    /// Checks a session or user id: non-empty and within the length limit.
    pub(crate) fn check_id(&self, what: &str, id: &str) -> Result<(), String> {
        if id.is_empty() {
            return Err(format!("{what} id is empty"));
        }
        if id.len() > self.config.max_id_len {
            return Err(format!(
                "{what} id is {} bytes, over the limit of {}",
                id.len(),
                self.config.max_id_len
            ));
        }
        Ok(())
    }

    pub(crate) fn report_error(
        &self,
        connection: Option<ConnectionId>,
        user: Option<Arc<str>>,
        peer: &str,
        code: ErrorCode,
        detail: &str,
    ) {
        if let Some(hook) = &self.hooks.on_error {
            let info = ErrorInfo {
                connection,
                user,
                peer: peer.to_string(),
                code,
                detail: detail.to_string(),
            };
            hooks::call("on_error", &self.counters, || hook(&info));
        }
    }

    fn check_host_id(&self, id: &str) -> Result<(), BrokerError> {
        self.check_id("", id).map_err(|_| BrokerError::InvalidId {
            id: id.to_string(),
            max: self.config.max_id_len,
        })
    }

    fn resolve(&self, who: &Who) -> Vec<Arc<ConnectionState>> {
        match who {
            Who::User(user) => self.registry.of_user(user),
            Who::Connection(id) => self.registry.get(*id).into_iter().collect(),
        }
    }
}

/// The broker. Cheap to clone: every clone is a handle to the same broker.
///
/// See the crate documentation for an embedding example.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Starts building a broker.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Accepts connections from `transport` until shutdown begins or the transport
    /// runs out. Each connection runs on its own tasks; the returned future only
    /// accepts, so it can be spawned or awaited.
    pub fn serve<T: Transport>(
        &self,
        mut transport: T,
    ) -> impl Future<Output = ()> + Send + 'static {
        let broker = self.clone();
        async move {
            loop {
                let accepted = tokio::select! {
                    _ = broker.inner.stop_reading.cancelled() => return,
                    accepted = transport.accept() => accepted,
                };
                match accepted {
                    Ok(Some(connection)) => broker.accept(connection),
                    Ok(None) => return,
                    Err(e) => {
                        // Running out of file descriptors fails every accept until a
                        // connection closes; pausing keeps that from spinning.
                        warn!(cause = %e, "accept failed");
                        broker.inner.report_error(
                            None,
                            None,
                            "",
                            ErrorCode::Normal,
                            &e.to_string(),
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Hands the broker one connection the host accepted itself. The broker runs it
    /// to the end on its own tasks. During shutdown the connection is refused.
    pub fn accept<R: FrameReader, W: FrameWriter>(&self, connection: Connection<R, W>) {
        let inner = self.inner.clone();
        let reading = inner.reading.token();
        inner
            .connections
            .clone()
            .spawn(connection::run(inner, connection, reading));
    }

    /// Pushes `payload` from the host to every member of `session`. Waits while the
    /// ingress queue is full.
    ///
    /// # Errors
    ///
    /// Fails when the session id is invalid, the payload is over
    /// [`Config::max_frame`], or the broker is shutting down.
    pub async fn publish(
        &self,
        session: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        self.push(session, payload.into(), true).await
    }

    /// Sends `payload` from the host to every live connection of `user`. Waits while
    /// the ingress queue is full.
    ///
    /// # Errors
    ///
    /// Fails when the user id is invalid, the payload is over [`Config::max_frame`],
    /// or the broker is shutting down.
    pub async fn send_to(&self, user: &str, payload: impl Into<Bytes>) -> Result<(), BrokerError> {
        self.push(user, payload.into(), false).await
    }

    async fn push(&self, target: &str, payload: Bytes, session: bool) -> Result<(), BrokerError> {
        let inner = &self.inner;
        inner.check_host_id(target)?;
        if payload.len() > inner.config.max_frame {
            return Err(BrokerError::TooLarge {
                size: payload.len(),
                max: inner.config.max_frame,
            });
        }
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(BrokerError::ShuttingDown);
        }
        let job = if session {
            Job::Publish {
                from: None,
                session: target.into(),
                payload,
            }
        } else {
            Job::Direct {
                from: None,
                user: target.into(),
                payload,
                request: 0,
            }
        };
        inner.enqueue(inner.worker_for(target), job).await
    }

    /// Adds a user's connections (or one connection) to `session`; each gets a
    /// `Joined` notice. Returns how many connections joined.
    ///
    /// # Errors
    ///
    /// Fails when the session id is invalid. A connection already at its session
    /// limit is skipped.
    pub fn join(&self, who: impl Into<Who>, session: &str) -> Result<usize, BrokerError> {
        let inner = &self.inner;
        inner.check_host_id(session)?;
        let mut joined = 0;
        for conn in inner.resolve(&who.into()) {
            let limit = inner.config.max_sessions_per_connection;
            if let Ok(true) = inner.sessions.join(&conn, session, limit) {
                connection::notify(
                    inner,
                    &conn,
                    NoticeKind::Joined,
                    session,
                    "added by the host",
                );
                joined += 1;
            }
        }
        Ok(joined)
    }

    /// Removes a user's connections (or one connection) from `session`; each gets a
    /// `Left` notice. Returns how many connections left.
    pub fn leave(&self, who: impl Into<Who>, session: &str) -> usize {
        let inner = &self.inner;
        let mut left = 0;
        for conn in inner.resolve(&who.into()) {
            if inner.sessions.leave(&conn, session) {
                connection::notify(
                    inner,
                    &conn,
                    NoticeKind::Left,
                    session,
                    "removed by the host",
                );
                left += 1;
            }
        }
        left
    }

    /// Closes a session: every member leaves it and gets a `SessionClosed` notice with
    /// `reason`. Returns how many members it had; 0 when there was no such session.
    pub fn close_session(&self, session: &str, reason: &str) -> usize {
        let inner = &self.inner;
        let Some((id, members)) = inner.sessions.close(session) else {
            return 0;
        };
        for member in members.iter() {
            connection::notify(inner, member, NoticeKind::SessionClosed, &id, reason);
        }
        debug!(session = %id, members = members.len(), "session closed by the host");
        members.len()
    }

    /// Closes a user's connections (or one connection) with `reason`, after what is
    /// already queued for them. Returns how many connections it closed.
    pub fn disconnect(&self, who: impl Into<Who>, reason: &str) -> usize {
        let connections = self.inner.resolve(&who.into());
        for conn in &connections {
            conn.end(ErrorCode::ClosedByHost, reason);
        }
        connections.len()
    }

    /// A snapshot of one session, or `None` when it has no members.
    pub fn session(&self, id: &str) -> Option<Session> {
        self.inner.sessions.snapshot(id)
    }

    /// The broker's counters now.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        Stats {
            connections: inner.registry.connections(),
            users: inner.registry.users(),
            sessions: inner.sessions.len(),
            ..inner.counters.snapshot()
        }
    }

    /// Shuts the broker down: stops accepting and reading, delivers every message
    /// already queued, then closes every connection with the reason "broker shutting
    /// down" once its outbox is written. Resolves when every connection has ended.
    /// Calling it again, or from several tasks, waits for the same shutdown.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            inner.finished.cancelled().await;
            return;
        }
        info!(connections = inner.registry.connections(), "shutting down");

        // 1. No new connections, no new frames.
        inner.stop_reading.cancel();
        // Readers waiting for bytes look again and stop. A connection registered after
        // this sees the shutdown before it reads its first frame.
        let mut connections = Vec::new();
        for shard in 0..session::SHARDS {
            inner.registry.connections_in(shard, &mut connections);
            for connection in connections.drain(..) {
                connection.outbox.wake_reader();
            }
        }
        inner.reading.close();
        inner.reading.wait().await;

        // 2. Everything queued so far reaches the outboxes: a marker behind it on
        //    every ingress queue comes out last.
        for queue in &inner.ingress {
            let (done, drained) = oneshot::channel();
            if queue.send(Job::Drain(done)).await.is_ok() {
                let _ = drained.await;
            }
        }
        inner.drained.cancel();

        // 3. In a cluster, the backend carries what the workers handed it, withdraws
        //    this node's registrations and stops.
        if let Some(cluster) = &inner.cluster {
            cluster.stop.cancel();
            let task = cluster.task.lock().take();
            if let Some(task) = task {
                if tokio::time::timeout(CLUSTER_STOP, task).await.is_err() {
                    warn!(timeout = ?CLUSTER_STOP, "the cluster backend did not stop in time");
                }
            }
        }

        // 4. Each connection writes what it has, then its close frame.
        inner.connections.close();
        inner.connections.wait().await;
        info!("shut down");
        inner.finished.cancel();
    }
}

#[cfg(test)]
impl Broker {
    /// What the broker's parts share, for tests inside the crate.
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}
