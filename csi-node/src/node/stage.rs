//! NodeStageVolume and NodeUnstageVolume: a volume's FUSE mount at its staging path.
//!
//! Staging admits the volume (its FUSE server must fit in the mounter's memory), records it,
//! and asks the mounter for a healthy mount; staging again at the same path only makes sure of
//! that mount, at another path is refused. Unstaging refuses while a target is still published
//! (a target whose mount is gone no longer counts), and on a volume it does not know only makes
//! sure that nothing of ours is left on the path.

use std::path::PathBuf;

use lakecache_proto::csi::v1 as csi;

use super::request::{check_capability, context_error, required};
use super::{NodeError, Plugin};
use crate::state::VolumeRecord;
use crate::volume::{VolumeAttributes, check_caps, token_from_secrets};

impl Plugin {
    pub(super) async fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse, NodeError> {
        const RPC: &str = "NodeStageVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let staging = required(&req.staging_target_path, "staging_target_path", RPC)?;
        check_capability(req.volume_capability.as_ref(), RPC)?;
        let ctx =
            VolumeAttributes::from_map(&req.volume_context).map_err(|e| context_error(RPC, e))?;
        check_caps(&ctx, &self.cfg.caps).map_err(|e| context_error(RPC, e))?;
        let token = token_from_secrets(&req.secrets).map_err(|e| context_error(RPC, e))?;
        let _busy = self.busy(volume_id, RPC)?;
        let staging = PathBuf::from(staging);
        let existing = self.load(volume_id).await?;
        if let Some(rec) = &existing
            && rec.staging_path != staging
        {
            return Err(NodeError::AlreadyExists(format!(
                "{RPC}: volume {volume_id} is already staged at {}; unstage it there first",
                rec.staging_path.display()
            )));
        }
        let rec = match &existing {
            Some(rec) => rec.clone(),
            None => {
                let rec = VolumeRecord {
                    volume_id: volume_id.to_string(),
                    staging_path: staging.clone(),
                    ephemeral: false,
                    namespace: ctx.namespace.clone(),
                    name: ctx.name.clone(),
                    targets: Default::default(),
                    prefetch_budget: Some(ctx.prefetch_budget.unwrap_or(self.cfg.prefetch_budget)),
                };
                self.admit(&rec, RPC).await?;
                rec
            }
        };
        match self.ensure_fuse(&rec, Some((&ctx, token))).await {
            Ok(_) => Ok(csi::NodeStageVolumeResponse {}),
            Err(e) => {
                if existing.is_none() {
                    let _ = self.forget(volume_id).await;
                }
                Err(e)
            }
        }
    }

