//! The cache worker's configuration file: the contract between the operator, which writes it
//! into a ConfigMap, and the worker, which reads it.
//!
//! It lives here, with the other contracts, rather than in the worker's crate, so that the
//! operator builds it as a typed value instead of a JSON literal kept in step with the worker's
//! parser by a test. Nothing here does I/O except the defaults of `id` (the pod name, from
//! `HOSTNAME`); reading the file, the flags on top of it and the token are the worker's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
pub use lakecache_lake::SourceSpec;
use serde::{Deserialize, Serialize};

pub use crate::TierKind;

/// Default block size: 4 MiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;
/// Default cap on source reads at once.
pub const DEFAULT_MAX_SOURCE_FETCHES: usize = 32;
/// Default metadata budget: two million entries, about 400 MB at the ~200 bytes an entry takes
/// with its path.
pub const DEFAULT_METADATA_ENTRIES: usize = 2_000_000;

/// How long metadata stays valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "policy", rename_all = "PascalCase")]
pub enum MetadataPolicy {
    /// The source does not change while cached: keep metadata until restart.
    #[default]
    Immutable,
    /// Fetch metadata again after this long.
    Ttl {
        #[serde(with = "humantime_serde")]
        ttl: Duration,
    },
}

/// One tier as written in the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TierConfig {
    pub kind: TierKind,
    /// Directory of the tier's block files. The Memory tier defaults to a directory under
    /// `/dev/shm`; the Disk tier needs one.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(serialize_with = "exact_bytes")]
    pub size: ByteSize,
}

/// Bounds on what a worker holds or does at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkerLimits {
    /// Most source (lake) reads under way at once; further misses wait for one to finish.
    #[serde(default = "default_max_source_fetches")]
    pub max_source_fetches: usize,
    /// Most metadata entries cached: each stat counts one, each listing one plus its entries.
    /// The least recently used go first, whatever the metadata policy.
    #[serde(default = "default_metadata_entries")]
    pub metadata_entries: usize,
}

impl Default for WorkerLimits {
    fn default() -> Self {
        Self {
            max_source_fetches: DEFAULT_MAX_SOURCE_FETCHES,
            metadata_entries: DEFAULT_METADATA_ENTRIES,
        }
    }
}

impl WorkerLimits {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_max_source_fetches() -> usize {
    DEFAULT_MAX_SOURCE_FETCHES
}
fn default_metadata_entries() -> usize {
    DEFAULT_METADATA_ENTRIES
}

/// The worker's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkerConfig {
    /// This worker's id in the ring (the pod name in Kubernetes). A file written for every
    /// worker of a StatefulSet (the operator's) leaves it empty, so it is not written and each
    /// worker takes its pod name from `HOSTNAME`.
    #[serde(default = "default_id", skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub source: SourceSpec,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    #[serde(default = "default_block_size", serialize_with = "exact_bytes")]
    pub block_size: ByteSize,
    pub tiers: Vec<TierConfig>,
    #[serde(default)]
    pub metadata: MetadataPolicy,
    /// Caps on source reads and cached metadata; each has a default.
    #[serde(default, skip_serializing_if = "WorkerLimits::is_default")]
    pub limits: WorkerLimits,
    /// File holding the data-plane token. Without one (and without `LAKECACHE_TOKEN`) the data
    /// plane is open: the worker then listens only on a loopback address, unless
    /// `insecureOpenDataPlane` says an open data plane on the network is wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Serve an open data plane (no token) on a non-loopback address: anyone who can reach the
    /// port reads the whole source.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_open_data_plane: bool,
    /// The token itself, when it comes from the environment rather than a file. Never written to
    /// a file.
    #[serde(skip)]
    pub token: Option<String>,
}

/// A size written as its number of bytes: `ByteSize` writes itself rounded for people
/// (`1.4 GiB`), which would change a size on its way through the file.
fn exact_bytes<S: serde::Serializer>(size: &ByteSize, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_u64(size.as_u64())
}

/// The worker id when the file names none: the pod name.
pub fn default_id() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "worker-0".into())
}
/// The gRPC listen address when the file names none.
pub fn default_listen() -> SocketAddr {
    "0.0.0.0:7700".parse().expect("valid")
}
/// The admin listen address when the file names none.
pub fn default_admin() -> SocketAddr {
    "0.0.0.0:7701".parse().expect("valid")
}
/// [`DEFAULT_BLOCK_SIZE`] as a size.
pub fn default_block_size() -> ByteSize {
    ByteSize::b(DEFAULT_BLOCK_SIZE)
}

/// A configuration that cannot run, phrased as what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

impl WorkerConfig {
    /// A configuration of `source` with every default and no tiers.
    pub fn new(source: SourceSpec) -> Self {
        Self {
            id: default_id(),
            source,
            listen: default_listen(),
            admin_listen: default_admin(),
            block_size: default_block_size(),
            tiers: vec![],
            metadata: MetadataPolicy::Immutable,
            limits: WorkerLimits::default(),
            token_file: None,
            insecure_open_data_plane: false,
            token: None,
        }
    }

