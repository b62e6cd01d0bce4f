//! A TCP proxy that can black-hole traffic: while `blackhole` is on, new connections are
//! accepted but never answered, and bytes on existing ones stop flowing. That is what a lake
//! behind a broken network looks like: no error, only silence. While `down` is on, it is a
//! server that died instead: every connection, old or new, is closed at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub port: u16,
    host: String,
    blackhole: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on loopback to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1", ("127.0.0.1", upstream)).await
    }

    /// A proxy listening on `host` (the cluster's [`crate::Cluster::host_ip`], so that pods
    /// of a real node reach it) to `upstream` (`(host, port)`, e.g. an [`crate::S3Server`]
    /// started on the same address).
    pub async fn start_on(host: &str, upstream: (&str, u16)) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((host, 0)).await?;
        let port = listener.local_addr()?.port();
        let upstream = (upstream.0.to_string(), upstream.1);
        let blackhole = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        let dn = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let bh = bh.clone();
                let dn = dn.clone();
                let upstream = upstream.clone();
                if dn.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    if bh.load(Ordering::SeqCst) {
                        // Hold the connection open and silent (for at most 600 s), until the
                        // upstream is made to look dead: then it is closed like the others.
                        for _ in 0..12_000 {
                            if dn.load(Ordering::SeqCst) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        drop(client);
                        return;
                    }
                    let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let a = tokio::spawn(pump(cr, sw, bh.clone(), dn.clone()));
                    let b = tokio::spawn(pump(sr, cw, bh, dn));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Ok(Self {
            port,
            host: host.to_string(),
            blackhole,
            down,
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, the upstream looks dead: connections are closed as they come, and open ones
    /// are closed at their next byte or within 50 ms, those held silent by the black hole too.
    pub fn set_down(&self, on: bool) {
        self.down.store(on, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bh: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let read = tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf));
        let n = match read.await {
            Err(_) if down.load(Ordering::SeqCst) => return,
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if down.load(Ordering::SeqCst) {
            return;
        }
        while bh.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
