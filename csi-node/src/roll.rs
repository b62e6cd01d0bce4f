//! `lakecache-csi-node roll`: upgrades the node DaemonSet's pods in place, one container at a
//! time, after `helm upgrade` changed the DaemonSet's template.
//!
//! The obvious way, the DaemonSet's own `RollingUpdate`, deletes each pod and creates a new one.
//! That takes down every mount on the node: a FUSE connection lives exactly as long as some
//! process holds its `/dev/fuse` fd, and all those processes belong to the pod's containers.
//! What does survive is a restart of *one* container: the plugin and the mounter each keep the
//! other's FUSE fds, and whichever of the two is running hosts the FUSE servers while the other
//! is away. So the chart sets `updateStrategy: OnDelete` (the DaemonSet controller then only
//! changes its template) and runs this as a post-upgrade hook, which brings each pod to the
//! template's images by patching `spec.containers[i].image` on the running pod: kubelet restarts
//! just that container, on the new image.
//!
//! Pods go one at a time, in the order of their node names, and within a pod:
//! 1. `mounter` first, while the old plugin, which has been running all along, keeps the mounts;
//! 2. `csi-plugin` next, once the new mounter is back and ready to keep them in turn;
//! 3. anything else last (the registrar), which holds no mount.
//!
//! Before each restart the container that keeps the mounts meanwhile must be running, and after
//! each patch the roll waits (up to `--container-timeout`) until the container runs again under
//! a new container ID and is ready. If it does not come back, the roll stops there: restarting
//! the next container while this one is down would take the node's mounts with it. Run it again
//! once the cause is fixed; pods already on the new images are left alone.
//!
//! Only images can change on a running pod. Other differences between the template and a pod
//! (command, args, env) are listed, and wait for the pod's next restart (when it is deleted, the
//! DaemonSet creates the replacement from the new template). The planning — which containers to
//! patch, in which order, and what else differs — is [`plan`], which does no I/O; the driver
//! talks to the API server through the `Cluster` trait, so its failure paths (a container that
//! crash-loops, an API server that never answers) are tested without one.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ContainerStatus, EnvVar, Pod};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};

/// The container that hosts the FUSE servers (the chart's name for it).
pub const MOUNTER: &str = "mounter";
/// The container that serves CSI, and keeps the FUSE servers while the mounter is away.
pub const PLUGIN: &str = "csi-plugin";

/// How long one API call may take before the roll gives up on it.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a restarting container's status is read.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The `roll` subcommand's arguments.
#[derive(Debug, clap::Args)]
pub struct RollArgs {
    /// The namespace of the DaemonSet (the chart's release namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The name of the CSI node DaemonSet.
    #[arg(long, env = "LAKECACHE_ROLL_DAEMONSET")]
    pub daemonset: String,
    /// How long one container may take to come back ready on its new image; past it the roll
    /// stops, with nothing else restarted.
    #[arg(long, env = "LAKECACHE_ROLL_CONTAINER_TIMEOUT", default_value = "5m")]
    pub container_timeout: humantime::Duration,
}

/// What the driver needs besides the cluster.
#[derive(Debug, Clone)]
pub struct RollConfig {
    pub namespace: String,
    pub daemonset: String,
    pub container_timeout: Duration,
    pub poll_interval: Duration,
    pub api_timeout: Duration,
}

impl From<RollArgs> for RollConfig {
    fn from(a: RollArgs) -> Self {
        RollConfig {
            namespace: a.namespace,
            daemonset: a.daemonset,
            container_timeout: *a.container_timeout,
            poll_interval: POLL_INTERVAL,
            api_timeout: API_TIMEOUT,
        }
    }
}

/// One container to move to the template's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its index in the pod's `spec.containers` (the patch's path).
    pub index: usize,
    pub name: String,
    pub image: String,
}

/// What rolling one pod means.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The containers to patch, in the order to restart them.
    pub steps: Vec<Step>,
    /// Differences other than images, which wait for the pod's next restart
    /// (`csi-plugin env LAKECACHE_FS_TIMEOUT RUST_LOG`, `new container x`).
    pub later: Vec<String>,
}

/// Where a container goes in the restart order (see the module doc).
fn rank(name: &str) -> u8 {
    match name {
        MOUNTER => 0,
        PLUGIN => 1,
        _ => 2,
    }
}

/// The container that keeps the node's mounts while `name` restarts, if it is one of the two.
fn keeper(name: &str) -> Option<&'static str> {
    match name {
        MOUNTER => Some(PLUGIN),
        PLUGIN => Some(MOUNTER),
        _ => None,
    }
}

