//! What one run measures, as one typed value built from the flags without I/O: the profile
//! (dataset sizes, cache sizes, readers, time bounds), the link, and which systems and
//! workloads run.
//!
//! The two profiles differ only in sizes. `small` is what the smoke test runs inside the test
//! command (a few MiB, seconds per system); `full` is sized for a 2-core, 24 GiB machine: 8
//! shards of 128 MiB and 10,000 images of ~110 KiB (2.2 GB), which keeps one far-link run of
//! every system and workload near half an hour. Every size is a flag, so a bigger machine can
//! run the 20,000-image ImageNet-like set.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;

use crate::dataset::{self, DatasetSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    Small,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkName {
    Near,
    Far,
}

/// The emulated link to the lake.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    pub name: LinkName,
    /// Round-trip time added by toxiproxy (half each way, whole milliseconds).
    pub rtt_ms: u64,
    /// Rate of the veth pair, each direction, bits per second (`tbf` on both ends).
    pub rate_bits: u64,
}

impl Link {
    pub fn of(name: LinkName) -> Self {
        match name {
            LinkName::Near => Link {
                name,
                rtt_ms: 1,
                rate_bits: 5_000_000_000,
            },
            LinkName::Far => Link {
                name,
                rtt_ms: 20,
                rate_bits: 1_000_000_000,
            },
        }
    }

    /// Latency toxics, in ms, on the (upstream, downstream) streams: the RTT split in two,
    /// the odd millisecond on the answer's way.
    pub fn toxics(&self) -> (u64, u64) {
        let up = self.rtt_ms / 2;
        (up, self.rtt_ms - up)
    }

    /// `tbf` burst: 1 ms at the rate, at least 64 KiB (one GSO packet must fit).
    pub fn burst_bytes(&self) -> u64 {
        (self.rate_bits / 8 / 1000).max(64 << 10)
    }
}

/// The systems compared; each reads the same bucket through the same link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum SystemKind {
    /// `lakecache local` with this many workers.
    Lakecache(usize),
    /// The same, keeping node-local copies of whole files in /dev/shm (as large as the Memory
    /// tier) that warm opens hand to the kernel with FUSE passthrough.
    LakecacheLocal(usize),
    /// The data path of a CSI-mounted volume: this many `lakecache-worker` processes and the
    /// `lakecache-csi-node fuse-server` that the CSI plugin's mounter runs per volume, reading
    /// the workers over the network as in a cluster, by this transport.
    LakecacheCsi(usize, CsiTransport),
    Rclone,
    S3fs,
    /// Ranged GETs straight from the store, no cache.
    Direct,
    /// The files copied to a local tmpfs: the ceiling.
    Tmpfs,
    /// The tmpfs copy served through a FUSE filesystem that only copies (bindfs): the ceiling
    /// of any FUSE cache that does not use passthrough.
    FuseCopy,
}

/// How the CSI data path's FUSE server reads block bytes from the workers (its
/// `blockTransport` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CsiTransport {
    /// The block transport (`"blockTransport": true`, the default): plain TCP, Memory tier
    /// blocks sent with `sendfile` by the workers.
    Blocks,
    /// gRPC only (`"blockTransport": false`): the data path before the block transport.
    Grpc,
}

impl SystemKind {
    pub fn label(&self) -> String {
        match self {
            SystemKind::Lakecache(n) => format!("lakecache-{n}w"),
            SystemKind::LakecacheLocal(n) => format!("lakecache-{n}w-local"),
            SystemKind::LakecacheCsi(n, CsiTransport::Blocks) => format!("lakecache-{n}w-csi"),
            SystemKind::LakecacheCsi(n, CsiTransport::Grpc) => format!("lakecache-{n}w-csi-grpc"),
            SystemKind::Rclone => "rclone".into(),
            SystemKind::S3fs => "s3fs".into(),
            SystemKind::Direct => "direct".into(),
            SystemKind::Tmpfs => "tmpfs".into(),
            SystemKind::FuseCopy => "fuse-copy".into(),
        }
    }

