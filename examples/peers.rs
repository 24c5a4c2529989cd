//! One workload, run against switchboard and the brokers its users would pick instead.
//!
//! ```text
//! cargo build --release --example server
//! cargo run --release --example peers -- --pubs P --subs S --size B --secs T [--rate R]
//! ```
//!
//! P publishers and S subscribers, each its own connection, meet on one session (NATS
//! subject, Redis channel, MQTT topic). The systems run one after the other:
//!
//! - `switchboard`: the `server` example, started as its own process from the directory
//!   this program runs from, over TCP;
//! - `nats`: the server at `--nats` (default 127.0.0.1:4222), through async-nats;
//! - `redis`: Redis pub/sub at `--redis` (default 127.0.0.1:6379), through the redis
//!   crate, a publisher pipelining the publishes it holds permits for (paced, whatever
//!   fell due while its last round trip was out);
//! - `mosquitto`: the MQTT broker at `--mqtt` (default 127.0.0.1:1883), through
//!   rumqttc, QoS 0.
//!
//! Every payload starts with a 14-byte header: the publisher (u16), its sequence
//! number (u32, from 1) and the time it was sent (u64 microseconds since this program's
//! start), so a payload is at least 14 bytes. Subscribers check that each publisher's
//! sequence only goes up; a number at or below the last one seen counts as reordered,
//! and whatever a publisher sent that a subscriber did not take in order counts as
//! lost.
//!
//! Without `--rate`, publishers run flat out but never more than `--window` messages
//! ahead of the slowest subscriber (by default 128 KiB of payloads, between 8 and 1024
//! messages), so that no system is measured while its buffers grow. The default stays
//! well under switchboard's 1 MiB outbox. With `--rate R`, each publisher sends R
//! messages per second, evenly spaced, from a thread of its own, and no window applies.
//!
//! Each system gets `--warmup` seconds (default 1), then `--secs` measured seconds.
//! The rate is the deliveries counted by subscribers during the measured seconds;
//! latencies are from the payload's timestamp to its arrival, for messages sent during
//! the measured seconds. After publishing stops, subscribers get up to `--drain-secs`
//! to catch up before losses are counted.
//!
//! With `--runs N` the systems take turns N times; each run's line goes to stderr and
//! stdout gets, per system, the median of each column over the runs:
//!
//! ```text
//! peers: system=NAME pubs=P subs=S size=B delivered_per_sec=.. p50_us=.. p99_us=.. lost=..
//! peers: system=NAME skipped reason=..
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use std::any::Any;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::{Client, ClientHandle, Event};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The `server` example as a child process.
#[path = "common/server.rs"]
mod server;

use server::start_server;

/// Publisher (u16), sequence number (u32), send time (u64 µs since `Run::epoch`).
const HEADER: usize = 2 + 4 + 8;

/// Longest one connection (and its subscription) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections opened at once.
const CONNECT_CONCURRENCY: usize = 64;

/// Most messages a flat-out publisher hands its client in one go.
const MAX_BATCH: usize = 64;

/// While draining, how long deliveries may pause before the wait ends.
const STALL: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(about = "Run one pub/sub workload against switchboard, NATS, Redis and Mosquitto")]
struct Args {
    /// Publishers, each its own connection.
    #[arg(long, default_value_t = 1)]
    pubs: usize,

    /// Subscribers, each its own connection.
    #[arg(long, default_value_t = 1)]
    subs: usize,

    /// Payload bytes (at least 14, for the header).
    #[arg(long, default_value_t = 128)]
    size: usize,

    /// Measured seconds per system.
    #[arg(long, default_value_t = 5)]
    secs: u64,

    /// Messages per second from each publisher; without it publishers run flat out.
    #[arg(long)]
    rate: Option<u64>,

    /// Messages published and not yet received by the slowest subscriber, at most.
    #[arg(long)]
    window: Option<u64>,

    /// Seconds of publishing before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: u64,

    /// Seconds subscribers get to catch up once publishing stops.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,

