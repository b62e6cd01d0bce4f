//! What the plugin hands a volume's FUSE server, and the node's caps on what a volume may ask.
//! A volume's attributes themselves are a contract with the operator: [`lakecache_api::volume`].

use std::path::PathBuf;
use std::time::Duration;

pub use lakecache_api::volume::{
    AttributeError, TOKEN_KEY, VolumeAttributes, WorkerSpec, keys, token_from_secrets,
};
use serde::{Deserialize, Serialize};

/// The most a volume may ask for; 0 is no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub max_prefetch_budget: u64,
    pub max_local_cache_size: u64,
}

/// Refuses a `prefetchBudget` or `localCacheSize` of `v` above the plugin's caps.
pub fn check_caps(v: &VolumeAttributes, caps: &Caps) -> Result<(), AttributeError> {
    let over = |key: &str, asked: Option<u64>, cap: u64, flag: &str| match asked {
        Some(v) if cap > 0 && v > cap => Err(AttributeError(format!(
            "volumeAttributes.{key} {} is more than this node allows ({}, the plugin's \
             {flag}): ask for at most that",
            bytesize::ByteSize(v),
            bytesize::ByteSize(cap)
        ))),
        _ => Ok(()),
    };
    over(
        keys::PREFETCH_BUDGET,
        v.prefetch_budget,
        caps.max_prefetch_budget,
        "--max-prefetch-budget",
    )?;
    over(
        keys::LOCAL_CACHE_SIZE,
        v.local_cache_size,
        caps.max_local_cache_size,
        "--max-local-cache-size",
    )
}

/// Everything a FUSE server needs; written by the plugin as `fuse.json` (mode 0600: it holds the
/// token).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FuseServerConfig {
    pub volume_id: String,
    pub mount_path: PathBuf,
    pub namespace: String,
    pub name: String,
    /// Static workers; `None` means follow the CacheNamespace's status in the Kubernetes API.
    pub workers: Option<Vec<WorkerSpec>>,
    /// The data-plane token, inline (configurations written before `token_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The file that holds the data-plane token (mode 0600, beside this file). The FUSE server
    /// reads it again when it changes: the plugin rewrites it when kubelet publishes the
    /// volume with a new token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An inline volume: the tenant's own request. Errors name no worker address.
    #[serde(default)]
    pub inline: bool,
    #[serde(with = "humantime_serde", default)]
    pub metadata_ttl: Option<Duration>,
    pub prefetch_budget: u64,
    pub fuse_threads: usize,
    /// Where and how much to keep of node-local whole-file copies (served with passthrough).
    #[serde(default)]
    pub local_cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub local_cache_size: u64,
    /// Entries of directory listings the server keeps (the plugin's `--listing-budget`);
    /// `None` (configurations written before it) is the reader's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing_budget: Option<usize>,
    /// Read blocks over the block transport where workers speak it (gRPC otherwise); on
    /// unless the plugin's `--block-transport=false` says otherwise.
    #[serde(default = "yes")]
    pub block_transport: bool,
    /// How long to wait for a first worker to answer before the mount fails.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
}

fn yes() -> bool {
    true
}

impl std::fmt::Debug for FuseServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseServerConfig")
            .field("volume_id", &self.volume_id)
            .field("mount_path", &self.mount_path)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("workers", &self.workers)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("inline", &self.inline)
            .field("metadata_ttl", &self.metadata_ttl)
            .field("prefetch_budget", &self.prefetch_budget)
            .field("fuse_threads", &self.fuse_threads)
            .field("local_cache_dir", &self.local_cache_dir)
            .field("local_cache_size", &self.local_cache_size)
            .field("listing_budget", &self.listing_budget)
            .field("block_transport", &self.block_transport)
            .field("startup_timeout", &self.startup_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sizes_over_the_caps_are_refused_naming_the_cap() {
        let caps = Caps {
            max_prefetch_budget: 64 << 20,
            max_local_cache_size: 1 << 30,
        };
        let c = |pairs: &[(&str, &str)]| {
            let mut all = vec![("cacheNamespace", "x"), ("namespace", "ml")];
            all.extend_from_slice(pairs);
            check_caps(&VolumeAttributes::from_map(&ctx(&all)).unwrap(), &caps)
        };
        c(&[("prefetchBudget", "64MiB"), ("localCacheSize", "1GiB")]).unwrap();
        c(&[]).unwrap();
        let e = c(&[("prefetchBudget", "65MiB")]).unwrap_err().to_string();
        assert!(
            e.contains("--max-prefetch-budget") && e.contains("prefetchBudget"),
            "{e}"
        );
        let e = c(&[("localCacheSize", "2GiB")]).unwrap_err().to_string();
        assert!(e.contains("--max-local-cache-size"), "{e}");
        // 0 is no cap.
        let big = VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "x"),
            ("namespace", "ml"),
            ("prefetchBudget", "100GiB"),
        ]))
        .unwrap();
        check_caps(&big, &Caps::default()).unwrap();
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let c = FuseServerConfig {
            volume_id: "v".into(),
            mount_path: "/m".into(),
            namespace: "ml".into(),
            name: "n".into(),
            workers: None,
            token: Some("s3cr3t".into()),
            token_file: None,
            inline: false,
            metadata_ttl: None,
            prefetch_budget: 1,
            fuse_threads: 1,
            local_cache_dir: None,
            local_cache_size: 0,
            listing_budget: None,
            block_transport: true,
            startup_timeout: Duration::from_secs(1),
        };
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
