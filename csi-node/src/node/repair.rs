//! The repair loop: every recorded volume's FUSE mount and published targets, checked and
//! mended.
//!
//! The mounter is asked about every volume on every pass: it also restarts (or hands over to a
//! successor) a server that died while its mount still looked fine. A broken target gets a new
//! bind on top of the dead one, since a pod's container holds a copy of the target mount that
//! only mounts made *on* it reach.

use super::Plugin;
use super::blocking::HELD;
use crate::mounts::Health;
use crate::state::VolumeRecord;

impl Plugin {
    /// Finds every recorded mount and repairs the broken ones. Returns how many repairs it made.
    ///
    /// The list of volumes is read without any volume's lock, and a pass waits on the mounter
    /// for each volume in turn: by the time a volume's turn comes, a CSI call may have
    /// published or unpublished a target of it, or unstaged it. So each volume's record is read
    /// again once its lock is held, and a volume whose record is gone is left alone; repairing
    /// the listed copy would write it back over the newer one (dropping a new target) or mount
    /// an unstaged volume again.
    pub async fn repair_all(&self) -> usize {
        HELD.scope(Default::default(), self.repair_pass()).await
    }

    async fn repair_pass(&self) -> usize {
        let mut repaired = 0;
        let state = self.state.clone();
        let all = match self
            .fs("listing the volumes", move |_| Ok(state.all()))
            .await
        {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(message = %e, "cannot list the volumes; will retry");
                return 0;
            }
        };
        for rec in all {
            let volume_id = match rec {
                Ok(r) => r.volume_id,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a volume's state; leaving it alone");
                    continue;
                }
            };
            let Ok(_busy) = self.busy(&volume_id, "repair") else {
                continue;
            };
            let rec = match self.load(&volume_id).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    tracing::debug!(volume = %volume_id, "unstaged during the repair pass");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(volume = %volume_id, message = %e, "cannot read a volume's state; leaving it alone");
                    continue;
                }
            };
            repaired += self.repair(rec).await;
        }
        repaired
    }

    /// Repairs one volume's FUSE mount and targets. `rec` must have been read under the
    /// volume's lock, which the caller holds until this returns: it is written back when a
    /// target is forgotten.
    async fn repair(&self, mut rec: VolumeRecord) -> usize {
        let vid = rec.volume_id.clone();
        let mut repaired = 0;
        let path = rec.staging_path.clone();
        let health = self
            .glance("checking the cache mount", move |host| {
                Ok(host.health(&path))
            })
            .await
            .unwrap_or_else(|e| Health::Broken(e.message().to_string()));
        if health != Health::Healthy {
            tracing::warn!(volume = %vid, path = %rec.staging_path.display(), ?health, "the cache mount is broken; repairing");
        }
        // The mounter is asked either way: it also restarts a server that died while its
        // mount still looked fine.
        match self.ensure_fuse(&rec, None).await {
            Ok(true) => {
                repaired += 1;
                self.metrics.repair("fuse");
                tracing::warn!(volume = %vid, path = %rec.staging_path.display(), "repaired: a new FUSE server serves the cache mount");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(volume = %vid, code = ?e.code(), message = %e, "cannot repair the cache mount; will retry");
                return repaired;
            }
        }
        let mut changed = false;
        let targets: Vec<_> = rec
            .targets
            .iter()
            .map(|(p, t)| (p.clone(), t.clone()))
            .collect();
        for (target, t) in targets {
            let p = target.clone();
            // Whether the path exists matters only when nothing is mounted on it: a stat of a
            // mounted target would ask its FUSE server.
            let looked = self
                .glance("checking a target", move |host| {
                    let health = host.health(&p);
                    let exists = health != Health::NotMounted || host.exists(&p);
                    Ok((health, exists))
                })
                .await;
            let (health, exists) = match looked {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(volume = %vid, target = %target.display(), message = %e, "cannot check a target; will retry");
                    continue;
                }
            };
            match health {
                Health::Healthy => continue,
                Health::NotMounted if !exists => {
                    tracing::info!(volume = %vid, target = %target.display(), "the target path is gone; forgetting it");
                    rec.targets.remove(&target);
                    changed = true;
                    continue;
                }
                h => {
                    tracing::warn!(volume = %vid, target = %target.display(), health = ?h, "a published target is broken; repairing")
                }
            }
            let source = rec.staging_path.join(&t.sub_path);
            // The new bind goes on top of the dead one, not in its place: a pod's container
            // holds a copy of the target mount (a slave of its peer group, with
            // `mountPropagation: HostToContainer`), and only mounts made *on* that mount reach
            // the copy. Unmounting the target first would take the pod's copy away and put the
            // new mount where no copy follows it (found on a real kubelet). Each repair stacks
            // one dead mount under the live one; unpublish unmounts the whole stack, and past
            // MAX_STACKED repairs of one target the stack is cleared first.
            let p = target.clone();
            let r = self
                .fs("binding a target again", move |host| {
                    Ok(if host.mount_count(&p).unwrap_or(0) >= MAX_STACKED {
                        host.unmount_all(&p)
                            .and_then(|_| host.bind_read_only(&source, &p))
                    } else {
                        host.bind_read_only(&source, &p)
                    })
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.message().to_string())));
            match r {
                Ok(()) => {
                    repaired += 1;
                    self.metrics.repair("target");
                    tracing::warn!(volume = %vid, target = %target.display(), "repaired: the target shows the cache again");
                }
                Err(e) => {
                    tracing::error!(volume = %vid, target = %target.display(), error = %e, "cannot repair the target; will retry")
                }
            }
        }
        if changed && let Err(e) = self.save(&rec).await {
            tracing::warn!(volume = %vid, message = %e, "cannot save the volume's state");
        }
        repaired
    }
}

