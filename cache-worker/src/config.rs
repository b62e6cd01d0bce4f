//! Worker configuration: a YAML file (what the operator writes into a ConfigMap), overridden by
//! flags, each of which is also an environment variable. The file's type is the operator's too,
//! so it lives in [`lakecache_api::worker`]; reading it, the flags and the token are here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use clap::Args;
pub use lakecache_api::worker::{
    DEFAULT_BLOCK_SIZE, InvalidConfig, MetadataPolicy, TierConfig, WorkerConfig, WorkerLimits,
};
use lakecache_lake::{SourceFlags, SourceSpec};

use crate::store::{TierKind, TierSpec};

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

impl From<InvalidConfig> for ConfigError {
    fn from(e: InvalidConfig) -> Self {
        ConfigError::Invalid(e.0)
    }
}

/// What the worker does with its configuration beyond the shared type: read it, apply its
/// flags, resolve its token and tiers.
pub trait WorkerConfigExt: Sized {
    /// The file at `path`.
    fn load(path: &Path) -> Result<Self, ConfigError>;
    /// The file (if any) with the flags applied on top.
    fn from_flags(flags: &WorkerFlags) -> Result<Self, ConfigError>;
    /// The tiers with their directories resolved, Memory first; a tier without `path` gets
    /// `default_dir`.
    fn tier_specs(&self, default_dir: &Path) -> Vec<TierSpec>;
    /// The data-plane token, from the environment or the token file. An empty or blank token
    /// is an error, never "no token"; so is no token on a non-loopback address, unless
    /// `insecure_open_data_plane` is set.
    fn resolve_token(&self) -> Result<Option<String>, ConfigError>;
}

impl WorkerConfigExt for WorkerConfig {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e.to_string()))
    }

    fn from_flags(flags: &WorkerFlags) -> Result<Self, ConfigError> {
        let mut cfg = match &flags.config {
            Some(p) => Self::load(p)?,
            None => {
                let uri = flags.source.clone().ok_or_else(|| {
                    ConfigError::Invalid("no source: give --source or a --config file".into())
                })?;
                WorkerConfig::new(SourceSpec::new(uri))
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

    fn tier_specs(&self, default_dir: &Path) -> Vec<TierSpec> {
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

    fn resolve_token(&self) -> Result<Option<String>, ConfigError> {
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
    fn a_memory_tier_without_a_path_gets_the_private_dir() {
        let cfg: WorkerConfig = serde_yaml_ng::from_str(
            "source: {uri: 'memory://'}\ntiers:\n  - { kind: Disk, path: /var/cache/lakecache, size: 50GiB }\n  - { kind: Memory, size: 1GiB }\n",
        )
        .unwrap();
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
            listen: listen.parse().unwrap(),
            token_file: token_file.map(|n| dir.path().join(n)),
            token: token.map(String::from),
            ..WorkerConfig::new(SourceSpec::new("memory://"))
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
