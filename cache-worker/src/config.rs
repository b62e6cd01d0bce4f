//! Worker configuration: a YAML file (what the operator writes into a ConfigMap), overridden by
//! flags, each of which is also an environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use clap::Args;
use lakecache_lake::{SourceFlags, SourceSpec};
use serde::{Deserialize, Serialize};

use crate::meta::MetadataPolicy;
use crate::store::{TierKind, TierSpec};

/// Default block size: 4 MiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;

/// One tier as written in the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TierConfig {
    pub kind: TierKind,
    /// Directory of the tier's block files. The Memory tier defaults to a directory under
    /// `/dev/shm`; the Disk tier needs one.
    #[serde(default)]
    pub path: Option<PathBuf>,
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
            max_source_fetches: default_max_source_fetches(),
            metadata_entries: default_metadata_entries(),
        }
    }
}

fn default_max_source_fetches() -> usize {
    crate::cache::DEFAULT_MAX_SOURCE_FETCHES
}
fn default_metadata_entries() -> usize {
    crate::meta::DEFAULT_METADATA_ENTRIES
}

/// The worker's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkerConfig {
    /// This worker's id in the ring (the pod name in Kubernetes).
    #[serde(default = "default_id")]
    pub id: String,
    pub source: SourceSpec,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    #[serde(default = "default_block_size")]
    pub block_size: ByteSize,
    pub tiers: Vec<TierConfig>,
    #[serde(default)]
    pub metadata: MetadataPolicy,
    /// Caps on source reads and cached metadata; each has a default.
    #[serde(default)]
    pub limits: WorkerLimits,
    /// File holding the data-plane token. Without one (and without `LAKECACHE_TOKEN`) the data
    /// plane is open: the worker then listens only on a loopback address, unless
    /// `insecureOpenDataPlane` says an open data plane on the network is wanted.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve an open data plane (no token) on a non-loopback address: anyone who can reach the
    /// port reads the whole source.
    #[serde(default)]
    pub insecure_open_data_plane: bool,
    /// The token itself, when it comes from the environment rather than a file. Never written to
    /// a file by the operator.
    #[serde(skip)]
    pub token: Option<String>,
}

fn default_id() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "worker-0".into())
}
fn default_listen() -> SocketAddr {
    "0.0.0.0:7700".parse().expect("valid")
}
fn default_admin() -> SocketAddr {
    "0.0.0.0:7701".parse().expect("valid")
}
fn default_block_size() -> ByteSize {
    ByteSize::b(DEFAULT_BLOCK_SIZE)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is not valid: {1}")]
    Parse(PathBuf, String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("cannot read the token file {0}: {1}")]
    Token(PathBuf, std::io::Error),
    #[error(
        "the data-plane token {0} is empty: write the token into it (an empty token would let \
         any caller in)"
    )]
    EmptyToken(String),
    #[error(
        "no data-plane token (tokenFile, --token-file or LAKECACHE_TOKEN) and the listen address \
         {0} is not a loopback address: anyone who reaches it could read the whole source; give \
         a token, listen on 127.0.0.1, or pass --insecure-open-data-plane if that is what you want"
    )]
    OpenDataPlane(SocketAddr),
}

