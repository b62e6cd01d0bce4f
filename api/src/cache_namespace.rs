//! `CacheNamespace`: one dataset in a lake, cached by a set of workers and mounted as a volume.

// clippy reads the repeated keys of several `printcolumn(…)` groups as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SpecError;
use crate::quantity::{parse_bytes, parse_duration};

/// Which source option keys hold secrets, which must come from the credentials Secret, never
/// the spec: the lake's rule (also its log masking and its command-line check), so that the
/// CRD refuses exactly what the data plane treats as secret.
pub use lakecache_lake::{SECRET_OPTION_KEYS, SECRET_OPTION_PATTERNS, is_secret_option};

/// The CEL rule on `spec.source.options`: what [`is_secret_option`] says, for the API server.
/// Keys are compared lower-cased (`lowerAscii`, of the Kubernetes CEL strings library), so
/// `Secret_Access_Key` and `MyApiKey` are refused too.
pub fn secret_options_rule() -> String {
    let keys = SECRET_OPTION_KEYS
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let patterns = SECRET_OPTION_PATTERNS
        .iter()
        .map(|p| format!("k.lowerAscii().contains('{p}')"))
        .collect::<Vec<_>>()
        .join(" || ");
    format!("!self.exists(k, k.lowerAscii().trim() in [{keys}] || {patterns})")
}

/// The smallest and largest block sizes.
pub const MIN_BLOCK_SIZE: u64 = 64 << 10;
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// The block size when the spec leaves it out.
pub const DEFAULT_BLOCK_SIZE: &str = "4Mi";
/// The data-plane port when the spec leaves it out.
pub const DEFAULT_WORKER_PORT: i32 = 7700;

/// A CacheNamespace caches one dataset of a data lake (an object-store prefix) in the memory and
/// local disks of a set of cache workers, and makes it mountable, read-only, by every pod of its
/// namespace through a PersistentVolumeClaim of the same name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lakecache.io",
    version = "v1alpha1",
    kind = "CacheNamespace",
    plural = "cachenamespaces",
    shortname = "cns",
    category = "lakecache",
    namespaced,
    doc = "A CacheNamespace caches one dataset of a data lake in the memory and local disks of a set of cache workers, and serves it read-only to the pods of its namespace through a PersistentVolumeClaim of the same name.",
    validation = Rule::new("self.metadata.name.size() <= 45").message("metadata.name must be at most 45 characters: worker pod names are built from it"),
    status = "CacheNamespaceStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Ready, Degraded or Failed"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyWorkers",
        description = "Workers that are ready"
    ),
    printcolumn(
        name = "Workers",
        type_ = "integer",
        json_path = ".spec.workers.replicas",
        description = "Workers asked for"
    ),
    printcolumn(
        name = "Cached",
        type_ = "string",
        json_path = ".status.cachedPercentage",
        description = "Share of the source that is cached"
    ),
    printcolumn(
        name = "Hit ratio",
        type_ = "number",
        json_path = ".status.hitRatio",
        description = "Block reads served from the cache, of all block reads"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.source.uri",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct CacheNamespaceSpec {
    /// Where the dataset lives.
    pub source: SourceSpec,

    /// The cache workers: how many, which image, where they run and what they may use.
    #[serde(default)]
    pub workers: WorkersSpec,

    /// The cache tiers of every worker, fastest first: at most one Memory tier (a RAM-backed
    /// emptyDir) and at most one Disk tier (a directory on the node, or a volume per worker).
    #[x_kube(validation = Rule::new("self.filter(t, t.kind == 'Memory').size() <= 1").message("tiers: at most one Memory tier"))]
    #[x_kube(validation = Rule::new("self.filter(t, t.kind == 'Disk').size() <= 1").message("tiers: at most one Disk tier"))]
    #[schemars(length(min = 1, max = 2))]
    pub tiers: Vec<TierSpec>,

    /// The size of a cache block, a power of two from 64Ki to 256Mi (default 4Mi). Files are read
    /// and cached in blocks of this size; large sequential files favour larger blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isInteger() && quantity(self).asInteger() in [65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456]").message("blockSize must be a power of two from 64Ki to 256Mi, like 4Mi"))]
    #[schemars(length(max = 32))]
    pub block_size: Option<String>,

    /// How long listings and file attributes may be cached.
    #[serde(default)]
    pub metadata: MetadataSpec,
}

