//! Peers that open sockets and never finish a handshake hold a place among
//! `max_connections` like everyone else, so they cannot pile up without bound.

use std::time::Duration;
use switchboard::{Broker, Client, ClientError, ErrorCode, TcpTransport};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_handshake_in_progress_counts_against_max_connections() {
    let broker = Broker::builder().max_connections(2).build();
    let transport = TcpTransport::bind("127.0.0.1:0").await.unwrap();
    let addr = transport.local_addr().unwrap();
    tokio::spawn(broker.serve(transport));

    // Two peers connect and say nothing: both places are taken.
    let silent_a = TcpStream::connect(addr).await.unwrap();
    let silent_b = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let refused = timeout(WAIT, Client::builder("late").connect_tcp(addr))
        .await
        .expect("an answer in time");
    match refused {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::TooManyConnections);
            assert!(reason.contains("limit of 2"), "{reason}");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a third connection got in past max_connections(2)"),
    }
    assert_eq!(
        broker.stats().connections,
        0,
        "silent peers are not connections yet"
    );

    // Once one silent peer leaves, its place is free again.
    drop(silent_a);
    let mut admitted = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(Ok(client)) = timeout(WAIT, Client::builder("late").connect_tcp(addr)).await {
            admitted = Some(client);
            break;
        }
    }
    let client = admitted.expect("a place freed by a silent peer is taken again");
    client.subscribe("room").await.unwrap();
    assert_eq!(broker.stats().connections, 1);
    drop(silent_b);
}