    pub(super) async fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse, NodeError> {
        const RPC: &str = "NodeUnstageVolume";
        let volume_id = required(&req.volume_id, "volume_id", RPC)?;
        let staging = PathBuf::from(required(
            &req.staging_target_path,
            "staging_target_path",
            RPC,
        )?);
        let _busy = self.busy(volume_id, RPC)?;
        let Some(mut rec) = self.load(volume_id).await? else {
            // Not ours (any more): make sure nothing of ours is left on the path.
            self.fs("unmounting the staging path", move |host| {
                if host.is_ours(&staging) {
                    host.unmount_all(&staging).map_err(|e| {
                        NodeError::io(format!("unmounting {}", staging.display()), e)
                    })?;
                }
                Ok(())
            })
            .await?;
            return Ok(csi::NodeUnstageVolumeResponse {});
        };
        if rec.staging_path != staging {
            return Err(NodeError::InvalidArgument(format!(
                "{RPC}: volume {volume_id} is staged at {}, not at {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        let targets: Vec<PathBuf> = rec.targets.keys().cloned().collect();
        let gone: Vec<PathBuf> = self
            .fs("checking the published targets", move |host| {
                Ok(targets
                    .into_iter()
                    .filter(|t| !host.is_mount_point(t).unwrap_or(true))
                    .collect())
            })
            .await?;
        rec.targets.retain(|t, _| !gone.contains(t));
        if !rec.targets.is_empty() {
            let list: Vec<_> = rec
                .targets
                .keys()
                .map(|t| t.display().to_string())
                .collect();
            self.save(&rec).await?;
            return Err(NodeError::FailedPrecondition(format!(
                "{RPC}: volume {volume_id} is still published at {}; unpublish those first",
                list.join(", ")
            )));
        }
        self.stop_fuse(&rec).await?;
        self.drop_local_copies(volume_id).await;
        self.forget(volume_id).await?;
        Ok(csi::NodeUnstageVolumeResponse {})
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use tonic::Code;

    use super::*;
    use crate::node::host::Host;
    use crate::node::host::fake::FakeHost;
    use crate::node::testkit::{context, fake_node, read_only};
    use crate::state::TargetRecord;

    fn stage_request(staging: &Path) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: read_only(),
            volume_context: context("ml", &[]),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn staging_again_is_idempotent_and_elsewhere_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost::default());
        let (plugin, state, mounted) = fake_node(root.path(), host);
        let staging = root.path().join("globalmount");
        plugin.stage(stage_request(&staging)).await.unwrap();
        plugin.stage(stage_request(&staging)).await.unwrap();
        assert_eq!(
            *mounted.lock(),
            ["v", "v"],
            "each stage makes sure of the mount"
        );
        assert_eq!(state.load("v").unwrap().unwrap().staging_path, staging);
        let e = plugin
            .stage(stage_request(&root.path().join("elsewhere")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e}");
        assert!(e.message().contains("unstage it there first"), "{e}");
        // A bad context is refused before anything is recorded.
        let mut bad = stage_request(&root.path().join("w"));
        bad.volume_id = "w".into();
        bad.volume_context.insert("subPath".into(), "../etc".into());
        let e = plugin.stage(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(state.load("w").unwrap().is_none());
    }

    #[tokio::test]
    async fn unstaging_waits_for_live_targets_and_forgets_dead_ones() {
        let root = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost::default());
        let (plugin, state, _) = fake_node(root.path(), host.clone());
        let staging = root.path().join("globalmount");
        plugin.stage(stage_request(&staging)).await.unwrap();
        let (live, dead) = (root.path().join("live"), root.path().join("dead"));
        let mut rec = state.load("v").unwrap().unwrap();
        for t in [&live, &dead] {
            rec.targets.insert(
                t.clone(),
                TargetRecord {
                    sub_path: String::new(),
                },
            );
        }
        state.save(&rec).unwrap();
        host.mount_cache(&staging, &[]);
        host.create_dir_all(&live).unwrap();
        host.bind_read_only(&staging, &live).unwrap();
        let unstage = || csi::NodeUnstageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
        };
        let e = plugin.unstage(unstage()).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains(&live.display().to_string()), "{e}");
        let left = state.load("v").unwrap().unwrap();
        assert_eq!(
            left.targets.keys().collect::<Vec<_>>(),
            [&live],
            "the dead target is forgotten"
        );
        host.unmount_all(&live).unwrap();
        plugin.unstage(unstage()).await.unwrap();
        assert!(state.load("v").unwrap().is_none());
        // Unstaging what is not (any more) staged succeeds, and clears only our own mount.
        plugin.unstage(unstage()).await.unwrap();
        let foreign = root.path().join("foreign");
        host.mounts.lock().insert(
            foreign.clone(),
            vec![crate::node::host::fake::FakeMount {
                source: "/dev/sdb".into(),
                ours: false,
                broken: false,
            }],
        );
        plugin
            .unstage(csi::NodeUnstageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: foreign.display().to_string(),
            })
            .await
            .unwrap();
        assert_eq!(
            host.stacked(&foreign),
            1,
            "another driver's mount is left alone"
        );
        host.mount_cache(&staging, &[]);
        plugin.unstage(unstage()).await.unwrap();
        assert_eq!(
            host.stacked(&staging),
            0,
            "a leftover mount of ours is cleared"
        );
    }
}
