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
