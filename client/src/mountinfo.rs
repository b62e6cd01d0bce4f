//! `/proc/self/mountinfo` (proc(5)), parsed once for every part that reads the mount table: the
//! CSI plugin (is a path mounted, is it ours, which FUSE connection is it), the test harness
//! (propagation of a node's mounts) and the benchmark (what to clean up).

use std::io;
use std::path::{Path, PathBuf};

/// One line of a mountinfo file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// The mounted filesystem's device number, `major:minor` (for FUSE, the connection's
    /// number in `/sys/fs/fuse/connections`).
    pub device: String,
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
    /// Whether the mount propagates to its peers (`shared:N`).
    pub fn is_shared(&self) -> bool {
        self.optional.iter().any(|o| o.starts_with("shared:"))
    }

    /// A lakecache FUSE mount, or a bind of one. A FUSE server that mounts without fusermount
    /// shows type `fuse` (the subtype only shows as `fuse.lakecache` through fusermount); its
    /// source is always `lakecache…`.
    pub fn is_lakecache(&self) -> bool {
        (self.fs_type == "fuse" || self.fs_type.starts_with("fuse."))
            && self.source.starts_with("lakecache")
    }
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let mut r = right.split(' ');
            if f.len() < 6 {
                return None;
            }
            let fs_type = r.next()?.to_string();
            Some(MountInfo {
                id: f[0].parse().ok()?,
                parent: f[1].parse().ok()?,
                device: f[2].to_string(),
                root: PathBuf::from(unescape(f[3])),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_string(),
                optional: f[6..].iter().map(|s| s.to_string()).collect(),
                fs_type,
                source: unescape(r.next().unwrap_or_default()),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn read_self() -> io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount `path` is on: the last (topmost) mount whose mount point is the longest prefix of
/// `path`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text = "\
36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue
40 36 0:50 / /var/lib/kubelet/x/globalmount ro,nosuid,nodev,relatime shared:7 - fuse.lakecache lakecache:ml/imagenet ro,user_id=0
41 36 0:51 / /t ro - tmpfs tmpfs rw
garbage line
";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!((m[0].id, m[0].parent), (36, 35));
        assert_eq!(m[0].device, "98:0");
        assert_eq!(m[0].options, "rw,noatime");
        assert_eq!(m[0].fs_type, "ext3");
        assert!(m[1].is_shared() && !m[0].is_shared());
        assert_eq!(m[1].fs_type, "fuse.lakecache");
        assert_eq!(m[1].source, "lakecache:ml/imagenet");
        assert!(m[1].is_lakecache());
        assert!(!m[0].is_lakecache() && !m[2].is_lakecache());
        let direct = parse(
            "50 36 0:60 / /pods/x/mount ro - fuse lakecache:ml/imagenet ro,user_id=0\n\
             51 36 0:61 / /other rw - fuse sshfs#host: rw\n",
        );
        assert!(direct[0].is_lakecache(), "a direct mount shows type fuse");
        assert!(
            !direct[1].is_lakecache(),
            "another FUSE filesystem is not ours"
        );
    }

    #[test]
    fn finds_the_mount_a_path_is_on() {
        let t = parse(
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
             64 27 254:0 /tmp/a\\040b /tmp/a\\040b rw,nosuid shared:7 master:2 - ext4 /dev/vda rw\n",
        );
        assert_eq!(
            containing(&t, Path::new("/tmp/a b/c")).map(|m| m.id),
            Some(64)
        );
        assert_eq!(containing(&t, Path::new("/tmp/a")).map(|m| m.id), Some(27));
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("a\\09"), "a\\09", "not an escape");
        assert_eq!(unescape("\\777"), "\\777", "past a byte: not an escape");
        assert_eq!(unescape("/caf\u{e9}\\011x"), "/caf\u{e9}\tx");
    }
}
