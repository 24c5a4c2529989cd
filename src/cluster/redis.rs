//! The Redis backend (feature `redis`): several brokers as one, through one Redis
//! server.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard::cluster::redis::RedisCluster;
//! use switchboard::Broker;
//!
//! let broker = Broker::builder()
//!     .cluster(RedisCluster::new("redis://127.0.0.1:6379")?)
//!     .on_cluster_error(|e| eprintln!("{:?}: {} messages: {}", e.kind, e.messages, e.detail))
//!     .build();
//! # drop(broker); Ok(()) }
//! ```
//!
//! # What Redis holds
//!
//! - `{prefix}:session:{id}`: a sorted set of the nodes with members of the session,
//!   each scored with the time (Unix milliseconds) its entry expires.
//! - `{prefix}:user:{id}`: the same for the nodes with connections of the user.
//! - `{prefix}:node:{node}`: the channel each node subscribes to; other nodes publish
//!   the envelopes meant for it there.
//!
//! Each node refreshes its entries every third of [`RedisCluster::ttl`] and gives each
//! key that time to live, so the entries of a node that crashed are ignored once
//! their score passes and the keys vanish when nobody refreshes them. A lookup reads
//! only the entries whose score is still ahead, by the reader's clock: the nodes'
//! clocks must agree to well within the time to live.
//!
//! # Carrying a batch
//!
//! The backend takes up to [`BATCH`] outbound messages at once, looks up the nodes of
//! every distinct target in one pipeline, then publishes every envelope to each node
//! in a second pipeline, in the order the workers handed them over. A node receives a
//! message at most once, whatever the number of its members, and never its own.
//! `PUBLISH` answers how many subscribers received it: a node registered as holding
//! the target that did not receive it (crashed, or reconnecting) is counted and
//! reported ([`ClusterErrorKind::NodeMissing`]).
//!
//! # Faults
//!
//! When Redis cannot be reached, the batch in hand and everything the workers hand
//! over until it is back is counted and reported ([`ClusterErrorKind::Unreachable`]);
//! local delivery goes on. The outage itself is reported once
//! ([`ClusterErrorKind::Disconnected`]), also when Redis was down from the start. The
//! backend retries with a backoff from 50 ms to 1 s; once connected it subscribes to
//! its channel, then registers everything this node holds. An attempt that subscribed
//! but failed to register stops its subscription before the next attempt, so this
//! node never reads its channel twice.
//!
//! After a reconnection it waits [`SETTLE`] (the setting [`RedisCluster::settle`])
//! before carrying messages again, so that
//! the other nodes, retrying on the same schedule, have re-registered in a Redis that
//! may have restarted empty; what the workers hand over meanwhile waits in the queue.
//! Joins and leaves are registered during the wait, and a shutdown ends it.
//!
//! A lookup skips the entries that are not node ids (another program wrote under the
//! same prefix) and routes to the nodes listed beside them.

use super::{ClusterBackend, ClusterErrorKind, ClusterNode, Inbound, Interest, Next, Outbound};
use crate::message::Target;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio::time::{self, Instant};
use tracing::{debug, info, warn};

/// Outbound messages carried per round of two pipelines.
pub const BATCH: usize = 512;

/// Registrations written per pipeline when registering everything at once.
const REGISTER_CHUNK: usize = 1000;

/// The first and the longest wait between connection attempts.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// How long a node waits after a reconnection before carrying messages: the longest
/// retry interval and some room for the others' registrations.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// Longest a connection attempt, or a command, may take before Redis counts as
/// unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A cluster backend on Redis: routing by interest, through per-node channels.
///
/// See the [module documentation](self) for what it keeps in Redis and what it does
/// on each fault.
#[derive(Clone, Debug)]
pub struct RedisCluster {
    client: redis::Client,
    prefix: String,
    ttl: Duration,
    settle: Duration,
}

