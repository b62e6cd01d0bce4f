//! Parsing a source URI and its options into what OpenDAL needs.
//!
//! Options come from three places, later ones winning: the `options` map of the configuration,
//! files in a credentials directory (one file per key, the way a Kubernetes Secret is mounted),
//! and environment variables `LAKECACHE_SOURCE_OPT_<KEY>`. Credentials never come from the URI.
//! [`SourceFlags`] is the command-line group every binary shares for these.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Option keys whose values are secret, by name. [`is_secret_option`] adds every key that
/// contains `key`, `secret`, `token` or `password`. The CRD's CEL rule on `spec.source.options`
/// refuses the same set (its test iterates over this list on a real API server).
pub const SECRET_OPTION_KEYS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "session_token",
    "access_key_secret",
    "security_token",
    "credential",
    "credential_path",
    "account_key",
    "sas_token",
    "token",
    "server_side_encryption_customer_key",
    "encryption_key",
    "password",
];

/// Substrings that make an option key secret wherever they appear (compared lower-cased).
pub const SECRET_OPTION_PATTERNS: &[&str] = &["key", "secret", "token", "password"];

/// Whether a source option's value is secret: it is never printed, never accepted on a
/// command line, and never accepted in a CacheNamespace's `options` (only from a Secret).
pub fn is_secret_option(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    SECRET_OPTION_KEYS.contains(&key.as_str())
        || SECRET_OPTION_PATTERNS.iter().any(|p| key.contains(p))
}

/// The OpenDAL service `hdfs://` URIs resolve to: the pure-Rust HDFS client (no JVM, no
/// libhdfs).
pub const HDFS_SERVICE: &str = "hdfs-native";
/// The option naming the HDFS user (simple authentication); see [`SourceSpec::process_env`].
pub const HDFS_USER_OPTION: &str = "user";
/// Where the HDFS client reads its user from.
pub const HDFS_USER_ENV: &str = "HADOOP_USER_NAME";

/// Where a source is and how to read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    /// `s3://bucket/prefix`, `oss://bucket/prefix`, `gs://bucket/prefix`,
    /// `azblob://container/prefix`, `hdfs://namenode:port/prefix`, `file:///path`, or
    /// `memory://`.
    pub uri: String,
    /// Service options passed to OpenDAL (`endpoint`, `region`, …).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// A directory of credential files: each file's name is an option key, its content the value.
    #[serde(default)]
    pub credentials_dir: Option<PathBuf>,
    /// Deadline of one source request, retries included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How many times a failed request is retried.
    #[serde(default = "default_retries")]
    pub retries: usize,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_retries() -> usize {
    3
}

impl SourceSpec {
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            options: BTreeMap::new(),
            credentials_dir: None,
            timeout: default_timeout(),
            retries: default_retries(),
        }
    }

    pub fn option(mut self, key: &str, value: impl Into<String>) -> Self {
        self.options.insert(key.to_string(), value.into());
        self
    }

    /// The URI and the options with secrets masked, for logs.
    pub fn redacted(&self) -> String {
        let opts: Vec<String> = self
            .options
            .iter()
            .map(|(k, v)| {
                if is_secret_option(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        if opts.is_empty() {
            self.uri.clone()
        } else {
            format!("{} ({})", self.uri, opts.join(", "))
        }
    }

    /// Environment variables this source needs in the process before it starts any thread.
    /// The HDFS client takes its user only from `HADOOP_USER_NAME`, so the `user` option of an
    /// `hdfs://` source becomes that variable; the binaries that read lakes (`lakecache` and
    /// `lakecache-worker`) set these first thing in `main`.
    pub fn process_env(&self) -> Result<Vec<(&'static str, String)>, SpecError> {
        let resolved = self.resolve()?;
        Ok(match resolved.config.get(HDFS_USER_OPTION) {
            Some(user) if resolved.scheme == HDFS_SERVICE => {
                vec![(HDFS_USER_ENV, user.clone())]
            }
            _ => Vec::new(),
        })
    }

    /// Resolves the URI and every option source into an OpenDAL scheme and configuration.
    pub fn resolve(&self) -> Result<Resolved, SpecError> {
        let (scheme, rest) = self
            .uri
            .split_once("://")
            .ok_or_else(|| SpecError::BadUri(self.uri.clone(), "expected SCHEME://…".into()))?;
        let mut cfg: BTreeMap<String, String> = BTreeMap::new();
        let service = match scheme {
            "s3" | "oss" | "gs" | "gcs" | "azblob" | "az" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(SpecError::BadUri(
                        self.uri.clone(),
                        "the bucket is empty".into(),
                    ));
                }
                let key = if matches!(scheme, "azblob" | "az") {
                    "container"
                } else {
                    "bucket"
                };
                cfg.insert(key.into(), bucket.into());
                cfg.insert("root".into(), format!("/{}", crate::normalize(prefix)));
                match scheme {
                    "s3" => "s3",
                    "oss" => "oss",
                    "gs" | "gcs" => "gcs",
                    _ => "azblob",
                }
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(SpecError::BadUri(
                        self.uri.clone(),
                        "a file URI needs an absolute path: file:///path".into(),
                    ));
                }
                cfg.insert("root".into(), rest.into());
                "fs"
            }
            "memory" => "memory",
            "hdfs" => {
                // hdfs://namenode:8020/prefix, hdfs://nn1:8020,nn2:8020/prefix (an HA pair), or
                // hdfs://nameservice/prefix with the name service in the options.
                let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if authority.is_empty() {
                    return Err(SpecError::BadUri(
                        self.uri.clone(),
                        "the namenode is empty: hdfs://namenode:8020/prefix".into(),
                    ));
                }
                cfg.insert("name_node".into(), format!("hdfs://{authority}"));
                cfg.insert("root".into(), format!("/{}", crate::normalize(prefix)));
                HDFS_SERVICE
            }
            other => {
                return Err(SpecError::Unsupported(format!(
                    "{other}: use s3, oss, gs, azblob, hdfs or file"
                )));
            }
        };
        for (k, v) in &self.options {
            cfg.insert(k.clone(), v.clone());
        }
        if let Some(dir) = &self.credentials_dir {
            read_credentials_dir(dir, &mut cfg)?;
        }
        for (k, v) in std::env::vars() {
            if let Some(key) = k.strip_prefix("LAKECACHE_SOURCE_OPT_") {
                cfg.insert(key.to_ascii_lowercase(), v);
            }
        }
        Ok(Resolved {
            scheme: service.to_string(),
            config: cfg,
        })
    }
}

