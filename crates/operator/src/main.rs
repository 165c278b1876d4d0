//! Flags only; the work is in the library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use storerelay_operator::inject::{ImagePolicy, InjectOptions};
use storerelay_operator::run::{Settings, run};
use storerelay_operator::webhook_config::{CertMode, WebhookSettings};

#[derive(Parser)]
#[command(
    name = "storerelay-operator",
    version,
    about = "Injects the storerelay sidecar into pods selected by NotificationRoutes"
)]
struct Flags {
    /// The operator's namespace (its Lease, certificate Secret and webhook Service live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "storerelay")]
    namespace: String,
    /// This replica's name: the leader-election identity.
    #[arg(long, env = "POD_NAME", default_value = "storerelay-operator")]
    pod_name: String,
    #[arg(long, default_value = "0.0.0.0:8443")]
    webhook_addr: SocketAddr,
    /// /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// The sidecar image injected unless a route names another.
    #[arg(long, env = "STORERELAY_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    #[arg(long)]
    sidecar_image_pull_policy: Option<String>,
    /// An image a route may name in spec.sidecar.image besides the operator's (repeatable; `*` allows
    /// any). Without one, routes may not choose another image.
    #[arg(long = "allowed-sidecar-image")]
    allowed_sidecar_images: Vec<String>,
    #[arg(long, default_value = "storerelay-operator")]
    lease_name: String,
    #[arg(long, default_value = "storerelay")]
    webhook_configuration: String,
    #[arg(long, default_value = "storerelay-webhook")]
    webhook_service: String,
    #[arg(long, default_value = "storerelay-webhook-tls")]
    webhook_secret: String,
    /// Serve the certificate in these files (cert-manager mode) instead of making one.
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Extra IP addresses for the generated certificate (webhooks called by IP, as in tests).
    #[arg(long = "cert-ip")]
    cert_ips: Vec<IpAddr>,
    /// Check that referenced Secrets exist (needs `get` on Secrets: chart value rbac.checkSecrets).
    #[arg(long)]
    check_secrets: bool,
    /// Allow rollout.policy RestartWorkloads to patch workloads (chart value rbac.restartWorkloads).
    #[arg(long)]
    allow_workload_restarts: bool,
}

fn main() -> ExitCode {
    storerelay_operator::run::limit_malloc_arenas();
    let flags = Flags::parse();
    storerelay_runtime::log::init();
    let mode = match (flags.tls_cert_file, flags.tls_key_file) {
        (Some(cert), Some(key)) => CertMode::Files { cert, key },
        _ => CertMode::Operator,
    };
    let defaults = InjectOptions::default();
    let settings = Settings {
        webhook_addr: flags.webhook_addr,
        admin_addr: flags.admin_addr,
        identity: flags.pod_name,
        lease_name: flags.lease_name,
        inject: InjectOptions {
            image: flags.sidecar_image.unwrap_or(defaults.image),
            image_pull_policy: flags.sidecar_image_pull_policy,
            image_policy: if flags.allowed_sidecar_images.iter().any(|i| i == "*") {
                ImagePolicy::Any
            } else {
                ImagePolicy::Only(flags.allowed_sidecar_images)
            },
        },
        check_secrets: flags.check_secrets,
        restarts_allowed: flags.allow_workload_restarts,
        webhook: WebhookSettings {
            namespace: flags.namespace,
            secret_name: flags.webhook_secret,
            service_name: flags.webhook_service,
            configuration_name: flags.webhook_configuration,
            mode,
            extra_dns_names: Vec::new(),
            extra_ips: flags.cert_ips,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("storerelay-operator: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "storerelay-operator cannot start");
            eprintln!("storerelay-operator: {error}");
            ExitCode::FAILURE
        }
    }
}
