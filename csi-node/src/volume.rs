//! What a volume is: read from the CSI volume context, and handed to its FUSE server.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Volume context keys (the PV's `volumeAttributes`, or an inline volume's).
pub mod keys {
    /// The CacheNamespace's name.
    pub const CACHE_NAMESPACE: &str = "cacheNamespace";
    /// The CacheNamespace's Kubernetes namespace.
    pub const NAMESPACE: &str = "namespace";
    /// Optional static worker list, `id=endpoint,id=endpoint`, for use without the operator.
    pub const WORKERS: &str = "workers";
    /// Optional directory of the dataset to mount instead of its root.
    pub const SUB_PATH: &str = "subPath";
    /// Optional metadata TTL (`0s`: the data is immutable).
    pub const METADATA_TTL: &str = "metadataTTL";
    /// Optional read-ahead budget of the mount, in bytes or with a unit (`512MiB`).
    pub const PREFETCH_BUDGET: &str = "prefetchBudget";
    /// Optional size of the mount's node-local copies of whole files (`0` turns them off).
    pub const LOCAL_CACHE_SIZE: &str = "localCacheSize";
    /// Set by kubelet with `podInfoOnMount`.
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    /// Set by kubelet for a CSI ephemeral inline volume.
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
}

/// The secret key that holds the data-plane token (in the stage secret of a PV, or the publish
/// secret of an inline volume).
pub const TOKEN_KEY: &str = "token";

/// A problem with the request, phrased as what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ContextError(pub String);

/// A static worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub id: String,
    pub endpoint: String,
}

/// The parsed volume context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeContext {
    pub namespace: String,
    pub name: String,
    pub workers: Option<Vec<WorkerSpec>>,
    pub sub_path: String,
    pub metadata_ttl: Option<Duration>,
    pub prefetch_budget: Option<u64>,
    pub local_cache_size: Option<u64>,
    pub pod_namespace: Option<String>,
    pub ephemeral: bool,
}