/// The data lake location and how to reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// The dataset's location: `s3://bucket/prefix`, `oss://bucket/prefix` (Alibaba Cloud OSS),
    /// `gs://bucket/prefix`, `azblob://container/prefix`, `hdfs://namenode:8020/prefix`
    /// (`hdfs://nn1:8020,nn2:8020/prefix` for an HA pair, `hdfs://NAMESERVICE/prefix` with the
    /// client's `dfs.ha.namenodes.NAMESERVICE` options; the user is the option `user`), or
    /// `file:///path` (a directory that exists on every node that runs a worker).
    #[x_kube(validation = Rule::new("self.matches('^(s3|oss|gs|azblob)://[A-Za-z0-9][A-Za-z0-9._-]*(/.*)?$') || self.matches('^hdfs://[A-Za-z0-9][A-Za-z0-9.,:_-]*(/.*)?$') || self.matches('^file:///.*')").message("source.uri must be s3://bucket/prefix, oss://bucket/prefix, gs://bucket/prefix, azblob://container/prefix, hdfs://namenode:port/prefix or file:///path"))]
    #[schemars(length(max = 1024))]
    pub uri: String,

    /// The service endpoint, such as `https://s3.us-east-1.amazonaws.com` or, for OSS,
    /// `https://oss-cn-hangzhou-internal.aliyuncs.com`. Optional for S3 (derived from the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/]+')").message("source.endpoint must be an http:// or https:// URL"))]
    #[schemars(length(max = 1024))]
    pub endpoint: Option<String>,

    /// The region of the bucket (S3), if the service needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// A Secret in the CacheNamespace's namespace whose keys are credentials, mounted into the
    /// workers as files: `access_key_id` and `secret_access_key` (S3, OSS via
    /// `access_key_secret`), `credential` (GCS service-account JSON), `account_name` and
    /// `account_key` (Azure). Leave it out for public buckets or node credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// Further non-secret options of the storage service (OpenDAL's names, such as
    /// `enable_virtual_host_style: "true"`; for HDFS, `user` and the client's own settings
    /// such as `dfs.ha.namenodes.NS`), at most 64. Credentials are refused here (known
    /// credential keys, and any key whose name contains `key`, `secret`, `token` or `password`,
    /// in any case): use credentialsSecretRef.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(secret_options_rule()).message("source.options must not hold credentials (access_key_id, secret_access_key, token, any key that contains key, secret, token or password, …): put them in the Secret named by source.credentialsSecretRef"))]
    #[schemars(extend("maxProperties" = 64))]
    pub options: BTreeMap<String, String>,

    /// The deadline of one request to the source, retries included, as a duration (default
    /// 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("source.timeout must be a duration of at least 1s, like 30s"))]
    #[schemars(length(max = 32))]
    pub timeout: Option<String>,
}

/// A Secret in the same namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// The Secret's name.
    pub name: String,
}

/// The worker StatefulSet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    /// How many workers cache the dataset (default 1). Blocks are spread over all of them;
    /// `kubectl scale cachenamespace NAME --replicas=N` changes it.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The worker image (default: the operator's `--worker-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// When to pull the image: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("workers.imagePullPolicy must be Always, IfNotPresent or Never"))]
    #[schemars(length(max = 16))]
    pub image_pull_policy: Option<String>,

    /// CPU and memory of each worker. A Memory tier lives in the worker's memory, so its memory
    /// limit must leave room for it: without a limit here the operator sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Nodes the workers may run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity of the worker pods (by default they prefer distinct nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// The priority class of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// The data-plane port (default 7700); the admin port (metrics, probes) is the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65534))]
    pub port: Option<i32>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            image: None,
            image_pull_policy: None,
            resources: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            priority_class_name: None,
            port: None,
        }
    }
}

