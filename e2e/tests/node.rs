//! The real node itself (`lakecache_e2e::node`): kubelet, containerd, runc, the bridge CNI and
//! kube-proxy running pods of our own image, and nothing left on the host when it stops.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use lakecache_e2e::cluster::eventually;
use lakecache_e2e::{Cluster, ClusterOptions, mountinfo, node};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

fn image() -> String {
    let chart = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/lakecache/Chart.yaml"),
    )
    .unwrap();
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string();
    format!("{}:{version}", node::IMAGE_REPOSITORY)
}

fn running(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Running")
}

/// What a node leaves on the host, to compare before and after.
fn host_state() -> (BTreeSet<String>, usize, BTreeSet<String>) {
    let netns: BTreeSet<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mounts = mountinfo::read_self().unwrap().len();
    let paths = node::HOST_PATHS
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| p.to_string())
        .collect();
    (netns, mounts, paths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_node_runs_our_image_serves_logs_and_exec_and_leaves_nothing_behind()
-> anyhow::Result<()> {
    lakecache_e2e::init_logging();
    let before = host_state();
    let sysctl = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")?;
    {
        let cluster = Cluster::start(ClusterOptions::with_node()).await?;
        let n = cluster.node();
        eprintln!(
            "control plane and a Ready node in {:.1} s (node: {:.1} s)",
            cluster.started_in().as_secs_f64(),
            n.started_in().as_secs_f64()
        );
        let client = cluster.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let node_obj = nodes.get(n.name()).await?;
        let addresses = node_obj.status.unwrap().addresses.unwrap_or_default();
        assert!(
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == node::NODE_IP),
            "{addresses:?}"
        );

        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "t"}}))?,
            )
            .await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "t");
        eventually("the default ServiceAccount", WAIT, || async {
            Ok(accounts.get_opt("default").await?)
        })
        .await?;

        // A pod of our image, as its default user: it prints, reaches the API server through
        // the `kubernetes` Service (kube-proxy) with its projected token, and stays up.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "t");
        let script = r#"
            id -u
            lakecache-worker --version
            grep -c '^user_allow_other' /etc/fuse.conf
            code=$(exec 3<>/dev/tcp/$KUBERNETES_SERVICE_HOST/$KUBERNETES_SERVICE_PORT && echo reachable)
            echo "api: $code"
            exec sleep 3600
        "#;
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "probe"},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "main",
                        "image": image(),
                        "imagePullPolicy": "Never",
                        "command": ["bash", "-c", script],
                    }],
                },
            }))?,
        )
        .await?;
        let pod = eventually("the pod running", WAIT, || async {
            Ok(pods.get_opt("probe").await?.filter(running))
        })
        .await?;
        let ip = pod.status.unwrap().pod_ip.unwrap();
        assert!(ip.starts_with("198.19.0."), "pod IP {ip}");
        let logs = eventually("the pod's logs", WAIT, || async {
            let out = cluster.kubectl(&["-n", "t", "logs", "probe"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(text.contains("api:").then_some(text))
        })
        .await?;
        let lines: Vec<&str> = logs.lines().collect();
        assert_eq!(lines[0], "65532", "the image's user: {logs}");
        assert!(lines[1].starts_with("lakecache-worker "), "{logs}");
        assert_eq!(lines[2], "1", "{logs}");
        assert_eq!(lines[3], "api: reachable", "{logs}");
        let exec = cluster.kubectl_ok(
            &["-n", "t", "exec", "probe", "--", "cat", "/etc/hostname"],
            None,
        )?;
        assert_eq!(exec.trim(), "probe");

        // Killed, the container is restarted by kubelet.
        let id = pod_container_id(&pods, "probe").await?;
        n.kill_container(&id)?;
        eventually("the container restarted", WAIT, || async {
            let p = pods.get("probe").await?;
            let restarts = p
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.first().map(|c| c.restart_count))
                .unwrap_or(0);
            Ok((restarts >= 1 && running(&pods.get("probe").await?)).then_some(()))
        })
        .await?;
        pods.delete("probe", &DeleteParams::default()).await?;
        eventually("the pod gone", WAIT, || async {
            Ok(pods.get_opt("probe").await?.is_none().then_some(()))
        })
        .await?;
    }
    let after = host_state();
    assert_eq!(before.0, after.0, "network namespaces left behind");
    assert_eq!(before.1, after.1, "mounts left behind");
    assert_eq!(before.2, after.2, "host paths left behind");
    assert_eq!(
        sysctl,
        std::fs::read_to_string("/proc/sys/vm/overcommit_memory")?,
        "a sysctl was not restored"
    );
    let leftovers: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/memory")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lakecache-node-"))
        .collect();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
    Ok(())
}

async fn pod_container_id(pods: &Api<Pod>, name: &str) -> anyhow::Result<String> {
    let p = pods.get(name).await?;
    Ok(p.status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.first().and_then(|c| c.container_id.clone()))
        .unwrap_or_default())
}
