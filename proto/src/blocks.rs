//! The block transport's wire format: block bytes beside gRPC, on the worker's gRPC port.
//!
//! gRPC carries a block as protobuf messages in HTTP/2 frames: the worker copies the block into
//! its encode buffer and the socket, the reader out of the socket, through its decoder, and
//! joins the chunks into one buffer. The block transport carries the same request and the same
//! answers (heartbeats while the block is not ready, the block's tier, the same error codes and
//! metadata) with plain framing, so that the worker can hand a Memory tier file to the kernel
//! (`sendfile`) and the reader receives the block straight into the one buffer its FUSE replies
//! are made from.
//!
//! A connection starts with [`PREFACE`] from the reader; the worker answers with the same
//! bytes, which tells the reader that the worker speaks this transport (a worker that does not
//! answers with HTTP/2). The worker tells the two apart by the first byte, so both share one
//! port. Then, one request at a time:
//!
//! ```text
//! reader: [Q][len u32 LE][BlockRequest]
//! worker: [B][0u32]*                                   heartbeats, the first at once
//!         [D][len][BlockData] + BlockData.length raw bytes
//!      or [F][len][BlockFailure]
//! ```
//!
//! After a data frame's bytes or a failure frame the connection takes the next request; any
//! error, or a frame that breaks these rules, closes it.

use prost::Message;

use crate::lakecache::v1::{BlockFailure, NOT_CACHED_KEY, SOURCE_ERROR_KEY};

/// The first bytes of a block transport connection, in both directions. It cannot begin an
/// HTTP/2 connection, whose preface starts with `PRI`.
pub const PREFACE: [u8; 8] = *b"LCBLK/1\n";

/// Bytes of a frame header: its kind and the length of its payload.
pub const HEADER: usize = 5;

/// The largest payload of a frame (the raw bytes after a data frame are not a payload).
pub const MAX_FRAME: usize = 64 << 10;

/// The longest message a failure frame carries; a longer one is cut, so that every failure
/// frame stays far below [`MAX_FRAME`].
pub const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A reader's [`crate::lakecache::v1::BlockRequest`].
    Request,
    /// The worker is alive and at work on the block; no payload.
    Beat,
    /// A [`crate::lakecache::v1::BlockData`], followed by the block's bytes.
    Data,
    /// A [`BlockFailure`]: the request's answer is an error.
    Failure,
}

impl FrameKind {
    pub fn byte(self) -> u8 {
        match self {
            FrameKind::Request => b'Q',
            FrameKind::Beat => b'B',
            FrameKind::Data => b'D',
            FrameKind::Failure => b'F',
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'Q' => FrameKind::Request,
            b'B' => FrameKind::Beat,
            b'D' => FrameKind::Data,
            b'F' => FrameKind::Failure,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    UnknownKind(u8),
    TooLarge(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::UnknownKind(b) => write!(f, "unknown frame kind {b:#04x}"),
            FrameError::TooLarge(n) => {
                write!(f, "a frame of {n} bytes; at most {MAX_FRAME} are allowed")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// A frame: its header and `msg` encoded.
pub fn frame(kind: FrameKind, msg: &impl Message) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(HEADER + len);
    out.push(kind.byte());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(&mut out).expect("a Vec grows");
    out
}

/// A heartbeat frame.
pub const BEAT: [u8; HEADER] = [b'B', 0, 0, 0, 0];

/// A frame header's kind and payload length.
pub fn parse_header(h: [u8; HEADER]) -> Result<(FrameKind, usize), FrameError> {
    let kind = FrameKind::from_byte(h[0]).ok_or(FrameError::UnknownKind(h[0]))?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len))
}

impl BlockFailure {
    /// What a ReadBlock call would have answered with `status`, its message cut at
    /// [`MAX_MESSAGE`] bytes.
    pub fn from_status(status: &tonic::Status) -> Self {
        let mut message = status.message();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message = &message[..cut];
        }
        BlockFailure {
            code: status.code() as i32,
            message: message.to_string(),
            source_error: status.metadata().get(SOURCE_ERROR_KEY).is_some(),
            not_cached: status.metadata().get(NOT_CACHED_KEY).is_some(),
        }
    }

    /// The status a ReadBlock call would have failed with, metadata included.
    pub fn into_status(self) -> tonic::Status {
        let mut s = tonic::Status::new(tonic::Code::from_i32(self.code), self.message);
        if self.source_error {
            s.metadata_mut()
                .insert(SOURCE_ERROR_KEY, "1".parse().expect("ascii"));
        }
        if self.not_cached {
            s.metadata_mut()
                .insert(NOT_CACHED_KEY, "1".parse().expect("ascii"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lakecache::v1::{BlockData, BlockRequest, ReadBlockRequest};

    #[test]
    fn frames_round_trip() {
        let req = BlockRequest {
            authorization: "Bearer t".into(),
            read: Some(ReadBlockRequest {
                block_size: 4 << 20,
                ..Default::default()
            }),
        };
        let f = frame(FrameKind::Request, &req);
        let (kind, len) = parse_header(f[..HEADER].try_into().unwrap()).unwrap();
        assert_eq!(kind, FrameKind::Request);
        assert_eq!(len, f.len() - HEADER);
        assert_eq!(BlockRequest::decode(&f[HEADER..]).unwrap(), req);
        let d = frame(
            FrameKind::Data,
            &BlockData {
                served_from: 1,
                offset: 0,
                length: 7,
            },
        );
        assert_eq!(d[0], b'D');
        assert_eq!(parse_header(BEAT).unwrap(), (FrameKind::Beat, 0));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(parse_header(*b"PRI *"), Err(FrameError::UnknownKind(b'P')));
        let mut h = [b'D', 0, 0, 0, 0];
        h[1..].copy_from_slice(&((MAX_FRAME + 1) as u32).to_le_bytes());
        assert_eq!(parse_header(h), Err(FrameError::TooLarge(MAX_FRAME + 1)));
        assert_ne!(PREFACE[0], b'P', "the preface must not look like HTTP/2's");
    }

    #[test]
    fn failures_keep_code_and_metadata() {
        let mut s = tonic::Status::not_found("block not cached here");
        s.metadata_mut()
            .insert(NOT_CACHED_KEY, "1".parse().unwrap());
        let back = BlockFailure::from_status(&s).into_status();
        assert_eq!(back.code(), tonic::Code::NotFound);
        assert_eq!(back.message(), "block not cached here");
        assert!(back.metadata().get(NOT_CACHED_KEY).is_some());
        assert!(back.metadata().get(SOURCE_ERROR_KEY).is_none());
        // A long message is cut on a character boundary.
        let long = tonic::Status::internal("é".repeat(MAX_MESSAGE));
        let cut = BlockFailure::from_status(&long).message;
        assert!(cut.len() <= MAX_MESSAGE && cut.len() > MAX_MESSAGE - 2);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
