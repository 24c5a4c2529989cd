//! A load generator that checks every delivery.
//!
//! ```text
//! cargo run --release --example load -- [--addr ADDR] --clients N --secs S --size BYTES
//! ```
//!
//! N clients (default 1000) join one session, then every one of them publishes to it
//! for S seconds (default 10) with payloads of BYTES bytes (default 128). Without
//! `--addr` the broker runs embedded in this process, over real TCP sockets on
//! 127.0.0.1, or over the in-process transport with `--memory`.
//!
//! Each payload carries its publisher's index, a sequence number and the time it was
//! sent. Every client checks every delivery: per publisher the sequence must go up by
//! exactly one. A number at or below the last one seen is a duplicate when it was seen
//! before and a reordering when it fills an earlier gap; gaps still open at the end are
//! lost messages.
//!
//! Publishers are held to a window: no member may have more than `--window` messages
//! (default 64) published but not yet received. Without it publishers would run ahead
//! of the slowest member until its outbox overflowed and the broker disconnected it,
//! which measures the slow-consumer policy rather than the broker. A governor task
//! turns the members' progress into permits of a fair semaphore, so publishers take
//! turns.
//!
//! The last line printed is
//!
//! ```text
//! load: clients=N sent=.. delivered=.. expected=.. lost=.. dup=.. reordered=.. deliveries_per_sec=.. p50_us=.. p99_us=..
//! ```
//!
//! where expected is what every other member should have received, the rate runs from
//! the first publication to the last delivery, and the latencies are from publish to
//! delivery. The exit code is non-zero when anything was lost, duplicated or reordered,
//! or when a client failed to connect, was disconnected or received something it
//! should not have; stderr says why.

