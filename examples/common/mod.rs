//! The checked load that the `load` and `cluster` examples share.
//!
//! Each example starts its broker (or brokers) its own way and connects its clients
//! through [`connect_all`], every one of them joined to one session; [`run`] then
//! makes every client publish to that session for the seconds asked and checks every
//! delivery.
//!
//! Each payload carries its publisher's index, a sequence number and the time it was
//! sent ([`HEADER`]). Every client checks every delivery: per publisher the sequence
//! must go up by exactly one. A number at or below the last one seen is a duplicate
//! when it was seen before and a reordering when it fills an earlier gap; gaps still
//! open at the end are lost messages.
//!
//! Publishers are held to a window: no member may have more than `--window` messages
//! published but not yet received. Without it publishers would run ahead of the
//! slowest member until its outbox overflowed and the broker disconnected it, which
//! measures the slow-consumer policy rather than the broker. A governor task turns the
//! members' progress into permits of a fair semaphore, so publishers take turns.
//!
//! The [`Report`] prints one summary line,
//!
//! ```text
//! NAME: clients=N sent=.. delivered=.. expected=.. lost=.. dup=.. reordered=.. deliveries_per_sec=.. p50_us=.. p99_us=..
//! ```
//!
//! where expected is what every other member should have received, the rate runs from
//! the first publication to the last delivery, and the latencies are from publish to
//! delivery.

mod histogram;
mod tally;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use histogram::Histogram;
use parking_lot::Mutex;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::{Client, ClientBuilder, ClientError, ClientHandle, Event, Events, MessageKind};
use tally::Tally;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Publisher index (u32), sequence number (u64), send time (u64 µs since the run's
/// epoch).
pub const HEADER: usize = 4 + 8 + 8;

/// Longest a single connect and subscribe may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the clients may take to close once the run is over, and the longest an
/// example should wait for its brokers to shut down.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failure, how long deliveries may pause before the run stops waiting.
const STALL: Duration = Duration::from_secs(1);

/// Failures kept for the report; the rest are only counted.
const FAILURES_KEPT: usize = 20;

/// The flags of the load itself, the same in every example that runs one.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// Clients, each both a publisher and a member of the session.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,

    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,

    /// Payload bytes per message (at least 20, for the header).
    #[arg(long, default_value_t = 128)]
    pub size: usize,

    /// Messages a member may have outstanding before publishers wait.
    #[arg(long, default_value_t = 64)]
    pub window: u64,

    /// Connections opened at once while the clients connect.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,

    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
}

impl LoadArgs {
    /// Says what is wrong with the flags, if anything. A payload too small for the
    /// header is grown to fit, with a note on stderr.
    pub fn check(&mut self, name: &str) -> Result<(), String> {
        if self.clients < 2 {
            return Err(
                "--clients must be at least 2: a client never receives its own messages".into(),
            );
        }
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if u32::try_from(self.clients).is_err() {
            return Err("--clients must fit in 32 bits".into());
        }
        if self.size < HEADER {
            self.size = HEADER;
            eprintln!("{name}: payloads carry a {HEADER}-byte header; using --size {HEADER}");
        }
        Ok(())
    }
}

/// Connects every client as user `{session}-{index}` through `connect`, and
/// subscribes it to `session`; a bounded number at a time, so that no listener's
/// backlog overflows. Returns the clients in index order, or why some failed.
pub async fn connect_all<F, Fut>(
    args: &LoadArgs,
    session: &str,
    connect: F,
) -> Result<Vec<Client>, Vec<String>>
where
    F: Fn(usize, ClientBuilder) -> Fut,
    Fut: Future<Output = Result<Client, ClientError>>,
{
    let n = args.clients;
    let connect = &connect;
    let results: Vec<(usize, Result<Client, String>)> = futures::stream::iter(0..n)
        .map(|index| async move {
            let user = format!("{session}-{index}");
            let attempt = async {
                let client = connect(index, Client::builder(user.as_str()))
                    .await
                    .map_err(|e| format!("client {index} ({user}) cannot connect: {e}"))?;
                client
                    .subscribe(session)
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
        .buffer_unordered(args.connect_concurrency.max(1))
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

/// Ends a run that could not start: prints why, then a summary of nothing, and
/// returns the failing exit code.
pub fn abort(name: &str, clients: usize, why: &[String]) -> ExitCode {
    for line in why {
        eprintln!("{name}: {line}");
    }
    print_summary(name, clients, &Summary::default());
    ExitCode::FAILURE
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

impl Failures {
    fn add(&mut self, why: String) {
        self.count += 1;
        if self.kept.len() < FAILURES_KEPT {
            self.kept.push(why);
        }
    }
}

impl Run {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn fail(&self, why: String) {
        self.failures.lock().add(why);
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

/// Makes every client publish to `session` for `args.secs` seconds, waits for what is
/// on its way, closes the clients and tallies what each saw. `name` starts every line
/// printed.
pub async fn run(
    name: &'static str,
    args: &LoadArgs,
    session: &str,
    clients: Vec<Client>,
) -> Report {
    let n = clients.len();
    let size = args.size.max(HEADER);
    let run = Arc::new(Run {
        epoch: Instant::now(),
        clients: n,
        window: args.window.max(1),
        session: Arc::from(session),
        members: (0..n).map(|_| Member::default()).collect(),
        permits: Semaphore::new(args.window.max(1) as usize),
        progress: Notify::new(),
        finishing: AtomicBool::new(false),
        abandon: CancellationToken::new(),
        failed: Notify::new(),
        failures: Mutex::new(Failures::default()),
    });

    // Every client receives on one task and publishes on another.
    eprintln!(
        "{name}: publishing for {}s, {size}-byte payloads, window {}",
        args.secs, run.window
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
                eprintln!("{name}: a client failed; stopping early");
                break;
            }
            _ = ticks.tick() => {
                let (sent, seen) = run.totals();
                eprintln!("{name}: {:.0}s sent={sent} delivered={seen}", run.epoch.elapsed().as_secs_f64());
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
    let expected = sent * (n as u64).saturating_sub(1);

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

    let failures = std::mem::take(&mut *run.failures.lock());
    Report {
        name,
        clients: n,
        summary,
        failures,
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

fn print_summary(name: &str, clients: usize, s: &Summary) {
    println!(
        "{name}: clients={clients} sent={} delivered={} expected={} lost={} dup={} reordered={} \
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

/// The outcome of a run: the summary and the failures seen.
pub struct Report {
    name: &'static str,
    clients: usize,
    summary: Summary,
    failures: Failures,
}

impl Report {
    /// Records a failure the example found itself, after the run.
    pub fn fail(&mut self, why: String) {
        self.failures.add(why);
    }

    /// Prints the failures, then the summary line, and returns the exit code: failing
    /// when anything was lost, duplicated or reordered, or any failure was recorded
    /// (a client failed to connect, was disconnected or received something it should
    /// not have).
    pub fn finish(self) -> ExitCode {
        let Report {
            name,
            clients,
            summary,
            failures,
        } = self;
        for why in &failures.kept {
            eprintln!("{name}: {why}");
        }
        if failures.count > failures.kept.len() {
            eprintln!(
                "{name}: ... and {} more failures",
                failures.count - failures.kept.len()
            );
        }
        print_summary(name, clients, &summary);

        let clean = summary.lost == 0 && summary.dup == 0 && summary.reordered == 0;
        if clean && failures.count == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