    /// Times every system runs; stdout gets the medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,

    /// Systems to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "switchboard,nats,redis,mosquitto"
    )]
    systems: Vec<System>,

    /// The NATS server.
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats: String,

    /// The Redis server.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,

    /// The MQTT broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum System {
    Switchboard,
    Nats,
    Redis,
    Mosquitto,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Switchboard => "switchboard",
            System::Nats => "nats",
            System::Redis => "redis",
            System::Mosquitto => "mosquitto",
        }
    }
}

/// The workload, as the command line gave it.
#[derive(Clone)]
struct Workload {
    pubs: usize,
    subs: usize,
    size: usize,
    secs: u64,
    warmup: u64,
    drain_secs: u64,
    rate: Option<u64>,
    window: u64,
}

/// What one run of one system measured.
#[derive(Clone, Copy)]
struct Measured {
    delivered_per_sec: u64,
    p50_us: u64,
    p99_us: u64,
    lost: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.pubs == 0 || args.subs == 0 || args.runs == 0 || args.secs == 0 {
        eprintln!("peers: --pubs, --subs, --runs and --secs must be at least 1");
        return ExitCode::FAILURE;
    }
    if args.pubs > u16::MAX as usize {
        eprintln!("peers: --pubs is at most 65535");
        return ExitCode::FAILURE;
    }
    if args.rate == Some(0) {
        eprintln!("peers: --rate must be at least 1");
        return ExitCode::FAILURE;
    }
    let size = args.size.max(HEADER);
    if size != args.size {
        eprintln!("peers: payloads carry a {HEADER}-byte header; using --size {size}");
    }
    let workload = Workload {
        pubs: args.pubs,
        subs: args.subs,
        size,
        secs: args.secs,
        warmup: args.warmup,
        drain_secs: args.drain_secs,
        rate: args.rate,
        window: args
            .window
            .unwrap_or((128 * 1024 / size as u64).clamp(8, 1024))
            .max(1),
    };
    let endpoints = Endpoints {
        nats: args.nats.clone(),
        redis: args.redis.clone(),
        mqtt: args.mqtt.clone(),
    };

    // The systems take turns, so that a disturbance on the machine is spread over
    // all of them rather than landing on one.
    let mut outcomes: Vec<Vec<Result<Measured, String>>> = vec![Vec::new(); args.systems.len()];
    for round in 0..args.runs {
        for (index, &system) in args.systems.iter().enumerate() {
            let outcome = run_system(system, &workload, &endpoints, round).await;
            match &outcome {
                Ok(m) => eprintln!("peers: run={round} {}", fields(system, &workload, m)),
                Err(reason) => eprintln!(
                    "peers: run={round} system={} skipped reason={reason}",
                    system.name()
                ),
            }
            outcomes[index].push(outcome);
        }
    }

    for (&system, outcomes) in args.systems.iter().zip(&outcomes) {
        let measured: Vec<Measured> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .copied()
            .collect();
        if measured.is_empty() {
            let reason = outcomes
                .iter()
                .find_map(|o| o.as_ref().err())
                .map_or("no run", String::as_str);
            println!("peers: system={} skipped reason={reason}", system.name());
            continue;
        }
        let median = Measured {
            delivered_per_sec: median(measured.iter().map(|m| m.delivered_per_sec)),
            p50_us: median(measured.iter().map(|m| m.p50_us)),
            p99_us: median(measured.iter().map(|m| m.p99_us)),
            lost: median(measured.iter().map(|m| m.lost)),
        };
        println!("peers: {}", fields(system, &workload, &median));
    }
    ExitCode::SUCCESS
}

/// A result line after its `peers:` prefix.
fn fields(system: System, w: &Workload, m: &Measured) -> String {
    format!(
        "system={} pubs={} subs={} size={} delivered_per_sec={} p50_us={} p99_us={} lost={}",
        system.name(),
        w.pubs,
        w.subs,
        w.size,
        m.delivered_per_sec,
        m.p50_us,
        m.p99_us,
        m.lost
    )
}

