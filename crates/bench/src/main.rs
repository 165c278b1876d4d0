//! `make bench` / `make bench-quick`: one run that measures, on this machine and side by side,
//! going straight to a stand-in app, going through storerelay-sidecar, through the Express + axios
//! forwarder most teams write (bench/forwarder.js), and through nginx's `mirror`; then the sidecar's own
//! spool numbers (SQLite and PostgreSQL side by side) and the webhook's admission latency. Everything listens on 127.0.0.1; every load is
//! bounded in count and time. Results: target/bench/results.json and docs/benchmarks.md.

mod load;
mod operator;
mod procs;
mod spool;
mod standin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmarks.
    Run {
        /// Shorter runs and a smaller backlog (about 3 minutes).
        #[arg(long)]
        quick: bool,
        /// The release build of storerelay-sidecar.
        #[arg(long)]
        sidecar: PathBuf,
        /// The release build of storerelay-operator.
        #[arg(long)]
        operator: PathBuf,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, default_value = "docs/benchmarks.md")]
        report: PathBuf,
        /// Run only these sections (while working on one); the results go to `<out>/partial.json` and
        /// the report is printed, not written.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<Section>,
        /// A second sidecar build, measured as the target `storerelay-sidecar-b` in the same interleaved
        /// rounds as the first: an A/B comparison of a change (implies a partial run).
        #[arg(long)]
        sidecar_b: Option<PathBuf>,
        /// Only these targets of the proxy comparison (e.g. `direct,storerelay-sidecar,storerelay-sidecar-b`).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Rounds of the proxy comparison instead of the default (3, or 1 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
    },
    /// Re-render the report from a results.json.
    Report {
        #[arg(long, default_value = "target/bench/results.json")]
        results: PathBuf,
        #[arg(long, default_value = "docs/benchmarks.md")]
        report: PathBuf,
    },
    /// One open-loop load at a fixed rate against a URL (to look at one target by hand).
    Load {
        url: String,
        #[arg(long)]
        body: PathBuf,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// A stand-in app: answers every request 200 `{}`.
    App { port: u16 },
    /// A stand-in destination: answers 200 and counts bodies (GET /count).
    Destination { port: u16 },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Proxies,
    Sidecar,
    Spool,
    Webhook,
    Operator,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match cli.command {
        Cmd::App { port } => runtime.block_on(standin::serve(port, false)),
        Cmd::Destination { port } => runtime.block_on(standin::serve(port, true)),
        Cmd::Load { url, body, rate, seconds } => {
            let body = std::fs::read(&body).expect("body file");
            let result = runtime.block_on(load::fixed_rate(&url, &body, rate, Duration::from_secs(seconds)));
            println!(
                "p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, {:.0} req/s, {} errors (sent late: p99 {:.3} ms)",
                result.p50_ms, result.p99_ms, result.p999_ms, result.rps, result.errors, result.sent_late_p99_ms
            );
        }
        Cmd::Report { results, report } => {
            let text = std::fs::read_to_string(&results).expect("results.json");
            let results: Value = serde_json::from_str(&text).expect("results.json is JSON");
            std::fs::write(&report, render(&results)).expect("report");
        }
        Cmd::Run { quick, sidecar, operator, out, report, only, sidecar_b, targets, rounds } => {
            let partial = !only.is_empty() || sidecar_b.is_some() || !targets.is_empty() || rounds.is_some();
            let sections = if only.is_empty() {
                vec![Section::Proxies, Section::Sidecar, Section::Spool, Section::Webhook, Section::Operator]
            } else {
                only.clone()
            };
            let choice = Choice { sections, sidecar_b, targets, rounds };
            let results = runtime.block_on(run(quick, &sidecar, &operator, &choice));
            std::fs::create_dir_all(&out).expect("output folder");
            let name = if partial { "partial.json" } else { "results.json" };
            std::fs::write(out.join(name), serde_json::to_string_pretty(&results).unwrap_or_default())
                .expect("results");
            let markdown = render(&results);
            if !partial {
                std::fs::write(&report, &markdown).expect("report");
            }
            println!("{markdown}");
        }
    }
}

pub use storerelay_testenv::free_port;

