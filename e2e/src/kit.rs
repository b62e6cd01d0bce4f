//! Fixtures every crate's tests share, written once: deterministic file contents, a free port, a worker's
//! configuration, the wiring of started workers into a reader's membership, and the chart's
//! ServiceAccount and RBAC installed into a cluster with a kubeconfig of that account.
//!
//! This crate is the test kit: no product crate depends on it (it is a dev-dependency only), so
//! nothing here reaches a binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use lakecache_client::{Member, Membership};
use lakecache_lake::SourceSpec;
use lakecache_worker::Worker;
use lakecache_worker::config::{MetadataPolicy, TierConfig, WorkerConfig};
use lakecache_worker::store::TierKind;

use crate::Cluster;

/// Deterministic content for test files: `len` bytes of stream `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a loopback port")
        .port()
}

/// Worker `w<i>` of `source` on loopback ports the system picks, with blocks of `block_size`,
/// no tier and no token: set `tiers` (see [`tier`]) and, for a closed data plane, `token`.
pub fn worker_config(i: usize, source: SourceSpec, block_size: u64) -> WorkerConfig {
    WorkerConfig {
        id: format!("w{i}"),
        listen: "127.0.0.1:0".parse().expect("valid"),
        admin_listen: "127.0.0.1:0".parse().expect("valid"),
        block_size: ByteSize::b(block_size),
        metadata: MetadataPolicy::Immutable,
        ..WorkerConfig::new(source)
    }
}

/// A `kind` tier of `size` in `dir`.
pub fn tier(kind: TierKind, dir: &Path, size: ByteSize) -> TierConfig {
    TierConfig {
        kind,
        path: Some(dir.to_path_buf()),
        size,
    }
}

/// The member a reader dials for a started worker.
pub fn member(w: &Worker) -> Member {
    Member {
        id: w.id.clone(),
        endpoint: format!("http://{}", w.addr),
    }
}

/// A membership of `members` that sends `token`.
pub fn membership(members: Vec<Member>, token: Option<&str>) -> Arc<Membership> {
    let m = Arc::new(Membership::new(token, Duration::from_secs(1)).expect("a valid token"));
    m.set(members).expect("valid endpoints");
    m
}

/// The chart's `component` ServiceAccount and RBAC (`templates/<component>-serviceaccount.yaml`
/// and `templates/<component>-rbac.yaml`, release `lakecache` in `lakecache-system`) applied to
/// `cluster`, and a kubeconfig with that account's token (`lakecache-<component>`, or
/// `lakecache-csi-node` for `csi`): a test then runs a binary with exactly the rights the chart
/// gives it.
pub async fn chart_account(cluster: &Cluster, component: &str) -> anyhow::Result<PathBuf> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/lakecache");
    let sa = format!("templates/{component}-serviceaccount.yaml");
    let rbac = format!("templates/{component}-rbac.yaml");
    let out = cluster.helm(&[
        "template",
        "lakecache",
        chart.to_str().expect("a UTF-8 path"),
        "--namespace",
        "lakecache-system",
        "--show-only",
        &sa,
        "--show-only",
        &rbac,
    ]);
    anyhow::ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = cluster.kubectl_with_stdin(&["create", "namespace", "lakecache-system"], None);
    let applied = cluster.kubectl_with_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&String::from_utf8(out.stdout)?),
    );
    anyhow::ensure!(
        applied.status.success(),
        "applying the chart's {component} RBAC: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let account = match component {
        "csi" => "lakecache-csi-node".to_string(),
        c => format!("lakecache-{c}"),
    };
    cluster
        .kubeconfig_for_service_account("lakecache-system", &account)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_is_deterministic_and_differs_by_seed() {
        assert_eq!(pattern(1, 1000), pattern(1, 1000));
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert_eq!(pattern(3, 13).len(), 13);
        assert_eq!(&pattern(3, 100)[..13], &pattern(3, 13)[..]);
    }
}
