//! `lakecache verify`: checks a mounted dataset against a checksum list, the way a training
//! job reads it. With `--every` it checks again and again until stopped, one line per pass, and
//! with `--hold` it keeps every file open from the first pass on and reads each pass through
//! those handles too (a loader holding its shards open): what an operator watches during a
//! restart or an upgrade of the node's lakecache, and what the end-to-end tests read.
//!
//! Each file is read past the page cache (`POSIX_FADV_DONTNEED` first), so every pass reaches
//! the mount. A pass prints `pass <n> <unix time> ok files=<N> held=<H> slowest_ms=<ms>`, or one
//! `pass <n> <unix time> FAIL <path> (<how>): <error>` line per failed file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Args;
use sha2::{Digest, Sha256};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The checksum list: lines of `<sha256 in hex>  <path>`, as `sha256sum` prints them.
    #[arg(long, env = "LAKECACHE_VERIFY_SUMS")]
    sums: PathBuf,
    /// The directory the list's paths are relative to.
    #[arg(long, env = "LAKECACHE_VERIFY_DIR")]
    dir: PathBuf,
    /// Check again every so often (e.g. `200ms`), until SIGTERM or Ctrl-C.
    #[arg(long, env = "LAKECACHE_VERIFY_EVERY")]
    every: Option<humantime::Duration>,
    /// Keep every file open from the first pass on, and read it through that handle too.
    #[arg(long, env = "LAKECACHE_VERIFY_HOLD")]
    hold: bool,
}

/// The list's entries: path and expected digest (hex).
fn read_sums(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let (sum, name) = l.split_once(char::is_whitespace).with_context(|| {
                format!(
                    "{} line {}: expected `<sha256>  <path>`",
                    path.display(),
                    i + 1
                )
            })?;
            let name = name.trim_start().trim_start_matches('*');
            anyhow::ensure!(
                sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()),
                "{} line {}: {sum:?} is not a sha256 in hex",
                path.display(),
                i + 1
            );
            Ok((name.to_string(), sum.to_ascii_lowercase()))
        })
        .collect()
}

/// The digest of `f`'s whole content, read from offset 0 past the page cache.
fn digest(f: &File) -> std::io::Result<String> {
    nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    // Bounded by the file's size.
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(format!("{:x}", h.finalize()))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One pass: every file through a new open, and through its held handle if any. Returns the
/// failures and the slowest single read.
fn pass(
    dir: &Path,
    sums: &[(String, String)],
    held: &mut [Option<File>],
    hold: bool,
) -> (Vec<String>, Duration) {
    let mut failed = vec![];
    let mut slowest = Duration::ZERO;
    for (i, (name, want)) in sums.iter().enumerate() {
        let t = Instant::now();
        let opened = File::open(dir.join(name));
        let fresh = opened.as_ref().map_err(clone_err).and_then(digest);
        slowest = slowest.max(t.elapsed());
        match fresh {
            Ok(got) if got == *want => {}
            Ok(got) => failed.push(format!("{name} (new open): sha256 {got}, want {want}")),
            Err(e) => failed.push(format!("{name} (new open): {e}")),
        }
        if !hold {
            continue;
        }
        match &held[i] {
            Some(f) => {
                let t = Instant::now();
                let r = digest(f);
                slowest = slowest.max(t.elapsed());
                match r {
                    Ok(got) if got == *want => {}
                    Ok(got) => {
                        failed.push(format!("{name} (held handle): sha256 {got}, want {want}"))
                    }
                    Err(e) => failed.push(format!("{name} (held handle): {e}")),
                }
            }
            None => held[i] = opened.ok(),
        }
    }
    (failed, slowest)
}

fn clone_err(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

pub async fn run(a: VerifyArgs) -> anyhow::Result<()> {
    let sums = read_sums(&a.sums)?;
    anyhow::ensure!(!sums.is_empty(), "{} lists no file", a.sums.display());
    let mut held: Vec<Option<File>> = (0..sums.len()).map(|_| None).collect();
    let mut any_failed = false;
    let mut n = 0u64;
    let stop = lakecache_telemetry::shutdown_signal();
    tokio::pin!(stop);
    // Bounded by the stop signal, or one pass without --every.
    loop {
        n += 1;
        let (dir, s, hold) = (a.dir.clone(), sums.clone(), a.hold);
        let mut h = std::mem::take(&mut held);
        let (failed, slowest, h) = tokio::task::spawn_blocking(move || {
            let (f, s) = pass(&dir, &s, &mut h, hold);
            (f, s, h)
        })
        .await?;
        held = h;
        let t = now();
        let mut out = std::io::stdout().lock();
        if failed.is_empty() {
            let kept = held.iter().filter(|h| h.is_some()).count();
            writeln!(
                out,
                "pass {n} {t:.3} ok files={} held={kept} slowest_ms={}",
                sums.len(),
                slowest.as_millis()
            )?;
        } else {
            any_failed = true;
            for f in &failed {
                writeln!(out, "pass {n} {t:.3} FAIL {f}")?;
            }
        }
        out.flush()?;
        drop(out);
        let Some(every) = a.every else { break };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(*every) => {}
        }
    }
    anyhow::ensure!(!any_failed, "some files did not read back as listed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_checks_new_opens_and_held_handles_and_names_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"hello").unwrap();
        std::fs::write(dir.path().join("b"), b"world").unwrap();
        let sum = |b: &[u8]| format!("{:x}", Sha256::digest(b));
        let list = dir.path().join("SUMS");
        std::fs::write(
            &list,
            format!("{}  a\n{} *b\n", sum(b"hello"), sum(b"world")),
        )
        .unwrap();
        let sums = read_sums(&list).unwrap();
        let mut held = vec![None, None];
        let (failed, _) = pass(dir.path(), &sums, &mut held, true);
        assert!(failed.is_empty(), "{failed:?}");
        assert!(held.iter().all(Option::is_some));
        // Replaced under the held handle: the new open sees new bytes, the held one the old.
        std::fs::remove_file(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b"), b"WORLD").unwrap();
        let (failed, _) = pass(dir.path(), &sums, &mut held, true);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].starts_with("b (new open): sha256"), "{failed:?}");
        std::fs::remove_file(dir.path().join("a")).unwrap();
        let (failed, _) = pass(dir.path(), &sums, &mut held, true);
        assert!(
            failed.iter().any(|f| f.starts_with("a (new open): ")),
            "{failed:?}"
        );
    }

    #[test]
    fn a_malformed_list_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("SUMS");
        std::fs::write(&list, "nothex  a\n").unwrap();
        let e = read_sums(&list).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
