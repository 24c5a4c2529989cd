//! A runnable push server: one broker on a TCP listener and on an HTTP listener that
//! serves a chat page and takes WebSocket clients, with logs, periodic stats and a
//! graceful shutdown.
//!
//! ```text
//! cargo run --release --example server [-- --listen 127.0.0.1:7878 --ws 127.0.0.1:7879]
//! ```
//!
//! The HTTP listener (axum) serves:
//!
//! - `GET /`: the chat page, `examples/web/index.html`;
//! - `GET /switchboard.js`: the JavaScript client, `clients/js/switchboard.js`;
//! - `GET /ws`: a WebSocket upgrade, handed to the broker. This is the path a host with
//!   its own HTTP server takes: the upgrade happens in the host's router and the
//!   broker receives the finished WebSocket, so pages, API and push share one port.
//!
//! At startup it prints `switchboard: listening tcp=ADDR` to stdout, then
//! `switchboard: listening ws=ADDR`, each with the address actually bound, so port 0
//! suits tests and scripts. `--ws off` leaves the HTTP listener out; so does a default
//! address that is taken, with a warning, while an address given with `--ws` must
//! bind. Every ten seconds it prints the broker's counters on one line. Logs go to
//! stderr; the default filter shows connects and disconnects but nothing per message,
//! and `RUST_LOG` replaces it. Ctrl-C or SIGTERM shuts both listeners and the broker
//! down: what is queued is delivered, every connection is closed with a reason, HTTP
//! requests still in flight get a few seconds to finish, and the process exits 0.

use clap::Parser;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::{Broker, TcpTransport};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// How often the counters are printed.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// How long shutdown waits for HTTP requests still in flight (a client that opened a
/// request and never finished it, say) once the broker has closed its connections.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// The log filter when `RUST_LOG` is not set: the library logs connects and
/// disconnects at debug and nothing per message above trace.
const DEFAULT_FILTER: &str = "info,switchboard=debug";

/// Where the chat page and WebSocket clients are served unless `--ws` says otherwise.
const DEFAULT_WS: &str = "127.0.0.1:7879";

#[derive(Parser)]
#[command(about = "A switchboard push server over TCP and WebSocket")]
struct Args {
    /// Address to listen on for TCP clients; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: String,

    /// Address for the chat page and WebSocket clients (`/ws`), or `off`
    /// [default: 127.0.0.1:7879]
    #[arg(long)]
    ws: Option<String>,

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

    // Both listeners are bound before either is announced, so that a script never
    // reads the address of a server that is about to fail.
    let ws_listener = match bind_ws(args.ws.as_deref()).await {
        Ok(listener) => listener,
        Err(message) => {
            eprintln!("switchboard: {message}");
            return ExitCode::FAILURE;
        }
    };

    tokio::spawn(broker.serve(transport));
    // Scripts wait for this line, so it must not sit in a buffer.
    println!("switchboard: listening tcp={addr}");
    let _ = std::io::stdout().flush();
    info!(%addr, "listening");

    // The HTTP listener stops taking requests when `stop_http` is cancelled; the
    // WebSocket connections it handed over belong to the broker by then.
    let stop_http = CancellationToken::new();
    let http = ws_listener.map(|(listener, addr)| {
        let http = tokio::spawn(web::serve(
            listener,
            broker.clone(),
            stop_http.clone().cancelled_owned(),
        ));
        println!("switchboard: listening ws={addr}");
        let _ = std::io::stdout().flush();
        info!(%addr, "listening for WebSocket clients and serving the chat page");
        http
    });

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
    stop_http.cancel();
    let stopped = async {
        broker.shutdown().await;
        if let Some(mut http) = http {
            match tokio::time::timeout(HTTP_DRAIN, &mut http).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => warn!(cause = %e, "the HTTP listener failed"),
                Ok(Err(e)) => warn!(cause = %e, "the HTTP listener's task failed"),
                Err(_) => {
                    warn!(waited = ?HTTP_DRAIN, "HTTP requests still open; dropping them");
                    http.abort();
                }
            }
        }
    };
    tokio::select! {
        _ = stopped => {}
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

/// Binds the WebSocket listener and reads its address: the one `--ws` names, or the
/// default one. `--ws off`, or a default address that is taken (another server is
/// running, say), means none.
async fn bind_ws(ws: Option<&str>) -> Result<Option<(TcpListener, SocketAddr)>, String> {
    let listener = match ws {
        Some("off") => return Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for WebSocket clients on {addr}: {e}"))?,
        None => match TcpListener::bind(DEFAULT_WS).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(addr = DEFAULT_WS, cause = %e, "not serving WebSocket clients");
                return Ok(None);
            }
        },
    };
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound WebSocket address: {e}"))?;
    Ok(Some((listener, addr)))
}

