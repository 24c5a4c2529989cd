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
//! sent, and every client checks every delivery: nothing lost, nothing twice, each
//! publisher's order kept. Publishers are held to a window: no member may have more
//! than `--window` messages (default 64) published but not yet received, so the run
//! measures the broker rather than its slow-consumer policy. The load, the checks and
//! the window are `examples/common/`, which the `cluster` example shares.
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
//! when a client failed to connect, was disconnected or received something it should
//! not have, or when the embedded broker did not shut down; stderr says why.

mod common;

use clap::Parser;
use common::{LoadArgs, CLOSE_TIMEOUT};
use std::process::ExitCode;
use switchboard::{Broker, MemoryConnector, MemoryTransport, TcpTransport};

const NAME: &str = "load";

#[derive(Parser)]
#[command(about = "Publish to one session from N clients and check every delivery")]
struct Args {
    /// A running broker's address; without it a broker runs in this process.
    #[arg(long)]
    addr: Option<String>,

    /// Run the embedded broker over the in-process transport instead of TCP.
    #[arg(long, conflicts_with = "addr")]
    memory: bool,

    #[command(flatten)]
    load: LoadArgs,
}

/// Where the clients connect.
#[derive(Clone)]
enum Target {
    Tcp(String),
    Memory(MemoryConnector),
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Err(e) = args.load.check(NAME) {
        eprintln!("{NAME}: {e}");
        return ExitCode::FAILURE;
    }
    let n = args.load.clients;

    // The broker: someone else's, or one in this process.
    let (target, broker) = match &args.addr {
        Some(addr) => (Target::Tcp(addr.clone()), None),
        None => match embedded(args.memory).await {
            Ok(embedded) => embedded,
            Err(e) => {
                return common::abort(NAME, n, &[format!("cannot start the embedded broker: {e}")])
            }
        },
    };
    let place = match &target {
        Target::Tcp(addr) if broker.is_some() => format!("an embedded broker on tcp {addr}"),
        Target::Tcp(addr) => format!("the broker at {addr}"),
        Target::Memory(_) => "an embedded broker in memory".to_string(),
    };

    // Names carry the process id, so that runs sharing a broker do not mix.
    let session = format!("load-{}", std::process::id());
    eprintln!("{NAME}: connecting {n} clients to {place}");
    let connected = common::connect_all(&args.load, &session, |_, builder| {
        let target = target.clone();
        async move {
            match &target {
                Target::Tcp(addr) => builder.connect_tcp(addr.as_str()).await,
                Target::Memory(connector) => builder.connect_memory(connector).await,
            }
        }
    })
    .await;
    let clients = match connected {
        Ok(clients) => clients,
        Err(mut errors) => {
            errors.push(format!("{} of {n} clients failed to connect", errors.len()));
            return common::abort(NAME, n, &errors);
        }
    };

    let mut report = common::run(NAME, &args.load, &session, clients).await;

    if let Some(broker) = broker {
        eprintln!("{NAME}: broker {}", broker.stats());
        if tokio::time::timeout(CLOSE_TIMEOUT, broker.shutdown())
            .await
            .is_err()
        {
            report.fail(format!(
                "the embedded broker did not shut down within {CLOSE_TIMEOUT:?}"
            ));
        }
    }
    report.finish()
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