use bytes::Bytes;
use clap::Parser;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::{
    Broker, Client, ClientHandle, Event, Events, MemoryConnector, MemoryTransport, MessageKind,
    TcpTransport,
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Publisher index (u32), sequence number (u64), send time (u64 µs since `epoch`).
const HEADER: usize = 4 + 8 + 8;

/// Longest a single connect and subscribe may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the clients may take to close once the run is over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failure, how long deliveries may pause before the run stops waiting.
const STALL: Duration = Duration::from_secs(1);

/// Failures kept for the report; the rest are only counted.
const FAILURES_KEPT: usize = 20;

#[derive(Parser)]
#[command(about = "Publish to one session from N clients and check every delivery")]
struct Args {
    /// A running broker's address; without it a broker runs in this process.
    #[arg(long)]
    addr: Option<String>,

    /// Clients, each both a publisher and a member of the session.
    #[arg(long, default_value_t = 1000)]
    clients: usize,

    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    secs: u64,

    /// Payload bytes per message (at least 20, for the header).
    #[arg(long, default_value_t = 128)]
    size: usize,

    /// Messages a member may have outstanding before publishers wait.
    #[arg(long, default_value_t = 64)]
    window: u64,

    /// Run the embedded broker over the in-process transport instead of TCP.
    #[arg(long, conflicts_with = "addr")]
    memory: bool,

    /// Connections opened at once while the clients connect.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,

    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
}

/// Where the clients connect.
#[derive(Clone)]
enum Target {
    Tcp(String),
    Memory(MemoryConnector),
}

/// One member's progress, on its own cache line: its publisher and its receiver each
/// write one counter, the governor reads both.
#[repr(align(64))]
#[derive(Default)]
struct Member {
    /// Messages this client has published.
    sent: AtomicU64,
    /// How far this client has got through the others' messages: the sum over
    /// publishers of the last sequence number seen. A lost message is passed over, so
    /// it does not hold publishers back forever; the check counts it.
    seen: AtomicU64,
    /// Set when the client's connection ended early; the governor stops waiting for it.
    dead: AtomicBool,
}

/// What the tasks of one run share.
struct Run {
    epoch: Instant,
    clients: usize,
    window: u64,
    session: Arc<str>,
    members: Box<[Member]>,
    /// One permit per message that may be published now; fair, so publishers take
    /// turns in the order they asked.
    permits: Semaphore,
    /// Receivers signal progress; the governor wakes.
    progress: Notify,
    /// Set once the run is over and closing a connection is expected.
    finishing: AtomicBool,
    /// Cancelled when the clients took too long to close: receivers stop waiting.
    abandon: CancellationToken,
    /// Signalled when a failure is recorded, to end publishing early.
    failed: Notify,
    failures: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    count: usize,
    kept: Vec<String>,
}

impl Run {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn fail(&self, why: String) {
        let mut failures = self.failures.lock();
        failures.count += 1;
        if failures.kept.len() < FAILURES_KEPT {
            failures.kept.push(why);
        }
        drop(failures);
        self.failed.notify_one();
    }

    fn totals(&self) -> (u64, u64) {
        self.members.iter().fold((0, 0), |(sent, seen), m| {
            (
                sent + m.sent.load(Ordering::Relaxed),
                seen + m.seen.load(Ordering::Relaxed),
            )
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.clients < 2 {
        eprintln!("load: --clients must be at least 2: a client never receives its own messages");
        return ExitCode::FAILURE;
    }
    if args.window == 0 {
        eprintln!("load: --window must be at least 1");
        return ExitCode::FAILURE;
    }
    if u32::try_from(args.clients).is_err() {
        eprintln!("load: --clients must fit in 32 bits");
        return ExitCode::FAILURE;
    }
    let size = args.size.max(HEADER);
    if size != args.size {
        eprintln!("load: payloads carry a {HEADER}-byte header; using --size {size}");
    }
    let n = args.clients;

    // The broker: someone else's, or one in this process.
    let (target, broker) = match &args.addr {
        Some(addr) => (Target::Tcp(addr.clone()), None),
        None => match embedded(args.memory).await {
            Ok(embedded) => embedded,
            Err(e) => {
                eprintln!("load: cannot start the embedded broker: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let place = match &target {
        Target::Tcp(addr) if broker.is_some() => format!("an embedded broker on tcp {addr}"),
        Target::Tcp(addr) => format!("the broker at {addr}"),
        Target::Memory(_) => "an embedded broker in memory".to_string(),
    };

    // Names carry the process id, so that runs sharing a broker do not mix.
    let tag = format!("load-{}", std::process::id());
    eprintln!("load: connecting {n} clients to {place}");
    let clients = match connect_all(&target, &tag, n, args.connect_concurrency).await {
        Ok(clients) => clients,
        Err(errors) => {
            for e in &errors {
                eprintln!("load: {e}");
            }
            eprintln!("load: {} of {n} clients failed to connect", errors.len());
            print_summary(n, &Summary::default());
            return ExitCode::FAILURE;
        }
    };

    let run = Arc::new(Run {
        epoch: Instant::now(),
        clients: n,
        window: args.window,
        session: Arc::from(tag.as_str()),
        members: (0..n).map(|_| Member::default()).collect(),
        permits: Semaphore::new(args.window as usize),
        progress: Notify::new(),
        finishing: AtomicBool::new(false),
        abandon: CancellationToken::new(),
        failed: Notify::new(),
        failures: Mutex::new(Failures::default()),
    });

    // Every client receives on one task and publishes on another.
    eprintln!(
        "load: publishing for {}s, {size}-byte payloads, window {}",
        args.secs, args.window
    );
    let governor = tokio::spawn(govern(run.clone()));
    let started_us = run.now_us();
    let mut handles = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    let mut publishers = Vec::with_capacity(n);
    for (index, client) in clients.into_iter().enumerate() {
        let (handle, events) = client.split();
        receivers.push(tokio::spawn(receive(run.clone(), index, events)));
        publishers.push(tokio::spawn(publish(
            run.clone(),
            index,
            handle.clone(),
            size,
        )));
        handles.push(handle);
    }

    // Publish for the time asked, unless something fails first.
    let stop_at = tokio::time::Instant::now() + Duration::from_secs(args.secs);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(stop_at) => break,
            _ = run.failed.notified() => {
                eprintln!("load: a client failed; stopping early");
                break;
            }
            _ = ticks.tick() => {
                let (sent, seen) = run.totals();
                eprintln!("load: {:.0}s sent={sent} delivered={seen}", run.epoch.elapsed().as_secs_f64());
            }
        }
    }

    // Stop publishing. Closing the semaphore wakes every publisher waiting for a turn.
    run.permits.close();
    let mut sent_by = vec![0u64; n];
    for (index, publisher) in publishers.into_iter().enumerate() {
        match publisher.await {
            Ok(sent) => sent_by[index] = sent,
            Err(e) => run.fail(format!("publisher {index} panicked: {e}")),
        }
    }
    let sent: u64 = sent_by.iter().sum();
    let expected = sent * (n as u64 - 1);

    // Wait for what is on its way. A disconnected member will never get its share, so
    // after a failure the wait ends as soon as deliveries stop coming.
    let drain_until = Instant::now() + Duration::from_secs(args.drain_secs);
    let mut last_progress = (0, Instant::now());
    loop {
        let (_, seen) = run.totals();
        if seen >= expected {
            break;
        }
        let now = Instant::now();
        if seen != last_progress.0 {
            last_progress = (seen, now);
        }
        let stalled = now.duration_since(last_progress.1) >= STALL;
        if now >= drain_until || (stalled && run.failures.lock().count > 0) {
            run.fail(format!(
                "{} deliveries still outstanding when the wait ended",
                expected - seen,
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    governor.abort();

    // Close every client; each receiver returns its tally once its connection ends.
    run.finishing.store(true, Ordering::Release);
    futures::future::join_all(handles.iter().map(|h| h.close())).await;
    let abandon = run.abandon.clone();
    let give_up = tokio::spawn(async move {
        tokio::time::sleep(CLOSE_TIMEOUT).await;
        abandon.cancel();
    });
    let mut summary = Summary {
        sent,
        expected,
        ..Summary::default()
    };
    let mut histogram = Histogram::new();
    let mut last_delivery_us = started_us;
    for (index, receiver) in receivers.into_iter().enumerate() {
        let tally = match receiver.await {
            Ok(tally) => tally,
            Err(e) => {
                run.fail(format!("receiver {index} panicked: {e}"));
                continue;
            }
        };
        summary.delivered += tally.delivered;
        summary.dup += tally.dup;
        summary.reordered += tally.reordered;
        summary.lost += tally.lost(index, &sent_by);
        if tally.bad > 0 {
            run.fail(format!(
                "client {index} received {} messages that were not the load's (or its own)",
                tally.bad
            ));
        }
        histogram.merge(&tally.latency);
        last_delivery_us = last_delivery_us.max(tally.last_delivery_us);
    }
    give_up.abort();
    drop(handles);

    // The rate runs from the first publication to the last delivery.
    let elapsed_us = last_delivery_us.saturating_sub(started_us).max(1);
    summary.deliveries_per_sec = summary.delivered * 1_000_000 / elapsed_us;
    summary.p50_us = histogram.quantile(0.50);
    summary.p99_us = histogram.quantile(0.99);

    if let Some(broker) = broker {
        eprintln!("load: broker {}", broker.stats());
        if tokio::time::timeout(CLOSE_TIMEOUT, broker.shutdown())
            .await
            .is_err()
        {
            eprintln!("load: the embedded broker did not shut down within {CLOSE_TIMEOUT:?}");
        }
    }

    let failures = std::mem::take(&mut *run.failures.lock());
    for why in &failures.kept {
        eprintln!("load: {why}");
    }
    if failures.count > failures.kept.len() {
        eprintln!(
            "load: ... and {} more failures",
            failures.count - failures.kept.len()
        );
    }
    print_summary(n, &summary);

    let clean = summary.lost == 0 && summary.dup == 0 && summary.reordered == 0;
    if clean && failures.count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Starts a broker in this process; returns where to reach it.
async fn embedded(memory: bool) -> std::io::Result<(Target, Option<Broker>)> {
    let broker = Broker::builder().build();
    if memory {
        let (transport, connector) = MemoryTransport::new();
        tokio::spawn(broker.serve(transport));
        return Ok((Target::Memory(connector), Some(broker)));
    }
    let transport = TcpTransport::bind("127.0.0.1:0").await?;
    let addr = transport.local_addr()?;
    tokio::spawn(broker.serve(transport));
    Ok((Target::Tcp(addr.to_string()), Some(broker)))
}

/// Connects and subscribes every client, a bounded number at a time so that the
/// listener's backlog never overflows. Returns the clients in index order, or why
/// some failed.
async fn connect_all(
    target: &Target,
    tag: &str,
    n: usize,
    concurrency: usize,
) -> Result<Vec<Client>, Vec<String>> {
    let results: Vec<(usize, Result<Client, String>)> = futures::stream::iter(0..n)
        .map(|index| async move {
            let user = format!("{tag}-{index}");
            let attempt = async {
                let builder = Client::builder(user.as_str());
                let client = match target {
                    Target::Tcp(addr) => builder.connect_tcp(addr.as_str()).await,
                    Target::Memory(connector) => builder.connect_memory(connector).await,
                }
                .map_err(|e| format!("client {index} ({user}) cannot connect: {e}"))?;
                client
                    .subscribe(tag)
                    .await
                    .map_err(|e| format!("client {index} ({user}) cannot subscribe: {e}"))?;
                Ok(client)
            };
            let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "client {index} ({user}) did not connect within {CONNECT_TIMEOUT:?}"
                )),
            };
            (index, result)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;

    let mut clients: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    let mut errors = Vec::new();
    for (index, result) in results {
        match result {
            Ok(client) => clients[index] = Some(client),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(clients.into_iter().flatten().collect())
    } else {
        Err(errors)
    }
}

/// Turns the members' progress into permits: at most `window` messages are ever
/// published ahead of the member that is furthest behind.
async fn govern(run: Arc<Run>) {
    let mut issued = run.window;
    loop {
        run.progress.notified().await;

        // A member is done with every message it published itself and every one it
        // has seen or passed over; the slowest member bounds what may be in flight. The counters
        // only grow, so reading them one by one can only underestimate.
        let slowest = run
            .members
            .iter()
            .filter(|m| !m.dead.load(Ordering::Acquire))
            .map(|m| m.sent.load(Ordering::Acquire) + m.seen.load(Ordering::Acquire))
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

/// Publishes one client's messages, each after a permit; returns how many it sent.
async fn publish(run: Arc<Run>, index: usize, handle: ClientHandle, size: usize) -> u64 {
    let member = &run.members[index];
    let mut seq = 0u64;
    let mut payload = vec![0u8; size];
    payload[..4].copy_from_slice(&(index as u32).to_le_bytes());

    // The semaphore closes when publishing ends.
    while let Ok(permit) = run.permits.acquire().await {
        permit.forget();
        seq += 1;
        member.sent.store(seq, Ordering::Release);

        payload[4..12].copy_from_slice(&seq.to_le_bytes());
        payload[12..20].copy_from_slice(&run.now_us().to_le_bytes());
        if let Err(e) = handle
            .publish(&run.session, Bytes::copy_from_slice(&payload))
            .await
        {
            if !run.finishing.load(Ordering::Acquire) {
                run.fail(format!("client {index} cannot publish: {e}"));
            }
            seq -= 1;
            member.sent.store(seq, Ordering::Release);
            break;
        }
    }
    seq
}

/// What one client saw.
struct Tally {
    /// Deliveries of the load's messages, duplicates included.
    delivered: u64,
    dup: u64,
    reordered: u64,
    /// Messages that were not the load's, or the client's own.
    bad: u64,
    /// The last sequence number seen from each publisher; 0 before the first.
    last: Vec<u64>,
    /// Sequence numbers skipped and not yet seen: (publisher, first, last).
    gaps: Vec<(u32, u64, u64)>,
    latency: Histogram,
    last_delivery_us: u64,
}

impl Tally {
    fn new(clients: usize) -> Tally {
        Tally {
            delivered: 0,
            dup: 0,
            reordered: 0,
            bad: 0,
            last: vec![0; clients],
            gaps: Vec::new(),
            latency: Histogram::new(),
            last_delivery_us: 0,
        }
    }

    /// Checks one delivery. Returns how far it moved this client along its
    /// publisher's sequence: 1 for the next in line, more past a gap, 0 for a duplicate
    /// or a late one.
    fn check(&mut self, run: &Run, me: usize, payload: &[u8]) -> u64 {
        let Some(header) = payload.get(..HEADER) else {
            self.bad += 1;
            return 0;
        };
        let publisher = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(header[4..12].try_into().unwrap_or_default());
        let sent_us = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
        let p = publisher as usize;
        if p >= run.clients || p == me || seq == 0 {
            self.bad += 1;
            return 0;
        }

        let now = run.now_us();
        self.latency.record(now.saturating_sub(sent_us));
        self.last_delivery_us = now;
        self.delivered += 1;

        // The common case first: the next in line.
        let last = &mut self.last[p];
        let before = *last;
        if seq == before + 1 {
            *last = seq;
            return 1;
        }
        if seq > before + 1 {
            self.gaps.push((publisher, before + 1, seq - 1));
            *last = seq;
            return seq - before;
        }
        if self.fill_gap(publisher, seq) {
            self.reordered += 1;
        } else {
            self.dup += 1;
        }
        0
    }

    /// Removes `seq` from the open gaps of `publisher`; false when it was not missing.
    fn fill_gap(&mut self, publisher: u32, seq: u64) -> bool {
        let Some(i) = self
            .gaps
            .iter()
            .position(|&(p, first, last)| p == publisher && first <= seq && seq <= last)
        else {
            return false;
        };
        let (p, first, last) = self.gaps[i];
        match (seq == first, seq == last) {
            (true, true) => {
                self.gaps.swap_remove(i);
            }
            (true, false) => self.gaps[i].1 += 1,
            (false, true) => self.gaps[i].2 -= 1,
            (false, false) => {
                self.gaps[i].2 = seq - 1;
                self.gaps.push((p, seq + 1, last));
            }
        }
        true
    }

    /// Messages this client should have received and did not: the open gaps and
    /// whatever each publisher sent past the last one seen.
    fn lost(&self, me: usize, sent_by: &[u64]) -> u64 {
        let gaps: u64 = self
            .gaps
            .iter()
            .map(|&(_, first, last)| last - first + 1)
            .sum();
        let tails: u64 = sent_by
            .iter()
            .zip(&self.last)
            .enumerate()
            .filter(|&(p, _)| p != me)
            .map(|(_, (&sent, &last))| sent.saturating_sub(last))
            .sum();
        gaps + tails
    }
}

/// Receives one client's events and checks each delivery. Progress is published to
/// the shared counter in small batches, and whenever the queue runs dry, so the
/// governor never waits on a count that is sitting in a local variable.
async fn receive(run: Arc<Run>, me: usize, mut events: Events) -> Tally {
    let member = &run.members[me];
    let batch = (run.window / 4).max(1);
    let mut tally = Tally::new(run.clients);
    let mut seen = 0u64;
    let mut unreported = 0u64;

    loop {
        let event = match events.next().now_or_never() {
            Some(event) => event,
            None => {
                if unreported > 0 {
                    member.seen.store(seen, Ordering::Release);
                    unreported = 0;
                    run.progress.notify_one();
                }
                tokio::select! {
                    event = events.next() => event,
                    _ = run.abandon.cancelled() => {
                        run.fail(format!("client {me}: the connection did not close within {CLOSE_TIMEOUT:?}"));
                        break;
                    }
                }
            }
        };

        match event {
            Some(Event::Message(message)) => {
                let ours =
                    message.kind == MessageKind::Session && message.target.id() == &*run.session;
                if !ours {
                    tally.bad += 1;
                    continue;
                }
                let advanced = tally.check(&run, me, &message.payload);
                if advanced == 0 {
                    continue;
                }
                seen += advanced;
                unreported += 1;
                if unreported >= batch {
                    member.seen.store(seen, Ordering::Release);
                    unreported = 0;
                    run.progress.notify_one();
                }
            }
            Some(Event::Notice(notice)) => {
                run.fail(format!("client {me} got a notice: {notice:?}"));
            }
            Some(Event::Closed { code, reason }) => {
                if !run.finishing.load(Ordering::Acquire) {
                    run.fail(format!("client {me} was disconnected: {reason} ({code:?})"));
                }
                break;
            }
            None => break,
        }
    }

    // A member that is gone no longer holds the others back.
    member.seen.store(seen, Ordering::Release);
    if !run.finishing.load(Ordering::Acquire) {
        member.dead.store(true, Ordering::Release);
    }
    run.progress.notify_one();
    tally
}

#[derive(Default)]
struct Summary {
    sent: u64,
    delivered: u64,
    expected: u64,
    lost: u64,
    dup: u64,
    reordered: u64,
    deliveries_per_sec: u64,
    p50_us: u64,
    p99_us: u64,
}

fn print_summary(clients: usize, s: &Summary) {
    println!(
        "load: clients={clients} sent={} delivered={} expected={} lost={} dup={} reordered={} \
         deliveries_per_sec={} p50_us={} p99_us={}",
        s.sent,
        s.delivered,
        s.expected,
        s.lost,
        s.dup,
        s.reordered,
        s.deliveries_per_sec,
        s.p50_us,
        s.p99_us
    );
}

/// A latency histogram in microseconds: exact below 128, then 64 buckets per power
/// of two (under 1.6% error), up to about 19 hours.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    const EXACT: u64 = 128;
    const SUB_BITS: u32 = 6;
    const MAX_EXP: u32 = 35;
    const BUCKETS: usize =
        Self::EXACT as usize + (((Self::MAX_EXP - 6) as usize) << Self::SUB_BITS);

    fn new() -> Histogram {
        Histogram {
            counts: vec![0; Self::BUCKETS],
            total: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < Self::EXACT {
            return us as usize;
        }
        let us = us.min((2 << Self::MAX_EXP) - 1);
        let exp = 63 - us.leading_zeros();
        let sub = (us >> (exp - Self::SUB_BITS)) & ((1 << Self::SUB_BITS) - 1);
        Self::EXACT as usize + (((exp - 7) as usize) << Self::SUB_BITS) + sub as usize
    }

    /// The middle of a bucket.
    fn value(index: usize) -> u64 {
        if index < Self::EXACT as usize {
            return index as u64;
        }
        let k = (index - Self::EXACT as usize) as u64;
        let exp = 7 + (k >> Self::SUB_BITS);
        let sub = k & ((1 << Self::SUB_BITS) - 1);
        let width = 1u64 << (exp - u64::from(Self::SUB_BITS));
        (((1 << Self::SUB_BITS) + sub) << (exp - u64::from(Self::SUB_BITS))) + width / 2
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
