//! [`Source`] over OpenDAL.

use std::future::IntoFuture;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{EntryMode, ErrorKind, Operator};

use crate::spec::{HDFS_SERVICE, HDFS_USER_ENV, HDFS_USER_OPTION};
use crate::{DirEntry, Kind, LakeError, ObjectMeta, Result, Source, SourceSpec, SpecError};

/// Versions made up from modification time and size carry this prefix; they cannot be used as
/// an `If-Match` condition.
const SYNTHETIC_VERSION: &str = "mtime:";

/// A lake read through OpenDAL, with per-attempt timeouts, retries, and an overall deadline.
pub struct OpendalSource {
    op: Operator,
    describe: String,
    deadline: Duration,
    if_match: bool,
}

impl OpendalSource {
    pub fn new(spec: &SourceSpec) -> Result<Self, SpecError> {
        opendal::install_default();
        let resolved = spec.resolve()?;
        if resolved.scheme == "fs" {
            let root = resolved
                .config
                .get("root")
                .map(String::as_str)
                .unwrap_or("/");
            if !std::path::Path::new(root).is_dir() {
                return Err(SpecError::BadUri(
                    spec.uri.clone(),
                    format!("{root} is not a directory on this machine"),
                ));
            }
        }
        let op = if resolved.scheme == HDFS_SERVICE {
            hdfs_operator(spec, &resolved.config)?
        } else {
            Operator::via_iter(&resolved.scheme, resolved.config.clone())
        }
        .map_err(|e| SpecError::Build(format!("{}: {e}", spec.redacted())))?;
        let attempts = spec.retries as u32 + 1;
        let per_attempt = (spec.timeout / attempts).max(Duration::from_millis(200));
        let op = op
            .layer(
                TimeoutLayer::new()
                    .with_timeout(per_attempt)
                    .with_io_timeout(per_attempt),
            )
            .layer(
                RetryLayer::new()
                    .with_max_times(spec.retries)
                    .with_min_delay(Duration::from_millis(20))
                    .with_max_delay(Duration::from_millis(500))
                    .with_jitter(),
            );
        let if_match = op.info().capability().read_with_if_match;
        Ok(Self {
            op,
            describe: spec.redacted(),
            deadline: spec.timeout,
            if_match,
        })
    }

    /// The OpenDAL operator underneath (tests fill a `memory://` lake through it).
    pub fn operator(&self) -> &Operator {
        &self.op
    }

    async fn bounded<T>(
        &self,
        path: &str,
        fut: impl IntoFuture<Output = opendal::Result<T>>,
    ) -> Result<T> {
        self.bounded_until(tokio::time::Instant::now() + self.deadline, path, fut)
            .await
    }

    /// [`Self::bounded`] with the deadline of a call that made others before (a read and its
    /// version check share one).
    async fn bounded_until<T>(
        &self,
        until: tokio::time::Instant,
        path: &str,
        fut: impl IntoFuture<Output = opendal::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout_at(until, fut.into_future()).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(path, e)),
            Err(_) => Err(LakeError::Unavailable(format!(
                "{path}: no answer from {} within {:?}",
                self.describe, self.deadline
            ))),
        }
    }
}

/// An `hdfs://` source through OpenDAL's `hdfs-native` service. Its configuration carries a map
/// of client settings, which `Operator::via_iter` cannot fill from strings: every option but
/// the namenode, the root and the user goes there (`dfs.ha.namenodes.NS`,
/// `dfs.namenode.rpc-address.NS.NN`, `dfs.client.socket-timeout`, …).
fn hdfs_operator(
    spec: &SourceSpec,
    config: &std::collections::BTreeMap<String, String>,
) -> Result<opendal::Result<Operator>, SpecError> {
    if let Some(user) = config.get(HDFS_USER_OPTION) {
        // The client reads the user from the environment only; `process_env` sets it at start.
        let env = std::env::var(HDFS_USER_ENV).ok();
        if env.as_deref() != Some(user.as_str()) {
            return Err(SpecError::Build(format!(
                "{}: the HDFS user {user:?} must be in {HDFS_USER_ENV} when the process starts \
                 (lakecache and lakecache-worker set it from the `user` option; found {env:?})",
                spec.redacted()
            )));
        }
    }
    let (name_node, client) = hdfs_client_settings(config);
    let mut builder = opendal::services::HdfsNative::default().name_node(&name_node);
    if let Some(root) = config.get("root") {
        builder = builder.root(root);
    }
    if !client.is_empty() {
        builder = builder.options(client);
    }
    Ok(Operator::new(builder))
}

