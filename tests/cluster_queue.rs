//! The queue between the workers and a cluster backend, at its limit and one past it,
//! through a backend of the test's own: no engine, it takes what the workers hand over
//! only when the test says so.

mod common;

use futures::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use switchboard::cluster::{ClusterBackend, ClusterErrorKind, ClusterNode, Next, Outbound};
use switchboard::{Broker, MessageKind};
use tokio::sync::{mpsc, Notify};

/// Takes nothing until `go` is notified, then reports each outbound message's kind and
/// target on `taken`.
struct Held {
    go: Arc<Notify>,
    taken: mpsc::UnboundedSender<(MessageKind, String)>,
}

impl ClusterBackend for Held {
    fn run(self: Box<Self>, mut node: ClusterNode) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.go.notified().await;
            let mut batch: Vec<Outbound> = Vec::new();
            loop {
                match node.next(&mut batch, 16).await {
                    Next::Closed => return,
                    Next::Interest(_) => {}
                    Next::Outbound(_) => {
                        for outbound in batch.drain(..) {
                            let kind = outbound.target.kind();
                            let _ = self.taken.send((kind, outbound.target.id().to_string()));
                        }
                    }
                }
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_and_one_past_it() {
    const LIMIT: usize = 4;
    let go = Arc::new(Notify::new());
    let (taken, mut seen) = mpsc::unbounded_channel();
    let reported = Arc::new(AtomicU64::new(0));
    let on_error = reported.clone();
    let broker = Broker::builder()
        .workers(1)
        .cluster_queue(LIMIT)
        .cluster(Held {
            go: go.clone(),
            taken,
        })
        .on_cluster_error(move |e| {
            assert_eq!(e.kind, ClusterErrorKind::QueueFull);
            on_error.fetch_add(e.messages, Ordering::SeqCst);
        })
        .build();

    // At the limit: every message waits in the queue.
    for i in 0..LIMIT {
        broker
            .publish("room", format!("{i}"))
            .await
            .expect("publish");
    }
    let stats = broker.clone();
    common::wait_until("the worker handed every message over", move || {
        stats.stats().messages_received == LIMIT as u64
    })
    .await;
    assert_eq!(broker.stats().cluster_failed, 0);

    // One past it: counted and reported, and the worker did not wait.
    broker.send_to("alice", "one too many").await.expect("send");
    let stats = broker.clone();
    common::wait_until("the message past the limit counted", move || {
        stats.stats().cluster_failed == 1
    })
    .await;
    assert_eq!(reported.load(Ordering::SeqCst), 1);

    // The backend gets what fitted, in order.
    go.notify_one();
    for _ in 0..LIMIT {
        let (kind, target) = common::within("the backend's batch", seen.recv())
            .await
            .expect("an outbound message");
        assert_eq!((kind, target.as_str()), (MessageKind::Session, "room"));
    }
    broker.shutdown().await;
    assert!(
        seen.try_recv().is_err(),
        "nothing past the limit was queued"
    );
}
