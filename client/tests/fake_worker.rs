//! The reader against fake workers, for what a real worker cannot be made to do: stream more
//! bytes for a block than the block holds. Such a worker fails the call as its own fault after
//! at most a block's bytes (and one message) are received, never filling memory; the reader
//! reads the block from the next worker.

use lakecache_e2e::kit::{self, pattern};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lakecache_client::{Member, Reader, ReaderConfig};
use lakecache_lake::{Kind, ObjectMeta};
use lakecache_proto::lakecache::v1 as pb;
use lakecache_proto::lakecache::v1::cache_worker_server::{CacheWorker, CacheWorkerServer};
use tonic::{Request, Response, Status};

const BLOCK: u64 = 1 << 20;

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::Chunk, Status>> + Send>>;

/// A worker that either answers honestly (the block's bytes of `pattern(index)`) or, greedy,
/// streams 256 KiB chunks without end.
struct Fake {
    greedy: bool,
    calls: Arc<AtomicUsize>,
    /// Bytes the greedy stream produced (handed to the transport).
    produced: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl CacheWorker for Fake {
    type ReadBlockStream = Chunks;
    type ListPagesStream = Pin<Box<dyn Stream<Item = Result<pb::ListResponse, Status>> + Send>>;
    type WatchPreloadStream = Pin<Box<dyn Stream<Item = Result<pb::PreloadStatus, Status>> + Send>>;

    async fn read_block(
        &self,
        req: Request<pb::ReadBlockRequest>,
    ) -> Result<Response<Chunks>, Status> {
        self.calls.fetch_add(1, Ordering::AcqRel);
        let key = req.into_inner().key.unwrap_or_default();
        let first = pb::Chunk {
            offset: 0,
            data: Bytes::new(),
            served_from: pb::Tier::Memory as i32,
        };
        if self.greedy {
            let produced = self.produced.clone();
            let chunk = Bytes::from(vec![7u8; 256 << 10]);
            let endless = futures::stream::repeat_with(move || {
                produced.fetch_add(chunk.len() as u64, Ordering::AcqRel);
                Ok(pb::Chunk {
                    offset: 0,
                    data: chunk.clone(),
                    served_from: 0,
                })
            });
            let s = futures::stream::iter([Ok(first)]).chain(endless);
            return Ok(Response::new(Box::pin(s)));
        }
        let data = Bytes::from(pattern(key.index, BLOCK as usize));
        let chunks: Vec<Result<pb::Chunk, Status>> = std::iter::once(Ok(first))
            .chain((0..4).map(|i| {
                let n = BLOCK as usize / 4;
                Ok(pb::Chunk {
                    offset: (i * n) as u64,
                    data: data.slice(i * n..(i + 1) * n),
                    served_from: 0,
                })
            }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn stat(
        &self,
        _: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_pages(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<Self::ListPagesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn start_preload(
        &self,
        _: Request<pb::StartPreloadRequest>,
    ) -> Result<Response<pb::PreloadStatus>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn watch_preload(
        &self,
        _: Request<pb::WatchPreloadRequest>,
    ) -> Result<Response<Self::WatchPreloadStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_preload(
        &self,
        _: Request<pb::CancelPreloadRequest>,
    ) -> Result<Response<pb::PreloadStatus>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        Ok(Response::new(pb::WorkerInfo {
            block_size: BLOCK,
            ..Default::default()
        }))
    }
}

struct Started {
    member: Member,
    calls: Arc<AtomicUsize>,
    produced: Arc<AtomicU64>,
}

async fn start(id: &str, greedy: bool) -> Started {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let produced = Arc::new(AtomicU64::new(0));
    let fake = Fake {
        greedy,
        calls: calls.clone(),
        produced: produced.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CacheWorkerServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Started {
        member: Member {
            id: id.into(),
            endpoint: format!("http://{addr}"),
        },
        calls,
        produced,
    }
}

fn reader(members: Vec<Member>) -> Reader {
    let m = kit::membership(members, None);
    let cfg = ReaderConfig {
        block_size: BLOCK,
        worker_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(20),
        metadata_ttl: None,
        direct_fallback: false,
    };
    Reader::new(cfg, m, None)
}

fn meta(blocks: u64) -> ObjectMeta {
    ObjectMeta {
        kind: Kind::File,
        size: blocks * BLOCK,
        version: "v1".into(),
        modified: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_streams_more_than_a_block_fails_the_call_at_once() {
    let greedy = start("greedy", true).await;
    let r = reader(vec![greedy.member.clone()]);
    let started = Instant::now();
    let e = r.block("f", &meta(1), 0).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the read waited {took:?} on an endless block"
    );
    assert!(e.to_string().contains("no worker answered"), "{e}");
    // The worker was cut off: what it produced stops growing, within the transport's windows
    // (8 MiB per stream) of the block's 1 MiB.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let produced = greedy.produced.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(greedy.produced.load(Ordering::Acquire), produced);
    assert!(produced < 48 << 20, "produced {produced} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_a_greedy_worker_owns_are_read_from_the_next_worker() {
    let greedy = start("greedy", true).await;
    let honest = start("honest", false).await;
    let r = reader(vec![greedy.member.clone(), honest.member.clone()]);
    let m = meta(16);
    for i in 0..16 {
        let got = r.block("f", &m, i).await.unwrap();
        assert!(got == pattern(i, BLOCK as usize), "block {i} differs");
    }
    assert!(
        greedy.calls.load(Ordering::Acquire) > 0,
        "the greedy worker owned no block; the test proves nothing"
    );
    // Its refusals count against it: it is ejected, as a worker at fault.
    assert!(r.metrics.ejections.get() >= 1 || r.metrics.failovers.get() >= 1);
    assert!(honest.calls.load(Ordering::Acquire) >= 16 - greedy.calls.load(Ordering::Acquire));
    // These gRPC-only workers answer the block transport's preface with HTTP/2: every block
    // came over gRPC, and none was lost to the attempt.
    let by = |transport| {
        r.metrics
            .worker_reads
            .get_or_create(&lakecache_client::metrics::TransportLabel { transport })
            .get()
    };
    assert_eq!(by("blocks"), 0);
    assert!(by("grpc") >= 16, "{} blocks over gRPC", by("grpc"));
}

/// Workers that all restart at new addresses (a rolling update of their StatefulSet) are
/// briefly all unreachable. With a worker wait (what the FUSE server sets), a read waits for
/// the member list to change and reads from the new address; without one, it fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_for_the_workers_to_come_back_when_told_to() {
    let gone = Member {
        id: "w0".into(),
        endpoint: format!("http://127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        }),
    };
    let r = reader(vec![gone.clone()]);
    let started = Instant::now();
    let e = r.block("f", &meta(1), 0).await.unwrap_err();
    assert!(e.to_string().contains("no worker answered"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let back = start("w0", false).await;
    let r = reader(vec![gone]);
    r.membership().wait_for_workers(Duration::from_secs(10));
    let m = r.membership().clone();
    let member = back.member.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        m.set(vec![member]).unwrap();
    });
    let started = Instant::now();
    let got = r.block("f", &meta(1), 0).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(got.len() as u64, BLOCK);
    assert_eq!(back.calls.load(Ordering::Acquire), 1);

    // The wait is bounded: with nobody coming back, the read fails once it is over.
    let r = reader(vec![Member {
        id: "w9".into(),
        endpoint: "http://127.0.0.1:1".into(),
    }]);
    r.membership().wait_for_workers(Duration::from_millis(700));
    let started = Instant::now();
    let e = r.block("f", &meta(1), 0).await.unwrap_err();
    let took = started.elapsed();
    assert!(e.to_string().contains("no worker answered"), "{e}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