/// Source flags shared by every binary; each overrides what a configuration file says.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceFlags {
    /// Source endpoint (S3-compatible stores, OSS).
    #[arg(long, env = "LAKECACHE_SOURCE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Source region.
    #[arg(long, env = "LAKECACHE_SOURCE_REGION")]
    pub region: Option<String>,
    /// Directory of credential files, one per key (access_key_id, secret_access_key, …): a
    /// mounted Secret.
    #[arg(long, env = "LAKECACHE_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// Extra source option KEY=VALUE (repeatable, or comma-separated).
    #[arg(
        long = "source-option",
        env = "LAKECACHE_SOURCE_OPTIONS",
        value_delimiter = ','
    )]
    pub options: Vec<String>,
    /// Deadline of one source request, retries included (default 30s).
    #[arg(long, env = "LAKECACHE_SOURCE_TIMEOUT")]
    pub source_timeout: Option<humantime::Duration>,
}

impl SourceFlags {
    /// Applies the flags given to `spec`.
    pub fn apply(&self, spec: &mut SourceSpec) -> Result<(), SpecError> {
        if let Some(v) = &self.endpoint {
            spec.options.insert("endpoint".into(), v.clone());
        }
        if let Some(v) = &self.region {
            spec.options.insert("region".into(), v.clone());
        }
        for kv in &self.options {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| SpecError::BadOption(kv.clone(), "expected KEY=VALUE".into()))?;
            // A command line is readable by every local user (`/proc/*/cmdline`, `ps`).
            if is_secret_option(k) {
                return Err(SpecError::SecretOption(k.trim().to_string()));
            }
            spec.options.insert(k.trim().into(), v.trim().into());
        }
        if let Some(v) = &self.credentials_dir {
            spec.credentials_dir = Some(v.clone());
        }
        if let Some(t) = self.source_timeout {
            spec.timeout = *t;
        }
        Ok(())
    }
}

/// A source resolved into an OpenDAL scheme and its configuration.
#[derive(Clone)]
pub struct Resolved {
    pub scheme: String,
    pub config: BTreeMap<String, String>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked: BTreeMap<&str, &str> = self
            .config
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret_option(k) {
                        "***"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("Resolved")
            .field("scheme", &self.scheme)
            .field("config", &masked)
            .finish()
    }
}

