//! The CRDs and the operator binary against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from the pinned upstream modules). The tests
//! whose CacheNamespaces run workers add a real node (kubelet, containerd, runc, the bridge CNI,
//! kube-proxy): the worker pods the operator makes run there as containers of our image, over a
//! real S3 server on the host's end of the node's link. The operator itself runs here, as a
//! process, and reaches the pods at their IPs as it would from inside the cluster.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lakecache_api::{CacheNamespace, CacheNamespacePhase, CachePreload, CachePreloadPhase};
use lakecache_client::fs::ROOT_INO;
use lakecache_client::{FsConfig, FsCore, Member, Membership, Reader, ReaderConfig};
use lakecache_e2e::{Cluster, ClusterOptions};
use serde_json::{Value, json};
use support::*;

const NS: &str = "ml";
/// The workers' data-plane port (not the default, to see the spec's reach the pods); each pod
/// has an address of its own, so any port will do.
const PORT: u16 = 7710;

/// A CacheNamespace over `data` reached at `endpoint`, with a Memory tier and a Disk tier on
/// the node's host path `disk`: a directory of this machine, since the node is this machine.
fn cache_namespace(
    name: &str,
    data: &Dataset,
    endpoint: &str,
    replicas: i32,
    disk: &Path,
) -> Value {
    json!({
        "apiVersion": "lakecache.io/v1alpha1",
        "kind": "CacheNamespace",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {
                "uri": format!("s3://{}/{}", data.bucket, data.prefix),
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecretRef": {"name": "s3-creds"},
                "options": {"disable_config_load": "true", "disable_ec2_metadata": "true"},
                "timeout": "10s",
            },
            "workers": {"replicas": replicas, "port": PORT},
            "tiers": [
                {"kind": "Memory", "size": "8Mi"},
                {"kind": "Disk", "size": "64Mi", "path": disk},
            ],
            "blockSize": "64Ki",
        },
    })
}

async fn credentials(client: &Client) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "s3-creds", "namespace": NS},
                "stringData": {
                    "access_key_id": lakecache_e2e::s3::ACCESS_KEY,
                    "secret_access_key": lakecache_e2e::s3::SECRET_KEY,
                },
            })),
        )
        .await?;
    Ok(())
}

async fn get_cn(api: &Api<CacheNamespace>, name: &str) -> anyhow::Result<CacheNamespace> {
    Ok(api.get(name).await?)
}

