//! Several brokers as one, through a real Redis server: three nodes in one process
//! with TCP clients on each, a Redis restart, a node killed mid-traffic, and the faults
//! a node must ride out: Redis down at startup, a failed registration right after
//! connecting, joins and shutdown during the wait after a reconnection, and entries in
//! Redis that no node wrote.
//!
//! The shared server is the one at `REDIS_URL` (default `redis://127.0.0.1:6379`); a
//! test fails, rather than skips, when it does not answer. The tests that stop Redis
//! run their own `redis-server` on a free port. Each test uses its own key prefix, so tests may
//! run at once on one server.

#[macro_use]
mod common;

use common::{expect_quiet, next_event, next_message, wait_until, within, Link, TestBroker};
use futures::StreamExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard::cluster::redis::RedisCluster;
use switchboard::cluster::ClusterErrorKind;
use switchboard::{Broker, Client, Event, Notice};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A key prefix of this test's own.
fn prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("sbtest-{}-{test}-{nanos}", std::process::id())
}

/// What one node's hooks saw.
#[derive(Default)]
struct Seen {
    on_message: AtomicUsize,
    cluster_errors: AtomicUsize,
    /// Messages the `on_cluster_error` hook was told did not cross.
    cluster_lost: AtomicU64,
    /// Outages the `on_cluster_error` hook was told of.
    disconnections: AtomicUsize,
}

/// One broker of a cluster, serving TCP (and memory) like any test broker.
struct Node {
    test: TestBroker,
    seen: Arc<Seen>,
}

impl Node {
    async fn start(url: &str, prefix: &str, ttl: Duration) -> Node {
        Node::start_settling(url, prefix, ttl, switchboard::cluster::redis::SETTLE).await
    }

    /// A node that waits `settle` after each reconnection before carrying messages.
    async fn start_settling(url: &str, prefix: &str, ttl: Duration, settle: Duration) -> Node {
        let seen = Arc::new(Seen::default());
        let (on_message, on_error) = (seen.clone(), seen.clone());
        let backend = RedisCluster::new(url)
            .expect("a redis url")
            .prefix(prefix)
            .ttl(ttl)
            .settle(settle);
        let builder = Broker::builder()
            .cluster(backend)
            .on_message(move |_, _| {
                on_message.on_message.fetch_add(1, Ordering::SeqCst);
            })
            .on_cluster_error(move |e| {
                on_error.cluster_errors.fetch_add(1, Ordering::SeqCst);
                if e.kind == ClusterErrorKind::Disconnected {
                    on_error.disconnections.fetch_add(1, Ordering::SeqCst);
                } else {
                    on_error
                        .cluster_lost
                        .fetch_add(e.messages, Ordering::SeqCst);
                }
            });
        Node {
            test: TestBroker::with(builder).await,
            seen,
        }
    }

    fn broker(&self) -> &Broker {
        &self.test.broker
    }

    async fn client(&self, user: &str) -> Client {
        self.test.connect(Link::Tcp, user).await
    }

    async fn wait_connected(&self) {
        let broker = self.broker().clone();
        wait_until("the node connected to redis", move || {
            broker.stats().cluster_connected
        })
        .await;
    }

    async fn wait_disconnected(&self) {
        let broker = self.broker().clone();
        wait_until("the node noticed redis is gone", move || {
            !broker.stats().cluster_connected
        })
        .await;
    }

    async fn wait_reconnected(&self) {
        let broker = self.broker().clone();
        wait_until("the node reconnected", move || {
            let stats = broker.stats();
            stats.cluster_connected && stats.cluster_reconnects >= 1
        })
        .await;
    }
}

/// A connection of the test's own to the Redis at `url`.
async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("a redis url");
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("redis at {url} does not answer: {e}"))
}

/// Nodes whose entry under `key` is live now.
async fn live_nodes(url: &str, key: &str) -> usize {
    let mut conn = redis_conn(url).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let nodes: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(key)
        .arg(now)
        .arg("+inf")
        .query_async(&mut conn)
        .await
        .expect("ZRANGEBYSCORE");
    nodes.len()
}

