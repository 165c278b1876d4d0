//! Flags only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use storerelay_sidecar::cli::{self, AppleCommand, SpoolCommand};

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
        /// The spool file (default: the config file's `spool.path`).
        #[arg(long, env = "STORERELAY_SPOOL")]
        spool: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: SpoolCommand,
    },
    /// Ask Apple's App Store Server API (needs `appStoreServerApi` in the config).
    Apple {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: AppleCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config.clone().unwrap_or_else(|| PathBuf::from(cli::DEFAULT_CONFIG_PATH));
    let printed = match cli.command.unwrap_or(Command::Run) {
        Command::Run => return run(&config),
        Command::Check => cli::check(&config),
        Command::Schema => Ok(storerelay_config::JSON_SCHEMA.to_string()),
        Command::Inspect => {
            let mut body = Vec::new();
            if let Err(error) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut body) {
                return fail(&format!("cannot read stdin: {error}"));
            }
            cli::inspect(&body, cli.config.as_deref())
        }
        Command::Spool { spool, json, action } => cli::spool(spool.as_deref(), &action, json, &config),
        Command::Apple { json, action } => cli::apple(&action, json, &config),
    };
    match printed {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error.to_string()),
    }
}

fn run(config: &std::path::Path) -> ExitCode {
    storerelay_runtime::log::init();
    match storerelay_sidecar::run_blocking(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "storerelay-sidecar cannot start");
            fail(&error.to_string())
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("storerelay-sidecar: {message}");
    ExitCode::FAILURE
}