impl RedisCluster {
    /// A backend for the Redis server at `url` (`redis://host:port/db`). Nothing
    /// connects before the broker is built; the backend keeps retrying until Redis
    /// answers.
    ///
    /// # Errors
    ///
    /// Fails when `url` is not a Redis URL.
    pub fn new(url: &str) -> Result<RedisCluster, redis::RedisError> {
        Ok(RedisCluster {
            client: redis::Client::open(url)?,
            prefix: "switchboard".to_string(),
            ttl: Duration::from_secs(10),
            settle: SETTLE,
        })
    }

    /// The prefix of every key and channel. Default `switchboard`. Brokers with the
    /// same prefix on the same Redis form one cluster.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a node's registrations outlive it. Default 10 s. Every node of a
    /// cluster should use the same value.
    ///
    /// # Panics
    ///
    /// Panics under 30 ms: entries are refreshed every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        assert!(ttl >= Duration::from_millis(30), "ttl is at least 30 ms");
        self.ttl = ttl;
        self
    }

    /// How long a node waits after a reconnection before it carries messages again, so
    /// that the other nodes have re-registered in a Redis that may have restarted
    /// empty. Default [`SETTLE`], 1.5 s: past the longest retry interval, 1 s. Messages
    /// wait in the cluster queue meanwhile.
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}:session:{id}", self.prefix)
    }

    fn user_key(&self, id: &str) -> String {
        format!("{}:user:{id}", self.prefix)
    }

    fn key(&self, interest: &Interest) -> String {
        match interest {
            Interest::Session(id) => self.session_key(id),
            Interest::User(id) => self.user_key(id),
        }
    }

    fn target_key(&self, target: &Target) -> String {
        match target {
            Target::Session(id) => self.session_key(id),
            Target::User(id) => self.user_key(id),
        }
    }

    fn channel(&self, node: u64) -> String {
        format!("{}:node:{node}", self.prefix)
    }
}

impl ClusterBackend for RedisCluster {
    fn run(self: Box<Self>, node: ClusterNode) -> BoxFuture<'static, ()> {
        Box::pin(Backend::new(*self, node).run())
    }
}

/// A live link to Redis: commands on one multiplexed connection, this node's channel
/// on a pub/sub connection read by its own task.
///
/// At most one link's task may run at a time: two would each hand every message on
/// this node's channel to the broker, and members would receive it twice.
struct Link {
    conn: MultiplexedConnection,
    receiver: JoinHandle<()>,
}

