//! The registration socket's HTTP/2 front: gives kubelet's requests an `:authority` our gRPC
//! server accepts.
//!
//! kubelet's plugin watcher dials a registration socket with grpc-go, giving the bare socket
//! path as the dial target (`grpc.DialContext(ctx, "/var/lib/kubelet/plugins_registry/x-reg.sock",
//! WithContextDialer(unix))`). grpc-go sends the target as the HTTP/2 `:authority`, so every
//! request kubelet makes carries a path there, `/` and all. The `h2` crate under tonic and hyper
//! checks `:authority` as a URI authority and resets a stream whose authority is not one with
//! `PROTOCOL_ERROR`: kubelet sees "stream terminated by RST_STREAM with error code:
//! PROTOCOL_ERROR" on every `GetInfo` and never registers the plugin (kubernetes/kubernetes
//! #108254 and #109081, hyperium/h2 #487). The upstream node-driver-registrar does not meet this
//! because grpc-go's server does not check the authority. Our CSI socket does not meet it either:
//! kubelet's CSI client dials `unix://…`, which grpc-go sends as `localhost`.
//!
//! **Why a front and not a setting.** h2 has no lenient mode: the check sits in the server's
//! request conversion with no option to relax it, and nothing above h2 (hyper, tonic, a tower
//! layer) ever sees the request, since h2 resets the stream before it makes one. Patching h2
//! through `[patch.crates-io]` would change every HTTP/2 server and client in the workspace (the
//! CSI socket, the cache workers, the kube client) for the sake of one socket, and leave us a fork
//! to carry. Serving the registration API with grpc-go is not an option in a Rust process.
//!
//! **What the front does.** The registrar accepts kubelet's connections itself and joins each to
//! the tonic server over an in-process pipe (no second socket file). Bytes from the server go to
//! kubelet untouched. Bytes from kubelet are read as HTTP/2 frames: every frame but a header
//! block passes byte for byte; each header block (a `HEADERS` frame and its `CONTINUATION`s) is
//! decoded with kubelet's HPACK state, an `:authority` that is not a valid authority becomes
//! `localhost`, and the block is encoded anew as plain literals that are never indexed.
//!
//! **Why every block is encoded anew, not only the ones rewritten.** HPACK is stateful: a header
//! block may refer to entries that earlier blocks added to the decoder's dynamic table, and a
//! second request on a connection usually sends its `:authority` as such a reference. The front's
//! decoder follows kubelet's encoder, so it resolves those references; the server's decoder sees
//! only what the front sends. Because the front never adds to the server's table (no indexed
//! literals, no table size updates), the server's table stays empty and in step with the front,
//! whatever kubelet's table holds. Passing some blocks through unchanged would put kubelet's
//! entries into the server's table without the rewritten ones, and the two would drift apart. The
//! other direction needs nothing: the server's encoder and kubelet's decoder talk to each other
//! directly, and a `SETTINGS_HEADER_TABLE_SIZE` from kubelet only sizes that server encoder.
//!
//! **Bounds.** A header block is buffered whole before it is decoded, so it may hold at most
//! [`MAX_HEADER_BLOCK`] bytes, and its decoded headers as much again (references into the
//! dynamic table expand); a block over either ends the connection, as does a client that asks
//! for a larger dynamic table than the server allows. Other frames are streamed, not
//! buffered, and their 24-bit length caps each at 16 MiB. A client that does not open with the
//! HTTP/2 preface, interrupts a header block with another frame or sends a block HPACK cannot
//! decode is cut off too; h2 would end such a connection anyway.

use std::io;

use futures::Stream;
use loona_hpack::Decoder;
use loona_hpack::decoder::DecoderError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{UnixListener, UnixStream};

/// What an HTTP/2 client sends first.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The most a header block may take, as sent and as decoded.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The authority given to requests whose own is not one.
pub const STAND_IN_AUTHORITY: &[u8] = b"localhost";

