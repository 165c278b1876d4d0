//! Flags only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use storerelay_operator::ctl::{self, OfflineError};

#[derive(Parser)]
#[command(name = "storerelayctl", version, about = "storerelay's injection offline, the CRD, and cluster checks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the NotificationRoute CRD.
    Crd,
    /// Inject the sidecar into the Pods and pod templates a route selects (multi-document YAML).
    Inject(Manifests),
    /// Remove the sidecar from Pods and pod templates.
    Uninject(Manifests),
    /// Print the sidecar config a route renders to.
    RenderConfig {
        #[arg(long)]
        route: PathBuf,
    },
    /// Check storerelay in the current cluster: CRD, webhook certificate, routes.
    Check {
        #[arg(long, default_value = "storerelay")]
        namespace: String,
        #[arg(long, default_value = "storerelay")]
        webhook_configuration: String,
        #[arg(long, default_value = "storerelay-webhook-tls")]
        webhook_secret: String,
    },
}

#[derive(clap::Args)]
struct Manifests {
    /// The NotificationRoute file.
    #[arg(long)]
    route: PathBuf,
    /// Manifests to change; `-` (default) reads standard input.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    file: String,
    /// The sidecar image (default: the operator's).
    #[arg(long)]
    image: Option<String>,
}

fn fail(message: &str) -> ExitCode {
    eprintln!("storerelayctl: {message}");
    ExitCode::FAILURE
}

fn manifests(args: &Manifests, inject: bool) -> Result<String, OfflineError> {
    let input = ctl::read_manifests(&args.file)?;
    ctl::rewrite_manifests(&args.route, &input, args.image.as_deref(), inject)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match cli.command {
        Command::Crd => Ok(storerelay_operator::crd_yaml()),
        Command::Inject(args) => manifests(&args, true),
        Command::Uninject(args) => manifests(&args, false),
        Command::RenderConfig { route } => ctl::render_config(&route),
        Command::Check { namespace, webhook_configuration, webhook_secret } => {
            let target =
                ctl::CheckTarget { namespace, configuration_name: webhook_configuration, secret_name: webhook_secret };
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => return fail(&error.to_string()),
            };
            return match runtime.block_on(async {
                let client = kube::Client::try_default().await?;
                ctl::check(client, &target).await
            }) {
                Ok((report, passed)) => {
                    print!("{report}");
                    if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(error) => fail(&format!("cannot reach the cluster: {error}")),
            };
        }
    };
    match output {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error.to_string()),
    }
}
