//! `CachePreload`: warm a CacheNamespace's cache ahead of a job, once or on a schedule.

// clippy reads the repeated keys of several `printcolumn(…)` groups as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SpecError;

/// At most this many failed paths are kept in the status; `failedFiles` counts them all.
pub const MAX_REPORTED_FAILURES: usize = 50;

/// A CachePreload loads paths of a CacheNamespace's source into its workers ahead of a job:
/// every ready worker loads the blocks it owns, in parallel. With a schedule it runs again at
/// every tick; deleting a running preload cancels it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lakecache.io",
    version = "v1alpha1",
    kind = "CachePreload",
    plural = "cachepreloads",
    shortname = "cpl",
    category = "lakecache",
    namespaced,
    doc = "A CachePreload loads paths of a CacheNamespace's source into its cache workers ahead of a job, once or on a cron schedule.",
    status = "CachePreloadStatus",
    derive = "PartialEq",
    printcolumn(name = "Cache", type_ = "string", json_path = ".spec.cacheNamespace"),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Bytes loaded of the total (files for a metadata-only preload)"
    ),
    printcolumn(
        name = "Files",
        type_ = "string",
        json_path = ".status.files",
        priority = 1
    ),
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CachePreloadSpec {
    /// The CacheNamespace (in this namespace) whose cache to warm.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && self.size() <= 253").message("cacheNamespace must be the name of a CacheNamespace in this namespace"))]
    #[schemars(length(max = 253))]
    pub cache_namespace: String,

    /// Paths or glob patterns relative to the source root (`train/**`, `val/*.tfrecord`,
    /// `labels.csv`); `**` matches across folders.
    #[schemars(length(min = 1, max = 100))]
    pub paths: Vec<PreloadPath>,

    /// Load only listings and file attributes, not data (fast `ls` and `stat` for a job that
    /// reads a small part of a huge tree).
    #[serde(default)]
    pub metadata_only: bool,

    /// A cron schedule (five fields, in UTC, like `0 3 * * *`) to run the preload again at every
    /// tick; without one it runs once. A tick that comes while a run is still going is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.split(' ').filter(f, f != '').size() == 5").message("schedule must be a cron expression of five fields, like '0 3 * * *'"))]
    #[schemars(length(max = 128))]
    pub schedule: Option<String>,
}

/// A path or glob pattern relative to the source root.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.size() > 0 && !self.startsWith('/') && !self.contains('..')",
    "message": "paths[] must be non-empty, relative to the source root, and without '..'"
}]))]
pub struct PreloadPath(#[schemars(length(max = 1024))] pub String);

impl PreloadPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The phase of a CachePreload's current (or last) run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePreloadPhase {
    /// Waiting for the CacheNamespace to have ready workers, or for the next scheduled tick.
    Pending,
    Running,
    Succeeded,
    /// The run ended with failed paths, or could not start (the conditions say why).
    Failed,
}

/// What the operator observed of the current (or last) run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CachePreloadStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CachePreloadPhase>,

    /// Which run this is (1 for the first; a schedule adds one per tick).
    #[serde(default)]
    pub run: i64,

    /// Files matched by the paths.
    #[serde(default)]
    pub files_total: i64,
    /// Files done (loaded or failed).
    #[serde(default)]
    pub files_done: i64,

    /// Bytes of the matched files.
    #[serde(default)]
    pub bytes_total: i64,
    /// Bytes loaded.
    #[serde(default)]
    pub bytes_done: i64,

    /// Done of total, like `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,

    /// Files done of total, like `120/400`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<String>,

    /// Bytes loaded per second over the run so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_bytes_per_second: Option<i64>,

    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Paths that could not be loaded, with the reason (at most 50; failedFiles counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<PreloadFailure>,
    /// Files that could not be loaded.
    #[serde(default)]
    pub failed_files: i64,

    /// With a schedule: when a run was last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// With a schedule: when the next run is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,

    /// The workers this run was given to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,

    /// Ready (the preload can run) and Complete, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A path that failed to load.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PreloadFailure {
    /// The file's path under the source root.
    pub path: String,
    /// Why it failed.
    pub reason: String,
}

impl CachePreloadSpec {
    /// Checks the schema's rules again (for objects that got past an older schema).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.cache_namespace.is_empty() {
            return Err(SpecError::new(
                "spec.cacheNamespace",
                "name the CacheNamespace to warm",
            ));
        }
        if self.paths.is_empty() {
            return Err(SpecError::new(
                "spec.paths",
                "give at least one path or glob",
            ));
        }
        for (i, p) in self.paths.iter().enumerate() {
            let p = p.as_str();
            if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(SpecError::new(
                    format!("spec.paths[{i}]"),
                    format!("{p:?} must be relative to the source root, without '..'"),
                ));
            }
        }
        Ok(())
    }
}
