//! The registrar as kubelet sees it: the real `lakecache-csi-node registrar` process beside the
//! real plugin process, dialled over its registration socket with real gRPC the way kubelet's
//! plugin watcher does (GetInfo, then NotifyRegistrationStatus), its admin server, SIGTERM, a
//! refusal, and a plugin that never answers (no socket, and a socket that accepts and hangs).
//! kubelet's own client, grpc-go, is stood in for by raw HTTP/2 frames that carry what it sends:
//! the socket's path as `:authority`, headers Huffman-coded and indexed in HPACK's dynamic table.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lakecache_csi_node::{CSI_DRIVER, unix_channel};
use lakecache_proto::pluginregistration::registration_client::RegistrationClient;
use lakecache_proto::pluginregistration::{InfoRequest, RegistrationStatus};
use lakecache_proto::pluginregistration::{PluginInfo, RegistrationStatusResponse};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prost::Message;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// The plugin's socket as kubelet would dial it on the host (the registrar only reports it).
const HOST_ENDPOINT: &str = "/var/lib/kubelet/plugins/csi.lakecache.io/csi.sock";
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(20);

/// A registrar process, killed when dropped; its stderr goes to a file.
struct Registrar {
    child: Option<Child>,
    stderr: PathBuf,
    admin_port: u16,
}

impl Registrar {
    fn start(dir: &Path, name: &str, csi_socket: &Path, reg_dir: &Path, timeout: &str) -> Self {
        let stderr = dir.join(format!("{name}.stderr"));
        let admin_port = free_port();
        let child = Command::new(BIN)
            .arg("registrar")
            .arg("--csi-address")
            .arg(csi_socket)
            .args(["--kubelet-registration-path", HOST_ENDPOINT])
            .arg("--registration-dir")
            .arg(reg_dir)
            .args(["--csi-timeout", timeout])
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting the registrar");
        Self {
            child: Some(child),
            stderr,
            admin_port,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for the process to end, at most `limit`.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the registrar did not exit within {limit:?}; stderr:\n{}",
            self.stderr()
        );
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> String {
        http_get(self.admin_port, path).await
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The HTTP status code of a raw response.
fn status_code(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A client of the registration socket, as kubelet dials it.
fn kubelet_client(socket: &Path) -> RegistrationClient<Channel> {
    RegistrationClient::new(unix_channel(socket, Duration::from_secs(2)))
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_registers_the_plugin_through_the_registrar() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    // The registrar starts first, as it may in the pod: it waits for the plugin.
    let reg_dir = root.path().join("plugins_registry");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let mut reg = Registrar::start(root.path(), "first", &node.socket, &reg_dir, "30s");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(reg.running(), "the registrar gave up: {}", reg.stderr());
    node.start_plugin();

    // kubelet's plugin watcher finds the socket: <driver>-reg.sock, a unix socket, private.
    let socket = reg_dir.join(format!("{CSI_DRIVER}-reg.sock"));
    eventually(STEP, "the registration socket", || {
        is_socket(&socket).then_some(())
    })
    .await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "registration socket mode {mode:o}");
    let names: Vec<_> = std::fs::read_dir(&reg_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "the registry holds {names:?}");

    // Live but not ready before kubelet said anything.
    assert_eq!(status_code(&reg.get("/livez").await), 200);
    assert_eq!(status_code(&reg.get("/readyz").await), 503);

    // GetInfo, as kubelet asks it.
    let mut kubelet = kubelet_client(&socket);
    let info = bounded("GetInfo", kubelet.get_info(InfoRequest {}))
        .await
        .expect("GetInfo")
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, CSI_DRIVER);
    assert_eq!(info.endpoint, HOST_ENDPOINT);
    assert_eq!(info.supported_versions, ["1.0.0"]);

    // Registered: the registrar keeps running, becomes ready and keeps answering GetInfo
    // (kubelet's periodic health check).
    bounded(
        "NotifyRegistrationStatus(true)",
        kubelet.notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        }),
    )
    .await
    .expect("NotifyRegistrationStatus(true)");
    let mut ready = false;
    let deadline = Instant::now() + STEP;
    while !ready && Instant::now() < deadline {
        ready = status_code(&reg.get("/readyz").await) == 200;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz not 200 after registration");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(reg.running(), "the registrar stopped: {}", reg.stderr());
    bounded("GetInfo again", kubelet.get_info(InfoRequest {}))
        .await
        .expect("GetInfo after registration");
    let metrics = reg.get("/metrics").await;
    assert!(
        metrics.contains("lakecache_csi_registrar_registered 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"lakecache_csi_registrar_kubelet_calls_total{method="GetInfo"} 2"#),
        "{metrics}"
    );
    let log = reg.stderr();
    assert!(
        log.contains("waiting for the CSI plugin to answer GetPluginInfo"),
        "{log}"
    );
    assert!(log.contains("kubelet registered the CSI plugin"), "{log}");

    // SIGTERM: a clean exit that unregisters (the socket goes).
    drop(kubelet);
    kill(reg.pid(), Signal::SIGTERM).unwrap();
    let status = reg.exit(STEP).await;
    assert!(
        status.success(),
        "exit after SIGTERM: {status}: {}",
        reg.stderr()
    );
    assert!(!socket.exists(), "the registration socket outlived SIGTERM");

    // A stale socket (a registrar killed with SIGKILL leaves one) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(is_socket(&socket));
    let mut second = Registrar::start(root.path(), "second", &node.socket, &reg_dir, "30s");
    let mut kubelet = kubelet_client(&socket);
    let mut answered = None;
    let deadline = Instant::now() + STEP;
    while answered.is_none() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), kubelet.get_info(InfoRequest {})).await {
            Ok(Ok(r)) => answered = Some(r.into_inner()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let info = answered.unwrap_or_else(|| {
        panic!(
            "the second registrar did not answer on the stale path: {}",
            second.stderr()
        )
    });
    assert_eq!(info.name, CSI_DRIVER);

    // kubelet refuses: the registrar exits non-zero with kubelet's reason and removes its socket,
    // so the container restarts and kubelet tries again.
    let answer = bounded(
        "NotifyRegistrationStatus(false)",
        kubelet.notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "boom".into(),
        }),
    )
    .await;
    let status = second.exit(STEP).await;
    let log = second.stderr();
    assert!(!status.success(), "exit after a refusal: {status}: {log}");
    assert!(
        answer.is_ok(),
        "kubelet got no answer to its refusal: {answer:?}"
    );
    assert!(
        log.contains(&format!(
            "Error: kubelet did not register the CSI plugin {CSI_DRIVER}: boom"
        )),
        "{log}"
    );
    assert!(
        !socket.exists(),
        "the registration socket outlived the refusal"
    );
}

