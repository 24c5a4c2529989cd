//! The broker: its builder, its limits, the handle the host keeps, and shutdown.

use crate::cluster::{self, Cluster, ClusterBackend, ClusterErrorInfo};
use crate::connection::{self, ConnectionId, ConnectionState};
use crate::error::{BrokerError, ClientError};
use crate::frame::{ErrorCode, NoticeKind};
use crate::heartbeat;
use crate::hooks::{self, Admission, ConnectInfo, DisconnectInfo, ErrorInfo, Hooks, LagInfo};
use crate::local::LocalConnection;
use crate::message::Message;
use crate::outbox::SlowConsumerPolicy;
use crate::session::{self, Registry, Session, SessionMap};
use crate::stats::{Counters, Stats};
use crate::transport::{Connection, FrameReader, FrameWriter, Transport};
use crate::worker::{self, Job};
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
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
    /// One write to a connection (a batch of at most 64 KiB, or one larger frame) that
    /// takes longer than this closes the connection. Default 10 s.
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
    ///
    /// The hook runs on the forwarding worker that owns the message's target, between
    /// that message and the next: a hook that blocks holds up every session and user
    /// of that worker. It also holds up the task the worker woke last, which Tokio
    /// keeps for that thread: a connection that was waiting for room on the ingress
    /// queue, say. Hand slow work (a database write, a network call) to a task or
    /// a channel of your own; a hook that must wait should wait inside
    /// `tokio::task::block_in_place`, which hands the thread's other tasks on. The
    /// same holds for `on_disconnect`, `on_error` and `on_lag`, which run on
    /// connection tasks and workers.
    pub fn on_message(mut self, hook: impl Fn(&Message, usize) + Send + Sync + 'static) -> Self {
        self.hooks.on_message = Some(Arc::new(hook));
        self
    }

    /// Called for every handshake, before the connection is registered; decides
    /// whether it is accepted and as which user. A hook that panics, in its body or in
    /// its future, refuses the connection. When shutdown begins while the future is
    /// still pending, it is dropped and the client is refused as shutting down.
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

    /// Called when messages could not reach other nodes of a cluster, and once per
    /// outage when the cluster backend loses its engine or cannot reach it from the
    /// start. See [`crate::cluster`].
    pub fn on_cluster_error(
        mut self,
        hook: impl Fn(&ClusterErrorInfo) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_cluster_error = Some(Arc::new(hook));
        self
    }

    /// Makes this broker one node of a cluster: messages published here also reach
    /// members and users on the other nodes, through `backend`. See
    /// [`crate::cluster`], and `cluster::redis::RedisCluster` (feature `redis`).
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
        // The largest DELIVER the broker can make must fit a u32 length.
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
    pub connections: TaskTracker,
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

    /// Queues a job that the host's own code sends (through [`Broker::publish`] and
    /// [`Broker::send_to`], or a local connection), unless shutdown has begun; waits
    /// while the worker's queue is full.
    ///
    /// A job this takes is one shutdown delivers: shutdown waits for the call, as it
    /// waits for a connection's reader, before it queues the marker that comes out
    /// behind everything. Checking for shutdown and then queueing, with nothing held,
    /// would let a job slip in behind that marker and reach outboxes already closing.
    pub(crate) async fn enqueue_unless_stopped(
        &self,
        worker: usize,
        job: Job,
    ) -> Result<(), BrokerError> {
        let reading = self.reading.token();
        // Pairs with the fence in `shutdown`: either this sees shutdown begun, or
        // shutdown's wait for readers sees this token.
        fence(Ordering::SeqCst);
        if self.reads_stopped() {
            return Err(BrokerError::ShuttingDown);
        }
        let sent = self.enqueue(worker, job).await;
        drop(reading);
        sent
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
/// The host drives it through these methods. [`serve`](Broker::serve) and
/// [`accept`](Broker::accept) bring connections in. [`publish`](Broker::publish) and
/// [`send_to`](Broker::send_to) push messages from the host. [`join`](Broker::join),
/// [`leave`](Broker::leave), [`close_session`](Broker::close_session) and
/// [`disconnect`](Broker::disconnect) change who is where, and say how many connections
/// they changed. [`session`](Broker::session) and [`stats`](Broker::stats) read the
/// state, and [`shutdown`](Broker::shutdown) ends it all.
///
/// `join`, `leave` and `close_session` change the session map before they return, so a
/// message published after one of them sees the change. `disconnect` only asks: the
/// connections end on their own tasks a moment later. None of them blocks on a peer,
/// and each may be called from inside a hook. In a cluster they act on this node's
/// connections only, while `publish` and `send_to` reach every node.
///
/// See the crate documentation for an embedding example.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Starts building a broker; [`Builder`] lists the settings and hooks.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use switchboard::Broker;
    ///
    /// let broker = Broker::builder().max_connections(10).build();
    /// assert_eq!(broker.config().max_connections, 10);
    /// assert_eq!(broker.stats().connections, 0);
    /// # }
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The settings in force: the builder's, as [`Builder::build`] left them. The one
    /// setting it may change is [`Config::heartbeat_interval`], which it lowers to half
    /// of [`Config::idle_timeout`] when it was longer.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use std::time::Duration;
    /// use switchboard::Broker;
    ///
    /// let broker = Broker::builder()
    ///     .idle_timeout(Duration::from_secs(10))
    ///     .heartbeat_interval(Duration::from_secs(30))
    ///     .build();
    /// assert_eq!(broker.config().idle_timeout, Duration::from_secs(10));
    /// assert_eq!(broker.config().heartbeat_interval, Duration::from_secs(5));
    /// # }
    /// ```
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Accepts connections from `transport` until shutdown begins or the transport
    /// runs out.
    ///
    /// The returned future holds its own handle to the broker, so it can be spawned as
    /// it is, with no clone of the broker first, or awaited. It only accepts: each
    /// connection runs on a task of its own from its handshake to its end, and carries
    /// on after the future has finished. Several transports can be served at once, each
    /// by its own future, and their connections meet in the same sessions.
    ///
    /// The future finishes when [`shutdown`](Broker::shutdown) begins, or when the
    /// transport's [`accept`](Transport::accept) returns `Ok(None)`; a
    /// [`MemoryTransport`](crate::MemoryTransport) does that once its connectors are
    /// all dropped. An error from `accept` does not end it: the error is logged and
    /// passed to the `on_error` hook (with no connection, and [`ErrorCode::Normal`]),
    /// and accepting resumes after a pause of 50 ms, so that a transport failing every
    /// call, out of file descriptors say, does not spin.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use switchboard::{Broker, Client, MemoryTransport};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// let serving = tokio::spawn(broker.serve(transport));
    ///
    /// let alice = Client::builder("alice").connect_memory(&connector).await?;
    ///
    /// // With no connector left the transport yields no more connections, and the
    /// // future finishes; the connection it accepted carries on.
    /// drop(connector);
    /// serving.await?;
    /// alice.subscribe("lobby").await?;
    /// assert_eq!(broker.session("lobby").map(|s| s.members.len()), Some(1));
    /// # Ok(()) }
    /// ```
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

    /// Hands the broker one connection the host accepted itself: for a host with an
    /// accept loop of its own, one that looks at each socket first or takes
    /// connections from a server it already runs.
    ///
    /// Returns at once. The handshake and everything after it run on the broker's
    /// tasks, exactly as for a connection from [`serve`](Broker::serve), under the same
    /// limits and hooks. A connection past [`Config::max_connections`], or whose
    /// handshake is bad, late or refused by `on_connect`, is sent an error frame and
    /// closed, and counted in [`Stats::connections_refused`]. Once shutdown has begun,
    /// every connection handed in is refused that way, as the broker shutting down.
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use switchboard::{Broker, Client, TcpTransport};
    /// use tokio::net::TcpListener;
    ///
    /// let broker = Broker::builder().build();
    /// let listener = TcpListener::bind("127.0.0.1:0").await?;
    /// let addr = listener.local_addr()?;
    ///
    /// // The host's own accept loop, handing each stream on.
    /// let host = broker.clone();
    /// tokio::spawn(async move {
    ///     while let Ok((stream, _peer)) = listener.accept().await {
    ///         host.accept(TcpTransport::connection(stream));
    ///     }
    /// });
    ///
    /// let alice = Client::builder("alice").connect_tcp(addr).await?;
    /// assert_eq!(alice.user(), "alice");
    /// assert_eq!(broker.stats().connections, 1);
    /// # Ok(()) }
    /// ```
    pub fn accept<R: FrameReader, W: FrameWriter>(&self, connection: Connection<R, W>) {
        let inner = self.inner.clone();
        let reading = inner.reading.token();
        inner
            .connections
            .clone()
            .spawn(connection::run(inner, connection, reading));
    }

    /// Opens a connection of `user` in the host's own process: a member of sessions
    /// and a user's connection like any other, whose events the host takes with
    /// [`LocalConnection::recv`] straight from its outbox, with no transport, no
    /// encoding of requests and no decoding task between. See [`crate::local`].
    ///
    /// The `on_connect` hook does not run: the host names the user itself. With
    /// [`Config::replace_older_connections`], the user's older connections are
    /// replaced as by any new one.
    ///
    /// # Errors
    ///
    /// [`ClientError::Refused`] with [`ErrorCode::InvalidId`] for an empty or
    /// over-long user id, [`ErrorCode::TooManyConnections`] at
    /// [`Config::max_connections`], and [`ErrorCode::ShuttingDown`] once shutdown has
    /// begun.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: a small task per local connection takes it out of the
    /// broker when it ends.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), switchboard::ClientError> {
    /// use switchboard::{Broker, Event};
    ///
    /// let broker = Broker::builder().build();
    /// let mut bot = broker.connect_local("bot")?;
    /// let alice = broker.connect_local("alice")?;
    /// bot.subscribe("lobby")?;
    /// alice.subscribe("lobby")?;
    ///
    /// alice.publish("lobby", "hi").await?;
    /// let Some(Event::Message(message)) = bot.recv().await else { panic!() };
    /// assert_eq!(&message.payload[..], b"hi");
    /// assert_eq!(broker.stats().connections, 2);
    ///
    /// drop(alice);
    /// bot.close();
    /// assert!(matches!(bot.recv().await, Some(Event::Closed { .. })));
    /// # Ok(()) }
    /// ```
    pub fn connect_local(&self, user: &str) -> Result<LocalConnection, ClientError> {
        LocalConnection::open(&self.inner, user)
    }

    /// Pushes `payload` from the host to every member of `session`.
    ///
    /// Resolves once the message is on the ingress queue, waiting while that queue is
    /// full; a forwarding worker delivers it after. `Ok` says that the broker took the
    /// message, not that anyone received it: a session with no members is no error,
    /// and the message then reaches nobody. The `on_message` hook tells how many
    /// members took each message, 0 for a session nobody is in. Members see an empty
    /// sender ([`Message::is_from_host`]), and none is skipped, since no connection
    /// sent it. Messages published one after another, each call awaited before the
    /// next, reach every member in that order. In a cluster the message also reaches
    /// the session's members on the other nodes.
    ///
    /// # Errors
    ///
    /// [`BrokerError::InvalidId`] when `session` is empty or longer than
    /// [`Config::max_id_len`]; [`BrokerError::TooLarge`] when the payload is over
    /// [`Config::max_frame`]; [`BrokerError::ShuttingDown`] once shutdown has begun. A
    /// message refused is not queued, and `on_message` does not run for it.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, BrokerError, Client, Event, MemoryTransport};
    /// use tokio::sync::mpsc;
    ///
    /// let (tx, mut reached) = mpsc::unbounded_channel();
    /// let broker = Broker::builder()
    ///     .on_message(move |message, n| {
    ///         let _ = tx.send((message.target.id().to_string(), n));
    ///     })
    ///     .build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// let mut alice = Client::builder("alice").connect_memory(&connector).await?;
    /// alice.subscribe("news").await?;
    ///
    /// broker.publish("news", "hello").await?;
    /// let Some(Event::Message(message)) = alice.next().await else { panic!() };
    /// assert!(message.is_from_host());
    /// assert_eq!(&message.payload[..], b"hello");
    /// assert_eq!(reached.recv().await, Some(("news".to_string(), 1)));
    ///
    /// // A session nobody is in takes the message, which reaches nobody.
    /// broker.publish("empty", "anyone?").await?;
    /// assert_eq!(reached.recv().await, Some(("empty".to_string(), 0)));
    ///
    /// let refused = broker.publish("", "no session").await;
    /// assert!(matches!(refused, Err(BrokerError::InvalidId { .. })));
    /// # Ok(()) }
    /// ```
    pub async fn publish(
        &self,
        session: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        self.push(session, payload.into(), true).await
    }

    /// Sends `payload` from the host, as a direct message, to every live connection of
    /// `user`.
    ///
    /// Resolves once the message is on the ingress queue, waiting while that queue is
    /// full. A user with no live connection is no error: the call returns `Ok(())` and
    /// the message reaches nobody. There is no sender to give a
    /// [`Notice::NotDelivered`](crate::Notice::NotDelivered) to, as a connection would
    /// get; the host learns it from the `on_message` hook instead, which runs for the
    /// message with `reached` 0. A connection that completes its handshake after the
    /// message was forwarded does not receive it. Connections see an empty sender
    /// ([`Message::is_from_host`]). In a cluster the message also reaches the user's
    /// connections on other nodes, and `reached` counts this node's only.
    ///
    /// # Errors
    ///
    /// [`BrokerError::InvalidId`] when `user` is empty or longer than
    /// [`Config::max_id_len`]; [`BrokerError::TooLarge`] when the payload is over
    /// [`Config::max_frame`]; [`BrokerError::ShuttingDown`] once shutdown has begun.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, Client, Event, MemoryTransport};
    /// use tokio::sync::mpsc;
    ///
    /// let (tx, mut reached) = mpsc::unbounded_channel();
    /// let broker = Broker::builder()
    ///     .on_message(move |message, n| {
    ///         let _ = tx.send((message.target.id().to_string(), n));
    ///     })
    ///     .build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// // Bob on two devices: both receive it.
    /// let mut phone = Client::builder("bob").connect_memory(&connector).await?;
    /// let mut laptop = Client::builder("bob").connect_memory(&connector).await?;
    /// broker.send_to("bob", "your order shipped").await?;
    /// for device in [&mut phone, &mut laptop] {
    ///     let Some(Event::Message(message)) = device.next().await else { panic!() };
    ///     assert_eq!(&message.payload[..], b"your order shipped");
    /// }
    /// assert_eq!(reached.recv().await, Some(("bob".to_string(), 2)));
    ///
    /// // Carol is not connected: still Ok, and on_message says it reached nobody.
    /// broker.send_to("carol", "your order shipped").await?;
    /// assert_eq!(reached.recv().await, Some(("carol".to_string(), 0)));
    /// # Ok(()) }
    /// ```
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
        inner
            .enqueue_unless_stopped(inner.worker_for(target), job)
            .await
    }

    /// Adds every live connection of a user, or one connection, to `session`, which
    /// comes into being with its first member. Each connection added gets a
    /// [`Notice::Joined`](crate::Notice::Joined).
    ///
    /// Returns how many connections it added. Two kinds are skipped, told nothing and
    /// not counted: a connection that is a member of `session` already, and one at its
    /// limit of [`Config::max_sessions_per_connection`]. A user with no live
    /// connection, or a connection id that is not live, gives `Ok(0)`; a connection
    /// still in its handshake is not live yet. A connection that is closing may be
    /// added and counted, and leaves the session again as it ends.
    ///
    /// # Errors
    ///
    /// [`BrokerError::InvalidId`] when `session` is empty or longer than
    /// [`Config::max_id_len`], whoever `who` names.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, Client, Event, MemoryTransport, Notice};
    ///
    /// let broker = Broker::builder().max_sessions_per_connection(1).build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// // Bob on two devices; the laptop is in one session already, its limit.
    /// let mut phone = Client::builder("bob").connect_memory(&connector).await?;
    /// let laptop = Client::builder("bob").connect_memory(&connector).await?;
    /// laptop.subscribe("chess").await?;
    ///
    /// assert_eq!(broker.join("bob", "news")?, 1); // the phone; the laptop is full
    /// assert_eq!(broker.join("bob", "news")?, 0); // the phone is a member already
    /// assert_eq!(broker.join(laptop.connection_id(), "chess")?, 0); // so is the laptop
    /// assert_eq!(broker.join("carol", "news")?, 0); // nobody connected as carol
    /// assert!(broker.join("bob", "").is_err());
    ///
    /// let joined = Notice::Joined { session: "news".into() };
    /// assert_eq!(phone.next().await, Some(Event::Notice(joined)));
    /// assert_eq!(broker.session("news").map(|s| s.members.len()), Some(1));
    /// # Ok(()) }
    /// ```
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

    /// Removes every live connection of a user, or one connection, from `session`.
    /// Each connection removed gets a [`Notice::Left`](crate::Notice::Left), and the
    /// session is freed when its last member leaves.
    ///
    /// Returns how many connections it removed. A connection that was not a member is
    /// told nothing and not counted, so an unknown session, a user with no live
    /// connection and a connection id that is not live all give 0. `leave` never
    /// fails: an id no session can have, empty or over the length limit, gives 0 too.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, Client, Event, MemoryTransport, Notice};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// let mut alice = Client::builder("alice").connect_memory(&connector).await?;
    /// alice.subscribe("news").await?;
    ///
    /// assert_eq!(broker.leave("alice", "news"), 1);
    /// assert_eq!(broker.leave("alice", "news"), 0); // not a member any more
    /// assert_eq!(broker.leave("alice", "sports"), 0); // no such session
    /// assert_eq!(broker.leave("carol", "news"), 0); // nobody connected as carol
    ///
    /// let left = Notice::Left { session: "news".into() };
    /// assert_eq!(alice.next().await, Some(Event::Notice(left)));
    /// assert!(broker.session("news").is_none()); // its last member left
    /// # Ok(()) }
    /// ```
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

    /// Closes `session`: every member leaves it and gets a
    /// [`Notice::SessionClosed`](crate::Notice::SessionClosed) carrying `reason`. The
    /// connections stay open, and may join a new session of the same name at once.
    ///
    /// Returns how many members the session had. A session with no members does not
    /// exist, so an unknown session, like an id no session can have, gives 0.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, Client, Event, MemoryTransport, Notice};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// let mut alice = Client::builder("alice").connect_memory(&connector).await?;
    /// let mut bob = Client::builder("bob").connect_memory(&connector).await?;
    /// alice.subscribe("standup").await?;
    /// bob.subscribe("standup").await?;
    ///
    /// assert_eq!(broker.close_session("standup", "meeting over"), 2);
    /// for member in [&mut alice, &mut bob] {
    ///     let closed = Notice::SessionClosed {
    ///         session: "standup".into(),
    ///         reason: "meeting over".into(),
    ///     };
    ///     assert_eq!(member.next().await, Some(Event::Notice(closed)));
    /// }
    /// assert!(broker.session("standup").is_none());
    /// assert_eq!(broker.close_session("standup", "again"), 0);
    /// # Ok(()) }
    /// ```
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

    /// Closes every live connection of a user, or one connection, with `reason`.
    ///
    /// Each connection is first written what is already queued for it, then a close
    /// frame with [`ErrorCode::ClosedByHost`] and `reason`; a
    /// [`Client`](crate::Client) sees it as [`Event::Closed`](crate::Event::Closed).
    /// The call does not wait for that: each connection ends on its own task, leaves
    /// its sessions, and `on_disconnect` runs for it with the same code and reason.
    ///
    /// Returns how many connections it began to close: 0 for a user with none, a
    /// connection id that is not live, or connections already closing. A connection
    /// already closing keeps the reason it was closing for, so calling `disconnect`
    /// twice in a row returns 0 the second time and the connections see the first
    /// reason.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, Client, ErrorCode, Event, MemoryTransport};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// let mut phone = Client::builder("mallory").connect_memory(&connector).await?;
    /// let mut laptop = Client::builder("mallory").connect_memory(&connector).await?;
    ///
    /// assert_eq!(broker.disconnect("mallory", "account suspended"), 2);
    /// // Already closing: not counted again, and the first reason stands.
    /// assert_eq!(broker.disconnect("mallory", "another reason"), 0);
    /// for device in [&mut phone, &mut laptop] {
    ///     let closed = Event::Closed {
    ///         code: ErrorCode::ClosedByHost,
    ///         reason: "account suspended".into(),
    ///     };
    ///     assert_eq!(device.next().await, Some(closed));
    /// }
    /// assert_eq!(broker.disconnect("carol", "nobody here"), 0);
    /// # Ok(()) }
    /// ```
    pub fn disconnect(&self, who: impl Into<Who>, reason: &str) -> usize {
        let connections = self.inner.resolve(&who.into());
        connections
            .iter()
            .filter(|conn| conn.end(ErrorCode::ClosedByHost, reason))
            .count()
    }

    /// A snapshot of session `id`: its members and when its first member joined.
    ///
    /// `None` when the session has no members, since a session exists only while it
    /// has some; an id no session can have gives `None` too. The snapshot is a copy and
    /// does not follow later changes. Its members are listed in no particular order.
    /// In a cluster it lists this node's members only.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use switchboard::{Broker, Client, MemoryTransport};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// let phone = Client::builder("alice").connect_memory(&connector).await?;
    /// let laptop = Client::builder("alice").connect_memory(&connector).await?;
    /// phone.subscribe("lobby").await?;
    /// laptop.subscribe("lobby").await?;
    ///
    /// let lobby = broker.session("lobby").expect("two members");
    /// assert_eq!(&*lobby.id, "lobby");
    /// let mut members: Vec<_> = lobby.members.iter().map(|m| m.connection).collect();
    /// members.sort();
    /// let mut devices = vec![phone.connection_id(), laptop.connection_id()];
    /// devices.sort();
    /// assert_eq!(members, devices);
    /// assert!(lobby.members.iter().all(|m| &*m.user == "alice"));
    ///
    /// assert!(broker.session("empty").is_none());
    /// # Ok(()) }
    /// ```
    pub fn session(&self, id: &str) -> Option<Session> {
        self.inner.sessions.snapshot(id)
    }

    /// The broker's counters now.
    ///
    /// The gauges ([`Stats::connections`], [`Stats::users`], [`Stats::sessions`]) are
    /// current: a connection counts once its handshake is done, and stops counting as
    /// it is cleaned up. The message counters are added to after each batch a worker
    /// forwards, so they may trail the `on_message` hook by a batch. The fields are
    /// read one after another, not as one atomic snapshot, so under traffic they may
    /// disagree with each other by the messages in flight.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use switchboard::{Broker, Client, MemoryTransport};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// tokio::spawn(broker.serve(transport));
    ///
    /// let phone = Client::builder("alice").connect_memory(&connector).await?;
    /// let _laptop = Client::builder("alice").connect_memory(&connector).await?;
    /// let _bob = Client::builder("bob").connect_memory(&connector).await?;
    /// phone.subscribe("lobby").await?;
    ///
    /// let stats = broker.stats();
    /// assert_eq!(stats.connections, 3);
    /// assert_eq!(stats.users, 2);
    /// assert_eq!(stats.sessions, 1);
    /// # Ok(()) }
    /// ```
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
    /// A [local connection](crate::local) is closed at the same point, but its outbox
    /// is the host's to read: what was queued for it is still handed out by
    /// [`LocalConnection::recv`] after this returns, then the close.
    /// Calling it again, or from several tasks, waits for the same shutdown.
    ///
    /// In order: the futures from [`serve`](Broker::serve) finish; connections still
    /// in their handshake are refused as shutting down, and an `on_connect` hook still
    /// deciding is dropped; each connection stops reading, so a frame not read yet is
    /// not acted on. Every message queued before then, from connections or from the
    /// host, then reaches the outboxes, and each connection is closed with
    /// [`ErrorCode::ShuttingDown`] after its outbox is written. In a cluster the node
    /// withdraws from the other nodes before the connections close, waiting up to
    /// 5 s for its backend. From the moment shutdown begins,
    /// [`publish`](Broker::publish) and [`send_to`](Broker::send_to) fail with
    /// [`BrokerError::ShuttingDown`] and [`accept`](Broker::accept) refuses every
    /// connection. A call that began before and still waits for room on the ingress
    /// queue, from the host or from a [`LocalConnection`], is waited for, and its
    /// message delivered. A broker that has shut down stays down.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use switchboard::{Broker, BrokerError, Client, ErrorCode, Event, MemoryTransport};
    ///
    /// let broker = Broker::builder().build();
    /// let (transport, connector) = MemoryTransport::new();
    /// let serving = tokio::spawn(broker.serve(transport));
    ///
    /// let mut alice = Client::builder("alice").connect_memory(&connector).await?;
    /// alice.subscribe("news").await?;
    /// broker.publish("news", "last edition").await?;
    ///
    /// broker.shutdown().await;
    /// serving.await?;
    ///
    /// // What was queued is delivered before the close.
    /// let Some(Event::Message(message)) = alice.next().await else { panic!() };
    /// assert_eq!(&message.payload[..], b"last edition");
    /// let Some(Event::Closed { code, .. }) = alice.next().await else { panic!() };
    /// assert_eq!(code, ErrorCode::ShuttingDown);
    ///
    /// let refused = broker.publish("news", "too late").await;
    /// assert_eq!(refused, Err(BrokerError::ShuttingDown));
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            inner.finished.cancelled().await;
            return;
        }
        // Pairs with the fence in `Inner::enqueue_unless_stopped`.
        fence(Ordering::SeqCst);
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
