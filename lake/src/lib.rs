//! The data lake as lakecache sees it.
//!
//! A lake is a read-only tree of objects under a URI such as `s3://bucket/prefix`,
//! `oss://bucket/prefix`, `gs://bucket/prefix`, `azblob://container/prefix`,
//! `hdfs://namenode:port/prefix` or `file:///path`.
//! Everything above this crate talks to a lake through the [`Source`] trait: the attributes of one
//! path, the entries of one directory, and a byte range of one version of one object. The real
//! implementation ([`OpendalSource`]) goes through OpenDAL with retry and timeout layers, and
//! wraps every call in an overall deadline so that a lake that is down yields
//! [`LakeError::Unavailable`] after a bounded time instead of a hang.
//!
//! Two wrappers exist for tests and demos: [`FaultSource`] (switch a lake off, count requests)
//! and [`ThrottledSource`] (add first-byte latency and cap the bandwidth, to make a local
//! directory behave like a lake across a slow link).
#![forbid(unsafe_code)]

pub mod block;
mod fault;
mod opendal_source;
pub mod sample;
mod spec;
mod throttle;

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use block::{BlockId, BlockKey};
pub use fault::{FaultMode, FaultSource};
pub use opendal_source::OpendalSource;
pub use spec::{
    HDFS_SERVICE, HDFS_USER_ENV, HDFS_USER_OPTION, SECRET_OPTION_KEYS, SECRET_OPTION_PATTERNS,
    SourceFlags, SourceSpec, SpecError, is_secret_option,
};
pub use throttle::ThrottledSource;

/// Whether a path names a file or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Directory,
}

/// Attributes of one path in the lake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub kind: Kind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// ETag or version id; for stores that have neither, a version made of the modification
    /// time and size. Empty for directories.
    pub version: String,
    pub modified: Option<SystemTime>,
}

impl ObjectMeta {
    pub fn directory() -> Self {
        Self {
            kind: Kind::Directory,
            size: 0,
            version: String::new(),
            modified: None,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Directory
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name inside the directory, without slashes.
    pub name: String,
    pub meta: ObjectMeta,
}

/// What can go wrong reading a lake.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LakeError {
    #[error("{path}: not found in the source")]
    NotFound { path: String },
    #[error("{path}: the object changed in the source (expected version {expected:?})")]
    Changed { path: String, expected: String },
    #[error("source unavailable: {0}")]
    Unavailable(String),
    #[error("source denied access to {path}: {message}; check the credentials Secret")]
    PermissionDenied { path: String, message: String },
    #[error("source error on {path}: {message}")]
    Other { path: String, message: String },
}

impl LakeError {
    /// True when the lake itself could not be reached in time (as opposed to a bad path).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LakeError::Unavailable(_))
    }
}

pub type Result<T, E = LakeError> = std::result::Result<T, E>;

/// A read-only view of a lake. Paths are relative to the source root, use `/` as separator and
/// carry no leading or trailing slash; the root directory is the empty path.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// Attributes of one path.
    async fn stat(&self, path: &str) -> Result<ObjectMeta>;
    /// Entries directly under a directory, sorted by name.
    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>>;
    /// Bytes `[start, end)` of one version of an object. A version that no longer matches gives
    /// [`LakeError::Changed`] where the store can tell.
    async fn read(&self, path: &str, version: &str, start: u64, end: u64) -> Result<Bytes>;
    /// A short description for logs (never credentials).
    fn describe(&self) -> String;
}

/// Joins a directory path and a name.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Normalises a user path: strips slashes at both ends and collapses empty components.
pub fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_slashes() {
        assert_eq!(normalize("/a//b/"), "a/b");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize("./x"), "x");
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a", "b"), "a/b");
    }
}