/// Plans one pod: which of its containers to patch to the template's image, in restart order,
/// and what else differs from the template. Containers are matched by name; the index is the
/// pod's own.
pub fn plan(template: &[Container], pod: &[Container]) -> Plan {
    let mut steps = Vec::new();
    let mut later = Vec::new();
    for (index, c) in pod.iter().enumerate() {
        let Some(t) = template.iter().find(|t| t.name == c.name) else {
            later.push(format!("container {} removed", c.name));
            continue;
        };
        if let Some(image) = &t.image
            && t.image != c.image
        {
            steps.push(Step {
                index,
                name: c.name.clone(),
                image: image.clone(),
            });
        }
        let mut fields = Vec::new();
        if t.command != c.command {
            fields.push("command".to_string());
        }
        if t.args != c.args {
            fields.push("args".to_string());
        }
        let env = env_diff(t.env.as_deref(), c.env.as_deref());
        if !env.is_empty() {
            fields.push(format!(
                "env {}",
                env.into_iter().collect::<Vec<_>>().join(" ")
            ));
        }
        if t.env_from != c.env_from {
            fields.push("envFrom".to_string());
        }
        if !fields.is_empty() {
            later.push(format!("{} {}", c.name, fields.join(", ")));
        }
    }
    for t in template {
        if !pod.iter().any(|c| c.name == t.name) {
            later.push(format!("new container {}", t.name));
        }
    }
    // Stable: containers of the same rank keep the pod's order.
    steps.sort_by_key(|s| rank(&s.name));
    Plan { steps, later }
}

/// Names of the variables that are set differently (or only on one side).
fn env_diff<'a>(template: Option<&'a [EnvVar]>, pod: Option<&'a [EnvVar]>) -> BTreeSet<&'a str> {
    let (t, p) = (template.unwrap_or_default(), pod.unwrap_or_default());
    let find = |list: &'a [EnvVar], name: &str| list.iter().find(|e| e.name == name);
    t.iter()
        .chain(p)
        .map(|e| e.name.as_str())
        .filter(|name| find(t, name) != find(p, name))
        .collect()
}

/// Whether a container restarted after the patch: a new container ID, running and ready
/// (kubelet sets `ready` once a container without a readiness probe runs).
fn is_back(status: Option<&ContainerStatus>, before: Option<&str>) -> bool {
    status.is_some_and(|s| {
        s.container_id.is_some()
            && s.container_id.as_deref() != before
            && s.ready
            && s.state.as_ref().is_some_and(|st| st.running.is_some())
    })
}

fn is_running(status: Option<&ContainerStatus>) -> bool {
    status.is_some_and(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
}

/// A container's state in a few words, for the errors that stop the roll.
fn describe(status: Option<&ContainerStatus>) -> String {
    let Some(s) = status else {
        return "no status reported for it".to_string();
    };
    let state = s.state.as_ref();
    let mut out = if let Some(w) = state.and_then(|st| st.waiting.as_ref()) {
        let mut d = format!("waiting ({})", w.reason.as_deref().unwrap_or("no reason"));
        if let Some(m) = w.message.as_deref().filter(|m| !m.is_empty()) {
            d.push_str(&format!(": {m}"));
        }
        d
    } else if let Some(t) = state.and_then(|st| st.terminated.as_ref()) {
        format!(
            "terminated ({}, exit code {})",
            t.reason.as_deref().unwrap_or("no reason"),
            t.exit_code
        )
    } else if state.and_then(|st| st.running.as_ref()).is_some() {
        if s.ready {
            "running, ready".to_string()
        } else {
            "running, not ready".to_string()
        }
    } else {
        "in no known state".to_string()
    };
    if let Some(t) = s.last_state.as_ref().and_then(|l| l.terminated.as_ref()) {
        out.push_str(&format!(
            "; last termination: {}, exit code {}",
            t.reason.as_deref().unwrap_or("no reason"),
            t.exit_code
        ));
    }
    out.push_str(&format!(
        "; {} restarts; image {}",
        s.restart_count, s.image
    ));
    out
}

fn status<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)
}

fn containers(pod: &Pod) -> &[Container] {
    pod.spec.as_ref().map_or(&[], |s| s.containers.as_slice())
}

fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

fn node(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("no node")
}

