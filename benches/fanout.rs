//! Fan-out throughput in the shapes of `nats bench`: P publishers and S subscribers on
//! one session (1:1, 1:10, 1:100, 1:1000 and 4:4), payloads of 16 B, 128 B and 16 KiB,
//! through in-process connections (`local/`), the in-process transport (`memory/`) and
//! loopback TCP (`tcp/`), beside a bare
//! `tokio::sync::broadcast` of `Bytes` doing the same work. Throughput is in
//! deliveries: one message reaching one subscriber.
//!
//! One measured iteration publishes a batch from every publisher and waits until every
//! subscriber has all of it. A batch is at most 1,000 messages, fewer where the shape
//! would make an iteration long (about 100,000 deliveries at most) and at most 256 KiB
//! of payload from all publishers together, so that no subscriber's outbox ever comes
//! near the broker's 1 MiB limit and the slow-consumer policy never fires (a subscriber
//! closed as a slow consumer would leave the iteration waiting for ever).
//!
//! To keep `cargo bench` within a few minutes on two cores, the broker's 1:1000 shape
//! runs only with 16 B and 128 B payloads (1:1000 at 16 KiB is 256 MB of deliveries
//! per iteration); the bare channel runs every combination.

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures::{FutureExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::{
    Broker, Client, ClientError, ClientHandle, Event, LocalConnection, MemoryTransport,
    TcpTransport,
};
use tokio::runtime::Runtime;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, Notify};

/// Publishers and subscribers.
const SHAPES: [(usize, usize); 5] = [(1, 1), (1, 10), (1, 100), (1, 1000), (4, 4)];

/// Payload bytes.
const SIZES: [usize; 3] = [16, 128, 16 * 1024];

/// Messages each publisher sends per iteration in the given shape and size.
fn batch(pubs: usize, subs: usize, size: usize) -> u64 {
    let by_deliveries = 100_000 / (pubs * subs) as u64;
    // Every publisher's batch lands in each subscriber's outbox.
    let by_bytes = (256 * 1024 / (size * pubs)) as u64;
    by_deliveries.min(by_bytes).clamp(10, 1_000)
}

/// Whether the broker runs this combination (see the module's docs).
fn broker_runs(subs: usize, size: usize) -> bool {
    !(subs >= 1000 && size > 1024)
}

fn shape_name(pubs: usize, subs: usize) -> String {
    format!("{pubs}:{subs}")
}

/// Counts deliveries across subscribers and wakes the publisher at a target.
struct Tally {
    delivered: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            delivered: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        })
    }

    fn add(&self, n: u64) {
        let now = self.delivered.fetch_add(n, Ordering::AcqRel) + n;
        if now >= self.target.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    async fn wait_for(&self, target: u64) {
        self.target.store(target, Ordering::Release);
        while self.delivered.load(Ordering::Acquire) < target {
            let notified = self.reached.notified();
            if self.delivered.load(Ordering::Acquire) >= target {
                break;
            }
            notified.await;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// Connections of the host's own process (`Broker::connect_local`).
    Local,
    /// Clients over the in-process transport.
    Memory,
    /// Clients over loopback TCP.
    Tcp,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Local => "local",
            Link::Memory => "memory",
            Link::Tcp => "tcp",
        }
    }
}

/// A publishing connection of either kind.
#[derive(Clone)]
enum Publisher {
    Client(ClientHandle),
    Local(Arc<LocalConnection>),
}

impl Publisher {
    async fn publish(&self, session: &str, payload: Bytes) -> Result<(), ClientError> {
        match self {
            Publisher::Client(handle) => handle.publish(session, payload).await,
            Publisher::Local(local) => local.publish(session, payload).await,
        }
    }
}

/// Adds up the messages among `events` per wake-up, not one by one, so that a
/// thousand subscribers do not all fight over the one counter.
async fn count<S: futures::Stream<Item = Event> + Unpin>(mut events: S, tally: Arc<Tally>) {
    while let Some(event) = events.next().await {
        let mut n = u64::from(matches!(event, Event::Message(_)));
        while let Some(Some(event)) = events.next().now_or_never() {
            n += u64::from(matches!(event, Event::Message(_)));
        }
        tally.add(n);
    }
}

