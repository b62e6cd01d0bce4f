//! `/proc/self/mountinfo`, parsed: which mounts exist, where, and how they propagate. The parser
//! is the product's ([`lakecache_client::mountinfo`]); this adds what only tests ask.

use std::path::Path;

pub use lakecache_client::mountinfo::{MountInfo, containing, parse, read_self};

pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    Ok(read_self()?.iter().any(|m| m.mount_point == path))
}