/// A kind of cache tier.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TierKind {
    /// RAM: a memory-backed emptyDir of each worker.
    Memory,
    /// Local disk: a directory on the node, or a volume per worker.
    Disk,
}

impl TierKind {
    /// The tier's metric label.
    pub fn label(&self) -> &'static str {
        match self {
            TierKind::Memory => "memory",
            TierKind::Disk => "disk",
        }
    }
}

/// One cache tier of each worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'Disk' ? (has(self.path) != has(self.storageClassName)) : (!has(self.path) && !has(self.storageClassName))").message("a Disk tier needs exactly one of path (a directory on the node) and storageClassName (a volume per worker); a Memory tier takes neither"))]
pub struct TierSpec {
    /// Memory or Disk.
    pub kind: TierKind,

    /// How much each worker may keep in this tier, as a quantity (`4Gi`, `500Gi`).
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("tiers[].size must be a quantity greater than 0, like 4Gi"))]
    #[schemars(length(max = 32))]
    pub size: String,

    /// Disk: a directory on the node (a hostPath), one of those the cluster admin allows (the
    /// chart's `workers.allowedHostPathRoots`, by default `/var/lib/lakecache`); any other path
    /// turns the CacheNamespace Failed. Each CacheNamespace gets its own subdirectory
    /// (`PATH/NAMESPACE/NAME`, and one per worker below it), so the cache survives a worker
    /// restart on the same node and no two CacheNamespaces share a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('..')").message("tiers[].path must be an absolute directory without '..'"))]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,

    /// Disk: a StorageClass for a PersistentVolumeClaim per worker (of `size`), instead of a
    /// directory on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// How long metadata may be cached.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MetadataPolicyKind {
    /// The dataset does not change while cached (training data): listings and attributes are
    /// kept until a worker restarts, and readers keep the kernel page cache between opens.
    #[default]
    Immutable,
    /// Listings and attributes are fetched again once older than `ttl`.
    Ttl,
}

/// Metadata caching.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.policy != 'Ttl' || has(self.ttl)").message("metadata.ttl is required with policy Ttl"))]
pub struct MetadataSpec {
    /// Immutable (the default) or Ttl.
    #[serde(default)]
    pub policy: MetadataPolicyKind,

    /// With policy Ttl: how long listings and attributes stay valid, as a duration (`5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("metadata.ttl must be a duration greater than 0, like 5m"))]
    #[schemars(length(max = 32))]
    pub ttl: Option<String>,
}

/// What the operator observed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CacheNamespaceStatus {
    /// Pending (no worker ready yet), Ready (every worker ready), Degraded (some workers not
    /// ready, or a problem the conditions name) or Failed (the spec or its Secret cannot be used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CacheNamespacePhase>,

    /// Ready, Degraded and Progressing, with the time of their last change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Worker pods that exist (the scale subresource's replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Workers that pass their readiness probe.
    #[serde(default)]
    pub ready_workers: i32,

    /// The label selector of the worker pods (the scale subresource's selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// The workers, as readers use them: the CSI plugin follows this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerStatus>,

    /// Capacity and use of each tier, summed over the ready workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierStatus>,

    /// Bytes cached, over every tier of every ready worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_bytes: Option<i64>,

    /// cachedBytes as a share of sourceBytes, like `42.5%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_percentage: Option<String>,

    /// Block reads served from a cache tier, of all block reads, since the workers started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<f64>,

    /// Files under the source prefix, at the last scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_files: Option<i64>,

    /// Bytes under the source prefix, at the last scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_bytes: Option<i64>,

    /// When the source was last scanned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_source_scan: Option<Time>,

    /// The PersistentVolumeClaim that pods name to mount the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,

    /// The node directories of a host-path Disk tier that this CacheNamespace's workers have
    /// used, each with its node: the operator removes every one when the CacheNamespace is
    /// deleted, even after `path` or the allowed roots changed. Written only by the operator
    /// (the status subresource), from the pods of its own StatefulSet; at most 1000 entries,
    /// the oldest kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub disk_directories: Vec<NodeDirectory>,
}

