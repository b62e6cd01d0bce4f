//! The block transport's client: block reads beside gRPC, on a pool of plain TCP connections
//! to each worker (the framing is `lakecache_proto::blocks`).
//!
//! A block read sends one request frame and reads the worker's answer: heartbeats while the
//! block is not ready, then its bytes, received straight into the one buffer the block is kept
//! in (no chunks to join, no decoder), or a failure frame that carries the status ReadBlock
//! would have failed with. The reader treats both transports alike (deadlines, hedges, failover,
//! token rotation); [`crate::reader`] picks this one when the worker speaks it.
//!
//! Connections are kept for reuse, at most [`KEEP_IDLE`] per worker for at most [`IDLE_FOR`]
//! (the worker closes them after longer). A kept connection the worker closed meanwhile (a
//! restart, its idle limit) fails at the first write or read: the request is then sent once
//! more on a new connection. A worker that answers the preface with anything else (one older
//! than the transport, which answers with HTTP/2) is read over gRPC for [`RETRY_AFTER`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lakecache_proto::blocks::{self, FrameKind, HEADER, PREFACE};
use lakecache_proto::lakecache::v1 as pb;
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Status;

/// Idle connections kept per worker.
pub const KEEP_IDLE: usize = 32;

/// How long an idle connection is kept (the worker closes them after 90 s).
pub const IDLE_FOR: Duration = Duration::from_secs(60);

/// How long a worker that does not speak the transport is read over gRPC before it is asked
/// again (it may be upgraded in place).
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The longest a worker may stay silent once it took a request: it sends a heartbeat every
/// 50 ms until the block is ready, then the bytes at once. A worker silent for longer (a stopped
/// process, a partition, a vanished host: the kernel may still keep the connection up) fails
/// the read as its fault, as HTTP/2 keepalive (1 s ping, 2 s timeout) fails a gRPC stream.
pub const SILENCE: Duration = Duration::from_secs(3);

/// The block connections to one worker.
#[derive(Debug)]
pub struct BlockPool {
    /// `host:port`.
    addr: String,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    /// Milliseconds since `epoch` until which the worker is read over gRPC (0: never was).
    grpc_until: AtomicU64,
    epoch: Instant,
}

/// Why a block read did not start on this transport.
#[derive(Debug)]
pub enum StartError {
    /// The worker does not speak it: read over gRPC.
    Unsupported,
    /// What a ReadBlock call would have failed with (transport errors are `Unavailable`).
    Status(Status),
}

/// What the worker sent.
#[derive(Debug)]
pub enum Event {
    /// Alive and at work on the block.
    Beat,
    /// The bytes follow; read them with [`BlockStream::body`].
    Data(pb::BlockData),
}

impl BlockPool {
    /// A pool for a worker at `endpoint` (`http://host:port`); `None` for other schemes.
    pub fn for_endpoint(endpoint: &str) -> Option<Self> {
        let rest = endpoint.strip_prefix("http://")?;
        let addr = rest.split('/').next().unwrap_or_default();
        // `host:port` or `[v6]:port`; without a port, gRPC's default applies: use gRPC.
        let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        if addr.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            addr: addr.to_string(),
            idle: Mutex::new(Vec::new()),
            grpc_until: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether to read this worker over the block transport now.
    pub fn supported(&self) -> bool {
        let until = self.grpc_until.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock();
        while let Some((s, since)) = idle.pop() {
            if since.elapsed() < IDLE_FOR {
                return Some(s);
            }
        }
        None
    }

    fn give_back(&self, stream: TcpStream) {
        let mut idle = self.idle.lock();
        idle.retain(|(_, since)| since.elapsed() < IDLE_FOR);
        if idle.len() < KEEP_IDLE {
            idle.push((stream, Instant::now()));
        }
    }

    /// Makes sure a connection that speaks the transport is ready: a kept one, or a new one
    /// whose worker answered the preface. `Ok(false)`: the worker does not speak it (read it
    /// over gRPC). Asked before a request is made, so that a worker that does not speak the
    /// transport never counts as having taken or refused a token (see `Membership::call`).
    pub async fn ready(&self) -> Result<bool, Status> {
        if !self.idle.lock().is_empty() {
            return Ok(true);
        }
        match self.connect().await {
            Ok(s) => {
                self.give_back(s);
                Ok(true)
            }
            Err(StartError::Unsupported) => Ok(false),
            Err(StartError::Status(s)) => Err(s),
        }
    }

    /// Idle connections kept now (tests).
    pub fn idle(&self) -> usize {
        self.idle.lock().len()
    }

    async fn connect(&self) -> Result<TcpStream, StartError> {
        let io = |e: std::io::Error| StartError::Status(self.unavailable(&e));
        let mut s = TcpStream::connect(&self.addr).await.map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        s.write_all(&PREFACE).await.map_err(io)?;
        let mut back = [0u8; PREFACE.len()];
        within(s.read_exact(&mut back)).await.map_err(io)?;
        if back != PREFACE {
            tracing::info!(worker = %self.addr,
                "the worker does not speak the block transport; reading it over gRPC");
            self.grpc_until.store(
                self.now_ms() + RETRY_AFTER.as_millis() as u64,
                Ordering::Relaxed,
            );
            return Err(StartError::Unsupported);
        }
        Ok(s)
    }

    fn unavailable(&self, e: &std::io::Error) -> Status {
        Status::unavailable(format!("block transport to {}: {e}", self.addr))
    }

    /// Sends a request and reads the worker's first answer (a heartbeat, or the data frame of
    /// a block that was ready at once). A failure frame is `Err(StartError::Status)`.
    pub async fn start(
        self: &Arc<Self>,
        authorization: String,
        read: pb::ReadBlockRequest,
    ) -> Result<(BlockStream, Event), StartError> {
        let frame = blocks::frame(
            FrameKind::Request,
            &pb::BlockRequest {
                authorization,
                read: Some(read),
            },
        );
        if frame.len() > HEADER + blocks::MAX_FRAME {
            return Err(StartError::Status(Status::invalid_argument(format!(
                "a block request of {} bytes (a path that long?); the block transport takes {}",
                frame.len() - HEADER,
                blocks::MAX_FRAME
            ))));
        }
        // A kept connection may have been closed by the worker meanwhile: then once more on a
        // new one. A new connection's failure is the worker's.
        if let Some(stream) = self.take_idle() {
            let mut call = BlockStream {
                stream: Some(stream),
                pool: self.clone(),
            };
            match call.send_and_wait(&frame).await {
                Ok(first) => return Ok((call, first)),
                Err(Answer::Status(s)) => return Err(StartError::Status(s)),
                Err(Answer::Io(e)) if closed(&e) => {
                    tracing::debug!(worker = %self.addr, error = %e,
                        "a kept block connection was closed; trying a new one");
                }
                Err(Answer::Io(e)) => return Err(StartError::Status(self.unavailable(&e))),
            }
        }
        let stream = self.connect().await?;
        let mut call = BlockStream {
            stream: Some(stream),
            pool: self.clone(),
        };
        match call.send_and_wait(&frame).await {
            Ok(first) => Ok((call, first)),
            Err(Answer::Status(s)) => Err(StartError::Status(s)),
            Err(Answer::Io(e)) => Err(StartError::Status(self.unavailable(&e))),
        }
    }
}

/// A failure frame's status, or the connection's own failure.
enum Answer {
    Status(Status),
    Io(std::io::Error),
}

/// Whether an error says the peer closed the connection (what a kept connection the worker
/// closed meanwhile shows at its next use), not that it is silent or broken otherwise.
fn closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// `io` within [`SILENCE`]; past it, a `TimedOut` error.
async fn within<T>(
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(SILENCE, io).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the worker was silent for {SILENCE:?}"),
        ))
    })
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// One block read under way on one connection. Dropped before its answer is read whole, the
/// connection is closed (its state is unknown); read whole, it goes back to the pool.
#[derive(Debug)]
pub struct BlockStream {
    stream: Option<TcpStream>,
    pool: Arc<BlockPool>,
}