#[derive(Debug, thiserror::Error)]
pub enum RollError {
    #[error(
        "no access to the Kubernetes API (neither an in-cluster service account nor KUBECONFIG)"
    )]
    Client(#[source] kube::Error),
    #[error(
        "cannot read DaemonSet {daemonset}: check --namespace and --daemonset, and that this \
         account may get it"
    )]
    DaemonSet {
        daemonset: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "DaemonSet {daemonset} replaces its pods itself (updateStrategy {strategy}), which takes \
         their mounts down; the roll is for updateStrategy OnDelete (the chart's \
         csi.updateStrategy.type)"
    )]
    NotOnDelete { daemonset: String, strategy: String },
    #[error("cannot list the pods of DaemonSet {daemonset} (selector {selector:?})")]
    ListPods {
        daemonset: String,
        selector: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "pod {pod} changed since it was read (its container {index} is no longer {container}); \
         run the roll again"
    )]
    Changed {
        pod: String,
        index: usize,
        container: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot set the image of {container} in pod {pod}")]
    Patch {
        pod: String,
        container: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "not restarting {container} of pod {pod} (node {node}): {keeper}, which keeps the node's \
         mounts while {container} is away, is not running ({state}); get {keeper} running, then \
         run the roll again"
    )]
    KeeperDown {
        pod: String,
        node: String,
        container: String,
        keeper: &'static str,
        state: String,
    },
    #[error(
        "{container} of pod {pod} (node {node}) was not back on {image} within {}: {state}. The \
         roll stopped here and restarts nothing else; see `kubectl describe pod` and `kubectl \
         logs --previous -c {container}` for that pod, fix the cause, and run the roll again",
        humantime::format_duration(*.timeout)
    )]
    NotBack {
        pod: String,
        node: String,
        container: String,
        image: String,
        timeout: Duration,
        state: String,
    },
    #[error(
        "pod {pod} went away while its {container} restarted; its replacement starts from the \
         DaemonSet's template, run the roll again for the other pods"
    )]
    Gone { pod: String, container: String },
    #[error("{what}: the API server did not answer within {}", humantime::format_duration(*.after))]
    Unanswered { what: String, after: Duration },
    #[error(
        "after the roll, pods of DaemonSet {daemonset} still run images other than its template's: \
         {}; they changed while it ran, run it again",
        .pods.join(", ")
    )]
    Left {
        daemonset: String,
        pods: Vec<String>,
    },
}

/// The calls the roll makes, so that tests can answer them (and fail or hang them).
trait Cluster {
    async fn daemonset(&self) -> Result<DaemonSet, kube::Error>;
    /// Pods matching a label selector.
    async fn pods(&self, selector: &str) -> Result<Vec<Pod>, kube::Error>;
    async fn pod(&self, name: &str) -> Result<Pod, kube::Error>;
    /// Sets the image of container `index`, provided it is still named `container`.
    async fn set_image(
        &self,
        pod: &str,
        index: usize,
        container: &str,
        image: &str,
    ) -> Result<Pod, kube::Error>;
}

struct Kube {
    daemonsets: Api<DaemonSet>,
    pods: Api<Pod>,
    daemonset: String,
}

impl Cluster for Kube {
    async fn daemonset(&self) -> Result<DaemonSet, kube::Error> {
        self.daemonsets.get(&self.daemonset).await
    }

    async fn pods(&self, selector: &str) -> Result<Vec<Pod>, kube::Error> {
        Ok(self
            .pods
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }

    async fn pod(&self, name: &str) -> Result<Pod, kube::Error> {
        self.pods.get(name).await
    }

    async fn set_image(
        &self,
        pod: &str,
        index: usize,
        container: &str,
        image: &str,
    ) -> Result<Pod, kube::Error> {
        // The test makes the API server refuse the patch when the pod's containers moved since
        // the pod was read, rather than give another container this one's image.
        let ops = serde_json::json!([
            {"op": "test", "path": format!("/spec/containers/{index}/name"), "value": container},
            {"op": "replace", "path": format!("/spec/containers/{index}/image"), "value": image},
        ]);
        let patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
        let pp = PatchParams {
            field_manager: Some("lakecache-csi-roll".to_string()),
            ..PatchParams::default()
        };
        self.pods.patch(pod, &pp, &Patch::Json::<()>(patch)).await
    }
}

/// Rolls the DaemonSet named in `args`, printing one line per container restarted.
pub async fn run(args: RollArgs) -> Result<(), RollError> {
    let cfg = RollConfig::from(args);
    let client = Client::try_default().await.map_err(RollError::Client)?;
    let cluster = Kube {
        daemonsets: Api::namespaced(client.clone(), &cfg.namespace),
        pods: Api::namespaced(client, &cfg.namespace),
        daemonset: cfg.daemonset.clone(),
    };
    roll(&cluster, &cfg, &mut |line: String| println!("{line}")).await
}

/// `call`, or [`RollError::Unanswered`] after `after`.
async fn bounded<T>(
    what: impl FnOnce() -> String,
    after: Duration,
    call: impl Future<Output = T>,
) -> Result<T, RollError> {
    tokio::time::timeout(after, call)
        .await
        .map_err(|_| RollError::Unanswered {
            what: what(),
            after,
        })
}

async fn roll(
    cluster: &impl Cluster,
    cfg: &RollConfig,
    say: &mut impl FnMut(String),
) -> Result<(), RollError> {
    let ds_name = format!("{}/{}", cfg.namespace, cfg.daemonset);
    let ds = bounded(
        || format!("reading DaemonSet {ds_name}"),
        cfg.api_timeout,
        cluster.daemonset(),
    )
    .await?
    .map_err(|source| RollError::DaemonSet {
        daemonset: ds_name.clone(),
        source,
    })?;
    let spec = ds.spec.clone().unwrap_or_default();
    let strategy = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.clone())
        .unwrap_or_else(|| "RollingUpdate".to_string());
    if strategy != "OnDelete" {
        return Err(RollError::NotOnDelete {
            daemonset: ds_name,
            strategy,
        });
    }
    let template = spec.template.spec.map(|s| s.containers).unwrap_or_default();
    let owned = Owned::new(&ds, &ds_name);

