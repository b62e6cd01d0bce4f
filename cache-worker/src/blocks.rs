//! The block transport's server: ReadBlock's bytes beside gRPC, on the gRPC port (the framing
//! is `lakecache_proto::blocks`).
//!
//! The listener's connections are told apart by their first byte: the block transport's
//! preface goes to [`BlockServer::serve`], anything else to tonic, so one port (one Service, one
//! NetworkPolicy rule) serves both. A block connection answers one request at a time exactly as
//! ReadBlock would (the same checks, heartbeats, tiers, errors and metadata), but a Memory tier
//! block that passed its check is handed to the kernel with `sendfile` from its file: no copy in
//! this process, no encoding, no HTTP/2 flow control.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lakecache_proto::blocks::{self, BEAT, FrameKind, HEADER, PREFACE};
use lakecache_proto::lakecache::v1 as pb;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::Status;

use crate::cache::BlockCache;
use crate::metrics::WorkerMetrics;
use crate::server::{self, HEARTBEAT, TokenCheck};
use crate::store::Body;

/// How long a new connection may take to send its first byte (either protocol's clients send
/// their preface at once), and a request's frame to arrive once its first byte did.
const FIRST_BYTES: Duration = Duration::from_secs(10);

/// A block connection with no request for this long is closed; readers keep idle connections
/// for less (see the client's pool).
pub const IDLE: Duration = Duration::from_secs(90);

/// The most one answer may take to leave once the block is ready: a reader that stops reading
/// does not hold the connection's task for ever.
const SEND: Duration = Duration::from_secs(60);

/// The most a heartbeat, a failure frame or the preface may take to leave: a reader that sends
/// requests and never reads the answers does not hold the connection's task for ever.
const SMALL_SEND: Duration = Duration::from_secs(10);

/// How long a stopping worker lets block connections finish the request under way.
const DRAIN: Duration = Duration::from_secs(10);

pub struct BlockServer {
    pub cache: Arc<BlockCache>,
    pub metrics: Arc<WorkerMetrics>,
    pub check: TokenCheck,
}

/// Accepts connections on `listener`: block connections are served here, the others are
/// passed on through the returned channel (tonic's incoming stream). The task ends when
/// `stop` turns true: it stops accepting, lets block connections finish the request they are
/// answering (at most [`DRAIN`]), and closes them.
pub fn accept(
    listener: TcpListener,
    server: Arc<BlockServer>,
    mut stop: watch::Receiver<bool>,
) -> (
    mpsc::Receiver<std::io::Result<TcpStream>>,
    tokio::task::JoinHandle<()>,
) {
    let (grpc, incoming) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            // Out of descriptors and the like: wait a little, then go on.
                            tracing::warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Nagle's algorithm meets delayed ACKs otherwise, and every miss pays 40 ms.
                    let _ = stream.set_nodelay(true);
                    let (grpc, server, stop) = (grpc.clone(), server.clone(), stop.clone());
                    conns.spawn(async move {
                        let mut first = [0u8; 1];
                        match tokio::time::timeout(FIRST_BYTES, stream.peek(&mut first)).await {
                            Ok(Ok(1)) if first[0] == PREFACE[0] => {
                                let _open = Open::new(&server.metrics.block_connections);
                                if let Err(e) = server.serve(stream, stop).await {
                                    tracing::debug!(error = %e, "block connection closed");
                                }
                            }
                            Ok(Ok(n)) if n > 0 => {
                                let _ = grpc.send(Ok(stream)).await;
                            }
                            // Closed, broken or silent: nothing to serve.
                            _ => {}
                        }
                    });
                }
            }
        }
        drop(listener);
        drop(grpc);
        let drained =
            tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = conns.len(),
                "block connections still busy after {DRAIN:?}; closing them"
            );
        }
    });
    (incoming, task)
}

/// Counts a connection open while it lives, however its task ends (aborted included).
struct Open(prometheus_client::metrics::gauge::Gauge);

impl Open {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Open(g.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Writes `bytes` within `limit`.
async fn send(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    tokio::time::timeout(limit, stream.write_all(bytes))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the reader took no bytes for too long",
            ))
        })
}

