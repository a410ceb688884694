//! The `model` binary: parses settings, starts logging, runs the service until SIGTERM/SIGINT.

use model::{Cli, Command, IDENTITY};
use pipeline::service::{ServiceCommand, healthcheck, serve};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_for(&IDENTITY);
    match cli.command {
        Some(ServiceCommand::Healthcheck) => healthcheck(&cli.config).await,
        Some(ServiceCommand::Own(Command::Train {
            data,
            out,
            version,
            target,
            task,
        })) => model::train(&data, &out, version, target.as_deref(), task),
        Some(ServiceCommand::Own(Command::Inspect {
            model,
            data,
            target,
        })) => {
            model::onnx::use_runtime_library(cli.config.ort_dylib_path.as_deref());
            model::inspect(&model, data.as_deref(), target.as_deref())
        }
        Some(ServiceCommand::Own(Command::Stamp {
            model,
            out,
            data,
            target,
            feature_names,
            version,
        })) => {
            model::onnx::use_runtime_library(cli.config.ort_dylib_path.as_deref());
            model::stamp_model(
                &model,
                out.as_deref(),
                data.as_deref(),
                target.as_deref(),
                feature_names,
                version,
            )
        }
        Some(ServiceCommand::Own(Command::Rollback { to })) => {
            model::rollback(cli.config.model_path.as_deref(), &to)
        }
        None => serve(cli.config, model::run).await,
    }
}
