//! `lakecache-csi-node`: the CSI node plugin, its mounter, the FUSE servers, and the registrar
//! that registers the plugin with kubelet.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};
use lakecache_csi_node::mounter::{self, MounterConfig};
use lakecache_csi_node::node::PluginConfig;
use lakecache_csi_node::registrar::{self, RegistrarConfig};
use lakecache_csi_node::state::StateDir;
use lakecache_csi_node::volume::{Caps, FuseServerConfig};
use lakecache_csi_node::{PluginOptions, fuse_server, socket_path, start_plugin};

#[derive(Debug, Parser)]
#[command(
    name = "lakecache-csi-node",
    version = lakecache_csi_node::VERSION,
    about = "The lakecache CSI node plugin (csi.lakecache.io)"
)]
struct Cli {
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "LAKECACHE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: lakecache_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI Identity and Node services (the plugin container).
    Plugin(PluginArgs),
    /// Host the FUSE servers (the mounter sidecar container).
    Mounter(MounterArgs),
    /// Register the plugin with kubelet (the node-driver-registrar container).
    Registrar(RegistrarArgs),
    /// Bring the node DaemonSet's pods to its template's images in place, one container at a
    /// time, so that their mounts survive (the chart's post-upgrade hook).
    Roll(lakecache_csi_node::roll::RollArgs),
    /// Replace the node's running FUSE servers in place with successors running another binary
    /// (or this one): each takes its predecessor's FUSE connection, so the mounts and the files
    /// open on them stay. Run in the mounter container.
    UpgradeFuse(UpgradeFuseArgs),
    /// Serve one volume through FUSE (started by the mounter).
    #[command(hide = true)]
    FuseServer {
        /// The configuration the plugin wrote.
        #[arg(long)]
        config: PathBuf,
        /// Take over the mount's FUSE connection, given on standard input, from the server
        /// that served it (running or gone) instead of mounting.
        #[arg(long)]
        successor: bool,
        /// The connection's name (the mount's device number, as the keeper was told): a
        /// successor takes over only the connection still mounted at the mount path.
        #[arg(long, requires = "successor")]
        connection: Option<u64>,
    },
}

/// The state directory, as every command that uses it takes it.
#[derive(Debug, Args)]
struct StateDirArg {
    /// Where the plugin keeps its state (every volume's token and journal, the mounter's
    /// socket); shared by the plugin and the mounter and with no other container. Made mode
    /// 0700 at start.
    #[arg(
        long,
        env = "LAKECACHE_STATE_DIR",
        default_value = lakecache_csi_node::state::DEFAULT_ROOT
    )]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
