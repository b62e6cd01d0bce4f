//! NodePublishVolume, NodeUnpublishVolume and NodeGetVolumeStats: a read-only bind of the
//! staged cache (or of a sub path of it) on a pod's target.
//!
//! Publishing again to a target that already shows the same sub path and answers does nothing;
//! the same target with another sub path is refused; a stale mount on the target (a dead bind
//! left by a crash) is cleared before the new bind. The look into the cache mount that checks
//! the sub path asks the workers, so it runs without the volume's lock and under a deadline
//! ([`Plugin::look`]). Unpublishing unmounts only what is ours (recorded, or a lakecache mount),
//! never another driver's mount on the path. An inline (ephemeral) volume is staged by its
//! first publish and unstaged by its last unpublish.

use std::path::{Path, PathBuf};

use lakecache_proto::csi::v1 as csi;

use super::request::{check_capability, context_error, required};
use super::{NodeError, Plugin};
use crate::mounts::Health;
use crate::state::{TargetRecord, VolumeRecord};
use crate::volume::{VolumeAttributes, check_caps, token_from_secrets};

impl Plugin {
    pub(super) async fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse, NodeError> {
        const RPC: &str = "NodePublishVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let target = PathBuf::from(required(&req.target_path, "target_path", RPC)?);
        check_capability(req.volume_capability.as_ref(), RPC)?;
        let ctx =
            VolumeAttributes::from_map(&req.volume_context).map_err(|e| context_error(RPC, e))?;
        ctx.check_pod_namespace()
            .map_err(|e| NodeError::PermissionDenied(format!("{RPC}: {e}")))?;
        check_caps(&ctx, &self.cfg.caps).map_err(|e| context_error(RPC, e))?;
        let token = token_from_secrets(&req.secrets).map_err(|e| context_error(RPC, e))?;
        let _busy = self.busy(volume_id, RPC)?;

        let mut rec = match self.load(volume_id).await? {
            Some(rec) => rec,
            None if ctx.ephemeral => {
                let rec = VolumeRecord {
                    volume_id: volume_id.to_string(),
                    staging_path: self.state.volume_dir(volume_id).join("mnt"),
                    ephemeral: true,
                    namespace: ctx.namespace.clone(),
                    name: ctx.name.clone(),
                    targets: Default::default(),
                    prefetch_budget: Some(ctx.prefetch_budget.unwrap_or(self.cfg.prefetch_budget)),
                };
                self.admit(&rec, RPC).await?;
                if let Err(e) = self.ensure_fuse(&rec, Some((&ctx, token))).await {
                    let _ = self.forget(volume_id).await;
                    return Err(e);
                }
                rec
            }
            None => {
                required(&req.staging_target_path, "staging_target_path", RPC)?;
                return Err(NodeError::NotFound(format!(
                    "{RPC}: volume {volume_id} is not staged on this node; NodeStageVolume must come first"
                )));
            }
        };
        if !rec.ephemeral {
            let staging = required(&req.staging_target_path, "staging_target_path", RPC)?;
            if rec.staging_path != Path::new(staging) {
                return Err(NodeError::InvalidArgument(format!(
                    "{RPC}: volume {volume_id} is staged at {}, not at {staging}",
                    rec.staging_path.display()
                )));
            }
        }
        if (rec.namespace.as_str(), rec.name.as_str())
            != (ctx.namespace.as_str(), ctx.name.as_str())
        {
            return Err(NodeError::InvalidArgument(format!(
                "{RPC}: volume {volume_id} was staged for CacheNamespace {}/{}, but this request names {}/{}",
                rec.namespace, rec.name, ctx.namespace, ctx.name
            )));
        }
        // kubelet publishes again and again (`requiresRepublish`) with the current token of the
        // publish secret: a rotated token replaces the one the FUSE server uses, which follows
        // its token file without a restart.
        if let Some(token) = token
            && self.write_token(volume_id, token).await?
        {
            tracing::info!(
                volume = volume_id,
                "the data-plane token changed; the FUSE server takes the new one"
            );
        }
        if let Some(t) = rec.targets.get(&target)
            && t.sub_path != ctx.sub_path
        {
            return Err(NodeError::AlreadyExists(format!(
                "{RPC}: {} already shows subPath {:?} of volume {volume_id}; unpublish it first",
                target.display(),
                t.sub_path
            )));
        }
        let source = rec.staging_path.join(&ctx.sub_path);
        let published = rec.targets.contains_key(&target);
        let (t, src, sub) = (target.clone(), source.clone(), ctx.sub_path.clone());
        let (ns, name, vid) = (
            ctx.namespace.clone(),
            ctx.name.clone(),
            volume_id.to_string(),
        );
        // A look into the cache mount asks the workers (a listing): bounded by the deadline,
        // and without the volume's lock, which a hung FUSE server would otherwise keep.
        let done = self
            .look(volume_id, "looking at the cache mount", move |host| {
                if published && host.health(&t) == Health::Healthy {
                    return Ok(true);
                }
                match host.is_dir(&src) {
                    Ok(true) => Ok(false),
                    Ok(false) => Err(NodeError::InvalidArgument(format!(
                        "{RPC}: subPath {sub:?} of CacheNamespace {ns}/{name} is a file; name a directory"
                    ))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NodeError::NotFound(format!(
                        "{RPC}: subPath {sub:?} does not exist in CacheNamespace {ns}/{name}; check volumeAttributes.subPath"
                    ))),
                    Err(e) => Err(NodeError::Unavailable(format!(
                        "{RPC}: the cache mount of volume {vid} does not answer ({e}); the plugin is repairing it, retry"
                    ))),
                }
            })
            .await?;
        if done {
            return Ok(csi::NodePublishVolumeResponse {});
        }
        let t = target.clone();
        self.fs("binding the cache to the target", move |host| {
            // A stale mount goes first: over a dead bind (its FUSE server gone), creating the
            // directory fails ("File exists" on a path that does not stat), so the target could
            // never be published again.
            if host.is_mount_point(&t).unwrap_or(false) {
                host.unmount_all(&t)
                    .map_err(|e| NodeError::io(format!("{RPC}: clearing {}", t.display()), e))?;
            }
            host.create_dir_all(&t)
                .map_err(|e| NodeError::io(format!("{RPC}: creating {}", t.display()), e))?;
            host.bind_read_only(&source, &t)
                .map_err(|e| NodeError::io(RPC, e))
        })
        .await?;
        rec.targets.insert(
            target,
            TargetRecord {
                sub_path: ctx.sub_path.clone(),
            },
        );
        self.save(&rec).await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    pub(super) async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse, NodeError> {
        const RPC: &str = "NodeUnpublishVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let target = PathBuf::from(required(&req.target_path, "target_path", RPC)?);
        let _busy = self.busy(volume_id, RPC)?;
        let rec = self.load(volume_id).await?;
        let ours = rec
            .as_ref()
            .is_some_and(|r| r.targets.contains_key(&target));
        let t = target.clone();
        self.fs("unmounting the target", move |host| {
            if ours || host.is_ours(&t) {
                host.unmount_all(&t)
                    .map_err(|e| NodeError::io(format!("{RPC}: unmounting {}", t.display()), e))?;
            }
            match host.remove_dir(&t) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(NodeError::io(format!("{RPC}: removing {}", t.display()), e)),
            }
        })
        .await?;
        if let Some(mut rec) = rec {
            rec.targets.remove(&target);
            if rec.ephemeral && rec.targets.is_empty() {
                self.stop_fuse(&rec).await?;
                self.drop_local_copies(volume_id).await;
                self.forget(volume_id).await?;
            } else {
                self.save(&rec).await?;
            }
        }
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    pub(super) async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, NodeError> {
        const RPC: &str = "NodeGetVolumeStats";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let path = PathBuf::from(required(&req.volume_path, "volume_path", RPC)?);
        let Some(rec) = self.load(volume_id).await? else {
            return Err(NodeError::NotFound(format!(
                "{RPC}: volume {volume_id} is not staged or published on this node"
            )));
        };
        if rec.staging_path != path && !rec.targets.contains_key(&path) {
            return Err(NodeError::NotFound(format!(
                "{RPC}: volume {volume_id} is not staged or published at {}",
                path.display()
            )));
        }
        let (usage, condition) = self
            .look(volume_id, "looking at the mount", move |host| {
                Ok(match host.health(&path) {
                    Health::Healthy => match host.usage(&path) {
                        Ok(u) => (
                            vec![
                                csi::VolumeUsage {
                                    available: u.bytes_available as i64,
                                    total: u.bytes_total as i64,
                                    used: u.bytes_used as i64,
                                    unit: csi::volume_usage::Unit::Bytes as i32,
                                },
                                csi::VolumeUsage {
                                    available: u.inodes_free as i64,
                                    total: u.inodes_total as i64,
                                    used: u.inodes_used as i64,
                                    unit: csi::volume_usage::Unit::Inodes as i32,
                                },
                            ],
                            csi::VolumeCondition {
                                abnormal: false,
                                message: "the cache mount answers".into(),
                            },
                        ),
                        Err(e) => (vec![], abnormal(format!("statfs failed: {e}"))),
                    },
                    Health::NotMounted => (
                        vec![],
                        abnormal("not mounted; the plugin will mount it again".into()),
                    ),
                    Health::Broken(m) => {
                        (vec![], abnormal(format!("{m}; the plugin will repair it")))
                    }
                })
            })
            .await?;
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }
}

fn abnormal(message: String) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: true,
        message,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tonic::Code;