/// The frames the front sends are at most this long: the least `SETTINGS_MAX_FRAME_SIZE` a peer
/// may set, so it holds whatever the server sets.
const MAX_FRAME_OUT: usize = 16_384;
/// The server's `SETTINGS_HEADER_TABLE_SIZE`: HTTP/2's default, which h2 keeps unless told.
const HEADER_TABLE_SIZE: usize = 4096;
/// Bytes the in-process pipe to the server holds in each direction.
const PIPE_BUFFER: usize = 64 * 1024;
/// Pause after a failed accept, so that a lasting failure (no file descriptors) does not spin.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why the front cut a client off.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("the client did not open with the HTTP/2 connection preface")]
    Preface,
    #[error("the header block of stream {stream} exceeds {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge { stream: u32 },
    #[error("the headers of stream {stream} exceed {MAX_HEADER_BLOCK} bytes once decoded")]
    HeadersTooLarge { stream: u32 },
    #[error("a frame of type {kind:#x} interrupted the header block of stream {stream}")]
    Interrupted { kind: u8, stream: u32 },
    #[error("a CONTINUATION frame on stream {stream} follows no open header block")]
    StrayContinuation { stream: u32 },
    #[error("a malformed HEADERS frame on stream {stream}: {what}")]
    Malformed { stream: u32, what: &'static str },
    #[error("cannot decode the header block of stream {stream}: {source}")]
    Hpack { stream: u32, source: DecoderError },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The connections accepted on `listener`, each fronted, as the server's ends of their pipes.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<DuplexStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let next = match listener.accept().await {
            Ok((conn, _)) => {
                let (front, server) = tokio::io::duplex(PIPE_BUFFER);
                tokio::spawn(async move {
                    match relay(conn, front).await {
                        Ok(()) => {}
                        // A client gone without a goodbye is no news.
                        Err(e @ FrontError::Io(_)) => {
                            tracing::debug!(error = %e, "a connection on the registration socket failed")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "closed a connection on the registration socket")
                        }
                    }
                });
                Ok(server)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept on the registration socket");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                Err(e)
            }
        };
        Some((next, listener))
    })
}

/// Joins one client to the server until either ends; see the module doc.
pub async fn relay<S>(client: UnixStream, server: S) -> Result<(), FrontError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, server_tx) = tokio::io::split(server);
    let up = forward_client(client_rx, server_tx);
    let down = async {
        let copied = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
        copied
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => {
            // The client is done sending; let the server finish its answers.
            r?;
            let _ = down.await;
            Ok(())
        }
        // The server ended the connection; nothing more can be answered.
        _ = &mut down => Ok(()),
    }
}

/// Copies the client's side of one connection to the server, with every header block decoded
/// and encoded anew (see the module doc). Ends at the client's end of stream, shutting down
/// `to`; returns how many `:authority` values it replaced.
pub async fn forward_client<R, W>(mut from: R, mut to: W) -> Result<u64, FrontError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    match from.read_exact(&mut preface).await {
        Ok(_) if &preface == PREFACE => {}
        Ok(_) => return Err(FrontError::Preface),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrontError::Preface),
        Err(e) => return Err(e.into()),
    }
    to.write_all(PREFACE).await?;
    let mut blocks = HeaderBlocks::default();
    let mut head = [0u8; FRAME_HEADER];
    loop {
        // The client may end only between frames.
        let first = from.read(&mut head).await?;
        if first == 0 {
            break;
        }
        from.read_exact(&mut head[first..]).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if kind == HEADERS || kind == CONTINUATION || blocks.open.is_some() {
            // Checked before reading, so that the limit also bounds what is buffered.
            if blocks.buffered() + len > MAX_HEADER_BLOCK {
                return Err(FrontError::BlockTooLarge { stream });
            }
            let mut payload = vec![0u8; len];
            from.read_exact(&mut payload).await?;
            if let Some(frames) = blocks.frame(kind, flags, stream, payload)? {
                to.write_all(&frames).await?;
            }
        } else {
            to.write_all(&head).await?;
            let copied = tokio::io::copy(&mut (&mut from).take(len as u64), &mut to).await?;
            if copied < len as u64 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
        to.flush().await?;
    }
    to.shutdown().await?;
    Ok(blocks.replaced)
}

/// The client's header blocks: its HPACK decoder and the block being received.
struct HeaderBlocks {
    decoder: Decoder<'static>,
    open: Option<OpenBlock>,
    replaced: u64,
}

impl Default for HeaderBlocks {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        // The table size the server allows the client (tonic leaves h2's default): a client that
        // asks for more is refused, as the server would refuse it, so the front's copy of the
        // client's table stays as small as the server's would be.
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            decoder,
            open: None,
            replaced: 0,
        }
    }
}

