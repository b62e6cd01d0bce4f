//! The emulated remote lake: an S3 store in a network namespace of its own, behind a rate-limited
//! veth pair and a latency proxy.
//!
//! ```text
//!  host (systems under test)                 namespace lcb-<pid>
//!  198.18.x.1 ──veth, tbf on both ends──▶ 198.18.x.2:9000 toxiproxy ──▶ 127.0.0.1:7070 versitygw
//!                                            (latency toxics, up/down)      posix over a tmpfs
//! ```
//!
//! Every byte any system reads crosses the veth pair, so the `tbf` qdiscs on both of its ends
//! bound the rate in each direction, and every request crosses toxiproxy, whose `latency`
//! toxics delay each direction by half the round trip (pipelined per chunk, so they add delay,
//! not a throughput cap). The store's directory is a tmpfs, so the lake is as fast as the link
//! lets it be whatever the machine's disk, and dropping the page cache between epochs never
//! makes the lake itself slow. The /30 subnet is picked from 198.18.0.0/15 (RFC 2544's
//! benchmarking range) by our pid, so two runs at once do not collide.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::janitor::{Guard, Janitor};
use crate::plan::Link;
use crate::proc::{self, Proc};

pub const BUCKET: &str = "lake";
pub const REGION: &str = "us-east-1";
/// Keys of the store's root user; the store lives in a namespace of this run only.
pub const ACCESS_KEY: &str = "lakecachebench";
pub const SECRET_KEY: &str = "lakecachebench-secret";
const STORE_PORT: u16 = 7070;
const PROXY_PORT: u16 = 9000;
const API_PORT: u16 = 8474;
const QUICK: Duration = Duration::from_secs(20);

/// Binaries the lake needs.
#[derive(Debug, Clone)]
pub struct LakeBins {
    pub versitygw: PathBuf,
    pub toxiproxy: PathBuf,
}

/// The namespace and the veth pair.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    _guard: Guard,
}

/// Names and addresses for the run with this pid.
pub fn addresses(pid: u32) -> (String, String, String, Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (pid % 32768) * 4;
    (
        format!("lcb-{pid}"),
        format!("lcbh{pid}"),
        format!("lcbn{pid}"),
        Ipv4Addr::from(base + 1),
        Ipv4Addr::from(base + 2),
    )
}