/// The HTTP side: the chat page, the JavaScript client and WebSocket upgrades.
mod web {
    use axum::body::Body;
    use axum::extract::{ConnectInfo, Request, State};
    use axum::http::header::{
        CACHE_CONTROL, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
        SEC_WEBSOCKET_VERSION, UPGRADE,
    };
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{Html, IntoResponse, Response};
    use axum::routing::get;
    use axum::serve::ListenerExt;
    use axum::Router;
    use hyper_util::rt::TokioIo;
    use std::future::Future;
    use std::net::SocketAddr;
    use switchboard::frame::LENGTH_PREFIX;
    use switchboard::transport::websocket::{self, WebSocketStream};
    use switchboard::Broker;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tracing::debug;

    const PAGE: &str = include_str!("web/index.html");
    const CLIENT: &str = include_str!("../clients/js/switchboard.js");

    /// Serves HTTP on `listener` until `stop` completes. In-flight requests finish;
    /// upgraded WebSocket connections are the broker's and are not waited for here.
    pub async fn serve(
        listener: TcpListener,
        broker: Broker,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route("/switchboard.js", get(client))
            .route("/ws", get(upgrade))
            .with_state(broker);

        // Small frames go out at once rather than waiting to be coalesced, as on the
        // broker's own TCP listener.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop)
        .await
    }

    async fn client() -> impl IntoResponse {
        (
            [
                (CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (CACHE_CONTROL, "no-cache"),
            ],
            CLIENT,
        )
    }

    /// Completes the WebSocket handshake (RFC 6455) by hand, because axum's own
    /// WebSocket type hides the stream the broker needs: answer 101 with the accept
    /// key, then take the upgraded connection from hyper once the answer is out.
    async fn upgrade(
        State(broker): State<Broker>,
        ConnectInfo(peer): ConnectInfo<SocketAddr>,
        request: Request,
    ) -> Response {
        let accept = match accept_key(request.headers()) {
            Ok(accept) => accept,
            Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
        };

        // The same limit as the broker's frames: a JSON message or a binary frame
        // with its length prefix, refused from its header when larger.
        let max_message = broker.config().max_frame.saturating_add(LENGTH_PREFIX);
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(request).await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(%peer, cause = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            broker.accept(websocket::connection(ws, peer.to_string()));
        });

        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "Upgrade")
            .header(SEC_WEBSOCKET_ACCEPT, accept)
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }

    /// Checks that a request asks for a version 13 WebSocket and returns the
    /// `Sec-WebSocket-Accept` value that answers its key.
    fn accept_key(headers: &HeaderMap) -> Result<String, &'static str> {
        let has_token = |name, token: &str| {
            headers.get_all(name).iter().any(|value| {
                value.to_str().is_ok_and(|value| {
                    value
                        .split(',')
                        .any(|part| part.trim().eq_ignore_ascii_case(token))
                })
            })
        };
        if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, "websocket") {
            return Err("expected a WebSocket upgrade\n");
        }
        if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err("expected Sec-WebSocket-Version: 13\n");
        }
        match headers.get(SEC_WEBSOCKET_KEY) {
            Some(key) => Ok(derive_accept_key(key.as_bytes())),
            None => Err("expected a Sec-WebSocket-Key\n"),
        }
    }
}
