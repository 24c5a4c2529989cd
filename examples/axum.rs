//! A host with an HTTP server of its own, which upgrades WebSocket requests itself and
//! hands each WebSocket to the broker, so its API and its push service share one port.
//!
//! ```text
//! cargo run --example axum [-- --listen 127.0.0.1:7880]
//! ```
//!
//! - `GET /stats`: the host's own endpoint, the broker's counters as JSON.
//! - `GET /ws`: a WebSocket for switchboard clients, in either form of
//!   `docs/protocol.md` (binary frames, or JSON text).
//!
//! axum's `WebSocketUpgrade` hides the stream the broker needs, so the handshake is
//! answered here: a `101` with the accept key, then hyper's upgraded connection becomes
//! a tungstenite `WebSocketStream` on the server side.
//!
//! It prints `axum example: listening on ADDR` with the address actually bound, so
//! port 0 suits tests.

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use switchboard::frame::LENGTH_PREFIX;
use switchboard::transport::websocket::{self, WebSocketStream};
use switchboard::Broker;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

#[derive(Parser)]
struct Args {
    /// Address for HTTP: `/stats` and WebSocket upgrades at `/ws`.
    #[arg(long, default_value = "127.0.0.1:7880")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let broker = Broker::builder().build();
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/ws", get(upgrade))
        .with_state(broker.clone());

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("axum example: listening on {}", listener.local_addr()?);
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;

    // Upgraded connections are the broker's: it closes them with a reason.
    broker.shutdown().await;
    Ok(())
}

async fn stats(State(broker): State<Broker>) -> Json<serde_json::Value> {
    let stats = broker.stats();
    Json(serde_json::json!({
        "connections": stats.connections,
        "sessions": stats.sessions,
        "messages_received": stats.messages_received,
        "messages_delivered": stats.messages_delivered,
        "frames_rejected": stats.frames_rejected,
    }))
}

/// Answers the WebSocket handshake, then gives the upgraded connection to the broker.
async fn upgrade(
    State(broker): State<Broker>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let Some(accept) = accept_key(request.headers()) else {
        return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response();
    };

    // A host-upgraded WebSocket has no limit from the broker: without one, tungstenite
    // would buffer messages of up to 64 MiB before the broker could refuse them.
    let max_message = broker.config().max_frame + LENGTH_PREFIX;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));

    // hyper hands over the connection only once the 101 below has been sent.
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(request).await else {
            return;
        };
        let io = TokioIo::new(upgraded);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
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

/// The `Sec-WebSocket-Accept` answer to a version 13 upgrade request, or `None` when
/// the request is not one.
fn accept_key(headers: &HeaderMap) -> Option<String> {
    let is = |name: &str, want: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(want))
            })
    };
    if !is("upgrade", "websocket") || !is("sec-websocket-version", "13") {
        return None;
    }
    let key = headers.get(SEC_WEBSOCKET_KEY)?;
    Some(derive_accept_key(key.as_bytes()))
}
