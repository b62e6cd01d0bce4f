//! The block transport between a reader and real workers: blocks come over it (Memory tier
//! blocks with `sendfile`) and match what gRPC serves; turned off, gRPC serves them; a kept
//! connection the worker closed is replaced without a failover; a worker that accepts and never
//! answers, and one that refuses, cost a bounded stall and no failed read.

use lakecache_e2e::kit::{self, pattern};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use lakecache_client::fs::ROOT_INO;
use lakecache_client::metrics::TransportLabel;
use lakecache_client::{FsConfig, FsCore, Member, Reader, ReaderConfig};
use lakecache_lake::SourceSpec;
use lakecache_worker::Worker;
use lakecache_worker::config::WorkerConfig;
use lakecache_worker::store::TierKind;

const BS: u64 = 256 << 10;
const BIG: usize = (BS * 12 + 1234) as usize;

struct Lake {
    dir: tempfile::TempDir,
    tiers: Vec<tempfile::TempDir>,
    workers: Vec<Option<Worker>>,
}

/// Worker `w<i>` with a Memory tier in `tier` (a plain directory stands in for the tmpfs).
fn config(i: usize, lake: &std::path::Path, tier: &std::path::Path) -> WorkerConfig {
    let source = SourceSpec::new(format!("file://{}", lake.display()));
    WorkerConfig {
        tiers: vec![kit::tier(TierKind::Memory, tier, ByteSize::mib(64))],
        token: Some("secret".into()),
        ..kit::worker_config(i, source, BS)
    }
}

async fn lake(n: usize) -> Lake {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.rec"), pattern(7, BIG)).unwrap();
    std::fs::write(dir.path().join("small.jpg"), pattern(8, 5000)).unwrap();
    let mut tiers = Vec::new();
    let mut workers = Vec::new();
    for i in 0..n {
        let t = tempfile::tempdir().unwrap();
        workers.push(Some(
            Worker::start(config(i, dir.path(), t.path()))
                .await
                .unwrap(),
        ));
        tiers.push(t);
    }
    Lake {
        dir,
        tiers,
        workers,
    }
}

fn members(l: &Lake) -> Vec<Member> {
    l.workers.iter().flatten().map(kit::member).collect()
}

fn reader(members: Vec<Member>, block_transport: bool) -> Arc<Reader> {
    let m = kit::membership(members, Some("secret"));
    m.set_block_transport(block_transport);
    let cfg = ReaderConfig {
        block_size: BS,
        worker_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(10),
        metadata_ttl: None,
        direct_fallback: false,
    };
    Arc::new(Reader::new(cfg, m, None))
}

