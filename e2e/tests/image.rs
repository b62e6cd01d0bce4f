//! The container image, built without Docker: `scripts/image` makes it from Debian packages
//! (mmdebstrap) and the workspace's binaries (umoci), as the `Dockerfile` describes it for users
//! with Docker.
//!
//! - The two builds cannot drift apart: both read `image/packages` and `image/binaries` (and
//!   neither repeats them), each line of `image/binaries` names a workspace package and its
//!   binary, and the user and group, the `/etc/fuse.conf` line, `USER`, `ENTRYPOINT`, `CMD` and
//!   the labels are parsed from both files and compared.
//! - `scripts/image` builds both archives from the binaries of this build (`<target>/debug`):
//!   each is an OCI layout whose index names its tag (what `ctr images import --base-name`
//!   appends), the lakecache image's config is the Dockerfile's, both share the base layer, and
//!   the binaries layer holds exactly the binaries, root-owned and 0755. Unpacked, the image has
//!   the user and the fuse.conf line, every binary runs on the image's libc as the image's user
//!   (`chroot`), and so does the `CMD`. The pause image's entry point, as PID 1 of a new PID
//!   namespace, stays up, reaps an orphan and exits on SIGTERM and on SIGINT.
//!
//! Needs root (mmdebstrap, chroot, unshare). The first build downloads Debian packages (a couple
//! of minutes); the base layer is cached under `~/.cache/lakecache/image`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lakecache_e2e::image::{binaries, binaries_dir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The tag containerd's sandbox image setting expects (`registry.k8s.io/pause:3.10`).
const PAUSE_TAG: &str = "3.10";
/// A cold `scripts/image` downloads and installs Debian packages.
const SCRIPT_LIMIT: Duration = Duration::from_secs(20 * 60);
const COMMAND_LIMIT: Duration = Duration::from_secs(5 * 60);
const RUN_LIMIT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ is in the workspace")
        .to_path_buf()
}

fn read(path: &str) -> anyhow::Result<String> {
    let path = repo().join(path);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    lakecache_e2e::cluster::output_within(cmd, None, limit)
}

