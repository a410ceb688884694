//! The command line every service binary shares: its settings (a `clap::Args` struct of the
//! service, flattening [`crate::config`]'s common groups) and an optional subcommand, of which
//! `healthcheck` is common to all ([`ServiceCli`], [`ServiceCommand`]); and the two things every
//! `main` does with it ([`healthcheck`], [`serve`]).
//!
//! Each service keeps its own settings struct, so the order of `--help` and its `HTTP_ADDR`
//! default stay its own; it says where the common settings are by [`ServiceConfig`].

use crate::config::{BrokerConfig, QueueNames, TelemetryConfig, TopologyMode};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use std::net::SocketAddr;

/// What every service's settings hold.
pub trait ServiceConfig: Args {
    /// Address of `/healthz` and `/metrics` (`HTTP_ADDR`).
    fn http_addr(&self) -> SocketAddr;
    /// Logging settings.
    fn telemetry(&self) -> &TelemetryConfig;
    /// Broker settings.
    fn broker(&self) -> &BrokerConfig;
    /// The streams' queue names and `PARTITIONS`, for a service that has them.
    fn queues(&self) -> Option<&QueueNames> {
        None
    }
}

/// Implements [`ServiceConfig`] for a settings struct of the services' shape: the fields
/// `http_addr`, `telemetry`, `broker` and `queues`.
#[macro_export]
macro_rules! impl_service_config {
    ($config:ty) => {
        impl $crate::service::ServiceConfig for $config {
            fn http_addr(&self) -> ::std::net::SocketAddr {
                self.http_addr
            }
            fn telemetry(&self) -> &$crate::config::TelemetryConfig {
                &self.telemetry
            }
            fn broker(&self) -> &$crate::config::BrokerConfig {
                &self.broker
            }
            fn queues(&self) -> ::std::option::Option<&$crate::config::QueueNames> {
                ::std::option::Option::Some(&self.queues)
            }
        }
    };
}

/// Settings that contradict each other across groups, found before anything starts.
pub fn check<C: ServiceConfig>(config: &C) -> anyhow::Result<()> {
    if let Some(queues) = config.queues()
        && config.broker().topology == TopologyMode::Course
        && queues.partitions.is_partitioned()
    {
        anyhow::bail!(
            "TOPOLOGY=course declares one queue per stream, as the course's code does: PARTITIONS \
             must be 1 (it is {})",
            queues.partitions
        );
    }
    Ok(())
}

/// Name, version and one-line description of a binary, for `--help` and `--version`.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// The binary's name.
    pub name: &'static str,
    /// Its version (`env!("CARGO_PKG_VERSION")` of its crate).
    pub version: &'static str,
    /// What it does.
    pub about: &'static str,
}

/// Command line of a service: its settings `C` and what to do instead of serving.
#[derive(Parser, Debug)]
pub struct ServiceCli<C: Args, S: Subcommand = NoCommand> {
    /// Settings of the service.
    #[command(flatten)]
    pub config: C,
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<ServiceCommand<S>>,
}

/// The subcommands of a service: `healthcheck`, then its own `S`.
#[derive(Subcommand, Debug)]
pub enum ServiceCommand<S: Subcommand> {
    /// Probe this service's /healthz at HTTP_ADDR; exit 0 when healthy (for container healthchecks).
    Healthcheck,
    /// The service's own subcommands.
    #[command(flatten)]
    Own(S),
}

/// No subcommand of the service's own.
#[derive(Debug, Clone, Copy)]
pub enum NoCommand {}

impl clap::FromArgMatches for NoCommand {
    fn from_arg_matches(_: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand))
    }

    fn update_from_arg_matches(&mut self, _: &clap::ArgMatches) -> Result<(), clap::Error> {
        match *self {}
    }
}

impl clap::Subcommand for NoCommand {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn has_subcommand(_: &str) -> bool {
        false
    }
}

impl<C: Args, S: Subcommand> ServiceCli<C, S> {
    /// The clap command of the binary `identity` (for `--help`, and for usage errors found after
    /// parsing: `ServiceCli::command_for(&ID).error(..).exit()`).
    pub fn command_for(identity: &Identity) -> clap::Command {
        Self::command()
            .name(identity.name)
            .version(identity.version)
            .about(identity.about)
    }

    /// Parses the process's arguments (and environment); on a usage error, `--help` or
    /// `--version` prints and exits, like `Parser::parse`.
    pub fn parse_for(identity: &Identity) -> Self {
        let matches = Self::command_for(identity).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
    }

    /// Parses `args` (the first is the binary's name) and the environment.
    pub fn try_parse_for<I, T>(identity: &Identity, args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command_for(identity).try_get_matches_from(args)?;
        Self::from_arg_matches(&matches)
    }
}