/// Reads `name` whole through a new filesystem core (no blocks kept from before).
async fn read(r: &Arc<Reader>, name: &str) -> Vec<u8> {
    let fs = FsCore::new(r.clone(), FsConfig::default());
    let node = fs.lookup(ROOT_INO, name).await.unwrap();
    let fh = fs.open(node.ino).await.unwrap();
    let mut out = Vec::new();
    loop {
        let b = fs.read(fh, out.len() as u64, 100_000).await.unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(fh);
    out
}

fn reads(r: &Reader, transport: &'static str) -> u64 {
    r.metrics
        .worker_reads
        .get_or_create(&TransportLabel { transport })
        .get()
}

fn sendfile_bytes(l: &Lake) -> u64 {
    l.workers
        .iter()
        .flatten()
        .map(|w| w.metrics.bytes_sendfile.get())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_blocks_come_over_the_block_transport_from_tier_files() {
    let l = lake(2).await;
    let r = reader(members(&l), true);
    // Cold: from the lake, sent from memory.
    assert!(
        read(&r, "big.rec").await == pattern(7, BIG),
        "cold bytes differ"
    );
    assert_eq!(read(&r, "small.jpg").await, pattern(8, 5000));
    assert_eq!(
        sendfile_bytes(&l),
        0,
        "cold blocks are not in a tier file yet"
    );
    // Warm: every block from a Memory tier file, handed to the kernel.
    assert!(
        read(&r, "big.rec").await == pattern(7, BIG),
        "warm bytes differ"
    );
    assert_eq!(read(&r, "small.jpg").await, pattern(8, 5000));
    // (A hedge may ask another worker too, so these are lower bounds.)
    assert!(
        sendfile_bytes(&l) >= (BIG + 5000) as u64,
        "warm bytes not sent from tier files: {}",
        sendfile_bytes(&l)
    );
    assert_eq!(reads(&r, "grpc"), 0, "a block came over gRPC");
    assert!(reads(&r, "blocks") >= 2 * (13 + 1));
    // Connections are kept for the next reads.
    let kept: usize = r
        .membership()
        .snapshot()
        .iter()
        .map(|c| c.blocks.as_ref().unwrap().idle())
        .sum();
    assert!(kept >= 1, "no connection kept");
    let open: i64 = l
        .workers
        .iter()
        .flatten()
        .map(|w| w.metrics.block_connections.get())
        .sum();
    assert!(open >= 1, "the workers count no block connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turned_off_every_block_comes_over_grpc() {
    let l = lake(2).await;
    let r = reader(members(&l), false);
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    assert_eq!(reads(&r, "blocks"), 0);
    assert!(reads(&r, "grpc") >= 2 * 13);
    assert_eq!(sendfile_bytes(&l), 0);
}

/// The worker restarts on the same address while the reader keeps a connection to it: the
/// next read finds the kept connection closed and sends its request on a new one, with no
/// failover and nothing read from another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_worker_closed_is_replaced_without_a_failover() {
    let mut l = lake(1).await;
    let r = reader(members(&l), true);
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    let pool = r.membership().snapshot()[0].blocks.clone().unwrap();
    assert!(pool.idle() >= 1);
    let old = l.workers[0].take().unwrap();
    let mut cfg = config(0, l.dir.path(), l.tiers[0].path());
    cfg.listen = old.addr;
    old.stop().await;
    l.workers[0] = Some(Worker::start(cfg).await.unwrap());
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    assert_eq!(r.metrics.failovers.get(), 0, "a read failed over");
    assert_eq!(reads(&r, "grpc"), 0);
    // It kept its tier: its first read of each block after the restart checks the block
    // (reads it), later ones send the file.
    let w = l.workers[0].as_ref().unwrap();
    let memory = w
        .metrics
        .bytes_served
        .get_or_create(&w.metrics.tier("memory"));
    assert_eq!(
        memory.get(),
        BIG as u64,
        "the restarted worker lost its tier"
    );
    assert_eq!(
        w.metrics.bytes_sendfile.get(),
        0,
        "an unchecked block was sent"
    );
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    assert_eq!(w.metrics.bytes_sendfile.get(), BIG as u64);
}

/// A "worker" that accepts connections and never answers (a hung process, a black hole), as
/// the first owner of every block, beside a real worker: every read succeeds, within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_accepts_and_never_answers_costs_a_bounded_stall() {
    let l = lake(1).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = held.clone();
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            h.lock().push(s);
        }
    });
    let mut m = members(&l);
    m.push(Member {
        id: "silent".into(),
        endpoint: format!("http://{silent_addr}"),
    });
    let r = reader(m, true);
    let started = Instant::now();
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    let took = started.elapsed();
    eprintln!(
        "13 blocks with a silent worker among 2: {took:.2?}, {} failovers, {} hedges",
        r.metrics.failovers.get(),
        r.metrics.hedges.get()
    );
    assert!(!held.lock().is_empty(), "the silent worker was never asked");
    assert!(
        took < Duration::from_secs(8),
        "a silent worker stalled the file for {took:?}"
    );
    assert!(r.metrics.failovers.get() + r.metrics.hedges.get() > 0);
    accept.abort();
}

/// A worker whose port refuses connections (a dead process): reads go to the next owner at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_refuses_costs_a_failover() {
    let l = lake(1).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let mut m = members(&l);
    m.push(Member {
        id: "dead".into(),
        endpoint: format!("http://{closed_addr}"),
    });
    let r = reader(m, true);
    let started = Instant::now();
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    let took = started.elapsed();
    eprintln!(
        "13 blocks with a dead worker among 2: {took:.2?}, {} failovers",
        r.metrics.failovers.get()
    );
    assert!(
        r.metrics.failovers.get() > 0,
        "the dead worker was not asked"
    );
    assert!(
        took < Duration::from_secs(3),
        "a dead worker stalled the file for {took:?}"
    );
}