impl BlockStream {
    async fn send_and_wait(&mut self, frame: &[u8]) -> Result<Event, Answer> {
        let stream = self.stream.as_mut().expect("open until done");
        stream.write_all(frame).await.map_err(Answer::Io)?;
        self.event().await
    }

    async fn event(&mut self) -> Result<Event, Answer> {
        let stream = self.stream.as_mut().expect("open until done");
        let mut header = [0u8; HEADER];
        within(stream.read_exact(&mut header))
            .await
            .map_err(Answer::Io)?;
        let (kind, len) =
            blocks::parse_header(header).map_err(|e| Answer::Io(invalid(e.to_string())))?;
        let mut payload = vec![0u8; len];
        within(stream.read_exact(&mut payload))
            .await
            .map_err(Answer::Io)?;
        match kind {
            FrameKind::Beat => Ok(Event::Beat),
            FrameKind::Data => pb::BlockData::decode(&payload[..])
                .map(Event::Data)
                .map_err(|e| {
                    Answer::Io(invalid(format!("a data frame that does not decode: {e}")))
                }),
            FrameKind::Failure => {
                let failure = pb::BlockFailure::decode(&payload[..]).map_err(|e| {
                    Answer::Io(invalid(format!(
                        "a failure frame that does not decode: {e}"
                    )))
                })?;
                // The answer is whole: the connection takes the next request.
                self.done();
                Err(Answer::Status(failure.into_status()))
            }
            FrameKind::Request => Err(Answer::Io(invalid("a request frame from the worker"))),
        }
    }

    /// The next event after a heartbeat.
    pub async fn next(&mut self) -> Result<Event, Status> {
        if self.stream.is_none() {
            return Err(Status::internal("block read already answered"));
        }
        self.event().await.map_err(|a| match a {
            Answer::Status(s) => s,
            Answer::Io(e) => self.pool.unavailable(&e),
        })
    }

    /// The `len` bytes after a data frame, in one buffer; `progress` is called as they come.
    /// The connection then goes back to the pool.
    pub async fn body(&mut self, len: usize, mut progress: impl FnMut()) -> Result<Bytes, Status> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| Status::internal("block read already answered"))?;
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            // `read_buf` fills the spare capacity; `take` keeps it to this body's bytes.
            let want = len - buf.len();
            let n = within((&mut *stream).take(want as u64).read_buf(&mut buf))
                .await
                .map_err(|e| self.pool.unavailable(&e))?;
            if n == 0 {
                return Err(self.pool.unavailable(&std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the worker closed the connection after {} of {len} bytes",
                        buf.len()
                    ),
                )));
            }
            progress();
        }
        self.done();
        Ok(buf.freeze())
    }

    fn done(&mut self) {
        if let Some(s) = self.stream.take() {
            self.pool.give_back(s);
        }
    }
}
