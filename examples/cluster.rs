//! The checked load of the `load` example, across the nodes of a cluster.
//!
//! ```text
//! cargo run --release --features redis --example cluster -- --nodes 3 --clients N --secs S [--size BYTES] [--redis URL]
//! ```
//!
//! Starts `--nodes` brokers (default 3) in this process, each one node of a cluster
//! through the same Redis server (`--redis`, else `REDIS_URL`, else
//! `redis://127.0.0.1:6379`), each serving TCP on 127.0.0.1: the first on
//! `--base-port` (default 7881), the next one port up, and so on; `--base-port 0` gives
//! every node a free port. N clients connect to the nodes in turn (client i to node
//! i mod nodes), all join one session, and every one of them publishes to it for S
//! seconds, exactly as in the `load` example: every client checks every delivery
//! (nothing lost, nothing twice, each publisher's order kept) and the latencies run
//! from publish to delivery, across nodes for most pairs of clients.
//!
//! A member hears other nodes' messages only once its node's registration for the
//! session has reached Redis (docs/cluster.md, "Joining takes a round trip"). So before
//! the load, every node pushes a probe to the session, round after round, until every
//! client has received one same round's probe from every node: then each node has
//! found every other node's registration. Per sender, order holds, so no earlier
//! probe can arrive after that round's; and no later round was sent, so none is left
//! on its way when the load begins.
//!
//! The last line printed is
//!
//! ```text
//! cluster: clients=N sent=.. delivered=.. expected=.. lost=.. dup=.. reordered=.. deliveries_per_sec=.. p50_us=.. p99_us=..
//! ```
//!
//! with the fields of the `load` example. The exit code is non-zero when anything was
//! lost, duplicated or reordered, when a node reported a message that did not reach
//! the other nodes, when a client failed, when a node did not shut down, and when
//! Redis cannot be reached; stderr says why.

mod common;

use clap::Parser;
use common::{LoadArgs, CLOSE_TIMEOUT};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::cluster::redis::RedisCluster;
use switchboard::cluster::ClusterErrorInfo;
use switchboard::{Broker, Client, Event, TcpTransport};
use tokio::sync::Notify;
use tokio::time::Instant;

const NAME: &str = "cluster";

/// Longest Redis may take to answer, and each node to connect to it.
const REDIS_WAIT: Duration = Duration::from_secs(5);

/// How long one probe round waits before the next round is sent.
const PROBE_ROUND: Duration = Duration::from_millis(100);

/// Longest the probe rounds may take in all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// A probe's payload: the node's index (u32), the round (u64).
const PROBE_LEN: usize = 4 + 8;

#[derive(Parser)]
#[command(
    about = "Publish to one session from N clients spread over the nodes of a cluster, and check every delivery"
)]
struct Args {
    /// Brokers in this process, one cluster through Redis.
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// The first node's TCP port on 127.0.0.1, each further node's one up; 0 gives
    /// every node a free port.
    #[arg(long, value_name = "PORT", default_value_t = 7881)]
    base_port: u16,

    /// The Redis server [default: REDIS_URL, else redis://127.0.0.1:6379].
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    #[command(flatten)]
    load: LoadArgs,
}

/// One broker of the cluster.
struct Node {
    broker: Broker,
    addr: SocketAddr,
    errors: Arc<ClusterErrors>,
}

/// What a node's `on_cluster_error` hook was told.
#[derive(Default)]
struct ClusterErrors {
    reports: AtomicU64,
    first: Mutex<Option<String>>,
}

