//! The results of one run, from which the three files are made: `results.json` (every figure,
//! the serialized [`Results`]), `results.md` (a table per workload, the targets:
//! [`Results::markdown`]) and `results.png` (a bar chart, drawn by `chart`). Everything here is
//! computed from the rows without I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytesize::ByteSize;

use crate::plan::{Plan, SystemKind, Workload};
use crate::readers::Measured;

/// The raw link: one large parallel ranged download straight from the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RawLink {
    pub bytes: u64,
    pub seconds: f64,
    pub mb_s: f64,
    pub ranges: usize,
    pub range_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SystemInfo {
    pub name: String,
    pub settings: String,
}

/// One epoch of one workload on one system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub system: String,
    pub workload: Workload,
    /// `cold`, `warm`, `epoch N`, `read-all`, `copy`.
    pub phase: String,
    pub seconds: f64,
    pub bytes: u64,
    pub files: u64,
    pub mb_s: f64,
    pub files_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// CPU seconds of the cache process during the epoch (summed over the processes of a
    /// system that has several).
    pub cpu_seconds: Option<f64>,
    /// CPU seconds per 10^9 bytes read of the reader: the process the mount lives in
    /// (`lakecache local` with its workers, the CSI path's fuse-server, rclone, s3fs, bindfs).
    /// `None` without bytes or without a process.
    pub reader_cpu_s_per_gb: Option<f64>,
    /// The same for the separate worker processes together (the CSI path); `None` where the
    /// workers run in the reader's process or there are none.
    pub worker_cpu_s_per_gb: Option<f64>,
    /// Peak resident memory of the cache process during the epoch.
    pub peak_rss: Option<u64>,
    /// lakecache: bytes in the Memory tier (a tmpfs, not in the process's RSS) and the Disk
    /// tier after the epoch.
    pub memory_tier_used: Option<u64>,
    pub disk_tier_used: Option<u64>,
    /// lakecache: block hits / block requests at the workers during the epoch.
    pub hit_ratio: Option<f64>,
    /// lakecache: bytes the workers' block transport sent from Memory tier files with
    /// `sendfile` during the epoch (0 where the reader does not use that transport).
    pub sendfile_bytes: Option<u64>,
    pub vs_tmpfs: Option<f64>,
    pub vs_best_peer: Option<f64>,
    pub note: Option<String>,
}

impl Row {
    pub fn from_measured(kind: &SystemKind, workload: Workload, phase: &str, m: &Measured) -> Row {
        let s = m.seconds.max(1e-9);
        Row {
            system: kind.label(),
            workload,
            phase: phase.to_string(),
            seconds: m.seconds,
            bytes: m.bytes,
            files: m.files,
            mb_s: m.bytes as f64 / s / 1e6,
            files_s: m.files as f64 / s,
            p50_ms: m.quantile(0.5),
            p99_ms: m.quantile(0.99),
            cpu_seconds: None,
            reader_cpu_s_per_gb: None,
            worker_cpu_s_per_gb: None,
            peak_rss: None,
            memory_tier_used: None,
            disk_tier_used: None,
            hit_ratio: None,
            sendfile_bytes: None,
            vs_tmpfs: None,
            vs_best_peer: None,
            note: None,
        }
    }

    /// Sets the reader's and the workers' CPU per GB from their CPU seconds in the epoch
    /// (nothing for a row without bytes).
    pub fn set_cpu_per_gb(&mut self, reader: f64, workers: Option<f64>) {
        let gb = self.bytes as f64 / 1e9;
        if gb > 0.0 {
            self.reader_cpu_s_per_gb = Some(reader / gb);
            self.worker_cpu_s_per_gb = workers.map(|w| w / gb);
        }
    }

    /// The figure rows are compared by: files/s for metadata, MB/s otherwise.
    pub fn figure(&self) -> f64 {
        if self.workload == Workload::Metadata {
            self.files_s
        } else {
            self.mb_s
        }
    }

    fn kind(&self) -> Option<SystemKind> {
        self.system.parse().ok()
    }
}

/// One of the targets, checked for one lakecache system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    pub system: String,
    /// What holds, in words: "≥" where higher is better, "≤" where lower is.
    pub target: String,
    pub measured: Option<f64>,
    pub threshold: f64,
    /// Which side of the threshold is good.
    pub better: Better,
    /// `measured ≥ threshold` (`better: higher`) or `measured ≤ threshold` (`lower`); `None`
    /// when not measured.
    pub holds: Option<bool>,
    pub detail: String,
}

