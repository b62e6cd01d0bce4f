//! `/proc/self/mountinfo`, parsed: which mounts exist, where, and how they propagate.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// The mount's root within its filesystem.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,...`).
    pub options: String,
    /// Optional fields: `shared:N`, `master:N`, ...
    pub optional: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountInfo {
    pub fn is_shared(&self) -> bool {
        self.optional.iter().any(|o| o.starts_with("shared:"))
    }
}

/// Octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountInfo {
                id: f[0].parse().ok()?,
                parent: f[1].parse().ok()?,
                root: PathBuf::from(unescape(f[3])),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_string(),
                optional: f[6..].iter().map(|s| s.to_string()).collect(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

pub fn read_self() -> std::io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount `path` is on: the last (topmost) mount whose mount point is the longest
/// prefix of `path`.
pub fn containing<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let mut best: Option<&MountInfo> = None;
    for m in table {
        if path.starts_with(&m.mount_point)
            && best.is_none_or(|b| {
                m.mount_point.components().count() >= b.mount_point.components().count()
            })
        {
            best = Some(m);
        }
    }
    best
}

pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    Ok(read_self()?.iter().any(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    64 27 254:0 /tmp/a\\040b /tmp/a\\040b rw,nosuid shared:7 master:2 - ext4 /dev/vda rw\n";
        let t = parse(text);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].mount_point, Path::new("/tmp/a b"));
        assert!(t[1].is_shared() && !t[0].is_shared());
        assert_eq!(t[1].options, "rw,nosuid");
        assert_eq!(
            containing(&t, Path::new("/tmp/a b/c")).map(|m| m.id),
            Some(64)
        );
        assert_eq!(containing(&t, Path::new("/tmp/a")).map(|m| m.id), Some(27));
    }
}
