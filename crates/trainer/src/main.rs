//! The `trainer` binary: parses settings, starts logging, runs the service until SIGTERM/SIGINT.

use clap::Parser as _;
use trainer::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck) = cli.command {
        return pipeline::http::probe(cli.config.http_addr);
    }
    pipeline::telemetry::init(cli.config.telemetry.log_format);
    trainer::run(cli.config, pipeline::shutdown::signal()).await
}