impl Netns {
    pub fn create(janitor: &Arc<Janitor>, link: &Link) -> anyhow::Result<Netns> {
        let (name, host_if, ns_if, host_ip, ns_ip) = addresses(std::process::id());
        let ip = |args: &[&str]| proc::run(Command::new("ip").args(args), QUICK);
        ip(&["netns", "add", &name]).context("creating the network namespace (needs root)")?;
        let n = name.clone();
        let h = host_if.clone();
        let guard = janitor.register(format!("network namespace {name}"), move || {
            // Deleting either end of a veth pair deletes both, and their qdiscs.
            proc::run_quiet("ip", &["link", "del", &h]);
            proc::run_quiet("ip", &["netns", "del", &n]);
        });
        let ns = Netns {
            name,
            host_if,
            ns_if,
            host_ip,
            ns_ip,
            _guard: guard,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        ns.shape(link)?;
        Ok(ns)
    }

    /// `tbf` at the link's rate on both ends of the veth pair.
    fn shape(&self, link: &Link) -> anyhow::Result<()> {
        let rate = format!("{}bit", link.rate_bits);
        let burst = link.burst_bytes().to_string();
        for (netns, dev) in [(None, &self.host_if), (Some(&self.name), &self.ns_if)] {
            let mut cmd = Command::new("tc");
            if let Some(n) = netns {
                cmd.args(["-n", n]);
            }
            cmd.args([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "20ms",
            ]);
            proc::run(&mut cmd, QUICK).context("adding the tbf qdisc")?;
        }
        Ok(())
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// The qdiscs as `tc` shows them (for the results).
    pub fn describe_qdiscs(&self) -> String {
        let host = proc::run(
            Command::new("tc").args(["qdisc", "show", "dev", &self.host_if]),
            QUICK,
        )
        .unwrap_or_default();
        let ns = proc::run(
            Command::new("tc").args(["-n", &self.name, "qdisc", "show", "dev", &self.ns_if]),
            QUICK,
        )
        .unwrap_or_default();
        format!("host: {} | namespace: {}", host.trim(), ns.trim())
    }
}

/// The store and the proxy, running in the namespace.
pub struct Lake {
    pub endpoint: String,
    pub toxics: serde_json::Value,
    _proxy: Proc,
    _store: Proc,
}

impl Lake {
    /// Serves `store_dir` (whose subdirectory [`BUCKET`] is the bucket) through the proxy.
    pub fn start(
        janitor: &Arc<Janitor>,
        ns: &Netns,
        bins: &LakeBins,
        store_dir: &Path,
        link: &Link,
        logs: &Path,
    ) -> anyhow::Result<Lake> {
        let mut cmd = ns.command(&bins.versitygw);
        cmd.args(["--access", ACCESS_KEY, "--secret", SECRET_KEY, "--quiet"])
            .args(["--region", REGION])
            .arg("--port")
            .arg(format!("127.0.0.1:{STORE_PORT}"))
            .arg("posix")
            .arg(store_dir);
        let store = Proc::spawn(
            janitor,
            "versitygw",
            cmd,
            &logs.join("versitygw.log"),
            Duration::from_secs(5),
        )?;
        let mut cmd = ns.command(&bins.toxiproxy);
        cmd.args([
            "-host",
            &ns.ns_ip.to_string(),
            "-port",
            &API_PORT.to_string(),
        ])
        .env("LOG_LEVEL", "warn");
        let proxy = Proc::spawn(
            janitor,
            "toxiproxy",
            cmd,
            &logs.join("toxiproxy.log"),
            Duration::from_secs(5),
        )?;
        let api = SocketAddr::from((ns.ns_ip, API_PORT));
        proc::wait_until(
            "toxiproxy's API",
            QUICK,
            || {
                proxy.check_alive()?;
                store.check_alive()
            },
            || http(api, "GET", "/version", None, Duration::from_secs(1)).is_ok(),
        )?;
        let listen = SocketAddr::from((ns.ns_ip, PROXY_PORT));
        let body = serde_json::json!({
            "name": "lake",
            "listen": listen.to_string(),
            "upstream": format!("127.0.0.1:{STORE_PORT}"),
            "enabled": true,
        });
        expect_2xx(http(
            api,
            "POST",
            "/proxies",
            Some(&body.to_string()),
            QUICK,
        )?)
        .context("creating the toxiproxy proxy")?;
        let (up, down) = link.toxics();
        for (stream, ms) in [("upstream", up), ("downstream", down)] {
            if ms == 0 {
                continue;
            }
            let toxic = serde_json::json!({
                "name": format!("latency_{stream}"),
                "type": "latency",
                "stream": stream,
                "toxicity": 1.0,
                "attributes": { "latency": ms, "jitter": 0 },
            });
            expect_2xx(http(
                api,
                "POST",
                "/proxies/lake/toxics",
                Some(&toxic.to_string()),
                QUICK,
            )?)
            .with_context(|| format!("adding the {stream} latency toxic"))?;
        }
        let (_, toxics) = expect_2xx(http(api, "GET", "/proxies/lake/toxics", None, QUICK)?)?;
        let endpoint = format!("http://{listen}");
        // The store answers once its bucket lists through the proxy.
        proc::wait_until(
            "versitygw",
            QUICK,
            || store.check_alive(),
            || {
                http(
                    listen,
                    "GET",
                    &format!("/{BUCKET}?list-type=2&max-keys=1"),
                    None,
                    Duration::from_secs(1),
                )
                .map(|(status, _)| status == 403 || status == 200)
                .unwrap_or(false)
            },
        )?;
        Ok(Lake {
            endpoint,
            toxics: serde_json::from_str(&toxics).unwrap_or_default(),
            _proxy: proxy,
            _store: store,
        })
    }
}

fn expect_2xx((status, body): (u16, String)) -> anyhow::Result<(u16, String)> {
    if !(200..300).contains(&status) {
        bail!("HTTP {status}: {}", body.trim());
    }
    Ok((status, body))
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("bad chunk")?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        s = rest.get(n..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// Mount points from /proc/self/mountinfo (octal escapes decoded).
pub fn mount_points() -> Vec<PathBuf> {
    lakecache_client::mountinfo::read_self()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Lazily unmounts `path` if mounted (a dead FUSE server's mount included).
pub fn unmount(path: &Path) {
    if is_mounted(path) {
        proc::run_quiet("umount", &["-l", &path.to_string_lossy()]);
    }
}

/// Mounts a tmpfs of `size` bytes at `dir`, unmounted by the guard.
pub fn mount_tmpfs(janitor: &Arc<Janitor>, dir: &Path, size: u64) -> anyhow::Result<Guard> {
    std::fs::create_dir_all(dir)?;
    proc::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(dir),
        QUICK,
    )
    .with_context(|| format!("mounting a tmpfs at {}", dir.display()))?;
    let d = dir.to_path_buf();
    Ok(janitor.register(format!("tmpfs at {}", dir.display()), move || unmount(&d)))
}

/// Removes what runs killed with SIGKILL left behind: their namespaces (and the processes in
/// them, which those runs started) and mounts under `work_root/<pid>`, for pids that are gone.
pub fn sweep_stale(work_root: &Path) {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let list = proc::run(Command::new("ip").args(["netns", "list"]), QUICK).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("lcb-") else {
            continue;
        };
        if pid.parse::<u32>().is_err() || alive(pid) {
            continue;
        }
        eprintln!("lakecache-bench: removing namespace {name} left by a killed run");
        let pids =
            proc::run(Command::new("ip").args(["netns", "pids", name]), QUICK).unwrap_or_default();
        for p in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        proc::run_quiet("ip", &["link", "del", &format!("lcbh{pid}")]);
        proc::run_quiet("ip", &["netns", "del", name]);
    }
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.parse::<u32>().is_err() || alive(&name) {
            continue;
        }
        let dir = e.path();
        let mut mounts: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mounts {
            eprintln!(
                "lakecache-bench: unmounting {} left by a killed run",
                m.display()
            );
            proc::run_quiet("umount", &["-l", &m.to_string_lossy()]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_a_slash_30_in_the_benchmark_range() {
        let (ns, h, n, host, peer) = addresses(4_000_001);
        assert_eq!(ns, "lcb-4000001");
        assert!(h.len() <= 15 && n.len() <= 15);
        assert_eq!(u32::from(peer), u32::from(host) + 1);
        assert_eq!(u32::from(host) % 4, 1);
        let o = host.octets();
        assert_eq!(o[0], 198);
        assert!(o[1] == 18 || o[1] == 19);
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) =
            parse_response(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_str()), (201, "{}"));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_str()), (200, "hello world"));
    }
}