impl ClusterErrors {
    fn record(&self, e: &ClusterErrorInfo) {
        self.reports.fetch_add(1, Ordering::Relaxed);
        self.first
            .lock()
            .get_or_insert_with(|| format!("{:?}, {} messages: {}", e.kind, e.messages, e.detail));
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Err(e) = args.load.check(NAME) {
        eprintln!("{NAME}: {e}");
        return ExitCode::FAILURE;
    }
    if args.nodes == 0 {
        eprintln!("{NAME}: --nodes must be at least 1");
        return ExitCode::FAILURE;
    }
    if args.base_port != 0 && usize::from(args.base_port) + args.nodes - 1 > 65535 {
        eprintln!(
            "{NAME}: --base-port leaves no room for {} nodes",
            args.nodes
        );
        return ExitCode::FAILURE;
    }
    let n = args.load.clients;
    let url = args.redis.clone().unwrap_or_else(|| {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
    });

    // Redis first, for a clear message: without it the nodes would only keep retrying.
    if let Err(e) = ping(&url).await {
        return common::abort(NAME, n, &[e]);
    }

    // Names carry the process id, so that runs sharing a Redis server do not mix.
    let tag = format!("cluster-{}", std::process::id());
    let nodes = match start(&args, &url, &tag).await {
        Ok(nodes) => nodes,
        Err(e) => return common::abort(NAME, n, &[e]),
    };
    let addrs: Vec<SocketAddr> = nodes.iter().map(|node| node.addr).collect();
    for (k, addr) in addrs.iter().enumerate() {
        eprintln!("{NAME}: node {k} on tcp {addr}");
    }

    eprintln!("{NAME}: connecting {n} clients to {} nodes", nodes.len());
    let connected = common::connect_all(&args.load, &tag, |index, builder| {
        builder.connect_tcp(addrs[index % addrs.len()])
    })
    .await;
    let mut clients = match connected {
        Ok(clients) => clients,
        Err(mut errors) => {
            errors.push(format!("{} of {n} clients failed to connect", errors.len()));
            errors.extend(shut_down(&nodes).await);
            return common::abort(NAME, n, &errors);
        }
    };

    match probe(&nodes, &mut clients, &tag).await {
        Ok((rounds, took)) => {
            eprintln!("{NAME}: every client heard every node: probe rounds={rounds} in {took:?}")
        }
        Err(e) => {
            let mut why = vec![e];
            why.extend(shut_down(&nodes).await);
            return common::abort(NAME, n, &why);
        }
    }

    let mut report = common::run(NAME, &args.load, &tag, clients).await;

    // Shut down first: a node carries what it still holds on its way out, and says so
    // if that fails.
    for why in shut_down(&nodes).await {
        report.fail(why);
    }
    for (k, node) in nodes.iter().enumerate() {
        eprintln!("{NAME}: node {k} {}", node.broker.stats());
        let reports = node.errors.reports.load(Ordering::Relaxed);
        if let Some(first) = node.errors.first.lock().take() {
            report.fail(format!(
                "node {k}: {reports} cluster errors reported, the first: {first}"
            ));
        }
    }
    report.finish()
}

/// Checks that Redis answers at `url`, within a bounded time.
async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| format!("{url} is not a Redis URL: {e}"))?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(REDIS_WAIT, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot reach Redis at {url}: {e}")),
        Err(_) => Err(format!(
            "Redis at {url} did not answer within {REDIS_WAIT:?}"
        )),
    }
}