/// An HTTP/2 client written frame by frame, sending what kubelet's grpc-go sends: it dials the
/// registration socket by its bare path, which grpc-go gives as each request's `:authority`, and
/// encodes headers as golang.org/x/net/http2/hpack does (from the tables where it can, otherwise
/// Huffman-coded literals added to the dynamic table, so a second request refers to the first).
struct GrpcGoClient {
    conn: tokio::net::UnixStream,
    authority: String,
    encoder: httlib_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    next_stream: u32,
}

/// The answer to one call: its header blocks (headers, then trailers) and its body.
#[derive(Debug)]
struct Answer {
    headers: Vec<Vec<(String, String)>>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, block: usize, name: &str) -> Option<&str> {
        let block = self.headers.get(block)?;
        block
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The one gRPC message of a unary answer.
    fn message<M: Message + Default>(&self) -> M {
        assert_eq!(self.header(0, ":status"), Some("200"), "{self:?}");
        assert_eq!(
            self.header(1, "grpc-status"),
            Some("0"),
            "the call failed: {self:?}"
        );
        let (prefix, message) = self.body.split_at(5);
        assert_eq!(prefix[0], 0, "a compressed message");
        let len = u32::from_be_bytes(prefix[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, message.len(), "{self:?}");
        M::decode(message).unwrap()
    }
}

impl GrpcGoClient {
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const CONTINUATION: u8 = 0x9;
    const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const PADDED: u8 = 0x8;
    const PRIORITY: u8 = 0x20;

    async fn connect(socket: &Path) -> Self {
        let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
        conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut client = Self {
            conn,
            authority: socket.display().to_string(),
            encoder: httlib_hpack::Encoder::default(),
            decoder: loona_hpack::Decoder::new(),
            next_stream: 1,
        };
        // grpc-go's SETTINGS: no push, its receive window, a header list limit.
        client
            .send(
                Self::SETTINGS,
                0,
                0,
                &[0, 2, 0, 0, 0, 0, 0, 4, 0, 0x40, 0, 0, 0, 6, 0, 0x40, 0, 0],
            )
            .await;
        client
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.conn.write_all(&frame).await.unwrap();
    }

    async fn frame(&mut self) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        self.conn.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        self.conn.read_exact(&mut payload).await.unwrap();
        (head[3], head[4], stream, payload)
    }

    /// One unary call of `method`, as grpc-go makes it.
    async fn call(&mut self, method: &str, message: &impl Message) -> Answer {
        use httlib_hpack::Encoder;
        let flags = Encoder::HUFFMAN_NAME
            | Encoder::HUFFMAN_VALUE
            | Encoder::WITH_INDEXING
            | Encoder::BEST_FORMAT;
        let headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", &self.authority),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.72.0"),
            ("te", "trailers"),
            ("grpc-timeout", "9999984u"),
        ];
        let mut block = vec![];
        for (n, v) in headers {
            self.encoder
                .encode(
                    (n.as_bytes().to_vec(), v.as_bytes().to_vec(), flags),
                    &mut block,
                )
                .unwrap();
        }
        let stream = self.next_stream;
        self.next_stream += 2;
        self.send(Self::HEADERS, Self::END_HEADERS, stream, &block)
            .await;
        let message = message.encode_to_vec();
        let mut body = vec![0];
        body.extend((message.len() as u32).to_be_bytes());
        body.extend(message);
        self.send(Self::DATA, Self::END_STREAM, stream, &body).await;

        let mut answer = Answer {
            headers: vec![],
            body: vec![],
        };
        let mut open_block: Option<Vec<u8>> = None;
        // END_STREAM comes on a HEADERS frame and takes effect once its block is whole.
        let mut ends_stream = false;
        loop {
            let (kind, flags, on, mut payload) = self.frame().await;
            match kind {
                Self::SETTINGS if flags & Self::ACK == 0 => {
                    self.send(Self::SETTINGS, Self::ACK, 0, &[]).await
                }
                Self::PING if flags & Self::ACK == 0 => {
                    self.send(Self::PING, Self::ACK, 0, &payload).await
                }
                Self::GOAWAY => panic!(
                    "GOAWAY {:x?}: {}",
                    &payload[4..8],
                    String::from_utf8_lossy(&payload[8..])
                ),
                Self::RST_STREAM if on == stream => {
                    panic!("{method}: RST_STREAM with error code {payload:x?}")
                }
                Self::HEADERS | Self::CONTINUATION if on == stream => {
                    // The server's blocks are decoded with the server's dynamic table, kept
                    // across calls.
                    let mut fragment = if kind == Self::HEADERS {
                        ends_stream = flags & Self::END_STREAM != 0;
                        let mut start = 0;
                        if flags & Self::PADDED != 0 {
                            let pad = payload[0] as usize;
                            payload.truncate(payload.len() - pad);
                            start = 1;
                        }
                        if flags & Self::PRIORITY != 0 {
                            start += 5;
                        }
                        payload.split_off(start)
                    } else {
                        payload
                    };
                    let block = match open_block.take() {
                        Some(mut b) => {
                            b.append(&mut fragment);
                            b
                        }
                        None => fragment,
                    };
                    if flags & Self::END_HEADERS == 0 {
                        open_block = Some(block);
                        continue;
                    }
                    let decoded = self.decoder.decode(&block).unwrap();
                    answer.headers.push(
                        decoded
                            .into_iter()
                            .map(|(n, v)| {
                                (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                            })
                            .collect(),
                    );
                    if ends_stream {
                        return answer;
                    }
                }
                Self::DATA if on == stream => {
                    answer.body.extend(payload);
                    if flags & Self::END_STREAM != 0 {
                        return answer;
                    }
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelets_grpc_go_requests_are_answered() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_plugin();
    let reg_dir = root.path().join("kubelet/plugins_registry");
    let reg = Registrar::start(root.path(), "grpc-go", &node.socket, &reg_dir, "30s");
    let socket = reg_dir.join(format!("{CSI_DRIVER}-reg.sock"));
    eventually(STEP, "the registration socket", || {
        is_socket(&socket).then_some(())
    })
    .await;

    // GetInfo with the socket's path as :authority, which h2 by itself resets with
    // PROTOCOL_ERROR (what kubelet v1.34 reported), then NotifyRegistrationStatus on the same
    // connection: a second request whose headers refer to the first one's in the dynamic table.
    let mut kubelet = bounded("connecting", GrpcGoClient::connect(&socket)).await;
    let answer = bounded(
        "GetInfo",
        kubelet.call("/pluginregistration.Registration/GetInfo", &InfoRequest {}),
    )
    .await;
    let info: PluginInfo = answer.message();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, CSI_DRIVER);
    assert_eq!(info.endpoint, HOST_ENDPOINT);
    assert_eq!(info.supported_versions, ["1.0.0"]);
    let answer = bounded(
        "NotifyRegistrationStatus(true)",
        kubelet.call(
            "/pluginregistration.Registration/NotifyRegistrationStatus",
            &RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            },
        ),
    )
    .await;
    let _: RegistrationStatusResponse = answer.message();
    assert_eq!(status_code(&reg.get("/readyz").await), 200);

    // kubelet's periodic GetInfo, once more on the same connection.
    let again = bounded(
        "GetInfo again",
        kubelet.call("/pluginregistration.Registration/GetInfo", &InfoRequest {}),
    )
    .await;
    assert_eq!(again.message::<PluginInfo>(), info);
    let metrics = reg.get("/metrics").await;
    assert!(
        metrics.contains(r#"lakecache_csi_registrar_kubelet_calls_total{method="GetInfo"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("lakecache_csi_registrar_registered 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_socket_that_never_appears_fails_within_the_bound() {
    let root = tempfile::tempdir().unwrap();
    let reg_dir = root.path().join("plugins_registry");
    let missing = root.path().join("csi/csi.sock");
    let started = Instant::now();
    let mut reg = Registrar::start(root.path(), "missing", &missing, &reg_dir, "1s");
    let status = reg.exit(Duration::from_secs(10)).await;
    let took = started.elapsed();
    let log = reg.stderr();
    assert!(!status.success(), "{status}: {log}");
    assert!(took >= Duration::from_secs(1), "gave up after {took:?}");
    assert!(
        log.contains(&format!(
            "the CSI plugin at {} did not answer GetPluginInfo within 1s (last: the socket does not exist)",
            missing.display()
        )),
        "{log}"
    );
    assert!(
        log.contains("--csi-address"),
        "the error says what to check: {log}"
    );
    assert!(
        std::fs::read_dir(&reg_dir).map_or(true, |mut d| d.next().is_none()),
        "a registration socket was made for a plugin that never answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_accepts_and_never_answers_fails_within_the_bound() {
    let root = tempfile::tempdir().unwrap();
    let reg_dir = root.path().join("plugins_registry");
    let hung = root.path().join("hung.sock");
    // Accepts every connection and never reads or writes (a stopped plugin looks like this).
    let listener = std::os::unix::net::UnixListener::bind(&hung).unwrap();
    std::thread::spawn(move || {
        let mut held = vec![];
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let started = Instant::now();
    let mut reg = Registrar::start(root.path(), "hung", &hung, &reg_dir, "3s");
    let status = reg.exit(Duration::from_secs(12)).await;
    let took = started.elapsed();
    let log = reg.stderr();
    assert!(!status.success(), "{status}: {log}");
    assert!(took >= Duration::from_secs(3), "gave up after {took:?}");
    assert!(
        log.contains("did not answer GetPluginInfo within 3s"),
        "{log}"
    );
    assert!(log.contains("(last: GetPluginInfo "), "{log}");
    assert!(!reg_dir.join(format!("{CSI_DRIVER}-reg.sock")).exists());
}