/// The child's exit status, or `None` if it is still running after `limit`.
fn wait_bounded(child: &mut Child, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` within `limit`; its stdout, or an error with its output when it failed.
fn ok(cmd: &mut Command, limit: Duration) -> anyhow::Result<String> {
    let output = run_bounded(cmd, limit)?;
    ensure!(
        output.status.success(),
        "{cmd:?}: {}\nstderr: {}\nstdout: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The lines of a list file (`image/packages`, `image/binaries`) as words, without comments.
fn list(path: &str) -> anyhow::Result<Vec<Vec<String>>> {
    Ok(read(path)?
        .lines()
        .map(|l| {
            l.split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|words| !words.is_empty())
        .collect())
}

/// What the image's runtime stage sets, as the Dockerfile or scripts/image spells it (with the
/// user id variable substituted).
#[derive(Debug, PartialEq)]
struct Spec {
    uid: String,
    /// `groupadd` and `useradd` with their arguments.
    groupadd: Vec<String>,
    useradd: Vec<String>,
    /// The line appended to /etc/fuse.conf.
    fuse_conf: String,
    user: String,
    entrypoint_empty: bool,
    cmd: Vec<String>,
    labels: BTreeMap<String, String>,
}

impl Spec {
    fn from_dockerfile(text: &str) -> anyhow::Result<Spec> {
        let instructions = dockerfile_instructions(text);
        let get = |keyword: &str| -> anyhow::Result<Vec<&str>> {
            let found: Vec<&str> = instructions
                .iter()
                .filter(|(k, _)| k == keyword)
                .map(|(_, rest)| rest.as_str())
                .collect();
            ensure!(!found.is_empty(), "the Dockerfile has no {keyword}");
            Ok(found)
        };
        let uid = app_uid(text)?;
        let runs = get("RUN")?.join("\n");
        let last = |keyword: &str| -> anyhow::Result<&str> {
            Ok(get(keyword)?.last().copied().unwrap_or_default())
        };
        let entrypoint: Vec<String> =
            serde_json::from_str(last("ENTRYPOINT")?).context("ENTRYPOINT")?;
        Ok(Spec {
            groupadd: command(&runs, "groupadd", &uid)?,
            useradd: command(&runs, "useradd", &uid)?,
            fuse_conf: appended_line(&runs, "/etc/fuse.conf")?,
            user: substitute(last("USER")?, &uid),
            entrypoint_empty: entrypoint.is_empty(),
            cmd: serde_json::from_str(last("CMD")?).context("CMD")?,
            labels: label_pairs(&get("LABEL")?.join(" ")),
            uid,
        })
    }

    fn from_script(text: &str) -> anyhow::Result<Spec> {
        let uid = app_uid(text)?;
        let user = text
            .split_once("--config.user=")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .context("scripts/image sets no --config.user")?;
        let cmd = text
            .lines()
            .find_map(|l| l.strip_prefix("CMD=(")?.strip_suffix(')'))
            .context("scripts/image has no CMD=(...)")?;
        let labels = text
            .split_once("\nLABELS=(")
            .and_then(|(_, rest)| rest.split_once("\n)"))
            .context("scripts/image has no LABELS=(...)")?
            .0;
        Ok(Spec {
            groupadd: command(text, "groupadd", &uid)?,
            useradd: command(text, "useradd", &uid)?,
            fuse_conf: appended_line(text, "/etc/fuse.conf")?,
            user: substitute(user, &uid),
            entrypoint_empty: text.contains("--clear=config.entrypoint"),
            cmd: cmd.split_whitespace().map(String::from).collect(),
            labels: label_pairs(labels),
            uid,
        })
    }

    /// The user's name, uid and gid, from `useradd`.
    fn account(&self) -> anyhow::Result<(String, String, String)> {
        let after = |flag: &str| {
            self.useradd
                .iter()
                .position(|t| t == flag)
                .and_then(|i| self.useradd.get(i + 1))
                .cloned()
                .with_context(|| format!("useradd has no {flag}: {:?}", self.useradd))
        };
        let name = self
            .useradd
            .last()
            .cloned()
            .context("useradd names no user")?;
        Ok((name, after("--uid")?, after("--gid")?))
    }
}

/// The Dockerfile's instructions (keyword, arguments), continuation lines joined, comments and
/// blank lines dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((keyword.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// The value of the first `APP_UID=<digits>` (`ARG APP_UID=...`, `export APP_UID=...`).
fn app_uid(text: &str) -> anyhow::Result<String> {
    text.match_indices("APP_UID=")
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .find(|v| !v.is_empty())
        .context("no APP_UID=<number>")
}

/// `token` with the user id variable replaced by its value and quotes dropped.
fn substitute(token: &str, uid: &str) -> String {
    token
        .replace("${APP_UID}", uid)
        .replace("$APP_UID", uid)
        .trim_matches(|c| c == '"' || c == '\'')
        .to_string()
}

/// The words of the first `NAME --...` command in `text`, up to the end of that command.
fn command(text: &str, name: &str, uid: &str) -> anyhow::Result<Vec<String>> {
    let start = text
        .find(&format!("{name} --"))
        .with_context(|| format!("no `{name}` command"))?;
    let rest = &text[start..];
    let end = rest
        .find(['\'', '\n', ';', ')'])
        .unwrap_or(rest.len())
        .min(rest.find("&&").unwrap_or(rest.len()));
    Ok(rest[..end]
        .split_whitespace()
        .filter(|w| *w != "\\")
        .map(|w| substitute(w, uid))
        .collect())
}

/// The word of an `echo WORD >> ...FILE` in `text`.
fn appended_line(text: &str, file: &str) -> anyhow::Result<String> {
    text.match_indices("echo ")
        .find_map(|(i, m)| {
            let line = text[i + m.len()..].lines().next()?;
            let mut words = line.split_whitespace();
            let word = words.next()?;
            (words.next()? == ">>" && words.next()?.contains(file)).then(|| substitute(word, ""))
        })
        .with_context(|| format!("no `echo LINE >> {file}`"))
}

/// Every `key="value"` in `text`.
fn label_pairs(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some(i) = rest.find("=\"") {
        let key_start = rest[..i]
            .rfind(|c: char| c.is_whitespace() || c == '(')
            .map_or(0, |j| j + 1);
        let key = rest[key_start..i].to_string();
        let value = &rest[i + 2..];
        let Some(end) = value.find('"') else { break };
        out.insert(key, value[..end].to_string());
        rest = &value[end + 1..];
    }
    out
}

/// The chart's appVersion, the lakecache image's default tag.
fn app_version() -> anyhow::Result<String> {
    read("charts/lakecache/Chart.yaml")?
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("Chart.yaml has no appVersion")
}

#[test]
fn dockerfile_and_script_read_the_same_lists_and_set_the_same_image() -> anyhow::Result<()> {
    let dockerfile = read("Dockerfile")?;
    let script = read("scripts/image")?;
    for list in ["image/packages", "image/binaries"] {
        ensure!(
            dockerfile.contains(list),
            "the Dockerfile does not read {list}"
        );
        ensure!(script.contains(list), "scripts/image does not read {list}");
    }

    // Neither repeats the lists: no package, and no binary as a cargo or cp argument.
    let packages: Vec<String> = list("image/packages")?.into_iter().flatten().collect();
    ensure!(!packages.is_empty(), "image/packages is empty");
    let binaries = binaries()?;
    ensure!(!binaries.is_empty(), "image/binaries is empty");
    let dockerfile_runs: Vec<String> = dockerfile_instructions(&dockerfile)
        .into_iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, rest)| rest)
        .collect();
    let script_code: String = script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for (what, text) in [
        ("the Dockerfile", dockerfile_runs.join("\n")),
        ("scripts/image", script_code),
    ] {
        for word in text.split_whitespace() {
            let word = word.trim_matches(|c| c == '"' || c == '\'' || c == ',');
            ensure!(
                !packages.iter().any(|p| p == word),
                "{what} names the package {word} itself: read image/packages"
            );
        }
        for (package, bin) in &binaries {
            for spelled in [
                format!("-p {package}"),
                format!("release/{bin}"),
                format!("debug/{bin}"),
            ] {
                ensure!(
                    !text.contains(&spelled),
                    "{what} has `{spelled}`: read image/binaries"
                );
            }
        }
    }

    // Each line of image/binaries is a workspace package with that binary.
    let metadata: Value = serde_json::from_str(&ok(
        Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ])
            .current_dir(repo()),
        COMMAND_LIMIT,
    )?)?;
    let workspace = metadata["packages"].as_array().context("packages")?;
    for (package, bin) in &binaries {
        let found = workspace
            .iter()
            .find(|p| p["name"] == package.as_str())
            .with_context(|| format!("image/binaries: {package} is no workspace package"))?;
        let has_bin = found["targets"].as_array().into_iter().flatten().any(|t| {
            t["name"] == bin.as_str()
                && t["kind"]
                    .as_array()
                    .is_some_and(|k| k.contains(&"bin".into()))
        });
        ensure!(
            has_bin,
            "image/binaries: the package {package} has no binary {bin}"
        );
    }

    let from_dockerfile = Spec::from_dockerfile(&dockerfile)?;
    let from_script = Spec::from_script(&script)?;
    ensure!(
        from_dockerfile == from_script,
        "the Dockerfile and scripts/image make different images:\nDockerfile:    \
         {from_dockerfile:?}\nscripts/image: {from_script:?}"
    );
    ensure!(from_dockerfile.entrypoint_empty, "ENTRYPOINT is not empty");
    ensure!(!from_dockerfile.labels.is_empty(), "no labels parsed");
    let (name, uid, gid) = from_dockerfile.account()?;
    ensure!(
        from_dockerfile.user == format!("{uid}:{gid}"),
        "USER {} is not {name}'s {uid}:{gid} (numeric, for runAsNonRoot)",
        from_dockerfile.user
    );
    Ok(())
}

/// An unpacked OCI archive: its layout directory and the one image it holds.
struct Archive {
    layout: PathBuf,
    tag: String,
    manifest: Value,
    config: Value,
}

impl Archive {
    fn open(archive: &Path, into: &Path) -> anyhow::Result<Archive> {
        std::fs::create_dir_all(into)?;
        ok(
            Command::new("tar")
                .arg("-xf")
                .arg(archive)
                .arg("-C")
                .arg(into),
            COMMAND_LIMIT,
        )?;
        let index: Value = serde_json::from_slice(&std::fs::read(into.join("index.json"))?)?;
        let manifests = index["manifests"]
            .as_array()
            .context("index.json: manifests")?;
        ensure!(
            manifests.len() == 1,
            "{}: {} images, not one: {index}",
            archive.display(),
            manifests.len()
        );
        let tag = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .context("index.json: no org.opencontainers.image.ref.name")?
            .to_string();
        let blob = |digest: &Value| -> anyhow::Result<Value> {
            Ok(serde_json::from_slice(&std::fs::read(blob_path(
                into, digest,
            )?)?)?)
        };
        let manifest = blob(&manifests[0]["digest"])?;
        let config = blob(&manifest["config"]["digest"])?;
        Ok(Archive {
            layout: into.to_path_buf(),
            tag,
            manifest,
            config,
        })
    }

    fn layers(&self) -> Vec<Value> {
        self.manifest["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn layer_path(&self, i: usize) -> anyhow::Result<PathBuf> {
        blob_path(&self.layout, &self.layers()[i]["digest"])
    }

    /// `umoci unpack` (which checks every blob's digest) into `bundle`; returns the rootfs.
    fn unpack(&self, bundle: &Path) -> anyhow::Result<PathBuf> {
        ok(
            Command::new("umoci")
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:{}", self.layout.display(), self.tag))
                .arg(bundle),
            COMMAND_LIMIT,
        )?;
        Ok(bundle.join("rootfs"))
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.config["config"][key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    }

    fn user(&self) -> String {
        self.config["config"]["User"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn path_env(&self) -> anyhow::Result<String> {
        self.strings("Env")
            .into_iter()
            .find_map(|e| e.strip_prefix("PATH=").map(String::from))
            .context("the config sets no PATH")
    }
}

fn blob_path(layout: &Path, digest: &Value) -> anyhow::Result<PathBuf> {
    let digest = digest.as_str().context("a digest")?;
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("{digest} is not sha256"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// `chroot --userspec=USER ROOTFS ARGS...` with the image's PATH only.
fn in_image(rootfs: &Path, user: &str, path: &str, args: &[&str]) -> anyhow::Result<String> {
    ok(
        Command::new("chroot")
            .arg(format!("--userspec={user}"))
            .arg(rootfs)
            .args(args)
            .env_clear()
            .env("PATH", path),
        RUN_LIMIT,
    )
}

/// The processes whose parent is `pid`, with their state letter (`Z` for a zombie).
fn children(pid: u32) -> Vec<(u32, char)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid: u32 = fields.next()?.parse().ok()?;
            (ppid == pid).then_some((child, state))
        })
        .collect()
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the pause image's entry point as PID 1 of a new PID namespace (as the image's user) and
/// checks that it stays up, reaps an orphan, and exits on `signal`.
fn pause_exits_on(rootfs: &Path, pause: &Archive, signal: Signal) -> anyhow::Result<()> {
    let entrypoint = pause.strings("Entrypoint");
    ensure!(!entrypoint.is_empty(), "the pause image has no entry point");
    let mut unshare = Command::new("unshare");
    unshare
        .args(["--pid", "--fork", "--kill-child"])
        .arg("chroot")
        .arg(format!("--userspec={}", pause.user()))
        .arg(rootfs)
        .args(&entrypoint)
        .env_clear()
        .env("PATH", pause.path_env()?)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = unshare.spawn().context("starting unshare")?;
    // unshare's child: chroot, then the entry point it executes, PID 1 inside.
    let mut init = 0;
    let result = (|| -> anyhow::Result<()> {
        let name = Path::new(&entrypoint[0])
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let started = until(Duration::from_secs(10), || {
            init = children(child.id()).first().map_or(0, |c| c.0);
            init != 0
                && std::fs::read_to_string(format!("/proc/{init}/comm"))
                    .is_ok_and(|c| name.starts_with(c.trim()))
        });
        ensure!(started, "{entrypoint:?} did not start under unshare");
        std::thread::sleep(Duration::from_millis(300));
        ensure!(
            child.try_wait()?.is_none(),
            "{entrypoint:?} exited on its own"
        );

        // An orphan in the namespace is reparented to PID 1, which must reap it. (Its output
        // goes nowhere, so that nsenter's pipes close when sh exits.)
        ok(
            Command::new("nsenter")
                .arg(format!("--target={init}"))
                .args(["--pid", "--", "sh", "-c"])
                .arg("sleep 2 </dev/null >/dev/null 2>&1 &"),
            RUN_LIMIT,
        )?;
        ensure!(
            until(Duration::from_secs(5), || !children(init).is_empty()),
            "the orphan was not reparented to {entrypoint:?}"
        );
        ensure!(
            until(Duration::from_secs(10), || children(init).is_empty()),
            "{entrypoint:?} did not reap its orphan: {:?}",
            children(init)
        );

        kill(Pid::from_raw(i32::try_from(init)?), signal)?;
        let status = wait_bounded(&mut child, Duration::from_secs(10))?
            .with_context(|| format!("{entrypoint:?} did not exit on {signal}"))?;
        ensure!(
            status.success(),
            "{entrypoint:?} exited with {status} on {signal}"
        );
        Ok(())
    })();
    if child.try_wait()?.is_none() {
        // Killing PID 1 ends its namespace. (unshare's --kill-child does not reach it: the
        // parent-death signal is cleared when chroot changes the user.)
        if let Ok(init) = i32::try_from(init)
            && init > 0
        {
            let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
        }
        if wait_bounded(&mut child, Duration::from_secs(10))?.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    result
}

#[test]
fn scripts_image_builds_images_that_run() -> anyhow::Result<()> {
    let dockerfile = Spec::from_dockerfile(&read("Dockerfile")?)?;
    let (user_name, uid, gid) = dockerfile.account()?;
    let binaries: Vec<String> = binaries()?.into_iter().map(|(_, bin)| bin).collect();
    let bins = binaries_dir()?;

    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    let started = Instant::now();
    let stdout = ok(
        Command::new(repo().join("scripts/image"))
            .arg("--binaries")
            .arg(&bins)
            .arg("--out")
            .arg(&out),
        SCRIPT_LIMIT,
    )?;
    eprintln!("scripts/image took {:.1?}", started.elapsed());
    let printed: BTreeMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
    let archive = |name: &str| -> anyhow::Result<PathBuf> {
        let path = PathBuf::from(
            printed
                .get(name)
                .with_context(|| format!("scripts/image printed no {name}=: {stdout}"))?,
        );
        ensure!(
            path == out.join(format!("{name}.tar")),
            "{name}={}",
            path.display()
        );
        eprintln!("{name}: {} bytes", std::fs::metadata(&path)?.len());
        Ok(path)
    };
    let image = Archive::open(&archive("lakecache")?, &tmp.path().join("lakecache"))?;
    let pause = Archive::open(&archive("pause")?, &tmp.path().join("pause"))?;

    // What `ctr images import --base-name` names them by.
    ensure!(
        image.tag == app_version()?,
        "the image's tag is {}",
        image.tag
    );
    ensure!(
        pause.tag == PAUSE_TAG,
        "the pause image's tag is {}",
        pause.tag
    );

    // The Dockerfile's config.
    ensure!(image.user() == dockerfile.user, "User {}", image.user());
    ensure!(
        image.strings("Entrypoint").is_empty(),
        "Entrypoint {:?}",
        image.strings("Entrypoint")
    );
    ensure!(
        image.strings("Cmd") == dockerfile.cmd,
        "Cmd {:?}",
        image.strings("Cmd")
    );
    let labels: BTreeMap<String, String> =
        serde_json::from_value(image.config["config"]["Labels"].clone()).context("Labels")?;
    ensure!(labels == dockerfile.labels, "Labels {labels:?}");
    let path = image.path_env()?;
    ensure!(
        path.split(':').any(|d| d == "/usr/local/bin"),
        "PATH={path}"
    );

    // The base, then the binaries (the pause image: the base, then its entry point).
    ensure!(image.layers().len() == 2, "layers: {:?}", image.layers());
    ensure!(
        pause.layers().len() == 2,
        "pause layers: {:?}",
        pause.layers()
    );
    ensure!(
        image.layers()[0]["digest"] == pause.layers()[0]["digest"],
        "the two images do not share their base layer"
    );
    let listing = ok(
        Command::new("tar").arg("-tvzf").arg(image.layer_path(1)?),
        COMMAND_LIMIT,
    )?;
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        // -rwxr-xr-x 0/0 1234 2025-01-01 00:00 ./usr/local/bin/lakecache
        let fields: Vec<&str> = line.split_whitespace().collect();
        ensure!(fields.len() == 6, "unexpected tar listing line: {line}");
        if !fields[0].starts_with('d') {
            files.insert(
                fields[5].trim_start_matches("./").to_string(),
                (fields[0].to_string(), fields[1].to_string()),
            );
        }
    }
    let expected: BTreeMap<String, (String, String)> = binaries
        .iter()
        .map(|b| {
            (
                format!("usr/local/bin/{b}"),
                ("-rwxr-xr-x".to_string(), "0/0".to_string()),
            )
        })
        .collect();
    ensure!(
        files == expected,
        "the binaries layer holds {files:?}, not {expected:?}"
    );

    // The image, unpacked: the account and fuse.conf the Dockerfile makes, and every binary
    // running on the image's libc as the image's user.
    let rootfs = image.unpack(&tmp.path().join("lakecache-bundle"))?;
    let etc = |file: &str| std::fs::read_to_string(rootfs.join("etc").join(file));
    let passwd = etc("passwd")?;
    ensure!(
        passwd
            .lines()
            .any(|l| l.starts_with(&format!("{user_name}:x:{uid}:{gid}:"))),
        "/etc/passwd has no {user_name} with {uid}:{gid}:\n{passwd}"
    );
    let group = etc("group")?;
    ensure!(
        group
            .lines()
            .any(|l| l.starts_with(&format!("{user_name}:x:{gid}:"))),
        "/etc/group has no {user_name} with {gid}:\n{group}"
    );
    let fuse_conf = etc("fuse.conf")?;
    ensure!(
        fuse_conf.lines().any(|l| l.trim() == dockerfile.fuse_conf),
        "/etc/fuse.conf has no `{}`:\n{fuse_conf}",
        dockerfile.fuse_conf
    );
    for bin in &binaries {
        let version = in_image(
            &rootfs,
            &image.user(),
            &path,
            &[&format!("/usr/local/bin/{bin}"), "--version"],
        )?;
        ensure!(
            version.starts_with(&format!("{bin} ")),
            "{bin} --version printed {version:?}"
        );
    }
    let cmd = image.strings("Cmd");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let help = in_image(&rootfs, &image.user(), &path, &cmd)?;
    ensure!(!help.is_empty(), "{cmd:?} printed nothing");

    // The pause image's entry point, as a sandbox's PID 1.
    let pause_rootfs = pause.unpack(&tmp.path().join("pause-bundle"))?;
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        pause_exits_on(&pause_rootfs, &pause, signal)?;
    }
    Ok(())
}
