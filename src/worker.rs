//! Forwarding workers: each takes messages off its ingress queue, finds the members or
//! connections of the target, encodes the message once and offers the same buffer to
//! every outbox.
//!
//! Targets are spread over workers by a hash of their id, so every message to one
//! session goes through one worker, in the order its readers queued it, while other
//! sessions use the other cores.

use crate::broker::Inner;
use crate::connection::ConnectionState;
use crate::frame::{encode_deliver, Frame, NoticeKind, Text};
use crate::hooks;
use crate::message::{unix_micros, Message, MessageKind, Target};
use crate::stats::Counters;
use crate::transport::WireFormat;
use bytes::Bytes;
use std::sync::{Arc, Weak};
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot};

/// The most jobs a worker takes off its queue at once.
const BATCH: usize = 128;

/// Bytes of frames a worker offers before it wakes the writers, at most (or a quarter
/// of `outbox_bytes`, when less). Waking once per batch lets a writer find many frames
/// at once; the bound keeps what waits unseen far below an outbox's cap, so that no
/// member is taken for a slow consumer because its writer was not yet woken. Frames,
/// not payload, are what fill an outbox: a small message to a long session id is
/// mostly header.
const WAKE_AFTER: usize = 64 * 1024;

/// One entry on an ingress queue.
pub(crate) enum Job {
    /// A message to every member of a session but the sender.
    Publish {
        /// The sending connection; `None` for a push from the host.
        from: Option<Arc<ConnectionState>>,
        session: Text,
        payload: Bytes,
    },
    /// A message to every connection of a user but the sender.
    Direct {
        from: Option<Arc<ConnectionState>>,
        user: Text,
        payload: Bytes,
        request: u32,
    },
    /// A message published on another node of the cluster, for local members or
    /// connections only.
    Remote {
        kind: MessageKind,
        sender: Arc<str>,
        target: Arc<str>,
        sent_at: SystemTime,
        payload: Bytes,
    },
    /// Answered once every job queued before it is done.
    Drain(oneshot::Sender<()>),
}

/// The members whose writers one worker owes a wake-up.
struct Wakes {
    /// The worker's index, which an outbox keeps to know who owes its writer a
    /// wake-up ([`crate::outbox::Outbox::offer_unwoken`]).
    worker: usize,
    members: Vec<Arc<ConnectionState>>,
    /// Bytes of frames offered since the writers were last woken, the largest frame of
    /// each message counted once: no member is offered more than that.
    unwoken: usize,
}

impl Wakes {
    /// Wakes the writers of members that were offered frames.
    fn wake_all(&mut self) {
        for member in self.members.drain(..) {
            member.outbox.wake();
        }
        self.unwoken = 0;
    }
}

/// Runs one worker until its queue closes. Message ids are `index + 1` plus multiples
/// of `workers`, so workers never hand out the same id and never share a counter.
pub(crate) async fn run(
    inner: Weak<Inner>,
    index: usize,
    workers: usize,
    mut queue: mpsc::Receiver<Job>,
) {
    let mut next_id = index as u64 + 1;
    let step = workers as u64;
    let mut jobs = Vec::with_capacity(BATCH);
    // The members whose writers wait for a wake-up once this batch is offered.
    let mut wake = Wakes {
        worker: index,
        members: Vec::new(),
        unwoken: 0,
    };

    while queue.recv_many(&mut jobs, BATCH).await > 0 {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut received = 0;
        let mut delivered = 0;
        let wake_after = WAKE_AFTER.min(inner.config.outbox_bytes / 4);
        for job in jobs.drain(..) {
            let id = next_id;
            if wake.unwoken >= wake_after {
                wake.wake_all();
            }
            match job {
                Job::Publish {
                    from,
                    session,
                    payload,
                } => {
                    delivered += publish(&inner, id, from.as_ref(), &session, payload, &mut wake);
                }
                Job::Direct {
                    from,
                    user,
                    payload,
                    request,
                } => {
                    delivered += direct(
                        &inner,
                        id,
                        from.as_ref(),
                        &user,
                        payload,
                        request,
                        &mut wake,
                    );
                }
                Job::Remote {
                    kind,
                    sender,
                    target,
                    sent_at,
                    payload,
                } => {
                    let message = (kind, &*sender, &*target, sent_at, &payload);
                    delivered += remote(&inner, id, message, &mut wake);
                    next_id += step;
                    continue;
                }
                Job::Drain(done) => {
                    wake.wake_all();
                    let _ = done.send(());
                    continue;
                }
            }
            received += 1;
            next_id += step;
        }
        // Counted before the members are woken, so that whoever has received a message
        // finds it counted.
        Counters::add(&inner.counters.received, received);
        Counters::add(&inner.counters.delivered, delivered);
        wake.wake_all();
    }
}

/// Encodes a message at most once per wire format, on first need.
struct Encoded<'a> {
    id: u64,
    kind: MessageKind,
    sent_at_us: u64,
    sender: &'a str,
    target: &'a str,
    payload: &'a Bytes,
    binary: Option<Bytes>,
    #[cfg(feature = "websocket")]
    json: Option<Bytes>,
}

impl<'a> Encoded<'a> {
    fn new(
        id: u64,
        kind: MessageKind,
        sent_at: SystemTime,
        sender: &'a str,
        target: &'a str,
        payload: &'a Bytes,
    ) -> Self {
        Encoded {
            id,
            kind,
            sent_at_us: unix_micros(sent_at),
            sender,
            target,
            payload,
            binary: None,
            #[cfg(feature = "websocket")]
            json: None,
        }
    }