/// The middle value; the upper one of the two middle values for an even count.
fn median(values: impl Iterator<Item = u64>) -> u64 {
    let mut values: Vec<u64> = values.collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Where the peers listen.
struct Endpoints {
    nats: String,
    redis: String,
    mqtt: String,
}

/// How to reach the system under test during one run.
enum Endpoint {
    Switchboard(String),
    Nats(String),
    Redis(redis::Client),
    Mqtt(String, u16),
}

/// One subscriber's connection and the payloads it receives. The stream ends when
/// the connection does.
struct Subscriber {
    _held: Held,
    payloads: BoxStream<'static, Bytes>,
}

/// One publisher's connection.
struct Publisher {
    link: Link,
    _held: Held,
}

enum Link {
    Switchboard(ClientHandle),
    Nats(async_nats::Client, async_nats::Subject),
    Redis(redis::aio::MultiplexedConnection),
    Mqtt(rumqttc::AsyncClient),
}

/// What keeps a connection open, and the tasks that drive it; the tasks end with it.
#[derive(Default)]
struct Held {
    keep: Vec<Box<dyn Any + Send>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.keep.clear();
    }
}

impl Publisher {
    /// Sends the payloads, in order.
    async fn send(&mut self, topic: &str, payloads: &mut Vec<Bytes>) -> Result<(), String> {
        match &mut self.link {
            Link::Switchboard(handle) => {
                for payload in payloads.drain(..) {
                    handle
                        .publish(topic, payload)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Link::Nats(client, subject) => {
                for payload in payloads.drain(..) {
                    client
                        .publish(subject.clone(), payload)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Link::Redis(connection) => {
                // One round trip per batch: Redis answers every PUBLISH, so waiting
                // for each answer alone would measure the round trip, not the server.
                let mut pipe = redis::pipe();
                for payload in payloads.drain(..) {
                    pipe.cmd("PUBLISH").arg(topic).arg(&payload[..]).ignore();
                }
                pipe.query_async::<()>(connection)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Link::Mqtt(client) => {
                for payload in payloads.drain(..) {
                    client
                        .publish_bytes(topic, rumqttc::QoS::AtMostOnce, false, payload)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }
}

/// One subscriber's progress, on its own cache line: the subscriber writes, the
/// governor and the main task read.
#[repr(align(64))]
#[derive(Default)]
struct Progress {
    /// Deliveries so far, for the rate.
    delivered: AtomicU64,
    /// How far this subscriber has got: the sum over publishers of the last sequence
    /// number seen. A lost message is passed over, so it does not hold publishers
    /// back for ever.
    seen: AtomicU64,
    /// Set when the connection ended early; the governor stops waiting for it.
    dead: AtomicBool,
}

/// What the tasks of one run share.
struct Run {
    epoch: Instant,
    topic: Arc<str>,
    pubs: usize,
    size: usize,
    window: u64,
    subscribers: Box<[Progress]>,
    /// Messages each publisher has sent.
    sent: Box<[AtomicU64]>,
    /// One permit per message that may be published now (flat out only).
    permits: Semaphore,
    progress: Notify,
    /// Set when publishing ends (paced publishers look at it).
    stopped: AtomicBool,
    /// Latencies count for messages sent from this time (µs) ...
    measure_from: AtomicU64,
    /// ... to this one.
    measure_to: AtomicU64,
    /// Cancelled when subscribers should stop and report.
    finish: CancellationToken,
    failures: Mutex<Vec<String>>,
}

impl Run {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn fail(&self, why: String) {
        let mut failures = self.failures.lock();
        if failures.len() < 10 {
            failures.push(why);
        }
    }

    fn delivered(&self) -> u64 {
        self.subscribers
            .iter()
            .map(|s| s.delivered.load(Ordering::Acquire))
            .sum()
    }

    fn total_sent(&self) -> u64 {
        self.sent.iter().map(|s| s.load(Ordering::Acquire)).sum()
    }

    /// A payload: header, then filler.
    fn payload(&self, publisher: usize, seq: u64) -> Bytes {
        let mut payload = BytesMut::with_capacity(self.size);
        payload.put_u16_le(publisher as u16);
        payload.put_u32_le(seq as u32);
        payload.put_u64_le(self.now_us());
        payload.resize(self.size, 0);
        payload.freeze()
    }
}

/// Runs the workload once against one system.
async fn run_system(
    system: System,
    w: &Workload,
    endpoints: &Endpoints,
    round: usize,
) -> Result<Measured, String> {
    // The switchboard broker lives for one run; the others are already running.
    let mut server = None;
    let endpoint = match system {
        System::Switchboard => {
            let started = start_server()?;
            let addr = started.addr.clone();
            server = Some(started);
            Endpoint::Switchboard(addr)
        }
        System::Nats => Endpoint::Nats(endpoints.nats.clone()),
        System::Redis => Endpoint::Redis(
            redis::Client::open(format!("redis://{}/", endpoints.redis))
                .map_err(|e| format!("bad Redis address: {e}"))?,
        ),
        System::Mosquitto => {
            let (host, port) = endpoints
                .mqtt
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
                .ok_or_else(|| format!("bad MQTT address {}", endpoints.mqtt))?;
            Endpoint::Mqtt(host, port)
        }
    };
    let topic: Arc<str> = Arc::from(format!("peers.{}.{round}", std::process::id()));

    // Subscribers first, each confirmed, then publishers.
    let subscribers: Vec<Result<Subscriber, String>> = futures::stream::iter(0..w.subs)
        .map(|i| {
            let attempt = connect_subscriber(&endpoint, i, &topic, w.size);
            async move {
                tokio::time::timeout(CONNECT_TIMEOUT, attempt)
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                    .map_err(|e| format!("subscriber {i} cannot connect: {e}"))
            }
        })
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let subscribers: Vec<Subscriber> = subscribers.into_iter().collect::<Result<_, _>>()?;
    let mut publishers = Vec::with_capacity(w.pubs);
    for i in 0..w.pubs {
        let attempt = connect_publisher(&endpoint, i, &topic, w.size);
        let publisher = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
            .map_err(|e| format!("publisher {i} cannot connect: {e}"))?;
        publishers.push(publisher);
    }
    // A subscription confirmed to one connection may still be on its way through the
    // server's other threads.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let paced = w.rate.is_some();
    let run = Arc::new(Run {
        epoch: Instant::now(),
        topic,
        pubs: w.pubs,
        size: w.size,
        window: w.window,
        subscribers: (0..w.subs).map(|_| Progress::default()).collect(),
        sent: (0..w.pubs).map(|_| AtomicU64::new(0)).collect(),
        permits: Semaphore::new(if paced { 0 } else { w.window as usize }),
        progress: Notify::new(),
        stopped: AtomicBool::new(false),
        measure_from: AtomicU64::new(u64::MAX),
        measure_to: AtomicU64::new(u64::MAX),
        finish: CancellationToken::new(),
        failures: Mutex::new(Vec::new()),
    });

    let receivers: Vec<JoinHandle<Tally>> = subscribers
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(receive(run.clone(), i, s)))
        .collect();
    let governor = (!paced).then(|| tokio::spawn(govern(run.clone())));
    let senders: Vec<JoinHandle<(u64, Publisher)>> = publishers
        .into_iter()
        .enumerate()
        .map(|(i, p)| match w.rate {
            None => tokio::spawn(publish_flat(run.clone(), i, p)),
            Some(rate) => {
                let run = run.clone();
                let runtime = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || publish_paced(run, i, p, rate, runtime))
            }
        })
        .collect();

    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(w.warmup)).await;
    let (from_count, from) = (run.delivered(), Instant::now());
    run.measure_from.store(run.now_us(), Ordering::Release);
    tokio::time::sleep(Duration::from_secs(w.secs)).await;
    run.measure_to.store(run.now_us(), Ordering::Release);
    let (to_count, to) = (run.delivered(), Instant::now());
    let delivered_per_sec =
        ((to_count - from_count) as f64 / to.duration_since(from).as_secs_f64()) as u64;

    // Stop publishing; closing the semaphore wakes publishers waiting for a permit.
    run.stopped.store(true, Ordering::Release);
    run.permits.close();
    let mut publishers = Vec::new();
    for (i, sender) in senders.into_iter().enumerate() {
        match sender.await {
            Ok((sent, publisher)) => {
                run.sent[i].store(sent, Ordering::Release);
                publishers.push(publisher);
            }
            Err(e) => run.fail(format!("publisher {i} failed: {e}")),
        }
    }
    if let Some(governor) = governor {
        governor.abort();
    }

    // Let subscribers catch up: until all have seen everything, or deliveries pause.
    let total = run.total_sent();
    let drain_until = Instant::now() + Duration::from_secs(w.drain_secs);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let behind = run
            .subscribers
            .iter()
            .filter(|s| !s.dead.load(Ordering::Acquire))
            .map(|s| total.saturating_sub(s.seen.load(Ordering::Acquire)))
            .sum::<u64>();
        let now = Instant::now();
        if behind == 0 || now >= drain_until {
            break;
        }
        if behind != last.0 {
            last = (behind, now);
        } else if now.duration_since(last.1) >= STALL {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.finish.cancel();

    // Count.
    let mut histogram = Histogram::new();
    let mut lost = 0u64;
    let mut reordered = 0u64;
    let mut bad = 0u64;
    for (i, receiver) in receivers.into_iter().enumerate() {
        match receiver.await {
            Ok(tally) => {
                histogram.merge(&tally.latency);
                lost += run
                    .sent
                    .iter()
                    .zip(&tally.accepted)
                    .map(|(sent, &got)| sent.load(Ordering::Acquire).saturating_sub(got))
                    .sum::<u64>();
                reordered += tally.reordered;
                bad += tally.bad;
            }
            Err(e) => run.fail(format!("subscriber {i} failed: {e}")),
        }
    }
    if reordered > 0 || bad > 0 {
        run.fail(format!(
            "{reordered} deliveries out of order, {bad} not of this run"
        ));
    }
    for why in run.failures.lock().iter() {
        eprintln!("peers: system={} {why}", system.name());
    }

    // Close every connection before the broker goes.
    drop(publishers);
    drop(server);
    Ok(Measured {
        delivered_per_sec,
        p50_us: histogram.quantile(0.50),
        p99_us: histogram.quantile(0.99),
        lost,
    })
}

async fn connect_subscriber(
    endpoint: &Endpoint,
    index: usize,
    topic: &str,
    size: usize,
) -> Result<Subscriber, String> {
    let mut held = Held::default();
    let payloads = match endpoint {
        Endpoint::Switchboard(addr) => {
            let client = Client::builder(format!("peers-sub-{index}"))
                .connect_tcp(addr.as_str())
                .await
                .map_err(|e| e.to_string())?;
            client.subscribe(topic).await.map_err(|e| e.to_string())?;
            // Dropping every handle would close the connection.
            let (handle, events) = client.split();
            held.keep.push(Box::new(handle));
            events
                .filter_map(|event| {
                    futures::future::ready(match event {
                        Event::Message(message) => Some(message.payload),
                        _ => None,
                    })
                })
                .boxed()
        }
        Endpoint::Nats(addr) => {
            let client = async_nats::connect(addr.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let subscriber = client
                .subscribe(topic.to_string())
                .await
                .map_err(|e| e.to_string())?;
            // The server has the subscription once it answers the flush's PING.
            client.flush().await.map_err(|e| e.to_string())?;
            held.keep.push(Box::new(client));
            subscriber.map(|message| message.payload).boxed()
        }
        Endpoint::Redis(client) => {
            let pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(topic).await.map_err(|e| e.to_string())?;
            held.keep.push(Box::new(sink));
            stream
                .map(|message| Bytes::copy_from_slice(message.get_payload_bytes()))
                .boxed()
        }
        Endpoint::Mqtt(host, port) => {
            let options = mqtt_options(format!("peers-sub-{index}"), host, *port, size);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
            client
                .subscribe(topic, rumqttc::QoS::AtMostOnce)
                .await
                .map_err(|e| e.to_string())?;
            let (ready_tx, ready_rx) = oneshot::channel();
            let (tx, mut rx) = mpsc::channel(4096);
            // rumqttc's event loop has to be polled to make progress; it runs on a
            // task of its own and hands payloads over a channel.
            held.tasks.push(tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                            if tx.send(publish.payload).await.is_err() {
                                return;
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(Ok(()));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(Err(e.to_string()));
                            }
                            return;
                        }
                    }
                }
            }));
            ready_rx
                .await
                .map_err(|_| "the MQTT event loop ended".to_string())??;
            held.keep.push(Box::new(client));
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
        }
    };
    Ok(Subscriber {
        _held: held,
        payloads,
    })
}

async fn connect_publisher(
    endpoint: &Endpoint,
    index: usize,
    topic: &str,
    size: usize,
) -> Result<Publisher, String> {
    let mut held = Held::default();
    let link = match endpoint {
        Endpoint::Switchboard(addr) => {
            let client = Client::builder(format!("peers-pub-{index}"))
                .connect_tcp(addr.as_str())
                .await
                .map_err(|e| e.to_string())?;
            Link::Switchboard(client.handle())
        }
        Endpoint::Nats(addr) => {
            let client = async_nats::connect(addr.as_str())
                .await
                .map_err(|e| e.to_string())?;
            Link::Nats(client, async_nats::Subject::from(topic))
        }
        Endpoint::Redis(client) => Link::Redis(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?,
        ),
        Endpoint::Mqtt(host, port) => {
            let options = mqtt_options(format!("peers-pub-{index}"), host, *port, size);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
            let (ready_tx, ready_rx) = oneshot::channel();
            held.tasks.push(tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(Ok(()));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(Err(e.to_string()));
                            }
                            return;
                        }
                    }
                }
            }));
            ready_rx
                .await
                .map_err(|_| "the MQTT event loop ended".to_string())??;
            Link::Mqtt(client)
        }
    };
    Ok(Publisher { link, _held: held })
}