/// Resolves once the worker stops (or the stop sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl BlockServer {
    /// Serves one block connection until the reader closes it, it idles for [`IDLE`], it
    /// breaks the protocol, or the worker stops (after the request under way).
    pub async fn serve(
        &self,
        mut stream: TcpStream,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut preface = [0u8; PREFACE.len()];
        tokio::time::timeout(FIRST_BYTES, stream.read_exact(&mut preface))
            .await
            .map_err(|_| invalid("no preface"))??;
        if preface != PREFACE {
            return Err(invalid("not the block transport's preface"));
        }
        send(&mut stream, &PREFACE, SMALL_SEND).await?;
        loop {
            let mut header = [0u8; HEADER];
            tokio::select! {
                _ = stopped(&mut stop) => return Ok(()),
                read = tokio::time::timeout(IDLE, stream.read_exact(&mut header)) => match read {
                    Err(_) => return Ok(()),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Ok(r) => { r?; }
                },
            }
            let (kind, len) = blocks::parse_header(header).map_err(|e| invalid(e.to_string()))?;
            if kind != FrameKind::Request {
                return Err(invalid(format!("a {kind:?} frame where a request belongs")));
            }
            let mut payload = vec![0u8; len];
            tokio::time::timeout(FIRST_BYTES, stream.read_exact(&mut payload))
                .await
                .map_err(|_| invalid("a request frame cut short"))??;
            let req = pb::BlockRequest::decode(&payload[..])
                .map_err(|e| invalid(format!("a request that does not decode: {e}")))?;
            self.answer(&mut stream, req).await?;
        }
    }

    /// Answers one request as ReadBlock would: heartbeats until the block is ready (the first
    /// at once unless it is ready at once), then the block or the error.
    async fn answer(&self, stream: &mut TcpStream, req: pb::BlockRequest) -> std::io::Result<()> {
        if !self.check.accepts(Some(&req.authorization)) {
            return fail(stream, TokenCheck::refusal()).await;
        }
        let read = req.read.unwrap_or_default();
        let (key, object_size) = match server::block_request(&read, self.cache.block_size()) {
            Ok(k) => k,
            Err(s) => return fail(stream, s).await,
        };
        let cache = self.cache.clone();
        let cached_only = read.cached_only;
        // Not spawned: a source fetch runs in a task of the cache's own, so a reader that goes
        // away does not cancel it for the others, and a tier read needs nobody else.
        let mut lookup = std::pin::pin!(async move {
            if cached_only {
                Ok(cache.cached_body(&key, object_size, true).await)
            } else {
                cache.get_body(&key, object_size, true).await.map(Some)
            }
        });
        // A Memory tier hit is ready at once and goes out without a heartbeat before it.
        let found = match lookup.as_mut().now_or_never() {
            Some(found) => found,
            None => {
                send(stream, &BEAT, SMALL_SEND).await?;
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        biased;
                        found = lookup.as_mut() => break found,
                        _ = tick.tick() => send(stream, &BEAT, SMALL_SEND).await?,
                    }
                }
            }
        };
        let (body, origin) = match found {
            Ok(Some(found)) => found,
            Ok(None) => return fail(stream, server::not_cached()).await,
            Err(e) => return fail(stream, server::block_status(&e)).await,
        };
        let (start, end) = server::asked_range(body.len() as usize, read.offset, read.length);
        let data = pb::BlockData {
            served_from: server::served(&self.metrics, origin, end - start),
            offset: start as u64,
            length: (end - start) as u64,
        };
        let head = blocks::frame(FrameKind::Data, &data);
        tokio::time::timeout(SEND, async {
            match body {
                Body::Bytes(bytes) => {
                    stream.write_all(&head).await?;
                    stream.write_all(&bytes[start..end]).await
                }
                Body::File { file, .. } => {
                    stream.write_all(&head).await?;
                    send_file(stream, &file, start as i64, end - start).await?;
                    self.metrics.bytes_sendfile.inc_by((end - start) as u64);
                    Ok(())
                }
            }
        })
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the reader took no bytes for too long",
            )
        })?
    }
}

/// Sends a failure frame.
async fn fail(stream: &mut TcpStream, status: Status) -> std::io::Result<()> {
    let failure = pb::BlockFailure::from_status(&status);
    let f = blocks::frame(FrameKind::Failure, &failure);
    send(stream, &f, SMALL_SEND).await
}

/// Sends `len` bytes of `file` from `offset` with `sendfile(2)`: the kernel moves them from the
/// file's pages to the socket.
async fn send_file(
    stream: &TcpStream,
    file: &std::fs::File,
    mut offset: i64,
    mut len: usize,
) -> std::io::Result<()> {
    while len > 0 {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile(stream.as_fd(), file.as_fd(), Some(&mut offset), len)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the block file ended early",
                ));
            }
            Ok(n) => len -= n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
