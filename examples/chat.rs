//! An interactive line client for the `server` example.
//!
//! ```text
//! cargo run --release --example chat -- --user alice [--addr 127.0.0.1:7878] [--token T]
//! ```
//!
//! Each line read from stdin is a command or a message:
//!
//! - `/join ROOM` joins a room and makes it the current one;
//! - `/leave [ROOM]` leaves a room (the current one by default);
//! - `/dm USER text` sends a direct message to every connection of a user;
//! - `/quit` closes the connection; so does the end of stdin;
//! - any other line goes to the current room (the last one joined); start it with
//!   `//` to send a line that begins with `/`.
//!
//! What the broker sends prints on stdout, one line each: `[room] sender: text`,
//! `[dm] sender: text`, `[notice] ...`, `[error] ...`, and `[closed] reason` when the
//! broker ends the connection. Mistakes in what was typed print on stderr.
//!
//! stdin may be a pipe, which makes the client scriptable:
//!
//! ```text
//! printf '/join lobby\nhello\n' | cargo run --release --example chat -- --user alice
//! ```
//!
//! After the end of stdin it keeps printing for `--linger-ms` (default 500), so replies
//! to the last lines still show, then closes.

use clap::Parser;
use futures::StreamExt;
use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::{Client, ClientHandle, Event, Events, Message, MessageKind, Notice};
use tokio::sync::mpsc;

/// How long to wait for the broker to acknowledge our close before giving up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "An interactive switchboard chat client")]
struct Args {
    /// The user id to connect as.
    #[arg(long)]
    user: String,

    /// The broker's address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    addr: String,

    /// Credentials for the broker's `on_connect` hook.
    #[arg(long)]
    token: Option<String>,

    /// How long to keep printing after stdin ends, in milliseconds.
    #[arg(long, default_value_t = 500)]
    linger_ms: u64,
}

/// What the input loop does after a line.
enum Flow {
    Continue,
    Quit,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();

    let mut builder = Client::builder(args.user.as_str());
    if let Some(token) = args.token {
        builder = builder.token(token);
    }
    let client = match builder.connect_tcp(args.addr.as_str()).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("chat: cannot connect to {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    println!("[info] connected to {} as {}", args.addr, client.user());
    let (handle, mut events) = client.split();

    // A blocking read of stdin cannot be cancelled, so it lives on its own thread
    // rather than the runtime's, which would otherwise wait for the next line before
    // the process could exit.
    let mut lines = stdin_lines();
    let mut chat = Chat {
        handle,
        rooms: Vec::new(),
    };

    // Lines and events interleave until stdin ends, the user quits or the broker
    // closes the connection.
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => {
                    if let Flow::Quit = chat.command(&line).await {
                        break;
                    }
                }
                None => break,
            },
            event = events.next() => {
                if let Some(code) = chat.show(event) {
                    return code;
                }
            }
        }
    }

    // Replies to the last lines may still be on their way.
    let linger = tokio::time::sleep(Duration::from_millis(args.linger_ms));
    tokio::pin!(linger);
    loop {
        tokio::select! {
            _ = &mut linger => break,
            event = events.next() => {
                if let Some(code) = chat.show(event) {
                    return code;
                }
            }
        }
    }

    chat.handle.close().await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain(&mut events)).await;
    ExitCode::SUCCESS
}

/// Reads stdin lines on a thread of their own; the channel closes at end of input.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else {
                break;
            };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for the broker to close the connection after ours, discarding events.
async fn drain(events: &mut Events) {
    while let Some(event) = events.next().await {
        if let Event::Closed { .. } = event {
            return;
        }
    }
}

struct Chat {
    handle: ClientHandle,
    /// Rooms joined, in order; the last is the current one.
    rooms: Vec<String>,
}