fn mqtt_options(id: String, host: &str, port: u16, size: usize) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(id, host, port);
    let packet = (size + 1024).max(10 * 1024);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(packet, packet);
    options
}

/// Turns the subscribers' progress into permits: at most `window` messages are ever
/// published ahead of the subscriber that is furthest behind.
async fn govern(run: Arc<Run>) {
    let mut issued = run.window;
    loop {
        run.progress.notified().await;
        let slowest = run
            .subscribers
            .iter()
            .filter(|s| !s.dead.load(Ordering::Acquire))
            .map(|s| s.seen.load(Ordering::Acquire))
            .min();
        let Some(slowest) = slowest else {
            return;
        };
        let allowed = slowest + run.window;
        if allowed > issued {
            run.permits.add_permits((allowed - issued) as usize);
            issued = allowed;
        }
    }
}

/// Publishes as fast as the permits allow; returns how many it sent, and the
/// publisher, so that its connection outlives the drain.
async fn publish_flat(run: Arc<Run>, index: usize, mut publisher: Publisher) -> (u64, Publisher) {
    let mut seq = 0u64;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(permit) = run.permits.acquire().await {
        // Whatever else is available goes in the same batch.
        permit.forget();
        let mut n = 1;
        while n < MAX_BATCH {
            match run.permits.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        for _ in 0..n {
            seq += 1;
            batch.push(run.payload(index, seq));
        }
        run.sent[index].store(seq, Ordering::Release);
        if let Err(e) = publisher.send(&run.topic, &mut batch).await {
            run.fail(format!("publisher {index} cannot publish: {e}"));
            break;
        }
    }
    (seq, publisher)
}

/// Publishes `rate` messages per second, evenly spaced, on a thread of its own: the
/// runtime's timer ticks in milliseconds, which would send bursts.
fn publish_paced(
    run: Arc<Run>,
    index: usize,
    mut publisher: Publisher,
    rate: u64,
    runtime: tokio::runtime::Handle,
) -> (u64, Publisher) {
    if matches!(publisher.link, Link::Redis(_)) {
        return publish_pipelined(run, index, publisher, rate, runtime);
    }
    let mut batch = Vec::with_capacity(1);
    let sent = pace(&run, rate, |seq| {
        batch.push(run.payload(index, seq));
        run.sent[index].store(seq, Ordering::Release);
        match runtime.block_on(publisher.send(&run.topic, &mut batch)) {
            Ok(()) => true,
            Err(e) => {
                run.fail(format!("publisher {index} cannot publish: {e}"));
                false
            }
        }
    });
    (sent, publisher)
}

/// [`publish_paced`] for a client whose every publish waits for the server's answer
/// (Redis): waiting for each answer before sending the next would hold the publisher
/// below the rate whenever a round trip takes longer than the interval. Payloads go to
/// a task that sends, in one pipeline, whatever fell due while the last round trip was
/// out. A payload's time is taken when it falls due, so that wait counts in its
/// latency.
fn publish_pipelined(
    run: Arc<Run>,
    index: usize,
    mut publisher: Publisher,
    rate: u64,
    runtime: tokio::runtime::Handle,
) -> (u64, Publisher) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let pipelining = {
        let run = run.clone();
        runtime.spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 1024).await > 0 {
                if let Err(e) = publisher.send(&run.topic, &mut batch).await {
                    run.fail(format!("publisher {index} cannot publish: {e}"));
                    break;
                }
            }
            publisher
        })
    };
    let sent = pace(&run, rate, |seq| {
        run.sent[index].store(seq, Ordering::Release);
        tx.send(run.payload(index, seq)).is_ok()
    });
    drop(tx);
    match runtime.block_on(pipelining) {
        Ok(publisher) => (sent, publisher),
        // Seen by the caller as this publisher's failure.
        Err(e) => panic!("the pipeline of publisher {index} failed: {e}"),
    }
}

