//! Where a host-path Disk tier may live on a node.
//!
//! A tenant names the `path` of a Disk tier, and a hostPath volume reaches whatever the path
//! names, with the rights of the pod. A prefix check ("below an allowed root") is not enough:
//! below a root lie the other CacheNamespaces' directories, and a worker may have left a
//! symlink there that a hostPath follows. So the path must be one of the admin's roots itself,
//! compared component by component, and every CacheNamespace gets its own directory below it,
//! `ROOT/NAMESPACE/NAME` ([`host_dir`]), which the operator picks, never the tenant.

/// The allowed root that a Disk tier's `path` names, normalized, or `None` if it names none.
///
/// The path must be one of the roots itself, compared by normalized components (`//`, `.` and a
/// trailing `/` do not matter; a relative path or one with `..` names nothing), not a directory
/// below one: below a root lie the CacheNamespaces' own directories, and a path into one of them
/// (or through a symlink a worker made there, which a hostPath follows) would reach another
/// CacheNamespace's cache or out of the root. Prefixes do not count: `/var/lib/lakecache-evil`
/// is not `/var/lib/lakecache`.
pub fn host_path_root<'a>(path: &str, roots: &'a [String]) -> Option<&'a str> {
    let p = normalize_path(path)?;
    roots
        .iter()
        .find(|r| normalize_path(r).as_deref() == Some(p.as_str()))
        .map(String::as_str)
}

/// An absolute path with `//`, `.` and a trailing `/` removed; `None` for a relative path, an
/// empty one, or one with a `..` component.
pub fn normalize_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts = vec![];
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// The node directory of a CacheNamespace's host-path Disk tier: its own, below the root.
pub fn host_dir(root: &str, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", root.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_must_be_an_allowed_root() {
        let roots = vec!["/var/lib/lakecache".to_string(), "/mnt/nvme/".to_string()];
        for ok in [
            "/var/lib/lakecache",
            "/var/lib/lakecache/",
            "//var/lib//lakecache/.",
            "/mnt/nvme",
        ] {
            assert!(host_path_root(ok, &roots).is_some(), "{ok}");
        }
        for bad in [
            "/var/lib/lakecache-evil",
            "/var/lib/lakecach",
            "/var/lib",
            "/",
            "/etc",
            "/var/lib/lakecache/../../../etc",
            "/var/lib/lakecache/..",
            "/var/lib/lakecache/ns/other",
            "var/lib/lakecache",
            "./var/lib/lakecache",
            "",
        ] {
            assert!(host_path_root(bad, &roots).is_none(), "{bad}");
        }
        assert!(host_path_root("/var/lib/lakecache", &[]).is_none());
        assert_eq!(host_dir("/", "ns", "n"), "/ns/n");
        assert_eq!(
            host_dir("/var/lib/lakecache", "ns", "n"),
            "/var/lib/lakecache/ns/n"
        );
    }
}
