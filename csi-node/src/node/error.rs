//! What can go wrong in a CSI call, and the one place that turns it into a gRPC code.
//!
//! kubelet and the external CSI tooling act on the code, not the text: `InvalidArgument` and
//! `PermissionDenied` are final (the pod's spec must change), `Aborted` and `Unavailable` are
//! retried (soon), `NotFound`, `AlreadyExists` and `FailedPrecondition` say which call must come
//! first. So every error is classified where it arises, in a variant that says what kind of
//! problem it is, and [`NodeError::code`] maps the variants with one exhaustive match. The
//! message stays what it was before there was a type: what to fix, in the user's terms.

use std::io;

use tonic::{Code, Status};

/// An error of a CSI node call (or of a repair, which logs it).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A field is missing, or the request or the volume context asks for what cannot be.
    #[error("{0}")]
    InvalidArgument(String),
    /// A pod asks for a volume it may not mount.
    #[error("{0}")]
    PermissionDenied(String),
    /// The volume is not staged, or a path in it does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The volume is already staged or published otherwise than asked.
    #[error("{0}")]
    AlreadyExists(String),
    /// Another call must come first (unpublish before unstage).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another call on the volume is in progress.
    #[error("{0}")]
    Busy(String),
    /// The node has no room for the volume (the mounter's memory).
    #[error("{0}")]
    NoRoom(String),
    /// Something did not answer in time (a mount, the mounter, the state directory); a retry
    /// may find it answering.
    #[error("{0}")]
    Unavailable(String),
    /// A file or mount call failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The mounter answered with an error of its own, which is already classified.
    #[error("{message}")]
    Mounter { code: Code, message: String },
    /// A fault of the plugin itself.
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    /// An I/O error, saying what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        NodeError::Io {
            what: what.into(),
            source,
        }
    }

    /// The gRPC code of the error.
    pub fn code(&self) -> Code {
        match self {
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
            NodeError::PermissionDenied(_) => Code::PermissionDenied,
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::AlreadyExists(_) => Code::AlreadyExists,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::Busy(_) => Code::Aborted,
            NodeError::NoRoom(_) => Code::ResourceExhausted,
            NodeError::Unavailable(_) => Code::Unavailable,
            NodeError::Io { source, .. } => io_code(source),
            NodeError::Mounter { code, .. } => *code,
            NodeError::Internal(_) => Code::Internal,
        }
    }

    /// The message, as the caller sees it.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// The code of a failed file call (the volume's state, a target directory): an I/O error
/// (`EIO`, a path under a dead FUSE connection, `ENOTCONN`) or a timeout may pass on a retry,
/// once the plugin has repaired the mount or the disk recovered; a full disk is the node's
/// limit; anything else is a fault of the plugin or its node. (The mount calls' own errors
/// carry no errno and stay `Internal`.)
fn io_code(e: &io::Error) -> Code {
    if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::EIO)) {
        return Code::Unavailable;
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Code::Unavailable,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_error_has_its_code_and_keeps_its_message() {
        let cases = [
            (
                NodeError::InvalidArgument("a".into()),
                Code::InvalidArgument,
            ),
            (
                NodeError::PermissionDenied("a".into()),
                Code::PermissionDenied,
            ),
            (NodeError::NotFound("a".into()), Code::NotFound),
            (NodeError::AlreadyExists("a".into()), Code::AlreadyExists),
            (
                NodeError::FailedPrecondition("a".into()),
                Code::FailedPrecondition,
            ),
            (NodeError::Busy("a".into()), Code::Aborted),
            (NodeError::NoRoom("a".into()), Code::ResourceExhausted),
            (NodeError::Unavailable("a".into()), Code::Unavailable),
            (NodeError::Internal("a".into()), Code::Internal),
            (
                NodeError::Mounter {
                    code: Code::PermissionDenied,
                    message: "a".into(),
                },
                Code::PermissionDenied,
            ),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, "a"));
        }
    }

    #[test]
    fn an_io_error_says_what_failed_and_whether_a_retry_helps() {
        let e = NodeError::io(
            "unmounting /t",
            io::Error::from_raw_os_error(libc::ENOTCONN),
        );
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().starts_with("unmounting /t: "), "{e}");
        let full = NodeError::io("writing x", io::Error::from(io::ErrorKind::StorageFull));
        assert_eq!(full.code(), Code::ResourceExhausted);
        let denied = NodeError::io("creating /t", io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(denied.code(), Code::Internal);
        assert_eq!(
            NodeError::io("x", io::Error::from_raw_os_error(libc::EIO)).code(),
            Code::Unavailable
        );
    }
}