/// During a token rotation the reader holds the new token and the previous one; a worker that
/// still takes only the previous one is read over the block transport with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reads_a_worker_still_on_the_previous_token() {
    let l = lake(1).await;
    let r = reader(members(&l), true);
    assert!(r.membership().set_token("the-next-one").unwrap());
    assert!(read(&r, "big.rec").await == pattern(7, BIG));
    assert!(reads(&r, "blocks") >= 13);
    assert_eq!(reads(&r, "grpc"), 0);
    assert!(
        r.membership().has_previous_token(),
        "the previous token was dropped while a worker still needs it"
    );
}

/// A fake worker that speaks the transport, takes each request, sends the data frame and half
/// the bytes, and then falls silent with the connection open (a process stopped mid-send).
async fn stalling_worker() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use lakecache_proto::blocks::{self, FrameKind, HEADER, PREFACE};
    use lakecache_proto::lakecache::v1 as pb;
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut preface = [0u8; 8];
            if s.read_exact(&mut preface).await.is_err() || preface != PREFACE {
                continue;
            }
            s.write_all(&PREFACE).await.unwrap();
            let mut h = [0u8; HEADER];
            if s.read_exact(&mut h).await.is_err() {
                continue;
            }
            let (_, len) = blocks::parse_header(h).unwrap();
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            let req = pb::BlockRequest::decode(&payload[..]).unwrap();
            let read = req.read.unwrap();
            let key = read.key.unwrap();
            let start = key.index * read.block_size;
            let want = read.block_size.min(key.object_size - start);
            let head = blocks::frame(
                FrameKind::Data,
                &pb::BlockData {
                    served_from: pb::Tier::Memory as i32,
                    offset: 0,
                    length: want,
                },
            );
            s.write_all(&head).await.unwrap();
            s.write_all(&vec![0u8; (want / 2) as usize]).await.unwrap();
            held.push(s);
        }
    });
    (addr, task)
}

/// A worker that stops mid-block, alone (no other owner to hedge to): each read waits the
/// transport's silence bound, not the worker timeout (30 s here), then reads the source. (With
/// other owners, the reader moves on sooner: a worker silent while calls wait on it is suspect
/// after 4× the p99 of first answers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_mid_block_costs_the_silence_bound() {
    let l = lake(0).await;
    let (addr, task) = stalling_worker().await;
    let m = kit::membership(
        vec![Member {
            id: "stalls".into(),
            endpoint: format!("http://{addr}"),
        }],
        Some("secret"),
    );
    let source: Arc<dyn lakecache_lake::Source> = Arc::new(
        lakecache_lake::OpendalSource::new(&SourceSpec::new(format!(
            "file://{}",
            l.dir.path().display()
        )))
        .unwrap(),
    );
    let cfg = ReaderConfig {
        block_size: BS,
        // Far above the silence bound: a stall must not cost this.
        worker_timeout: Duration::from_secs(30),
        read_timeout: Duration::from_secs(60),
        metadata_ttl: None,
        direct_fallback: true,
    };
    let r = Arc::new(Reader::new(cfg, m, Some(source)));
    let silence = lakecache_client::blocks::SILENCE;
    for round in 0..2 {
        let started = Instant::now();
        assert_eq!(read(&r, "small.jpg").await, pattern(8, 5000));
        let took = started.elapsed();
        eprintln!("read {round} with a worker stopped mid-block: {took:.2?}");
        assert!(
            took >= silence - Duration::from_millis(500),
            "the stalled worker was not waited for ({took:?}): the test proves nothing"
        );
        assert!(
            took < silence + Duration::from_secs(2),
            "a stall mid-block cost {took:?}"
        );
    }
    let direct = r
        .metrics
        .blocks
        .get_or_create(&lakecache_client::metrics::OriginLabel {
            origin: "direct".into(),
        })
        .get();
    assert_eq!(direct, 2, "the blocks did not come from the source");
    task.abort();
}