impl Chat {
    /// Acts on one line of input.
    async fn command(&mut self, line: &str) -> Flow {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            return Flow::Continue;
        }
        if let Some(text) = line.strip_prefix("//") {
            self.say(&format!("/{text}")).await;
            return Flow::Continue;
        }
        let Some(command) = line.strip_prefix('/') else {
            self.say(line).await;
            return Flow::Continue;
        };

        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        let rest = rest.trim();
        match name {
            "join" if !rest.is_empty() && !rest.contains(' ') => self.join(rest).await,
            "leave" if !rest.contains(' ') => self.leave(rest).await,
            "dm" => match rest.split_once(' ') {
                Some((user, text)) if !text.trim().is_empty() => self.dm(user, text.trim()).await,
                _ => eprintln!("usage: /dm USER text"),
            },
            "quit" => return Flow::Quit,
            "help" => eprintln!("commands: /join ROOM, /leave [ROOM], /dm USER text, /quit"),
            "join" => eprintln!("usage: /join ROOM"),
            "leave" => eprintln!("usage: /leave [ROOM]"),
            _ => eprintln!("unknown command /{name}; try /help"),
        }
        Flow::Continue
    }

    async fn join(&mut self, room: &str) {
        match self.handle.subscribe(room).await {
            Ok(()) => {
                self.forget(room);
                self.rooms.push(room.to_string());
                println!("[info] joined {room}");
            }
            Err(e) => eprintln!("cannot join {room}: {e}"),
        }
    }

    async fn leave(&mut self, room: &str) {
        let room = match (room, self.rooms.last()) {
            ("", Some(current)) => current.clone(),
            ("", None) => {
                eprintln!("not in any room");
                return;
            }
            (room, _) => room.to_string(),
        };
        match self.handle.unsubscribe(&room).await {
            Ok(()) => {
                self.forget(&room);
                println!("[info] left {room}");
            }
            Err(e) => eprintln!("cannot leave {room}: {e}"),
        }
    }

    async fn dm(&mut self, user: &str, text: &str) {
        if let Err(e) = self.handle.send_direct(user, text.to_string()).await {
            eprintln!("cannot send to {user}: {e}");
        }
    }

    /// Sends a line to the current room.
    async fn say(&mut self, text: &str) {
        let Some(room) = self.rooms.last() else {
            eprintln!("no room joined; use /join ROOM first");
            return;
        };
        if let Err(e) = self.handle.publish(room, text.to_string()).await {
            eprintln!("cannot send to {room}: {e}");
        }
    }

    fn forget(&mut self, room: &str) {
        self.rooms.retain(|r| r != room);
    }

    /// Prints one event. Returns the exit code once the connection has ended.
    fn show(&mut self, event: Option<Event>) -> Option<ExitCode> {
        match event {
            Some(Event::Message(message)) => println!("{}", render(&message)),
            Some(Event::Notice(notice)) => self.notice(notice),
            Some(Event::Closed { code, reason }) => {
                println!("[closed] {reason} ({code:?})");
                return Some(ExitCode::FAILURE);
            }
            None => {
                println!("[closed] connection lost");
                return Some(ExitCode::FAILURE);
            }
        }
        None
    }

    fn notice(&mut self, notice: Notice) {
        match notice {
            Notice::NotDelivered { user, .. } => println!("[notice] {user} is not connected"),
            Notice::SessionClosed { session, reason } => {
                self.forget(&session);
                println!("[notice] room {session} was closed: {reason}");
            }
            Notice::Missed { count } => {
                println!("[notice] missed {count} messages: this client fell behind")
            }
            Notice::Joined { session } => {
                self.forget(&session);
                self.rooms.push(session.clone());
                println!("[notice] the server added you to {session}");
            }
            Notice::Left { session } => {
                self.forget(&session);
                println!("[notice] the server removed you from {session}");
            }
            Notice::Error { code, reason, .. } => println!("[error] {reason} ({code:?})"),
        }
    }
}

/// One message as a line: `[room] sender: text` or `[dm] sender: text`.
fn render(message: &Message) -> String {
    let sender = if message.is_from_host() {
        "(server)".to_string()
    } else {
        printable(&message.sender)
    };
    let text = printable(&String::from_utf8_lossy(&message.payload));
    match message.kind {
        MessageKind::Direct => format!("[dm] {sender}: {text}"),
        MessageKind::Session => format!("[{}] {sender}: {text}", printable(message.target.id())),
    }
}

/// Replaces control characters, so that a peer cannot move the cursor or recolour the
/// terminal of everyone in a room.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}