/// `<binary> healthcheck`: probes the service's own `/healthz` at its `HTTP_ADDR`.
pub async fn healthcheck<C: ServiceConfig>(config: &C) -> anyhow::Result<()> {
    crate::http::probe(config.http_addr()).await
}

/// The shutdown signal handed to a service's `run`: SIGTERM/SIGINT ([`crate::shutdown::signal`]).
pub type Signal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts logging and runs the service until it ends or SIGTERM/SIGINT:
/// `pipeline::service::serve(cli.config, metric::run).await`.
pub async fn serve<C, F, Fut>(config: C, run: F) -> anyhow::Result<()>
where
    C: ServiceConfig,
    F: FnOnce(C, Signal) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init(config.telemetry().log_format);
    check(&config)?;
    run(config, Box::pin(crate::shutdown::signal())).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_socket_addr;

    #[derive(Args, Debug)]
    struct Config {
        #[command(flatten)]
        broker: BrokerConfig,
        #[command(flatten)]
        telemetry: TelemetryConfig,
        /// Address of /healthz and /metrics.
        #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9199", value_parser = parse_socket_addr)]
        http_addr: SocketAddr,
    }

    impl ServiceConfig for Config {
        fn http_addr(&self) -> SocketAddr {
            self.http_addr
        }
        fn telemetry(&self) -> &TelemetryConfig {
            &self.telemetry
        }
        fn broker(&self) -> &BrokerConfig {
            &self.broker
        }
    }

    #[derive(Args, Debug)]
    struct WithQueues {
        #[command(flatten)]
        inner: Config,
        #[command(flatten)]
        queues: QueueNames,
    }

    impl ServiceConfig for WithQueues {
        fn http_addr(&self) -> SocketAddr {
            self.inner.http_addr
        }
        fn telemetry(&self) -> &TelemetryConfig {
            &self.inner.telemetry
        }
        fn broker(&self) -> &BrokerConfig {
            &self.inner.broker
        }
        fn queues(&self) -> Option<&QueueNames> {
            Some(&self.queues)
        }
    }

    #[test]
    fn course_topology_with_partitions_is_refused_before_start() {
        let parse = |args: &[&str]| {
            ServiceCli::<WithQueues>::try_parse_from(
                std::iter::once("svc").chain(args.iter().copied()),
            )
            .unwrap()
            .config
        };
        assert!(check(&parse(&["--topology", "course"])).is_ok());
        assert!(check(&parse(&["--partitions", "4"])).is_ok());
        let err = check(&parse(&["--topology", "course", "--partitions", "4"])).unwrap_err();
        assert!(err.to_string().contains("PARTITIONS must be 1"), "{err}");
    }

    #[derive(Subcommand, Debug, PartialEq)]
    enum Own {
        /// Fit a model.
        Train {
            /// Where.
            #[arg(long)]
            out: String,
        },
    }

    const ID: Identity = Identity {
        name: "demo",
        version: "1.2.3",
        about: "Does demo things",
    };

    #[test]
    fn healthcheck_and_own_subcommands_parse() {
        let cli = ServiceCli::<Config, Own>::try_parse_for(&ID, ["demo", "healthcheck"]).unwrap();
        assert!(matches!(cli.command, Some(ServiceCommand::Healthcheck)));
        let cli =
            ServiceCli::<Config, Own>::try_parse_for(&ID, ["demo", "train", "--out", "x"]).unwrap();
        assert!(matches!(cli.command, Some(ServiceCommand::Own(Own::Train { out })) if out == "x"));
        let cli = ServiceCli::<Config>::try_parse_for(&ID, ["demo"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config.http_addr().port(), 9199);
        assert!(ServiceCli::<Config>::try_parse_for(&ID, ["demo", "train"]).is_err());
    }

    #[test]
    fn help_names_the_binary_and_its_subcommands() {
        let help = ServiceCli::<Config, Own>::command_for(&ID)
            .render_help()
            .to_string();
        assert!(help.starts_with("Does demo things"), "{help}");
        assert!(help.contains("Usage: demo [OPTIONS] [COMMAND]"), "{help}");
        let healthcheck = help
            .find("healthcheck  Probe this service's /healthz")
            .unwrap();
        assert!(healthcheck < help.find("train").unwrap(), "{help}");
        assert!(help.contains("[env: AMQP_URL]"), "{help}");
        assert!(help.contains("[env: HTTP_ADDR=]") || help.contains("[env: HTTP_ADDR]"));
        let version = ServiceCli::<Config>::command_for(&ID).render_version();
        assert_eq!(version, "demo 1.2.3\n");
    }
}