    /// The file's text, as every release has written it: keys sorted, durations in
    /// milliseconds, what is unset or at its default left out. The operator hashes this text
    /// into the worker pod template, which rolls the workers when it changes; writing the same
    /// configuration another way (field order, `30s` for `30000ms`) would restart every cache's
    /// workers on an operator upgrade, emptying their memory tiers, for nothing.
    pub fn to_yaml(&self) -> String {
        let ms = |d: Duration| serde_json::Value::from(format!("{}ms", d.as_millis()));
        let mut v = serde_json::to_value(self).expect("a worker configuration serializes");
        v["source"]["timeout"] = ms(self.source.timeout);
        let source = v["source"]
            .as_object_mut()
            .expect("the source is an object");
        if self.source.credentials_dir.is_none() {
            source.remove("credentialsDir");
        }
        if self.source.retries == SourceSpec::new("").retries {
            source.remove("retries");
        }
        if let MetadataPolicy::Ttl { ttl } = self.metadata {
            v["metadata"]["ttl"] = ms(ttl);
        }
        serde_yaml_ng::to_string(&v).expect("JSON values serialize as YAML")
    }

    /// Checks everything that needs no I/O.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bs = self.block_size.as_u64();
        let bad = |m: String| Err(InvalidConfig(m));
        if !bs.is_power_of_two() || !(64 << 10..=256 << 20).contains(&bs) {
            return bad(format!(
                "block size {} must be a power of two between 64KiB and 256MiB",
                self.block_size
            ));
        }
        if self.tiers.is_empty() {
            return bad("no tiers: give --memory and/or --disk".into());
        }
        let count = |k: TierKind| self.tiers.iter().filter(|t| t.kind == k).count();
        if count(TierKind::Memory) > 1 || count(TierKind::Disk) > 1 {
            return bad("at most one Memory and one Disk tier".into());
        }
        for t in &self.tiers {
            if t.size.as_u64() < bs {
                return bad(format!(
                    "{:?} tier of {} is smaller than one block ({})",
                    t.kind, t.size, self.block_size
                ));
            }
            if t.kind == TierKind::Disk && t.path.is_none() {
                return bad("the Disk tier needs a path".into());
            }
        }
        if self.limits.max_source_fetches == 0 || self.limits.metadata_entries == 0 {
            return bad("limits: maxSourceFetches and metadataEntries must be at least 1".into());
        }
        if self.id.is_empty() {
            return bad("empty worker id".into());
        }
        Ok(())
    }

    /// Whether a tier has no directory of its own (a Memory tier without `path`), so the worker
    /// makes a private one under /dev/shm.
    pub fn needs_memory_dir(&self) -> bool {
        self.tiers.iter().any(|t| t.path.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let yaml = r#"
id: w-1
source:
  uri: s3://bucket/prefix
  options: { endpoint: "http://127.0.0.1:9000", region: us-east-1 }
  credentialsDir: /etc/lakecache/credentials
  timeout: 10s
listen: 127.0.0.1:7700
blockSize: 4MiB
tiers:
  - { kind: Memory, size: 1GiB }
  - { kind: Disk, path: /var/cache/lakecache, size: 50GiB }
metadata: { policy: Ttl, ttl: 5m }
limits: { maxSourceFetches: 8 }
tokenFile: /etc/lakecache/token/token
"#;
        let cfg: WorkerConfig = serde_yaml_ng::from_str(yaml).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.block_size.as_u64(), 4 << 20);
        assert_eq!(cfg.source.timeout, Duration::from_secs(10));
        assert_eq!(
            cfg.metadata,
            MetadataPolicy::Ttl {
                ttl: Duration::from_secs(300)
            }
        );
        assert_eq!(cfg.limits.max_source_fetches, 8);
        assert_eq!(cfg.limits.metadata_entries, DEFAULT_METADATA_ENTRIES);
        assert!(cfg.needs_memory_dir());
        let back: WorkerConfig = serde_yaml_ng::from_str(&cfg.to_yaml()).unwrap();
        assert_eq!(back, cfg);
        // Sizes keep every byte, not a rounded figure.
        let mut odd = cfg.clone();
        odd.tiers[0].size = ByteSize::b(1_500_000_001);
        let back: WorkerConfig = serde_yaml_ng::from_str(&odd.to_yaml()).unwrap();
        assert_eq!(back.tiers[0].size.as_u64(), 1_500_000_001);
    }

    #[test]
    fn a_shared_file_names_no_worker_and_no_defaults() {
        let mut cfg = WorkerConfig::new(SourceSpec::new("s3://b/p"));
        cfg.id = String::new();
        let yaml = cfg.to_yaml();
        for absent in [
            "id:",
            "limits",
            "insecureOpenDataPlane",
            "tokenFile",
            "token:",
        ] {
            assert!(!yaml.contains(absent), "{absent} in {yaml}");
        }
        cfg.token = Some("s3cr3t".into());
        assert!(!cfg.to_yaml().contains("s3cr3t"));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = serde_yaml_ng::from_str::<WorkerConfig>("source: {uri: x}\ntiers: []\nbogus: 1")
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let mut cfg = WorkerConfig::new(SourceSpec::new("file:///tmp"));
        assert!(cfg.validate().unwrap_err().0.contains("no tiers"));
        cfg.tiers.push(TierConfig {
            kind: TierKind::Memory,
            path: None,
            size: ByteSize::mib(64),
        });
        cfg.validate().unwrap();
        cfg.block_size = ByteSize::b(3_000_000);
        assert!(cfg.validate().unwrap_err().0.contains("power of two"));
        cfg.block_size = default_block_size();
        cfg.tiers.push(TierConfig {
            kind: TierKind::Disk,
            path: None,
            size: ByteSize::gib(1),
        });
        assert!(cfg.validate().unwrap_err().0.contains("needs a path"));
    }
}