/// How many mounts may stack on one target before a repair clears the stack instead (pods then
/// see the new mount only after a restart). `mounts::unmount_all` removes up to 16.
const MAX_STACKED: usize = 8;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::mounts::{self, Health};
    use crate::node::testkit::two_volumes;
    use crate::state::TargetRecord;

    fn other(volume_id: &str) -> &'static str {
        if volume_id == "a" { "b" } else { "a" }
    }

    #[tokio::test]
    async fn a_target_published_during_a_repair_pass_is_kept() {
        // The published target must be left alone by the repair, so it is a path that is
        // mounted and answers; make sure /proc is one here before the plugin may act on it.
        let published = PathBuf::from("/proc");
        assert_eq!(mounts::health(&published), Health::Healthy);
        let root = tempfile::tempdir().unwrap();
        let p = published.clone();
        let (plugin, state, _) = two_volumes(root.path(), move |state, v| {
            let mut rec = state.load(other(v)).unwrap().unwrap();
            rec.targets.insert(
                p,
                TargetRecord {
                    sub_path: String::new(),
                },
            );
            state.save(&rec).unwrap();
        })
        .await;
        plugin.repair_all().await;
        for v in ["a", "b"] {
            let rec = state.load(v).unwrap().unwrap();
            let gone = root.path().join(v).join("gone");
            assert!(!rec.targets.contains_key(&gone), "{v}: {rec:?}");
        }
        let published_to: Vec<_> = ["a", "b"]
            .into_iter()
            .filter(|v| {
                state
                    .load(v)
                    .unwrap()
                    .unwrap()
                    .targets
                    .contains_key(&published)
            })
            .collect();
        assert_eq!(
            published_to.len(),
            1,
            "the target published meanwhile is still recorded"
        );
    }

    #[tokio::test]
    async fn a_volume_unstaged_during_a_repair_pass_is_not_mounted_again() {
        let root = tempfile::tempdir().unwrap();
        let (plugin, state, mounted) = two_volumes(root.path(), |state, v| {
            state.remove(other(v)).unwrap();
        })
        .await;
        plugin.repair_all().await;
        let mounted = mounted.lock().clone();
        assert_eq!(mounted.len(), 1, "mounted: {mounted:?}");
        let left: Vec<_> = state
            .all()
            .into_iter()
            .map(|r| r.unwrap().volume_id)
            .collect();
        assert_eq!(
            left, mounted,
            "the unstaged volume's record is not written back"
        );
    }
}