/// Starts the nodes, each with its own listener, and waits until every one of them
/// is connected to Redis.
async fn start(args: &Args, url: &str, prefix: &str) -> Result<Vec<Node>, String> {
    let mut nodes = Vec::with_capacity(args.nodes);
    for k in 0..args.nodes {
        let backend = RedisCluster::new(url)
            .map_err(|e| format!("{url} is not a Redis URL: {e}"))?
            .prefix(prefix);
        let errors = Arc::new(ClusterErrors::default());
        let hook = errors.clone();
        let broker = Broker::builder()
            .cluster(backend)
            .on_cluster_error(move |e| hook.record(e))
            .build();

        // Ports were checked to fit when the arguments were read.
        let port = match args.base_port {
            0 => 0,
            base => base + k as u16,
        };
        let transport = TcpTransport::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("node {k} cannot listen on 127.0.0.1:{port}: {e}"))?;
        let addr = transport
            .local_addr()
            .map_err(|e| format!("node {k} has no local address: {e}"))?;
        tokio::spawn(broker.serve(transport));
        nodes.push(Node {
            broker,
            addr,
            errors,
        });
    }

    let deadline = Instant::now() + REDIS_WAIT;
    for (k, node) in nodes.iter().enumerate() {
        while !node.broker.stats().cluster_connected {
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {k} did not connect to Redis at {url} within {REDIS_WAIT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(nodes)
}

/// Sends probe rounds from every node to `session` until every client received one
/// round's probe from every node; returns how many rounds that took, and how long.
async fn probe(
    nodes: &[Node],
    clients: &mut [Client],
    session: &str,
) -> Result<(u64, Duration), String> {
    let began = Instant::now();

    // For each client, the latest round it has heard from every node.
    let heard: Vec<AtomicU64> = clients.iter().map(|_| AtomicU64::new(0)).collect();
    let progress = Notify::new();
    let mut listening: FuturesUnordered<_> = clients
        .iter_mut()
        .zip(&heard)
        .enumerate()
        .map(|(me, (client, heard))| listen(me, client, nodes.len(), heard, &progress))
        .collect();

    let rounds = async {
        let deadline = began + PROBE_TIMEOUT;
        let mut round = 0u64;
        loop {
            round += 1;
            for (k, node) in nodes.iter().enumerate() {
                let mut payload = Vec::with_capacity(PROBE_LEN);
                payload.extend_from_slice(&(k as u32).to_le_bytes());
                payload.extend_from_slice(&round.to_le_bytes());
                node.broker
                    .publish(session, payload)
                    .await
                    .map_err(|e| format!("node {k} cannot push a probe: {e}"))?;
            }

            let round_ends = (Instant::now() + PROBE_ROUND).min(deadline);
            loop {
                let pending = heard
                    .iter()
                    .filter(|h| h.load(Ordering::Acquire) < round)
                    .count();
                if pending == 0 {
                    return Ok((round, began.elapsed()));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "after {round} probe rounds in {PROBE_TIMEOUT:?}, {pending} clients \
                         still had not heard from every node: the nodes do not find each \
                         other's registrations in Redis"
                    ));
                }
                if Instant::now() >= round_ends {
                    break;
                }
                // A notice that came before this wait is kept, so none is missed.
                let _ = tokio::time::timeout_at(round_ends, progress.notified()).await;
            }
        }
    };

    tokio::select! {
        done = rounds => done,
        Some(why) = listening.next() => Err(why),
    }
}

/// Reads one client's events during the probe, recording in `heard` the latest round
/// it has received from every one of `nodes`. Returns only when something is wrong:
/// anything but a probe arrived, or the connection ended.
async fn listen(
    me: usize,
    client: &mut Client,
    nodes: usize,
    heard: &AtomicU64,
    progress: &Notify,
) -> String {
    let mut latest = vec![0u64; nodes];
    loop {
        let message = match client.next().await {
            Some(Event::Message(message)) => message,
            Some(Event::Notice(notice)) => {
                return format!("client {me} got a notice during the probe: {notice:?}")
            }
            Some(Event::Closed { code, reason }) => {
                return format!(
                    "client {me} was disconnected during the probe: {reason} ({code:?})"
                )
            }
            None => return format!("client {me}'s connection ended during the probe"),
        };

        let probe = message
            .is_from_host()
            .then_some(&message.payload[..])
            .filter(|payload| payload.len() == PROBE_LEN)
            .and_then(|payload| {
                let node = u32::from_le_bytes(payload[..4].try_into().ok()?) as usize;
                let round = u64::from_le_bytes(payload[4..].try_into().ok()?);
                (node < nodes).then_some((node, round))
            });
        let Some((node, round)) = probe else {
            return format!(
                "client {me} received a message from {:?} that is not a probe",
                message.sender
            );
        };

        latest[node] = latest[node].max(round);
        let all = latest.iter().copied().min().unwrap_or(0);
        if all > heard.load(Ordering::Relaxed) {
            heard.store(all, Ordering::Release);
            progress.notify_one();
        }
    }
}

/// Shuts every node down, withdrawing its registrations from Redis; returns which
/// nodes did not finish in time.
async fn shut_down(nodes: &[Node]) -> Vec<String> {
    let shutdowns = nodes
        .iter()
        .map(|node| tokio::time::timeout(CLOSE_TIMEOUT, node.broker.shutdown()));
    futures::future::join_all(shutdowns)
        .await
        .into_iter()
        .enumerate()
        .filter(|(_, done)| done.is_err())
        .map(|(k, _)| format!("node {k} did not shut down within {CLOSE_TIMEOUT:?}"))
        .collect()
}
