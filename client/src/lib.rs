//! The reader side of lakecache.
//!
//! - [`membership`]: the workers of a CacheNamespace and a lazily connected gRPC client to each;
//!   the list can change while reads go on (the operator publishes it; `lakecache local` fixes it).
//! - [`reader`]: metadata (listings and attributes, cached with entry TTLs or forever for
//!   `Immutable` data) and blocks, each asked of its rendezvous owner, failing over to the next
//!   owner and finally to the source, so a dead worker costs speed, never a failed read.
//! - [`blocks`]: the block transport, which carries block bytes beside gRPC on a pool of plain
//!   connections per worker.
//! - [`health`]: deadlines that follow the workers' latency, hedged reads, and ejection of a
//!   worker that stops answering, so that a hung worker costs about a second once.
//! - [`prefetch`]: a per-open-file read-ahead window that doubles on sequential reads and resets
//!   on seeks, under a memory budget shared by every open file.
//! - [`fs`]: the filesystem core (inodes, lookup, readdir, open, read) as async functions tested
//!   without a mount; [`fuse`]: the thin fuser adapter that mounts it.
//! - [`handoff`]: the journal a FUSE server keeps so that a successor can serve its connection.
//!
//! No unsafe code, except three marked places in [`fuse`] where fuser has no safe way to take
//! over a live FUSE connection (reusing a passthrough backing id, closing one, and putting the
//! connection under a session's descriptor).
#![deny(unsafe_code)]

pub mod blocks;
pub mod fs;
pub mod fuse;
pub mod handoff;
pub mod health;
pub mod local_cache;
pub mod membership;
pub mod metrics;
pub mod mountinfo;
pub mod prefetch;
pub mod reader;

pub use fs::{FsConfig, FsCore};
pub use local_cache::LocalFileCache;
pub use membership::{Member, Membership};
pub use reader::{LocalBlocks, ReadError, Reader, ReaderConfig};