/// The name service OpenDAL's `hdfs-native` service always connects to: it turns its
/// `name_node` (`hdfs://nn1:8020,nn2:8020`) into this service's namenodes.
const OPENDAL_NAME_SERVICE: &str = "nameservice";
/// The namenode's RPC port when a URI gives a host without one.
const HDFS_DEFAULT_PORT: u16 = 8020;

/// The `name_node` to give OpenDAL and the client settings, from a resolved `hdfs://` source.
/// An authority with ports (`nn:8020`, `nn1:8020,nn2:8020`) is used as it is. An authority
/// without one is a name service when the options configure it (`dfs.ha.namenodes.NS`): as
/// OpenDAL always asks for its own name service, every setting keyed by `NS` is renamed to
/// it. Otherwise it is a host, on port 8020.
fn hdfs_client_settings(
    config: &std::collections::BTreeMap<String, String>,
) -> (String, std::collections::HashMap<String, String>) {
    let name_node = config.get("name_node").cloned().unwrap_or_default();
    let authority = name_node.trim_start_matches("hdfs://").to_string();
    let name_service = !authority.contains([':', ',', '['])
        && config.contains_key(&format!("dfs.ha.namenodes.{authority}"));
    let mut client = std::collections::HashMap::new();
    for (k, v) in config {
        if matches!(k.as_str(), "name_node" | "root" | HDFS_USER_OPTION) {
            continue;
        }
        let key = if name_service {
            let segment = format!(".{authority}.");
            let suffix = format!(".{authority}");
            if k.contains(&segment) {
                k.replace(&segment, &format!(".{OPENDAL_NAME_SERVICE}."))
            } else if let Some(head) = k.strip_suffix(&suffix) {
                format!("{head}.{OPENDAL_NAME_SERVICE}")
            } else {
                k.clone()
            }
        } else {
            k.clone()
        };
        client.insert(key, v.clone());
    }
    let name_node = if name_service || authority.contains([':', ',']) {
        name_node
    } else {
        format!("hdfs://{authority}:{HDFS_DEFAULT_PORT}")
    };
    (name_node, client)
}

/// `message` with every URL's query string cut off: a signed URL carries its signature there,
/// and an Azure SAS token is one (`…?sv=…&sig=…`). OpenDAL puts request URLs in its errors.
fn without_queries(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("://") {
        let (before, url) = rest.split_at(at);
        out.push_str(before);
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, ',' | '}' | ')' | '"' | '\''))
            .unwrap_or(url.len());
        let (url, after) = url.split_at(end);
        match url.find('?') {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?…");
            }
            None => out.push_str(url),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn map_err(path: &str, e: opendal::Error) -> LakeError {
    let path = path.to_string();
    let kind = e.kind();
    let message = without_queries(&e.to_string());
    // The HDFS client reports the namenode's refusal as an unexpected error: it is the user's
    // permissions, not the source being away. Its message carries the namenode's Java stack:
    // the first line says it all.
    if kind == ErrorKind::Unexpected && message.contains("AccessControlException") {
        return LakeError::PermissionDenied {
            path: if path.is_empty() { "/".into() } else { path },
            message: message.lines().next().unwrap_or_default().to_string(),
        };
    }
    match kind {
        ErrorKind::NotFound => LakeError::NotFound { path },
        ErrorKind::ConditionNotMatch | ErrorKind::RangeNotSatisfied => LakeError::Changed {
            path,
            expected: String::new(),
        },
        ErrorKind::PermissionDenied => LakeError::PermissionDenied {
            path: if path.is_empty() { "/".into() } else { path },
            message,
        },
        ErrorKind::ConfigInvalid
        | ErrorKind::Unsupported
        | ErrorKind::IsADirectory
        | ErrorKind::NotADirectory => LakeError::Other { path, message },
        _ => LakeError::Unavailable(format!("{path}: {message}")),
    }
}

fn version_of(meta: &opendal::Metadata) -> String {
    if let Some(etag) = meta.etag() {
        return etag.trim_matches('"').to_string();
    }
    if let Some(v) = meta.version() {
        return v.to_string();
    }
    let nanos = meta
        .last_modified()
        .map(SystemTime::from)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{SYNTHETIC_VERSION}{nanos}-{}", meta.content_length())
}

