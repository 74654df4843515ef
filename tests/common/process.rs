//! The `stepstream serve` binary as a child process on 127.0.0.1:0: its first stdout line gives
//! the address. Killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `stepstream serve` process.
pub struct ServeProcess {
    /// The process (tests may signal it or wait for it).
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `stepstream serve --addr 127.0.0.1:0 ARGS...` and waits for its address line.
pub fn spawn_serve<I, S>(args: I) -> ServeProcess
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stepstream serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("stepstream listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    ServeProcess { child, addr }
}