struct PluginArgs {
    /// The CSI socket kubelet talks to.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (NodeGetInfo's node id).
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    #[command(flatten)]
    state: StateDirArg,
    /// The state directory of earlier versions (inside kubelet's plugin directory): volumes
    /// staged there are moved to --state-dir at start. Empty: none.
    #[arg(
        long,
        env = "LAKECACHE_LEGACY_STATE_DIR",
        default_value = lakecache_csi_node::state::LEGACY_ROOT
    )]
    legacy_state_dir: PathBuf,
    /// Address of /metrics, /livez and /readyz.
    #[arg(long, env = "LAKECACHE_ADMIN_LISTEN", default_value = "0.0.0.0:9810")]
    admin_listen: std::net::SocketAddr,
    /// How often mounts are checked and broken ones repaired.
    #[arg(long, env = "LAKECACHE_REPAIR_INTERVAL", default_value = "10s")]
    repair_interval: humantime::Duration,
    /// Read-ahead memory of each mount, unless the volume sets prefetchBudget.
    #[arg(long, env = "LAKECACHE_PREFETCH_BUDGET", default_value = "256MiB")]
    prefetch_budget: ByteSize,
    /// Threads reading /dev/fuse in each FUSE server.
    #[arg(long, env = "LAKECACHE_FUSE_THREADS", default_value_t = 2)]
    fuse_threads: usize,
    /// Where FUSE servers keep node-local copies of whole files, handed to the kernel with FUSE
    /// passthrough (a tmpfs such as /dev/shm/lakecache for memory speed); off without it.
    #[arg(long, env = "LAKECACHE_LOCAL_CACHE_DIR")]
    local_cache_dir: Option<PathBuf>,
    /// How much each volume may keep there, unless its volume sets localCacheSize.
    #[arg(long, env = "LAKECACHE_LOCAL_CACHE_SIZE", default_value = "0")]
    local_cache_size: ByteSize,
    /// How long a new mount waits for a first cache worker to answer.
    #[arg(long, env = "LAKECACHE_STARTUP_TIMEOUT", default_value = "30s")]
    startup_timeout: humantime::Duration,
    /// The most read-ahead memory a volume may ask for (prefetchBudget); 0 for no cap.
    #[arg(long, env = "LAKECACHE_MAX_PREFETCH_BUDGET", default_value = "1GiB")]
    max_prefetch_budget: ByteSize,
    /// The most node-local copies a volume may ask for (localCacheSize); 0 for no cap.
    #[arg(long, env = "LAKECACHE_MAX_LOCAL_CACHE_SIZE", default_value = "16GiB")]
    max_local_cache_size: ByteSize,
    /// The mounter container's memory limit, which all FUSE servers share (the chart passes
    /// the mounter's limits.memory through the downward API); a volume whose FUSE server would
    /// not fit is refused. 0: unknown, no check.
    #[arg(long, env = "LAKECACHE_MOUNTER_MEMORY_LIMIT", default_value = "0")]
    mounter_memory_limit: ByteSize,
    /// Memory of one FUSE server beyond its prefetch budget (read reserve, copy queue,
    /// listings, the process), counted for every staged volume against the mounter's memory
    /// limit. Without it: 96 MiB + the listing budget at 256 bytes an entry + 32 MiB (177 MiB
    /// with the default listing budget).
    #[arg(long, env = "LAKECACHE_FUSE_SERVER_OVERHEAD")]
    fuse_server_overhead: Option<ByteSize>,
    /// Entries of directory listings each FUSE server keeps (about 256 bytes each); a
    /// directory larger than this is still listed, and kept alone.
    #[arg(long, env = "LAKECACHE_LISTING_BUDGET", default_value_t = lakecache_csi_node::node::DEFAULT_LISTING_BUDGET)]
    listing_budget: usize,
    /// Whether FUSE servers read block bytes over the block transport (a plain connection
    /// beside gRPC on the worker's port, with `sendfile` on the worker) where workers speak it;
    /// `false` reads every block over gRPC.
    #[arg(long, env = "LAKECACHE_BLOCK_TRANSPORT", default_value_t = true, action = clap::ArgAction::Set)]
    block_transport: bool,
    /// How long a CSI call may wait on a filesystem call (a look into the cache mount, which
    /// asks the workers; a bind mount) before it answers Unavailable.
    #[arg(long, env = "LAKECACHE_FS_TIMEOUT", default_value = "20s")]
    fs_timeout: humantime::Duration,
}

#[derive(Debug, Args)]
struct MounterArgs {
    #[command(flatten)]
    state: StateDirArg,
    /// How long a FUSE server may take to mount.
    #[arg(long, env = "LAKECACHE_MOUNT_TIMEOUT", default_value = "60s")]
    mount_timeout: humantime::Duration,
}

