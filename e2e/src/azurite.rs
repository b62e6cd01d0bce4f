//! A real Azure Blob Storage server for tests: Azurite's blob service (from npm, pinned by
//! scripts/setup), in memory, on a free loopback port.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Azurite's one account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its well-known key (public: Microsoft documents it for Azurite and the storage emulator).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The service version our own requests speak (the one OpenDAL sends).
const API_VERSION: &str = "2022-11-02";

pub struct AzuriteServer {
    child: Child,
    port: u16,
    /// Azurite's working directory, which in memory holds nothing but its log; removed after
    /// the server stops.
    dir: tempfile::TempDir,
}

impl AzuriteServer {
    /// Starts `azurite-blob` (`$LAKECACHE_AZURITE_BLOB`, which scripts/setup prints) on
    /// 127.0.0.1 and a free port, in memory and without telemetry, and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::env::var("LAKECACHE_AZURITE_BLOB").map_err(|_| {
            anyhow::anyhow!(
                "LAKECACHE_AZURITE_BLOB is not set: run `eval \"$(scripts/setup --env)\"`, which \
                 installs Azurite"
            )
        })?;
        let dir = tempfile::Builder::new().prefix("azurite-").tempdir()?;
        let log = dir.path().join("azurite.log");
        let (child, port) = spawn_on_free_port(&bin, &log, |port| {
            let mut cmd = Command::new(&bin);
            cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                // Nothing on disk, any x-ms-version accepted, the account always from the path
                // (the host is an IP anyway), no telemetry sent anywhere, no access log.
                // (`--location` cannot go with `--inMemoryPersistence`: the working directory,
                // a temporary one, takes its place should Azurite write anything.)
                .args([
                    "--inMemoryPersistence",
                    "--skipApiVersionCheck",
                    "--disableProductStyleUrl",
                    "--disableTelemetry",
                    "--silent",
                ])
                .current_dir(dir.path());
            cmd
        })?;
        Ok(Self { child, port, dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`: path-style, the account in the path.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Azurite's working directory (its log is `azurite.log` there).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Creates container `name` (OpenDAL cannot): a `Create Container` request signed with the
    /// account's shared key.
    pub async fn create_container(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/{ACCOUNT}/{name}");
        let date = httpdate::fmt_http_date(SystemTime::now());
        let ms_headers = [("x-ms-date", date.as_str()), ("x-ms-version", API_VERSION)];
        let query = [("restype", "container")];
        let to_sign = string_to_sign("PUT", &ms_headers, &path, &query);
        let authorization = format!("SharedKey {ACCOUNT}:{}", shared_key_signature(&to_sign)?);
        let mut headers = ms_headers.to_vec();
        headers.push(("Authorization", &authorization));
        let response = http_request(
            self.port,
            "PUT",
            &format!("{path}?restype=container"),
            &headers,
            b"",
        )
        .await
        .with_context(|| format!("creating container {name}"))?;
        let made_by_a_retry = response.retried && response.status == 409;
        if response.status != 201 && !made_by_a_retry {
            bail!(
                "creating container {name}: {} {}",
                response.status_line,
                response.body
            );
        }
        Ok(())
    }

    /// OpenDAL `azblob` options for the server at `endpoint` (its own, or a proxy's in front of
    /// it), without the secret: add `container`, and [`AzuriteServer::credentials`].
    pub fn options(endpoint: &str) -> BTreeMap<String, String> {
        [("endpoint", endpoint), ("account_name", ACCOUNT)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The secret options: the account key.
    pub fn credentials() -> BTreeMap<String, String> {
        BTreeMap::from([("account_key".to_string(), ACCOUNT_KEY.to_string())])
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        // Azurite sometimes ignores SIGTERM: it gets 3 s, then SIGKILL.
        stop(&mut self.child, Duration::from_secs(3));
    }
}

/// Sends SIGTERM to `child`, waits up to `grace` for it to exit, then SIGKILLs it and reaps it.
pub(crate) fn stop(child: &mut Child, grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `command(port)` for a free loopback port, its output appended to `log`, and waits
/// (30 s at most) until *it* listens there: a port picked free may be taken by another process
/// of a parallel test before the server binds it, and a connect would then reach that process
/// (CI once saw an emulator's first request reset that way). So the listener is looked up in
/// /proc and must be one of the child's sockets; a child that exits first (the port was taken)
/// is started again on another port, three times at most.
pub(crate) fn spawn_on_free_port(
    bin: &str,
    log: &std::path::Path,
    mut command: impl FnMut(u16) -> Command,
) -> anyhow::Result<(Child, u16)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = command(port)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {bin} (scripts/setup installs it)"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if listens(child.id(), port) {
                return Ok((child, port));
            }
            if let Some(status) = child.try_wait()? {
                if attempt < 3 {
                    break;
                }
                bail!(
                    "{bin} exited ({status}) before listening on port {port}:\n{}",
                    crate::cluster::tail(log, 20)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{bin} did not listen on port {port} within 30 s:\n{}",
                    crate::cluster::tail(log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (IPv4 or IPv6).
fn listens(pid: u32, port: u16) -> bool {
    let port_hex = format!(":{port:04X}");
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // local_address, state 0A (LISTEN), inode.
                    (f.len() > 9 && f[1].ends_with(&port_hex) && f[3] == "0A")
                        .then(|| f[9].to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| {
            let l = l.to_string_lossy();
            inodes.iter().any(|i| l == format!("socket:[{i}]"))
        })
    })
}

/// The string a SharedKey signature covers (Azure's "Authorize with Shared Key", version
/// 2015-02-21 and later), for a request whose standard headers (Content-Encoding,
/// Content-Language, Content-Length, Content-MD5, Content-Type, Date, If-Modified-Since,
/// If-Match, If-None-Match, If-Unmodified-Since, Range) are all absent or empty, with `x-ms-*`
/// headers `ms_headers`, URL path `path` and query parameters `query`.
fn string_to_sign(
    verb: &str,
    ms_headers: &[(&str, &str)],
    path: &str,
    query: &[(&str, &str)],
) -> String {
    let mut s = format!("{verb}\n");
    s.push_str(&"\n".repeat(11));
    let mut headers: Vec<(String, &str)> = ms_headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
        .collect();
    headers.sort();
    for (k, v) in headers {
        s.push_str(&format!("{k}:{v}\n"));
    }
    // The canonicalized resource: the account, then the path (which, path-style, starts with
    // the account again), then each parameter on a line of its own, sorted by name.
    s.push_str(&format!("/{ACCOUNT}{path}"));
    let mut params: Vec<(String, &str)> = query
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), *v))
        .collect();
    params.sort();
    for (k, v) in params {
        s.push_str(&format!("\n{k}:{v}"));
    }
    s
}

/// Base64 of HMAC-SHA256 over `to_sign`, keyed with the decoded account key.
fn shared_key_signature(to_sign: &str) -> anyhow::Result<String> {
    let key = BASE64.decode(ACCOUNT_KEY)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)?;
    mac.update(to_sign.as_bytes());
    Ok(BASE64.encode(mac.finalize().into_bytes()))
}

/// A response to [`http_request`].
pub(crate) struct Response {
    pub status: u16,
    pub status_line: String,
    /// The body (de-chunked), as text: for error messages.
    pub body: String,
    /// The request was sent more than once (see [`http_request`]).
    pub retried: bool,
}

/// One bare HTTP/1.1 request to 127.0.0.1:`port`: what the harness needs to set up an
/// emulator's containers or buckets, which OpenDAL cannot. An emulator that has just started
/// listening may still reset a connection (Azurite once did, in CI): a request whose connection
/// fails before any answer is sent again, five times at most, 300 ms apart; a request that
/// gets no answer within 10 s fails. `Response::retried` says whether it was sent again (a
/// create that then finds its object exists made it itself).
pub(crate) async fn http_request(
    port: u16,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let mut attempt = 0;
    loop {
        match http_request_once(port, method, path_and_query, headers, body).await {
            Err(e) if attempt < 4 && e.root_cause().downcast_ref::<std::io::Error>().is_some() => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(mut r) => {
                r.retried = attempt > 0;
                return Ok(r);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn http_request_once(
    port: u16,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut request = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        s.write_all(request.as_bytes()).await?;
        s.write_all(body).await?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{method} {path_and_query}: no response within 10 s"))??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status_line = head.lines().next().unwrap_or("").to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{method} {path_and_query}: not an HTTP response: {head:.80}"))?;
    let chunked = head.lines().any(|line| {
        line.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body).unwrap_or_else(|| body.to_string())
    } else {
        body.to_string()
    };
    Ok(Response {
        status,
        status_line,
        body,
        retried: false,
    })
}

/// The content of a chunked body, or `None` when it is not well-formed.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(),
            Some("abcde")
        );
        assert_eq!(dechunk("5\r\nab"), None);
    }

    #[test]
    fn string_to_sign_follows_the_documented_layout() {
        let s = string_to_sign(
            "PUT",
            &[
                ("x-ms-version", "2022-11-02"),
                ("X-Ms-Date", " Mon, 01 Jan 2024 00:00:00 GMT "),
            ],
            "/devstoreaccount1/c",
            &[("restype", "container")],
        );
        assert_eq!(
            s,
            "PUT\n\n\n\n\n\n\n\n\n\n\n\n\
             x-ms-date:Mon, 01 Jan 2024 00:00:00 GMT\nx-ms-version:2022-11-02\n\
             /devstoreaccount1/devstoreaccount1/c\nrestype:container"
        );
    }
}