/// A process that is killed when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], env: &[(&str, String)]) -> Proc {
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("start {name} ({}): {e}", program.display()));
        Proc { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn terminate(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_ready(url: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let client = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
    loop {
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{url} not ready");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn bench_binary() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

/// The bodies: a realistic V2 notification (a JWS whose payload holds two more JWS, each with a three
/// certificate x5c chain, ~20 KB) and a small one.
fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine;
    let b64 = |n: usize, seed: u8| {
        let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let url = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let jws = |payload: String, seed: u8| {
        let header =
            json!({"alg": "ES256", "x5c": [b64(780, seed), b64(750, seed + 1), b64(420, seed + 2)]}).to_string();
        format!("{}.{}.{}", url(header), url(payload), b64(64, seed + 3).replace(['+', '/', '='], ""))
    };
    let transaction = json!({"transactionId": "2000000123456789", "originalTransactionId": "2000000123456780", "bundleId": "com.example.app", "productId": "pro.monthly", "purchaseDate": 1_700_000_000_000u64, "expiresDate": 1_702_592_000_000u64, "type": "Auto-Renewable Subscription", "environment": "Production", "storefront": "USA", "price": 9990, "currency": "USD"}).to_string();
    let renewal = json!({"originalTransactionId": "2000000123456780", "autoRenewProductId": "pro.monthly", "autoRenewStatus": 1, "environment": "Production", "signedDate": 1_700_000_000_000u64}).to_string();
    let payload = json!({
        "notificationType": "DID_RENEW", "notificationUUID": "0a1b2c3d-4e5f-6789-abcd-ef0123456789", "version": "2.0", "signedDate": 1_700_000_000_000u64,
        "data": {"environment": "Production", "bundleId": "com.example.app", "appAppleId": 1234, "bundleVersion": "42", "status": 1,
                 "signedTransactionInfo": jws(transaction, 10), "signedRenewalInfo": jws(renewal, 20)}
    })
    .to_string();
    let large = json!({"signedPayload": jws(payload, 30)}).to_string().into_bytes();
    let small = br#"{"signedPayload":"eyJhbGciOiJFUzI1NiJ9.eyJub3RpZmljYXRpb25UeXBlIjoiVEVTVCJ9.c2ln"}"#.to_vec();
    vec![("V2 ~20 KB", large), ("small", small)]
}

struct Timing {
    /// Rounds of the proxy comparison: each round measures every target once, in turn, so drift of the
    /// machine (other load, thermal, the page cache) spreads over all of them instead of favouring one.
    repetitions: usize,
    saturation: Duration,
    fixed_rate: Duration,
    rate: u32,
    backlog: usize,
    webhook_reviews: usize,
    /// The operator's webhook at a fixed rate, for this long.
    webhook_rate: u32,
    webhook_open_loop: Duration,
    routes: usize,
    pods: usize,
}

/// What a run measures besides the defaults.
struct Choice {
    sections: Vec<Section>,
    sidecar_b: Option<PathBuf>,
    targets: Vec<String>,
    rounds: Option<usize>,
}

async fn run(quick: bool, sidecar: &Path, operator: &Path, choice: &Choice) -> Value {
    let sections = &choice.sections[..];
    let timing = if quick {
        Timing {
            repetitions: 1,
            saturation: Duration::from_secs(4),
            fixed_rate: Duration::from_secs(4),
            rate: 1000,
            backlog: 20_000,
            webhook_reviews: 2_000,
            webhook_rate: 500,
            webhook_open_loop: Duration::from_secs(4),
            routes: 100,
            pods: 1_000,
        }
    } else {
        Timing {
            repetitions: 3,
            saturation: Duration::from_secs(10),
            fixed_rate: Duration::from_secs(15),
            rate: 1000,
            backlog: 100_000,
            webhook_reviews: 10_000,
            webhook_rate: 500,
            webhook_open_loop: Duration::from_secs(10),
            routes: 1_000,
            pods: 10_000,
        }
    };
    let work = tempfile::tempdir().expect("temp dir");
    let mut results = json!({"machine": procs::machine(), "quick": quick, "proxies": {}, "sidecar": {}, "spool": {}, "webhook": {}, "operator": {}});
    // A real PostgreSQL from the machine's packages for the shared-spool rows, when it is installed.
    let postgres = [Section::Proxies, Section::Spool]
        .iter()
        .any(|s| sections.contains(s))
        .then(storerelay_testenv::postgres::binaries)
        .flatten()
        .map(|bin| storerelay_testenv::postgres::Postgres::start(&bin));
    let postgres_url = postgres.as_ref().map(|p| p.url());

    let app_port = free_port();
    let destination_port = free_port();
    let _app = Proc::spawn("app", &bench_binary(), &["app".into(), app_port.to_string()], &[]);
    let _destination =
        Proc::spawn("destination", &bench_binary(), &["destination".into(), destination_port.to_string()], &[]);
    wait_port(app_port, Duration::from_secs(10)).await;
    wait_port(destination_port, Duration::from_secs(10)).await;
    let destination_url = format!("http://127.0.0.1:{destination_port}/hook");

    let mut targets =
        vec!["direct", "storerelay-sidecar", "storerelay-sidecar-postgres", "node-express-axios", "nginx-mirror"];
    if choice.sidecar_b.is_some() {
        targets.insert(2, "storerelay-sidecar-b");
    }
    targets.retain(|t| choice.targets.is_empty() || choice.targets.iter().any(|c| c == t));
    let targets = targets;
    let repetitions = choice.rounds.unwrap_or(timing.repetitions);
    for (body_name, body) in bodies().into_iter().filter(|_| sections.contains(&Section::Proxies)) {
        let body_file = work.path().join("body.json");
        std::fs::write(&body_file, &body).expect("body");
        let mut samples: Vec<Vec<Value>> = vec![Vec::new(); targets.len()];
        let mut skipped: Vec<Option<&str>> = vec![None; targets.len()];
        for round in 1..=repetitions {
            // Every other round in reverse, so what a target leaves behind (its spool's pages still being
            // written back, say) does not always fall on the same next one: A/B runs showed the second
            // sidecar of a round measuring 3-12 % lower whichever build it was.
            let order: Vec<usize> = match round % 2 {
                0 => (0..targets.len()).rev().collect(),
                _ => (0..targets.len()).collect(),
            };
            for index in order {
                let target = &targets[index];
                if skipped[index].is_some() {
                    continue;
                }
                let binary = match (*target, &choice.sidecar_b) {
                    ("storerelay-sidecar-b", Some(b)) => b.as_path(),
                    _ => sidecar,
                };
                let started =
                    start_target(target, work.path(), binary, app_port, &destination_url, postgres_url.as_deref());
                let Some(mut server) = started.await else {
                    skipped[index] = Some("not installed");
                    continue;
                };
                eprintln!("bench: {target}, body {body_name}, round {round} of {repetitions}");
                let url = format!("http://127.0.0.1:{}/apple/notifications", server.port);
                let database = postgres.as_ref().filter(|_| *target == "storerelay-sidecar-postgres");
                samples[index].push(measure_proxy(&url, &body, &body_file, server.pid(), database, &timing).await);
                server.stop();
                // A saturation run leaves a SQLite spool of a few GB; a dozen rounds' would fill the disk.
                remove_spool(work.path(), server.port);
            }
        }
        let mut rows = serde_json::Map::new();
        for (index, target) in targets.iter().enumerate() {
            let row = match skipped[index] {
                Some(why) => json!({"skipped": why}),
                None => summarize(&samples[index]),
            };
            rows.insert(target.to_string(), row);
        }
        results["proxies"][body_name] = Value::Object(rows);
    }

    if sections.contains(&Section::Sidecar) {
        eprintln!("bench: the sidecar alone");
        results["sidecar"] = sidecar_only(sidecar, work.path(), &timing, &destination_url, destination_port).await;
    }
    if sections.contains(&Section::Spool) {
        let small = work.path().join("spool-small.json");
        std::fs::write(&small, bodies().pop().expect("small body").1).expect("body");
        results["spool"] =
            spool::compare(sidecar, work.path(), &small, timing.saturation, postgres_url.as_deref(), quick).await;
    }
    drop(postgres);
    if sections.contains(&Section::Webhook) {
        eprintln!("bench: the webhook");
        results["webhook"] = operator::webhook(timing.webhook_reviews).await;
    }
    if sections.contains(&Section::Operator) {
        eprintln!("bench: the operator's memory with {} routes and {} pods", timing.routes, timing.pods);
        results["operator"] =
            operator::memory(operator, timing.routes, timing.pods, timing.webhook_rate, timing.webhook_open_loop).await;
    }
    results
}

/// One measurement of one target: saturation throughput and CPU with wrk, then latency and CPU at a
/// fixed rate. CPU is counted until the target is idle again, so what a load leaves behind (a sidecar's
/// deliveries lag its ingest at saturation) counts against it, and never runs into the next load.
///
/// The same for the disk: a load leaves PostgreSQL up to hundreds of MB of WAL past its last checkpoint,
/// and the page cache up to a few GB of dirty pages (a spool's files, nginx's temp files), which would
/// otherwise be written back (and fsynced) spread over the next load, of this target or the next one:
/// the order of the targets then decided the V2 saturation rows more than the targets did. Before each
/// load a `CHECKPOINT` and a `sync()` settle that debt first, as the sidecar's own drain is settled.
async fn measure_proxy(
    url: &str,
    body: &[u8],
    body_file: &Path,
    pid: u32,
    database: Option<&storerelay_testenv::postgres::Postgres>,
    timing: &Timing,
) -> Value {
    let per_10k = |seconds: f64, requests: u64| if requests > 0 { seconds / requests as f64 * 10_000.0 } else { 0.0 };
    let settle_disk = || {
        tokio::task::block_in_place(|| {
            if let Some(database) = database {
                database.psql("CHECKPOINT");
            }
            // SAFETY: sync has no preconditions; it returns once the writeback it started is done.
            unsafe { libc::sync() };
        });
    };
    let idle_rss = procs::tree_rss_kib(pid);
    settle_disk();
    let cpu_before = procs::settled_cpu_seconds(pid).await;
    let saturation = load::wrk(url, body_file, timing.saturation, pid).await;
    let cpu_saturation = procs::settled_cpu_seconds(pid).await;
    settle_disk();
    let fixed = load::fixed_rate(url, body, timing.rate, timing.fixed_rate).await;
    let cpu_fixed = procs::settled_cpu_seconds(pid).await;
    let fixed_requests = timing.rate as u64 * timing.fixed_rate.as_secs() + load::WARM_UP;
    json!({
        "throughput_rps": saturation.rps,
        "saturation_errors": saturation.errors,
        "p50_ms": fixed.p50_ms, "p99_ms": fixed.p99_ms, "p999_ms": fixed.p999_ms,
        "sent_late_p99_ms": fixed.sent_late_p99_ms,
        "fixed_rate_errors": fixed.errors,
        "rss_idle_kib": idle_rss, "rss_load_kib": saturation.peak_rss_kib,
        "cpu_seconds_per_10k": per_10k(cpu_saturation - cpu_before, saturation.requests),
        "cpu_seconds_per_10k_fixed_rate": per_10k(cpu_fixed - cpu_saturation, fixed_requests),
    })
}

/// The rows of several rounds as one: each measure's median (what the report and the goals use), its
/// `[min, max]` under `spread`, and errors summed over the rounds.
fn summarize(samples: &[Value]) -> Value {
    const MEASURES: [&str; 9] = [
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "sent_late_p99_ms",
        "rss_idle_kib",
        "rss_load_kib",
        "cpu_seconds_per_10k",
        "cpu_seconds_per_10k_fixed_rate",
    ];
    let mut row = serde_json::Map::new();
    let mut spread = serde_json::Map::new();
    for measure in MEASURES {
        let mut values: Vec<f64> = samples.iter().filter_map(|s| s[measure].as_f64()).collect();
        values.sort_by(f64::total_cmp);
        if let (Some(median), Some(min), Some(max)) = (median(&values), values.first(), values.last()) {
            row.insert(measure.into(), json!(median));
            spread.insert(measure.into(), json!([min, max]));
        }
    }
    for errors in ["saturation_errors", "fixed_rate_errors"] {
        row.insert(errors.into(), json!(samples.iter().filter_map(|s| s[errors].as_u64()).sum::<u64>()));
    }
    row.insert("repetitions".into(), json!(samples.len()));
    row.insert("spread".into(), Value::Object(spread));
    Value::Object(row)
}

/// The middle of sorted `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

struct Target {
    port: u16,
    process: Proc,
}

impl Target {
    fn pid(&self) -> u32 {
        self.process.pid()
    }
    fn stop(&mut self) {
        self.process.terminate();
    }
}

/// Where a benchmarked sidecar spools.
pub enum SpoolKind {
    /// A SQLite file with this `sync`.
    Sqlite(&'static str),
    /// A queue of its own (named after its port) in the database at this URL.
    Postgres(String),
}

/// The SQLite spool of the sidecar on `port` in `dir`.
fn spool_file(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("spool-{port}.db"))
}

/// Deletes the SQLite spool (with its WAL and body segments) of the sidecar on `port`, if it had one.
fn remove_spool(dir: &Path, port: u16) {
    let Some(name) = spool_file(dir, port).file_name().map(|n| n.to_string_lossy().into_owned()) else { return };
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

pub fn sidecar_config(dir: &Path, port: u16, admin: u16, extra: &str, spool: &SpoolKind) -> PathBuf {
    let path = dir.join(format!("sidecar-{port}.yaml"));
    let file = spool_file(dir, port);
    let spool = match spool {
        SpoolKind::Sqlite(sync) => format!("{{path: {}, sync: {sync}, maxBytes: 4Gi}}", file.display()),
        SpoolKind::Postgres(url) => format!(
            "{{backend: postgres, maxBytes: 4Gi, postgres: {{url: \"{url}\", queue: bench/{port}, maxConnections: 6}}}}"
        ),
    };
    let text = format!(
        // Duplicate suppression off: the load repeats one body, which must count as distinct notifications.
        "listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nspool: {spool}\nlimits: {{maxConcurrentRequests: 4096, maxBufferedBytes: 1Gi}}\ndedupe: {{window: 0s}}\n{extra}",
    );
    std::fs::write(&path, text).expect("config");
    path
}

async fn start_target(
    name: &str,
    dir: &Path,
    sidecar: &Path,
    app_port: u16,
    destination_url: &str,
    postgres_url: Option<&str>,
) -> Option<Target> {
    let port = free_port();
    let process = match name {
        // The baseline: a stand-in app of its own, so its process can be measured like the others.
        "direct" => Proc::spawn("app", &bench_binary(), &["app".into(), port.to_string()], &[]),
        "storerelay-sidecar" | "storerelay-sidecar-b" | "storerelay-sidecar-postgres" => {
            let admin = free_port();
            let extra = format!(
                "upstream: {{url: \"http://127.0.0.1:{app_port}\"}}\nack: upstream\ndestinations:\n  - {{name: revenuecat, url: \"{destination_url}\", concurrency: 16}}\n"
            );
            let spool = match name {
                "storerelay-sidecar-postgres" => SpoolKind::Postgres(postgres_url?.to_string()),
                _ => SpoolKind::Sqlite("full"),
            };
            let config = sidecar_config(dir, port, admin, &extra, &spool);
            Proc::spawn(
                "sidecar",
                sidecar,
                &["--config".into(), config.display().to_string()],
                &[("STORERELAY_LOG", "warn".into())],
            )
        }
        "node-express-axios" => {
            let modules = PathBuf::from(".cache/bench/node_modules");
            if Command::new("node").arg("--version").output().is_err() || !modules.exists() {
                return None;
            }
            let script = std::fs::canonicalize("bench/forwarder.js").ok()?;
            Proc::spawn(
                "node",
                Path::new("node"),
                &[script.display().to_string()],
                &[
                    ("PORT", port.to_string()),
                    ("DESTINATION", destination_url.to_string()),
                    ("NODE_PATH", std::fs::canonicalize(&modules).ok()?.display().to_string()),
                ],
            )
        }
        "nginx-mirror" => {
            let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists())?;
            let root = dir.join(format!("nginx-{port}"));
            std::fs::create_dir_all(root.join("logs")).ok()?;
            let destination = destination_url.trim_start_matches("http://").split('/').next().unwrap_or_default();
            let conf = format!(
                "worker_processes auto;\npid {root}/nginx.pid;\nerror_log {root}/logs/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n  fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n  client_body_buffer_size 1m;\n  upstream app {{ server 127.0.0.1:{app_port}; keepalive 64; }}\n  upstream destination {{ server {destination}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ mirror /mirror; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://app; }}\n    location = /mirror {{ internal; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://destination/hook; }}\n  }}\n}}\n",
                root = root.display()
            );
            let conf_path = root.join("nginx.conf");
            std::fs::write(&conf_path, conf).ok()?;
            Proc::spawn(
                "nginx",
                &nginx,
                &[
                    "-p".into(),
                    root.display().to_string(),
                    "-c".into(),
                    conf_path.display().to_string(),
                    "-g".into(),
                    "daemon off; user root;".into(),
                ],
                &[],
            )
        }
        _ => return None,
    };
    wait_port(port, Duration::from_secs(20)).await;
    Some(Target { port, process })
}

/// The sidecar alone: spooled ingest, backlog drain, time to ready with a backlog, size.
async fn sidecar_only(
    sidecar: &Path,
    dir: &Path,
    timing: &Timing,
    destination_url: &str,
    destination_port: u16,
) -> Value {
    let (_, small) = bodies().pop().expect("small body");
    let body_file = dir.join("small.json");
    std::fs::write(&body_file, &small).expect("body");
    let mut out = json!({});
    for sync in ["full", "normal"] {
        let (port, admin) = (free_port(), free_port());
        let config = sidecar_config(dir, port, admin, "ack: spooled\n", &SpoolKind::Sqlite(sync));
        let mut process = Proc::spawn(
            "sidecar",
            sidecar,
            &["--config".into(), config.display().to_string()],
            &[("STORERELAY_LOG", "warn".into())],
        );
        wait_port(port, Duration::from_secs(10)).await;
        let result = load::wrk(
            &format!("http://127.0.0.1:{port}/apple/notifications"),
            &body_file,
            timing.saturation,
            process.pid(),
        )
        .await;
        out[format!("spooled_ingest_rps_sync_{sync}")] = json!(result.rps);
        process.terminate();
    }

    // A backlog: notifications stored while no destination was configured, then given to one.
    let (port, admin) = (free_port(), free_port());
    let config = sidecar_config(dir, port, admin, "ack: spooled\n", &SpoolKind::Sqlite("normal"));
    let mut filler = Proc::spawn(
        "sidecar",
        sidecar,
        &["--config".into(), config.display().to_string()],
        &[("STORERELAY_LOG", "warn".into())],
    );
    wait_port(port, Duration::from_secs(10)).await;
    eprintln!("bench: filling a backlog of {}", timing.backlog);
    let filled =
        load::closed_loop(&format!("http://127.0.0.1:{port}/apple/notifications"), &small, timing.backlog, 64).await;
    filler.terminate();
    let spool = dir.join(format!("spool-{port}.db"));
    let redeliver = Command::new(sidecar)
        .args(["spool", "--spool"])
        .arg(&spool)
        // --force: the destination is added to the config afterwards (what --force is for).
        .args(["redeliver", "--destination", "revenuecat", "--force"])
        .output()
        .expect("spool redeliver");
    assert!(redeliver.status.success(), "spool redeliver failed");
    eprintln!("bench: draining {filled}");
    let before = standin::count(destination_port).await;
    let extra = format!("destinations:\n  - {{name: revenuecat, url: \"{destination_url}\", concurrency: 32}}\n");
    let config = sidecar_config(dir, port, admin, &format!("ack: spooled\n{extra}"), &SpoolKind::Sqlite("normal"));
    let started = Instant::now();
    let process = Proc::spawn(
        "sidecar",
        sidecar,
        &["--config".into(), config.display().to_string()],
        &[("STORERELAY_LOG", "warn".into())],
    );
    let ready = wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), Duration::from_secs(60)).await;
    let rss_with_backlog = procs::tree_rss_kib(process.pid());
    let deadline = started + Duration::from_secs(600);
    let mut delivered = 0;
    while Instant::now() < deadline {
        delivered = standin::count(destination_port).await - before;
        if delivered >= filled as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = started.elapsed();
    out["backlog"] = json!(filled);
    out["backlog_delivered"] = json!(delivered);
    out["drain_rps"] = json!(delivered as f64 / drain.as_secs_f64());
    out["ready_ms_with_backlog"] = json!(ready.as_secs_f64() * 1000.0);
    out["rss_kib_with_backlog"] = json!(rss_with_backlog);
    out["binary_bytes"] = json!(std::fs::metadata(sidecar).map(|m| m.len()).unwrap_or(0));
    // What users run is the image's static binary (no shared libc mapped): its idle RSS, when built.
    let image_binary = Path::new(".cache/images/storerelay-sidecar");
    if image_binary.exists() {
        let (port, admin) = (free_port(), free_port());
        out["static_binary_bytes"] = json!(std::fs::metadata(image_binary).map(|m| m.len()).unwrap_or(0));
        let config = sidecar_config(dir, port, admin, "ack: spooled\n", &SpoolKind::Sqlite("full"));
        let mut process = Proc::spawn(
            "sidecar (static)",
            image_binary,
            &["--config".into(), config.display().to_string()],
            &[("STORERELAY_LOG", "warn".into())],
        );
        wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        out["static_rss_idle_kib"] = json!(procs::tree_rss_kib(process.pid()));
        process.terminate();
    }
    out["image_bytes"] = procs::image_size("storerelay/storerelay-sidecar");
    drop(process);
    out
}

fn render(results: &Value) -> String {
    let mut md = String::from(
        "# Benchmarks\n\nGenerated by `make bench` (`crates/bench`); every number below comes from one run on the machine described, and the ratios are computed from that same run. Raw results: `target/bench/results.json`.\n\n",
    );
    md.push_str(&format!("Machine: {}\n\n", results["machine"].as_str().unwrap_or("unknown")));
    if results["quick"].as_bool() == Some(true) {
        md.push_str("Mode: **quick** (`make bench-quick`: shorter runs, smaller backlog; noisier).\n\n");
    }
    let f = |v: &Value, digits: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.digits$}"));
    for (body, rows) in results["proxies"].as_object().into_iter().flatten() {
        md.push_str(&format!("## Proxy and mirror, body {body}\n\nThe sidecar runs with `ack: upstream`, `sync: full`, one destination, and duplicate suppression off (the load repeats one body, and every request must be stored as a distinct notification). Throughput with wrk (1 thread, 32 connections) at saturation; latency at a fixed {} requests/s (open loop, measured from each request's scheduled time); RSS from /proc (process tree); CPU from /proc (process tree) per 10,000 requests, at saturation and at the fixed rate, each counted until the target is idle again (at saturation the sidecar's deliveries fall behind its ingest and drain afterwards: that work counts too).\n\n", 1000));
        let rounds = rows.as_object().into_iter().flatten().find_map(|(_, r)| r["repetitions"].as_u64()).unwrap_or(1);
        if rounds > 1 {
            md.push_str(&format!("Each cell is the median of {rounds} rounds, with the lowest and highest in brackets; each round measures every target in turn (interleaved, every other round in reverse order), so the machine's drift falls on all of them alike. Ratios and goals use the medians.\n\n"));
        }
        md.push_str("| target | throughput (req/s) | p50 ms | p99 ms | p999 ms | RSS idle MiB | RSS load MiB | CPU s / 10k | CPU s / 10k at 1,000/s | errors |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for (name, row) in rows.as_object().into_iter().flatten() {
            if row.get("skipped").is_some() {
                md.push_str(&format!(
                    "| {name} | skipped: {} | | | | | | | | |\n",
                    row["skipped"].as_str().unwrap_or("")
                ));
                continue;
            }
            // The median, and with several rounds the lowest and highest: a difference inside that range
            // is noise.
            let cell = |key: &str, scale: f64, digits: usize| {
                let Some(median) = row[key].as_f64() else { return "-".to_string() };
                let spread = &row["spread"][key];
                match (spread[0].as_f64(), spread[1].as_f64()) {
                    (Some(min), Some(max)) if row["repetitions"].as_u64().unwrap_or(1) > 1 => {
                        format!("{:.digits$} ({:.digits$}–{:.digits$})", median / scale, min / scale, max / scale)
                    }
                    _ => format!("{:.digits$}", median / scale),
                }
            };
            md.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                cell("throughput_rps", 1.0, 0),
                cell("p50_ms", 1.0, 3),
                cell("p99_ms", 1.0, 3),
                cell("p999_ms", 1.0, 3),
                cell("rss_idle_kib", 1024.0, 1),
                cell("rss_load_kib", 1024.0, 1),
                cell("cpu_seconds_per_10k", 1.0, 2),
                cell("cpu_seconds_per_10k_fixed_rate", 1.0, 2),
                row["saturation_errors"].as_u64().unwrap_or(0) + row["fixed_rate_errors"].as_u64().unwrap_or(0),
            ));
        }
        let sidecar = &rows["storerelay-sidecar"];
        let ratio = |key: &str, other: &str| {
            let (a, b) = (sidecar[key].as_f64(), rows[other][key].as_f64());
            match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            }
        };
        let added = |key: &str| match (sidecar[key].as_f64(), rows["direct"][key].as_f64()) {
            (Some(a), Some(b)) => format!("{:+.3} ms", a - b),
            _ => "-".into(),
        };
        let postgres_added = match (rows["storerelay-sidecar-postgres"]["p99_ms"].as_f64(), sidecar["p99_ms"].as_f64())
        {
            (Some(a), Some(b)) => format!("{:+.3} ms", a - b),
            _ => "-".into(),
        };
        md.push_str(&format!(
            "\nWith `backend: postgres` (a local PostgreSQL from the machine's packages, `synchronous_commit=on`, a `CHECKPOINT` before each load so that none inherits the last one's WAL): p99 added over the SQLite sidecar {postgres_added}.\n"
        ));
        md.push_str(&format!(
            "\nRatios: sidecar/direct throughput {}, sidecar/node throughput {}, sidecar/nginx throughput {}; sidecar/node idle RSS {}; p99 added over direct {}, p50 added {}.\n\n",
            ratio("throughput_rps", "direct"),
            ratio("throughput_rps", "node-express-axios"),
            ratio("throughput_rps", "nginx-mirror"),
            ratio("rss_idle_kib", "node-express-axios"),
            added("p99_ms"),
            added("p50_ms"),
        ));
    }
    let s = &results["sidecar"];
    md.push_str("## The sidecar alone\n\n| measure | value |\n|---|---|\n");
    md.push_str(&format!(
        "| spooled ingest, `sync: full` (req/s, small body) | {} |\n",
        f(&s["spooled_ingest_rps_sync_full"], 0)
    ));
    md.push_str(&format!(
        "| spooled ingest, `sync: normal` (req/s, small body) | {} |\n",
        f(&s["spooled_ingest_rps_sync_normal"], 0)
    ));
    md.push_str(&format!(
        "| backlog drained once the destination is there (notifications/s; backlog {}) | {} |\n",
        s["backlog"],
        f(&s["drain_rps"], 0)
    ));
    md.push_str(&format!("| time to ready with that backlog pending (ms) | {} |\n", f(&s["ready_ms_with_backlog"], 1)));
    md.push_str(&format!(
        "| RSS with that backlog pending, at ready (MiB) | {} |\n",
        s["rss_kib_with_backlog"].as_f64().map_or("-".into(), |k| format!("{:.1}", k / 1024.0))
    ));
    md.push_str(&format!(
        "| stripped release binary (MiB) | {} |\n",
        s["binary_bytes"].as_f64().map_or("-".into(), |b| format!("{:.2}", b / 1048576.0))
    ));
    md.push_str(&format!(
        "| idle RSS of the image's static binary (MiB) | {} |\n",
        s["static_rss_idle_kib"].as_f64().map_or("not built (make images)".into(), |k| format!("{:.1}", k / 1024.0))
    ));
    md.push_str(&format!(
        "| image, static binary on scratch (MiB) | {} |\n\n",
        s["image_bytes"].as_f64().map_or("not built (make images)".into(), |b| format!("{:.2}", b / 1048576.0))
    ));
    md.push_str(&spool_backends(&results["spool"]));
    let w = &results["webhook"];
    md.push_str(&format!(
        "## The webhook\n\nIn the benchmark's process (closed loop: throughput more than latency, load and server sharing the cores): {} AdmissionReviews over HTTPS, 50 at a time, against an index of {} routes, {} rounds (medians; the p99's range in brackets): p50 {} ms, p99 {} ms ({}–{}), {} reviews/s, {} errors. The operator process at a fixed rate is in the next section.\n",
        w["reviews"], w["routes"], w["rounds"], f(&w["p50_ms"], 3), f(&w["p99_ms"], 3), f(&w["p99_range_ms"][0], 3), f(&w["p99_range_ms"][1], 3), f(&w["rps"], 0), w["errors"]
    ));
    md.push_str(&operator_memory(&results["operator"]));
    md.push_str(&goals(results));
    md
}

