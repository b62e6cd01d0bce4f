//! The plugin learns a CacheNamespace's workers from the Kubernetes API (a real kube-apiserver
//! with the CRDs installed), as the chart's ServiceAccount with only the chart's rights, and
//! follows changes to `status.workers` while the volume is mounted.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::{Cluster, ClusterOptions};
use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::volume_capability::access_mode::Mode;
use serde_json::json;
use support::*;
use tonic::Code;

fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

fn kubectl(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    cluster.kubectl_ok(args, stdin)
}

/// The chart's CSI ServiceAccount and RBAC, and a kubeconfig with that account's token.
async fn csi_account(cluster: &Cluster) -> anyhow::Result<PathBuf> {
    lakecache_e2e::kit::chart_account(cluster, "csi").await
}

/// Sets a CacheNamespace's `status.workers`, as the operator does.
fn publish_workers(cluster: &Cluster, workers: &[(&str, String)]) -> anyhow::Result<()> {
    let list: Vec<_> = workers
        .iter()
        .map(|(n, a)| json!({"name": n, "address": a, "ready": true}))
        .collect();
    let patch = json!({"status": {"workers": list, "phase": "Ready"}}).to_string();
    kubectl(
        cluster,
        &[
            "patch",
            "cachenamespace",
            "imagenet",
            "-n",
            "ml",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ],
        None,
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_follows_the_workers_the_operator_publishes() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    kubectl(
        &cluster,
        &[
            "apply",
            "--server-side",
            "-f",
            repo().join("crds").to_str().unwrap(),
        ],
        None,
    )?;
    kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/cachenamespaces.lakecache.io",
        ],
        None,
    )?;
    kubectl(&cluster, &["create", "namespace", "ml"], None)?;
    let cn = json!({
        "apiVersion": "lakecache.io/v1alpha1", "kind": "CacheNamespace",
        "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://datasets/imagenet"}, "tiers": [{"kind": "Memory", "size": "1Gi"}]},
    });
    kubectl(&cluster, &["apply", "-f", "-"], Some(&cn.to_string()))?;
    let mut lake = Lake::start(2).await;
    let addr = |i: usize| lake.workers[i].addr.to_string();
    publish_workers(&cluster, &[("w0", addr(0))])?;

    let kubeconfig = csi_account(&cluster).await?;
    let root = tempfile::tempdir()?;
    let mut node = NodeProcs::new(root.path());
    node.startup_timeout = "5s";
    node.env = vec![("KUBECONFIG".into(), kubeconfig.display().to_string())];
    node.start_mounter();
    node.start_plugin();
    let mut n = node.connect().await.node();
    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let stage = |name: &str| csi::NodeStageVolumeRequest {
        volume_id: format!("lakecache-ml-{name}"),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_capability(Mode::MultiNodeReaderOnly)),
        secrets: map(&[("token", TOKEN)]),
        // No `workers`: the FUSE server reads them from the CacheNamespace.
        volume_context: map(&[("cacheNamespace", name), ("namespace", "ml")]),
        ..Default::default()
    };

    // A CacheNamespace that does not exist fails the stage and says so.
    let e = n.node_stage_volume(stage("nope")).await.unwrap_err();
    ensure!(
        e.message()
            .contains("CacheNamespace ml/nope does not exist"),
        "{e:?}"
    );
    ensure!(e.code() != Code::Ok);

    n.node_stage_volume(stage("imagenet")).await?;
    // The first file comes through w0, the only published worker.
    let (p0, d0) = &lake.files[0];
    ensure!(std::fs::read(staging.join(p0))? == *d0, "{p0} differs");

    // The operator replaces w0 by w1; w0 goes away. Files not read before (so not in the page
    // cache) still read, through w1.
    publish_workers(&cluster, &[("w1", addr(1))])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    lake.workers.remove(0).stop().await;
    for (p, d) in &lake.files[1..] {
        let path = staging.join(p);
        let want = d.clone();
        let got = eventually(&format!("{p} through w1"), Duration::from_secs(20), || {
            let path = path.clone();
            async move {
                Ok(tokio::task::spawn_blocking(move || std::fs::read(&path))
                    .await?
                    .ok())
            }
        })
        .await
        .context("the mount did not follow the new worker list")?;
        ensure!(got == want, "{p} differs");
    }
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "lakecache-ml-imagenet".into(),
        staging_target_path: staging.display().to_string(),
    })
    .await?;

    // An inline ephemeral volume (no `workers`: only a PersistentVolume may name them), in the
    // pod's namespace by default, with a subPath: published twice, read, unpublished twice.
    let target = root
        .path()
        .join("pods/p/volumes/kubernetes.io~csi/inline/mount");
    std::fs::create_dir_all(target.parent().unwrap())?;
    let req = csi::NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
        readonly: true,
        secrets: map(&[("token", TOKEN)]),
        volume_context: map(&[
            ("cacheNamespace", "imagenet"),
            ("subPath", "train"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.namespace", "ml"),
            ("csi.storage.k8s.io/pod.name", "p"),
        ]),
        ..Default::default()
    };
    n.node_publish_volume(req.clone()).await?;
    n.node_publish_volume(req.clone()).await?;
    let t = target.join("shard-1.bin");
    let got = tokio::task::spawn_blocking(move || std::fs::read(t)).await??;
    ensure!(got == lake.files[1].1, "shard-1.bin differs");
    ensure!(!target.join("val").exists(), "only the subPath shows");
    for _ in 0..2 {
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: req.volume_id.clone(),
            target_path: req.target_path.clone(),
        })
        .await?;
    }
    ensure!(!target.exists());
    ensure!(
        std::fs::read_dir(node.state.join("volumes"))?
            .next()
            .is_none(),
        "the inline volume's state is gone"
    );
    Ok(())
}