/// Calls `send` with sequence numbers 1, 2, ... at `rate` per second, each at its due
/// time, until publishing stops or `send` fails; returns the last number.
fn pace(run: &Run, rate: u64, mut send: impl FnMut(u64) -> bool) -> u64 {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut seq = 0u64;
    while !run.stopped.load(Ordering::Acquire) {
        let due = start + interval.mul_f64(seq as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        seq += 1;
        if !send(seq) {
            break;
        }
    }
    seq
}

/// What one subscriber saw.
struct Tally {
    /// Messages taken in order from each publisher.
    accepted: Vec<u64>,
    /// The last sequence number seen from each publisher.
    last: Vec<u64>,
    reordered: u64,
    bad: u64,
    latency: Histogram,
}

impl Tally {
    /// Checks one payload; returns how far it moved this subscriber along its
    /// publisher's sequence (0 for one out of order).
    fn check(&mut self, run: &Run, payload: &[u8]) -> u64 {
        let Some(header) = payload.get(..HEADER) else {
            self.bad += 1;
            return 0;
        };
        let publisher = u16::from_le_bytes([header[0], header[1]]) as usize;
        let seq = u64::from(u32::from_le_bytes([
            header[2], header[3], header[4], header[5],
        ]));
        let mut sent = [0u8; 8];
        sent.copy_from_slice(&header[6..14]);
        let sent_us = u64::from_le_bytes(sent);
        if publisher >= run.pubs || seq == 0 {
            self.bad += 1;
            return 0;
        }

        if sent_us >= run.measure_from.load(Ordering::Relaxed)
            && sent_us < run.measure_to.load(Ordering::Relaxed)
        {
            self.latency.record(run.now_us().saturating_sub(sent_us));
        }
        let last = self.last[publisher];
        if seq <= last {
            self.reordered += 1;
            return 0;
        }
        self.last[publisher] = seq;
        self.accepted[publisher] += 1;
        seq - last
    }
}

/// Receives one subscriber's payloads and checks each. Progress goes to the shared
/// counters in small batches, and whenever nothing is waiting, so the governor never
/// waits on a count held in a local variable.
async fn receive(run: Arc<Run>, me: usize, subscriber: Subscriber) -> Tally {
    let Subscriber {
        _held: held,
        mut payloads,
    } = subscriber;
    let progress = &run.subscribers[me];
    let batch = (run.window / 4).max(1);
    let mut tally = Tally {
        accepted: vec![0; run.pubs],
        last: vec![0; run.pubs],
        reordered: 0,
        bad: 0,
        latency: Histogram::new(),
    };
    let mut delivered = 0u64;
    let mut seen = 0u64;
    let mut unreported = 0u64;

    loop {
        let next = match payloads.next().now_or_never() {
            Some(next) => next,
            None => {
                if unreported > 0 {
                    progress.seen.store(seen, Ordering::Release);
                    unreported = 0;
                    run.progress.notify_one();
                }
                tokio::select! {
                    next = payloads.next() => next,
                    _ = run.finish.cancelled() => break,
                }
            }
        };
        let Some(payload) = next else {
            if !run.finish.is_cancelled() {
                run.fail(format!("subscriber {me}: the connection ended"));
            }
            progress.dead.store(true, Ordering::Release);
            break;
        };

        delivered += 1;
        progress.delivered.store(delivered, Ordering::Release);
        let advanced = tally.check(&run, &payload);
        seen += advanced;
        unreported += 1;
        if unreported >= batch {
            progress.seen.store(seen, Ordering::Release);
            unreported = 0;
            run.progress.notify_one();
            // A system that never runs dry would otherwise keep this loop from
            // looking at `finish`.
            if run.finish.is_cancelled() {
                break;
            }
        }
    }

    progress.seen.store(seen, Ordering::Release);
    run.progress.notify_one();
    drop(held);
    tally
}

/// Latencies in microseconds: exact below 64, then 32 buckets per power of two (about
/// 3% wide), up to 2^40 µs.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    const EXACT: u64 = 64;
    const SUB_BITS: u32 = 5;
    const MAX_EXP: u32 = 40;

    fn new() -> Histogram {
        let buckets = Self::EXACT as usize + (((Self::MAX_EXP - 5) as usize) << Self::SUB_BITS);
        Histogram {
            counts: vec![0; buckets],
            total: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < Self::EXACT {
            return us as usize;
        }
        let us = us.min((1 << Self::MAX_EXP) - 1);
        let exp = 63 - us.leading_zeros();
        let sub = (us >> (exp - Self::SUB_BITS)) & ((1 << Self::SUB_BITS) - 1);
        Self::EXACT as usize + (((exp - 6) as usize) << Self::SUB_BITS) + sub as usize
    }

    /// The middle of a bucket.
    fn value(index: usize) -> u64 {
        if index < Self::EXACT as usize {
            return index as u64;
        }
        let k = (index - Self::EXACT as usize) as u64;
        let exp = 6 + (k >> Self::SUB_BITS);
        let sub = k & ((1 << Self::SUB_BITS) - 1);
        let shift = exp - u64::from(Self::SUB_BITS);
        (((1 << Self::SUB_BITS) + sub) << shift) + (1 << shift) / 2
    }

    fn record(&mut self, us: u64) {
        self.counts[Self::index(us)] += 1;
        self.total += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::value(index);
            }
        }
        Self::value(self.counts.len() - 1)
    }
}