impl Link {
    /// Stops the task reading this node's channel, and waits until it has stopped, so
    /// that a new link can subscribe.
    async fn stop(&mut self) {
        self.receiver.abort();
        // A task that ended on its own was awaited already by `serve`.
        if !self.receiver.is_finished() {
            let _ = (&mut self.receiver).await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

/// Why serving a link ended.
enum End {
    /// The broker shut down.
    Closed,
    /// Redis failed; reconnect.
    Lost(String),
}

struct Backend {
    config: RedisCluster,
    node: ClusterNode,
    /// What this node has registered in Redis, as far as it knows.
    registered: HashSet<Interest>,
    batch: Vec<Outbound>,
    /// Entries found in lookups that are not node ids, since the backend started.
    skipped: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Backend {
    fn new(config: RedisCluster, node: ClusterNode) -> Backend {
        Backend {
            config,
            node,
            registered: HashSet::new(),
            batch: Vec::with_capacity(BATCH),
            skipped: 0,
        }
    }

    async fn run(mut self) {
        let mut retry = RETRY_MIN;
        let mut connected_before = false;
        loop {
            let mut link = match self.connect().await {
                Ok(link) => link,
                Err(e) => {
                    // An outage that began with a lost link was logged then.
                    if !connected_before && retry == RETRY_MIN {
                        warn!(cause = %e, "cannot reach redis; retrying");
                    } else {
                        debug!(cause = %e, "cannot reach redis");
                    }
                    self.node
                        .set_connected(false, &format!("cannot reach redis: {e}"));
                    if !self.wait_failing(retry, &e).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            retry = RETRY_MIN;
            self.node.set_connected(true, "");
            info!(node = self.node.id(), "connected to redis");

            let settle = connected_before.then(|| Instant::now() + self.config.settle);
            connected_before = true;
            match self.serve(&mut link, settle).await {
                End::Closed => {
                    self.carry(&mut link.conn).await.ok();
                    self.withdraw(&mut link.conn).await;
                    return;
                }
                End::Lost(why) => {
                    link.stop().await;
                    warn!(cause = %why, "lost redis; reconnecting");
                    self.node
                        .set_connected(false, &format!("lost redis: {why}"));
                }
            }
        }
    }

    /// Connects both connections, subscribes to this node's channel, then registers
    /// everything this node holds: in that order, so that a node that finds this one
    /// registered can reach it.
    async fn connect(&mut self) -> Result<Link, redis::RedisError> {
        let client = &self.config.client;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;

        let channel = self.config.channel(self.node.id());
        let subscribe = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let (sink, stream) = time::timeout(TIMEOUT, subscribe)
            .await
            .map_err(|_| timed_out("subscribing"))??;
        let receiver = tokio::spawn(receive(self.node.inbound(), sink, stream));
        let mut link = Link { conn, receiver };

        // Registering can fail while the subscription is fine (a command times out,
        // Redis answers with an error); the next attempt subscribes again.
        if let Err(e) = self.register_all(&mut link.conn).await {
            link.stop().await;
            return Err(e);
        }
        Ok(link)
    }

    /// While Redis is unreachable: waits `delay` for the next attempt, counting every
    /// message the workers hand over as lost. Returns false once the broker shut down.
    async fn wait_failing(&mut self, delay: Duration, cause: &redis::RedisError) -> bool {
        let deadline = time::sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return true,
                next = self.node.next(&mut self.batch, BATCH) => match next {
                    Next::Closed => return false,
                    // Registered in full once connected.
                    Next::Interest(_) => {}
                    Next::Outbound(_) => {
                        self.fail_batch(&format!("redis unreachable: {cause}"));
                    }
                },
            }
        }
    }

    /// Carries messages and registrations until the broker shuts down or Redis fails.
    /// With `settle`, messages wait in the queue until then.
    async fn serve(&mut self, link: &mut Link, settle: Option<Instant>) -> End {
        let every = self.config.ttl / 3;
        let mut refresh = time::interval_at(Instant::now() + every, every);
        refresh.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
        let settled = time::sleep_until(settle.unwrap_or_else(Instant::now));
        tokio::pin!(settled);
        let mut settling = settle.is_some();

        loop {
            tokio::select! {
                biased;
                _ = &mut link.receiver => return End::Lost("the subscription ended".into()),
                _ = &mut settled, if settling => settling = false,
                _ = refresh.tick() => {
                    if let Err(e) = self.register_all(&mut link.conn).await {
                        return End::Lost(e.to_string());
                    }
                }
                next = next_step(&mut self.node, &mut self.batch, settling) => match next {
                    // A shutdown ends the wait: the messages still queued are carried to
                    // the nodes registered by then.
                    None => settling = false,
                    Some(Next::Closed) => return End::Closed,
                    Some(Next::Interest(interest)) => {
                        if let Err(e) = self.apply(&mut link.conn, interest).await {
                            return End::Lost(e.to_string());
                        }
                    }
                    Some(Next::Outbound(_)) => {
                        if let Err(e) = self.carry(&mut link.conn).await {
                            return End::Lost(e.to_string());
                        }
                    }
                },
            }
        }
    }

    /// Registers or withdraws one interest, as this node holds it now.
    async fn apply(
        &mut self,
        conn: &mut MultiplexedConnection,
        interest: Interest,
    ) -> Result<(), redis::RedisError> {
        let key = self.config.key(&interest);
        let node = self.node.id();
        if self.node.holds(&interest) {
            let ttl = self.config.ttl.as_millis() as u64;
            redis::pipe()
                .zadd(&key, node, now_ms() + ttl)
                .ignore()
                .pexpire(&key, ttl as i64)
                .ignore()
                .query_async::<()>(conn)
                .await?;
            self.registered.insert(interest);
        } else if self.registered.remove(&interest) {
            redis::cmd("ZREM")
                .arg(&key)
                .arg(node)
                .query_async::<()>(conn)
                .await?;
        }
        Ok(())
    }

    /// Registers everything this node holds, with fresh expiry, and withdraws what it
    /// registered before and holds no more.
    async fn register_all(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), redis::RedisError> {
        let held: HashSet<Interest> = self.node.interests().into_iter().collect();
        let node = self.node.id();
        let ttl = self.config.ttl.as_millis() as u64;
        let expires = now_ms() + ttl;

        let stale: Vec<&Interest> = self.registered.difference(&held).collect();
        for chunk in stale.chunks(REGISTER_CHUNK) {
            let mut pipe = redis::pipe();
            for interest in chunk {
                pipe.zrem(self.config.key(interest), node).ignore();
            }
            pipe.query_async::<()>(conn).await?;
        }
        let held: Vec<Interest> = held.into_iter().collect();
        for chunk in held.chunks(REGISTER_CHUNK) {
            let mut pipe = redis::pipe();
            for interest in chunk {
                let key = self.config.key(interest);
                pipe.zadd(&key, node, expires).ignore();
                pipe.pexpire(&key, ttl as i64).ignore();
            }
            pipe.query_async::<()>(conn).await?;
        }
        self.registered = held.into_iter().collect();
        Ok(())
    }

    /// Withdraws every registration of this node, at shutdown. Best effort: what
    /// fails expires with its time to live.
    async fn withdraw(&mut self, conn: &mut MultiplexedConnection) {
        let node = self.node.id();
        let registered: Vec<Interest> = self.registered.drain().collect();
        for chunk in registered.chunks(REGISTER_CHUNK) {
            let mut pipe = redis::pipe();
            for interest in chunk {
                pipe.zrem(self.config.key(interest), node).ignore();
            }
            if let Err(e) = pipe.query_async::<()>(conn).await {
                debug!(cause = %e, "withdrawing registrations failed; they will expire");
                return;
            }
        }
    }

    /// Carries the batch in hand: one pipeline of lookups, one of publishes. On a
    /// Redis error the whole batch counts as lost.
    async fn carry(&mut self, conn: &mut MultiplexedConnection) -> Result<(), redis::RedisError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        match self.try_carry(conn).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail_batch(&format!("redis failed: {e}"));
                Err(e)
            }
        }
    }

    async fn try_carry(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), redis::RedisError> {
        // 1. Which nodes hold each distinct target.
        let mut keys: HashMap<String, usize> = HashMap::new();
        let mut slots = Vec::with_capacity(self.batch.len());
        let mut lookups = redis::pipe();
        let now = now_ms();
        for outbound in &self.batch {
            let key = self.config.target_key(&outbound.target);
            let next = keys.len();
            let slot = *keys.entry(key).or_insert_with_key(|key| {
                lookups.zrangebyscore(key, now, "+inf");
                next
            });
            slots.push(slot);
        }
        let entries: Vec<Vec<Vec<u8>>> = lookups.query_async(conn).await?;
        let found = self.node_ids(entries, &keys);
        let me = self.node.id();

        // 2. Every envelope to each of those nodes but this one, in batch order.
        let mut publishes = redis::pipe();
        let mut copies = 0;
        for (outbound, &slot) in self.batch.iter().zip(&slots) {
            for &node in found[slot].iter().filter(|&&n| n != me) {
                publishes.publish(self.config.channel(node), outbound.envelope.as_ref());
                copies += 1;
            }
        }
        let received: Vec<u64> = if copies > 0 {
            publishes.query_async(conn).await?
        } else {
            Vec::new()
        };

        // 3. What reached whom.
        let mut answers = received.into_iter();
        let (mut reached_total, mut missing_total) = (0, 0);
        let mut batch = std::mem::take(&mut self.batch);
        for (outbound, &slot) in batch.iter_mut().zip(&slots) {
            let mut reached = 0;
            for _ in found[slot].iter().filter(|&&n| n != me) {
                if answers.next().unwrap_or(0) > 0 {
                    reached += 1;
                } else {
                    missing_total += 1;
                }
            }
            reached_total += reached;
            if reached == 0 {
                outbound.unreached(&self.node);
            }
        }
        batch.clear();
        self.batch = batch;
        self.node.sent(reached_total);
        if missing_total > 0 {
            self.node.lost(
                ClusterErrorKind::NodeMissing,
                missing_total,
                "a node registered as holding the target did not receive the message",
            );
        }
        Ok(())
    }

    /// The node ids in each lookup's entries. An entry that is not one (another program
    /// wrote under the same prefix) is skipped, so that it cannot stop the messages to
    /// the nodes listed beside it; the first is logged at warn, later ones at debug.
    fn node_ids(
        &mut self,
        entries: Vec<Vec<Vec<u8>>>,
        keys: &HashMap<String, usize>,
    ) -> Vec<Vec<u64>> {
        let mut skipped = 0;
        let mut found = Vec::with_capacity(entries.len());
        for (slot, members) in entries.into_iter().enumerate() {
            let mut nodes = Vec::with_capacity(members.len());
            for member in members {
                match node_id(&member) {
                    Some(node) => nodes.push(node),
                    None if self.skipped + skipped == 0 => {
                        skipped += 1;
                        let key = keys.iter().find(|(_, &s)| s == slot).map(|(k, _)| k);
                        warn!(
                            key = key.map_or("", |k| k.as_str()),
                            entry = %String::from_utf8_lossy(&member),
                            "skipping an entry that is not a node id; further ones are logged at debug"
                        );
                    }
                    None => skipped += 1,
                }
            }
            found.push(nodes);
        }
        if skipped > 0 {
            self.skipped += skipped;
            debug!(
                skipped,
                since_start = self.skipped,
                "skipped entries that are not node ids"
            );
        }
        found
    }

    /// Counts the batch in hand as lost, and tells the senders of direct messages.
    fn fail_batch(&mut self, detail: &str) {
        let n = self.batch.len() as u64;
        for mut outbound in self.batch.drain(..) {
            outbound.unreached(&self.node);
        }
        self.node.lost(ClusterErrorKind::Unreachable, n, detail);
    }
}

/// What to do next. While settling, messages wait, but joins and leaves are taken at
/// once; `None` once the broker shuts down, to end the wait.
async fn next_step(
    node: &mut ClusterNode,
    batch: &mut Vec<Outbound>,
    settling: bool,
) -> Option<Next> {
    if settling {
        node.next_interest().await.map(Next::Interest)
    } else {
        Some(node.next(batch, BATCH).await)
    }
}

/// Hands every envelope on this node's channel to the broker, in order, until the
/// subscription ends.
async fn receive(
    inbound: Inbound,
    _sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
) {
    while let Some(message) = stream.next().await {
        let envelope = Bytes::copy_from_slice(message.get_payload_bytes());
        // A bad envelope is counted and reported by `deliver`; the next may be fine.
        let _ = inbound.deliver(envelope).await;
    }
}

/// The node id in a lookup's entry, written as nodes write it: decimal digits without
/// a leading zero, and not 0, which no node uses.
fn node_id(entry: &[u8]) -> Option<u64> {
    if entry.first() == Some(&b'0') || !entry.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(entry).ok()?.parse().ok()
}

fn timed_out(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} took over {TIMEOUT:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::node_id;

    #[test]
    fn node_ids_as_nodes_write_them() {
        assert_eq!(node_id(b"1"), Some(1));
        assert_eq!(node_id(u64::MAX.to_string().as_bytes()), Some(u64::MAX));
        for junk in [
            &b""[..],
            b"0",
            b"007",
            b"-3",
            b"+3",
            b" 3",
            b"3a",
            b"18446744073709551616",
            &[0xff, 0xfe],
        ] {
            assert_eq!(node_id(junk), None, "{junk:?}");
        }
    }
}
