//! Fan-out throughput: one publisher, N subscribers on one session, through the
//! in-process transport and loopback TCP, beside a bare `tokio::sync::broadcast` of
//! `Bytes` doing the same work. Throughput is in deliveries.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::{Broker, Client, ClientHandle, Event, MemoryTransport, TcpTransport};
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, Notify};

/// Messages published per measured batch.
const BATCH: u64 = 1_000;

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

enum Link {
    Memory,
    Tcp,
}

/// A broker with `subs` subscribers on one session and one publisher.
async fn setup(link: &Link, subs: usize) -> (Broker, ClientHandle, Arc<Tally>) {
    let broker = Broker::builder().build();
    let tally = Tally::new();
    let (transport, connector) = MemoryTransport::new();
    tokio::spawn(broker.serve(transport));
    let tcp = TcpTransport::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("local address");
    tokio::spawn(broker.serve(tcp));
    let connect = |user: String| {
        let connector = connector.clone();
        async move {
            let builder = Client::builder(user);
            match link {
                Link::Memory => builder.connect_memory(&connector).await,
                Link::Tcp => builder.connect_tcp(addr).await,
            }
            .expect("connect")
        }
    };
    for i in 0..subs {
        let client = connect(format!("sub{i}")).await;
        client.subscribe("bench").await.expect("subscribe");
        let tally = tally.clone();
        let (_handle, mut events) = client.split();
        tokio::spawn(async move {
            let _keep = _handle;
            while let Some(event) = events.next().await {
                if let Event::Message(_) = event {
                    tally.add(1);
                }
            }
        });
    }
    let publisher = connect("pub".to_string()).await;
    (broker, publisher.handle(), tally)
}

fn broker_fanout(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("fanout");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for (link, name) in [(Link::Memory, "memory"), (Link::Tcp, "tcp")] {
        for subs in [1usize, 10, 100] {
            for size in [16usize, 128] {
                let (broker, publisher, tally) = rt.block_on(setup(&link, subs));
                let payload = Bytes::from(vec![7u8; size]);
                group.throughput(Throughput::Elements(BATCH * subs as u64));
                let id = BenchmarkId::new(format!("{name}/1:{subs}"), format!("{size}B"));
                group.bench_function(id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let publisher = publisher.clone();
                        let tally = tally.clone();
                        let payload = payload.clone();
                        async move {
                            let start = Instant::now();
                            for _ in 0..iters {
                                let target =
                                    tally.delivered.load(Ordering::Acquire) + BATCH * subs as u64;
                                for _ in 0..BATCH {
                                    publisher.publish("bench", payload.clone()).await.unwrap();
                                }
                                tally.wait_for(target).await;
                            }
                            start.elapsed()
                        }
                    })
                });
                rt.block_on(broker.shutdown());
            }
        }
    }
    group.finish();
}

fn bare_broadcast(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("fanout");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for subs in [1usize, 10, 100] {
        for size in [16usize, 128] {
            let (tx, _) = broadcast::channel::<Bytes>(BATCH as usize * 2);
            let tally = Tally::new();
            let _guard = rt.enter();
            for _ in 0..subs {
                let mut rx = tx.subscribe();
                let tally = tally.clone();
                rt.spawn(async move {
                    while rx.recv().await.is_ok() {
                        tally.add(1);
                    }
                });
            }
            let payload = Bytes::from(vec![7u8; size]);
            group.throughput(Throughput::Elements(BATCH * subs as u64));
            let id = BenchmarkId::new(format!("broadcast/1:{subs}"), format!("{size}B"));
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let tx = tx.clone();
                    let tally = tally.clone();
                    let payload = payload.clone();
                    async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let target =
                                tally.delivered.load(Ordering::Acquire) + BATCH * subs as u64;
                            for _ in 0..BATCH {
                                let _ = tx.send(payload.clone());
                            }
                            tally.wait_for(target).await;
                        }
                        start.elapsed()
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, broker_fanout, bare_broadcast);
criterion_main!(benches);
