//! The real-node tier: a kube-apiserver, kube-controller-manager, kube-scheduler, containerd and a kubelet
//! in the test's own network, mount and PID namespaces (tests/node/run.sh makes them and builds everything
//! first), the chart installed with helm, and pods that run the injected sidecar. The scenarios are in
//! [`scenarios`]; this module starts the cluster, runs them in order and prints a summary.

mod cluster;
mod destination;
pub mod namespace;
mod scenarios;

use anyhow::{Context, Result};
use destination::Destination;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};
use storerelay_testenv::node::{Node, NodeOptions};
use storerelay_testenv::postgres::Postgres;
use storerelay_testenv::{Cluster, ClusterOptions, NodeIdentity};

/// What run.sh built and where: everything is ready before the namespaces are entered.
#[derive(Clone, Debug)]
pub struct Options {
    /// The folder run.sh removes afterwards; every temporary file of the run is under it.
    pub work: PathBuf,
    pub kube_bin: PathBuf,
    pub node_bin: PathBuf,
    pub postgres_bin: PathBuf,
    pub helm: PathBuf,
    pub chart: PathBuf,
    /// Image archives to import into containerd.
    pub images: Vec<PathBuf>,
    pub pause_image: String,
    pub app_image: String,
    pub sidecar_image: String,
    pub operator_image: String,
    pub cgroup_root: String,
    pub node_ip: IpAddr,
    /// Run only these scenarios (by number) after the first two, which the others build on; empty: all.
    pub only: Vec<u32>,
}

/// Everything the scenarios share.
pub struct World {
    pub options: Options,
    pub client: kube::Client,
    pub http: reqwest::Client,
    pub destination: Destination,
    pub postgres: Postgres,
    // Dropped in this order: the node (kubelet first), then the API server and etcd.
    pub node: Node,
    pub cluster: Cluster,
}

/// The `kubernetes` Service's ClusterIP for `--service-cluster-ip-range=10.96.0.0/24`.
const SERVICE_IP: [u8; 4] = [10, 96, 0, 1];
const POD_SUBNET: &str = "10.88.0.0/16";
const NODE_NAME: &str = "storerelay-node";

type Scenario = for<'a> fn(&'a World) -> Pin<Box<dyn Future<Output = Result<String>> + 'a>>;

/// Runs every scenario in order, stopping at the first failure (each builds on the one before); prints
/// the summary table; tears the namespace down. Exit status 0 only if all passed.
pub fn run(options: Options) -> Result<()> {
    namespace::check_isolated()?;
    namespace::set_up(options.node_ip, IpAddr::from(SERVICE_IP))?;
    let work = options.work.clone();
    let outcome = tokio::runtime::Runtime::new()?.block_on(run_scenarios(options));
    namespace::tear_down(&work);
    outcome
}

async fn run_scenarios(options: Options) -> Result<()> {
    let started = Instant::now();
    let world = tokio::task::spawn_blocking(move || start_world(options)).await?;
    let world = world?;
    let setup = started.elapsed();
    let scenarios: [(&str, Scenario); 7] = [
        ("1 helm install, operator as pods", |w| Box::pin(scenarios::helm_install(w))),
        ("2 restricted namespace, native sidecar", |w| Box::pin(scenarios::deploy_app(w))),
        ("3 V1/V2 to app and destination", |w| Box::pin(scenarios::notifications(w))),
        ("4 Secret rotation, config reload", |w| Box::pin(scenarios::rotation(w))),
        ("5 backlog across a rollout", |w| Box::pin(scenarios::backlog_across_rollout(w))),
        ("6 pod deletion, SIGTERM order", |w| Box::pin(scenarios::pod_deletion(w))),
        ("7 RestartWorkloads", |w| Box::pin(scenarios::restart_workloads(w))),
    ];
    let mut rows = vec![("setup: cluster, node, images".to_string(), setup, Ok("node Ready".to_string()))];
    for (number, (title, scenario)) in (1..).zip(scenarios) {
        if number > 2 && !world.options.only.is_empty() && !world.options.only.contains(&number) {
            continue;
        }
        let started = Instant::now();
        let outcome = scenario(&world).await;
        let failed = outcome.is_err();
        rows.push((title.to_string(), started.elapsed(), outcome));
        if failed {
            break;
        }
    }
    let failed = rows.iter().any(|(_, _, outcome)| outcome.is_err());
    if failed {
        eprintln!("{}", world.node.logs());
        eprintln!("{}", world.cluster.logs());
        eprintln!("{}", scenarios::diagnostics(&world).await);
    }
    print_summary(&rows);
    let passed = rows.iter().filter(|(_, _, o)| o.is_ok()).count() - 1;
    match rows.into_iter().find_map(|(title, _, outcome)| outcome.err().map(|e| (title, e))) {
        Some((title, error)) => Err(error.context(format!("scenario {title}"))),
        None => {
            println!("{passed} scenarios passed in {:.0}s", started.elapsed().as_secs_f64());
            Ok(())
        }
    }
}

fn start_world(options: Options) -> Result<World> {
    let node_ip = options.node_ip;
    let cluster = Cluster::start_with(
        &options.kube_bin,
        &ClusterOptions {
            address: node_ip,
            // Every address, so that the ClusterIP on `lo` reaches it too.
            bind: Some(IpAddr::from([0, 0, 0, 0])),
            port: Some(443),
            extra_addresses: vec![IpAddr::from(SERVICE_IP)],
            node: Some(NodeIdentity { name: NODE_NAME.into(), ip: node_ip }),
        },
    );
    let node = Node::start(
        &cluster,
        &NodeOptions {
            bin: options.node_bin.clone(),
            name: NODE_NAME.into(),
            ip: node_ip,
            pod_subnet: POD_SUBNET.into(),
            cgroup_root: options.cgroup_root.clone(),
            pause_image: options.pause_image.clone(),
            images: options.images.clone(),
        },
    );
    let mut postgres = Postgres::start(&options.postgres_bin);
    postgres.allow_network(&node_ip.to_string(), POD_SUBNET);
    let runtime = tokio::runtime::Handle::current();
    let destination = runtime.block_on(Destination::start()).context("start the stand-in destination")?;
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
    let client = runtime.block_on(cluster.client());
    Ok(World { options, client, http, destination, postgres, node, cluster })
}

fn print_summary(rows: &[(String, Duration, Result<String>)]) {
    println!("\n{:<42} {:>8}  result", "scenario", "seconds");
    for (title, took, outcome) in rows {
        let result = match outcome {
            Ok(detail) => format!("ok: {detail}"),
            Err(error) => format!("FAILED: {error:#}"),
        };
        println!("{title:<42} {:>8.1}  {result}", took.as_secs_f64());
    }
}
