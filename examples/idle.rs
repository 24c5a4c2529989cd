//! Broker memory per idle connection.
//!
//! ```text
//! cargo build --release --example server
//! cargo run --release --example idle -- --conns N [--peers]
//! ```
//!
//! Starts the `server` example (found beside this program) as its own process, reads
//! its resident memory (`VmRSS` in `/proc/PID/status`), opens N TCP connections that
//! each complete the handshake and then say nothing, reads the resident memory again
//! and prints
//!
//! ```text
//! idle: conns=N broker_rss_per_conn_bytes=..
//! ```
//!
//! The connections are raw sockets that speak just enough of the protocol for the
//! handshake, so this process stays small and its own memory is not in the number.
//! Every process here may hold at most 20,000 file descriptors, so N stays at or below
//! about 19,000.
//!
//! The broker closes connections that send nothing for its idle timeout (60 s by
//! default), so the second reading is taken as soon as the last handshake is done.
//!
//! With `--peers`, the same is done against the NATS, Redis and MQTT servers already
//! running on this machine (found with `pgrep`), each connection completing that
//! protocol's handshake, and a line `idle: system=NAME conns=N rss_per_conn_bytes=..`
//! is printed for each (`skipped reason=..` when one cannot be reached or found).
//! A server that refuses connections past its own limit (Redis's `maxclients`, say) is
//! measured over the connections it kept, and the line says how many that was.

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use std::process::{Command, ExitCode};
use std::time::Duration;
use switchboard::frame::{kind, Frame, Text, LENGTH_PREFIX, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `server` example as a child process.
#[path = "common/server.rs"]
mod server;

use server::start_server;

/// Handshakes in flight at once; more would overflow a default listen backlog.
const CONCURRENCY: usize = 128;

/// Longest one connection and handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Time given to the server to settle before each reading of its memory.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(about = "Measure a broker's resident memory per idle TCP connection")]
struct Args {
    /// Idle connections to open (at most about 19,000 here).
    #[arg(long, default_value_t = 10_000)]
    conns: usize,

    /// Also measure the NATS, Redis and MQTT servers running on this machine.
    #[arg(long)]
    peers: bool,

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

/// Which handshake a connection completes.
#[derive(Clone, Copy)]
enum Protocol {
    Switchboard,
    Nats,
    Redis,
    Mqtt,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.conns == 0 {
        eprintln!("idle: --conns must be at least 1");
        return ExitCode::FAILURE;
    }

    // switchboard, in a process of its own.
    let server = match start_server() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("idle: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pid = server.child.id();
    let addr = server.addr.clone();
    match measure(pid, &addr, Protocol::Switchboard, args.conns).await {
        Ok((kept, per_conn)) if kept == args.conns => {
            println!("idle: conns={kept} broker_rss_per_conn_bytes={per_conn}");
        }
        Ok((kept, _)) => {
            eprintln!(
                "idle: only {kept} of {} connections completed the handshake",
                args.conns
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("idle: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop(server);

    if args.peers {
        let peers = [
            ("nats", "nats-server", args.nats.as_str(), Protocol::Nats),
            (
                "redis",
                "redis-server",
                args.redis.as_str(),
                Protocol::Redis,
            ),
            ("mosquitto", "mosquitto", args.mqtt.as_str(), Protocol::Mqtt),
        ];
        for (name, process, addr, protocol) in peers {
            let outcome = match pid_of(process) {
                Ok(pid) => measure(pid, addr, protocol, args.conns).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok((kept, per_conn)) => {
                    println!("idle: system={name} conns={kept} rss_per_conn_bytes={per_conn}")
                }
                Err(reason) => println!("idle: system={name} skipped reason={reason}"),
            }
        }
    }
    ExitCode::SUCCESS
}

/// Opens `n` idle connections to `addr`, and returns how many completed the handshake
/// and the growth of `pid`'s resident memory divided by that number. The connections
/// close on return.
async fn measure(
    pid: u32,
    addr: &str,
    protocol: Protocol,
    n: usize,
) -> Result<(usize, u64), String> {
    tokio::time::sleep(SETTLE).await;
    let before = rss(pid)?;

    let results: Vec<Result<TcpStream, String>> = futures::stream::iter(0..n)
        .map(|i| async move {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(addr, protocol, i))
                .await
                .unwrap_or_else(|_| Err("handshake timed out".into()))
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut connections = Vec::with_capacity(n);
    let mut first_error = None;
    for result in results {
        match result {
            Ok(stream) => connections.push(stream),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = &first_error {
        eprintln!(
            "idle: {} of {n} handshakes with {addr} failed; the first: {e}",
            n - connections.len()
        );
    }
    if connections.is_empty() {
        return Err(first_error.unwrap_or_default());
    }

    tokio::time::sleep(SETTLE).await;
    let after = rss(pid)?;
    let kept = connections.len();
    drop(connections);
    Ok((kept, after.saturating_sub(before) / kept as u64))
}

/// Connects and completes one handshake; the connection then stays silent.
async fn handshake(addr: &str, protocol: Protocol, index: usize) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let io = |e: std::io::Error| format!("handshake failed: {e}");
    match protocol {
        Protocol::Switchboard => {
            let hello = Frame::Hello {
                version: PROTOCOL_VERSION,
                user: Text::from(format!("idle-{index}")),
                token: Bytes::new(),
            }
            .encode();
            stream.write_all(&hello).await.map_err(io)?;
            let mut length = [0u8; LENGTH_PREFIX];
            stream.read_exact(&mut length).await.map_err(io)?;
            let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
            stream.read_exact(&mut body).await.map_err(io)?;
            if body.first() != Some(&kind::WELCOME) {
                return Err(format!("expected WELCOME, got kind {:?}", body.first()));
            }
        }
        Protocol::Nats => {
            // INFO, then CONNECT; the PONG says the server has taken the CONNECT.
            let mut reader = tokio::io::BufReader::new(&mut stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.map_err(io)?;
            if !line.starts_with("INFO") {
                return Err(format!("expected INFO, got {line:?}"));
            }
            reader
                .get_mut()
                .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
                .await
                .map_err(io)?;
            line.clear();
            reader.read_line(&mut line).await.map_err(io)?;
            if !line.starts_with("PONG") {
                return Err(format!("expected PONG, got {line:?}"));
            }
        }
        Protocol::Redis => {
            stream.write_all(b"PING\r\n").await.map_err(io)?;
            let mut reply = [0u8; 7];
            stream.read_exact(&mut reply).await.map_err(io)?;
            if &reply != b"+PONG\r\n" {
                return Err(format!(
                    "expected +PONG, got {:?}",
                    String::from_utf8_lossy(&reply)
                ));
            }
        }
        Protocol::Mqtt => {
            // MQTT 3.1.1 CONNECT: clean session, keep-alive 0 (none), then CONNACK.
            let id = format!("idle-{index}");
            let mut connect = vec![0x10, (12 + id.len()) as u8];
            connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0]);
            connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
            connect.extend_from_slice(id.as_bytes());
            stream.write_all(&connect).await.map_err(io)?;
            let mut connack = [0u8; 4];
            stream.read_exact(&mut connack).await.map_err(io)?;
            if connack != [0x20, 0x02, 0x00, 0x00] {
                return Err(format!("expected CONNACK, got {connack:?}"));
            }
        }
    }
    Ok(stream)
}

/// A process's resident memory in bytes.
fn rss(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory of process {pid}: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The process id of the one process named `name`.
fn pid_of(name: &str) -> Result<u32, String> {
    let output = Command::new("pgrep")
        .args(["-x", name])
        .output()
        .map_err(|e| format!("cannot run pgrep: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut pids = text.lines().filter_map(|l| l.trim().parse::<u32>().ok());
    match (pids.next(), pids.next()) {
        (Some(pid), None) => Ok(pid),
        (None, _) => Err(format!("no process named {name}")),
        (Some(_), Some(_)) => Err(format!("more than one process named {name}")),
    }
}