    pub fn is_lakecache(&self) -> bool {
        matches!(
            self,
            SystemKind::Lakecache(_) | SystemKind::LakecacheLocal(_) | SystemKind::LakecacheCsi(..)
        )
    }

    /// Whether lakecache's workers run in the process the mount lives in (`lakecache local`),
    /// so their CPU time is the reader's.
    pub fn workers_in_reader(&self) -> bool {
        matches!(
            self,
            SystemKind::Lakecache(_) | SystemKind::LakecacheLocal(_)
        )
    }

    /// What a user would pick instead of lakecache (the "best peer" is the best of these).
    pub fn is_peer(&self) -> bool {
        matches!(
            self,
            SystemKind::Rclone | SystemKind::S3fs | SystemKind::Direct
        )
    }

    /// Whether the system has a cache whose size can be bounded (the partial-cache workload).
    /// s3fs cannot: `use_cache` has no size limit, only `ensure_diskfree`, which stops caching
    /// when the disk is nearly full, and it refuses to start unless its cache directory has
    /// room for `parallel_count` × `multipart_size` more.
    /// The local-copies variant is left out: its copies would be a second cache beside the
    /// half-sized tier.
    pub fn bounded_cache(&self) -> bool {
        matches!(
            self,
            SystemKind::Lakecache(_) | SystemKind::LakecacheCsi(..) | SystemKind::Rclone
        )
    }

    /// Whether its data is local from the start (no cold epoch, no preload through the link).
    pub fn is_ceiling(&self) -> bool {
        matches!(self, SystemKind::Tmpfs | SystemKind::FuseCopy)
    }
}

impl FromStr for SystemKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rclone" => Ok(SystemKind::Rclone),
            "s3fs" => Ok(SystemKind::S3fs),
            "direct" => Ok(SystemKind::Direct),
            "tmpfs" => Ok(SystemKind::Tmpfs),
            "fuse-copy" => Ok(SystemKind::FuseCopy),
            _ => {
                let (rest, variant) = if let Some(r) = s.strip_suffix("-local") {
                    (r, "local")
                } else if let Some(r) = s.strip_suffix("-csi-grpc") {
                    (r, "csi-grpc")
                } else if let Some(r) = s.strip_suffix("-csi") {
                    (r, "csi")
                } else {
                    (s, "")
                };
                let n = rest
                    .strip_prefix("lakecache-")
                    .and_then(|r| r.strip_suffix('w'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| (1..=16).contains(n));
                n.map(|n| match variant {
                    "local" => SystemKind::LakecacheLocal(n),
                    "csi" => SystemKind::LakecacheCsi(n, CsiTransport::Blocks),
                    "csi-grpc" => SystemKind::LakecacheCsi(n, CsiTransport::Grpc),
                    _ => SystemKind::Lakecache(n),
                })
                .ok_or_else(|| {
                    format!(
                        "{s}: expected lakecache-<N>w, lakecache-<N>w-local, lakecache-<N>w-csi, lakecache-<N>w-csi-grpc, rclone, s3fs, direct, tmpfs or fuse-copy"
                    )
                })
            }
        }
    }
}

impl fmt::Display for SystemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// The workloads, in the order they run on one system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// List and stat the images tree, cold (first thing after start) and warm.
    Metadata,
    /// Sequential read of every shard by the shard readers, cold and warm.
    Shards,
    /// Shuffled whole-file reads of every image by the image readers, cold and warm.
    Images,
    /// Time to warm the whole dataset from an empty cache.
    Preload,
    /// Cache sized at half the images, three shuffled epochs.
    Partial,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Metadata,
        Workload::Shards,
        Workload::Images,
        Workload::Preload,
        Workload::Partial,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Workload::Metadata => "metadata",
            Workload::Shards => "shards",
            Workload::Images => "images",
            Workload::Preload => "preload",
            Workload::Partial => "partial",
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.label() == s)
            .ok_or_else(|| format!("{s}: expected metadata, shards, images, preload or partial"))
    }
}