/// A directory on a node that the operator removes when its CacheNamespace is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct NodeDirectory {
    /// The Node's name.
    pub node: String,
    /// The directory on it, as the worker pod mounted it (`ROOT/NAMESPACE/NAME`).
    pub path: String,
}

/// The phase of a CacheNamespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheNamespacePhase {
    Pending,
    Ready,
    Degraded,
    Failed,
}

/// A cache worker as readers see it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// The worker's id on the placement ring (its pod name).
    pub name: String,
    /// `host:port` of its data-plane gRPC server.
    #[serde(default)]
    pub address: String,
    /// Whether it passes its readiness probe; readers use only ready workers.
    #[serde(default)]
    pub ready: bool,
}

/// Capacity and use of one tier over the ready workers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// Memory or Disk.
    pub kind: TierKind,
    /// Bytes the tier may hold.
    pub capacity_bytes: i64,
    /// Bytes it holds.
    pub used_bytes: i64,
}

/// A CacheNamespace's spec, checked and converted: what the operator builds from.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    pub block_size: u64,
    pub memory: Option<u64>,
    pub disk: Option<ValidDisk>,
    pub metadata_ttl: Option<std::time::Duration>,
    pub source_timeout: std::time::Duration,
    /// The data-plane port, 1 to 65534 (the admin port is the next one).
    pub port: i32,
}

/// The Disk tier, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidDisk {
    pub size: u64,
    pub location: DiskLocation,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiskLocation {
    HostPath(String),
    StorageClass(String),
}

