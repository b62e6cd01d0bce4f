//! The `lakecache` command.
//!
//! - `lakecache local --source URI --mount DIR`: workers and the FUSE mount in one process.
//! - `lakecache demo`: the embedded default: a generated sample lake behind an emulated slow
//!   link, read for two epochs.

mod demo;
mod local;
mod sample;
mod verify;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lakecache",
    version,
    about = "A distributed read cache for data lakes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "LAKECACHE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: lakecache_telemetry::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run cache workers and mount the cache read-only at a directory, until Ctrl-C.
    Local(local::LocalArgs),
    /// Generate a sample lake, mount it through lakecache, and read it for two epochs.
    Demo(demo::DemoArgs),
    /// Check a mounted dataset against a checksum list (`sha256sum` format), once or in a loop.
    Verify(verify::VerifyArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lakecache_telemetry::install_crypto_provider();
    // An interactive command: warnings only, unless RUST_LOG says otherwise.
    lakecache_telemetry::init_logging(cli.log_format, "warn");
    let env = match &cli.command {
        Command::Local(a) => a.source_spec()?.process_env()?,
        Command::Demo(_) | Command::Verify(_) => Vec::new(),
    };
    let rt = lakecache_telemetry::runtime_with_env(env)?;
    rt.block_on(async move {
        match cli.command {
            Command::Local(a) => local::run(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Verify(a) => verify::run(a).await,
        }
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
