//! The block transport as a worker serves it, spoken by hand over a socket: the preface, the
//! answers ReadBlock would give (bytes, ranges, refusals, not-cached), connections that stay
//! usable after a failure, and bad frames that close the connection and nothing else.

use std::time::Duration;

use bytesize::ByteSize;
use lakecache_lake::SourceSpec;
use lakecache_proto::blocks::{self, FrameKind, HEADER, PREFACE};
use lakecache_proto::lakecache::v1 as pb;
use lakecache_worker::Worker;
use lakecache_worker::config::{TierConfig, WorkerConfig};
use lakecache_worker::store::TierKind;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BS: u64 = 64 << 10;

fn data() -> Vec<u8> {
    (0..(BS * 2 + 100) as usize)
        .map(|i| (i % 251) as u8)
        .collect()
}

async fn worker(lake: &std::path::Path, tier: &std::path::Path) -> Worker {
    std::fs::write(lake.join("obj"), data()).unwrap();
    Worker::start(WorkerConfig {
        id: "w0".into(),
        source: SourceSpec::new(format!("file://{}", lake.display())),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        block_size: ByteSize::b(BS),
        tiers: vec![TierConfig {
            kind: TierKind::Memory,
            path: Some(tier.into()),
            size: ByteSize::mib(4),
        }],
        metadata: Default::default(),
        token_file: None,
        insecure_open_data_plane: false,
        token: Some("secret".into()),
        limits: Default::default(),
    })
    .await
    .unwrap()
}

async fn connect(w: &Worker) -> TcpStream {
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    s.write_all(&PREFACE).await.unwrap();
    let mut back = [0u8; 8];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, PREFACE, "the worker did not answer the preface");
    s
}

fn request(token: &str, index: u64, offset: u64, length: u64, cached_only: bool) -> Vec<u8> {
    blocks::frame(
        FrameKind::Request,
        &pb::BlockRequest {
            authorization: format!("Bearer {token}"),
            read: Some(pb::ReadBlockRequest {
                key: Some(pb::BlockKey {
                    path: "obj".into(),
                    version: String::new(),
                    index,
                    object_size: BS * 2 + 100,
                }),
                block_size: BS,
                offset,
                length,
                cached_only,
            }),
        },
    )
}

/// What the worker answered: the block's bytes and tier, or the failure.
#[derive(Debug)]
enum Answer {
    Data(i32, u64, Vec<u8>),
    Failure(pb::BlockFailure),
}

async fn answer(s: &mut TcpStream) -> Answer {
    loop {
        let mut h = [0u8; HEADER];
        s.read_exact(&mut h).await.unwrap();
        let (kind, len) = blocks::parse_header(h).unwrap();
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        match kind {
            FrameKind::Beat => continue,
            FrameKind::Data => {
                let d = pb::BlockData::decode(&payload[..]).unwrap();
                let mut bytes = vec![0u8; d.length as usize];
                s.read_exact(&mut bytes).await.unwrap();
                return Answer::Data(d.served_from, d.offset, bytes);
            }
            FrameKind::Failure => {
                return Answer::Failure(pb::BlockFailure::decode(&payload[..]).unwrap());
            }
            FrameKind::Request => panic!("a request from the worker"),
        }
    }
}

