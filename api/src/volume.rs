//! A lakecache volume's attributes: the contract between whoever writes a volume (the operator's
//! PersistentVolume, an administrator's static PV, a tenant's inline volume) and the CSI node
//! plugin that reads it from the volume context.
//!
//! The keys and their parsing live here, with the driver's name and the token key, so that the
//! operator and the plugin share one definition. Parsing is strict and says what to fix: a
//! volume context is partly tenant text, so an inline volume may not name worker addresses, and a
//! sub path may not climb out of the dataset.

use std::collections::{BTreeMap, HashMap};
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
pub struct AttributeError(pub String);

/// A static worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub id: String,
    pub endpoint: String,
}

/// A volume's attributes, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttributes {
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

impl VolumeAttributes {
    pub fn from_map(ctx: &HashMap<String, String>) -> Result<Self, AttributeError> {
        let get = |k: &str| ctx.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let pod_namespace = get(keys::POD_NAMESPACE).map(str::to_string);
        let ephemeral = get(keys::EPHEMERAL) == Some("true");
        let name = get(keys::CACHE_NAMESPACE).ok_or_else(|| {
            AttributeError(format!(
                "the volume context has no {:?}: set volumeAttributes.{} to the CacheNamespace's name",
                keys::CACHE_NAMESPACE,
                keys::CACHE_NAMESPACE
            ))
        })?;
        // An inline volume may leave the namespace out: it is then the pod's.
        let namespace = get(keys::NAMESPACE)
            .or(pod_namespace.as_deref().filter(|_| ephemeral))
            .ok_or_else(|| {
                AttributeError(format!(
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
            return Err(AttributeError(format!(
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
                    AttributeError(format!(
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
                        AttributeError(format!(
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
                        AttributeError(format!(
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

    /// The attributes of a volume of CacheNamespace `namespace/name`, with nothing else set.
    pub fn of(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            workers: None,
            sub_path: String::new(),
            metadata_ttl: None,
            prefetch_budget: None,
            local_cache_size: None,
            pod_namespace: None,
            ephemeral: false,
        }
    }

    /// The volume context that [`Self::from_map`] reads back as `self`.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([
            (keys::CACHE_NAMESPACE.to_string(), self.name.clone()),
            (keys::NAMESPACE.to_string(), self.namespace.clone()),
        ]);
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        if let Some(ws) = &self.workers {
            let list: Vec<String> = ws
                .iter()
                .map(|w| format!("{}={}", w.id, w.endpoint))
                .collect();
            put(keys::WORKERS, list.join(","));
        }
        if !self.sub_path.is_empty() {
            put(keys::SUB_PATH, self.sub_path.clone());
        }
        if let Some(t) = self.metadata_ttl {
            put(
                keys::METADATA_TTL,
                humantime::format_duration(t).to_string(),
            );
        }
        if let Some(b) = self.prefetch_budget {
            put(keys::PREFETCH_BUDGET, b.to_string());
        }
        if let Some(b) = self.local_cache_size {
            put(keys::LOCAL_CACHE_SIZE, b.to_string());
        }
        if let Some(ns) = &self.pod_namespace {
            put(keys::POD_NAMESPACE, ns.clone());
        }
        if self.ephemeral {
            put(keys::EPHEMERAL, "true".into());
        }
        m
    }

    /// A pod may only mount a CacheNamespace of its own namespace. kubelet names the pod's
    /// namespace only with `podInfoOnMount` on the CSIDriver; without it the check cannot be
    /// made, so a volume that resolves a CacheNamespace is refused (fail closed). A static
    /// `workers` list, which only a PersistentVolume may carry, resolves nothing and needs no
    /// pod namespace.
    pub fn check_pod_namespace(&self) -> Result<(), AttributeError> {
        match &self.pod_namespace {
            Some(pod_ns) if *pod_ns != self.namespace => Err(AttributeError(format!(
                "a pod in namespace {pod_ns:?} may not mount CacheNamespace {}/{}: \
                 create the pod in namespace {:?}, or a CacheNamespace in {pod_ns:?}",
                self.namespace, self.name, self.namespace
            ))),
            None if self.workers.is_none() => Err(AttributeError(format!(
                "kubelet did not say which namespace the pod is in ({} is missing), so the \
                 plugin cannot check that it may mount CacheNamespace {}/{}: set \
                 podInfoOnMount: true on the CSIDriver {}",
                keys::POD_NAMESPACE,
                self.namespace,
                self.name,
                crate::CSI_DRIVER
            ))),
            _ => Ok(()),
        }
    }
}

/// The data-plane token of a stage or publish secret: `None` without a `token` key; an empty or
/// blank one is refused, never taken for "no authentication".
pub fn token_from_secrets(
    secrets: &HashMap<String, String>,
) -> Result<Option<&str>, AttributeError> {
    match secrets.get(TOKEN_KEY) {
        None => Ok(None),
        Some(t) if t.trim().is_empty() => Err(AttributeError(format!(
            "the secret's {TOKEN_KEY:?} key is empty: put the data-plane token in it"
        ))),
        Some(t) => Ok(Some(t.as_str())),
    }
}

/// A lowercase RFC 1123 name (a label when `max` is 63, a subdomain when 253).
fn check_name(key: &str, v: &str, max: usize) -> Result<(), AttributeError> {
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
        Err(AttributeError(format!(
            "volumeAttributes.{key} {v:?} is not a Kubernetes name (lowercase letters, digits and '-', at most {max} characters)"
        )))
    }
}

/// `id=endpoint,id=endpoint`; an endpoint without a scheme gets `http://`.
pub fn parse_workers(v: &str) -> Result<Vec<WorkerSpec>, AttributeError> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, endpoint) = part.split_once('=').ok_or_else(|| {
            AttributeError(format!(
                "volumeAttributes.{} entry {part:?} is not id=host:port",
                keys::WORKERS
            ))
        })?;
        let (id, endpoint) = (id.trim(), endpoint.trim());
        if id.is_empty() || endpoint.is_empty() {
            return Err(AttributeError(format!(
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
        return Err(AttributeError(format!(
            "volumeAttributes.{} is empty: list workers as id=host:port,… or leave it out",
            keys::WORKERS
        )));
    }
    Ok(out)
}

/// A relative path inside the volume: no `..`, no leading `/`.
fn clean_sub_path(p: &str) -> Result<String, AttributeError> {
    let path = Path::new(p.trim_start_matches('/'));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(AttributeError(format!(
                    "volumeAttributes.{} {p:?} must be a path inside the dataset, without '..'",
                    keys::SUB_PATH
                )));
            }
        }
    }
    Ok(out.to_string_lossy().into_owned())
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
        let c = VolumeAttributes::from_map(&ctx(&[
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
            let err = VolumeAttributes::from_map(&ctx(pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn a_pod_may_only_mount_its_own_namespace() {
        let c = VolumeAttributes::from_map(&ctx(&[
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
        let err = VolumeAttributes::from_map(&ctx(&[
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
            let err = VolumeAttributes::from_map(&ctx(&[
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
        VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=10.0.0.1:22"),
        ]))
        .unwrap();
    }

    #[test]
    fn without_the_pods_namespace_only_a_static_worker_list_mounts() {
        let cn = VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
        ]))
        .unwrap();
        let err = cn.check_pod_namespace().unwrap_err().to_string();
        assert!(err.contains("podInfoOnMount"), "{err}");
        let inline = VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            (keys::EPHEMERAL, "true"),
        ]))
        .unwrap();
        assert!(inline.check_pod_namespace().is_err());
        let static_pv = VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=127.0.0.1:1"),
        ]))
        .unwrap();
        static_pv.check_pod_namespace().unwrap();
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
        let c = VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "imagenet"),
            (keys::EPHEMERAL, "true"),
            (keys::POD_NAMESPACE, "team-a"),
        ]))
        .unwrap();
        assert!(c.ephemeral);
        assert_eq!(c.namespace, "team-a");
    }

    #[test]
    fn attributes_round_trip_through_the_map() {
        let full = VolumeAttributes::from_map(&ctx(&[
            ("cacheNamespace", "imagenet"),
            ("namespace", "ml"),
            ("workers", "w0=127.0.0.1:1,w1=http://h:2"),
            ("subPath", "train"),
            ("metadataTTL", "1m 30s"),
            ("prefetchBudget", "64MiB"),
            ("localCacheSize", "0"),
            (keys::POD_NAMESPACE, "ml"),
        ]))
        .unwrap();
        let back: HashMap<String, String> = full.to_map().into_iter().collect();
        assert_eq!(VolumeAttributes::from_map(&back).unwrap(), full);
        let plain = VolumeAttributes::of("ml", "imagenet");
        assert_eq!(
            plain.to_map().keys().collect::<Vec<_>>(),
            [keys::CACHE_NAMESPACE, keys::NAMESPACE]
        );
        let back: HashMap<String, String> = plain.to_map().into_iter().collect();
        assert_eq!(VolumeAttributes::from_map(&back).unwrap(), plain);
    }
}