fn spool_backends(s: &Value) -> String {
    let f = |v: &Value, digits: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.digits$}"));
    let mut md = String::from(
        "## Spool backends\n\nThe same sidecar with `ack: spooled` on each backend: spooled ingest at saturation (wrk, small body; SQLite `sync: full`, PostgreSQL on this machine with `fsync` and `synchronous_commit` on; the sidecar's CPU only, not the database's), and ack-to-destination: numbered notifications at 200/s, from each 200 to its arrival at a destination stand-in in the benchmark's own process.\n\n| backend | spooled ingest (req/s) | sidecar CPU s / 10k | ack-to-destination p50 ms | p99 ms | delivered |\n|---|---|---|---|---|---|\n",
    );
    for name in ["sqlite", "postgres"] {
        let row = &s[name];
        if row.is_null() {
            md.push_str(&format!("| {name} | {} | | | | |\n", s["postgres"].as_str().unwrap_or("not run")));
            continue;
        }
        let latency = &row["ack_to_destination"];
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} of {} |\n",
            f(&row["spooled_ingest_rps"], 0),
            f(&row["sidecar_cpu_seconds_per_10k"], 2),
            f(&latency["p50_ms"], 2),
            f(&latency["p99_ms"], 2),
            latency["arrived"],
            latency["acknowledged"],
        ));
    }
    md.push('\n');
    md
}