/// Waits until `n` nodes are registered under `key`.
async fn wait_nodes(url: &str, key: &str, n: usize) {
    within(&format!("{n} nodes registered under {key}"), async {
        while live_nodes(url, key).await != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Reads messages from `client` until `n` arrived; checks they are `from`'s, each
/// once and in order, numbered from `first`.
async fn expect_sequence(client: &mut Client, from: &str, first: u64, n: u64) {
    for want in first..first + n {
        let message = next_message(client).await;
        assert_eq!(&*message.sender, from);
        let got: u64 = std::str::from_utf8(&message.payload)
            .expect("utf-8")
            .parse()
            .expect("a number");
        assert_eq!(got, want, "out of order, lost or duplicated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_route_by_interest() {
    let url = redis_url();
    let prefix = prefix("three");
    let ttl = Duration::from_secs(5);
    let a = Node::start(&url, &prefix, ttl).await;
    let b = Node::start(&url, &prefix, ttl).await;
    let c = Node::start(&url, &prefix, ttl).await;
    for node in [&a, &b, &c] {
        node.wait_connected().await;
    }

    // Members of one session on every node, two of them on A.
    let mut a1 = a.client("a1").await;
    let mut a2 = a.client("a2").await;
    let mut b1 = b.client("b1").await;
    let mut c1 = c.client("c1").await;
    for client in [&a1, &a2, &b1, &c1] {
        client.subscribe("room").await.expect("subscribe");
    }
    let room = format!("{prefix}:session:room");
    wait_nodes(&url, &room, 3).await;

    // A publication on B reaches every member on A and C once, in order; the sender
    // gets nothing back.
    const N: u64 = 300;
    for i in 0..N {
        b1.publish("room", i.to_string()).await.expect("publish");
    }
    expect_sequence(&mut a1, "b1", 0, N).await;
    expect_sequence(&mut a2, "b1", 0, N).await;
    expect_sequence(&mut c1, "b1", 0, N).await;
    expect_quiet(&mut b1).await;
    expect_quiet(&mut a1).await;

    // on_message runs where the message was published, and only there.
    assert_eq!(b.seen.on_message.load(Ordering::SeqCst), N as usize);
    assert_eq!(a.seen.on_message.load(Ordering::SeqCst), 0);
    assert_eq!(c.seen.on_message.load(Ordering::SeqCst), 0);
    assert_eq!(
        b.broker().stats().cluster_sent,
        2 * N,
        "one copy per node, not per member"
    );
    assert_eq!(a.broker().stats().cluster_received, N);

    // The host pushes on A: members on B and C receive it.
    a.broker()
        .publish("room", "from the host")
        .await
        .expect("publish");
    for client in [&mut a1, &mut a2, &mut b1, &mut c1] {
        let message = next_message(client).await;
        assert!(message.is_from_host());
        assert_eq!(&message.payload[..], b"from the host");
    }

    // Interest: once C's only member leaves, C receives nothing more of the room.
    c1.unsubscribe("room").await.expect("unsubscribe");
    wait_nodes(&url, &room, 2).await;
    let before = c.broker().stats().cluster_received;
    b1.publish("room", "not for C").await.expect("publish");
    assert_eq!(&next_message(&mut a1).await.payload[..], b"not for C");
    assert_eq!(&next_message(&mut a2).await.payload[..], b"not for C");
    assert_eq!(c.broker().stats().cluster_received, before);
    expect_quiet(&mut c1).await;

    // A direct message reaches every connection of its user, on every node, once.
    let mut dave_a = a.client("dave").await;
    let mut dave_c = c.client("dave").await;
    wait_nodes(&url, &format!("{prefix}:user:dave"), 2).await;
    let b_received = b.broker().stats().cluster_received;
    b1.send_direct("dave", "psst").await.expect("direct");
    for dave in [&mut dave_a, &mut dave_c] {
        let message = next_message(dave).await;
        assert_eq!(&*message.sender, "b1");
        assert_eq!(&message.payload[..], b"psst");
        expect_quiet(dave).await;
    }
    assert_eq!(b.broker().stats().cluster_received, b_received);
    expect_quiet(&mut b1).await;

    // A user no node holds: the sender is told.
    let request = b1.send_direct("nobody", "hello?").await.expect("direct");
    match next_event(&mut b1).await {
        Event::Notice(Notice::NotDelivered {
            request: r, user, ..
        }) => {
            assert_eq!(r, request);
            assert_eq!(&*user, "nobody");
        }
        other => panic!("expected NotDelivered, got {other:?}"),
    }

    // Nothing failed along the way.
    for node in [&a, &b, &c] {
        assert_eq!(node.broker().stats().cluster_failed, 0);
        assert_eq!(node.seen.cluster_errors.load(Ordering::SeqCst), 0);
    }

    // Shutdown withdraws a node's registrations at once.
    c.broker().shutdown().await;
    wait_nodes(&url, &format!("{prefix}:user:dave"), 1).await;
    a.broker().shutdown().await;
    b.broker().shutdown().await;
    assert_eq!(live_nodes(&url, &room).await, 0);
}

/// A `redis-server` of this test's own, on a port it chose.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        let mut server = RedisServer::reserve();
        server.restart();
        server
    }

    /// A server not started yet, on a port nothing listens on.
    fn reserve() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        RedisServer { port, child: None }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port, and waits until it answers.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed to run the cluster tests");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("a redis url");
        for _ in 0..500 {
            if let Ok(mut conn) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    /// Kills the server, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two nodes of one cluster, each connected to Redis.
async fn two_connected_nodes(url: &str, prefix: &str, ttl: Duration) -> (Node, Node) {
    let a = Node::start(url, prefix, ttl).await;
    let b = Node::start(url, prefix, ttl).await;
    a.wait_connected().await;
    b.wait_connected().await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing_silently() {
    let mut server = RedisServer::start();
    let url = server.url();
    let prefix = prefix("restart");
    let ttl = Duration::from_secs(2);
    let (a, b) = two_connected_nodes(&url, &prefix, ttl).await;

    let mut a1 = a.client("a1").await;
    let a2 = a.client("a2").await;
    let b1 = b.client("b1").await;
    for client in [&a1, &a2, &b1] {
        client.subscribe("room").await.expect("subscribe");
    }
    wait_nodes(&url, &format!("{prefix}:session:room"), 2).await;
    b1.publish("room", "0").await.expect("publish");
    expect_sequence(&mut a1, "b1", 0, 1).await;

    // Redis goes away. Both nodes notice; local delivery goes on.
    server.kill();
    for node in [&a, &b] {
        node.wait_disconnected().await;
    }
    a2.publish("room", "local").await.expect("publish");
    let message = next_message(&mut a1).await;
    assert_eq!(
        (&*message.sender, &message.payload[..]),
        ("a2", &b"local"[..])
    );

    // What B publishes meanwhile cannot cross: every message is counted and reported.
    const DOWN: u64 = 50;
    for i in 1..=DOWN {
        b1.publish("room", i.to_string()).await.expect("publish");
    }
    let broker = b.broker().clone();
    wait_until("every message of the outage counted", move || {
        broker.stats().cluster_failed == DOWN
    })
    .await;
    assert_eq!(b.seen.cluster_lost.load(Ordering::SeqCst), DOWN);
    assert!(
        b.seen.cluster_errors.load(Ordering::SeqCst) >= 2,
        "lost messages and the disconnection are reported"
    );

    // Redis is back, empty: both nodes reconnect and register again, and traffic
    // crosses again, in order, with nothing from the outage.
    server.restart();
    for node in [&a, &b] {
        node.wait_reconnected().await;
    }
    wait_nodes(&url, &format!("{prefix}:session:room"), 2).await;
    const UP: u64 = 50;
    for i in DOWN + 1..=DOWN + UP {
        b1.publish("room", i.to_string()).await.expect("publish");
    }
    expect_sequence(&mut a1, "b1", DOWN + 1, UP).await;
    expect_quiet(&mut a1).await;

    let (a_stats, b_stats) = (a.broker().stats(), b.broker().stats());
    assert_eq!(b_stats.cluster_failed, DOWN);
    assert_eq!(a_stats.cluster_received, 1 + UP);
    assert_eq!(b_stats.cluster_sent, 1 + UP);
    a.broker().shutdown().await;
    b.broker().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_expires_and_the_others_go_on() {
    let url = redis_url();
    let prefix = prefix("killed");
    let ttl = Duration::from_millis(1500);
    let a = Node::start(&url, &prefix, ttl).await;
    let b = Node::start(&url, &prefix, ttl).await;

    // C runs on a runtime of its own, so that it can die at once, as a process would:
    // no shutdown, no withdrawal.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let (c_url, c_prefix) = (url.clone(), prefix.clone());
    let c = runtime
        .spawn(async move { Node::start(&c_url, &c_prefix, ttl).await })
        .await
        .expect("node C started");
    for node in [&a, &b, &c] {
        node.wait_connected().await;
    }

    let mut a1 = a.client("a1").await;
    let b1 = b.client("b1").await;
    let mut c1 = c.client("c1").await;
    for client in [&a1, &b1, &c1] {
        client.subscribe("room").await.expect("subscribe");
    }
    let room = format!("{prefix}:session:room");
    wait_nodes(&url, &room, 3).await;

    // B publishes without pause while C is killed.
    let publisher = tokio::spawn(async move {
        for i in 0..2000u64 {
            b1.publish("room", i.to_string()).await.expect("publish");
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        b1
    });
    expect_sequence(&mut c1, "b1", 0, 100).await;
    runtime.shutdown_background();

    // C's registrations expire within their time to live; A and B go on, and A gets
    // every message of B, once, in order.
    within("C's entries expire", async {
        while live_nodes(&url, &room).await != 2
            || live_nodes(&url, &format!("{prefix}:user:c1")).await != 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    expect_sequence(&mut a1, "b1", 0, 2000).await;
    let b1 = within("the publisher", publisher).await.expect("publisher");
    b1.publish("room", "after").await.expect("publish");
    assert_eq!(&next_message(&mut a1).await.payload[..], b"after");

    // C's connection ended with it.
    within("c1's connection ends", async {
        while let Some(event) = c1.next().await {
            if let Event::Closed { .. } = event {
                break;
            }
        }
    })
    .await;

    // Copies B sent to C after it died are counted and reported, never silent.
    let b_stats = b.broker().stats();
    assert_eq!(
        b_stats.cluster_failed,
        b.seen.cluster_lost.load(Ordering::SeqCst)
    );
    a.broker().shutdown().await;
    b.broker().shutdown().await;
}

/// How many subscribers each node channel of `prefix` has.
async fn channel_subscribers(url: &str, prefix: &str) -> Vec<usize> {
    let mut conn = redis_conn(url).await;
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("{prefix}:node:*"))
        .query_async(&mut conn)
        .await
        .expect("PUBSUB CHANNELS");
    if channels.is_empty() {
        return Vec::new();
    }
    let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channels)
        .query_async(&mut conn)
        .await
        .expect("PUBSUB NUMSUB");
    counts.into_iter().map(|(_, n)| n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_registration_leaves_one_subscription() {
    let url = redis_url();
    let prefix = prefix("register");
    let ttl = Duration::from_secs(3);
    let (a, b) = two_connected_nodes(&url, &prefix, ttl).await;

    let mut a1 = a.client("a1").await;
    let b1 = b.client("b1").await;
    for client in [&a1, &b1] {
        client.subscribe("room").await.expect("subscribe");
    }
    let room = format!("{prefix}:session:room");
    wait_nodes(&url, &room, 2).await;

    // A key of the wrong type makes every registration of A fail with an error reply,
    // while its pub/sub connection stays fine: A drops its link, and each attempt to
    // connect again subscribes, then fails to register.
    let junk = format!("{prefix}:session:junk");
    let mut conn = redis_conn(&url).await;
    redis::cmd("SET")
        .arg(&junk)
        .arg("not a sorted set")
        .query_async::<()>(&mut conn)
        .await
        .expect("SET");
    a1.subscribe("junk").await.expect("subscribe");
    a.wait_disconnected().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Once registering works again, A's channel has one subscriber, and A's member
    // gets each message once.
    redis::cmd("DEL")
        .arg(&junk)
        .query_async::<()>(&mut conn)
        .await
        .expect("DEL");
    a.wait_reconnected().await;
    wait_nodes(&url, &room, 2).await;
    const N: u64 = 20;
    for i in 0..N {
        b1.publish("room", i.to_string()).await.expect("publish");
    }
    expect_sequence(&mut a1, "b1", 0, N).await;
    expect_quiet(&mut a1).await;
    assert_eq!(a.broker().stats().cluster_received, N);
    assert_eq!(
        channel_subscribers(&url, &prefix).await,
        [1, 1],
        "subscribers of each node's channel"
    );

    a.broker().shutdown().await;
    b.broker().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_startup_is_reported_once_per_outage() {
    let mut server = RedisServer::reserve();
    let url = server.url();
    let prefix = prefix("startup");
    let a = Node::start(&url, &prefix, Duration::from_secs(2)).await;

    // Nothing listens yet: the host hears of it once, however many attempts fail.
    let seen = a.seen.clone();
    wait_until("the outage at startup reported", move || {
        seen.disconnections.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.seen.disconnections.load(Ordering::SeqCst), 1);
    assert!(!a.broker().stats().cluster_connected);

    // Redis comes up: the node connects, which is not a reconnection.
    server.restart();
    a.wait_connected().await;
    assert_eq!(a.broker().stats().cluster_reconnects, 0);

    // A second outage is reported once more.
    server.kill();
    a.wait_disconnected().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.seen.disconnections.load(Ordering::SeqCst), 2);
    a.broker().shutdown().await;
}

/// The wait after a reconnection for the nodes of the tests below, long enough that a
/// bound well under it is still far over what the work takes on a busy machine.
const SETTLE: Duration = Duration::from_secs(60);
const UNDER_SETTLE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_prompt_after_a_reconnection() {
    let mut server = RedisServer::start();
    let url = server.url();
    let a =
        Node::start_settling(&url, &prefix("settle-stop"), Duration::from_secs(2), SETTLE).await;
    a.wait_connected().await;

    server.kill();
    a.wait_disconnected().await;
    server.restart();
    a.wait_reconnected().await;

    let started = std::time::Instant::now();
    a.broker().shutdown().await;
    assert!(
        started.elapsed() < UNDER_SETTLE,
        "shutdown took {:?}, waiting out the wait after the reconnection",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_right_after_a_reconnection_is_registered() {
    let mut server = RedisServer::start();
    let url = server.url();
    let prefix = prefix("settle-join");
    // Refreshes far apart, so that only the join itself registers the session soon.
    let ttl = Duration::from_secs(9);
    let a = Node::start_settling(&url, &prefix, ttl, SETTLE).await;
    let b = Node::start(&url, &prefix, ttl).await;
    a.wait_connected().await;
    b.wait_connected().await;
    let mut a1 = a.client("a1").await;

    server.kill();
    a.wait_disconnected().await;
    b.wait_disconnected().await;
    server.restart();
    a.wait_reconnected().await;

    // A joins while it waits; the registration reaches Redis at once, not after.
    a1.subscribe("late").await.expect("subscribe");
    let late = format!("{prefix}:session:late");
    let joined = std::time::Instant::now();
    wait_nodes(&url, &late, 1).await;
    assert!(
        joined.elapsed() < UNDER_SETTLE,
        "the join took {:?} to be registered",
        joined.elapsed()
    );

    // And messages from B reach it.
    b.wait_reconnected().await;
    b.broker()
        .publish("late", "after the restart")
        .await
        .expect("publish");
    assert_eq!(
        &next_message(&mut a1).await.payload[..],
        b"after the restart"
    );
    expect_quiet(&mut a1).await;
    a.broker().shutdown().await;
    b.broker().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_are_not_node_ids_are_skipped() {
    let url = redis_url();
    let prefix = prefix("junk");
    let ttl = Duration::from_secs(5);
    let (a, b) = two_connected_nodes(&url, &prefix, ttl).await;

    let mut a1 = a.client("a1").await;
    let b1 = b.client("b1").await;
    for client in [&a1, &b1] {
        client.subscribe("room").await.expect("subscribe");
    }
    let room = format!("{prefix}:session:room");
    wait_nodes(&url, &room, 2).await;

    // Another program with the same prefix writes members no node would.
    let mut conn = redis_conn(&url).await;
    let far = 4_000_000_000_000u64;
    for junk in ["not-a-node", "-3", "0", "007", "18446744073709551616", ""] {
        redis::cmd("ZADD")
            .arg(&room)
            .arg(far)
            .arg(junk)
            .query_async::<()>(&mut conn)
            .await
            .expect("ZADD");
    }
    redis::cmd("ZADD")
        .arg(&room)
        .arg(far)
        .arg(&[0xffu8, 0xfe][..])
        .query_async::<()>(&mut conn)
        .await
        .expect("ZADD");

    // B goes on routing to A, and nothing counts as failed.
    const N: u64 = 50;
    for i in 0..N {
        b1.publish("room", i.to_string()).await.expect("publish");
    }
    expect_sequence(&mut a1, "b1", 0, N).await;
    let stats = b.broker().stats();
    assert_eq!(stats.cluster_failed, 0);
    assert_eq!(stats.cluster_reconnects, 0);
    assert!(stats.cluster_connected);
    assert_eq!(b.seen.cluster_errors.load(Ordering::SeqCst), 0);
    a.broker().shutdown().await;
    b.broker().shutdown().await;
}