#[derive(Debug, Args)]
struct RegistrarArgs {
    /// The CSI plugin's socket, as this container sees it.
    #[arg(long, env = "LAKECACHE_CSI_ADDRESS", default_value = "/csi/csi.sock")]
    csi_address: String,
    /// The CSI plugin's socket as kubelet dials it: its path on the host
    /// (<kubelet-root>/plugins/csi.lakecache.io/csi.sock).
    #[arg(long, env = "LAKECACHE_KUBELET_REGISTRATION_PATH")]
    kubelet_registration_path: PathBuf,
    /// kubelet's plugin registry directory (<kubelet-root>/plugins_registry on the host), as
    /// this container sees it; the registration socket is <driver>-reg.sock in it.
    #[arg(
        long,
        env = "LAKECACHE_REGISTRATION_DIR",
        default_value = "/registration"
    )]
    registration_dir: PathBuf,
    /// How long to wait for the plugin to answer GetPluginInfo before giving up.
    #[arg(long, env = "LAKECACHE_CSI_TIMEOUT", default_value = "60s")]
    csi_timeout: humantime::Duration,
    /// Address of /metrics, /livez and /readyz (ready once kubelet registered the plugin).
    #[arg(long, env = "LAKECACHE_ADMIN_LISTEN", default_value = "0.0.0.0:9809")]
    admin_listen: std::net::SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lakecache_telemetry::install_crypto_provider();
    lakecache_telemetry::init_logging(cli.log_format, "info");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = run(cli.command, &rt);
    // A thread still blocked on a hung mount must not keep a stopping container waiting out
    // its grace period.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn run(command: Command, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    match command {
        Command::Plugin(a) => rt.block_on(plugin(a)),
        Command::Mounter(a) => rt.block_on(async move {
            let state = StateDir::open(&a.state.state_dir)
                .with_context(|| format!("opening {}", a.state.state_dir.display()))?;
            let cfg = MounterConfig {
                state,
                exe: std::env::current_exe().context("finding this binary")?,
                mount_timeout: *a.mount_timeout,
                stop_timeout: Duration::from_secs(10),
            };
            mounter::serve(cfg, lakecache_telemetry::shutdown_signal()).await
        }),
        Command::Registrar(a) => rt.block_on(async move {
            let cfg = RegistrarConfig {
                csi_socket: socket_path(&a.csi_address)?,
                kubelet_registration_path: a.kubelet_registration_path,
                registration_dir: a.registration_dir,
                csi_timeout: *a.csi_timeout,
                admin_listen: a.admin_listen,
            };
            registrar::run(cfg, lakecache_telemetry::shutdown_signal()).await?;
            Ok(())
        }),
        Command::Roll(a) => Ok(rt.block_on(lakecache_csi_node::roll::run(a))?),
        Command::UpgradeFuse(a) => rt.block_on(upgrade_fuse(a)),
        Command::FuseServer {
            config,
            successor,
            connection,
        } => {
            let text =
                std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
            let cfg: FuseServerConfig = serde_json::from_slice(&text)
                .with_context(|| format!("parsing {}", config.display()))?;
            let mut out = std::io::stdout();
            let metrics = lakecache_csi_node::fuse_metrics::snapshot_path(&config);
            let dir = config
                .parent()
                .context("the configuration file is in the volume's directory")?
                .to_path_buf();
            let device = if successor {
                use std::os::fd::AsFd;
                let fd = std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("taking the FUSE connection from standard input")?;
                // Standard input lets go of the connection (it is not close-on-exec).
                let null = std::fs::File::open("/dev/null").context("opening /dev/null")?;
                nix::unistd::dup2_stdin(null).context("replacing standard input")?;
                let id = connection.context("--successor needs --connection")?;
                Some((fd, id))
            } else {
                None
            };
            rt.block_on(fuse_server::run(cfg, &dir, device, &mut out, Some(metrics)))
        }
    }
}

#[derive(Debug, Args)]
struct UpgradeFuseArgs {
    #[command(flatten)]
    state: StateDirArg,
    /// The binary the successors run, as the mounter sees it; default: the mounter's own.
    #[arg(long, env = "LAKECACHE_UPGRADE_EXE")]
    exe: Option<PathBuf>,
    /// Only these volumes (by CSI volume id, the flag repeated); default: every staged volume.
    #[arg(long, env = "LAKECACHE_UPGRADE_VOLUME")]
    volume: Vec<String>,
}

async fn upgrade_fuse(a: UpgradeFuseArgs) -> anyhow::Result<()> {
    use lakecache_proto::lakecache::v1::MountRequest;
    let state = StateDir::open(&a.state.state_dir)
        .with_context(|| format!("opening {}", a.state.state_dir.display()))?;
    let mut mounter = lakecache_csi_node::mounter_client(&state.mounter_socket());
    let mut failed = 0;
    for rec in state.all() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping a volume whose state cannot be read: {e}");
                continue;
            }
        };
        if !a.volume.is_empty() && !a.volume.contains(&rec.volume_id) {
            continue;
        }
        let req = MountRequest {
            volume_id: rec.volume_id.clone(),
            mount_path: rec.staging_path.display().to_string(),
            config_path: state.fuse_config_path(&rec.volume_id).display().to_string(),
            replace: true,
            exe: a
                .exe
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        };
        match mounter.mount(req).await {
            Ok(r) if r.get_ref().took_over => {
                println!("{}: pid {} took over", rec.volume_id, r.get_ref().pid)
            }
            Ok(r) => {
                failed += 1;
                println!(
                    "{}: pid {} mounted anew (the connection was not kept; files open on it broke)",
                    rec.volume_id,
                    r.get_ref().pid
                )
            }
            Err(s) => {
                failed += 1;
                println!("{}: {}", rec.volume_id, s.message())
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} volume(s) were not upgraded in place");
    Ok(())
}