/// Whether the worker closed the connection (within a second).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn answers_as_read_block_and_stays_usable_after_a_failure() {
    let (lake, tier) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = worker(lake.path(), tier.path()).await;
    let d = data();
    let mut s = connect(&w).await;
    // Not cached yet: a cache-only question says so, and costs no source read.
    s.write_all(&request("secret", 1, 0, 0, true))
        .await
        .unwrap();
    match answer(&mut s).await {
        Answer::Failure(f) => {
            assert_eq!(f.code, tonic::Code::NotFound as i32);
            assert!(f.not_cached && !f.source_error, "{f:?}");
        }
        a => panic!("{a:?}"),
    }
    assert_eq!(w.metrics.source_requests.get(), 0);
    // The same connection serves the block from the source, then from the Memory tier.
    s.write_all(&request("secret", 1, 0, 0, false))
        .await
        .unwrap();
    match answer(&mut s).await {
        Answer::Data(tier, 0, bytes) => {
            assert_eq!(tier, pb::Tier::Source as i32);
            assert!(bytes[..] == d[BS as usize..2 * BS as usize]);
        }
        a => panic!("{a:?}"),
    }
    // A range of it, from the tier file.
    s.write_all(&request("secret", 1, 100, 1000, false))
        .await
        .unwrap();
    match answer(&mut s).await {
        Answer::Data(tier, 100, bytes) => {
            assert_eq!(tier, pb::Tier::Memory as i32);
            assert!(bytes[..] == d[BS as usize + 100..BS as usize + 1100]);
        }
        a => panic!("{a:?}"),
    }
    assert_eq!(w.metrics.bytes_sendfile.get(), 1000);
    // The last, short block.
    s.write_all(&request("secret", 2, 0, 0, false))
        .await
        .unwrap();
    match answer(&mut s).await {
        Answer::Data(_, 0, bytes) => assert!(bytes[..] == d[2 * BS as usize..]),
        a => panic!("{a:?}"),
    }
    // A wrong token is refused, as gRPC refuses it, and the connection goes on.
    s.write_all(&request("wrong", 1, 0, 0, false))
        .await
        .unwrap();
    match answer(&mut s).await {
        Answer::Failure(f) => {
            assert_eq!(f.code, tonic::Code::Unauthenticated as i32);
            assert!(!f.source_error);
        }
        a => panic!("{a:?}"),
    }
    // Past the end of the object.
    s.write_all(&request("secret", 9, 0, 0, false))
        .await
        .unwrap();
    match answer(&mut s).await {
        Answer::Failure(f) => assert_eq!(f.code, tonic::Code::OutOfRange as i32, "{f:?}"),
        a => panic!("{a:?}"),
    }
    s.write_all(&request("secret", 0, 0, 0, false))
        .await
        .unwrap();
    assert!(matches!(answer(&mut s).await, Answer::Data(..)));
    assert_eq!(w.metrics.block_connections.get(), 1);
}

#[tokio::test]
async fn frames_that_break_the_rules_close_the_connection_and_nothing_else() {
    let (lake, tier) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = worker(lake.path(), tier.path()).await;
    // An unknown frame kind.
    let mut s = connect(&w).await;
    s.write_all(&[b'X', 0, 0, 0, 0]).await.unwrap();
    assert!(closed(&mut s).await, "an unknown frame was taken");
    // A frame larger than any request.
    let mut s = connect(&w).await;
    let mut h = vec![b'Q'];
    h.extend_from_slice(&((blocks::MAX_FRAME + 1) as u32).to_le_bytes());
    s.write_all(&h).await.unwrap();
    assert!(closed(&mut s).await, "an oversized frame was taken");
    // A payload that is not a request.
    let mut s = connect(&w).await;
    s.write_all(&[b'Q', 3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(closed(&mut s).await, "a bad request was taken");
    // A worker's frame kind from a reader.
    let mut s = connect(&w).await;
    s.write_all(&blocks::BEAT).await.unwrap();
    assert!(
        closed(&mut s).await,
        "a heartbeat from the reader was taken"
    );
    // A wrong preface (the first byte matched).
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    s.write_all(b"LCBLK/9\n").await.unwrap();
    assert!(closed(&mut s).await, "a wrong preface was taken");
    // The worker still serves, both transports.
    let mut s = connect(&w).await;
    s.write_all(&request("secret", 0, 0, 0, false))
        .await
        .unwrap();
    assert!(matches!(answer(&mut s).await, Answer::Data(..)));
    let mut grpc =
        pb::cache_worker_client::CacheWorkerClient::connect(format!("http://{}", w.addr))
            .await
            .unwrap();
    let mut info = tonic::Request::new(pb::InfoRequest {});
    info.metadata_mut()
        .insert("authorization", "Bearer secret".parse().unwrap());
    assert_eq!(grpc.info(info).await.unwrap().into_inner().id, "w0");
}

/// A stopping worker finishes the answer under way, then closes its block connections.
#[tokio::test]
async fn a_stopping_worker_closes_its_block_connections() {
    let (lake, tier) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = worker(lake.path(), tier.path()).await;
    let mut s = connect(&w).await;
    s.write_all(&request("secret", 0, 0, 0, false))
        .await
        .unwrap();
    assert!(matches!(answer(&mut s).await, Answer::Data(..)));
    tokio::time::timeout(Duration::from_secs(5), w.stop())
        .await
        .expect("the worker took more than 5 s to stop");
    assert!(closed(&mut s).await, "the connection outlived the worker");
}
