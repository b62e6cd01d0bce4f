//! `lakecache-worker`: one cache worker, configured by a file and flags.

use clap::Parser;
use lakecache_worker::Worker;
use lakecache_worker::config::{WorkerConfig, WorkerConfigExt, WorkerFlags};

#[derive(Debug, Parser)]
#[command(name = "lakecache-worker", version, about = "A lakecache cache worker")]
struct Cli {
    #[command(flatten)]
    worker: WorkerFlags,
    /// Log format: text or json.
    #[arg(long, env = "LAKECACHE_LOG_FORMAT", default_value = "text")]
    log_format: lakecache_telemetry::LogFormat,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lakecache_telemetry::install_crypto_provider();
    lakecache_telemetry::init_logging(cli.log_format, "info");
    let cfg = WorkerConfig::from_flags(&cli.worker)?;
    let rt = lakecache_telemetry::runtime_with_env(cfg.source.process_env()?)?;
    rt.block_on(async move {
        let worker = Worker::start(cfg).await?;
        lakecache_telemetry::shutdown_signal().await;
        worker.stop().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
