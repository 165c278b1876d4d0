//! `storerelay-node-test`: run by tests/node/run.sh inside the namespaces it makes (see lib.rs).

use clap::Parser;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    work: PathBuf,
    #[arg(long)]
    kube_bin: PathBuf,
    #[arg(long)]
    node_bin: PathBuf,
    #[arg(long)]
    postgres_bin: PathBuf,
    #[arg(long)]
    helm: PathBuf,
    #[arg(long)]
    chart: PathBuf,
    /// An image archive to import into containerd (repeat).
    #[arg(long = "image-archive")]
    images: Vec<PathBuf>,
    #[arg(long)]
    pause_image: String,
    #[arg(long)]
    app_image: String,
    #[arg(long)]
    sidecar_image: String,
    #[arg(long)]
    operator_image: String,
    #[arg(long, default_value = "/storerelay-node")]
    cgroup_root: String,
    #[arg(long, default_value = "10.200.0.1")]
    node_ip: IpAddr,
    /// Only these scenarios (comma-separated numbers) after 1 and 2, which the others build on.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let options = storerelay_node_test::Options {
        work: args.work,
        kube_bin: args.kube_bin,
        node_bin: args.node_bin,
        postgres_bin: args.postgres_bin,
        helm: args.helm,
        chart: args.chart,
        images: args.images,
        pause_image: args.pause_image,
        app_image: args.app_image,
        sidecar_image: args.sidecar_image,
        operator_image: args.operator_image,
        cgroup_root: args.cgroup_root,
        node_ip: args.node_ip,
        only: args.only,
    };
    match storerelay_node_test::run(options) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("storerelay-node-test: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
