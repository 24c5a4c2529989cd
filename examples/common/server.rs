//! The `server` example started as a child process, for the programs that measure it
//! from the outside (`idle`, `peers`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The `server` example running as a child process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the `server` example found beside this program, on a free port, and reads
/// the address it prints.
pub fn start_server() -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let path = exe.with_file_name("server");
    if !path.exists() {
        return Err(format!(
            "no server example at {}; build it with `cargo build --release --example server`",
            path.display()
        ));
    }
    let mut child = Command::new(&path)
        .args(["--listen", "127.0.0.1:0", "--ws", "off"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        return Err("the server's stdout is not piped".into());
    };
    let mut server = Server {
        child,
        addr: String::new(),
    };

    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    let Some(addr) = first.strip_prefix("switchboard: listening tcp=") else {
        return Err(format!("the server said {first:?} instead of its address"));
    };
    server.addr = addr.trim().to_string();

    // The server prints its counters now and then; a full pipe would stop it.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(server)
}
