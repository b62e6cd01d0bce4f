//! The FUSE servers' metrics on the plugin's `/metrics`.
//!
//! Each FUSE server is a process of its own (one per staged volume, in the mounter's container),
//! so it has no port to scrape. Instead it writes its reader's metrics (blocks by origin,
//! failovers, hedges, worker ejections, …) in OpenMetrics text beside its configuration every
//! [`PUBLISH_EVERY`], and the plugin's `/metrics` adds every staged volume's latest snapshot with
//! a `volume` label. A snapshot is at most a few seconds old.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lakecache_client::metrics::ReaderMetrics;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::state::{StateDir, temp_path};

/// How often a FUSE server writes its snapshot.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// A snapshot older than this is not reported: its FUSE server is gone (the repair loop starts
/// another, which writes its own).
const STALE: Duration = Duration::from_secs(30);

/// Where the FUSE server with configuration `config` writes its snapshot.
pub fn snapshot_path(config: &Path) -> PathBuf {
    config.with_extension("prom")
}

/// One snapshot of `metrics` (under the `lakecache_fuse` prefix), without the final `# EOF`.
pub fn snapshot(metrics: &ReaderMetrics) -> String {
    let mut registry = Registry::with_prefix("lakecache_fuse");
    metrics.register(&mut registry);
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        return String::new();
    }
    text.strip_suffix("# EOF\n").unwrap_or(&text).to_string()
}

/// Writes a snapshot of `metrics` to `path` now and every [`PUBLISH_EVERY`], for the life of the
/// process.
pub fn publish(metrics: Arc<ReaderMetrics>, path: PathBuf) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        // Bounded by the process's life: one small write per tick.
        loop {
            tick.tick().await;
            // A rename, not a sync: a snapshot lost to a crash is simply written again.
            let tmp = temp_path(&path);
            let written = std::fs::write(&tmp, snapshot(&metrics))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::debug!(path = %path.display(), error = %e, "cannot write metrics");
            }
        }
    });
}

/// The snapshots of every staged volume, merged: one family each, every sample labelled with
/// its volume.
pub fn gather(state: &StateDir) -> String {
    let snapshots: Vec<(String, String)> = state
        .all()
        .into_iter()
        .flatten()
        .filter_map(|rec| {
            let path = snapshot_path(&state.fuse_config_path(&rec.volume_id));
            // A snapshot nobody refreshes is a dead FUSE server's: not reported as current.
            let age = std::fs::metadata(&path)
                .ok()?
                .modified()
                .ok()?
                .elapsed()
                .ok()?;
            if age > STALE {
                return None;
            }
            let text = std::fs::read_to_string(path).ok()?;
            Some((rec.volume_id, text))
        })
        .collect();
    merge(&snapshots)
}

/// Merges OpenMetrics texts of several volumes: a family's `# HELP`/`# TYPE`/`# UNIT` lines once,
/// then its samples from every volume, each with `volume="<id>"` added to its labels.
pub fn merge(snapshots: &[(String, String)]) -> String {
    #[derive(Default)]
    struct Family {
        meta: Vec<String>,
        samples: Vec<String>,
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (volume, text) in snapshots {
        let label = format!("volume=\"{}\"", escape(volume));
        let mut current: Option<String> = None;
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.split_whitespace();
                let (Some(_kind), Some(name)) = (words.next(), words.next()) else {
                    continue;
                };
                let f = families.entry(name.to_string()).or_default();
                if !f.meta.iter().any(|m| m == line) {
                    f.meta.push(line.to_string());
                }
                current = Some(name.to_string());
                continue;
            }
            let Some(name) = current.as_ref() else {
                continue;
            };
            let sample = match line.find(['{', ' ']) {
                Some(i) if line[i..].starts_with("{}") => {
                    format!("{}{{{label}}}{}", &line[..i], &line[i + 2..])
                }
                Some(i) if line[i..].starts_with('{') => {
                    format!("{}{{{label},{}", &line[..i], &line[i + 1..])
                }
                Some(i) => format!("{}{{{label}}}{}", &line[..i], &line[i..]),
                None => continue,
            };
            if let Some(f) = families.get_mut(name) {
                f.samples.push(sample);
            }
        }
    }
    let mut out = String::new();
    for f in families.values() {
        for l in f.meta.iter().chain(&f.samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lakecache_client::metrics::OriginLabel;

    #[test]
    fn snapshots_of_two_volumes_merge_into_one_family_each_with_a_volume_label() {
        let a = ReaderMetrics::default();
        a.ejections.inc();
        a.hedges.inc_by(3);
        a.blocks
            .get_or_create(&OriginLabel {
                origin: "memory".into(),
            })
            .inc();
        let b = ReaderMetrics::default();
        b.hedges.inc_by(5);
        let merged = merge(&[
            ("vol-a".into(), snapshot(&a)),
            ("vol\"b".into(), snapshot(&b)),
        ]);
        let count = |l: &str| merged.lines().filter(|x| *x == l).count();
        assert_eq!(count("# TYPE lakecache_fuse_hedges counter"), 1, "{merged}");
        assert!(
            merged.contains("lakecache_fuse_hedges_total{volume=\"vol-a\"} 3"),
            "{merged}"
        );
        assert!(
            merged.contains("lakecache_fuse_hedges_total{volume=\"vol\\\"b\"} 5"),
            "{merged}"
        );
        assert!(merged.contains("lakecache_fuse_worker_ejections_total{volume=\"vol-a\"} 1"));
        assert!(
            merged.contains("lakecache_fuse_blocks_total{volume=\"vol-a\",origin=\"memory\"} 1"),
            "{merged}"
        );
        assert!(!merged.contains("# EOF"));
        // Every sample line carries the label.
        for l in merged.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.contains("{volume=\""), "{l}");
        }
    }
}
