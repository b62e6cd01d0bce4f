//! Validate: the object and what it refers to, into one typed [`ValidSpec`] or a [`Problem`]
//! (no I/O).
//!
//! The spec's own rules live with the type (`CacheNamespaceSpec::validate`, in the API crate,
//! shared with anything else that reads the spec). What only this operator can judge is added
//! here: a problem found while fetching (a missing Secret, a taken name) and whether a
//! host-path Disk tier names a node directory the cluster admin allows. The allowed root is
//! written into the [`ValidSpec`] in its configured form, so that the build places the
//! CacheNamespace's directory below it however the tenant spelled the path.

use lakecache_api::{CacheNamespace, DEFAULT_WORKER_PORT, DiskLocation, ValidSpec};

use super::build;
use super::fetch::Inputs;
use crate::Problem;

pub(super) fn check(
    cn: &CacheNamespace,
    inputs: &Inputs,
    cfg: &crate::Config,
) -> Result<ValidSpec, Problem> {
    if let Some(p) = &inputs.problem {
        return Err(p.clone());
    }
    let mut v = cn.spec.validate().map_err(|e| Problem {
        reason: "InvalidSpec",
        message: e.to_string(),
    })?;
    if let Some(d) = &mut v.disk
        && let DiskLocation::HostPath(path) = &mut d.location
    {
        let roots = &cfg.allowed_host_path_roots;
        let i = cn
            .spec
            .tiers
            .iter()
            .position(|t| t.path.is_some())
            .unwrap_or(0);
        match build::host_path_root(path, roots) {
            Some(root) => *path = root.to_string(),
            None if roots.is_empty() => {
                return Err(Problem {
                    reason: "HostPathNotAllowed",
                    message: format!(
                        "spec.tiers[{i}].path: this cluster allows no Disk tier on a node \
                         directory (the operator's allowed host path roots are empty): use \
                         storageClassName for a volume per worker instead, or ask the cluster \
                         admin to allow a directory (the chart's workers.allowedHostPathRoots)"
                    ),
                });
            }
            None => {
                return Err(Problem {
                    reason: "HostPathNotAllowed",
                    message: format!(
                        "spec.tiers[{i}].path: {path:?} is not a node directory the cluster \
                         admin allows for Disk tiers; set it to one of {} (the CacheNamespace \
                         gets its own subdirectory there), or use storageClassName for a \
                         volume per worker; admins allow directories with the chart's \
                         workers.allowedHostPathRoots",
                        roots.join(", ")
                    ),
                });
            }
        }
    }
    Ok(v)
}

/// The allowed root of `cn`'s host-path Disk tier, if it has one that the operator allows (only
/// then were node directories made).
pub(super) fn host_root(cn: &CacheNamespace, cfg: &crate::Config) -> Option<String> {
    let p = spec_host_path(cn)?;
    build::host_path_root(&p, &cfg.allowed_host_path_roots).map(String::from)
}

/// The path of `cn`'s host-path Disk tier as its spec says now, if it has one.
pub(super) fn spec_host_path(cn: &CacheNamespace) -> Option<String> {
    match cn.spec.validate().ok()?.disk?.location {
        DiskLocation::HostPath(p) => Some(p),
        DiskLocation::StorageClass(_) => None,
    }
}

/// The workers' port: the validated one, or, when the spec is not valid, what it names (or the
/// default), so that the workers that keep running are still observed where they listen.
pub(super) fn port(cn: &CacheNamespace, checked: &Result<ValidSpec, Problem>) -> i32 {
    checked
        .as_ref()
        .map(|v| v.port)
        .unwrap_or_else(|_| cn.spec.workers.port.unwrap_or(DEFAULT_WORKER_PORT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cache_namespace, tier};
    use lakecache_api::TierKind;

    fn with_disk(path: &str) -> CacheNamespace {
        cache_namespace(1, vec![tier(TierKind::Disk, "1Gi", Some(path), None)])
    }

    fn checked(path: &str, roots: &[&str]) -> Result<ValidSpec, Problem> {
        let cfg = crate::Config {
            allowed_host_path_roots: roots.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        let inputs = Inputs {
            token: None,
            problem: None,
        };
        check(&with_disk(path), &inputs, &cfg)
    }

    #[test]
    fn a_disk_path_must_name_an_allowed_root() {
        let v = checked("/var/lib/lakecache/", &["/var/lib/lakecache"]).unwrap();
        assert_eq!(
            v.disk.unwrap().location,
            DiskLocation::HostPath("/var/lib/lakecache".into())
        );
        for bad in [
            "/etc",
            "/var/lib/lakecache-evil",
            "/var/lib/lakecache/other",
        ] {
            let p = checked(bad, &["/var/lib/lakecache"]).unwrap_err();
            assert_eq!(p.reason, "HostPathNotAllowed", "{bad}");
            assert!(p.message.contains("spec.tiers[0].path"), "{}", p.message);
            assert!(p.message.contains("/var/lib/lakecache"), "{}", p.message);
            assert!(p.message.contains("storageClassName"), "{}", p.message);
        }
        let p = checked("/var/lib/lakecache", &[]).unwrap_err();
        assert_eq!(p.reason, "HostPathNotAllowed");
        assert!(
            p.message
                .contains("allows no Disk tier on a node directory")
        );
        let cfg = crate::Config {
            allowed_host_path_roots: vec!["/var/lib/lakecache".into()],
            ..Default::default()
        };
        assert!(host_root(&with_disk("/var/lib/lakecache"), &cfg).is_some());
        assert!(host_root(&with_disk("/etc"), &cfg).is_none());
        // By default, no node directory at all.
        assert!(host_root(&with_disk("/var/lib/lakecache"), &crate::Config::default()).is_none());
        let p = check(
            &with_disk("/var/lib/lakecache"),
            &Inputs {
                token: None,
                problem: None,
            },
            &crate::Config::default(),
        )
        .unwrap_err();
        assert_eq!(p.reason, "HostPathNotAllowed");
    }
}
