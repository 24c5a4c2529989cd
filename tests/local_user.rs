//! What a host writes with `Broker::connect_local`: a bot in its own process that sits
//! in a room with network clients, answers what they say there and sends direct
//! messages, built only from the README and the docs of `connect_local` and `local`.

mod common;

use common::{expect_quiet, next_message, within};
use futures::StreamExt;
use switchboard::{
    Broker, Client, ErrorCode, Event, LocalConnection, Message, MessageKind, TcpTransport,
};
use tokio::task::JoinHandle;

/// The bot: in `lobby`, it greets whoever says "hello" there, tells whoever says
/// "!secret" the secret in private, and answers a direct "ping" with a direct "pong".
/// It runs until its connection ends and returns how the connection ended.
fn spawn_bot(mut bot: LocalConnection) -> JoinHandle<(ErrorCode, String)> {
    tokio::spawn(async move {
        while let Some(event) = bot.recv().await {
            match event {
                Event::Message(message) => answer(&bot, &message).await,
                Event::Notice(_) => {}
                Event::Closed { code, reason } => return (code, reason),
            }
        }
        panic!("the bot's events ended without a close");
    })
}

async fn answer(bot: &LocalConnection, message: &Message) {
    let from = &*message.sender;
    let sent = match (message.kind, &message.payload[..]) {
        (MessageKind::Session, b"hello") => {
            bot.publish(message.target.id(), format!("hi {from}")).await
        }
        (MessageKind::Session, b"!secret") => bot
            .send_direct(from, "the secret is 42")
            .await
            .map(|_request| ()),
        (MessageKind::Direct, b"ping") => bot.send_direct(from, "pong").await.map(|_| ()),
        _ => Ok(()),
    };
    // The bot's own connection ending (a shutdown, say) is the one failure expected.
    if let Err(e) = sent {
        assert!(
            matches!(e, switchboard::ClientError::Closed { .. }),
            "the bot could not answer: {e}"
        );
    }
}

fn text(message: &Message) -> (&str, &str) {
    let payload = std::str::from_utf8(&message.payload).expect("UTF-8 payloads");
    (&*message.sender, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_in_the_hosts_process_answers_network_clients_in_a_room_and_in_private() {
    let broker = Broker::builder().build();
    let transport = TcpTransport::bind("127.0.0.1:0").await.unwrap();
    let addr = transport.local_addr().unwrap();
    tokio::spawn(broker.serve(transport));

    // The bot joins before anyone speaks: `subscribe` has changed the session map by
    // the time it returns.
    let bot = broker.connect_local("bot").unwrap();
    bot.subscribe("lobby").unwrap();
    let bot_id = bot.connection_id();
    let bot = spawn_bot(bot);

    let mut alice = within("alice connects", Client::builder("alice").connect_tcp(addr))
        .await
        .unwrap();
    let mut bob = within("bob connects", Client::builder("bob").connect_tcp(addr))
        .await
        .unwrap();
    alice.subscribe("lobby").await.unwrap();
    bob.subscribe("lobby").await.unwrap();
    let lobby = broker.session("lobby").expect("the lobby has members");
    assert!(lobby.members.iter().any(|m| m.connection == bot_id));
    assert_eq!(lobby.members.len(), 3);

    // Alice greets the room: bob hears her, then the bot's answer; alice hears only the
    // answer, never her own message.
    alice.publish("lobby", "hello").await.unwrap();
    assert_eq!(text(&next_message(&mut bob).await), ("alice", "hello"));
    let answer = next_message(&mut bob).await;
    assert_eq!(text(&answer), ("bot", "hi alice"));
    assert_eq!(answer.kind, MessageKind::Session);
    assert_eq!(text(&next_message(&mut alice).await), ("bot", "hi alice"));

    // Bob asks for the secret in the room; the bot tells him alone.
    bob.publish("lobby", "!secret").await.unwrap();
    assert_eq!(text(&next_message(&mut alice).await), ("bob", "!secret"));
    let secret = next_message(&mut bob).await;
    assert_eq!(secret.kind, MessageKind::Direct);
    assert_eq!(text(&secret), ("bot", "the secret is 42"));
    expect_quiet(&mut alice).await;

    // A direct message to the bot is answered in private.
    alice.send_direct("bot", "ping").await.unwrap();
    let pong = next_message(&mut alice).await;
    assert_eq!(
        (pong.kind, text(&pong)),
        (MessageKind::Direct, ("bot", "pong"))
    );
    expect_quiet(&mut bob).await;

    // Shutdown ends the bot like every other connection.
    within("shutdown", broker.shutdown()).await;
    let (code, _) = within("the bot ends", bot).await.unwrap();
    assert_eq!(code, ErrorCode::ShuttingDown);
    let closed = within("alice's close", alice.next()).await;
    assert!(matches!(
        closed,
        Some(Event::Closed {
            code: ErrorCode::ShuttingDown,
            ..
        })
    ));
    assert_eq!(broker.stats().connections, 0);
}