/// Command-line flags of the worker; each overrides the file.
#[derive(Debug, Clone, Args, Default)]
pub struct WorkerFlags {
    /// Configuration file (YAML).
    #[arg(long, env = "LAKECACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Worker id in the ring.
    #[arg(long, env = "LAKECACHE_WORKER_ID")]
    pub id: Option<String>,
    /// Source URI (s3://bucket/prefix, oss://…, gs://…, azblob://…, hdfs://namenode:8020/…,
    /// file:///path).
    #[arg(long, env = "LAKECACHE_SOURCE")]
    pub source: Option<String>,
    #[command(flatten)]
    pub source_flags: SourceFlags,
    /// gRPC listen address.
    #[arg(long, env = "LAKECACHE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin (metrics, probes) listen address.
    #[arg(long, env = "LAKECACHE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Block size, e.g. 4MiB.
    #[arg(long, env = "LAKECACHE_BLOCK_SIZE")]
    pub block_size: Option<ByteSize>,
    /// Memory tier size, e.g. 4GiB (replaces the file's Memory tier).
    #[arg(long, env = "LAKECACHE_MEMORY")]
    pub memory: Option<ByteSize>,
    /// Directory of the Memory tier (a tmpfs).
    #[arg(long, env = "LAKECACHE_MEMORY_DIR")]
    pub memory_dir: Option<PathBuf>,
    /// Disk tier as PATH:SIZE, e.g. /var/cache/lakecache:50GiB (replaces the file's Disk tier).
    #[arg(long, env = "LAKECACHE_DISK")]
    pub disk: Option<String>,
    /// File holding the data-plane token.
    #[arg(long, env = "LAKECACHE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address: anyone who reaches the port reads the
    /// whole source. Without a token the worker otherwise refuses any address but loopback.
    #[arg(long, env = "LAKECACHE_INSECURE_OPEN_DATA_PLANE")]
    pub insecure_open_data_plane: bool,
    /// Most source reads under way at once (default 32).
    #[arg(long, env = "LAKECACHE_MAX_SOURCE_FETCHES")]
    pub max_source_fetches: Option<usize>,
    /// Most metadata entries cached (default 2000000).
    #[arg(long, env = "LAKECACHE_METADATA_ENTRIES")]
    pub metadata_entries: Option<usize>,
}

/// Parses `PATH:SIZE`.
pub fn parse_disk(s: &str) -> Result<(PathBuf, ByteSize), ConfigError> {
    let (path, size) = s.rsplit_once(':').ok_or_else(|| {
        ConfigError::Invalid(format!(
            "disk tier {s:?}: expected PATH:SIZE, e.g. /var/cache/lakecache:50GiB"
        ))
    })?;
    let size: ByteSize = size
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("disk tier size {size:?}: {e}")))?;
    Ok((PathBuf::from(path), size))
}

