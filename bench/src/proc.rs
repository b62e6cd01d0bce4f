//! Child processes (the store, the proxy, the systems under test), their logs, their CPU time
//! and peak memory, and bounded waits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::janitor::{Guard, Janitor};

/// Linux reports CPU times in /proc in USER_HZ, which is 100 on every architecture it runs on.
const USER_HZ: f64 = 100.0;

/// A child process, stopped (SIGTERM, then SIGKILL after a grace period) when dropped or at a
/// signal.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Arc<Mutex<Child>>,
    _guard: Guard,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `log`.
    pub fn spawn(
        janitor: &Arc<Janitor>,
        name: &str,
        mut cmd: Command,
        log: &Path,
        grace: Duration,
    ) -> anyhow::Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let c = child.clone();
        let guard = janitor.register(format!("{name} (pid {pid})"), move || {
            stop_child(&c, grace);
        });
        Ok(Proc {
            name: name.to_string(),
            pid,
            log: log.to_path_buf(),
            child,
            _guard: guard,
        })
    }

    /// Fails if the process has exited, with the end of its log.
    pub fn check_alive(&self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.lock().try_wait() {
            bail!(
                "{} exited ({status}); the end of its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// CPU seconds (user + system, every thread) and resident memory, from /proc.
    pub fn stats(&self) -> anyhow::Result<ProcStats> {
        ProcStats::read(self.pid)
    }

    /// Resets the peak resident size (VmHWM) to the current one, so the next [`Self::stats`]
    /// shows the peak of what happened in between (`clear_refs` value 5, Linux 4.0+).
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }
}

fn stop_child(child: &Mutex<Child>, grace: Duration) {
    let mut c = child.lock();
    if matches!(c.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = Pid::from_raw(c.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    /// VmHWM: peak resident set since start or the last reset.
    pub peak_rss: u64,
    pub rss: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> anyhow::Result<ProcStats> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        parse_stats(&stat, &status).with_context(|| format!("parsing /proc/{pid}"))
    }
}

/// Parses utime and stime from `/proc/PID/stat` and VmHWM and VmRSS from `/proc/PID/status`.
pub fn parse_stats(stat: &str, status: &str) -> anyhow::Result<ProcStats> {
    // The command name (field 2) may hold spaces and parentheses: fields are counted after
    // the last ')'. utime and stime are fields 14 and 15, so 12th and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i).context("short stat")?.parse::<u64>()? as f64)
    };
    let cpu_seconds = (ticks(11)? + ticks(12)?) / USER_HZ;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(ProcStats {
        cpu_seconds,
        peak_rss: kib("VmHWM:"),
        rss: kib("VmRSS:"),
    })
}

/// Runs a command to completion within `timeout`; fails with its output if it fails.
pub fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let what = format!("{:?}", cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

/// Runs a command, ignoring failure (for undos).
pub fn run_quiet(program: &str, args: &[&str]) {
    let _ = run(Command::new(program).args(args), Duration::from_secs(20));
}

/// Polls `ready` every 20 ms until it returns true, `check` fails, or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        check()?;
        if Instant::now() > deadline {
            bail!("{what} not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_names() {
        let stat = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 \
                    100 1000000 500 18446744073709551615";
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        let s = parse_stats(stat, status).unwrap();
        assert!((s.cpu_seconds - 3.25).abs() < 1e-9);
        assert_eq!(s.peak_rss, 2 << 20);
        assert_eq!(s.rss, 1 << 20);
    }

    #[test]
    fn reads_our_own_stats() {
        let s = ProcStats::read(std::process::id()).unwrap();
        assert!(s.peak_rss >= s.rss && s.rss > 0);
    }
}