/// Everything one run does.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub profile: ProfileName,
    pub link: Link,
    pub dataset: DatasetSpec,
    /// lakecache's Memory tier over all workers, for the shards, images, metadata and
    /// preload workloads.
    pub memory: u64,
    /// lakecache's Disk tier over all workers (0: none).
    pub disk: u64,
    pub shard_readers: usize,
    pub image_readers: usize,
    pub preload_readers: usize,
    /// Bytes per read of the sequential readers (`pread`).
    pub read_size: usize,
    pub partial_epochs: usize,
    pub systems: Vec<SystemKind>,
    pub workloads: Vec<Workload>,
    /// Bound on one workload of one system (its epochs together); past it the run stops.
    #[serde(with = "secs")]
    pub workload_timeout: Duration,
    pub seed: u64,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// lakecache's default block size: no tier of a worker may be smaller.
pub const LAKECACHE_BLOCK: u64 = 4 << 20;

/// Overrides from the command line; `None` keeps the profile's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub shards: Option<u64>,
    pub shard_size: Option<ByteSize>,
    pub images: Option<u64>,
    pub image_size: Option<ByteSize>,
    pub memory: Option<ByteSize>,
    pub disk: Option<ByteSize>,
    pub systems: Option<Vec<SystemKind>>,
    pub workloads: Option<Vec<Workload>>,
    pub workload_timeout: Option<Duration>,
}

pub fn default_systems() -> Vec<SystemKind> {
    vec![
        SystemKind::Lakecache(1),
        SystemKind::Lakecache(3),
        SystemKind::LakecacheLocal(1),
        SystemKind::LakecacheCsi(3, CsiTransport::Blocks),
        SystemKind::Rclone,
        SystemKind::S3fs,
        SystemKind::Direct,
        SystemKind::Tmpfs,
        SystemKind::FuseCopy,
    ]
}