impl CacheNamespaceSpec {
    /// The block size in bytes.
    pub fn block_size_bytes(&self) -> Result<u64, SpecError> {
        let v = self.block_size.as_deref().unwrap_or(DEFAULT_BLOCK_SIZE);
        let b = parse_bytes(v).map_err(|e| SpecError::new("spec.blockSize", e))?;
        if !b.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b) {
            return Err(SpecError::new(
                "spec.blockSize",
                format!("{v} must be a power of two from 64Ki to 256Mi, like 4Mi"),
            ));
        }
        Ok(b)
    }

    /// Checks every rule of the schema again, and converts sizes and durations.
    pub fn validate(&self) -> Result<ValidSpec, SpecError> {
        let block_size = self.block_size_bytes()?;
        let src = &self.source;
        // As the CEL rule: a bucket, container or namenode that starts with a letter or digit.
        let uri_ok = src.uri.starts_with("file:///")
            || ["s3://", "oss://", "gs://", "azblob://", "hdfs://"]
                .iter()
                .any(|p| {
                    src.uri
                        .strip_prefix(p)
                        .and_then(|rest| rest.chars().next())
                        .is_some_and(|c| c.is_ascii_alphanumeric())
                });
        if !uri_ok {
            return Err(SpecError::new(
                "spec.source.uri",
                format!(
                    "{:?} must be s3://bucket/prefix, oss://bucket/prefix, gs://bucket/prefix, azblob://container/prefix, hdfs://namenode:port/prefix or file:///path",
                    src.uri
                ),
            ));
        }
        if let Some(k) = src.options.keys().find(|k| is_secret_option(k)) {
            return Err(SpecError::new(
                format!("spec.source.options.{k}"),
                "credentials must not be in the spec: put them in the Secret named by source.credentialsSecretRef",
            ));
        }
        let source_timeout = match &src.timeout {
            Some(t) => parse_duration(t).map_err(|e| SpecError::new("spec.source.timeout", e))?,
            None => std::time::Duration::from_secs(30),
        };
        if self.workers.replicas < 0 {
            return Err(SpecError::new(
                "spec.workers.replicas",
                "must not be negative",
            ));
        }
        let (mut memory, mut disk) = (None, None);
        if self.tiers.is_empty() {
            return Err(SpecError::new(
                "spec.tiers",
                "give at least one tier (Memory or Disk)",
            ));
        }
        for (i, t) in self.tiers.iter().enumerate() {
            let field = format!("spec.tiers[{i}]");
            let size = parse_bytes(&t.size).map_err(|e| SpecError::new(&field, e))?;
            if size < block_size {
                return Err(SpecError::new(
                    format!("{field}.size"),
                    format!("{} is smaller than one block ({block_size} bytes)", t.size),
                ));
            }
            match t.kind {
                TierKind::Memory => {
                    if memory.replace(size).is_some() {
                        return Err(SpecError::new("spec.tiers", "at most one Memory tier"));
                    }
                    if t.path.is_some() || t.storage_class_name.is_some() {
                        return Err(SpecError::new(
                            &field,
                            "a Memory tier takes neither path nor storageClassName",
                        ));
                    }
                }
                TierKind::Disk => {
                    let location = match (&t.path, &t.storage_class_name) {
                        (Some(p), None) if p.starts_with('/') && !p.contains("..") => {
                            DiskLocation::HostPath(p.clone())
                        }
                        (None, Some(c)) if !c.is_empty() => DiskLocation::StorageClass(c.clone()),
                        _ => {
                            return Err(SpecError::new(
                                &field,
                                "a Disk tier needs exactly one of path (an absolute directory on the node) and storageClassName",
                            ));
                        }
                    };
                    if disk.replace(ValidDisk { size, location }).is_some() {
                        return Err(SpecError::new("spec.tiers", "at most one Disk tier"));
                    }
                }
            }
        }
        let metadata_ttl = match (self.metadata.policy, &self.metadata.ttl) {
            (MetadataPolicyKind::Immutable, _) => None,
            (MetadataPolicyKind::Ttl, None) => {
                return Err(SpecError::new(
                    "spec.metadata.ttl",
                    "is required with policy Ttl",
                ));
            }
            (MetadataPolicyKind::Ttl, Some(t)) => {
                let d = parse_duration(t).map_err(|e| SpecError::new("spec.metadata.ttl", e))?;
                if d.is_zero() {
                    return Err(SpecError::new(
                        "spec.metadata.ttl",
                        "must be greater than 0",
                    ));
                }
                Some(d)
            }
        };
        let port = self.workers.port.unwrap_or(DEFAULT_WORKER_PORT);
        if !(1..=65534).contains(&port) {
            return Err(SpecError::new(
                "spec.workers.port",
                "must be between 1 and 65534 (the admin port is the next one)",
            ));
        }
        Ok(ValidSpec {
            block_size,
            memory,
            disk,
            metadata_ttl,
            source_timeout,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CacheNamespaceSpec {
        CacheNamespaceSpec {
            source: SourceSpec {
                uri: "s3://imagenet/train".into(),
                ..Default::default()
            },
            workers: WorkersSpec::default(),
            tiers: vec![
                TierSpec {
                    kind: TierKind::Memory,
                    size: "2Gi".into(),
                    path: None,
                    storage_class_name: None,
                },
                TierSpec {
                    kind: TierKind::Disk,
                    size: "100Gi".into(),
                    path: Some("/var/cache/lakecache".into()),
                    storage_class_name: None,
                },
            ],
            block_size: None,
            metadata: MetadataSpec::default(),
        }
    }

    #[test]
    fn a_good_spec_converts() {
        let v = spec().validate().unwrap();
        assert_eq!(v.block_size, 4 << 20);
        assert_eq!(v.memory, Some(2 << 30));
        assert_eq!(
            v.disk,
            Some(ValidDisk {
                size: 100 << 30,
                location: DiskLocation::HostPath("/var/cache/lakecache".into())
            })
        );
        assert_eq!(v.port, 7700);
        assert_eq!(v.metadata_ttl, None);
    }

    #[test]
    fn every_source_kind_is_a_good_uri() {
        for uri in [
            "s3://b/p",
            "oss://b",
            "gs://b/p",
            "azblob://c/p",
            "hdfs://nn:8020/p",
            "hdfs://nn1:8020,nn2:8020/p",
            "hdfs://prod/p",
            "file:///data",
        ] {
            let mut s = spec();
            s.source.uri = uri.into();
            assert!(s.validate().is_ok(), "{uri}");
        }
    }

    #[test]
    fn bad_specs_name_the_field() {
        type Edit = Box<dyn Fn(&mut CacheNamespaceSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.block_size = Some("3Mi".into())),
                "spec.blockSize",
            ),
            (
                Box::new(|s| s.block_size = Some("1Gi".into())),
                "spec.blockSize",
            ),
            (
                Box::new(|s| s.source.uri = "ftp://nn/x".into()),
                "spec.source.uri",
            ),
            (
                Box::new(|s| s.source.uri = "hdfs:///x".into()),
                "spec.source.uri",
            ),
            (
                Box::new(|s| {
                    s.source
                        .options
                        .insert("secret_access_key".into(), "x".into());
                }),
                "spec.source.options.secret_access_key",
            ),
            (
                Box::new(|s| s.tiers[0].size = "lots".into()),
                "spec.tiers[0]",
            ),
            (
                Box::new(|s| s.tiers[0].size = "1Mi".into()),
                "spec.tiers[0].size",
            ),
            (Box::new(|s| s.tiers[1].path = None), "spec.tiers[1]"),
            (
                Box::new(|s| s.tiers[1].kind = TierKind::Memory),
                "spec.tiers",
            ),
            (Box::new(|s| s.tiers.clear()), "spec.tiers"),
            (
                Box::new(|s| s.metadata.policy = MetadataPolicyKind::Ttl),
                "spec.metadata.ttl",
            ),
            (
                Box::new(|s| s.source.timeout = Some("soon".into())),
                "spec.source.timeout",
            ),
        ];
        for (edit, field) in cases {
            let mut s = spec();
            edit(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn secret_option_keys_are_refused_in_any_case_and_others_pass() {
        let secret = SECRET_OPTION_KEYS.iter().copied().chain([
            "MyApiKey",
            "db_password",
            "Secret_Access_Key",
            " credential",
        ]);
        for k in secret {
            assert!(is_secret_option(k), "{k}");
            let mut s = spec();
            s.source.options.insert(k.into(), "x".into());
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, format!("spec.source.options.{k}"), "{e}");
        }
        for k in [
            "region",
            "endpoint",
            "enable_virtual_host_style",
            "disable_ec2_metadata",
        ] {
            assert!(!is_secret_option(k), "{k}");
            let mut s = spec();
            s.source.options.insert(k.into(), "x".into());
            s.validate().unwrap();
        }
    }

    #[test]
    fn the_cel_rule_names_every_secret_key_and_pattern() {
        let rule = secret_options_rule();
        for k in SECRET_OPTION_KEYS {
            assert!(rule.contains(&format!("'{k}'")), "{k} missing from {rule}");
        }
        for p in SECRET_OPTION_PATTERNS {
            assert!(
                rule.contains(&format!("k.lowerAscii().contains('{p}')")),
                "{p} missing from {rule}"
            );
        }
        let crd =
            serde_json::to_string(&<CacheNamespace as kube::CustomResourceExt>::crd()).unwrap();
        assert!(crd.contains("lowerAscii().contains('password')"));
    }
}
