//! Flags only; the work is in the library.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use storerelay_operator::NotificationRoute;
use storerelay_operator::inject::{InjectOptions, injection};

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

fn read_route(path: &Path) -> Result<NotificationRoute, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: not a NotificationRoute: {e}", path.display()))
}

fn read_input(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| format!("standard input: {e}"))?;
        return Ok(text);
    }
    std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))
}

fn manifests(args: &Manifests, inject: bool) -> Result<String, String> {
    let route = read_route(&args.route)?;
    let mut options = InjectOptions::default();
    if let Some(image) = &args.image {
        options.image = image.clone();
    }
    let injection = injection(&route, &options);
    let input = read_input(&args.file)?;
    let result = if inject {
        storerelay_operator::manifests::inject_documents(&input, &route, &injection)
    } else {
        storerelay_operator::manifests::uninject_documents(&input, &route, &injection)
    };
    result.map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match cli.command {
        Command::Crd => Ok(storerelay_operator::crd_yaml()),
        Command::Inject(args) => manifests(&args, true),
        Command::Uninject(args) => manifests(&args, false),
        Command::RenderConfig { route } => read_route(&route).and_then(|r| {
            storerelay_operator::render::render_yaml(&r).map_err(|e| format!("{}: {e}", route.display()))
        }),
        Command::Check { namespace, webhook_configuration, webhook_secret } => {
            let target = storerelay_operator::ctl::CheckTarget {
                namespace,
                configuration_name: webhook_configuration,
                secret_name: webhook_secret,
            };
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => return fail(&error.to_string()),
            };
            return match runtime.block_on(async {
                let client = kube::Client::try_default().await?;
                storerelay_operator::ctl::check(client, &target).await
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
        Err(error) => fail(&error),
    }
}
