//! The plugin's state directory: what it staged and published, so a restarted plugin (or
//! mounter) finds its mounts again.
//!
//! Layout, under the state root:
//! - `volumes/<key>/volume.json`: a [`VolumeRecord`] (written by the plugin);
//! - `volumes/<key>/fuse.json`: the FUSE server's configuration, mode 0600 (written by the
//!   plugin, read by the FUSE server);
//! - `volumes/<key>/fuse.pid`: the FUSE server's process id (written by the mounter);
//! - `volumes/<key>/mnt`: the mount point of an ephemeral volume's FUSE filesystem;
//! - `mounter.sock`: the mounter's gRPC socket.
//!
//! `<key>` is a hash of the volume id, so any id is a safe file name. Files are replaced by
//! writing a temporary file and renaming it, so a crash never leaves half a record.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One published target path of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRecord {
    /// The directory of the volume that is bound there (relative; empty for the root).
    #[serde(default)]
    pub sub_path: String,
}

/// A volume the plugin staged (or an ephemeral volume it published).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    pub volume_id: String,
    /// Where the FUSE filesystem is mounted.
    pub staging_path: PathBuf,
    /// A CSI ephemeral inline volume: staged by the plugin itself and gone with its last target.
    #[serde(default)]
    pub ephemeral: bool,
    /// The CacheNamespace this volume reads.
    pub namespace: String,
    pub name: String,
    /// Published target paths.
    #[serde(default)]
    pub targets: BTreeMap<PathBuf, TargetRecord>,
    /// The FUSE server's prefetch budget, counted against the mounter's memory (records
    /// written before it count the plugin's default).
    #[serde(default)]
    pub prefetch_budget: Option<u64>,
}

/// The state directory on the node: beside kubelet's plugin directory, not in it, because that
/// one is also mounted into the registrar container, and this one holds every volume's token
/// and the mounter's socket (which takes any command from whoever can connect).
pub const DEFAULT_ROOT: &str = "/var/lib/kubelet/plugins/csi.lakecache.io-state";

/// Where the state directory was before it moved out of kubelet's plugin directory (which the
/// registrar container mounts too); a plugin finds the volumes staged there at start.
pub const LEGACY_ROOT: &str = "/var/lib/kubelet/plugins/csi.lakecache.io/state";

