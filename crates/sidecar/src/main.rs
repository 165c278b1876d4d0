//! Flags only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use storerelay_sidecar::tools::SpoolCommand;

#[derive(Parser)]
#[command(
    name = "storerelay-sidecar",
    version,
    about = "A durable, byte-exact mirror of App Store server notifications"
)]
struct Cli {
    /// The config file.
    #[arg(long, env = "STORERELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Validate the config and print it with defaults filled in and secrets redacted; exit 1 on error.
    Check,
    /// Print the config file's JSON Schema.
    Schema,
    /// Decode a notification body from stdin; with --config, also the verification verdict and the
    /// destinations it would go to.
    Inspect,
    /// Inspect or repair a spool (safe beside a running sidecar).
    Spool {
        /// The spool file.
        #[arg(long, env = "STORERELAY_SPOOL")]
        spool: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: SpoolAction,
    },
}

#[derive(Subcommand)]
enum SpoolAction {
    /// Counts per destination and the oldest pending notification.
    Stats,
    /// Deliveries, oldest first (never bodies).
    List {
        #[arg(long)]
        destination: Option<String>,
        /// pending, delivered or dead.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Deliveries given up on.
    Dead {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Schedule deliveries to a destination again now (all finished ones, or only dead ones).
    Redeliver {
        #[arg(long)]
        destination: String,
        /// Only deliveries that were given up on.
        #[arg(long)]
        dead: bool,
        /// Only notifications received since this time (RFC 3339) or duration ago (e.g. 2h).
        #[arg(long)]
        since: Option<String>,
    },
    /// Delete finished deliveries and the notifications nobody needs any more. Pending ones stay.
    Purge {
        #[arg(long)]
        destination: Option<String>,
        /// Dead deliveries too.
        #[arg(long)]
        dead: bool,
        /// Only deliveries finished before this time or duration ago (default: now).
        #[arg(long)]
        before: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let explicit_config = cli.config.clone();
    let config = cli.config.unwrap_or_else(storerelay_sidecar::default_config_path);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            storerelay_sidecar::init_logging();
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => return fail(&format!("cannot start the runtime: {error}")),
            };
            match runtime.block_on(storerelay_sidecar::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "storerelay-sidecar cannot start");
                    fail(&error.to_string())
                }
            }
        }
        Command::Check => match storerelay_sidecar::check(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::Inspect => {
            let mut body = Vec::new();
            if let Err(error) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut body) {
                return fail(&format!("cannot read stdin: {error}"));
            }
            match storerelay_sidecar::inspect(&body, explicit_config.as_deref()) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&error),
            }
        }
        Command::Schema => {
            println!("{:#}", storerelay_config::json_schema());
            ExitCode::SUCCESS
        }
        Command::Spool { spool, json, action } => {
            let command = match action {
                SpoolAction::Stats => SpoolCommand::Stats,
                SpoolAction::List { destination, state, limit } => SpoolCommand::List { destination, state, limit },
                SpoolAction::Dead { destination, limit } => {
                    SpoolCommand::List { destination, state: Some("dead".into()), limit }
                }
                SpoolAction::Redeliver { destination, dead, since } => {
                    SpoolCommand::Redeliver { destination, dead_only: dead, since }
                }
                SpoolAction::Purge { destination, dead, before } => {
                    SpoolCommand::Purge { destination, include_dead: dead, before }
                }
            };
            match storerelay_sidecar::tools::run(&spool, &command, json) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&error),
            }
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("storerelay-sidecar: {message}");
    ExitCode::FAILURE
}
