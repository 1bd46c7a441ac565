//! A TCP proxy that can stop passing bytes, as a hung server or a network partition does (its
//! connections stay open and nothing more goes through, either way, until it thaws), or cut
//! every connection and refuse new ones, as a server that restarts does. For fault tests of what
//! Tollgate does when the apiserver or a database stops answering or goes away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy on a loopback port in front of one address.
#[derive(Debug, Clone)]
pub struct Freezable {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    /// Connections are cut and new ones refused, as while a server restarts.
    down: Arc<AtomicBool>,
    /// Bumped by each cut: connections older than it end.
    cuts: Arc<std::sync::atomic::AtomicU64>,
}

impl Freezable {
    /// Starts a proxy in front of `target` on a free loopback port, passing bytes.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (gate, refusing, epoch) = (frozen.clone(), down.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    drop(client); // as a port nobody listens on: the connection ends at once
                    continue;
                }
                let (gate, epoch) = (gate.clone(), epoch.clone());
                tokio::spawn(async move {
                    thawed(&gate).await;
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let born = epoch.load(Ordering::SeqCst);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let alive = Alive { epoch, born };
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                pass(client_read, server_write, gate.clone()),
                                pass(server_read, client_write, gate),
                            )
                        } => {}
                        () = alive.until_cut() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            frozen,
            down,
            cuts,
        })
    }

    /// As a server that restarts: every connection ends now, and new ones are refused until
    /// [`Freezable::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.fetch_add(1, Ordering::SeqCst);
    }

    /// Connections are taken again, as once the server is back.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on nothing passes, and new connections are held unanswered.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Bytes pass again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

/// A connection's life: it ends at the first cut after it was made.
struct Alive {
    epoch: Arc<std::sync::atomic::AtomicU64>,
    born: u64,
}

impl Alive {
    async fn until_cut(&self) {
        while self.epoch.load(Ordering::SeqCst) == self.born {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn thawed(frozen: &AtomicBool) {
    while frozen.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Copies `from` to `to`, holding what it read while frozen.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        thawed(&frozen).await;
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        thawed(&frozen).await;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