/// Which way a target's measure is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// The target holds at the threshold or above (throughput, ratios of it, hit ratio).
    Higher,
    /// The target holds at the threshold or below (memory, CPU).
    Lower,
}

impl Better {
    fn holds(self, measured: f64, threshold: f64) -> bool {
        match self {
            Better::Higher => measured >= threshold,
            Better::Lower => measured <= threshold,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: u64,
    pub kernel: String,
    pub load_at_start: String,
    pub perf: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mem_kib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
            memory: mem_kib * 1024,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            load_at_start: read("/proc/loadavg").trim().to_string(),
            perf: String::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    pub tool: &'static str,
    pub plan: Plan,
    pub dataset_bytes: u64,
    pub images_bytes: u64,
    pub shards_bytes: u64,
    pub whole_on_node: bool,
    pub machine: Machine,
    pub versions: BTreeMap<String, String>,
    pub page_cache: Option<String>,
    pub link_details: serde_json::Value,
    pub raw_link: Option<RawLink>,
    pub systems: Vec<SystemInfo>,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Results {
    pub fn new(plan: &Plan, total: u64, images: u64) -> Results {
        Results {
            tool: "lakecache-bench",
            plan: plan.clone(),
            dataset_bytes: total,
            images_bytes: images,
            shards_bytes: plan.shards_bytes(),
            whole_on_node: plan.whole_on_node(total),
            machine: Machine::probe(),
            versions: BTreeMap::new(),
            page_cache: None,
            link_details: serde_json::Value::Null,
            raw_link: None,
            systems: vec![],
            rows: vec![],
            targets: vec![],
            notes: vec![],
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    fn find(&self, system: &str, workload: Workload, phase: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.system == system && r.workload == workload && r.phase == phase)
    }

    /// The best peer's figure for a workload and phase.
    fn best_peer(&self, workload: Workload, phase: &str) -> Option<(&Row, f64)> {
        self.rows
            .iter()
            .filter(|r| r.workload == workload && r.phase == phase)
            .filter(|r| r.kind().is_some_and(|k| k.is_peer()))
            .map(|r| (r, r.figure()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Fills in the ratios and checks the targets.
    pub fn finish(&mut self) {
        for i in 0..self.rows.len() {
            let r = &self.rows[i];
            let tmpfs = self
                .find("tmpfs", r.workload, &r.phase)
                .or_else(|| {
                    // Partial-cache epochs and preload compare with tmpfs's warm reads of the
                    // same files.
                    match r.workload {
                        Workload::Partial => self.find("tmpfs", Workload::Images, "warm"),
                        _ => None,
                    }
                })
                .map(|t| t.figure());
            let peer = self.best_peer(r.workload, &r.phase).map(|p| p.1);
            let f = r.figure();
            let ratio = |d: Option<f64>| d.filter(|d| *d > 0.0).map(|d| f / d);
            let (vt, vp) = (ratio(tmpfs), ratio(peer));
            self.rows[i].vs_tmpfs = vt;
            self.rows[i].vs_best_peer = vp;
        }
        self.targets = self.check_targets();
    }

    fn check_targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        let raw = self.raw_link.as_ref().map(|r| r.mb_s);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        for kind in self.plan.systems.iter().filter(|k| k.is_lakecache()) {
            let sys = kind.label();
            let sys = sys.as_str();
            let fig = |w: Workload, phase: &str| self.find(sys, w, phase).map(|r| r.figure());
            let mut push = |target: &str,
                            measured: Option<f64>,
                            threshold: f64,
                            better: Better,
                            detail: String| {
                out.push(Target {
                    system: sys.to_string(),
                    target: target.to_string(),
                    measured,
                    threshold,
                    better,
                    holds: measured.map(|m| better.holds(m, threshold)),
                    detail,
                })
            };
            let warm = fig(Workload::Shards, "warm");
            if self.whole_on_node {
                push(
                    "warm shards ≥ 0.9× tmpfs (data whole on the node)",
                    ratio(
                        warm,
                        self.find("tmpfs", Workload::Shards, "warm").map(|r| r.mb_s),
                    ),
                    0.9,
                    Better::Higher,
                    "× tmpfs, MB/s".into(),
                );
            }
            push(
                "warm shards ≥ 0.8× the FUSE copy-path ceiling",
                ratio(
                    warm,
                    self.find("fuse-copy", Workload::Shards, "warm")
                        .map(|r| r.mb_s),
                ),
                0.8,
                Better::Higher,
                "× fuse-copy (bindfs over tmpfs), MB/s".into(),
            );
            let peer_warm = self.best_peer(Workload::Images, "warm");
            push(
                "warm images ≥ 5× best peer files/s",
                ratio(
                    self.find(sys, Workload::Images, "warm").map(|r| r.files_s),
                    peer_warm.map(|p| p.0.files_s),
                ),
                5.0,
                Better::Higher,
                format!(
                    "× {}",
                    peer_warm.map(|p| p.0.system.as_str()).unwrap_or("no peer")
                ),
            );
            push(
                "cold shards ≥ 0.95× raw link",
                ratio(fig(Workload::Shards, "cold"), raw),
                0.95,
                Better::Higher,
                "× raw link, MB/s".into(),
            );
            let peer_cold = self.best_peer(Workload::Images, "cold");
            push(
                "cold images ≥ best peer",
                ratio(
                    self.find(sys, Workload::Images, "cold").map(|r| r.files_s),
                    peer_cold.map(|p| p.0.files_s),
                ),
                1.0,
                Better::Higher,
                format!(
                    "× {}",
                    peer_cold.map(|p| p.0.system.as_str()).unwrap_or("no peer")
                ),
            );
            if kind.bounded_cache() {
                let hits = self
                    .rows
                    .iter()
                    .filter(|r| r.system == sys && r.workload == Workload::Partial)
                    .filter(|r| r.phase != "epoch 1")
                    .filter_map(|r| r.hit_ratio)
                    .reduce(f64::min);
                push(
                    "partial-cache hit ratio ≥ 0.45 in epochs 2–3",
                    hits,
                    0.45,
                    Better::Higher,
                    "lowest of epochs 2 and 3".into(),
                );
            }
            // The CSI path's preload is the operator's CachePreload on the same workers: the
            // benchmark leaves it out there (see the runner).
            let csi = matches!(kind, SystemKind::LakecacheCsi(..));
            if !csi {
                push(
                    "preload ≥ 0.9× raw link",
                    ratio(
                        fig(Workload::Preload, "preload").or(fig(Workload::Preload, "read-all")),
                        raw,
                    ),
                    0.9,
                    Better::Higher,
                    "lakecache local --preload '**', MB/s".into(),
                );
            }
            // Memory: the process's peak RSS plus what its Memory tier (a tmpfs) holds, against
            // the tier's size; the smaller this is the better.
            let main: Vec<&Row> = self
                .rows
                .iter()
                .filter(|r| r.system == sys && r.workload != Workload::Partial)
                .collect();
            let rss = main.iter().filter_map(|r| r.peak_rss).max();
            let tier = main.iter().filter_map(|r| r.memory_tier_used).max();
            let footprint = match (rss, tier) {
                (Some(r), Some(t)) => Some((r + t) as f64 / self.plan.memory.max(1) as f64),
                _ => None,
            };
            push(
                "worker memory ≤ Memory tier + 15%",
                footprint,
                1.15,
                Better::Lower,
                format!(
                    "(peak RSS {} + tier used {}) / tier {}",
                    rss.map(|r| ByteSize::b(r).to_string())
                        .unwrap_or("?".into()),
                    tier.map(|t| ByteSize::b(t).to_string())
                        .unwrap_or("?".into()),
                    ByteSize::b(self.plan.memory)
                ),
            );
            if csi {
                // The CSI path against the same workers in one process (`lakecache-1w`, where
                // the reader calls its worker directly): what crossing processes costs.
                let one = SystemKind::Lakecache(1).label();
                let warm_of = |s: &str, w: Workload| self.find(s, w, "warm");
                push(
                    "warm shards ≥ 0.8× lakecache-1w (in process)",
                    ratio(warm, warm_of(&one, Workload::Shards).map(|r| r.mb_s)),
                    0.8,
                    Better::Higher,
                    format!("× {one}, MB/s"),
                );
                push(
                    "warm images ≥ 0.8× lakecache-1w (in process)",
                    ratio(
                        warm_of(sys, Workload::Images).map(|r| r.files_s),
                        warm_of(&one, Workload::Images).map(|r| r.files_s),
                    ),
                    0.8,
                    Better::Higher,
                    format!("× {one}, files/s"),
                );
                for w in [Workload::Shards, Workload::Images] {
                    let cpu = |s: &str| warm_of(s, w).and_then(|r| r.reader_cpu_s_per_gb);
                    let (mine, theirs) = (cpu(sys), cpu(&one));
                    let shown = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or("?".into());
                    push(
                        &format!(
                            "reader CPU per warm GB ≤ 1.5× lakecache-1w's ({})",
                            w.label()
                        ),
                        ratio(mine, theirs),
                        1.5,
                        Better::Lower,
                        format!(
                            "CPU s per GB: fuse-server {} / lakecache local {}",
                            shown(mine),
                            shown(theirs)
                        ),
                    );
                }
            }
        }
        out
    }

    pub fn markdown(&self) -> String {
        let p = &self.plan;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# lakecache benchmark: profile `{:?}`, link `{:?}`\n",
            p.profile, p.link.name
        );
        let _ = writeln!(
            s,
            "- link: {} ms RTT (toxiproxy latency), {} Mbit/s each way (`tbf` on both veth ends)",
            p.link.rtt_ms,
            p.link.rate_bits / 1_000_000
        );
        if let Some(r) = &self.raw_link {
            let _ = writeln!(
                s,
                "- raw link: **{:.1} MB/s** ({} in {:.2} s, {} concurrent ranged GETs of {})",
                r.mb_s,
                ByteSize::b(r.bytes),
                r.seconds,
                r.ranges,
                ByteSize::b(r.range_bytes)
            );
        }
        let d = &p.dataset;
        let _ = writeln!(
            s,
            "- dataset: {} shards of {} and {} images of ~{} in {} classes ({} in all)",
            d.shards,
            ByteSize::b(d.shard_size),
            d.images,
            ByteSize::b(d.image_size),
            d.classes,
            ByteSize::b(self.dataset_bytes)
        );
        let _ = writeln!(
            s,
            "- lakecache tiers: Memory {} + Disk {} ({}); partial-cache workload: Memory {} \
             (half the images), no Disk; peers' caches sized the same",
            ByteSize::b(p.memory),
            ByteSize::b(p.disk),
            if self.whole_on_node {
                "the dataset is whole on the node"
            } else {
                "the dataset does not fit"
            },
            ByteSize::b(self.images_bytes / 2)
        );
        let _ = writeln!(
            s,
            "- readers: {} for shards (pread {}), {} for images (whole files, shuffled), {} for \
             preload, 1 for metadata",
            p.shard_readers,
            ByteSize::b(p.read_size as u64),
            p.image_readers,
            p.preload_readers
        );
        let m = &self.machine;
        let _ = writeln!(
            s,
            "- machine: {} CPUs ({}), {}, kernel {}, load at start {}",
            m.cpus,
            m.cpu_model,
            ByteSize::b(m.memory),
            m.kernel,
            m.load_at_start
        );
        if let Some(pc) = &self.page_cache {
            let _ = writeln!(s, "- page cache: {pc}");
        }
        if !self.versions.is_empty() {
            let v: Vec<String> = self
                .versions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "- versions: {}", v.join(", "));
        }
        let _ = writeln!(
            s,
            "\nMB/s are 10^6 bytes per second. \"× tmpfs\" and \"× best peer\" compare the \
             same workload and phase (metadata by files/s); the best peer is the best of rclone, \
             s3fs and direct. CPU s and peak RSS are the cache process's during that epoch \
             (summed over the CSI path's processes; lakecache's Memory tier is a tmpfs, shown \
             apart). Reader and worker CPU s/GB are CPU seconds per 10^9 bytes read: the reader \
             is the process the mount lives in (`lakecache local` with its workers, \
             \"in reader\"; the CSI path's fuse-server; rclone; s3fs; bindfs), the worker the \
             CSI path's worker processes together. In the targets, \"≥\" means higher is \
             better and \"≤\" lower."
        );
        for w in Workload::ALL {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.workload == w).collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n## {}\n", workload_title(w));
            let _ = writeln!(
                s,
                "| system | phase | time s | MB/s | files/s | p50 ms | p99 ms | CPU s | reader CPU s/GB | worker CPU s/GB | peak RSS | tiers used | hit ratio | × tmpfs | × best peer |"
            );
            let _ = writeln!(
                s,
                "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for r in rows {
                let opt = |v: Option<f64>, prec: usize| {
                    v.map(|v| format!("{v:.prec$}")).unwrap_or("–".into())
                };
                let worker_cpu = match r.worker_cpu_s_per_gb {
                    None if r.reader_cpu_s_per_gb.is_some()
                        && r.kind().is_some_and(|k| k.workers_in_reader()) =>
                    {
                        "in reader".into()
                    }
                    w => opt(w, 2),
                };
                let tiers = match (r.memory_tier_used, r.disk_tier_used) {
                    (Some(m), Some(d)) => format!("{} + {}", ByteSize::b(m), ByteSize::b(d)),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.system,
                    r.phase,
                    r.seconds,
                    if w == Workload::Metadata {
                        "–".into()
                    } else {
                        format!("{:.1}", r.mb_s)
                    },
                    r.files_s,
                    opt(r.p50_ms, 2),
                    opt(r.p99_ms, 2),
                    opt(r.cpu_seconds, 2),
                    opt(r.reader_cpu_s_per_gb, 2),
                    worker_cpu,
                    r.peak_rss
                        .map(|b| ByteSize::b(b).to_string())
                        .unwrap_or("–".into()),
                    tiers,
                    opt(r.hit_ratio, 2),
                    opt(r.vs_tmpfs, 2),
                    opt(r.vs_best_peer, 2),
                );
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(s, "\n## Targets\n");
            let _ = writeln!(s, "| system | target | measured | holds | how |");
            let _ = writeln!(s, "|---|---|--:|---|---|");
            for t in &self.targets {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    t.system,
                    t.target,
                    t.measured
                        .map(|m| format!("{m:.2}"))
                        .unwrap_or("not measured".into()),
                    match t.holds {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        None => "–",
                    },
                    t.detail
                );
            }
        }
        if !self.systems.is_empty() {
            let _ = writeln!(s, "\n## Systems\n");
            for sys in &self.systems {
                let _ = writeln!(s, "- `{}`: {}", sys.name, sys.settings);
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n{n}");
        }
        s
    }
}

pub fn workload_title(w: Workload) -> &'static str {
    match w {
        Workload::Metadata => "Metadata: list and stat the images tree (1 reader)",
        Workload::Shards => "Shards: sequential read of every shard",
        Workload::Images => "Images: shuffled whole-file reads",
        Workload::Preload => "Preload: time to warm the whole dataset",
        Workload::Partial => "Partial cache: cache at half the images, shuffled epochs",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::plan::{CsiTransport, LinkName, Overrides, ProfileName};

    pub fn row(system: &str, w: Workload, phase: &str, mb_s: f64, files_s: f64) -> Row {
        Row {
            system: system.into(),
            workload: w,
            phase: phase.into(),
            seconds: 1.0,
            bytes: (mb_s * 1e6) as u64,
            files: files_s as u64,
            mb_s,
            files_s,
            p50_ms: Some(1.0),
            p99_ms: Some(2.0),
            cpu_seconds: None,
            reader_cpu_s_per_gb: None,
            worker_cpu_s_per_gb: None,
            peak_rss: None,
            memory_tier_used: None,
            disk_tier_used: None,
            hit_ratio: None,
            sendfile_bytes: None,
            vs_tmpfs: None,
            vs_best_peer: None,
            note: None,
        }
    }

    pub fn sample() -> Results {
        let plan = Plan::new(ProfileName::Small, LinkName::Far, Overrides::default()).unwrap();
        let mut r = Results::new(&plan, 10 << 20, 5 << 20);
        r.raw_link = Some(RawLink {
            bytes: 100,
            seconds: 1.0,
            mb_s: 100.0,
            ranges: 16,
            range_bytes: 1 << 20,
        });
        use Workload::*;
        for (sys, cold, warm, icold, iwarm) in [
            ("lakecache-1w", 96.0, 900.0, 50.0, 2000.0),
            ("rclone", 60.0, 300.0, 20.0, 300.0),
            ("s3fs", 40.0, 200.0, 40.0, 350.0),
            ("direct", 90.0, 90.0, 30.0, 30.0),
            ("tmpfs", 1000.0, 1000.0, 5000.0, 5000.0),
            ("fuse-copy", 800.0, 800.0, 3000.0, 3000.0),
        ] {
            r.push(row(sys, Shards, "cold", cold, 1.0));
            r.push(row(sys, Shards, "warm", warm, 1.0));
            r.push(row(sys, Images, "cold", icold, icold));
            r.push(row(sys, Images, "warm", iwarm, iwarm));
        }
        let mut p = row("lakecache-1w", Preload, "read-all", 95.0, 10.0);
        p.peak_rss = Some(10 << 20);
        p.memory_tier_used = Some(50 << 20);
        r.push(p);
        for (e, h) in [("epoch 1", 0.0), ("epoch 2", 0.5), ("epoch 3", 0.44)] {
            let mut p = row("lakecache-1w", Partial, e, 50.0, 50.0);
            p.hit_ratio = Some(h);
            r.push(p);
        }
        r.plan.systems = vec![
            SystemKind::Lakecache(1),
            SystemKind::Rclone,
            SystemKind::S3fs,
            SystemKind::Direct,
            SystemKind::Tmpfs,
            SystemKind::FuseCopy,
        ];
        r.finish();
        r
    }

    /// [`sample`] with the CSI path over both transports, CPU per GB on the warm rows.
    fn with_csi() -> Results {
        use Workload::*;
        let mut r = sample();
        for (sys, w, reader, worker) in [
            ("lakecache-1w", Shards, 1.0, None),
            ("lakecache-1w", Images, 4.0, None),
            ("lakecache-3w-csi", Shards, 1.2, Some(0.5)),
            ("lakecache-3w-csi", Images, 6.4, Some(2.0)),
            ("lakecache-3w-csi-grpc", Shards, 2.0, Some(1.5)),
            ("lakecache-3w-csi-grpc", Images, 6.0, Some(3.0)),
        ] {
            if r.find(sys, w, "warm").is_none() {
                // 0.9 of lakecache-1w's rates over the block transport, half over gRPC.
                let k = if sys.ends_with("grpc") { 0.5 } else { 0.9 };
                let (mb_s, files_s) = if w == Shards {
                    (900.0 * k, 1.0)
                } else {
                    (2000.0 * k, 2000.0 * k)
                };
                r.push(row(sys, w, "cold", 90.0, 45.0));
                r.push(row(sys, w, "warm", mb_s, files_s));
            }
            let row = r
                .rows
                .iter_mut()
                .find(|x| x.system == sys && x.workload == w && x.phase == "warm")
                .unwrap();
            row.reader_cpu_s_per_gb = Some(reader);
            row.worker_cpu_s_per_gb = worker;
        }
        r.plan.systems.extend([
            SystemKind::LakecacheCsi(3, CsiTransport::Blocks),
            SystemKind::LakecacheCsi(3, CsiTransport::Grpc),
        ]);
        r.finish();
        r
    }

    #[test]
    fn ratios_and_targets() {
        let r = sample();
        let lc = r.find("lakecache-1w", Workload::Shards, "warm").unwrap();
        assert!((lc.vs_tmpfs.unwrap() - 0.9).abs() < 1e-9);
        assert!((lc.vs_best_peer.unwrap() - 3.0).abs() < 1e-9);
        let t: BTreeMap<&str, &Target> = r.targets.iter().map(|t| (t.target.as_str(), t)).collect();
        let holds = |k: &str| t.iter().find(|(n, _)| n.starts_with(k)).unwrap().1.holds;
        assert_eq!(holds("warm shards ≥ 0.9× tmpfs"), Some(true));
        assert_eq!(holds("warm shards ≥ 0.8× the FUSE"), Some(true));
        // 2000 / 350 (s3fs) = 5.7
        assert_eq!(holds("warm images"), Some(true));
        assert_eq!(holds("cold shards"), Some(true));
        // 50 vs s3fs's 40
        assert_eq!(holds("cold images"), Some(true));
        // min(0.5, 0.44)
        assert_eq!(holds("partial-cache"), Some(false));
        assert_eq!(holds("preload"), Some(true));
        // (10 MiB + 50 MiB) / 64 MiB
        assert_eq!(holds("worker memory"), Some(true));
        assert_eq!(t["worker memory ≤ Memory tier + 15%"].better, Better::Lower);
        assert_eq!(t["cold images ≥ best peer"].better, Better::Higher);
        // No CSI system ran: no target against lakecache-1w.
        assert!(!r.targets.iter().any(|t| t.target.contains("lakecache-1w")));
    }

    #[test]
    fn csi_targets_compare_with_lakecache_1w() {
        let r = with_csi();
        let of = |sys: &str, prefix: &str| -> Vec<&Target> {
            r.targets
                .iter()
                .filter(|t| t.system == sys && t.target.starts_with(prefix))
                .collect()
        };
        for sys in ["lakecache-3w-csi", "lakecache-3w-csi-grpc"] {
            assert_eq!(of(sys, "warm shards ≥ 0.8× lakecache-1w").len(), 1, "{sys}");
            assert_eq!(of(sys, "warm images ≥ 0.8× lakecache-1w").len(), 1, "{sys}");
            let cpu = of(sys, "reader CPU per warm GB ≤ 1.5× lakecache-1w's");
            assert_eq!(cpu.len(), 2, "{sys}: shards and images");
            assert!(cpu.iter().all(|t| t.better == Better::Lower));
        }
        let one = |sys: &str, prefix: &str| {
            let t = of(sys, prefix);
            assert_eq!(t.len(), 1, "{sys} {prefix}");
            (t[0].measured.unwrap(), t[0].holds.unwrap())
        };
        let close = |(m, h): (f64, bool), want: f64, holds: bool| {
            assert!((m - want).abs() < 1e-9, "{m} against {want}");
            assert_eq!(h, holds);
        };
        let cpu = "reader CPU per warm GB ≤ 1.5× lakecache-1w's";
        close(
            one("lakecache-3w-csi", "warm shards ≥ 0.8× lakecache-1w"),
            0.9,
            true,
        );
        close(
            one("lakecache-3w-csi", "warm images ≥ 0.8× lakecache-1w"),
            0.9,
            true,
        );
        close(
            one("lakecache-3w-csi-grpc", "warm shards ≥ 0.8× lakecache-1w"),
            0.5,
            false,
        );
        // Smaller is better: 1.2 / 1.0 and 6.0 / 4.0 hold, 6.4 / 4.0 and 2.0 / 1.0 do not.
        close(
            one("lakecache-3w-csi", &format!("{cpu} (shards)")),
            1.2,
            true,
        );
        close(
            one("lakecache-3w-csi", &format!("{cpu} (images)")),
            1.6,
            false,
        );
        close(
            one("lakecache-3w-csi-grpc", &format!("{cpu} (shards)")),
            2.0,
            false,
        );
        close(
            one("lakecache-3w-csi-grpc", &format!("{cpu} (images)")),
            1.5,
            true,
        );
        // lakecache-1w itself has none of these.
        assert!(of("lakecache-1w", "reader CPU").is_empty());

        // Without lakecache-1w in the run they are there, not measured.
        let mut r = with_csi();
        r.rows.retain(|x| x.system != "lakecache-1w");
        r.plan.systems.retain(|k| *k != SystemKind::Lakecache(1));
        r.finish();
        let vs_1w: Vec<&Target> = r
            .targets
            .iter()
            .filter(|t| t.target.contains("lakecache-1w"))
            .collect();
        assert_eq!(vs_1w.len(), 2 * 4);
        assert!(
            vs_1w
                .iter()
                .all(|t| t.measured.is_none() && t.holds.is_none())
        );
    }

    #[test]
    fn cpu_per_gb_needs_bytes() {
        let mut r = row("x", Workload::Shards, "warm", 500.0, 1.0);
        r.set_cpu_per_gb(1.0, Some(0.25));
        assert_eq!(r.reader_cpu_s_per_gb, Some(2.0));
        assert_eq!(r.worker_cpu_s_per_gb, Some(0.5));
        let mut m = row("x", Workload::Metadata, "warm", 0.0, 100.0);
        m.set_cpu_per_gb(1.0, Some(0.25));
        assert_eq!((m.reader_cpu_s_per_gb, m.worker_cpu_s_per_gb), (None, None));
    }

    #[test]
    fn markdown_has_a_table_per_workload_and_the_targets() {
        let md = sample().markdown();
        for h in [
            "## Shards",
            "## Images",
            "## Preload",
            "## Partial cache",
            "## Targets",
        ] {
            assert!(md.contains(h), "{h} missing from:\n{md}");
        }
        assert!(md.contains("| lakecache-1w | warm | 1.00 | 900.0 |"));
        assert!(md.contains("**no**"));
        let md = with_csi().markdown();
        assert!(md.contains("| reader CPU s/GB | worker CPU s/GB |"), "{md}");
        // lakecache local's workers are in its reader; the CSI path's are apart.
        assert!(md.contains("| 1.00 | in reader |"), "{md}");
        assert!(md.contains("| 1.20 | 0.50 |"), "{md}");
        assert!(md.contains("(shards) | 1.20 | yes |"), "{md}");
    }
}
