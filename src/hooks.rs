//! The host's hooks and what they are told.
//!
//! Every hook runs outside every lock. A hook that panics is caught, logged at error
//! level and counted in [`crate::Stats::hook_panics`]; the broker goes on as if the
//! hook had returned (a panicking `on_connect` refuses the connection).

use crate::connection::ConnectionId;
use crate::frame::ErrorCode;
use crate::message::Message;
use crate::stats::Counters;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// What `on_connect` is told about a handshake.
#[derive(Clone, Debug)]
pub struct ConnectInfo {
    /// The id the broker will give the connection.
    pub connection: ConnectionId,
    /// The user id the client asked for.
    pub user: Arc<str>,
    /// The credentials the client sent; empty when it sent none.
    pub token: Bytes,
    /// Who the peer is, as the transport describes it.
    pub peer: String,
}

/// The answer of `on_connect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Accept the connection as the user it asked to be.
    Accept,
    /// Accept the connection as this user instead (one the host derived from the
    /// token, say).
    AcceptAs(String),
    /// Refuse the connection; the client receives this reason.
    Refuse(String),
}

/// What `on_disconnect` is told.
#[derive(Clone, Debug)]
pub struct DisconnectInfo {
    /// The connection that ended.
    pub connection: ConnectionId,
    /// Its user.
    pub user: Arc<str>,
    /// Why, as a code ([`ErrorCode::Normal`] when the client closed).
    pub code: ErrorCode,
    /// Why, for people.
    pub reason: String,
}

/// What `on_error` is told: a connection sent bad input or its transport failed.
#[derive(Clone, Debug)]
pub struct ErrorInfo {
    /// The connection, once the handshake gave it an id.
    pub connection: Option<ConnectionId>,
    /// Its user, once known.
    pub user: Option<Arc<str>>,
    /// Who the peer is, as the transport describes it.
    pub peer: String,
    /// What went wrong, as a code.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub detail: String,
}

/// What `on_lag` is told: a member could not keep up.
#[derive(Clone, Debug)]
pub struct LagInfo {
    /// The slow connection.
    pub connection: ConnectionId,
    /// Its user.
    pub user: Arc<str>,
    /// Messages dropped for it by this event.
    pub dropped: u64,
    /// Whether it is being disconnected (the [`crate::SlowConsumerPolicy::Disconnect`]
    /// policy).
    pub disconnected: bool,
}

pub(crate) type MessageHook = Arc<dyn Fn(&Message, usize) + Send + Sync>;
pub(crate) type ConnectHook =
    Arc<dyn Fn(ConnectInfo) -> BoxFuture<'static, Admission> + Send + Sync>;
pub(crate) type DisconnectHook = Arc<dyn Fn(&DisconnectInfo) + Send + Sync>;
pub(crate) type ErrorHook = Arc<dyn Fn(&ErrorInfo) + Send + Sync>;
pub(crate) type LagHook = Arc<dyn Fn(&LagInfo) + Send + Sync>;
pub(crate) type ClusterErrorHook = Arc<dyn Fn(&crate::cluster::ClusterErrorInfo) + Send + Sync>;

#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub on_message: Option<MessageHook>,
    pub on_connect: Option<ConnectHook>,
    pub on_disconnect: Option<DisconnectHook>,
    pub on_error: Option<ErrorHook>,
    pub on_lag: Option<LagHook>,
    pub on_cluster_error: Option<ClusterErrorHook>,
}

/// Runs a synchronous hook, catching a panic.
pub(crate) fn call(name: &'static str, counters: &Counters, f: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        counters.hook_panicked(name);
    }
}

/// Runs an asynchronous hook, catching a panic; `None` when it panicked. `start` calls
/// the hook, which may panic in its own body before it returns a future as well as in
/// the future itself.
pub(crate) async fn call_async<T, F: Future<Output = T>>(
    name: &'static str,
    counters: &Counters,
    start: impl FnOnce() -> F,
) -> Option<T> {
    let Ok(fut) = std::panic::catch_unwind(AssertUnwindSafe(start)) else {
        counters.hook_panicked(name);
        return None;
    };
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(v) => Some(v),
        Err(_) => {
            counters.hook_panicked(name);
            None
        }
    }
}