    use super::*;
    use crate::node::host::Host;
    use crate::node::host::fake::{FakeHost, FakeMount};
    use crate::node::testkit::{context, fake_node, read_only};

    struct Node {
        plugin: Plugin,
        state: crate::state::StateDir,
        host: Arc<FakeHost>,
        staging: PathBuf,
        _root: tempfile::TempDir,
    }

    /// Volume `v` staged, its cache mounted with directories `train` and `val` and a file
    /// `README`.
    async fn staged() -> Node {
        let root = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost::default());
        let (plugin, state, _) = fake_node(root.path(), host.clone());
        let staging = root.path().join("globalmount");
        plugin
            .stage(csi::NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: read_only(),
                volume_context: context("ml", &[]),
                ..Default::default()
            })
            .await
            .unwrap();
        host.mount_cache(&staging, &["train", "val"]);
        host.files.lock().insert(staging.join("README"));
        Node {
            plugin,
            state,
            host,
            staging,
            _root: root,
        }
    }

    impl Node {
        fn publish(&self, target: &Path, extra: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
            csi::NodePublishVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: self.staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: read_only(),
                volume_context: context("ml", extra),
                readonly: true,
                ..Default::default()
            }
        }
        fn target(&self, name: &str) -> PathBuf {
            self.staging.parent().unwrap().join(name)
        }
    }

    #[tokio::test]
    async fn publishing_again_binds_nothing_new_and_another_sub_path_is_refused() {
        let n = staged().await;
        let t = n.target("pod-a");
        n.plugin
            .publish(n.publish(&t, &[("subPath", "train")]))
            .await
            .unwrap();
        assert_eq!(n.host.top(&t).unwrap().source, n.staging.join("train"));
        n.plugin
            .publish(n.publish(&t, &[("subPath", "train")]))
            .await
            .unwrap();
        assert_eq!(n.host.stacked(&t), 1, "{:?}", n.host.log());
        let e = n
            .plugin
            .publish(n.publish(&t, &[("subPath", "val")]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e}");
        let rec = n.state.load("v").unwrap().unwrap();
        assert_eq!(rec.targets[&t].sub_path, "train");
    }

    #[tokio::test]
    async fn a_stale_mount_on_the_target_is_cleared_before_the_bind() {
        let n = staged().await;
        let t = n.target("pod-b");
        n.host.create_dir_all(&t).unwrap();
        n.host.mounts.lock().insert(
            t.clone(),
            vec![FakeMount {
                source: "old".into(),
                ours: true,
                broken: true,
            }],
        );
        n.plugin.publish(n.publish(&t, &[])).await.unwrap();
        let log = n.host.log();
        let unmount = log.iter().position(|l| l.starts_with("unmount"));
        let bind = log
            .iter()
            .position(|l| l.starts_with("bind") && l.ends_with("pod-b"));
        assert!(unmount.is_some() && unmount < bind, "{log:?}");
        assert_eq!(n.host.stacked(&t), 1);
        // A recorded target that broke is bound again by the next publish too.
        n.host.mounts.lock().get_mut(&t).unwrap()[0].broken = true;
        n.plugin.publish(n.publish(&t, &[])).await.unwrap();
        assert_eq!(n.host.health(&t), Health::Healthy);
    }

    #[tokio::test]
    async fn a_sub_path_must_be_a_directory_that_answers() {
        let n = staged().await;
        let cases = [
            ("README", Code::InvalidArgument, "is a file"),
            ("nope", Code::NotFound, "does not exist"),
        ];
        for (sub, code, needle) in cases {
            let e = n
                .plugin
                .publish(n.publish(&n.target(sub), &[("subPath", sub)]))
                .await
                .unwrap_err();
            assert_eq!(e.code(), code, "{sub}: {e}");
            assert!(e.message().contains(needle), "{e}");
        }
        n.host.failing.lock().insert(n.staging.clone());
        let e = n
            .plugin
            .publish(n.publish(&n.target("x"), &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(n.host.log().iter().all(|l| !l.starts_with("bind")));
        assert!(n.state.load("v").unwrap().unwrap().targets.is_empty());
    }

    #[tokio::test]
    async fn what_may_not_be_published_is_refused_before_anything_is_touched() {
        let n = staged().await;
        let t = n.target("pod-c");
        let mut other_ns = n.publish(&t, &[]);
        other_ns.volume_context = context("team-b", &[]);
        let e = n.plugin.publish(other_ns).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let mut unstaged = n.publish(&t, &[]);
        unstaged.volume_id = "w".into();
        assert_eq!(
            n.plugin.publish(unstaged).await.unwrap_err().code(),
            Code::NotFound
        );
        let mut elsewhere = n.publish(&t, &[]);
        elsewhere.staging_target_path = "/elsewhere".into();
        assert_eq!(
            n.plugin.publish(elsewhere).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert!(n.host.log().is_empty(), "{:?}", n.host.log());
    }

    #[tokio::test]
    async fn unpublishing_removes_only_what_is_ours_and_again_is_fine() {
        let n = staged().await;
        let t = n.target("pod-d");
        n.plugin.publish(n.publish(&t, &[])).await.unwrap();
        let unpublish = |t: &Path| csi::NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            target_path: t.display().to_string(),
        };
        n.plugin.unpublish(unpublish(&t)).await.unwrap();
        assert_eq!(n.host.stacked(&t), 0);
        assert!(!n.host.exists(&t));
        assert!(n.state.load("v").unwrap().unwrap().targets.is_empty());
        n.plugin.unpublish(unpublish(&t)).await.unwrap();
        // Another driver's mount on a path this volume never published is not unmounted.
        let foreign = n.target("foreign");
        n.host.create_dir_all(&foreign).unwrap();
        n.host.mounts.lock().insert(
            foreign.clone(),
            vec![FakeMount {
                source: "/dev/sdb".into(),
                ours: false,
                broken: false,
            }],
        );
        assert!(n.plugin.unpublish(unpublish(&foreign)).await.is_err());
        assert_eq!(n.host.stacked(&foreign), 1);
        assert!(
            !n.host
                .log()
                .iter()
                .any(|l| l.ends_with("foreign") && l.starts_with("unmount"))
        );
    }

    #[tokio::test]
    async fn stats_report_a_broken_mount_as_an_abnormal_condition() {
        let n = staged().await;
        let stats = |path: &Path| csi::NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        };
        let ok = n.plugin.stats(stats(&n.staging)).await.unwrap();
        assert!(!ok.volume_condition.unwrap().abnormal);
        assert_eq!(ok.usage.len(), 2);
        n.host.mounts.lock().get_mut(&n.staging).unwrap()[0].broken = true;
        let broken = n.plugin.stats(stats(&n.staging)).await.unwrap();
        let c = broken.volume_condition.unwrap();
        assert!(c.abnormal && c.message.contains("repair"), "{c:?}");
        let e = n
            .plugin
            .stats(stats(Path::new("/elsewhere")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
}
