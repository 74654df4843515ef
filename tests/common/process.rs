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
    spawn_serve_on("127.0.0.1:0", args)
}

/// Starts `stepstream serve --addr ADDR ARGS...` (a fixed port, for a replica that a balancer
/// knows by address and that restarts on it) and waits for its address line.
pub fn spawn_serve_on<I, S>(addr: &str, args: I) -> ServeProcess
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["serve", "--addr", addr])
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

/// A port on 127.0.0.1 that is free now, for a process that must be told its port (and keep
/// it across restarts). Chosen below Linux's ephemeral range (32768+), so that no outgoing
/// connection (a balancer's, a health checker's) can take it between choice and bind, and
/// never the same twice in one test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start at a point that differs between test processes, then walk.
    let base = 20_000 + (std::process::id() % 600) * 20;
    loop {
        let port = (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000 + 20_000;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// `GET path` over HTTP/1.1 (one request, then close) on `addr` (metrics, Envoy's admin): the
/// body, or why there is none.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let fail = |what: &str, e: std::io::Error| format!("GET {addr}{path}: {what}: {e}");
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| fail("connect", e))?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| fail("timeout", e))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    sock.write_all(request.as_bytes())
        .map_err(|e| fail("write", e))?;
    let mut out = Vec::new();
    sock.read_to_end(&mut out).map_err(|e| fail("read", e))?;
    let out = String::from_utf8_lossy(&out);
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.to_string()),
        None => Err(format!("GET {addr}{path}: no HTTP response: {out:?}")),
    }
}
