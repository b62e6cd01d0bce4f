//! Custom resource types for lakecache.
//!
//! `CacheNamespace` and `CachePreload` (group `lakecache.io`, version `v1alpha1`) live here with
//! their schemas, defaults and I/O-free validation. The types arrive with the operator; this crate
//! exists now so the workspace has its final shape and every crate that will depend on it builds.
#![forbid(unsafe_code)]

/// The API group of every lakecache custom resource.
pub const GROUP: &str = "lakecache.io";
/// The API version served for the lakecache custom resources.
pub const VERSION: &str = "v1alpha1";

/// Kind and plural of the CacheNamespace resource.
pub const CACHE_NAMESPACE_KIND: &str = "CacheNamespace";
pub const CACHE_NAMESPACE_PLURAL: &str = "cachenamespaces";

/// A cache worker as a CacheNamespace's status lists it for readers (`status.workers`): the CSI
/// plugin's FUSE servers follow this list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// The worker's id on the placement ring (its pod name).
    pub name: String,
    /// `host:port` of its data-plane gRPC server.
    pub address: String,
    /// Whether it passes its readiness probe; readers use only ready workers.
    #[serde(default)]
    pub ready: bool,
}