fn operator_memory(o: &Value) -> String {
    if let Some(reason) = o["skipped"].as_str() {
        return format!("\n## The operator\n\nSkipped: {reason}.\n");
    }
    let mib = |v: &Value| v.as_f64().map_or("-".into(), |k| format!("{:.1}", k / 1024.0));
    let ms = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    let w = &o["webhook_open_loop"];
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    format!(
        "\n## The operator\n\nThe operator process against a real kube-apiserver and etcd (crates/testenv) with the chart installed, before and after {} NotificationRoutes (over 50 namespaces) and {} pods exist; RSS from /proc, \"steady\" 5 s after every route's status was written. Then its webhook at a fixed {} AdmissionReviews/s for {} s, three times (open loop: each review timed from when it was due; medians of the rounds, the p99's range in brackets) over HTTPS, trusting the CA the operator published in the webhook configuration.\n\n| measure | value |\n|---|---|\n| RSS, empty cluster (MiB) | {} |\n| RSS at ready, caches synced (MiB) | {} |\n| RSS steady, every route reconciled (MiB) | {} |\n| peak RSS (MiB) | {} |\n| RSS after the webhook load (MiB) | {} |\n| time to ready (ms) | {} |\n| time until every route's status is written (ms) | {} |\n| webhook at {}/s: p50 / p99 / p999 (ms) | {} / {} ({}–{}) / {} |\n| the load generator's own lateness in sending, p99 (ms, included above) | {} |\n| webhook errors | {} |\n",
        o["routes"],
        o["pods"],
        w["rate"],
        w["seconds"],
        mib(&o["rss_empty_kib"]),
        mib(&o["rss_ready_kib"]),
        mib(&o["rss_steady_kib"]),
        mib(&o["rss_peak_kib"]),
        mib(&o["rss_after_webhook_kib"]),
        ms(&o["ready_ms"]),
        ms(&o["all_reconciled_ms"]),
        w["rate"],
        f(&w["p50_ms"]),
        f(&w["p99_ms"]),
        f(&w["p99_range_ms"][0]),
        f(&w["p99_range_ms"][1]),
        f(&w["p999_ms"]),
        f(&w["sent_late_p99_ms"]),
        w["errors"],
    )
}