impl VolumeContext {
    pub fn parse(ctx: &HashMap<String, String>) -> Result<Self, ContextError> {
        let get = |k: &str| ctx.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let pod_namespace = get(keys::POD_NAMESPACE).map(str::to_string);
        let ephemeral = get(keys::EPHEMERAL) == Some("true");
        let name = get(keys::CACHE_NAMESPACE).ok_or_else(|| {
            ContextError(format!(
                "the volume context has no {:?}: set volumeAttributes.{} to the CacheNamespace's name",
                keys::CACHE_NAMESPACE,
                keys::CACHE_NAMESPACE
            ))
        })?;
        // An inline volume may leave the namespace out: it is then the pod's.
        let namespace = get(keys::NAMESPACE)
            .or(pod_namespace.as_deref().filter(|_| ephemeral))
            .ok_or_else(|| {
                ContextError(format!(
                    "the volume context has no {:?}: set volumeAttributes.{} to the CacheNamespace's Kubernetes namespace",
                    keys::NAMESPACE,
                    keys::NAMESPACE
                ))
            })?;
        check_name(keys::NAMESPACE, namespace, 63)?;
        check_name(keys::CACHE_NAMESPACE, name, 253)?;
        if ephemeral && ctx.contains_key(keys::WORKERS) {
            // An inline volume is the tenant's own text: a worker list there would make the FUSE
            // server dial any address from the node's network (and report what it found). The
            // key is refused before its value is parsed, so a malformed one gets this answer too.
            return Err(ContextError(format!(
                "volumeAttributes.{} is accepted only on a PersistentVolume (an administrator's \
                 object), not on an inline volume: remove it; the FUSE server then reads the \
                 workers the operator publishes for CacheNamespace {}",
                keys::WORKERS,
                name
            )));
        }
        let workers = get(keys::WORKERS).map(parse_workers).transpose()?;
        let sub_path = match get(keys::SUB_PATH) {
            Some(p) => clean_sub_path(p)?,
            None => String::new(),
        };
        let metadata_ttl = get(keys::METADATA_TTL)
            .map(|v| {
                humantime::parse_duration(v).map_err(|e| {
                    ContextError(format!(
                        "volumeAttributes.{} {v:?} is not a duration (like 30s or 0s): {e}",
                        keys::METADATA_TTL
                    ))
                })
            })
            .transpose()?
            .filter(|d| !d.is_zero());
        let prefetch_budget = get(keys::PREFETCH_BUDGET)
            .map(|v| {
                v.parse::<bytesize::ByteSize>()
                    .map(|b| b.as_u64())
                    .map_err(|e| {
                        ContextError(format!(
                            "volumeAttributes.{} {v:?} is not a size (like 512MiB): {e}",
                            keys::PREFETCH_BUDGET
                        ))
                    })
            })
            .transpose()?;
        let local_cache_size = get(keys::LOCAL_CACHE_SIZE)
            .map(|v| {
                v.parse::<bytesize::ByteSize>()
                    .map(|b| b.as_u64())
                    .map_err(|e| {
                        ContextError(format!(
                            "volumeAttributes.{} {v:?} is not a size (like 8GiB, or 0 for none): {e}",
                            keys::LOCAL_CACHE_SIZE
                        ))
                    })
            })
            .transpose()?;
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            workers,
            sub_path,
            metadata_ttl,
            prefetch_budget,
            local_cache_size,
            pod_namespace,
            ephemeral,
        })
    }

    /// A pod may only mount a CacheNamespace of its own namespace. kubelet names the pod's
    /// namespace only with `podInfoOnMount` on the CSIDriver; without it the check cannot be
    /// made, so a volume that resolves a CacheNamespace is refused (fail closed). A static
    /// `workers` list, which only a PersistentVolume may carry, resolves nothing and needs no
    /// pod namespace.
    pub fn check_pod_namespace(&self) -> Result<(), ContextError> {
        match &self.pod_namespace {
            Some(pod_ns) if *pod_ns != self.namespace => Err(ContextError(format!(
                "a pod in namespace {pod_ns:?} may not mount CacheNamespace {}/{}: \
                 create the pod in namespace {:?}, or a CacheNamespace in {pod_ns:?}",
                self.namespace, self.name, self.namespace
            ))),
            None if self.workers.is_none() => Err(ContextError(format!(
                "kubelet did not say which namespace the pod is in ({} is missing), so the \
                 plugin cannot check that it may mount CacheNamespace {}/{}: set \
                 podInfoOnMount: true on the CSIDriver {}",
                keys::POD_NAMESPACE,
                self.namespace,
                self.name,
                crate::DRIVER_NAME
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a `prefetchBudget` or `localCacheSize` above the plugin's caps.
    pub fn check_caps(&self, caps: &Caps) -> Result<(), ContextError> {
        let over = |key: &str, asked: Option<u64>, cap: u64, flag: &str| match asked {
            Some(v) if cap > 0 && v > cap => Err(ContextError(format!(
                "volumeAttributes.{key} {} is more than this node allows ({}, the plugin's \
                 {flag}): ask for at most that",
                bytesize::ByteSize(v),
                bytesize::ByteSize(cap)
            ))),
            _ => Ok(()),
        };
        over(
            keys::PREFETCH_BUDGET,
            self.prefetch_budget,
            caps.max_prefetch_budget,
            "--max-prefetch-budget",
        )?;
        over(
            keys::LOCAL_CACHE_SIZE,
            self.local_cache_size,
            caps.max_local_cache_size,
            "--max-local-cache-size",
        )
    }
}

/// The most a volume may ask for; 0 is no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub max_prefetch_budget: u64,
    pub max_local_cache_size: u64,
}

/// The data-plane token of a stage or publish secret: `None` without a `token` key; an empty or
/// blank one is refused, never taken for "no authentication".
pub fn token_from_secrets(secrets: &HashMap<String, String>) -> Result<Option<&str>, ContextError> {
    match secrets.get(TOKEN_KEY) {
        None => Ok(None),
        Some(t) if t.trim().is_empty() => Err(ContextError(format!(
            "the secret's {TOKEN_KEY:?} key is empty: put the data-plane token in it"
        ))),
        Some(t) => Ok(Some(t.as_str())),
    }
}

/// A lowercase RFC 1123 name (a label when `max` is 63, a subdomain when 253).
fn check_name(key: &str, v: &str, max: usize) -> Result<(), ContextError> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || (c == b'.' && max > 63)
        })
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ContextError(format!(
            "volumeAttributes.{key} {v:?} is not a Kubernetes name (lowercase letters, digits and '-', at most {max} characters)"
        )))
    }
}

/// `id=endpoint,id=endpoint`; an endpoint without a scheme gets `http://`.
pub fn parse_workers(v: &str) -> Result<Vec<WorkerSpec>, ContextError> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, endpoint) = part.split_once('=').ok_or_else(|| {
            ContextError(format!(
                "volumeAttributes.{} entry {part:?} is not id=host:port",
                keys::WORKERS
            ))
        })?;
        let (id, endpoint) = (id.trim(), endpoint.trim());
        if id.is_empty() || endpoint.is_empty() {
            return Err(ContextError(format!(
                "volumeAttributes.{} entry {part:?} is not id=host:port",
                keys::WORKERS
            )));
        }
        let endpoint = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        out.push(WorkerSpec {
            id: id.to_string(),
            endpoint,
        });
    }
    if out.is_empty() {
        return Err(ContextError(format!(
            "volumeAttributes.{} is empty: list workers as id=host:port,… or leave it out",
            keys::WORKERS
        )));
    }
    Ok(out)
}

