//! The `features` binary: parses settings, starts logging, runs the producer until done or until
//! SIGTERM/SIGINT.

use features::{Cli, IDENTITY};
use pipeline::service::{ServiceCommand, healthcheck, serve};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_for(&IDENTITY);
    match cli.command {
        Some(ServiceCommand::Healthcheck) => healthcheck(&cli.config).await,
        Some(ServiceCommand::Own(never)) => match never {},
        None => {
            // DRIFT_SHIFT's names are checked against the data set's header: a usage error, exit 2.
            if let Err(err) = cli.config.check_drift_shift() {
                Cli::command_for(&IDENTITY)
                    .error(clap::error::ErrorKind::ValueValidation, err)
                    .exit();
            }
            serve(cli.config, features::run).await
        }
    }
}