async fn plugin(a: PluginArgs) -> anyhow::Result<()> {
    let opts = PluginOptions {
        endpoint: socket_path(&a.endpoint)?,
        state_dir: a.state.state_dir,
        legacy_state_dir: Some(a.legacy_state_dir).filter(|p| !p.as_os_str().is_empty()),
        admin_listen: a.admin_listen,
        repair_interval: *a.repair_interval,
        plugin: PluginConfig {
            node_id: a.node_id,
            prefetch_budget: a.prefetch_budget.as_u64(),
            fuse_threads: a.fuse_threads,
            local_cache_dir: a.local_cache_dir,
            local_cache_size: a.local_cache_size.as_u64(),
            startup_timeout: *a.startup_timeout,
            mounter_timeout: *a.startup_timeout + Duration::from_secs(30),
            caps: Caps {
                max_prefetch_budget: a.max_prefetch_budget.as_u64(),
                max_local_cache_size: a.max_local_cache_size.as_u64(),
            },
            mounter_memory: a.mounter_memory_limit.as_u64(),
            fuse_server_overhead: a.fuse_server_overhead.map_or_else(
                || lakecache_csi_node::node::fuse_server_overhead(a.listing_budget),
                |o| o.as_u64(),
            ),
            listing_budget: a.listing_budget,
            block_transport: a.block_transport,
            fs_timeout: *a.fs_timeout,
        },
    };
    anyhow::ensure!(
        !opts.plugin.node_id.is_empty(),
        "--node-id (or NODE_NAME) must not be empty"
    );
    let c = &opts.plugin;
    anyhow::ensure!(
        c.caps.max_prefetch_budget == 0 || c.prefetch_budget <= c.caps.max_prefetch_budget,
        "--prefetch-budget ({}) is more than --max-prefetch-budget ({})",
        a.prefetch_budget,
        a.max_prefetch_budget
    );
    let running = start_plugin(opts).await?;
    lakecache_telemetry::shutdown_signal().await;
    running.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn plugin_caps_and_the_mounters_memory_parse_as_the_chart_sets_them() {
        let cli = Cli::try_parse_from([
            "lakecache-csi-node",
            "plugin",
            "--node-id",
            "n",
            // The downward API gives limits.memory in bytes.
            "--mounter-memory-limit",
            "2147483648",
            "--max-prefetch-budget",
            "1GiB",
            "--max-local-cache-size",
            "16GiB",
        ])
        .unwrap();
        let Command::Plugin(a) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(a.mounter_memory_limit.as_u64(), 2 << 30);
        assert_eq!(a.max_prefetch_budget.as_u64(), 1 << 30);
        assert_eq!(a.max_local_cache_size.as_u64(), 16 << 30);
        assert_eq!(
            a.fuse_server_overhead, None,
            "computed from the listing budget"
        );
        assert_eq!(a.listing_budget, 200_000);
        assert_eq!(
            a.state.state_dir,
            PathBuf::from("/var/lib/kubelet/plugins/csi.lakecache.io-state")
        );
    }

    #[test]
    fn registrar_needs_the_host_path_of_the_plugin_socket() {
        let err = Cli::try_parse_from(["lakecache-csi-node", "registrar"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = Cli::try_parse_from([
            "lakecache-csi-node",
            "registrar",
            "--kubelet-registration-path",
            "/var/lib/kubelet/plugins/csi.lakecache.io/csi.sock",
        ])
        .unwrap();
        let Command::Registrar(a) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(a.csi_address, "/csi/csi.sock");
        assert_eq!(a.registration_dir, PathBuf::from("/registration"));
        assert_eq!(*a.csi_timeout, Duration::from_secs(60));
    }
}
