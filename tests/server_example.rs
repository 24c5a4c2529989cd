//! The `server` example as its own process, driven over TCP by the crate's client: it
//! announces its address, forwards publications and direct messages, and on SIGTERM
//! shuts down gracefully and exits.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::{Client, ErrorCode, MessageKind};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// What the example prints once it listens; the address follows.
const LISTENING: &str = "switchboard: listening tcp=";

/// Builds the example with the profile this test was built with and returns its path.
fn build_server() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("target"));
    let target_dir = manifest_dir.join(target_dir); // a relative one is under the manifest
    let (profile, release) = if cfg!(debug_assertions) {
        ("debug", false)
    } else {
        ("release", true)
    };

    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--example", "server"])
        .current_dir(&manifest_dir)
        .env("CARGO_TARGET_DIR", &target_dir);
    if release {
        build.arg("--release");
    }
    // Cargo's progress is shown only when the build fails.
    let output = build.output().expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build --example server failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let exe = target_dir
        .join(profile)
        .join("examples")
        .join(format!("server{}", std::env::consts::EXE_SUFFIX));
    assert!(exe.is_file(), "no example binary at {}", exe.display());
    exe
}

/// Copies a child's output into `log` line by line, so that the pipe never fills and
/// a failure can show what the server said.
fn drain(output: impl AsyncRead + Unpin + Send + 'static, log: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(output).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

/// Sends a signal by name with the system's `kill`, which every Unix has.
async fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("the server is running").to_string();
    let status = Command::new("kill")
        .args([format!("-{name}"), pid])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}

/// Waits for the server to exit; kills it if it does not, so that no process outlives
/// the test, and fails.
async fn reap(child: &mut Child, log: &Mutex<String>) -> ExitStatus {
    match tokio::time::timeout(WAIT, child.wait()).await {
        Ok(status) => status.expect("wait for the server"),
        Err(_) => {
            let _ = child.kill().await;
            panic!(
                "the server did not exit within {WAIT:?} of SIGTERM; it said:\n{}",
                log.lock().unwrap()
            );
        }
    }
}

#[test]
fn the_server_example_serves_clients_and_stops_on_sigterm() {
    let exe = build_server();
    run_with_deadline(Duration::from_secs(60), move || async move {
        let mut child = Command::new(&exe)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the server example");
        let errors = Arc::new(Mutex::new(String::new()));
        drain(child.stderr.take().unwrap(), errors.clone());

        // The first line that names the address; the rest of stdout is drained after.
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = within("the listening line", async {
            while let Some(line) = stdout.next_line().await.expect("read stdout") {
                if let Some(rest) = line.strip_prefix(LISTENING) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    return addr.parse::<std::net::SocketAddr>().expect("an address");
                }
            }
            panic!("stdout ended; stderr:\n{}", errors.lock().unwrap());
        })
        .await;
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0, "the line names the bound port");
        let output = Arc::new(Mutex::new(String::new()));
        drain(stdout.into_inner(), output.clone());

        // Two clients: a session publication each way, then direct messages.
        let mut alice = within("alice", Client::builder("alice").connect_tcp(addr))
            .await
            .unwrap();
        let mut bob = within("bob", Client::builder("bob").connect_tcp(addr))
            .await
            .unwrap();
        within("subscribe", alice.subscribe("lobby")).await.unwrap();
        within("subscribe", bob.subscribe("lobby")).await.unwrap();

        alice.publish("lobby", "hello from alice").await.unwrap();
        let message = next_message(&mut bob).await;
        assert_eq!(&message.payload[..], b"hello from alice");
        assert_eq!(&*message.sender, "alice");
        assert_eq!(message.kind, MessageKind::Session);
        bob.publish("lobby", "hello from bob").await.unwrap();
        assert_eq!(next_payload(&mut alice).await, "hello from bob");

        bob.send_direct("alice", "just for you").await.unwrap();
        let message = next_message(&mut alice).await;
        assert_eq!(&message.payload[..], b"just for you");
        assert_eq!(message.kind, MessageKind::Direct);
        assert_eq!(&*message.sender, "bob");
        let request = alice.send_direct("nobody", "hello?").await.unwrap();
        assert_eq!(
            next_event(&mut alice).await,
            switchboard::Event::Notice(switchboard::Notice::NotDelivered {
                request,
                user: "nobody".into(),
            })
        );
        expect_quiet(&mut alice).await;
        expect_quiet(&mut bob).await;

        // SIGTERM: every connection is closed with a reason, and the process exits 0.
        signal(&child, "TERM").await;
        for client in [&mut alice, &mut bob] {
            let (code, reason) = closed(client).await;
            assert_eq!(code, ErrorCode::ShuttingDown, "{reason}");
        }
        let status = reap(&mut child, &errors).await;
        assert!(
            status.success(),
            "the server exited with {status}; stderr:\n{}",
            errors.lock().unwrap()
        );
        assert!(child.try_wait().unwrap().is_some(), "the process is reaped");

        // Nobody answers at that address any more.
        let refused = Client::builder("late")
            .handshake_timeout(Duration::from_secs(2))
            .connect_tcp(addr)
            .await;
        assert!(refused.is_err());
    });
}