/// A relative path inside the volume: no `..`, no leading `/`.
fn clean_sub_path(p: &str) -> Result<String, ContextError> {
    let path = Path::new(p.trim_start_matches('/'));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(ContextError(format!(
                    "volumeAttributes.{} {p:?} must be a path inside the dataset, without '..'",
                    keys::SUB_PATH
                )));
            }
        }
    }
    Ok(out.to_string_lossy().into_owned())
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
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_full_context() {
        let c = VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=127.0.0.1:1, w1=http://h:2"),
            ("subPath", "/train/./a"),
            ("metadataTTL", "30s"),
            ("prefetchBudget", "64MiB"),
            ("localCacheSize", "2GiB"),
            (keys::POD_NAMESPACE, "ml"),
        ]))
        .unwrap();
        assert_eq!(c.name, "imagenet");
        assert_eq!(c.sub_path, "train/a");
        assert_eq!(
            c.workers.as_ref().unwrap()[0].endpoint,
            "http://127.0.0.1:1"
        );
        assert_eq!(c.workers.as_ref().unwrap()[1].endpoint, "http://h:2");
        assert_eq!(c.metadata_ttl, Some(Duration::from_secs(30)));
        assert_eq!(c.prefetch_budget, Some(64 << 20));
        assert_eq!(c.local_cache_size, Some(2 << 30));
        c.check_pod_namespace().unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_use_and_says_what_to_fix() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("namespace", "ml")], "cacheNamespace"),
            (&[("cacheNamespace", "x")], "namespace"),
            (
                &[("cacheNamespace", "X_Y"), ("namespace", "ml")],
                "Kubernetes name",
            ),
            (
                &[
                    ("cacheNamespace", "x"),
                    ("namespace", "ml"),
                    ("subPath", "../etc"),
                ],
                "'..'",
            ),
            (
                &[
                    ("cacheNamespace", "x"),
                    ("namespace", "ml"),
                    ("workers", "nohost"),
                ],
                "id=host:port",
            ),
            (
                &[
                    ("cacheNamespace", "x"),
                    ("namespace", "ml"),
                    ("metadataTTL", "soon"),
                ],
                "duration",
            ),
            (
                &[
                    ("cacheNamespace", "x"),
                    ("namespace", "ml"),
                    ("prefetchBudget", "lots"),
                ],
                "size",
            ),
        ];
        for (pairs, needle) in cases {
            let err = VolumeContext::parse(&ctx(pairs)).unwrap_err().to_string();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn a_pod_may_only_mount_its_own_namespace() {
        let c = VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            (keys::POD_NAMESPACE, "other"),
        ]))
        .unwrap();
        let err = c.check_pod_namespace().unwrap_err().to_string();
        assert!(
            err.contains("\"other\"") && err.contains("ml/imagenet"),
            "{err}"
        );
    }

    #[test]
    fn an_inline_volume_may_not_name_workers() {
        let err = VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("workers", "w0=10.0.0.1:22"),
            (keys::EPHEMERAL, "true"),
            (keys::POD_NAMESPACE, "team-a"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("only on a PersistentVolume"), "{err}");
        assert!(!err.contains("10.0.0.1"), "{err}");
        // A malformed or blank list gets the same answer, not a parse error that invites fixing
        // it.
        for bad in ["not a list", "w0=", ""] {
            let err = VolumeContext::parse(&ctx(&[
                ("cacheNamespace", "imagenet"),
                ("workers", bad),
                (keys::EPHEMERAL, "true"),
                (keys::POD_NAMESPACE, "team-a"),
            ]))
            .unwrap_err()
            .to_string();
            assert!(err.contains("only on a PersistentVolume"), "{bad:?}: {err}");
        }
        // A PersistentVolume (no ephemeral key) may.
        VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=10.0.0.1:22"),
        ]))
        .unwrap();
    }

    #[test]
    fn without_the_pods_namespace_only_a_static_worker_list_mounts() {
        let cn = VolumeContext::parse(&ctx(&[("cacheNamespace", "imagenet"), ("namespace", "ml")]))
            .unwrap();
        let err = cn.check_pod_namespace().unwrap_err().to_string();
        assert!(err.contains("podInfoOnMount"), "{err}");
        let inline = VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            (keys::EPHEMERAL, "true"),
        ]))
        .unwrap();
        assert!(inline.check_pod_namespace().is_err());
        let static_pv = VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=127.0.0.1:1"),
        ]))
        .unwrap();
        static_pv.check_pod_namespace().unwrap();
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
            VolumeContext::parse(&ctx(&all)).unwrap().check_caps(&caps)
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
        VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "x"),
            ("namespace", "ml"),
            ("prefetchBudget", "100GiB"),
        ]))
        .unwrap()
        .check_caps(&Caps::default())
        .unwrap();
    }

    #[test]
    fn a_blank_token_is_refused_and_a_missing_one_is_none() {
        assert_eq!(token_from_secrets(&ctx(&[])).unwrap(), None);
        assert_eq!(
            token_from_secrets(&ctx(&[("token", "t")])).unwrap(),
            Some("t")
        );
        for blank in ["", " ", "\n\t"] {
            let e = token_from_secrets(&ctx(&[("token", blank)])).unwrap_err();
            assert!(e.to_string().contains("empty"), "{e}");
        }
    }

    #[test]
    fn an_inline_volume_defaults_to_the_pods_namespace() {
        let c = VolumeContext::parse(&ctx(&[
            ("cacheNamespace", "imagenet"),
            (keys::EPHEMERAL, "true"),
            (keys::POD_NAMESPACE, "team-a"),
        ]))
        .unwrap();
        assert!(c.ephemeral);
        assert_eq!(c.namespace, "team-a");
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