/// Modes of what the state directory holds: only its owner (root in the CSI pod) may enter it,
/// read a token or a FUSE server's configuration, or talk to the mounter.
pub const DIR_MODE: u32 = 0o700;
pub const SECRET_MODE: u32 = 0o600;

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (or creates) the state directory, mode 0700.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(root.join("volumes"))?;
        let mode = std::fs::metadata(root)?.permissions().mode() & 0o7777;
        if mode != DIR_MODE {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(DIR_MODE))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Makes every file that must be private private: the directory 0700, the mounter's socket,
    /// tokens and FUSE server configurations 0600. Returns what was too open (and is no more).
    pub fn enforce_modes(&self) -> std::io::Result<Vec<PathBuf>> {
        use std::os::unix::fs::PermissionsExt;
        let mut fixed = Vec::new();
        let mut fix = |path: PathBuf, want: u32| -> std::io::Result<()> {
            let m = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if m.permissions().mode() & 0o7777 != want {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(want))?;
                fixed.push(path);
            }
            Ok(())
        };
        fix(self.root.clone(), DIR_MODE)?;
        fix(self.mounter_socket(), SECRET_MODE)?;
        if let Ok(rd) = std::fs::read_dir(self.root.join("volumes")) {
            for e in rd.flatten() {
                fix(e.path().join("token"), SECRET_MODE)?;
                fix(e.path().join("fuse.json"), SECRET_MODE)?;
            }
        }
        Ok(fixed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn mounter_socket(&self) -> PathBuf {
        self.root.join("mounter.sock")
    }

    /// The directory that holds everything about one volume.
    pub fn volume_dir(&self, volume_id: &str) -> PathBuf {
        let hash = blake3::hash(volume_id.as_bytes()).to_hex();
        self.root.join("volumes").join(&hash.as_str()[..32])
    }

    pub fn fuse_config_path(&self, volume_id: &str) -> PathBuf {
        self.volume_dir(volume_id).join("fuse.json")
    }

    /// The volume's data-plane token, mode 0600.
    pub fn token_path(&self, volume_id: &str) -> PathBuf {
        self.volume_dir(volume_id).join("token")
    }

    pub fn load(&self, volume_id: &str) -> std::io::Result<Option<VolumeRecord>> {
        let path = self.volume_dir(volume_id).join("volume.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, rec: &VolumeRecord) -> std::io::Result<()> {
        let dir = self.volume_dir(&rec.volume_id);
        std::fs::create_dir_all(&dir)?;
        let json = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
        write_atomic(&dir.join("volume.json"), &json, 0o644)
    }

    /// Removes everything about a volume.
    pub fn remove(&self, volume_id: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.volume_dir(volume_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Moves the records of volumes staged by an earlier plugin in `legacy` (its state directory
    /// before it moved) here, so that they are repaired and unstaged as usual: each volume's
    /// record, FUSE server configuration (mode 0600) and pid file are copied, then the secrets
    /// are removed from `legacy`. What is mounted there (an inline volume's FUSE mount) stays,
    /// and the records keep naming it. A volume already here is left alone. Returns the volume
    /// ids moved.
    pub fn adopt_legacy(&self, legacy: &Path) -> std::io::Result<Vec<String>> {
        let mut moved = Vec::new();
        if legacy == self.root {
            return Ok(moved);
        }
        let Ok(rd) = std::fs::read_dir(legacy.join("volumes")) else {
            return Ok(moved);
        };
        for e in rd.flatten() {
            let old = e.path();
            let Ok(b) = std::fs::read(old.join("volume.json")) else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<VolumeRecord>(&b) else {
                continue;
            };
            let new = self.volume_dir(&rec.volume_id);
            if !new.join("volume.json").exists() {
                std::fs::create_dir_all(&new)?;
                for (name, mode) in [
                    ("fuse.json", SECRET_MODE),
                    ("token", SECRET_MODE),
                    ("fuse.pid", 0o644),
                ] {
                    match std::fs::read(old.join(name)) {
                        Ok(data) => write_atomic(&new.join(name), &data, mode)?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                // A running FUSE server's hand-off files move as they are (its lock, its
                // journal and its control socket are open by inode): a copy would be unlocked
                // and stale.
                for name in ["fuse.lock", "fuse.state", "fuse.ctl"] {
                    match std::fs::rename(old.join(name), new.join(name)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => tracing::warn!(
                            file = %old.join(name).display(),
                            error = %e,
                            "cannot move a hand-off file; a restart of this volume's FUSE server will mount it anew"
                        ),
                    }
                }
                // The record last: a volume is here once its record is.
                write_atomic(&new.join("volume.json"), &b, 0o644)?;
                moved.push(rec.volume_id);
            }
            for name in ["fuse.json", "token", "fuse.pid", "volume.json"] {
                match std::fs::remove_file(old.join(name)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(moved)
    }

    /// Every volume record. A record that cannot be read is reported, not dropped.
    pub fn all(&self) -> Vec<Result<VolumeRecord, String>> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.root.join("volumes")) else {
            return out;
        };
        for e in rd.flatten() {
            let path = e.path().join("volume.json");
            match std::fs::read(&path) {
                Ok(b) => out.push(
                    serde_json::from_slice(&b).map_err(|err| format!("{}: {err}", path.display())),
                ),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => out.push(Err(format!("{}: {err}", path.display()))),
            }
        }
        out
    }
}

/// Writes `data` to `path` through a temporary file and a rename, with `mode`. The temporary
/// file is named after the whole file name and the process, so that writers of other files in
/// one directory (the plugin's `fuse.json`, the mounter's `fuse.pid`, the FUSE server's
/// `fuse.prom`) never share one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_path(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `<dir>/<file name>.<pid>.<n>.tmp`, `n` counting the calls of this process: no two writers,
/// in this process or another, ever share a temporary file (a write left running by a handler
/// past its deadline must not interleave with its retry's).
pub fn temp_path(path: &Path) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{name}.{}.{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_one_stem_get_temporary_files_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("fuse.pid"), dir.path().join("fuse.prom"));
        assert_ne!(temp_path(&a), temp_path(&b));
        assert_ne!(
            temp_path(&a),
            temp_path(&a),
            "two writes of one file never share one"
        );
        write_atomic(&a, b"1", 0o644).unwrap();
        write_atomic(&b, b"2", 0o644).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"1");
        assert_eq!(std::fs::read(&b).unwrap(), b"2");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary file left"
        );
    }

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let mut rec = VolumeRecord {
            volume_id: "ns/with/slashes and spaces".into(),
            staging_path: "/var/lib/kubelet/x/globalmount".into(),
            ephemeral: false,
            namespace: "ml".into(),
            name: "imagenet".into(),
            targets: BTreeMap::new(),
            prefetch_budget: Some(1 << 20),
        };
        rec.targets.insert(
            "/pods/a/mount".into(),
            TargetRecord {
                sub_path: "train".into(),
            },
        );
        s.save(&rec).unwrap();
        let again = StateDir::open(dir.path()).unwrap();
        assert_eq!(again.load(&rec.volume_id).unwrap(), Some(rec.clone()));
        assert_eq!(again.all().len(), 1);
        again.remove(&rec.volume_id).unwrap();
        assert_eq!(again.load(&rec.volume_id).unwrap(), None);
        again.remove(&rec.volume_id).unwrap();
    }

    #[test]
    fn open_and_enforce_modes_make_tokens_and_the_socket_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = StateDir::open(&root).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        let vd = s.volume_dir("v");
        std::fs::create_dir_all(&vd).unwrap();
        for f in ["token", "fuse.json", "volume.json"] {
            std::fs::write(vd.join(f), b"x").unwrap();
            std::fs::set_permissions(vd.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::write(s.mounter_socket(), b"").unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut fixed = s.enforce_modes().unwrap();
        fixed.sort();
        let mut want = vec![
            root.clone(),
            s.mounter_socket(),
            s.token_path("v"),
            s.fuse_config_path("v"),
        ];
        want.sort();
        assert_eq!(fixed, want);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&s.token_path("v")), 0o600);
        assert_eq!(mode(&s.fuse_config_path("v")), 0o600);
        assert_eq!(mode(&vd.join("volume.json")), 0o644, "not a secret");
        assert!(s.enforce_modes().unwrap().is_empty(), "nothing left to fix");
    }

    #[test]
    fn volumes_staged_in_the_old_state_directory_move_here_and_leave_no_secret_there() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let legacy = StateDir::open(&dir.path().join("old")).unwrap();
        let rec = VolumeRecord {
            volume_id: "v".into(),
            staging_path: legacy.volume_dir("v").join("mnt"),
            ephemeral: true,
            namespace: "ml".into(),
            name: "imagenet".into(),
            targets: BTreeMap::new(),
            prefetch_budget: None,
        };
        legacy.save(&rec).unwrap();
        write_atomic(&legacy.fuse_config_path("v"), b"{\"token\":\"t\"}", 0o600).unwrap();
        std::fs::create_dir_all(rec.staging_path.clone()).unwrap();
        let s = StateDir::open(&dir.path().join("new")).unwrap();
        assert_eq!(
            s.adopt_legacy(legacy.root()).unwrap(),
            vec!["v".to_string()]
        );
        assert_eq!(s.load("v").unwrap(), Some(rec.clone()));
        let cfg = s.fuse_config_path("v");
        assert_eq!(std::fs::read(&cfg).unwrap(), b"{\"token\":\"t\"}");
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            !legacy.fuse_config_path("v").exists(),
            "the token is gone from the old place"
        );
        assert_eq!(legacy.load("v").unwrap(), None);
        assert!(rec.staging_path.exists(), "what is mounted there stays");
        assert!(s.adopt_legacy(legacy.root()).unwrap().is_empty());
        assert!(s.adopt_legacy(&dir.path().join("none")).unwrap().is_empty());
        assert!(s.adopt_legacy(s.root()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let vd = s.volume_dir("v");
        std::fs::create_dir_all(&vd).unwrap();
        std::fs::write(vd.join("volume.json"), b"{not json").unwrap();
        let all = s.all();
        assert_eq!(all.len(), 1);
        assert!(all[0].as_ref().unwrap_err().contains("volume.json"));
        assert!(s.load("v").is_err());
    }
}
