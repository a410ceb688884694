//! The `features` binary: parses settings, starts logging, runs the producer until done or until
//! SIGTERM/SIGINT.

use clap::{CommandFactory as _, Parser as _};
use features::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck) = cli.command {
        return pipeline::http::probe(cli.config.http_addr);
    }
    // DRIFT_SHIFT's names are checked against the data set's header: a usage error, exit 2.
    if let Err(err) = cli.config.check_drift_shift() {
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, err)
            .exit();
    }
    pipeline::telemetry::init(cli.config.telemetry.log_format);
    features::run(cli.config, pipeline::shutdown::signal()).await
}