/// A header block whose `HEADERS` frame came without `END_HEADERS`.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl HeaderBlocks {
    fn buffered(&self) -> usize {
        self.open.as_ref().map_or(0, |b| b.fragment.len())
    }

    /// Takes a `HEADERS` or `CONTINUATION` frame (or, while a block is open, any frame); returns
    /// the frames to send once the block is complete.
    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        mut payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, FrontError> {
        if let Some(open) = &mut self.open {
            if kind != CONTINUATION || stream != open.stream {
                return Err(FrontError::Interrupted {
                    kind,
                    stream: open.stream,
                });
            }
            open.fragment.append(&mut payload);
        } else if kind == CONTINUATION {
            return Err(FrontError::StrayContinuation { stream });
        } else {
            let malformed = |what| FrontError::Malformed { stream, what };
            if stream == 0 {
                return Err(malformed("stream 0"));
            }
            let mut start = 0;
            if flags & PADDED != 0 {
                let pad = *payload.first().ok_or(malformed("no pad length"))? as usize;
                start = 1;
                if start + pad > payload.len() {
                    return Err(malformed("padding longer than the frame"));
                }
                payload.truncate(payload.len() - pad);
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let fields = payload
                    .get(start..start + 5)
                    .ok_or(malformed("no priority fields"))?;
                priority = Some(fields.try_into().expect("5 bytes"));
                start += 5;
            }
            payload.drain(..start);
            self.open = Some(OpenBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: payload,
            });
        }
        if flags & END_HEADERS == 0 {
            return Ok(None);
        }
        let block = self.open.take().expect("a block is open");
        self.reencode(block).map(Some)
    }

    /// Decodes a complete block, replaces an invalid `:authority`, and frames it anew.
    fn reencode(&mut self, block: OpenBlock) -> Result<Vec<u8>, FrontError> {
        let stream = block.stream;
        let mut headers = Vec::new();
        let mut size = 0;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            // Counted as HTTP/2 counts a header list (RFC 9113 §6.5.2): 32 bytes each beside
            // name and value. Past the limit headers are only counted, never copied.
            size += name.len() + value.len() + 32;
            if size <= MAX_HEADER_BLOCK {
                headers.push((name.into_owned(), value.into_owned()));
            }
        });
        decoded.map_err(|source| FrontError::Hpack { stream, source })?;
        if size > MAX_HEADER_BLOCK {
            return Err(FrontError::HeadersTooLarge { stream });
        }
        let mut encoded = Vec::with_capacity(size);
        for (name, value) in &mut headers {
            if name == b":authority" && http::uri::Authority::try_from(&value[..]).is_err() {
                tracing::debug!(
                    stream,
                    authority = %String::from_utf8_lossy(value),
                    "gave a request with an invalid :authority the authority localhost"
                );
                *value = STAND_IN_AUTHORITY.to_vec();
                self.replaced += 1;
            }
            encode_literal(name, value, &mut encoded);
        }
        // The priority fields lead the HEADERS frame's payload; the block follows, split over
        // CONTINUATION frames where it does not fit.
        let mut payload = block.priority.map(Vec::from).unwrap_or_default();
        payload.append(&mut encoded);
        let flags = if block.end_stream { END_STREAM } else { 0 }
            | if block.priority.is_some() {
                PRIORITY
            } else {
                0
            };
        let mut out = Vec::with_capacity(payload.len() + 64);
        let mut chunks = payload.chunks(MAX_FRAME_OUT).peekable();
        let (mut kind, mut flags) = (HEADERS, flags);
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let end = chunks.peek().is_none();
            push_frame(
                &mut out,
                kind,
                flags | if end { END_HEADERS } else { 0 },
                stream,
                chunk,
            );
            if end {
                break;
            }
            (kind, flags) = (CONTINUATION, 0);
        }
        Ok(out)
    }
}

/// One header as a literal without indexing and with a literal name, no Huffman coding
/// (RFC 7541 §6.2.2): nothing the receiver keeps, so its dynamic table stays empty.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_length(s.len(), out);
        out.extend_from_slice(s);
    }
}