/// The design goals next to this run's numbers. Goals, not assertions: a miss is reported, not failed.
fn goals(results: &Value) -> String {
    let small = &results["proxies"]["small"];
    let large = &results["proxies"]["V2 ~20 KB"];
    let sidecar = &results["sidecar"];
    let value = |v: &Value| v.as_f64();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let minus = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    let rows: Vec<(&str, Option<f64>, bool, f64, &str)> = vec![
        (
            "sidecar idle RSS (MiB)",
            value(&small["storerelay-sidecar"]["rss_idle_kib"]).map(|k| k / 1024.0),
            false,
            8.0,
            "≤ 8",
        ),
        (
            "sidecar idle RSS / Node's",
            ratio(
                value(&small["storerelay-sidecar"]["rss_idle_kib"]),
                value(&small["node-express-axios"]["rss_idle_kib"]),
            ),
            false,
            0.1,
            "≤ 0.1",
        ),
        (
            "image's static binary idle RSS / Node's",
            ratio(value(&sidecar["static_rss_idle_kib"]), value(&small["node-express-axios"]["rss_idle_kib"])),
            false,
            0.1,
            "≤ 0.1",
        ),
        (
            "throughput / Node's, small body",
            ratio(
                value(&small["storerelay-sidecar"]["throughput_rps"]),
                value(&small["node-express-axios"]["throughput_rps"]),
            ),
            true,
            5.0,
            "≥ 5",
        ),
        (
            "throughput / Node's, V2 ~20 KB",
            ratio(
                value(&large["storerelay-sidecar"]["throughput_rps"]),
                value(&large["node-express-axios"]["throughput_rps"]),
            ),
            true,
            5.0,
            "≥ 5",
        ),
        (
            "p99 added over direct at 1,000 req/s, small (ms)",
            minus(value(&small["storerelay-sidecar"]["p99_ms"]), value(&small["direct"]["p99_ms"])),
            false,
            2.0,
            "≤ 2",
        ),
        (
            "p99 added over direct at 1,000 req/s, V2 ~20 KB (ms)",
            minus(value(&large["storerelay-sidecar"]["p99_ms"]), value(&large["direct"]["p99_ms"])),
            false,
            2.0,
            "≤ 2",
        ),
        (
            "spooled ingest, sync: full (req/s)",
            value(&sidecar["spooled_ingest_rps_sync_full"]),
            true,
            10_000.0,
            "≥ 10,000",
        ),
        ("backlog drain (notifications/s)", value(&sidecar["drain_rps"]), true, 2_000.0, "≥ 2,000"),
        ("ready with the backlog pending (ms)", value(&sidecar["ready_ms_with_backlog"]), false, 100.0, "≤ 100"),
        ("stripped binary (MiB)", value(&sidecar["binary_bytes"]).map(|b| b / 1048576.0), false, 6.0, "≤ 6"),
        (
            "image's static binary, both backends (MiB)",
            value(&sidecar["static_binary_bytes"]).map(|b| b / 1048576.0),
            false,
            7.0,
            "≤ 7",
        ),
        (
            "spooled ingest, postgres, synchronous_commit=on (req/s)",
            value(&results["spool"]["postgres"]["spooled_ingest_rps"]),
            true,
            5_000.0,
            "≥ 5,000",
        ),
        (
            "p99 added by postgres over the SQLite sidecar at 1,000 req/s, small (ms)",
            minus(
                value(&small["storerelay-sidecar-postgres"]["p99_ms"]),
                value(&small["storerelay-sidecar"]["p99_ms"]),
            ),
            false,
            3.0,
            "≤ 3",
        ),
        (
            "p99 added by postgres over the SQLite sidecar at 1,000 req/s, V2 ~20 KB (ms)",
            minus(
                value(&large["storerelay-sidecar-postgres"]["p99_ms"]),
                value(&large["storerelay-sidecar"]["p99_ms"]),
            ),
            false,
            3.0,
            "≤ 3",
        ),
        (
            "ack-to-destination p50, postgres (ms)",
            value(&results["spool"]["postgres"]["ack_to_destination"]["p50_ms"]),
            false,
            5.0,
            "≤ 5",
        ),
        (
            "webhook p99 at 500 reviews/s, open loop, 1,000 routes (ms)",
            value(&results["operator"]["webhook_open_loop"]["p99_ms"]),
            false,
            2.0,
            "≤ 2",
        ),
        ("webhook p99, closed loop of 50 (ms)", value(&results["webhook"]["p99_ms"]), false, 5.0, "≤ 5"),
        (
            "operator RSS steady, 1,000 routes and 10,000 pods (MiB)",
            value(&results["operator"]["rss_steady_kib"]).map(|k| k / 1024.0),
            false,
            48.0,
            "≤ 48",
        ),
    ];
    let mut md = String::from(
        "\n## Goals\n\nWhat dominates each number, and what was tried: [performance.md](performance.md).\n\n| goal | target | this run | met |\n|---|---|---|---|\n",
    );
    for (name, measured, higher_is_better, target, text) in rows {
        let (shown, met) = match measured {
            Some(m) => (
                format!("{m:.2}"),
                if (higher_is_better && m >= target) || (!higher_is_better && m <= target) { "yes" } else { "**no**" },
            ),
            None => ("-".into(), "-"),
        };
        md.push_str(&format!("| {name} | {text} | {shown} | {met} |\n"));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_summarised_by_their_median_and_range_and_errors_add_up() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[1.0, 2.0, 10.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), Some(3.0));
        let round = |rps: f64, p99: f64, errors: u64| json!({"throughput_rps": rps, "p99_ms": p99, "saturation_errors": errors, "fixed_rate_errors": 0});
        let row = summarize(&[round(5_000.0, 2.0, 0), round(6_500.0, 9.0, 2), round(6_000.0, 2.5, 1)]);
        assert_eq!(row["throughput_rps"], 6_000.0);
        assert_eq!(row["spread"]["throughput_rps"], json!([5_000.0, 6_500.0]));
        assert_eq!(row["p99_ms"], 2.5, "one slow round does not move the median");
        assert_eq!(row["saturation_errors"], 3);
        assert_eq!(row["repetitions"], 3);
        assert!(row["spread"].get("cpu_seconds_per_10k").is_none(), "a measure no round has is left out");
    }
}