/// A broker with `subs` subscribers on one session and `pubs` publishers that are not
/// members of it.
async fn setup(link: Link, pubs: usize, subs: usize) -> (Broker, Vec<Publisher>, Arc<Tally>) {
    let broker = Broker::builder().build();
    let tally = Tally::new();
    let (transport, connector) = MemoryTransport::new();
    let addr = match link {
        Link::Local => None,
        Link::Memory => {
            tokio::spawn(broker.serve(transport));
            None
        }
        Link::Tcp => {
            let tcp = TcpTransport::bind("127.0.0.1:0").await.expect("bind");
            let addr = tcp.local_addr().expect("local address");
            tokio::spawn(broker.serve(tcp));
            Some(addr)
        }
    };
    let connect = |user: String| {
        let connector = connector.clone();
        async move {
            let builder = Client::builder(user);
            match addr {
                None => builder.connect_memory(&connector).await,
                Some(addr) => builder.connect_tcp(addr).await,
            }
            .expect("connect")
        }
    };

    for i in 0..subs {
        let user = format!("sub{i}");
        if link == Link::Local {
            let local = broker.connect_local(&user).expect("connect");
            local.subscribe("bench").expect("subscribe");
            tokio::spawn(count(local, tally.clone()));
            continue;
        }
        let client = connect(user).await;
        client.subscribe("bench").await.expect("subscribe");
        let (handle, events) = client.split();
        let tally = tally.clone();
        tokio::spawn(async move {
            // Dropping every handle would close the connection.
            let _handle = handle;
            count(events, tally).await;
        });
    }
    let mut publishers = Vec::with_capacity(pubs);
    for i in 0..pubs {
        let user = format!("pub{i}");
        publishers.push(if link == Link::Local {
            Publisher::Local(Arc::new(broker.connect_local(&user).expect("connect")))
        } else {
            Publisher::Client(connect(user).await.handle())
        });
    }
    (broker, publishers, tally)
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .sampling_mode(SamplingMode::Flat);
}

fn broker_fanout(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("fanout");
    configure(&mut group);
    for link in [Link::Local, Link::Memory, Link::Tcp] {
        for (pubs, subs) in SHAPES {
            let (broker, publishers, tally) = rt.block_on(setup(link, pubs, subs));
            for size in SIZES {
                if !broker_runs(subs, size) {
                    continue;
                }
                let batch = batch(pubs, subs, size);
                let per_iteration = batch * (pubs * subs) as u64;
                let payload = Bytes::from(vec![7u8; size]);
                group.throughput(Throughput::Elements(per_iteration));
                let id = BenchmarkId::new(
                    format!("{}/{}", link.name(), shape_name(pubs, subs)),
                    format!("{size}B"),
                );
                group.bench_function(id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let publishers = publishers.clone();
                        let tally = tally.clone();
                        let payload = payload.clone();
                        async move {
                            let start = Instant::now();
                            for _ in 0..iters {
                                let target =
                                    tally.delivered.load(Ordering::Acquire) + per_iteration;
                                let sends = publishers.iter().map(|publisher| {
                                    let payload = payload.clone();
                                    async move {
                                        for _ in 0..batch {
                                            publisher
                                                .publish("bench", payload.clone())
                                                .await
                                                .expect("publish");
                                        }
                                    }
                                });
                                futures::future::join_all(sends).await;
                                tally.wait_for(target).await;
                            }
                            start.elapsed()
                        }
                    })
                });
            }
            rt.block_on(broker.shutdown());
        }
    }
    group.finish();
}

fn bare_broadcast(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("fanout");
    configure(&mut group);
    for (pubs, subs) in SHAPES {
        for size in SIZES {
            let batch = batch(pubs, subs, size);
            let per_iteration = batch * (pubs * subs) as u64;
            // Room for a whole iteration, so that no receiver ever lags.
            let (tx, _) = broadcast::channel::<Bytes>((batch as usize * pubs * 2).max(16));
            let tally = Tally::new();
            let mut receivers = Vec::with_capacity(subs);
            for _ in 0..subs {
                let mut rx = tx.subscribe();
                let tally = tally.clone();
                receivers.push(rt.spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(_) => {}
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => return,
                        }
                        let mut n = 1;
                        loop {
                            match rx.try_recv() {
                                Ok(_) => n += 1,
                                Err(TryRecvError::Lagged(_)) => {}
                                Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
                            }
                        }
                        tally.add(n);
                    }
                }));
            }
            let payload = Bytes::from(vec![7u8; size]);
            group.throughput(Throughput::Elements(per_iteration));
            let id = BenchmarkId::new(
                format!("broadcast/{}", shape_name(pubs, subs)),
                format!("{size}B"),
            );
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let tx = tx.clone();
                    let tally = tally.clone();
                    let payload = payload.clone();
                    async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let target = tally.delivered.load(Ordering::Acquire) + per_iteration;
                            let sends = (0..pubs).map(|_| {
                                let tx = tx.clone();
                                let payload = payload.clone();
                                async move {
                                    for _ in 0..batch {
                                        let _ = tx.send(payload.clone());
                                    }
                                }
                            });
                            futures::future::join_all(sends).await;
                            tally.wait_for(target).await;
                        }
                        start.elapsed()
                    }
                })
            });
            drop(tx);
            for receiver in receivers {
                let _ = rt.block_on(receiver);
            }
        }
    }
    group.finish();
}

criterion_group!(benches, broker_fanout, bare_broadcast);
criterion_main!(benches);