/// A string length with a 7-bit prefix and the Huffman bit clear (RFC 7541 §5.1, §5.2).
fn encode_length(mut n: usize, out: &mut Vec<u8>) {
    if n < 0x7f {
        out.push(n as u8);
        return;
    }
    out.push(0x7f);
    n -= 0x7f;
    while n >= 0x80 {
        out.push((n % 0x80) as u8 | 0x80);
        n /= 0x80;
    }
    out.push(n as u8);
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use httlib_hpack::Encoder;

    const SOCKET: &str = "/var/lib/kubelet/plugins_registry/csi.lakecache.io-reg.sock";

    /// How grpc-go's encoder (golang.org/x/net/http2/hpack) writes a header: from the tables
    /// where it can, otherwise a literal it adds to the dynamic table, Huffman-coded.
    const GRPC_GO: u8 = Encoder::HUFFMAN_NAME
        | Encoder::HUFFMAN_VALUE
        | Encoder::WITH_INDEXING
        | Encoder::BEST_FORMAT;

    fn request(method: &str, authority: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "POST".into()),
            (":scheme", "http".into()),
            (
                ":path",
                format!("/pluginregistration.Registration/{method}"),
            ),
            (":authority", authority.into()),
            ("content-type", "application/grpc".into()),
            ("user-agent", "grpc-go/1.72.0".into()),
            ("te", "trailers".into()),
            ("grpc-timeout", "9999983u".into()),
        ]
    }

    fn encode(enc: &mut Encoder<'_>, headers: &[(&str, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in headers {
            enc.encode(
                (n.as_bytes().to_vec(), v.as_bytes().to_vec(), GRPC_GO),
                &mut out,
            )
            .unwrap();
        }
        out
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_frame(&mut out, kind, flags, stream, payload);
        out
    }

    /// An empty SETTINGS frame and a gRPC message with no fields, closing the stream.
    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])
    }
    fn empty_message(stream: u32) -> Vec<u8> {
        frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0])
    }

    async fn forward(input: &[u8]) -> Result<(Vec<u8>, u64), FrontError> {
        let mut out = Vec::new();
        let replaced = forward_client(input, &mut out).await?;
        Ok((out, replaced))
    }

    #[derive(Debug, PartialEq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    /// The frames after the preface.
    fn frames(out: &[u8]) -> Vec<Frame> {
        assert_eq!(&out[..24], PREFACE);
        let mut rest = &out[24..];
        let mut frames = vec![];
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            frames.push(Frame {
                kind: rest[3],
                flags: rest[4],
                stream: u32::from_be_bytes(rest[5..9].try_into().unwrap()),
                payload: rest[9..9 + len].to_vec(),
            });
            rest = &rest[9 + len..];
        }
        frames
    }

    /// What the front must send for `headers`: plain literals, nothing indexed.
    fn plain(headers: &[(&str, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in headers {
            encode_literal(n.as_bytes(), v.as_bytes(), &mut out);
        }
        out
    }

    fn with_authority(
        mut headers: Vec<(&'static str, String)>,
        a: &str,
    ) -> Vec<(&'static str, String)> {
        headers
            .iter_mut()
            .find(|(n, _)| *n == ":authority")
            .unwrap()
            .1 = a.into();
        headers
    }

    #[tokio::test]
    async fn kubelets_requests_get_localhost_and_the_dynamic_table_is_followed() {
        let mut enc = Encoder::default();
        let get_info = request("GetInfo", SOCKET);
        let notify = request("NotifyRegistrationStatus", SOCKET);
        let first = encode(&mut enc, &get_info);
        let second = encode(&mut enc, &notify);
        // As grpc-go sends them: the path Huffman-coded, the second request mostly references
        // to what the first added to the dynamic table, its authority among them.
        assert!(!first.windows(SOCKET.len()).any(|w| w == SOCKET.as_bytes()));
        assert!(
            second.len() * 2 < first.len(),
            "{} {}",
            first.len(),
            second.len()
        );
        assert_eq!(
            Decoder::new().decode(&second),
            Err(DecoderError::HeaderIndexOutOfBounds),
            "the second block stands alone"
        );

        let mut input = PREFACE.to_vec();
        input.extend(settings());
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(empty_message(1));
        input.extend(frame(0x4, 0x1, 0, &[])); // a SETTINGS ack
        input.extend(frame(HEADERS, END_HEADERS, 3, &second));
        input.extend(empty_message(3));
        let (out, replaced) = forward(&input).await.unwrap();
        assert_eq!(replaced, 2);
        let out = frames(&out);
        let expect = [
            Frame {
                kind: 0x4,
                flags: 0,
                stream: 0,
                payload: vec![0, 3, 0, 0, 0, 100],
            },
            Frame {
                kind: HEADERS,
                flags: END_HEADERS,
                stream: 1,
                payload: plain(&with_authority(get_info.clone(), "localhost")),
            },
            Frame {
                kind: 0x0,
                flags: END_STREAM,
                stream: 1,
                payload: vec![0; 5],
            },
            Frame {
                kind: 0x4,
                flags: 0x1,
                stream: 0,
                payload: vec![],
            },
            Frame {
                kind: HEADERS,
                flags: END_HEADERS,
                stream: 3,
                payload: plain(&with_authority(notify.clone(), "localhost")),
            },
            Frame {
                kind: 0x0,
                flags: END_STREAM,
                stream: 3,
                payload: vec![0; 5],
            },
        ];
        assert_eq!(out, expect);

        // The server's decoder, fed only what the front sent, reads the right headers from
        // blocks that never touch its table.
        let mut server = Decoder::new();
        for (f, want) in [(&out[1], &get_info), (&out[4], &notify)] {
            let got = server.decode(&f.payload).unwrap();
            let got: Vec<_> = got
                .iter()
                .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v)))
                .collect();
            let want: Vec<_> = with_authority(want.clone(), "localhost")
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        for authority in ["localhost", "unix.invalid", "127.0.0.1:10000", "[::1]:80"] {
            let headers = request("GetInfo", authority);
            let block = encode(&mut Encoder::default(), &headers);
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &block));
            let (out, replaced) = forward(&input).await.unwrap();
            assert_eq!(replaced, 0, "{authority}");
            assert_eq!(frames(&out)[0].payload, plain(&headers), "{authority}");
        }
        for bad in ["", "/tmp/x.sock", "a b", "unix:///run/x.sock"] {
            let block = encode(&mut Encoder::default(), &request("GetInfo", bad));
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &block));
            assert_eq!(forward(&input).await.unwrap().1, 1, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_block_over_continuation_frames_is_joined() {
        let headers = request("GetInfo", SOCKET);
        let block = encode(&mut Encoder::default(), &headers);
        let (a, rest) = block.split_at(7);
        let (b, c) = rest.split_at(20);
        let mut input = PREFACE.to_vec();
        // The stream ends with this block (a request without a body).
        input.extend(frame(HEADERS, END_STREAM, 5, a));
        input.extend(frame(CONTINUATION, 0, 5, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, c));
        input.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0])); // WINDOW_UPDATE, passed as it is
        let (out, replaced) = forward(&input).await.unwrap();
        assert_eq!(replaced, 1);
        assert_eq!(
            frames(&out),
            [
                Frame {
                    kind: HEADERS,
                    flags: END_STREAM | END_HEADERS,
                    stream: 5,
                    payload: plain(&with_authority(headers, "localhost")),
                },
                Frame {
                    kind: 0x8,
                    flags: 0,
                    stream: 0,
                    payload: vec![0, 0, 0x10, 0]
                },
            ]
        );
    }

    #[tokio::test]
    async fn padding_goes_and_priority_stays() {
        let headers = request("GetInfo", SOCKET);
        let block = encode(&mut Encoder::default(), &headers);
        let priority = [0x80, 0, 0, 3, 15];
        let mut payload = vec![7];
        payload.extend(priority);
        payload.extend(&block);
        payload.extend([0; 7]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_HEADERS, 1, &payload));
        let (out, _) = forward(&input).await.unwrap();
        let mut want = priority.to_vec();
        want.extend(plain(&with_authority(headers, "localhost")));
        assert_eq!(
            frames(&out),
            [Frame {
                kind: HEADERS,
                flags: PRIORITY | END_HEADERS,
                stream: 1,
                payload: want
            }]
        );

        // Padding alone, and padding longer than the frame.
        let mut payload = vec![3];
        payload.extend(&block);
        payload.extend([0; 3]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &payload));
        assert_eq!(forward(&input).await.unwrap().1, 1);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]));
        assert!(matches!(
            forward(&input).await,
            Err(FrontError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn a_block_longer_than_a_frame_is_split() {
        let mut headers = request("GetInfo", SOCKET);
        headers.push(("x-big", "v".repeat(40_000)));
        let block = encode(&mut Encoder::default(), &headers);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (out, _) = forward(&input).await.unwrap();
        let out = frames(&out);
        let shape: Vec<_> = out
            .iter()
            .map(|f| (f.kind, f.flags, f.payload.len()))
            .collect();
        let want = plain(&with_authority(headers, "localhost"));
        assert_eq!(
            shape,
            [
                (HEADERS, 0, MAX_FRAME_OUT),
                (CONTINUATION, 0, MAX_FRAME_OUT),
                (CONTINUATION, END_HEADERS, want.len() - 2 * MAX_FRAME_OUT),
            ]
        );
        let joined: Vec<u8> = out.into_iter().flat_map(|f| f.payload).collect();
        assert_eq!(joined, want);
        let decoded = Decoder::new().decode(&joined).unwrap();
        assert_eq!(decoded.last().unwrap().1.len(), 40_000);
    }

    #[tokio::test]
    async fn what_ends_a_connection() {
        let with_preface = |frames: &[Vec<u8>]| {
            let mut input = PREFACE.to_vec();
            frames.iter().for_each(|f| input.extend(f));
            input
        };
        // Not HTTP/2, or cut short.
        assert!(matches!(
            forward(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
            Err(FrontError::Preface)
        ));
        assert!(matches!(
            forward(&PREFACE[..10]).await,
            Err(FrontError::Preface)
        ));
        let cut = with_preface(&[settings()]);
        assert!(matches!(
            forward(&cut[..cut.len() - 2]).await,
            Err(FrontError::Io(_))
        ));
        // A header block over the bound, said by the frame's length alone.
        let mut head = vec![0x01, 0x00, 0x01, HEADERS, 0, 0, 0, 0, 1];
        head.extend([0; 16]);
        assert!(matches!(
            forward(&with_preface(&[head])).await,
            Err(FrontError::BlockTooLarge { stream: 1 })
        ));
        // Or over it across CONTINUATION frames.
        let big = vec![0; 40_000];
        assert!(matches!(
            forward(&with_preface(&[
                frame(HEADERS, 0, 1, &big),
                frame(CONTINUATION, 0, 1, &big)
            ]))
            .await,
            Err(FrontError::BlockTooLarge { stream: 1 })
        ));
        // Small blocks that decode to much: one 4000-byte entry in the dynamic table, then
        // references to it.
        let mut enc = Encoder::default();
        let mut block = encode(&mut enc, &[("x-big", "v".repeat(4000))]);
        block.extend(std::iter::repeat_n(0x80 | 62, 20));
        assert!(block.len() < 4100);
        assert!(matches!(
            forward(&with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)])).await,
            Err(FrontError::HeadersTooLarge { stream: 1 })
        ));
        // A header block interrupted, a CONTINUATION out of place, and what HPACK cannot decode.
        assert!(matches!(
            forward(&with_preface(&[
                frame(HEADERS, 0, 1, &[0x82]),
                empty_message(1)
            ]))
            .await,
            Err(FrontError::Interrupted { kind: 0, stream: 1 })
        ));
        assert!(matches!(
            forward(&with_preface(&[
                frame(HEADERS, 0, 1, &[0x82]),
                frame(CONTINUATION, END_HEADERS, 3, &[])
            ]))
            .await,
            Err(FrontError::Interrupted {
                kind: CONTINUATION,
                stream: 1
            })
        ));
        assert!(matches!(
            forward(&with_preface(&[frame(
                CONTINUATION,
                END_HEADERS,
                1,
                &[0x82]
            )]))
            .await,
            Err(FrontError::StrayContinuation { stream: 1 })
        ));
        // (A table size update past the server's 4096 bytes, one left unfinished, an index
        // past both tables, a Huffman string that is not one.)
        for bad in [
            &[0x3f, 0xe2, 0x1f, 0x82][..],
            &[0x3f],
            &[0x80 | 70],
            &[0x00, 0x85, 0xff],
        ] {
            assert!(
                matches!(
                    forward(&with_preface(&[frame(HEADERS, END_HEADERS, 1, bad)])).await,
                    Err(FrontError::Hpack { stream: 1, .. })
                ),
                "{bad:x?}"
            );
        }
    }
}