    let pods = owned.list(cluster, cfg).await?;
    if pods.is_empty() {
        say(format!("DaemonSet {ds_name} has no pods: nothing to roll"));
        return Ok(());
    }
    for pod in &pods {
        roll_pod(cluster, cfg, &template, pod, say).await?;
    }

    // A pod the roll did not reach (created meanwhile, or patched by someone else) is reported
    // rather than left behind in silence.
    let left: Vec<String> = owned
        .list(cluster, cfg)
        .await?
        .iter()
        .filter(|p| !plan(&template, containers(p)).steps.is_empty())
        .map(|p| name(p).to_string())
        .collect();
    if !left.is_empty() {
        return Err(RollError::Left {
            daemonset: ds_name,
            pods: left,
        });
    }
    say(format!(
        "all {} pods of DaemonSet {ds_name} run its template's images",
        pods.len()
    ));
    Ok(())
}

/// The DaemonSet's own pods: matching its selector and owned by it.
struct Owned {
    selector: String,
    uid: Option<String>,
    daemonset: String,
}

impl Owned {
    fn new(ds: &DaemonSet, ds_name: &str) -> Self {
        // matchExpressions are not turned into a selector: the owner check below is what decides,
        // the labels only narrow the list.
        let selector = ds
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        Owned {
            selector,
            uid: ds.metadata.uid.clone(),
            daemonset: ds_name.to_string(),
        }
    }

    /// Sorted by node, skipping pods being deleted (their replacements start from the template).
    async fn list(&self, cluster: &impl Cluster, cfg: &RollConfig) -> Result<Vec<Pod>, RollError> {
        let pods = bounded(
            || format!("listing the pods of DaemonSet {}", self.daemonset),
            cfg.api_timeout,
            cluster.pods(&self.selector),
        )
        .await?
        .map_err(|source| RollError::ListPods {
            daemonset: self.daemonset.clone(),
            selector: self.selector.clone(),
            source,
        })?;
        let mut pods: Vec<Pod> = pods
            .into_iter()
            .filter(|p| {
                p.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| Some(&o.uid) == self.uid.as_ref())
            })
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        pods.sort_by(|a, b| (node(a), name(a)).cmp(&(node(b), name(b))));
        Ok(pods)
    }
}

