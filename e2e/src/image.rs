//! Our image, for the real node: built by `scripts/image` from Debian packages and the
//! workspace's binaries, the way the `Dockerfile` builds it where Docker exists.
//!
//! The binaries are the ones `cargo test` built beside the test binary (`<target>/debug`), so
//! the containers run the code under test. A build is kept under
//! `~/.cache/lakecache/image/build-<key>`, keyed by the binaries' sizes and modification times,
//! so the test binaries of one run share it and an unchanged tree builds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::Digest;

use crate::node::{IMAGE_REPOSITORY, NodeImage, PAUSE_IMAGE};

/// The image's name as the chart gives it (`image.repository:appVersion`), which the node's
/// containerd holds.
pub fn chart_image() -> anyhow::Result<String> {
    let path = repo_root().join("charts/lakecache/Chart.yaml");
    let chart =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .context("Chart.yaml has no appVersion")?
        .trim()
        .trim_matches('"');
    Ok(format!("{IMAGE_REPOSITORY}:{version}"))
}

/// The binaries the image holds, as `image/binaries` lists them: (package, binary) for each
/// line, `binary` or `package binary`.
pub fn binaries() -> anyhow::Result<Vec<(String, String)>> {
    let list = repo_root().join("image/binaries");
    let text =
        std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(
            |l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
                [bin] => Ok((bin.to_string(), bin.to_string())),
                [package, bin] => Ok((package.to_string(), bin.to_string())),
                words => {
                    bail!("image/binaries: {words:?} is neither `binary` nor `package binary`")
                }
            },
        )
        .collect()
}

/// How long building the image's binaries may take.
const CARGO_LIMIT: Duration = Duration::from_secs(60 * 60);

/// The directory holding this build's binaries, `<target>/<profile>` (the test binary is in its
/// `deps/`), after building the image's binaries there if one is missing (`cargo test
/// --workspace` builds them; a test run alone, or in release, may not have).
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in <target>/<profile>/deps")?
        .to_path_buf();
    let binaries = binaries()?;
    if binaries.iter().all(|(_, bin)| dir.join(bin).is_file()) {
        return Ok(dir);
    }
    let target = dir.parent().context("<target>/<profile> has no parent")?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo.arg("build").arg("--target-dir").arg(target);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cargo.arg("--release");
        }
        other => bail!("the test binary's profile directory is {other:?}, not debug or release"),
    }
    for (package, _) in &binaries {
        cargo.args(["-p", package]);
    }
    eprintln!("building the image's binaries: {cargo:?}");
    let out = crate::cluster::output_within(cargo.current_dir(repo_root()), None, CARGO_LIMIT)?;
    if !out.status.success() {
        bail!(
            "{cargo:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for (_, bin) in &binaries {
        if !dir.join(bin).is_file() {
            bail!("cargo built no {}", dir.join(bin).display());
        }
    }
    Ok(dir)
}

/// The lakecache image and the pause image, built once per key and process.
pub fn node_images() -> anyhow::Result<Vec<NodeImage>> {
    static BUILT: Mutex<Option<Vec<NodeImage>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(images) = built.as_ref() {
        return Ok(images.clone());
    }
    let bins = binaries_dir()?;
    let mut key = sha2::Sha256::new();
    for (_, b) in binaries()? {
        let meta = std::fs::metadata(bins.join(&b))?;
        key.update(b.as_bytes());
        key.update(meta.len().to_le_bytes());
        key.update(
            meta.modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_le_bytes(),
        );
    }
    key.update(std::fs::read(repo_root().join("scripts/image"))?);
    key.update(std::fs::read(repo_root().join("image/packages"))?);
    let key = hex(&key.finalize()[..6]);
    let cache = cache_dir().join("image");
    let out = cache.join(format!("build-{key}"));
    let done = out.join(".complete");
    if !done.exists() {
        prune(&cache, 2);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out)?;
        let started = std::time::Instant::now();
        let mut cmd = Command::new(repo_root().join("scripts/image"));
        cmd.arg("--binaries").arg(&bins).arg("--out").arg(&out);
        let output = crate::cluster::run_bounded(cmd, None, Duration::from_secs(900));
        if !output.status.success() {
            bail!(
                "scripts/image failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::fs::write(&done, "")?;
        eprintln!("image built in {:.1?}", started.elapsed());
    }
    let images = vec![
        NodeImage {
            archive: out.join("lakecache.tar"),
            base_name: IMAGE_REPOSITORY.into(),
        },
        NodeImage {
            archive: out.join("pause.tar"),
            base_name: PAUSE_IMAGE
                .rsplit_once(':')
                .map(|(repo, _)| repo.to_string())
                .unwrap_or_default(),
        },
    ];
    for i in &images {
        if !i.archive.is_file() {
            bail!("scripts/image wrote no {}", i.archive.display());
        }
    }
    *built = Some(images.clone());
    Ok(images)
}

/// Keeps the `keep` newest builds.
fn prune(cache: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let mut builds: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("build-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    builds.sort();
    let n = builds.len().saturating_sub(keep);
    for (_, p) in builds.into_iter().take(n) {
        let _ = std::fs::remove_dir_all(p);
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("LAKECACHE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/lakecache")
        })
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e is in the workspace")
        .to_path_buf()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
