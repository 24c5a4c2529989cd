//! A runnable push server: a broker on a TCP listener, with logs, periodic stats and a
//! graceful shutdown.
//!
//! ```text
//! cargo run --release --example server [-- --listen 127.0.0.1:7878]
//! ```
//!
//! At startup it prints one line to stdout, `switchboard: listening tcp=ADDR`, with the
//! address actually bound, so `--listen 127.0.0.1:0` suits tests and scripts. Every
//! ten seconds it prints the broker's counters on one line. Logs go to stderr; the
//! default filter shows connects and disconnects but nothing per message, and
//! `RUST_LOG` replaces it. Ctrl-C or SIGTERM shuts the broker down: what is queued is
//! delivered, every connection is closed with a reason, and the process exits 0.

use clap::Parser;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::{Broker, TcpTransport};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// How often the counters are printed.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// The log filter when `RUST_LOG` is not set: the library logs connects and
/// disconnects at debug and nothing per message above trace.
const DEFAULT_FILTER: &str = "info,switchboard=debug";

#[derive(Parser)]
#[command(about = "A switchboard push server over TCP")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: String,

    /// Live connections at most; the broker refuses the next handshake.
    #[arg(long)]
    max_connections: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();

    // Signal handlers go in first. A script's background job starts with SIGINT
    // ignored, so an interrupt that comes before the handler is lost; a supervisor may
    // signal as soon as it reads the address line. A stream, unlike a fresh `ctrl_c()`
    // future on each turn of the loop, also keeps a signal that arrives between turns.
    let signals = signal(SignalKind::interrupt()).and_then(|interrupt| {
        signal(SignalKind::terminate()).map(|terminate| (interrupt, terminate))
    });
    let (mut interrupt, mut terminate) = match signals {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("switchboard: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut builder = Broker::builder();
    if let Some(n) = args.max_connections {
        builder = builder.max_connections(n);
    }
    let broker = builder.build();

    let transport = match TcpTransport::bind(&args.listen).await {
        Ok(transport) => transport,
        Err(e) => {
            eprintln!("switchboard: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr: SocketAddr = match transport.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("switchboard: cannot read the bound address: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(broker.serve(transport));

    // Scripts wait for this line, so it must not sit in a buffer.
    println!("switchboard: listening tcp={addr}");
    let _ = std::io::stdout().flush();
    info!(%addr, "listening");

    // Serve until a signal, printing the counters now and then.
    let mut stats =
        tokio::time::interval_at(tokio::time::Instant::now() + STATS_EVERY, STATS_EVERY);
    let signal = loop {
        tokio::select! {
            _ = stats.tick() => {
                println!("switchboard: {}", broker.stats());
                let _ = std::io::stdout().flush();
            }
            _ = interrupt.recv() => break "interrupt",
            _ = terminate.recv() => break "terminate",
        }
    };

    // Shutdown may wait on slow peers for up to the write timeout; a second signal
    // gives up on them.
    info!(signal, "signal received");
    tokio::select! {
        _ = broker.shutdown() => {}
        _ = interrupt.recv() => {
            warn!("second interrupt; exiting without waiting for connections to close");
            return ExitCode::FAILURE;
        }
        _ = terminate.recv() => {
            warn!("second terminate; exiting without waiting for connections to close");
            return ExitCode::FAILURE;
        }
    }
    println!("switchboard: stopped; {}", broker.stats());
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}
