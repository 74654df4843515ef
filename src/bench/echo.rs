//! A raw TCP echo on loopback: the floor that one callback round trip is compared with (G3).

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{median, BenchError};

/// Timed round trips of the echo in the report.
pub const ECHO_ROUND_TRIPS: usize = 200;
/// Untimed round trips before the timed ones.
pub const ECHO_WARMUP: usize = 20;

/// Median milliseconds for a client to write `bytes` bytes to an in-process echo server on
/// 127.0.0.1 and read them all back, over `round_trips` round trips after `warmup` untimed ones.
///
/// TCP_NODELAY is set at both ends, as the gRPC server and client set it. The server reads the
/// whole message before writing it back, as a callback client reads a whole `StepEnd` before
/// replying; the client checks that the bytes came back unchanged.
pub async fn tcp_echo_ms(
    bytes: usize,
    warmup: usize,
    round_trips: usize,
) -> Result<f64, BenchError> {
    if bytes == 0 || round_trips == 0 {
        return Err(BenchError::Setup(
            "a TCP echo needs at least one byte and one round trip".into(),
        ));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(echo_server(listener, bytes, warmup + round_trips));
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let sent: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; bytes];
    let mut times = Vec::with_capacity(round_trips);
    for i in 0..warmup + round_trips {
        let t0 = Instant::now();
        stream.write_all(&sent).await?;
        stream.read_exact(&mut back).await?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    if back != sent {
        return Err(BenchError::Setup("the TCP echo came back changed".into()));
    }
    server
        .await
        .map_err(|e| BenchError::Setup(format!("echo server: {e}")))??;
    Ok(median(times))
}

/// Accepts one connection and echoes `round_trips` messages of `bytes` bytes, each read whole
/// before it is written back.
async fn echo_server(
    listener: TcpListener,
    bytes: usize,
    round_trips: usize,
) -> Result<(), BenchError> {
    let (mut stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; bytes];
    for _ in 0..round_trips {
        stream.read_exact(&mut buf).await?;
        stream.write_all(&buf).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_latents_sized_messages_and_times_them() {
        for bytes in [1, 4 * 64 * 64 * 2, 4 * 64 * 64 * 4] {
            let ms = tcp_echo_ms(bytes, 2, 15).await.unwrap();
            assert!(ms.is_finite() && ms > 0.0, "{bytes} bytes: {ms} ms");
            assert!(ms < 1000.0, "a loopback echo of {bytes} bytes took {ms} ms");
        }
    }

    #[tokio::test]
    async fn refuses_an_empty_echo() {
        assert!(tcp_echo_ms(0, 0, 10).await.is_err());
        assert!(tcp_echo_ms(16, 0, 0).await.is_err());
    }
}
