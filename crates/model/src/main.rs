//! The `model` binary: parses settings, starts logging, runs the service until SIGTERM/SIGINT.

use clap::Parser as _;
use model::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Healthcheck) => return pipeline::http::probe(cli.config.http_addr),
        Some(Command::Train {
            data,
            out,
            version,
            target,
        }) => {
            return model::train(&data, &out, version, target.as_deref());
        }
        Some(Command::Rollback { to }) => {
            return model::rollback(cli.config.model_path.as_deref(), &to);
        }
        None => {}
    }
    pipeline::telemetry::init(cli.config.telemetry.log_format);
    model::run(cli.config, pipeline::shutdown::signal()).await
}
