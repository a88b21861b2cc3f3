//! A TCP fault proxy: forwards listening ports to targets, and on command adds latency,
//! black-holes traffic (stalls it: nothing is forwarded, connections stay open, as in a
//! network partition; what was sent is delivered after the heal, as TCP would), or resets
//! every connection (and refuses new ones with a reset while the mode lasts).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward as is.
    Pass,
    /// Delay every chunk by this long, in each direction.
    Latency(Duration),
    /// Forward nothing until the mode changes.
    BlackHole,
    /// Reset every connection, refuse new ones with a reset.
    Reset,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        let mut words = s.split_whitespace();
        match (words.next(), words.next()) {
            (Some("pass" | "heal"), None) => Ok(Mode::Pass),
            (Some("blackhole"), None) => Ok(Mode::BlackHole),
            (Some("reset"), None) => Ok(Mode::Reset),
            (Some("latency"), Some(ms)) => ms
                .parse()
                .map(|ms| Mode::Latency(Duration::from_millis(ms)))
                .map_err(|_| format!("latency wants milliseconds, got {ms:?}")),
            _ => Err(format!(
                "unknown proxy command {s:?} (pass|heal, latency MS, blackhole, reset)"
            )),
        }
    }
}

/// A running proxy: change its mode with [`Proxy::set`].
#[derive(Clone)]
pub struct Proxy {
    mode: Arc<watch::Sender<Mode>>,
}

impl Proxy {
    /// A proxy in [`Mode::Pass`] with no listeners yet.
    pub fn new() -> Proxy {
        Proxy {
            mode: Arc::new(watch::channel(Mode::Pass).0),
        }
    }

    /// Sets the mode for every listener and connection.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Listens on an ephemeral loopback port forwarding to `target`; returns the port.
    pub async fn listen(&self, target: SocketAddr) -> std::io::Result<u16> {
        self.listen_on("127.0.0.1:0".parse().expect("address"), target)
            .await
    }

    /// Listens on `addr` forwarding to `target`; returns the port.
    pub async fn listen_on(&self, addr: SocketAddr, target: SocketAddr) -> std::io::Result<u16> {
        let listener = TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let mode = self.mode.subscribe();
        tokio::spawn(accept(listener, target, mode));
        Ok(port)
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new()
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<Mode>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if *mode.borrow() == Mode::Reset {
            reset(client);
            continue;
        }
        let mode = mode.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                reset(client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            connection(client, server, mode).await;
        });
    }
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Pumps both directions until either side closes or a reset comes. Both sockets carry a
/// zero linger, so dropping them on a reset sends RST to each side.
async fn connection(client: TcpStream, server: TcpStream, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut up = tokio::spawn(pump(cr, sw, mode.clone()));
    let mut down = tokio::spawn(pump(sr, cw, mode.clone()));
    tokio::select! {
        _ = mode.wait_for(|m| *m == Mode::Reset) => {}
        _ = &mut up => {}
        _ = &mut down => {}
    }
    up.abort();
    down.abort();
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // a black hole stalls before reading: the sender's buffers fill, nothing is lost
        let _ = mode.wait_for(|m| *m != Mode::BlackHole).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let current = *mode.borrow();
        match current {
            Mode::Latency(d) => tokio::time::sleep(d).await,
            Mode::BlackHole => {
                let _ = mode.wait_for(|m| *m != Mode::BlackHole).await;
            }
            Mode::Pass | Mode::Reset => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on an ephemeral port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn ping(s: &mut TcpStream) -> std::io::Result<()> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }

    #[tokio::test]
    async fn latency_black_hole_and_reset() {
        let proxy = Proxy::new();
        let port = proxy.listen(echo().await).await.unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        ping(&mut s).await.unwrap();

        proxy.set(Mode::Latency(Duration::from_millis(100)));
        let t = std::time::Instant::now();
        ping(&mut s).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );

        proxy.set(Mode::BlackHole);
        let stalled = tokio::time::timeout(Duration::from_millis(300), ping(&mut s)).await;
        assert!(stalled.is_err(), "a black hole forwards nothing");
        proxy.set(Mode::Pass);
        // what was sent in the black hole arrives after the heal
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        proxy.set(Mode::Reset);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the connection was reset: {read:?}"
        );
        let mut again = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert!(
            ping(&mut again).await.is_err(),
            "new connections are refused while resetting"
        );
        proxy.set(Mode::Pass);
        let mut healed = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        ping(&mut healed).await.unwrap();
    }
}