fn read_credentials_dir(dir: &Path, cfg: &mut BTreeMap<String, String>) -> Result<(), SpecError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| SpecError::Credentials(dir.to_path_buf(), e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| SpecError::Credentials(dir.to_path_buf(), e.to_string()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        // Kubernetes mounts Secrets with `..data` symlinks and dot-directories: skip them.
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let value = std::fs::read_to_string(entry.path())
            .map_err(|e| SpecError::Credentials(entry.path(), e.to_string()))?;
        cfg.insert(
            name.to_ascii_lowercase(),
            value.trim_end_matches(['\n', '\r']).to_string(),
        );
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("bad source URI {0:?}: {1}")]
    BadUri(String, String),
    #[error("unsupported source scheme {0}")]
    Unsupported(String),
    #[error("cannot read credentials from {0}: {1}")]
    Credentials(PathBuf, String),
    #[error("cannot configure the source: {0}")]
    Build(String),
    #[error("source option {0:?}: {1}")]
    BadOption(String, String),
    #[error(
        "source option {0:?} holds a secret and is refused on the command line (any local user \
         can read it there): put it in a file named {0} in --credentials-dir, or in the \
         environment variable LAKECACHE_SOURCE_OPT_{upper}",
        upper = .0.to_ascii_uppercase()
    )]
    SecretOption(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uri_becomes_bucket_and_root() {
        let r = SourceSpec::new("s3://data/imagenet/train/").option("region", "us-east-1");
        let r = r.resolve().unwrap();
        assert_eq!(r.scheme, "s3");
        assert_eq!(r.config["bucket"], "data");
        assert_eq!(r.config["root"], "/imagenet/train");
        assert_eq!(r.config["region"], "us-east-1");
    }

    #[test]
    fn azblob_uses_container() {
        let r = SourceSpec::new("azblob://c/p").resolve().unwrap();
        assert_eq!(r.scheme, "azblob");
        assert_eq!(r.config["container"], "c");
    }

    #[test]
    fn hdfs_uri_becomes_name_node_and_root_and_the_user_an_environment_variable() {
        let r = SourceSpec::new("hdfs://nn1:8020,nn2:8020/data/train/")
            .resolve()
            .unwrap();
        assert_eq!(r.scheme, HDFS_SERVICE);
        assert_eq!(r.config["name_node"], "hdfs://nn1:8020,nn2:8020");
        assert_eq!(r.config["root"], "/data/train");
        let spec = SourceSpec::new("hdfs://ns1/x").option("user", "alice");
        assert_eq!(
            spec.process_env().unwrap(),
            vec![(HDFS_USER_ENV, "alice".to_string())]
        );
        // `user` means nothing to other services.
        let s3 = SourceSpec::new("s3://b").option("user", "alice");
        assert!(s3.process_env().unwrap().is_empty());
        let e = SourceSpec::new("hdfs:///x").resolve().unwrap_err();
        assert!(e.to_string().contains("namenode is empty"), "{e}");
    }

    #[test]
    fn bad_uris_say_what_to_fix() {
        let e = SourceSpec::new("bucket/prefix").resolve().unwrap_err();
        assert!(e.to_string().contains("SCHEME://"), "{e}");
        let e = SourceSpec::new("ftp://x").resolve().unwrap_err();
        assert!(e.to_string().contains("use s3"), "{e}");
        let e = SourceSpec::new("file://relative").resolve().unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let e = SourceSpec::new("s3:///nobucket").resolve().unwrap_err();
        assert!(e.to_string().contains("bucket is empty"), "{e}");
    }

    #[test]
    fn credentials_dir_is_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("access_key_id"), "AKIAEXAMPLE\n").unwrap();
        std::fs::write(dir.path().join("secret_access_key"), "s3cr3t").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let mut spec = SourceSpec::new("s3://b/p").option("secret_access_key", "inline");
        spec.credentials_dir = Some(dir.path().to_path_buf());
        let r = spec.resolve().unwrap();
        assert_eq!(r.config["access_key_id"], "AKIAEXAMPLE");
        assert_eq!(r.config["secret_access_key"], "s3cr3t");
        let shown = format!("{r:?} {}", spec.redacted());
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("inline"),
            "{shown}"
        );
    }

    #[test]
    fn flags_override_the_spec() {
        let flags = SourceFlags {
            endpoint: Some("http://127.0.0.1:9000".into()),
            options: vec!["enable_virtual_host_style = true".into()],
            source_timeout: Some(std::time::Duration::from_secs(5).into()),
            ..Default::default()
        };
        let mut spec = SourceSpec::new("s3://b").option("endpoint", "http://old");
        flags.apply(&mut spec).unwrap();
        assert_eq!(spec.options["endpoint"], "http://127.0.0.1:9000");
        assert_eq!(spec.options["enable_virtual_host_style"], "true");
        assert_eq!(spec.timeout, std::time::Duration::from_secs(5));
        let bad = SourceFlags {
            options: vec!["novalue".into()],
            ..Default::default()
        };
        let e = bad.apply(&mut spec).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn secrets_are_refused_on_the_command_line_and_never_shown() {
        for key in SECRET_OPTION_KEYS.iter().copied().chain([
            "MyApiKey",
            "db_password",
            "x-auth-token",
            "client_secret",
        ]) {
            assert!(is_secret_option(key), "{key}");
            let flags = SourceFlags {
                options: vec![format!("{key}=hunter2")],
                ..Default::default()
            };
            let mut spec = SourceSpec::new("s3://b");
            let e = flags.apply(&mut spec).unwrap_err().to_string();
            assert!(e.contains("--credentials-dir") && e.contains(key), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
            assert!(spec.options.is_empty());
            let shown = SourceSpec::new("s3://b").option(key, "hunter2").redacted();
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        for key in ["endpoint", "region", "enable_virtual_host_style", "root"] {
            assert!(!is_secret_option(key), "{key}");
        }
    }

    #[test]
    fn missing_credentials_dir_is_a_clear_error() {
        let mut spec = SourceSpec::new("s3://b/p");
        spec.credentials_dir = Some("/nonexistent/creds".into());
        let e = spec.resolve().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/creds"), "{e}");
    }
}