impl Plan {
    pub fn new(profile: ProfileName, link: LinkName, o: Overrides) -> Result<Plan, String> {
        let mut plan = match profile {
            ProfileName::Small => Plan {
                profile,
                link: Link::of(link),
                // 240 images (26 MB): the partial-cache workload's half is then a Memory tier
                // of at least one 4 MiB block per worker with three workers.
                dataset: DatasetSpec {
                    shards: 2,
                    shard_size: 4 << 20,
                    images: 240,
                    classes: 8,
                    image_size: 110 << 10,
                },
                memory: 64 << 20,
                disk: 256 << 20,
                shard_readers: 4,
                image_readers: 8,
                preload_readers: 16,
                read_size: 1 << 20,
                partial_epochs: 3,
                systems: default_systems(),
                workloads: Workload::ALL.to_vec(),
                workload_timeout: Duration::from_secs(60),
                seed: 42,
            },
            ProfileName::Full => Plan {
                profile,
                link: Link::of(link),
                dataset: DatasetSpec {
                    shards: 8,
                    shard_size: 128 << 20,
                    images: 10_000,
                    classes: 100,
                    image_size: 110 << 10,
                },
                memory: 3 << 30,
                disk: 8 << 30,
                shard_readers: 4,
                image_readers: 8,
                preload_readers: 16,
                read_size: 1 << 20,
                partial_epochs: 3,
                systems: default_systems(),
                workloads: Workload::ALL.to_vec(),
                workload_timeout: Duration::from_secs(20 * 60),
                seed: 42,
            },
        };
        let d = &mut plan.dataset;
        d.shards = o.shards.unwrap_or(d.shards);
        d.shard_size = o.shard_size.map(|s| s.as_u64()).unwrap_or(d.shard_size);
        d.images = o.images.unwrap_or(d.images);
        d.image_size = o.image_size.map(|s| s.as_u64()).unwrap_or(d.image_size);
        d.classes = d.classes.min(d.images).max(1);
        plan.memory = o.memory.map(|s| s.as_u64()).unwrap_or(plan.memory);
        plan.disk = o.disk.map(|s| s.as_u64()).unwrap_or(plan.disk);
        if let Some(s) = o.systems {
            plan.systems = s;
        }
        if let Some(mut w) = o.workloads {
            w.sort();
            w.dedup();
            plan.workloads = w;
        }
        if let Some(t) = o.workload_timeout {
            plan.workload_timeout = t;
        }
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<(), String> {
        let d = &self.dataset;
        if d.shards == 0 || d.shard_size == 0 {
            return Err("the dataset needs at least one non-empty shard".into());
        }
        if d.images < 2 || d.image_size < 4 {
            return Err("the dataset needs at least two images of 4 bytes or more".into());
        }
        if self.memory + self.disk == 0 {
            return Err("lakecache needs a Memory or a Disk tier".into());
        }
        if self.systems.is_empty() || self.workloads.is_empty() {
            return Err("nothing to run: no systems or no workloads".into());
        }
        let half = dataset::total(&dataset::images(d)) / 2;
        for s in &self.systems {
            if let SystemKind::Lakecache(n)
            | SystemKind::LakecacheLocal(n)
            | SystemKind::LakecacheCsi(n, _) = s
                && self.runs(Workload::Partial)
                && half / (*n as u64) < LAKECACHE_BLOCK
            {
                return Err(format!(
                    "the partial-cache workload gives {s} a Memory tier of half the images \
                     ({} per worker), less than one 4 MiB block: use more images",
                    ByteSize::b(half / *n as u64)
                ));
            }
        }
        Ok(())
    }

    pub fn shards_bytes(&self) -> u64 {
        self.dataset.shards * self.dataset.shard_size
    }

    pub fn runs(&self, w: Workload) -> bool {
        self.workloads.contains(&w)
    }

    /// Whether lakecache's tiers hold the whole dataset (`total` bytes) on this node.
    pub fn whole_on_node(&self, total: u64) -> bool {
        self.memory + self.disk >= total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_split_their_rtt() {
        assert_eq!(Link::of(LinkName::Far).toxics(), (10, 10));
        assert_eq!(Link::of(LinkName::Near).toxics(), (0, 1));
        assert_eq!(Link::of(LinkName::Far).burst_bytes(), 125_000);
        assert_eq!(Link::of(LinkName::Near).burst_bytes(), 625_000);
    }

    #[test]
    fn system_names_round_trip() {
        let grpc = SystemKind::LakecacheCsi(3, CsiTransport::Grpc);
        assert!(
            !default_systems().contains(&grpc),
            "selected with --systems only"
        );
        for s in default_systems().into_iter().chain([grpc]) {
            assert_eq!(s.label().parse::<SystemKind>(), Ok(s));
        }
        assert_eq!(grpc.label(), "lakecache-3w-csi-grpc");
        assert_eq!(
            "lakecache-2w-csi".parse::<SystemKind>(),
            Ok(SystemKind::LakecacheCsi(2, CsiTransport::Blocks))
        );
        assert!("lakecache-0w".parse::<SystemKind>().is_err());
        assert!("lakecache-3w-grpc".parse::<SystemKind>().is_err());
        assert!("lakecache-3w-local-grpc".parse::<SystemKind>().is_err());
        assert!("minio".parse::<SystemKind>().is_err());
        assert_eq!("partial".parse::<Workload>(), Ok(Workload::Partial));
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let p = Plan::new(
            ProfileName::Full,
            LinkName::Far,
            Overrides {
                images: Some(3),
                systems: Some(vec![SystemKind::Tmpfs]),
                workloads: Some(vec![Workload::Images, Workload::Metadata, Workload::Images]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.dataset.images, 3);
        assert_eq!(p.dataset.classes, 3);
        assert_eq!(p.workloads, vec![Workload::Metadata, Workload::Images]);
        assert_eq!(p.link.rtt_ms, 20);
        let bad = Plan::new(
            ProfileName::Small,
            LinkName::Near,
            Overrides {
                memory: Some(ByteSize::b(0)),
                disk: Some(ByteSize::b(0)),
                ..Default::default()
            },
        );
        assert!(bad.is_err());
        // Too few images for a 4 MiB block per worker at half the images.
        let few = Plan::new(
            ProfileName::Small,
            LinkName::Near,
            Overrides {
                images: Some(100),
                ..Default::default()
            },
        );
        assert!(few.unwrap_err().contains("lakecache-3w"));
    }
}