    fn frame(&mut self, format: WireFormat) -> Bytes {
        match format {
            WireFormat::Binary => self
                .binary
                .get_or_insert_with(|| {
                    encode_deliver(
                        self.id,
                        self.kind,
                        self.sent_at_us,
                        self.sender,
                        self.target,
                        self.payload,
                    )
                })
                .clone(),
            #[cfg(feature = "websocket")]
            WireFormat::Json => self
                .json
                .get_or_insert_with(|| {
                    crate::json::encode_deliver(
                        self.id,
                        self.kind,
                        self.sent_at_us,
                        self.sender,
                        self.target,
                        self.payload,
                    )
                })
                .clone(),
        }
    }
}

/// Offers `frame` to each of `members` but the sender; returns how many took it.
/// Members whose writers need waking are added to `wake`.
fn fan_out(
    inner: &Inner,
    members: &[Arc<ConnectionState>],
    from: Option<&Arc<ConnectionState>>,
    encoded: &mut Encoded<'_>,
    wake: &mut Wakes,
) -> u64 {
    let sender = from.map(|f| f.id);
    let mut delivered = 0;
    let mut largest = 0;
    for member in members {
        if Some(member.id) == sender {
            continue;
        }
        let frame = encoded.frame(member.format);
        largest = largest.max(frame.len());
        let (queued, due) = member.deliver(frame, inner, wake.worker);
        if due {
            wake.members.push(member.clone());
        }
        if queued {
            delivered += 1;
        }
    }
    wake.unwoken += largest;
    delivered
}

fn publish(
    inner: &Inner,
    id: u64,
    from: Option<&Arc<ConnectionState>>,
    session: &Text,
    payload: Bytes,
    wake: &mut Wakes,
) -> u64 {
    let sent_at = SystemTime::now();
    let sender = from.map_or_else(|| inner.host_sender.clone(), |f| f.user.clone());
    let found = inner.sessions.members(session.as_str());

    let delivered = match &found {
        Some((session_id, members)) => {
            let mut encoded = Encoded::new(
                id,
                MessageKind::Session,
                sent_at,
                &sender,
                session_id,
                &payload,
            );
            fan_out(inner, members, from, &mut encoded, wake)
        }
        None => 0,
    };
    if let Some(cluster) = &inner.cluster {
        let target = Target::Session(match &found {
            Some((session_id, _)) => session_id.clone(),
            None => Arc::from(session.as_str()),
        });
        cluster.forward(inner, target, sent_at, &sender, &payload, from, None);
    }

    report(inner, delivered, || Message {
        id,
        kind: MessageKind::Session,
        sender,
        target: Target::Session(match found {
            Some((session_id, _)) => session_id,
            None => Arc::from(session.as_str()),
        }),
        sent_at,
        payload,
    });
    delivered
}

/// Tells the host's `on_message` hook, if there is one, what was forwarded; the
/// message is only built when someone will see it.
fn report(inner: &Inner, delivered: u64, message: impl FnOnce() -> Message) {
    if let Some(hook) = &inner.hooks.on_message {
        let message = message();
        hooks::call("on_message", &inner.counters, || {
            hook(&message, delivered as usize)
        });
    }
}

fn direct(
    inner: &Inner,
    id: u64,
    from: Option<&Arc<ConnectionState>>,
    user: &Text,
    payload: Bytes,
    request: u32,
    wake: &mut Wakes,
) -> u64 {
    let sent_at = SystemTime::now();
    let sender = from.map_or_else(|| inner.host_sender.clone(), |f| f.user.clone());
    let connections = inner.registry.of_user(user.as_str());

    let mut encoded = Encoded::new(
        id,
        MessageKind::Direct,
        sent_at,
        &sender,
        user.as_str(),
        &payload,
    );
    let delivered = fan_out(inner, &connections, from, &mut encoded, wake);

    // In a cluster the other nodes may hold the user: the backend tells the sender
    // when none of them received it either.
    if let Some(cluster) = &inner.cluster {
        let target = Target::User(Arc::from(user.as_str()));
        let reply = (delivered == 0).then_some(request);
        cluster.forward(inner, target, sent_at, &sender, &payload, from, reply);
    } else if delivered == 0 {
        if let Some(from) = from {
            from.control(
                &Frame::Notice {
                    kind: NoticeKind::NotDelivered,
                    request,
                    count: 0,
                    subject: user.clone(),
                    text: Text::from("no live connection of that user received the message"),
                },
                inner,
            );
        }
    }

    report(inner, delivered, || Message {
        id,
        kind: MessageKind::Direct,
        sender,
        target: Target::User(match connections.first() {
            Some(conn) => conn.user.clone(),
            None => Arc::from(user.as_str()),
        }),
        sent_at,
        payload,
    });
    delivered
}

/// Delivers a message from another node to the local members of its session or the
/// local connections of its user. No one here sent it, so no one is skipped, and no
/// sender waits for a notice; `on_message` ran on the node where it was published.
fn remote(
    inner: &Inner,
    id: u64,
    (kind, sender, target, sent_at, payload): (MessageKind, &str, &str, SystemTime, &Bytes),
    wake: &mut Wakes,
) -> u64 {
    let recipients = match kind {
        MessageKind::Session => match inner.sessions.members(target) {
            Some((_, members)) => members,
            None => return 0,
        },
        MessageKind::Direct => Arc::new(inner.registry.of_user(target)),
    };
    let mut encoded = Encoded::new(id, kind, sent_at, sender, target, payload);
    fan_out(inner, &recipients, None, &mut encoded, wake)
}
