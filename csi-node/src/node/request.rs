//! A request's arguments, checked before anything is touched (no I/O): required fields, the
//! capability (a filesystem, read-only), and the volume context's rules
//! ([`VolumeAttributes`](crate::volume::VolumeAttributes)).

use lakecache_proto::csi::v1 as csi;
use lakecache_proto::csi::v1::volume_capability::access_mode::Mode;

use super::NodeError;

pub(super) fn required<'a>(v: &'a str, field: &str, rpc: &str) -> Result<&'a str, NodeError> {
    if v.is_empty() {
        Err(NodeError::InvalidArgument(format!(
            "{rpc}: {field} is required"
        )))
    } else {
        Ok(v)
    }
}

/// Checks the capability: a filesystem, used read-only.
pub(super) fn check_capability(
    cap: Option<&csi::VolumeCapability>,
    rpc: &str,
) -> Result<(), NodeError> {
    let cap = cap.ok_or_else(|| {
        NodeError::InvalidArgument(format!("{rpc}: volume_capability is required"))
    })?;
    match &cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(_)) => {}
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(NodeError::InvalidArgument(format!(
                "{rpc}: lakecache volumes are filesystems; use volumeMode: Filesystem, not Block"
            )));
        }
        None => {
            return Err(NodeError::InvalidArgument(format!(
                "{rpc}: volume_capability has no access type; ask for a mount volume"
            )));
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::MultiNodeMultiWriter | Mode::SingleNodeMultiWriter => {
            Err(NodeError::InvalidArgument(format!(
                "{rpc}: lakecache volumes are read-only; use access mode ReadOnlyMany ({mode:?} was asked)"
            )))
        }
        Mode::Unknown => Err(NodeError::InvalidArgument(format!(
            "{rpc}: volume_capability has no access mode; use ReadOnlyMany"
        ))),
        _ => Ok(()),
    }
}

pub(super) fn context_error(rpc: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::InvalidArgument(format!("{rpc}: {e}"))
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn cap(
        access: Option<csi::volume_capability::AccessType>,
        mode: Mode,
    ) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: access,
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn only_a_read_only_filesystem_is_accepted() {
        use csi::volume_capability::{AccessType, BlockVolume, MountVolume};
        let mount = || Some(AccessType::Mount(MountVolume::default()));
        check_capability(Some(&cap(mount(), Mode::MultiNodeReaderOnly)), "R").unwrap();
        check_capability(Some(&cap(mount(), Mode::SingleNodeReaderOnly)), "R").unwrap();
        let refused = [
            (None, "volume_capability is required"),
            (
                Some(cap(
                    Some(AccessType::Block(BlockVolume::default())),
                    Mode::MultiNodeReaderOnly,
                )),
                "volumeMode: Filesystem",
            ),
            (Some(cap(None, Mode::MultiNodeReaderOnly)), "no access type"),
            (Some(cap(mount(), Mode::MultiNodeMultiWriter)), "read-only"),
            (Some(cap(mount(), Mode::SingleNodeMultiWriter)), "read-only"),
            (Some(cap(mount(), Mode::Unknown)), "no access mode"),
        ];
        for (c, needle) in refused {
            let e = check_capability(c.as_ref(), "R").unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(
                e.message().starts_with("R: ") && e.message().contains(needle),
                "{e}"
            );
        }
    }

    #[test]
    fn a_missing_field_is_named() {
        assert_eq!(required("v", "volume_id", "R").unwrap(), "v");
        let e = required("", "volume_id", "R").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.message(), "R: volume_id is required");
    }
}
