//! The `trainer` binary: parses settings, starts logging, runs the service until SIGTERM/SIGINT.

use pipeline::service::{ServiceCommand, healthcheck, serve};
use trainer::{Cli, IDENTITY};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_for(&IDENTITY);
    match cli.command {
        Some(ServiceCommand::Healthcheck) => healthcheck(&cli.config).await,
        Some(ServiceCommand::Own(never)) => match never {},
        None => serve(cli.config, trainer::run).await,
    }
}
