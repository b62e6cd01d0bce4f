//! The objects the unit tests of both controllers build, defined once.
//!
//! Every test speaks of the same world: CacheNamespace `ml/imagenet` over
//! `s3://datasets/imagenet`, and CachePreload `ml/warm` of it. Each module's tests used to write
//! their own copy of these objects, so a new required field meant editing every copy, and the
//! copies drifted (another bucket here, no namespace there) without any test meaning it. The
//! builders take what the tests vary (tiers and replicas; paths, schedule and status); a test
//! that needs more sets it on the returned object, where the reader sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use lakecache_api::{
    CacheNamespace, CacheNamespaceSpec, CachePreload, CachePreloadSpec, CachePreloadStatus,
    PreloadPath, SourceSpec, TierKind, TierSpec, WorkersSpec,
};

use crate::workers::WorkerRef;

/// The namespace of every fixture.
pub(crate) const NAMESPACE: &str = "ml";
/// The CacheNamespace's name, which the CachePreload names.
pub(crate) const CACHE_NAMESPACE: &str = "imagenet";

/// CacheNamespace `ml/imagenet` over `s3://datasets/imagenet` (no endpoint, region or
/// credentials), with `replicas` workers and `tiers`; the rest of the spec is defaulted, and it
/// has no uid, generation or status.
pub(crate) fn cache_namespace(replicas: i32, tiers: Vec<TierSpec>) -> CacheNamespace {
    let mut cn = CacheNamespace::new(
        CACHE_NAMESPACE,
        CacheNamespaceSpec {
            source: SourceSpec {
                uri: "s3://datasets/imagenet".into(),
                ..Default::default()
            },
            workers: WorkersSpec {
                replicas,
                ..Default::default()
            },
            tiers,
            block_size: None,
            metadata: Default::default(),
        },
    );
    cn.metadata.namespace = Some(NAMESPACE.into());
    cn
}

/// A tier of `kind` and `size`, on a node directory `path` or a volume of storage class `class`.
pub(crate) fn tier(
    kind: TierKind,
    size: &str,
    path: Option<&str>,
    class: Option<&str>,
) -> TierSpec {
    TierSpec {
        kind,
        size: size.into(),
        path: path.map(Into::into),
        storage_class_name: class.map(Into::into),
    }
}

/// CachePreload `ml/warm` of `imagenet`: `paths` (all of the data, not metadata only), on
/// `schedule` (`None`: once per generation), with `status`; no uid, generation or creation time.
pub(crate) fn preload(
    paths: &[&str],
    schedule: Option<&str>,
    status: Option<CachePreloadStatus>,
) -> CachePreload {
    let mut cp = CachePreload::new(
        "warm",
        CachePreloadSpec {
            cache_namespace: CACHE_NAMESPACE.into(),
            paths: paths.iter().map(|p| PreloadPath(p.to_string())).collect(),
            metadata_only: false,
            schedule: schedule.map(Into::into),
        },
    );
    cp.metadata.namespace = Some(NAMESPACE.into());
    cp.status = status;
    cp
}

/// A ready worker `name` of the CacheNamespace, at `NAME:7700`, with token `t`.
pub(crate) fn worker(name: &str) -> WorkerRef {
    WorkerRef {
        name: name.into(),
        address: format!("{name}:7700"),
        token: "t".into(),
    }
}

/// The time `s` seconds after the epoch.
pub(crate) fn t(s: i64) -> Time {
    Time(Timestamp::from_second(s).unwrap())
}
