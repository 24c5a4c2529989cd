//! Settings the broker cannot run with are refused when it is built, not discovered by
//! a connection task later.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;
use switchboard::{Broker, Builder};

fn refused(name: &str, builder: Builder) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _entered = runtime.enter();
    let built = catch_unwind(AssertUnwindSafe(|| builder.build()));
    assert!(built.is_err(), "{name}: build() accepted it");
}

#[test]
fn build_refuses_intervals_under_a_millisecond() {
    refused(
        "heartbeat 0",
        Broker::builder().heartbeat_interval(Duration::ZERO),
    );
    refused(
        "idle 1ns",
        Broker::builder().idle_timeout(Duration::from_nanos(1)),
    );
    refused("idle 0", Broker::builder().idle_timeout(Duration::ZERO));
}

#[test]
fn build_refuses_a_frame_limit_that_leaves_no_room_for_a_deliver() {
    refused(
        "max_frame usize::MAX",
        Broker::builder().max_frame(usize::MAX),
    );
    refused(
        "max_frame u32::MAX",
        Broker::builder().max_frame(u32::MAX as usize),
    );
}

#[tokio::test]
async fn a_heartbeat_longer_than_half_the_idle_timeout_is_lowered() {
    let broker = Broker::builder()
        .idle_timeout(Duration::from_secs(1))
        .heartbeat_interval(Duration::from_secs(20))
        .build();
    assert_eq!(
        broker.config().heartbeat_interval,
        Duration::from_millis(500)
    );
}