async fn roll_pod(
    cluster: &impl Cluster,
    cfg: &RollConfig,
    template: &[Container],
    pod: &Pod,
    say: &mut impl FnMut(String),
) -> Result<(), RollError> {
    let pod_name = format!("{}/{}", cfg.namespace, name(pod));
    let node = node(pod).to_string();
    let plan = plan(template, containers(pod));
    if !plan.later.is_empty() {
        let what = if plan.steps.is_empty() {
            "images up to date"
        } else {
            "rolling images only"
        };
        say(format!(
            "{pod_name} (node {node}): {what}; waiting for the pod's next restart: {}",
            plan.later.join("; ")
        ));
    }
    // The latest state of the pod: each step starts from what the previous one saw.
    let mut current = pod.clone();
    for step in &plan.steps {
        if let Some(keeper) = keeper(&step.name)
            && containers(&current).iter().any(|c| c.name == keeper)
            && !is_running(status(&current, keeper))
        {
            return Err(RollError::KeeperDown {
                pod: pod_name,
                node,
                container: step.name.clone(),
                keeper,
                state: describe(status(&current, keeper)),
            });
        }
        let started = Instant::now();
        let patched = bounded(
            || format!("setting the image of {} in pod {pod_name}", step.name),
            cfg.api_timeout,
            cluster.set_image(name(pod), step.index, &step.name, &step.image),
        )
        .await?
        .map_err(|source| match &source {
            kube::Error::Api(s) if s.code == 404 => RollError::Gone {
                pod: pod_name.clone(),
                container: step.name.clone(),
            },
            // The API server answers a failed test op with a bare 422 ("the server rejected our
            // request", no detail). The image comes from the DaemonSet's template, which the
            // server validated already, so the test is what failed.
            kube::Error::Api(s) if s.code == 422 => RollError::Changed {
                pod: pod_name.clone(),
                index: step.index,
                container: step.name.clone(),
                source,
            },
            _ => RollError::Patch {
                pod: pod_name.clone(),
                container: step.name.clone(),
                source,
            },
        })?;
        // The patch's answer is the pod right after the write, before kubelet can have acted
        // on it: its container ID is the one to see replaced.
        let before = status(&patched, &step.name).and_then(|s| s.container_id.clone());
        current = wait_back(cluster, cfg, &pod_name, &node, step, patched, before).await?;
        say(format!(
            "{pod_name} (node {node}): {} back on {} in {:.1} s",
            step.name,
            step.image,
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// Reads the pod until `step`'s container is back (see [`is_back`]), for at most the container
/// timeout, however long the API server takes to answer.
async fn wait_back(
    cluster: &impl Cluster,
    cfg: &RollConfig,
    pod_name: &str,
    node: &str,
    step: &Step,
    mut last: Pod,
    before: Option<String>,
) -> Result<Pod, RollError> {
    let deadline = Instant::now() + cfg.container_timeout;
    let mut trouble: Option<String> = None;
    loop {
        if is_back(status(&last, &step.name), before.as_deref()) {
            return Ok(last);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let mut state = describe(status(&last, &step.name));
            if status(&last, &step.name).and_then(|s| s.container_id.as_deref())
                == before.as_deref()
            {
                state.push_str("; still the container from before the patch");
            }
            if let Some(t) = trouble {
                state.push_str(&format!("; last read of the pod: {t}"));
            }
            return Err(RollError::NotBack {
                pod: pod_name.to_string(),
                node: node.to_string(),
                container: step.name.clone(),
                image: step.image.clone(),
                timeout: cfg.container_timeout,
                state,
            });
        }
        tokio::time::sleep(cfg.poll_interval.min(left)).await;
        let left = deadline.saturating_duration_since(Instant::now());
        let read = cluster.pod(name(&last));
        match tokio::time::timeout(left.min(cfg.api_timeout), read).await {
            Ok(Ok(pod)) => {
                last = pod;
                trouble = None;
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                return Err(RollError::Gone {
                    pod: pod_name.to_string(),
                    container: step.name.clone(),
                });
            }
            // Transient until the deadline: the API server may be restarting too.
            Ok(Err(e)) => trouble = Some(e.to_string()),
            Err(_) => trouble = Some("the API server did not answer".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    };
    use kube::core::Status;
    use parking_lot::Mutex;
    use serde_json::json;

    const OLD: &str = "ghcr.io/lakecache/lakecache:0.1.0";
    const NEW: &str = "ghcr.io/lakecache/lakecache:0.2.0";
    const REGISTRAR: &str = "node-driver-registrar";

    fn container(name: &str, image: &str) -> Container {
        Container {
            name: name.to_string(),
            image: Some(image.to_string()),
            command: Some(vec!["lakecache-csi-node".to_string(), name.to_string()]),
            env: Some(vec![EnvVar {
                name: "LAKECACHE_LOG_FORMAT".to_string(),
                value: Some("json".to_string()),
                value_from: None,
            }]),
            ..Container::default()
        }
    }

    /// The chart's containers, in the chart's order, all on `image`.
    fn chart(image: &str) -> Vec<Container> {
        [REGISTRAR, PLUGIN, MOUNTER]
            .iter()
            .map(|n| container(n, image))
            .collect()
    }

    fn names(plan: &Plan) -> Vec<(usize, &str)> {
        plan.steps
            .iter()
            .map(|s| (s.index, s.name.as_str()))
            .collect()
    }

    #[test]
    fn the_mounter_goes_first_then_the_plugin_then_the_registrar() {
        let plan = plan(&chart(NEW), &chart(OLD));
        assert_eq!(names(&plan), [(2, MOUNTER), (1, PLUGIN), (0, REGISTRAR)]);
        assert!(plan.steps.iter().all(|s| s.image == NEW));
        assert!(plan.later.is_empty(), "{:?}", plan.later);
    }

    #[test]
    fn only_containers_on_another_image_are_patched() {
        assert_eq!(plan(&chart(NEW), &chart(NEW)), Plan::default());
        let mut pod = chart(NEW);
        pod[1].image = Some(OLD.to_string());
        assert_eq!(names(&plan(&chart(NEW), &pod)), [(1, PLUGIN)]);
    }

    #[test]
    fn the_index_is_the_pods_own() {
        // A template that lists the containers in another order: the patch path must still
        // point at the pod's container of that name.
        let mut template = chart(NEW);
        template.reverse();
        let mut pod = chart(OLD);
        pod[0].image = Some(NEW.to_string());
        let plan = plan(&template, &pod);
        assert_eq!(names(&plan), [(2, MOUNTER), (1, PLUGIN)]);
    }

    #[test]
    fn other_changes_are_listed_and_not_patched() {
        let mut template = chart(NEW);
        template[1].env.as_mut().unwrap().push(EnvVar {
            name: "LAKECACHE_FS_TIMEOUT".to_string(),
            value: Some("30s".to_string()),
            value_from: None,
        });
        template[1].env.as_mut().unwrap()[0].value = Some("text".to_string());
        template[2].args = Some(vec!["--mount-timeout=2m".to_string()]);
        template.push(container("extra", NEW));
        let mut pod = chart(OLD);
        pod.push(container("gone", OLD));
        let plan = plan(&template, &pod);
        assert_eq!(names(&plan), [(2, MOUNTER), (1, PLUGIN), (0, REGISTRAR)]);
        assert_eq!(
            plan.later,
            [
                "csi-plugin env LAKECACHE_FS_TIMEOUT LAKECACHE_LOG_FORMAT",
                "mounter args",
                "container gone removed",
                "new container extra",
            ]
        );
    }

    #[test]
    fn a_container_is_back_under_a_new_id_running_and_ready() {
        let s = |id: Option<&str>, ready: bool, running: bool| ContainerStatus {
            name: MOUNTER.to_string(),
            container_id: id.map(str::to_string),
            ready,
            state: Some(if running {
                ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..ContainerState::default()
                }
            } else {
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("ContainerCreating".to_string()),
                        message: None,
                    }),
                    ..ContainerState::default()
                }
            }),
            ..ContainerStatus::default()
        };
        let old = Some("containerd://1");
        assert!(
            !is_back(Some(&s(old, true, true)), old),
            "the old container"
        );
        assert!(!is_back(Some(&s(Some("containerd://2"), false, true)), old));
        assert!(!is_back(Some(&s(Some("containerd://2"), true, false)), old));
        assert!(!is_back(Some(&s(None, false, false)), old));
        assert!(!is_back(None, old));
        assert!(is_back(Some(&s(Some("containerd://2"), true, true)), old));
        // A container that had not started before the patch.
        assert!(is_back(Some(&s(Some("containerd://2"), true, true)), None));
    }

    #[test]
    fn the_arguments_parse_with_a_five_minute_default() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            roll: RollArgs,
        }
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["roll", "--namespace", "ns", "--daemonset", "ds"]).unwrap();
        assert_eq!(*cli.roll.container_timeout, Duration::from_secs(300));
        let cli = Cli::try_parse_from([
            "roll",
            "--namespace=ns",
            "--daemonset=ds",
            "--container-timeout=90s",
        ])
        .unwrap();
        assert_eq!(*cli.roll.container_timeout, Duration::from_secs(90));
        assert!(Cli::try_parse_from(["roll", "--namespace=ns"]).is_err());
    }

    /// What the fake kubelet does with a patched container.
    #[derive(Clone, Copy, PartialEq)]
    enum Kubelet {
        /// Restarts it on the new image, ready at once.
        Restarts,
        /// Its new image crash-loops.
        CrashLoops,
        /// The API server stops answering reads of the pod.
        Silent,
    }

    /// A DaemonSet and its pods, changed as the API server and kubelet would change them.
    struct Fake {
        ds: DaemonSet,
        pods: Mutex<Vec<Pod>>,
        kubelet: Mutex<Vec<(String, Kubelet)>>,
        /// (pod, container) of every patch, in order.
        patched: Mutex<Vec<(String, String)>>,
        ids: std::sync::atomic::AtomicU32,
    }

    const UID: &str = "ds-uid";

    fn daemonset(image: &str, strategy: &str) -> DaemonSet {
        serde_json::from_value(json!({
            "metadata": {"name": "lakecache-csi-node", "namespace": "ns", "uid": UID},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/component": "csi-node"}},
                "updateStrategy": {"type": strategy},
                "template": {"spec": {"containers": chart(image)}},
            },
        }))
        .unwrap()
    }

    fn pod(name: &str, node: &str, owner: &str, image: &str) -> Pod {
        let containers = chart(image);
        let statuses: Vec<ContainerStatus> = containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: image.to_string(),
                container_id: Some(format!("containerd://{name}-{}-0", c.name)),
                ready: true,
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "ns",
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "DaemonSet",
                    "name": "lakecache-csi-node", "uid": owner, "controller": true,
                }],
            },
            "spec": {"nodeName": node, "containers": containers},
            "status": {"containerStatuses": statuses},
        }))
        .unwrap()
    }

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Status::failure(message, "").with_code(code).boxed())
    }

    impl Fake {
        fn new(ds: DaemonSet, pods: Vec<Pod>) -> Self {
            Fake {
                ds,
                pods: Mutex::new(pods),
                kubelet: Mutex::new(Vec::new()),
                patched: Mutex::new(Vec::new()),
                ids: 0.into(),
            }
        }

        /// What kubelet does when `container` is patched (by default it restarts it).
        fn when_patched(self, container: &str, kubelet: Kubelet) -> Self {
            self.kubelet.lock().push((container.to_string(), kubelet));
            self
        }

        fn kubelet(&self, container: &str) -> Kubelet {
            self.kubelet
                .lock()
                .iter()
                .find(|(c, _)| c == container)
                .map_or(Kubelet::Restarts, |(_, k)| *k)
        }

        fn silent(&self) -> bool {
            let patched = self.patched.lock();
            patched
                .iter()
                .any(|(_, c)| self.kubelet(c) == Kubelet::Silent)
        }

        fn patched(&self) -> Vec<(String, String)> {
            self.patched.lock().clone()
        }
    }

    impl Cluster for Fake {
        async fn daemonset(&self) -> Result<DaemonSet, kube::Error> {
            Ok(self.ds.clone())
        }

        async fn pods(&self, selector: &str) -> Result<Vec<Pod>, kube::Error> {
            assert_eq!(selector, "app.kubernetes.io/component=csi-node");
            Ok(self.pods.lock().clone())
        }

        async fn pod(&self, name: &str) -> Result<Pod, kube::Error> {
            if self.silent() {
                std::future::pending::<()>().await;
            }
            let pods = self.pods.lock();
            pods.iter()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .cloned()
                .ok_or_else(|| api_error(404, "not found"))
        }

        async fn set_image(
            &self,
            pod: &str,
            index: usize,
            container: &str,
            image: &str,
        ) -> Result<Pod, kube::Error> {
            let mut pods = self.pods.lock();
            let p = pods
                .iter_mut()
                .find(|p| p.metadata.name.as_deref() == Some(pod))
                .ok_or_else(|| api_error(404, "not found"))?;
            let spec = p.spec.as_mut().unwrap();
            if spec.containers.get(index).map(|c| c.name.as_str()) != Some(container) {
                // What the real API server answers (e2e/tests/chart.rs checks it).
                return Err(api_error(
                    422,
                    "the server rejected our request due to an error in our request",
                ));
            }
            spec.containers[index].image = Some(image.to_string());
            self.patched
                .lock()
                .push((pod.to_string(), container.to_string()));
            // The answer is the pod as written, before kubelet acts.
            let answer = p.clone();
            let n = self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let kubelet = self.kubelet(container);
            let s = p
                .status
                .as_mut()
                .and_then(|s| s.container_statuses.as_mut())
                .and_then(|ss| ss.iter_mut().find(|s| s.name == container))
                .unwrap();
            match kubelet {
                Kubelet::Restarts | Kubelet::Silent => {
                    s.container_id = Some(format!("containerd://{pod}-{container}-{n}"));
                    s.image = image.to_string();
                }
                Kubelet::CrashLoops => {
                    s.container_id = Some(format!("containerd://{pod}-{container}-{n}"));
                    s.ready = false;
                    s.restart_count = 3;
                    s.state = Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("CrashLoopBackOff".to_string()),
                            message: Some("back-off 40s restarting failed container".to_string()),
                        }),
                        ..ContainerState::default()
                    });
                    s.last_state = Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            reason: Some("Error".to_string()),
                            exit_code: 1,
                            ..ContainerStateTerminated::default()
                        }),
                        ..ContainerState::default()
                    });
                }
            }
            Ok(answer)
        }
    }

    fn cfg(container_timeout: Duration) -> RollConfig {
        RollConfig {
            namespace: "ns".to_string(),
            daemonset: "lakecache-csi-node".to_string(),
            container_timeout,
            poll_interval: Duration::from_millis(5),
            api_timeout: Duration::from_secs(5),
        }
    }

    async fn roll_fake(fake: &Fake, timeout: Duration) -> (Result<(), RollError>, Vec<String>) {
        let mut lines = Vec::new();
        let r = roll(fake, &cfg(timeout), &mut |l| lines.push(l)).await;
        (r, lines)
    }

    fn patch(pod: &str, container: &str) -> (String, String) {
        (pod.to_string(), container.to_string())
    }

    #[tokio::test]
    async fn pods_roll_one_at_a_time_by_node_and_others_are_left_alone() {
        let fake = Fake::new(
            daemonset(NEW, "OnDelete"),
            vec![
                pod("csi-b", "node-b", UID, OLD),
                pod("csi-a", "node-a", UID, OLD),
                pod("stranger", "node-0", "another-uid", OLD),
            ],
        );
        let (r, lines) = roll_fake(&fake, Duration::from_secs(5)).await;
        r.unwrap();
        let mut want = Vec::new();
        for p in ["csi-a", "csi-b"] {
            for c in [MOUNTER, PLUGIN, REGISTRAR] {
                want.push(patch(p, c));
            }
        }
        assert_eq!(fake.patched(), want);
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert!(
            lines[0].starts_with(&format!(
                "ns/csi-a (node node-a): mounter back on {NEW} in "
            )),
            "{}",
            lines[0]
        );
        assert_eq!(
            lines[6],
            "all 2 pods of DaemonSet ns/lakecache-csi-node run its template's images"
        );
        // Run again: nothing left to do.
        let (r, _) = roll_fake(&fake, Duration::from_secs(5)).await;
        r.unwrap();
        assert_eq!(fake.patched().len(), 6);
    }

    #[tokio::test]
    async fn a_container_that_does_not_come_back_stops_the_roll() {
        let fake = Fake::new(
            daemonset(NEW, "OnDelete"),
            vec![
                pod("csi-a", "node-a", UID, OLD),
                pod("csi-b", "node-b", UID, OLD),
            ],
        )
        .when_patched(MOUNTER, Kubelet::CrashLoops);
        let started = Instant::now();
        let (r, lines) = roll_fake(&fake, Duration::from_millis(200)).await;
        let err = r.unwrap_err().to_string();
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Neither the plugin of this pod nor anything of the next one was touched.
        assert_eq!(fake.patched(), [patch("csi-a", MOUNTER)]);
        assert!(lines.is_empty(), "{lines:?}");
        for part in [
            "mounter of pod ns/csi-a (node node-a) was not back on",
            "waiting (CrashLoopBackOff): back-off 40s",
            "last termination: Error, exit code 1",
            "run the roll again",
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
    }

    #[tokio::test]
    async fn an_api_server_that_never_answers_is_bounded_by_the_container_timeout() {
        let fake = Fake::new(
            daemonset(NEW, "OnDelete"),
            vec![pod("csi-a", "node-a", UID, OLD)],
        )
        .when_patched(MOUNTER, Kubelet::Silent);
        let started = Instant::now();
        let (r, _) = roll_fake(&fake, Duration::from_millis(300)).await;
        let elapsed = started.elapsed();
        let err = r.unwrap_err().to_string();
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(4),
            "gave up after {elapsed:?}, before the API timeout of 5 s"
        );
        assert!(err.contains("mounter of pod ns/csi-a"), "{err}");
        assert!(
            err.contains("still the container from before the patch"),
            "{err}"
        );
        assert!(err.contains("the API server did not answer"), "{err}");
        assert_eq!(fake.patched(), [patch("csi-a", MOUNTER)]);
    }

    #[tokio::test]
    async fn the_mounter_is_not_restarted_while_the_plugin_is_down() {
        let mut p = pod("csi-a", "node-a", UID, OLD);
        let statuses = p
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut())
            .unwrap();
        let plugin = statuses.iter_mut().find(|s| s.name == PLUGIN).unwrap();
        plugin.ready = false;
        plugin.state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                reason: Some("OOMKilled".to_string()),
                exit_code: 137,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        });
        let fake = Fake::new(daemonset(NEW, "OnDelete"), vec![p]);
        let (r, _) = roll_fake(&fake, Duration::from_secs(5)).await;
        let err = r.unwrap_err().to_string();
        assert!(fake.patched().is_empty(), "{:?}", fake.patched());
        assert!(
            err.contains("not restarting mounter of pod ns/csi-a (node node-a): csi-plugin"),
            "{err}"
        );
        assert!(
            err.contains("terminated (OOMKilled, exit code 137)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_pod_whose_containers_moved_is_not_patched_blindly() {
        let fake = Fake::new(
            daemonset(NEW, "OnDelete"),
            vec![pod("csi-a", "node-a", UID, OLD)],
        );
        // Between the list and the patch, the containers are reordered.
        let listed = fake.pods.lock().clone();
        fake.pods.lock()[0]
            .spec
            .as_mut()
            .unwrap()
            .containers
            .reverse();
        let cluster = Listed {
            fake: &fake,
            listed,
        };
        let mut lines = Vec::new();
        let r = roll(&cluster, &cfg(Duration::from_secs(5)), &mut |l| {
            lines.push(l)
        })
        .await;
        let err = r.unwrap_err();
        assert!(matches!(err, RollError::Changed { index: 2, .. }), "{err}");
        assert!(fake.patched().is_empty());
    }

    /// The fake, answering the first list with pods as they were before a change.
    struct Listed<'a> {
        fake: &'a Fake,
        listed: Vec<Pod>,
    }

    impl Cluster for Listed<'_> {
        async fn daemonset(&self) -> Result<DaemonSet, kube::Error> {
            self.fake.daemonset().await
        }
        async fn pods(&self, _: &str) -> Result<Vec<Pod>, kube::Error> {
            Ok(self.listed.clone())
        }
        async fn pod(&self, name: &str) -> Result<Pod, kube::Error> {
            self.fake.pod(name).await
        }
        async fn set_image(
            &self,
            pod: &str,
            index: usize,
            container: &str,
            image: &str,
        ) -> Result<Pod, kube::Error> {
            self.fake.set_image(pod, index, container, image).await
        }
    }

    #[tokio::test]
    async fn a_daemonset_that_replaces_its_pods_is_refused() {
        let fake = Fake::new(
            daemonset(NEW, "RollingUpdate"),
            vec![pod("csi-a", "node-a", UID, OLD)],
        );
        let (r, _) = roll_fake(&fake, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(RollError::NotOnDelete { .. })), "{r:?}");
        assert!(fake.patched().is_empty());
    }

    #[tokio::test]
    async fn changes_beyond_images_are_reported_once_per_pod() {
        let mut ds = daemonset(NEW, "OnDelete");
        let template = ds.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
        template.containers[2].args = Some(vec!["--mount-timeout=2m".to_string()]);
        let fake = Fake::new(ds, vec![pod("csi-a", "node-a", UID, OLD)]);
        let (r, lines) = roll_fake(&fake, Duration::from_secs(5)).await;
        r.unwrap();
        assert_eq!(
            lines[0],
            "ns/csi-a (node node-a): rolling images only; waiting for the pod's next restart: \
             mounter args"
        );
        assert_eq!(lines.len(), 5, "{lines:#?}");
    }
}