impl WorkerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e.to_string()))
    }

    /// The file (if any) with the flags applied on top.
    pub fn from_flags(flags: &WorkerFlags) -> Result<Self, ConfigError> {
        let mut cfg = match &flags.config {
            Some(p) => Self::load(p)?,
            None => {
                let uri = flags.source.clone().ok_or_else(|| {
                    ConfigError::Invalid("no source: give --source or a --config file".into())
                })?;
                WorkerConfig {
                    id: default_id(),
                    source: SourceSpec::new(uri),
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
        };
        if let Some(v) = &flags.id {
            cfg.id = v.clone();
        }
        if let Some(v) = &flags.source {
            cfg.source.uri = v.clone();
        }
        flags
            .source_flags
            .apply(&mut cfg.source)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(v) = flags.listen {
            cfg.listen = v;
        }
        if let Some(v) = flags.admin_listen {
            cfg.admin_listen = v;
        }
        if let Some(v) = flags.block_size {
            cfg.block_size = v;
        }
        if let Some(size) = flags.memory {
            cfg.tiers.retain(|t| t.kind != TierKind::Memory);
            cfg.tiers.insert(
                0,
                TierConfig {
                    kind: TierKind::Memory,
                    path: flags.memory_dir.clone(),
                    size,
                },
            );
        }
        if let Some(d) = &flags.disk {
            let (path, size) = parse_disk(d)?;
            cfg.tiers.retain(|t| t.kind != TierKind::Disk);
            cfg.tiers.push(TierConfig {
                kind: TierKind::Disk,
                path: Some(path),
                size,
            });
        }
        if let Some(v) = &flags.token_file {
            cfg.token_file = Some(v.clone());
        }
        cfg.insecure_open_data_plane |= flags.insecure_open_data_plane;
        if let Some(v) = flags.max_source_fetches {
            cfg.limits.max_source_fetches = v;
        }
        if let Some(v) = flags.metadata_entries {
            cfg.limits.metadata_entries = v;
        }
        if cfg.token.is_none() {
            // Set but empty is kept: `resolve_token` refuses it rather than running open.
            cfg.token = std::env::var("LAKECACHE_TOKEN").ok();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what needs no I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bs = self.block_size.as_u64();
        if !bs.is_power_of_two() || !(64 << 10..=256 << 20).contains(&bs) {
            return Err(ConfigError::Invalid(format!(
                "block size {} must be a power of two between 64KiB and 256MiB",
                self.block_size
            )));
        }
        if self.tiers.is_empty() {
            return Err(ConfigError::Invalid(
                "no tiers: give --memory and/or --disk".into(),
            ));
        }
        let mems = self
            .tiers
            .iter()
            .filter(|t| t.kind == TierKind::Memory)
            .count();
        let disks = self
            .tiers
            .iter()
            .filter(|t| t.kind == TierKind::Disk)
            .count();
        if mems > 1 || disks > 1 {
            return Err(ConfigError::Invalid(
                "at most one Memory and one Disk tier".into(),
            ));
        }
        for t in &self.tiers {
            if t.size.as_u64() < bs {
                return Err(ConfigError::Invalid(format!(
                    "{:?} tier of {} is smaller than one block ({})",
                    t.kind, t.size, self.block_size
                )));
            }
            if t.kind == TierKind::Disk && t.path.is_none() {
                return Err(ConfigError::Invalid("the Disk tier needs a path".into()));
            }
        }
        if self.limits.max_source_fetches == 0 || self.limits.metadata_entries == 0 {
            return Err(ConfigError::Invalid(
                "limits: maxSourceFetches and metadataEntries must be at least 1".into(),
            ));
        }
        if self.id.is_empty() {
            return Err(ConfigError::Invalid("empty worker id".into()));
        }
        Ok(())
    }

    /// Whether a tier has no directory of its own (a Memory tier without `path`), so the worker
    /// makes a private one under /dev/shm ([`crate::store::private_memory_dir`]).
    pub fn needs_memory_dir(&self) -> bool {
        self.tiers.iter().any(|t| t.path.is_none())
    }

    /// The tiers with their directories resolved, Memory first; a tier without `path` gets
    /// `default_dir`.
    pub fn tier_specs(&self, default_dir: &Path) -> Vec<TierSpec> {
        let mut tiers: Vec<TierSpec> = self
            .tiers
            .iter()
            .map(|t| TierSpec {
                kind: t.kind,
                dir: t.path.clone().unwrap_or_else(|| default_dir.to_path_buf()),
                capacity: t.size.as_u64(),
            })
            .collect();
        tiers.sort_by_key(|t| t.kind != TierKind::Memory);
        tiers
    }

    /// The data-plane token, from the environment or the token file. An empty or blank token
    /// is an error, never "no token"; so is no token on a non-loopback address, unless
    /// `insecure_open_data_plane` is set.
    pub fn resolve_token(&self) -> Result<Option<String>, ConfigError> {
        let token = if let Some(t) = &self.token {
            Some((t.trim().to_string(), "in LAKECACHE_TOKEN".to_string()))
        } else if let Some(p) = &self.token_file {
            let t = std::fs::read_to_string(p).map_err(|e| ConfigError::Token(p.clone(), e))?;
            Some((t.trim().to_string(), format!("file {}", p.display())))
        } else {
            None
        };
        match token {
            Some((t, _)) if !t.is_empty() => Ok(Some(t)),
            Some((_, from)) => Err(ConfigError::EmptyToken(from)),
            None if self.listen.ip().is_loopback() || self.insecure_open_data_plane => Ok(None),
            None => Err(ConfigError::OpenDataPlane(self.listen)),
        }
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
        assert_eq!(cfg.source.timeout, std::time::Duration::from_secs(10));
        assert_eq!(
            cfg.metadata,
            MetadataPolicy::Ttl {
                ttl: std::time::Duration::from_secs(300)
            }
        );
        assert_eq!(cfg.limits.max_source_fetches, 8);
        assert_eq!(
            cfg.limits.metadata_entries,
            crate::meta::DEFAULT_METADATA_ENTRIES
        );
        assert!(cfg.needs_memory_dir());
        let tiers = cfg.tier_specs(Path::new("/dev/shm/private"));
        assert_eq!(tiers[0].dir, PathBuf::from("/dev/shm/private"));
        assert_eq!(tiers[1].capacity, 50 << 30);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = serde_yaml_ng::from_str::<WorkerConfig>("source: {uri: x}\ntiers: []\nbogus: 1")
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let flags = WorkerFlags {
            source: Some("file:///tmp".into()),
            memory: Some(ByteSize::mib(64)),
            block_size: Some(ByteSize::b(3_000_000)),
            ..Default::default()
        };
        let e = WorkerConfig::from_flags(&flags).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        assert!(
            parse_disk("/x")
                .unwrap_err()
                .to_string()
                .contains("PATH:SIZE")
        );
        let flags = WorkerFlags {
            source: Some("file:///tmp".into()),
            ..Default::default()
        };
        assert!(
            WorkerConfig::from_flags(&flags)
                .unwrap_err()
                .to_string()
                .contains("no tiers")
        );
    }

    #[test]
    fn flags_build_a_config() {
        let flags = WorkerFlags {
            source: Some("file:///data".into()),
            memory: Some(ByteSize::mib(64)),
            disk: Some("/var/cache/x:1GiB".into()),
            ..Default::default()
        };
        let cfg = WorkerConfig::from_flags(&flags).unwrap();
        assert_eq!(cfg.tiers.len(), 2);
        assert_eq!(cfg.limits, WorkerLimits::default());
        let cfg = WorkerConfig::from_flags(&WorkerFlags {
            max_source_fetches: Some(2),
            metadata_entries: Some(10),
            ..flags.clone()
        })
        .unwrap();
        assert_eq!(
            (cfg.limits.max_source_fetches, cfg.limits.metadata_entries),
            (2, 10)
        );
        let e = WorkerConfig::from_flags(&WorkerFlags {
            max_source_fetches: Some(0),
            ..flags
        })
        .unwrap_err();
        assert!(e.to_string().contains("maxSourceFetches"), "{e}");
        assert_eq!(
            cfg.tier_specs(Path::new("/unused"))[1].dir,
            PathBuf::from("/var/cache/x")
        );
    }

    #[test]
    fn the_token_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |listen: &str, token_file: Option<&str>, token: Option<&str>| WorkerConfig {
            id: "w".into(),
            source: SourceSpec::new("memory://"),
            listen: listen.parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            block_size: default_block_size(),
            tiers: vec![],
            metadata: MetadataPolicy::Immutable,
            limits: WorkerLimits::default(),
            token_file: token_file.map(|n| dir.path().join(n)),
            insecure_open_data_plane: false,
            token: token.map(String::from),
        };
        std::fs::write(dir.path().join("good"), "s3cr3t\n").unwrap();
        std::fs::write(dir.path().join("empty"), "").unwrap();
        std::fs::write(dir.path().join("blank"), " \n\t ").unwrap();
        let ok = |c: WorkerConfig| c.resolve_token().unwrap();
        assert_eq!(
            ok(cfg("0.0.0.0:1", Some("good"), None)).as_deref(),
            Some("s3cr3t")
        );
        assert_eq!(
            ok(cfg("0.0.0.0:1", None, Some(" t "))).as_deref(),
            Some("t")
        );
        assert_eq!(ok(cfg("127.0.0.1:1", None, None)), None);
        assert_eq!(ok(cfg("[::1]:1", None, None)), None);
        for (file, env) in [
            (Some("empty"), None),
            (Some("blank"), None),
            (None, Some(" ")),
        ] {
            let e = cfg("127.0.0.1:1", file, env).resolve_token().unwrap_err();
            assert!(matches!(e, ConfigError::EmptyToken(_)), "{e}");
        }
        for listen in ["0.0.0.0:7700", "[::]:7700", "10.1.2.3:7700"] {
            let e = cfg(listen, None, None)
                .resolve_token()
                .unwrap_err()
                .to_string();
            assert!(e.contains("--insecure-open-data-plane"), "{e}");
            let mut open = cfg(listen, None, None);
            open.insecure_open_data_plane = true;
            assert_eq!(ok(open), None);
        }
        let e = cfg("127.0.0.1:1", Some("missing"), None)
            .resolve_token()
            .unwrap_err();
        assert!(matches!(e, ConfigError::Token(..)), "{e}");
    }
}
