//! The heartbeat: one task per broker that looks at every connection once per tick.
//!
//! At each tick it closes a connection that has sent nothing for the idle timeout, has
//! the writer of one that was written nothing for a heartbeat interval send a `PING`,
//! and has a quiet connection give back the room its outbox and writer keep for the
//! next batch. One timer for the whole broker costs less than timers in every
//! connection: an idle connection holds none, and the reader and writer of a busy one
//! only set a flag.
//!
//! A tick is half the heartbeat interval (itself at most half the idle timeout). A
//! connection's activity is noticed at the first tick after it, so a silent peer is
//! closed at least `idle_timeout` after its last frame and at most one heartbeat
//! interval later, and a `PING` goes out between one and one and a half heartbeat
//! intervals after the last write.

use crate::broker::Inner;
use crate::connection::ConnectionState;
use crate::frame::ErrorCode;
use crate::session;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use tokio::time::{self, Instant};
use tracing::debug;

/// What the heartbeat knows of one connection's traffic.
pub(crate) struct Pulse {
    /// Set by the reader at each frame, cleared by the heartbeat at each tick.
    heard: AtomicBool,
    /// The tick that last found `heard` set, in nanoseconds since the broker's epoch.
    last_heard: AtomicU64,
    /// The tick that last found the writer had taken frames, or asked for a `PING`,
    /// likewise.
    last_wrote: AtomicU64,
}

impl Pulse {
    /// A connection heard from and written to just now.
    pub(crate) fn new(inner: &Inner) -> Pulse {
        let now = since(inner, Instant::now());
        Pulse {
            heard: AtomicBool::new(false),
            last_heard: AtomicU64::new(now),
            last_wrote: AtomicU64::new(now),
        }
    }

    /// A connection the idle timeout never closes: one in the host's own process
    /// ([`crate::local`]), whose silence says nothing about its health. It is never
    /// heard, so its last hearing stays in the future.
    pub(crate) fn never_idle(inner: &Inner) -> Pulse {
        let pulse = Pulse::new(inner);
        pulse.last_heard.store(u64::MAX, Relaxed);
        pulse
    }

    /// The reader received a frame.
    pub(crate) fn heard(&self) {
        // Read first: a flag already set is left alone, so a busy reader does not
        // write to a line the heartbeat reads.
        if !self.heard.load(Relaxed) {
            self.heard.store(true, Relaxed);
        }
    }
}

/// The tick of a broker with this configuration.
pub(crate) fn tick(config: &crate::broker::Config) -> time::Duration {
    config.heartbeat_interval.min(config.idle_timeout) / 2
}

/// Ticks until the broker is gone.
pub(crate) async fn run(inner: Weak<Inner>, tick: time::Duration) {
    let mut ticks = time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut connections = Vec::new();

    loop {
        let now = ticks.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = since(&inner, now);

        // One shard at a time: its lock is held only to copy the list out, never while
        // a connection is acted on, and other tasks get a turn between shards.
        for shard in 0..session::SHARDS {
            inner.registry.connections_in(shard, &mut connections);
            for connection in connections.drain(..) {
                check(&inner, &connection, now);
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Looks at one connection at tick time `now`.
fn check(inner: &Inner, connection: &Arc<ConnectionState>, now: u64) {
    let config = &inner.config;
    let pulse = &connection.pulse;

    // The tick that sees a frame stands for the time it was heard, up to one tick late.
    if pulse.heard.swap(false, Relaxed) {
        pulse.last_heard.store(now, Relaxed);
    } else if elapsed(now, &pulse.last_heard) >= config.idle_timeout {
        debug!(connection = %connection.id, "idle timeout");
        let detail = format!("nothing received for {:?}", config.idle_timeout);
        connection.end(ErrorCode::IdleTimeout, detail);
        return;
    }

    if connection.outbox.took_since() {
        pulse.last_wrote.store(now, Relaxed);
        return;
    }
    // Quiet for a whole tick: the room kept for the next batch goes back.
    connection.outbox.release();
    // A PING only after a quiet interval: traffic is proof of life.
    if elapsed(now, &pulse.last_wrote) >= config.heartbeat_interval {
        pulse.last_wrote.store(now, Relaxed);
        connection.outbox.ping();
    }
}

/// Nanoseconds from the broker's epoch to `at`.
fn since(inner: &Inner, at: Instant) -> u64 {
    at.saturating_duration_since(inner.epoch).as_nanos() as u64
}

/// Time from a stored tick to `now`.
fn elapsed(now: u64, then: &AtomicU64) -> time::Duration {
    time::Duration::from_nanos(now.saturating_sub(then.load(Relaxed)))
}