fn meta_of(meta: &opendal::Metadata) -> ObjectMeta {
    match meta.mode() {
        EntryMode::DIR => ObjectMeta::directory(),
        _ => ObjectMeta {
            kind: Kind::File,
            size: meta.content_length(),
            version: version_of(meta),
            modified: meta.last_modified().map(SystemTime::from),
        },
    }
}

#[async_trait]
impl Source for OpendalSource {
    async fn stat(&self, path: &str) -> Result<ObjectMeta> {
        if path.is_empty() {
            return Ok(ObjectMeta::directory());
        }
        match self.bounded(path, self.op.stat(path)).await {
            Ok(m) => Ok(meta_of(&m)),
            Err(LakeError::NotFound { .. }) => {
                // Object stores have no directories: a path is one if something lies under it.
                let dir = format!("{path}/");
                let found = self.bounded(path, self.op.list_with(&dir).limit(1)).await?;
                if found.is_empty() {
                    Err(LakeError::NotFound {
                        path: path.to_string(),
                    })
                } else {
                    Ok(ObjectMeta::directory())
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>> {
        let listed = if dir.is_empty() {
            "/".to_string()
        } else {
            format!("{dir}/")
        };
        let entries = self
            .bounded(dir, self.op.list_with(&listed).recursive(false))
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let path = entry.path().trim_matches('/');
            if path == dir || path.is_empty() {
                continue;
            }
            let name = entry.name().trim_end_matches('/').to_string();
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let m = entry.metadata();
            let meta = if m.mode() == EntryMode::DIR {
                ObjectMeta::directory()
            } else if m.etag().is_none() && m.last_modified().is_none() {
                // Some services list names only; ask for the rest.
                let full = crate::join(dir, &name);
                meta_of(&self.bounded(&full, self.op.stat(&full)).await?)
            } else {
                meta_of(m)
            };
            out.push(DirEntry { name, meta });
        }
        if out.is_empty() && !dir.is_empty() {
            // An empty listing of a path that is not a directory is a miss, not an empty folder.
            let m = self.stat(dir).await?;
            if !m.is_dir() {
                return Err(LakeError::Other {
                    path: dir.to_string(),
                    message: "not a directory".into(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }

    async fn read(&self, path: &str, version: &str, start: u64, end: u64) -> Result<Bytes> {
        if end <= start {
            return Ok(Bytes::new());
        }
        let mut req = self.op.read_with(path).range(start..end);
        // A weak ETag (`W/"…"`) cannot be an If-Match condition.
        let conditional = self.if_match
            && !version.is_empty()
            && !version.starts_with(SYNTHETIC_VERSION)
            && !version.starts_with("W/");
        if conditional {
            req = req.if_match(&format!("\"{version}\""));
        }
        let changed = || LakeError::Changed {
            path: path.to_string(),
            expected: version.to_string(),
        };
        let until = tokio::time::Instant::now() + self.deadline;
        let buf = self
            .bounded_until(until, path, req)
            .await
            .map_err(|e| match e {
                LakeError::Changed { .. } => changed(),
                e => e,
            })?;
        let bytes = buf.to_bytes();
        if bytes.len() as u64 != end - start {
            return Err(changed());
        }
        if !self.if_match && !version.is_empty() {
            // A store with no conditional read at all (HDFS, local files): the version is asked
            // for again after the bytes came. An object rewritten before or while they were
            // read has a new modification time or length by then, so its bytes are never
            // mixed with the old version's blocks; the price is one metadata call per block
            // read from the lake. There, listings and stat give the same fields, so an
            // unchanged object always compares equal. (Not on the stores with If-Match: an
            // S3-compatible store may list no ETag and times in milliseconds, and answer a
            // HEAD with an ETag and whole seconds.)
            let now = self.bounded_until(until, path, self.op.stat(path)).await?;
            if version_of(&now) != version {
                return Err(changed());
            }
        }
        Ok(bytes)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_local_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f.bin"), b"hello world").unwrap();
        std::fs::write(dir.path().join("top"), b"x").unwrap();
        let uri = format!("file://{}", dir.path().display());
        let src = OpendalSource::new(&SourceSpec::new(uri)).unwrap();
        let root = src.list("").await.unwrap();
        let names: Vec<_> = root
            .iter()
            .map(|e| (e.name.as_str(), e.meta.kind))
            .collect();
        assert_eq!(names, vec![("a", Kind::Directory), ("top", Kind::File)]);
        let files = src.list("a/b").await.unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].meta.size, 11);
        let st = src.stat("a/b/f.bin").await.unwrap();
        assert_eq!(st, files[0].meta, "list and stat agree on the version");
        assert!(src.stat("a").await.unwrap().is_dir());
        let bytes = src.read("a/b/f.bin", &st.version, 6, 11).await.unwrap();
        assert_eq!(&bytes[..], b"world");
        assert!(matches!(
            src.stat("nope").await,
            Err(LakeError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn an_object_rewritten_without_if_match_is_never_read_mixed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.bin");
        std::fs::write(&file, vec![1u8; 4096]).unwrap();
        let src = OpendalSource::new(&SourceSpec::new(format!("file://{}", dir.path().display())))
            .unwrap();
        assert!(!src.if_match, "local files have no If-Match");
        let old = src.stat("f.bin").await.unwrap();
        assert!(old.version.starts_with(SYNTHETIC_VERSION), "{old:?}");
        assert_eq!(
            &src.read("f.bin", &old.version, 0, 8).await.unwrap()[..],
            [1u8; 8]
        );
        // Same length, new bytes: only the modification time tells.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, vec![2u8; 4096]).unwrap();
        let e = src.read("f.bin", &old.version, 8, 16).await.unwrap_err();
        assert!(matches!(e, LakeError::Changed { .. }), "{e}");
        let new = src.stat("f.bin").await.unwrap();
        assert_eq!(
            &src.read("f.bin", &new.version, 8, 16).await.unwrap()[..],
            [2u8; 8]
        );
    }

    #[test]
    fn an_hdfs_name_service_is_renamed_to_the_one_opendal_asks_for() {
        let config = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (nn, client) = hdfs_client_settings(&config(&[
            ("name_node", "hdfs://prod"),
            ("root", "/x"),
            ("user", "alice"),
            ("dfs.ha.namenodes.prod", "a,b"),
            ("dfs.namenode.rpc-address.prod.a", "nn-a:8020"),
            ("dfs.namenode.rpc-address.prod.b", "nn-b:8020"),
            ("dfs.client.socket-timeout", "20000"),
        ]));
        assert_eq!(nn, "hdfs://prod");
        let want = config(&[
            ("dfs.ha.namenodes.nameservice", "a,b"),
            ("dfs.namenode.rpc-address.nameservice.a", "nn-a:8020"),
            ("dfs.namenode.rpc-address.nameservice.b", "nn-b:8020"),
            ("dfs.client.socket-timeout", "20000"),
        ]);
        assert_eq!(
            client
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
            want
        );
        // A host without a port is a namenode on the default one; ports are kept.
        let (nn, _) = hdfs_client_settings(&config(&[("name_node", "hdfs://nn")]));
        assert_eq!(nn, "hdfs://nn:8020");
        let (nn, _) = hdfs_client_settings(&config(&[("name_node", "hdfs://a:1,b:2")]));
        assert_eq!(nn, "hdfs://a:1,b:2");
    }

    #[test]
    fn signed_urls_lose_their_query_in_messages() {
        let m = "PermissionDenied at read, context: { uri: https://acct.blob.core.windows.net/c/a%20b?sv=2022&sig=SECRETSIG, url: http://h:1/p?X-Amz-Signature=abc }, tail";
        let got = without_queries(m);
        assert!(!got.contains("SECRETSIG") && !got.contains("abc"), "{got}");
        assert!(
            got.contains("https://acct.blob.core.windows.net/c/a%20b?…,")
                && got.contains("http://h:1/p?… }")
                && got.ends_with(", tail"),
            "{got}"
        );
        assert_eq!(without_queries("no url here"), "no url here");
    }

    #[test]
    fn an_hdfs_user_not_in_the_environment_is_refused_clearly() {
        let spec = SourceSpec::new("hdfs://127.0.0.1:1/x").option("user", "nobody-lakecache");
        let Err(e) = OpendalSource::new(&spec) else {
            panic!("built an HDFS source whose user the client would not use");
        };
        assert!(e.to_string().contains("HADOOP_USER_NAME"), "{e}");
    }
}