fn phase(cn: &CacheNamespace) -> Option<CacheNamespacePhase> {
    cn.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    cn: &'a CacheNamespace,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    cn.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Reads every file under `under` through the workers, as the FUSE side does, and checks it.
async fn read_through_workers(
    cn: &CacheNamespace,
    token: &str,
    data: &Dataset,
    under: &str,
) -> anyhow::Result<()> {
    let members: Vec<Member> = cn
        .status
        .as_ref()
        .context("no status")?
        .workers
        .iter()
        .filter(|w| w.ready)
        .map(|w| Member {
            id: w.name.clone(),
            endpoint: format!("http://{}", w.address),
        })
        .collect();
    let m = Arc::new(Membership::new(Some(token), Duration::from_secs(2))?);
    m.set(members)?;
    let cfg = ReaderConfig {
        block_size: 64 << 10,
        worker_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(20),
        metadata_ttl: None,
        direct_fallback: false,
    };
    let fs = FsCore::new(Arc::new(Reader::new(cfg, m, None)), FsConfig::default());
    for (path, want) in data.files.iter().filter(|(p, _)| p.starts_with(under)) {
        let mut ino = ROOT_INO;
        for part in path.split('/') {
            ino = fs
                .lookup(ino, part)
                .await
                .map_err(|e| anyhow::anyhow!("lookup {path}: {e:?}"))?
                .ino;
        }
        let fh = fs
            .open(ino)
            .await
            .map_err(|e| anyhow::anyhow!("open {path}: {e:?}"))?;
        let mut got = Vec::new();
        loop {
            let b = fs
                .read(fh, got.len() as u64, 128 << 10)
                .await
                .map_err(|e| anyhow::anyhow!("read {path}: {e:?}"))?;
            if b.is_empty() {
                break;
            }
            got.extend_from_slice(&b);
        }
        fs.release(fh);
        ensure!(got == *want, "{path} read back different bytes");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crds_teach_with_explain_and_refuse_malformed_objects() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    install_crds(&cluster)?;
    kubectl(&cluster, &["create", "namespace", NS])?;

    // `kubectl explain` teaches the fields (once the API server publishes the CRDs' OpenAPI).
    let explain = wait("kubectl explain to know the CRDs", || async {
        Ok(kubectl(&cluster, &["explain", "cachenamespace.spec.tiers"]).ok())
    })
    .await?;
    ensure!(explain.contains("fastest first"), "{explain}");
    let explain = kubectl(
        &cluster,
        &["explain", "cachenamespace.spec.source.credentialsSecretRef"],
    )?;
    ensure!(
        explain.contains("mounted into the") && explain.contains("workers as files"),
        "{explain}"
    );
    let explain = kubectl(&cluster, &["explain", "cachepreload.spec.schedule"])?;
    ensure!(explain.contains("cron"), "{explain}");
    let explain = kubectl(&cluster, &["explain", "cachenamespace.status.hitRatio"])?;
    ensure!(explain.contains("served from a cache tier"), "{explain}");

    let good = json!({
        "apiVersion": "lakecache.io/v1alpha1", "kind": "CacheNamespace",
        "metadata": {"name": "imagenet", "namespace": NS},
        "spec": {
            "source": {"uri": "s3://datasets/imagenet", "region": "us-east-1"},
            "tiers": [{"kind": "Memory", "size": "1Gi"}, {"kind": "Disk", "size": "10Gi", "path": "/mnt/cache"}],
        },
    });
    let edit = |path: &[&str], v: Value| {
        let mut o = good.clone();
        let mut at = &mut o;
        for p in &path[..path.len() - 1] {
            at = at.get_mut(*p).unwrap();
        }
        at[path[path.len() - 1]] = v;
        o
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            edit(&["spec", "source", "uri"], json!("ftp://namenode/x")),
            "source.uri must be s3://",
        ),
        (
            edit(&["spec", "source", "uri"], json!("s3://")),
            "source.uri must be s3://",
        ),
        (
            edit(&["spec", "blockSize"], json!("3Mi")),
            "blockSize must be a power of two",
        ),
        (
            edit(&["spec", "blockSize"], json!("1Gi")),
            "blockSize must be a power of two",
        ),
        (edit(&["spec", "tiers"], json!([])), "spec.tiers"),
        (
            edit(
                &["spec", "tiers"],
                json!([{"kind": "Memory", "size": "1Gi"}, {"kind": "Memory", "size": "2Gi"}]),
            ),
            "at most one Memory tier",
        ),
        (
            edit(&["spec", "tiers"], json!([{"kind": "Disk", "size": "1Gi"}])),
            "a Disk tier needs exactly one of path",
        ),
        (
            edit(
                &["spec", "tiers"],
                json!([{"kind": "Memory", "size": "1Gi", "path": "/x"}]),
            ),
            "a Memory tier takes neither",
        ),
        (
            edit(&["spec", "tiers"], json!([{"kind": "Memory", "size": "0"}])),
            "size must be a quantity greater than 0",
        ),
        (
            edit(
                &["spec", "tiers"],
                json!([{"kind": "Memory", "size": "lots"}]),
            ),
            "size must be a quantity greater than 0",
        ),
        (
            edit(&["spec", "tiers"], json!([{"kind": "Tape", "size": "1Gi"}])),
            "spec.tiers[0].kind",
        ),
        (
            edit(
                &["spec", "source", "options"],
                json!({"secret_access_key": "AKIA…"}),
            ),
            "must not hold credentials",
        ),
        (
            edit(&["spec", "source", "endpoint"], json!("ftp://files")),
            "source.endpoint must be an http",
        ),
        (
            edit(&["spec", "source", "timeout"], json!("soon")),
            "source.timeout",
        ),
        (
            edit(&["spec", "metadata"], json!({"policy": "Ttl"})),
            "metadata.ttl is required",
        ),
        (
            edit(&["spec", "workers"], json!({"replicas": -1})),
            "spec.workers.replicas",
        ),
        (
            edit(
                &["spec", "workers"],
                json!({"imagePullPolicy": "Sometimes"}),
            ),
            "imagePullPolicy must be",
        ),
        (
            edit(&["metadata", "name"], json!("a".repeat(46))),
            "at most 45 characters",
        ),
    ];
    let n = cases.len();
    for (obj, needle) in cases {
        let out = cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(&obj.to_string()));
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "accepted: {obj}");
        ensure!(err.contains(needle), "{needle:?} not in: {err}");
    }
    eprintln!("{n} malformed CacheNamespaces refused, each naming its field");

    let preload = json!({
        "apiVersion": "lakecache.io/v1alpha1", "kind": "CachePreload",
        "metadata": {"name": "warm", "namespace": NS},
        "spec": {"cacheNamespace": "imagenet", "paths": ["train/**"]},
    });
    let pedit = |k: &str, v: Value| {
        let mut o = preload.clone();
        o["spec"][k] = v;
        o
    };
    for (obj, needle) in [
        (pedit("paths", json!([])), "spec.paths"),
        (
            pedit("paths", json!(["/etc/passwd"])),
            "relative to the source root",
        ),
        (pedit("paths", json!(["../other"])), "without '..'"),
        (pedit("schedule", json!("every day")), "five fields"),
        (
            pedit("cacheNamespace", json!("Not_A_Name")),
            "cacheNamespace must be the name",
        ),
    ] {
        let out = cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(&obj.to_string()));
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "accepted: {obj}");
        ensure!(err.contains(needle), "{needle:?} not in: {err}");
    }

    // The good ones are accepted, defaulted, and show their columns.
    cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(&good.to_string()));
    kubectl(&cluster, &["get", "cns", "-n", NS, "imagenet"])?;
    let cn: Value = serde_json::from_str(&kubectl(
        &cluster,
        &["get", "cachenamespace", "-n", NS, "imagenet", "-o", "json"],
    )?)?;
    ensure!(
        cn["spec"]["workers"]["replicas"] == 1,
        "replicas not defaulted: {cn}"
    );
    ensure!(
        cn["spec"]["metadata"]["policy"] == "Immutable",
        "policy not defaulted: {cn}"
    );
    let table = kubectl(&cluster, &["get", "cachenamespaces", "-n", NS])?;
    for col in ["PHASE", "READY", "WORKERS", "CACHED", "HIT RATIO", "AGE"] {
        ensure!(table.contains(col), "no {col} column: {table}");
    }
    cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(&preload.to_string()));
    let table = kubectl(&cluster, &["get", "cpl", "-n", NS])?;
    for col in ["CACHE", "PHASE", "PROGRESS"] {
        ensure!(table.contains(col), "no {col} column: {table}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_builds_serves_scales_rolls_out_preloads_and_cleans_up() -> anyhow::Result<()> {
    let _serial = serial().await;
    lakecache_e2e::init_logging();
    // The Disk tier's host path. Declared before the cluster, so it outlives the node's pods;
    // removed (and checked to be) at the end.
    let disk = tempfile::Builder::new()
        .prefix("lakecache-disk-")
        .tempdir_in("/tmp")?;
    let cluster = Cluster::start(ClusterOptions::with_node()).await?;
    eprintln!(
        "control plane and node up in {:.1} s",
        cluster.started_in().as_secs_f64()
    );
    let data = Dataset::create("datasets", cluster.host_ip()).await?;
    install_crds(&cluster)?;
    let client = cluster.client().await?;
    create_namespace(&client, NS).await?;
    credentials(&client).await?;
    // The operator runs as the chart's ServiceAccount, with the chart's least rights, and
    // elects itself leader through a Lease in its namespace.
    let kubeconfig = operator_account(&cluster).await?;
    // The Disk tier's directory is the one node directory the operator allows.
    let operator = Operator::start(
        &kubeconfig,
        cluster.dir(),
        &[
            "--lease-namespace",
            "lakecache-system",
            "--allowed-host-path-roots",
            disk.path().to_str().unwrap(),
        ],
    )?;
    let diagnostics = Diagnostics::new(&cluster, NS, &operator);
    let cns: Api<CacheNamespace> = Api::namespaced(client.clone(), NS);
    cns.create(
        &PostParams::default(),
        &object(cache_namespace(
            "imagenet",
            &data,
            &data.s3.endpoint(),
            2,
            disk.path(),
        )),
    )
    .await?;
    let cn = get_cn(&cns, "imagenet").await?;
    let uid = cn.uid().unwrap();

    // Every child, owned by the CacheNamespace.
    let owned = |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
        refs.iter()
            .any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "CacheNamespace")
    };
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let sts = wait("the worker StatefulSet", || async {
        Ok(sts_api.get_opt("imagenet-worker").await?)
    })
    .await?;
    ensure!(owned(sts.owner_references()), "StatefulSet not owned");
    let spec = sts.spec.as_ref().unwrap();
    ensure!(spec.replicas == Some(2));
    ensure!(spec.service_name.as_deref() == Some("imagenet-workers"));
    let svc: Service = Api::namespaced(client.clone(), NS)
        .get("imagenet-workers")
        .await?;
    ensure!(owned(svc.owner_references()));
    ensure!(
        svc.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("None"),
        "the Service is not headless"
    );
    let cm: ConfigMap = Api::namespaced(client.clone(), NS)
        .get("imagenet-worker-config")
        .await?;
    ensure!(owned(cm.owner_references()));
    let yaml = cm.data.as_ref().unwrap()["worker.yaml"].clone();
    ensure!(
        yaml.contains("s3://datasets/imagenet") && yaml.contains("credentialsDir"),
        "{yaml}"
    );
    ensure!(
        !yaml.contains(lakecache_e2e::s3::SECRET_KEY),
        "the ConfigMap holds a credential"
    );
    let tok: Secret = Api::namespaced(client.clone(), NS)
        .get("imagenet-token")
        .await?;
    ensure!(owned(tok.owner_references()));
    let token = String::from_utf8(tok.data.as_ref().unwrap()["token"].0.clone())?;
    ensure!(
        token.len() == 64,
        "a 32-byte hex token, got {} characters",
        token.len()
    );
    let pdb: PodDisruptionBudget = Api::namespaced(client.clone(), NS)
        .get("imagenet-workers")
        .await?;
    ensure!(owned(pdb.owner_references()));
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pvc = wait("the PVC bound to its PV", || async {
        let pvc = pvcs.get("imagenet").await?;
        Ok((pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")).then_some(pvc))
    })
    .await?;
    ensure!(owned(pvc.owner_references()));
    ensure!(pvc.spec.as_ref().unwrap().volume_name.as_deref() == Some("lakecache-ml.imagenet"));
    let pv = pvs.get("lakecache-ml.imagenet").await?;
    let pv_spec = pv.spec.as_ref().unwrap();
    ensure!(pv_spec.access_modes.as_deref() == Some(&["ReadOnlyMany".to_string()][..]));
    let csi = pv_spec.csi.as_ref().unwrap();
    ensure!(csi.driver == lakecache_api::CSI_DRIVER && csi.read_only == Some(true));
    ensure!(csi.node_stage_secret_ref.as_ref().unwrap().name.as_deref() == Some("imagenet-token"));
    ensure!(pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"));

    // Workers come up as containers on the node (the image's user, the Disk tier's directory
    // handed to it by the init container); the status says Ready and lists them at their pod
    // IPs.
    let cn = wait("the CacheNamespace Ready with 2 workers", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        Ok((phase(&cn) == Some(CacheNamespacePhase::Ready)
            && cn.status.as_ref().unwrap().ready_workers == 2)
            .then_some(cn))
    })
    .await?;
    let st = cn.status.as_ref().unwrap();
    ensure!(
        st.workers.len() == 2 && st.workers.iter().all(|w| w.ready),
        "{:?}",
        st.workers
    );
    let pods = worker_pods(&client, NS, "imagenet").await?;
    for w in &st.workers {
        let (_, ip, _, _) = pods
            .iter()
            .find(|(name, ..)| *name == w.name)
            .with_context(|| format!("no pod {}", w.name))?;
        ensure!(
            ip.starts_with("198.19.0.") && w.address == format!("{ip}:{PORT}"),
            "{} listed at {}, its pod IP is {ip}",
            w.name,
            w.address
        );
    }
    ensure!(st.workers[0].name == "imagenet-worker-0");
    for w in ["imagenet-worker-0", "imagenet-worker-1"] {
        let dir = disk.path().join(NS).join("imagenet").join(w);
        let meta = std::fs::metadata(&dir).with_context(|| format!("{}", dir.display()))?;
        ensure!(
            meta.uid() == 65532 && meta.gid() == 65532,
            "{} is owned by {}:{}, not the worker's user",
            dir.display(),
            meta.uid(),
            meta.gid()
        );
    }
    ensure!(st.claim_name.as_deref() == Some("imagenet"));
    ensure!(st.observed_generation == cn.metadata.generation);
    let ready = condition(&cn, "Ready").unwrap();
    ensure!(
        ready.status == "True" && ready.reason == "AllWorkersReady",
        "{ready:?}"
    );
    ensure!(condition(&cn, "Degraded").unwrap().status == "False");
    let mem = st
        .tiers
        .iter()
        .find(|t| t.kind == lakecache_api::TierKind::Memory)
        .unwrap();
    ensure!(mem.capacity_bytes == 2 * (8 << 20), "{:?}", st.tiers);
    // The source scan finds the dataset.
    let cn = wait("the source scanned", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        Ok(cn
            .status
            .as_ref()
            .unwrap()
            .source_files
            .is_some()
            .then_some(cn))
    })
    .await?;
    let st = cn.status.as_ref().unwrap();
    ensure!(
        st.source_files == Some(data.files.len() as i64),
        "{:?}",
        st.source_files
    );
    ensure!(
        st.source_bytes == Some(data.bytes("") as i64),
        "{:?}",
        st.source_bytes
    );
    let evs = events(&client, NS, "imagenet").await?;
    ensure!(
        evs.iter().any(|(t, r, _)| t == "Normal" && r == "Ready"),
        "{evs:?}"
    );
    let table = kubectl(&cluster, &["get", "cns", "-n", NS])?;
    ensure!(table.contains("Ready"), "{table}");

    // A preload warms the train folder on both workers; the cache and the hit ratio show it.
    let cpls: Api<CachePreload> = Api::namespaced(client.clone(), NS);
    cpls.create(
        &PostParams::default(),
        &object(json!({
            "apiVersion": "lakecache.io/v1alpha1", "kind": "CachePreload",
            "metadata": {"name": "warm-train", "namespace": NS},
            "spec": {"cacheNamespace": "imagenet", "paths": ["train/**"]},
        })),
    )
    .await?;
    let cp = wait("the preload Succeeded", || async {
        let cp = cpls.get("warm-train").await?;
        let ph = cp.status.as_ref().and_then(|s| s.phase);
        ensure!(
            ph != Some(CachePreloadPhase::Failed),
            "the preload failed: {:?}",
            cp.status
        );
        Ok((ph == Some(CachePreloadPhase::Succeeded)).then_some(cp))
    })
    .await?;
    let ps = cp.status.as_ref().unwrap();
    ensure!(
        ps.files_total == data.count("train/") as i64 && ps.files_done == ps.files_total,
        "{ps:?}"
    );
    ensure!(
        ps.bytes_total == data.bytes("train/") as i64 && ps.bytes_done == ps.bytes_total,
        "{ps:?}"
    );
    ensure!(
        ps.progress.as_deref() == Some("100%") && ps.workers.len() == 2,
        "{ps:?}"
    );
    ensure!(ps.start_time.is_some() && ps.completion_time.is_some());
    ensure!(kubectl(&cluster, &["get", "cpl", "-n", NS])?.contains("100%"));
    let evs = events(&client, NS, "warm-train").await?;
    ensure!(evs.iter().any(|(_, r, _)| r == "Succeeded"), "{evs:?}");
    let cn = wait("the cached share to rise", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        let st = cn.status.clone().unwrap_or_default();
        Ok((st.cached_bytes.unwrap_or(0) >= data.bytes("train/") as i64).then_some(cn))
    })
    .await?;
    let pct: f64 = cn
        .status
        .as_ref()
        .unwrap()
        .cached_percentage
        .as_deref()
        .unwrap_or("0%")
        .trim_end_matches('%')
        .parse()?;
    ensure!(
        pct > 80.0,
        "cached {pct}% after warming most of the dataset"
    );
    read_through_workers(&cn, &token, &data, "train/").await?;
    wait("the hit ratio to show the preload", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        Ok(cn.status.as_ref().unwrap().hit_ratio.filter(|h| *h >= 0.5))
    })
    .await?;

    // A worker crashes (SIGKILL through containerd, as an OOM kill would end it): kubelet
    // restarts its container in the same pod, at the same address, and it is Ready again.
    let (_, ip, id, restarts) = worker_pods(&client, NS, "imagenet")
        .await?
        .into_iter()
        .find(|(name, ..)| name == "imagenet-worker-1")
        .context("no imagenet-worker-1")?;
    cluster.node().kill_container(&id)?;
    wait("imagenet-worker-1 restarted and Ready", || async {
        let pods = worker_pods(&client, NS, "imagenet").await?;
        let Some((_, now_ip, _, now_restarts)) =
            pods.iter().find(|(name, ..)| name == "imagenet-worker-1")
        else {
            return Ok(None);
        };
        ensure!(*now_ip == ip, "the pod's IP changed: {ip} → {now_ip}");
        let cn = get_cn(&cns, "imagenet").await?;
        let st = cn.status.clone().unwrap_or_default();
        Ok((*now_restarts > restarts
            && phase(&cn) == Some(CacheNamespacePhase::Ready)
            && st.ready_workers == 2
            && st.workers.iter().any(|w| {
                w.name == "imagenet-worker-1" && w.ready && w.address == format!("{ip}:{PORT}")
            }))
        .then_some(()))
    })
    .await?;

    // kubectl scale changes the worker count through the scale subresource.
    kubectl(
        &cluster,
        &[
            "scale",
            "cachenamespace",
            "imagenet",
            "-n",
            NS,
            "--replicas=3",
        ],
    )?;
    wait("three ready workers", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        let st = cn.status.clone().unwrap_or_default();
        Ok((st.ready_workers == 3 && phase(&cn) == Some(CacheNamespacePhase::Ready)).then_some(()))
    })
    .await?;
    ensure!(sts_api.get("imagenet-worker").await?.spec.unwrap().replicas == Some(3));
    let scale = kubectl(
        &cluster,
        &[
            "get",
            "--raw",
            "/apis/lakecache.io/v1alpha1/namespaces/ml/cachenamespaces/imagenet/scale",
        ],
    )?;
    let scale: Value = serde_json::from_str(&scale)?;
    ensure!(
        scale["status"]["replicas"] == 3
            && scale["status"]["selector"]
                .as_str()
                .unwrap()
                .contains("lakecache.io/cache-namespace=imagenet"),
        "{scale}"
    );

    // A tier change rolls the workers with the new configuration.
    let hash = |s: &StatefulSet| {
        s.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["lakecache.io/config-hash"]
            .clone()
    };
    let before = hash(&sts_api.get("imagenet-worker").await?);
    cns.patch(
        "imagenet",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"tiers": [
            {"kind": "Memory", "size": "16Mi"},
            {"kind": "Disk", "size": "64Mi", "path": disk.path()},
        ]}})),
    )
    .await?;
    wait("the ConfigMap and pod template to change", || async {
        let cm: ConfigMap = Api::namespaced(client.clone(), NS)
            .get("imagenet-worker-config")
            .await?;
        let sts = sts_api.get("imagenet-worker").await?;
        Ok(
            (cm.data.unwrap()["worker.yaml"].contains(&(16u64 << 20).to_string())
                && hash(&sts) != before)
                .then_some(()),
        )
    })
    .await?;
    let cn = wait("the rollout to finish, Ready again", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        let sts = sts_api.get("imagenet-worker").await?;
        let s = sts.status.unwrap_or_default();
        let rolled = s.update_revision.is_some()
            && s.current_revision == s.update_revision
            && s.updated_replicas == Some(3);
        let mem = cn.status.as_ref().and_then(|st| {
            st.tiers
                .iter()
                .find(|t| t.kind == lakecache_api::TierKind::Memory)
                .cloned()
        });
        Ok((rolled
            && phase(&cn) == Some(CacheNamespacePhase::Ready)
            && cn.status.as_ref().unwrap().observed_generation == cn.metadata.generation
            && mem.is_some_and(|m| m.capacity_bytes == 3 * (16 << 20)))
        .then_some(cn))
    })
    .await?;
    ensure!(
        !condition(&cn, "Progressing")
            .map(|c| c.status == "True")
            .unwrap_or(true)
    );
    // Every pod was replaced by one of the new template (its containers really restarted).
    let after = hash(&sts_api.get("imagenet-worker").await?);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let listed = pods
        .list(&ListParams::default().labels("lakecache.io/cache-namespace=imagenet"))
        .await?;
    ensure!(listed.items.len() == 3, "{} pods", listed.items.len());
    for p in &listed.items {
        let h = p.annotations().get("lakecache.io/config-hash");
        ensure!(
            h == Some(&after),
            "{} runs configuration {h:?}, not {after}",
            p.name_any()
        );
    }

    // The user's Secret goes: Failed, with a condition and a Warning that name it. The workers
    // that run keep serving (they are still listed). It comes back: Ready again.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    secrets.delete("s3-creds", &DeleteParams::default()).await?;
    let cn = wait("Failed for the missing Secret", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        Ok((phase(&cn) == Some(CacheNamespacePhase::Failed)).then_some(cn))
    })
    .await?;
    let ready = condition(&cn, "Ready").unwrap();
    ensure!(
        ready.status == "False" && ready.reason == "SecretNotFound",
        "{ready:?}"
    );
    ensure!(
        ready.message.contains("Secret ml/s3-creds"),
        "{}",
        ready.message
    );
    ensure!(
        cn.status.as_ref().unwrap().workers.len() == 3,
        "the running workers stay listed"
    );
    let evs = events(&client, NS, "imagenet").await?;
    ensure!(
        evs.iter()
            .any(|(t, r, n)| t == "Warning" && r == "SecretNotFound" && n.contains("s3-creds")),
        "{evs:?}"
    );
    credentials(&client).await?;
    wait("Ready again with the Secret back", || async {
        let cn = get_cn(&cns, "imagenet").await?;
        Ok((phase(&cn) == Some(CacheNamespacePhase::Ready)).then_some(()))
    })
    .await?;

    // The operator's own endpoints.
    let m = operator.get("/metrics").await;
    ensure!(
        metric(
            &m,
            "lakecache_operator_reconciles_total{controller=\"cachenamespace\",result=\"ok\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{m}"
    );
    ensure!(metric(&m, "lakecache_operator_object_problems_total{controller=\"cachenamespace\",reason=\"SecretNotFound\"}").unwrap_or(0.0) >= 1.0, "{m}");
    ensure!(
        metric(
            &m,
            "lakecache_operator_reconcile_duration_seconds_count{controller=\"cachepreload\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    ensure!(operator.get("/readyz").await.split_whitespace().nth(1) == Some("200"));

    // Deleting the CacheNamespace removes everything it made, the PV included.
    cns.delete("imagenet", &DeleteParams::default()).await?;
    wait("every child gone", || async {
        let left = [
            sts_api.get_opt("imagenet-worker").await?.is_some(),
            Api::<Service>::namespaced(client.clone(), NS)
                .get_opt("imagenet-workers")
                .await?
                .is_some(),
            Api::<ConfigMap>::namespaced(client.clone(), NS)
                .get_opt("imagenet-worker-config")
                .await?
                .is_some(),
            secrets.get_opt("imagenet-token").await?.is_some(),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
                .get_opt("imagenet-workers")
                .await?
                .is_some(),
            pvcs.get_opt("imagenet").await?.is_some(),
            pvs.get_opt("lakecache-ml.imagenet").await?.is_some(),
            cns.get_opt("imagenet").await?.is_some(),
        ];
        Ok((!left.iter().any(|l| *l)).then_some(()))
    })
    .await?;
    // And the Disk tier's directory on the node: removed by a pod in the operator's namespace,
    // which is gone too.
    let node_dir = disk.path().join(NS).join("imagenet");
    ensure!(
        !node_dir.exists(),
        "{} is left on the node",
        node_dir.display()
    );
    let cleaners = Api::<Pod>::namespaced(client.clone(), "lakecache-system")
        .list(&ListParams::default().labels("app.kubernetes.io/component=disk-cleanup"))
        .await?;
    ensure!(
        cleaners.items.is_empty(),
        "cleanup pods are left: {:?}",
        cleaners
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    );
    diagnostics.passed();
    drop(operator);
    drop(cluster);
    // What the workers kept on the node's Disk tier goes with the test's directory.
    let path = disk.path().to_path_buf();
    disk.close()
        .with_context(|| format!("removing {}", path.display()))?;
    ensure!(!path.exists(), "{} is left behind", path.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_objects_get_conditions_and_events_and_never_stop_the_operator() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    install_crds(&cluster)?;
    let client = cluster.client().await?;
    create_namespace(&client, NS).await?;
    let mut operator = Operator::start(
        cluster.kubeconfig_path(),
        cluster.dir(),
        &["--no-leader-election"],
    )?;
    let base = json!({
        "apiVersion": "lakecache.io/v1alpha1", "kind": "CacheNamespace",
        "metadata": {"namespace": NS},
        "spec": {"source": {"uri": "s3://datasets/x"}, "tiers": [{"kind": "Memory", "size": "1Gi"}]},
    });
    let with = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut o = base.clone();
        o["metadata"]["name"] = json!(name);
        f(&mut o);
        o
    };
    let cns: Api<CacheNamespace> = Api::namespaced(client.clone(), NS);
    // Past the schema, but not usable: a tier smaller than one block.
    cns.create(
        &PostParams::default(),
        &object(with("tiny", &|o| {
            o["spec"]["tiers"] = json!([{"kind": "Memory", "size": "1Mi"}]);
        })),
    )
    .await?;
    cns.create(
        &PostParams::default(),
        &object(with("nosecret", &|o| {
            o["spec"]["source"]["credentialsSecretRef"] = json!({"name": "missing"});
        })),
    )
    .await?;
    cns.create(&PostParams::default(), &object(with("good", &|_| {})))
        .await?;
    let cpls: Api<CachePreload> = Api::namespaced(client.clone(), NS);
    let preload = |name: &str, cn: &str, schedule: Option<&str>| {
        let mut o = json!({
            "apiVersion": "lakecache.io/v1alpha1", "kind": "CachePreload",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"cacheNamespace": cn, "paths": ["**"]},
        });
        if let Some(s) = schedule {
            o["spec"]["schedule"] = json!(s);
        }
        object::<CachePreload>(o)
    };
    cpls.create(
        &PostParams::default(),
        &preload("badcron", "good", Some("61 3 * * *")),
    )
    .await?;
    cpls.create(&PostParams::default(), &preload("orphan", "nope", None))
        .await?;

    for (name, reason, needle) in [
        ("tiny", "InvalidSpec", "spec.tiers[0].size"),
        ("nosecret", "SecretNotFound", "Secret ml/missing"),
    ] {
        let cn = wait(&format!("{name} Failed"), || async {
            let cn = get_cn(&cns, name).await?;
            Ok((phase(&cn) == Some(CacheNamespacePhase::Failed)).then_some(cn))
        })
        .await?;
        let c = condition(&cn, "Ready").unwrap();
        ensure!(
            c.reason == reason && c.message.contains(needle),
            "{name}: {c:?}"
        );
        let evs = events(&client, NS, name).await?;
        ensure!(
            evs.iter().any(|(t, r, _)| t == "Warning" && r == reason),
            "{name}: {evs:?}"
        );
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
        ensure!(
            sts.get_opt(&format!("{name}-worker")).await?.is_none(),
            "{name}: built despite the problem"
        );
    }
    // The good one next to them is reconciled as usual.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    wait("the good CacheNamespace's StatefulSet", || async {
        Ok(sts.get_opt("good-worker").await?)
    })
    .await?;
    let cn = wait("the good CacheNamespace Pending", || async {
        let cn = get_cn(&cns, "good").await?;
        Ok((phase(&cn) == Some(CacheNamespacePhase::Pending)).then_some(cn))
    })
    .await?;
    ensure!(condition(&cn, "Progressing").unwrap().status == "True");

    let cp = wait("badcron Failed", || async {
        let cp = cpls.get("badcron").await?;
        Ok(
            (cp.status.as_ref().and_then(|s| s.phase) == Some(CachePreloadPhase::Failed))
                .then_some(cp),
        )
    })
    .await?;
    let c = &cp.status.as_ref().unwrap().conditions[0];
    ensure!(
        c.reason == "InvalidSchedule" && c.message.contains("61 3 * * *"),
        "{c:?}"
    );
    let cp = wait("orphan Pending", || async {
        let cp = cpls.get("orphan").await?;
        Ok(
            (cp.status.as_ref().and_then(|s| s.phase) == Some(CachePreloadPhase::Pending))
                .then_some(cp),
        )
    })
    .await?;
    let c = &cp.status.as_ref().unwrap().conditions[0];
    ensure!(
        c.reason == "CacheNamespaceNotFound" && c.message.contains("ml/nope"),
        "{c:?}"
    );
    // A preload of the good (workerless) CacheNamespace waits for ready workers.
    cpls.create(&PostParams::default(), &preload("waits", "good", None))
        .await?;
    wait("waits Pending for workers", || async {
        let cp = cpls.get("waits").await?;
        Ok(cp
            .status
            .as_ref()
            .and_then(|s| s.conditions.first())
            .filter(|c| c.reason == "NoReadyWorkers")
            .map(|_| ()))
    })
    .await?;
    ensure!(operator.alive(), "the operator exited");
    wait("the operator ready", || async {
        Ok((operator.get("/readyz").await.split_whitespace().nth(1) == Some("200")).then_some(()))
    })
    .await?;
    let m = operator.get("/metrics").await;
    ensure!(metric(&m, "lakecache_operator_object_problems_total{controller=\"cachenamespace\",reason=\"InvalidSpec\"}").unwrap_or(0.0) >= 1.0, "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_running_preload_cancels_it_on_the_workers() -> anyhow::Result<()> {
    let _serial = serial().await;
    let disk = tempfile::Builder::new()
        .prefix("lakecache-disk-")
        .tempdir_in("/tmp")?;
    let cluster = Cluster::start(ClusterOptions::with_node()).await?;
    let data = Dataset::create("datasets", cluster.host_ip()).await?;
    // The workers reach the lake through a proxy the test can black-hole: the CacheNamespace's
    // endpoint, on the host's address like the S3 server behind it.
    let proxy =
        lakecache_e2e::Proxy::start_on(cluster.host_ip(), (cluster.host_ip(), data.s3.port))
            .await?;
    install_crds(&cluster)?;
    let client = cluster.client().await?;
    create_namespace(&client, NS).await?;
    credentials(&client).await?;
    let operator = Operator::start(
        cluster.kubeconfig_path(),
        cluster.dir(),
        &[
            "--no-leader-election",
            "--allowed-host-path-roots",
            disk.path().to_str().unwrap(),
        ],
    )?;
    let diagnostics = Diagnostics::new(&cluster, NS, &operator);
    let cns: Api<CacheNamespace> = Api::namespaced(client.clone(), NS);
    cns.create(
        &PostParams::default(),
        &object(cache_namespace(
            "slow",
            &data,
            &proxy.endpoint(),
            2,
            disk.path(),
        )),
    )
    .await?;
    let cn = wait("slow Ready", || async {
        let cn = get_cn(&cns, "slow").await?;
        Ok((phase(&cn) == Some(CacheNamespacePhase::Ready)).then_some(cn))
    })
    .await?;
    proxy.set_blackhole(true);
    let cpls: Api<CachePreload> = Api::namespaced(client.clone(), NS);
    cpls.create(
        &PostParams::default(),
        &object(json!({
            "apiVersion": "lakecache.io/v1alpha1", "kind": "CachePreload",
            "metadata": {"name": "stuck", "namespace": NS},
            "spec": {"cacheNamespace": "slow", "paths": ["**"]},
        })),
    )
    .await?;
    let cp = wait("stuck Running", || async {
        let cp = cpls.get("stuck").await?;
        Ok(
            (cp.status.as_ref().and_then(|s| s.phase) == Some(CachePreloadPhase::Running))
                .then_some(cp),
        )
    })
    .await?;
    let id = format!("{NS}/stuck/{}/1", cp.uid().unwrap());
    cpls.delete("stuck", &DeleteParams::default()).await?;
    wait("stuck gone", || async {
        Ok(cpls.get_opt("stuck").await?.is_none().then_some(()))
    })
    .await?;
    // Every worker says the run was cancelled.
    let tok: Secret = Api::namespaced(client.clone(), NS)
        .get("slow-token")
        .await?;
    let token = String::from_utf8(tok.data.unwrap()["token"].0.clone())?;
    for w in &cn.status.as_ref().unwrap().workers {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", w.address))?
            .connect()
            .await?;
        let auth = lakecache_client::membership::Auth::bearer(&token)?;
        let mut c = lakecache_proto::lakecache::v1::cache_worker_client::CacheWorkerClient::with_interceptor(ch, auth);
        let s = c
            .start_preload(lakecache_proto::lakecache::v1::StartPreloadRequest {
                id: id.clone(),
                paths: vec!["**".into()],
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            s.phase == lakecache_proto::lakecache::v1::PreloadPhase::Cancelled as i32,
            "{}: {s:?}",
            w.name
        );
    }
    let evs = events(&client, NS, "stuck").await?;
    ensure!(evs.iter().any(|(_, r, _)| r == "Cancelled"), "{evs:?}");
    proxy.set_blackhole(false);
    diagnostics.passed();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_elect_one_leader_and_the_other_takes_over() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start(ClusterOptions::apiserver_only()).await?;
    install_crds(&cluster)?;
    let client = cluster.client().await?;
    create_namespace(&client, NS).await?;
    let lease_ns = ["--lease-namespace", "default"];
    let a = Operator::start(
        cluster.kubeconfig_path(),
        cluster.dir(),
        &[&lease_ns[..], &["--identity", "op-a"]].concat(),
    )?;
    let b = Operator::start(
        cluster.kubeconfig_path(),
        cluster.dir(),
        &[&lease_ns[..], &["--identity", "op-b"]].concat(),
    )?;
    let mut ops = [Some(a), Some(b)];
    let leader = wait("one leader", || async {
        let mut leaders = vec![];
        for (i, o) in ops.iter().enumerate() {
            let o = o.as_ref().unwrap();
            if metric(&o.get("/metrics").await, "lakecache_operator_leader") == Some(1.0) {
                leaders.push(i);
            }
        }
        ensure!(leaders.len() <= 1, "two leaders at once");
        Ok((leaders.len() == 1).then(|| leaders[0]))
    })
    .await?;
    // Both answer their probes: the follower at once, the leader once its watches synced (it
    // shows itself leader before that).
    for o in ops.iter().flatten() {
        wait("a ready replica", || async {
            let r = o.get("/readyz").await;
            Ok((r.split_whitespace().nth(1) == Some("200")).then_some(()))
        })
        .await?;
    }
    let cns: Api<CacheNamespace> = Api::namespaced(client.clone(), NS);
    let cn = |name: &str| {
        object::<CacheNamespace>(json!({
            "apiVersion": "lakecache.io/v1alpha1", "kind": "CacheNamespace",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"source": {"uri": "s3://datasets/x"}, "tiers": [{"kind": "Memory", "size": "1Gi"}]},
        }))
    };
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    cns.create(&PostParams::default(), &cn("one")).await?;
    wait("one's StatefulSet", || async {
        Ok(sts.get_opt("one-worker").await?)
    })
    .await?;
    // The leader dies without releasing its lease; the other takes over once it expires.
    let mut dead = ops[leader].take().unwrap();
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    let other = ops[1 - leader].as_ref().unwrap();
    let start = std::time::Instant::now();
    wait("the other replica leads", || async {
        Ok(
            (metric(&other.get("/metrics").await, "lakecache_operator_leader") == Some(1.0))
                .then_some(()),
        )
    })
    .await?;
    eprintln!("failover took {:.1} s", start.elapsed().as_secs_f64());
    cns.create(&PostParams::default(), &cn("two")).await?;
    wait("two's StatefulSet, made by the new leader", || async {
        Ok(sts.get_opt("two-worker").await?)
    })
    .await?;
    Ok(())
}
