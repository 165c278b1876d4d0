//! Test support: the real sidecar binary as a process, and stand-ins for the app and for RevenueCat:
//! real HTTP servers on loopback that record what they receive and misbehave on cue.
#![allow(dead_code)]

pub mod app_store_api;
pub mod apple;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How a stand-in answers one request.
#[derive(Debug, Clone)]
pub enum Behavior {
    Status(u16),
    /// 429 (or another status) with a `Retry-After` header.
    RetryAfter(u16, String),
    /// Wait this long, then answer 200.
    Delay(Duration),
    /// Never answer (until the test ends).
    Hang,
    /// Drop the connection without an answer.
    Reset,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct StandInState {
    script: VecDeque<Behavior>,
    default: Option<Behavior>,
    received: Vec<Received>,
    response_body: Bytes,
}

/// A recording HTTP server on 127.0.0.1.
#[derive(Clone)]
pub struct StandIn {
    pub addr: SocketAddr,
    state: Arc<Mutex<StandInState>>,
    task: Arc<tokio::task::JoinHandle<()>>,
    stopped: tokio::sync::watch::Sender<bool>,
}

impl StandIn {
    pub async fn start() -> StandIn {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> StandIn {
        let listener = TcpListener::bind(addr).await.expect("bind stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let state = Arc::new(Mutex::new(StandInState {
            response_body: Bytes::from_static(b"{\"ok\":true}"),
            ..Default::default()
        }));
        let accept_state = state.clone();
        let stopped = tokio::sync::watch::Sender::new(false);
        let stop_connections = stopped.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = accept_state.clone();
                let mut stop = stop_connections.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        StandIn { addr, state, task: Arc::new(task), stopped }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers for the next requests, in order; after them the default (200) applies.
    pub fn script(&self, behaviors: impl IntoIterator<Item = Behavior>) {
        self.state.lock().unwrap().script.extend(behaviors);
    }

    pub fn set_default(&self, behavior: Behavior) {
        self.state.lock().unwrap().default = Some(behavior);
    }

    pub fn set_response_body(&self, body: &'static [u8]) {
        self.state.lock().unwrap().response_body = Bytes::from_static(body);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn bodies(&self) -> Vec<Bytes> {
        self.received().into_iter().map(|r| r.body).collect()
    }

    /// Waits until `count` requests have arrived, or panics after `within`.
    pub async fn wait_for(&self, count: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(Instant::now() < deadline, "stand-in got {} of {count} requests within {within:?}", received.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops listening and drops every open connection.
    pub fn stop(&self) {
        self.task.abort();
        self.stopped.send_replace(true);
    }
}

async fn answer(
    state: Arc<Mutex<StandInState>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (behavior, response_body) = {
        let mut state = state.lock().unwrap();
        state.received.push(Received {
            at: Instant::now(),
            method: parts.method.to_string(),
            path_and_query: parts.uri.path_and_query().map_or("/".into(), |p| p.to_string()),
            headers: parts.headers.iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string())).collect(),
            body,
        });
        let behavior = state.script.pop_front().or_else(|| state.default.clone()).unwrap_or(Behavior::Status(200));
        (behavior, state.response_body.clone())
    };
    let respond = |status: u16| {
        let mut response = Response::new(Full::new(response_body.clone()));
        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        response.headers_mut().insert("x-app", "stand-in".parse().unwrap());
        response
    };
    match behavior {
        Behavior::Status(status) => Ok(respond(status)),
        Behavior::RetryAfter(status, value) => {
            let mut response = respond(status);
            response.headers_mut().insert("retry-after", value.parse().unwrap());
            Ok(response)
        }
        Behavior::Delay(delay) => {
            tokio::time::sleep(delay).await;
            Ok(respond(200))
        }
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(respond(200))
        }
        Behavior::Reset => Err(std::io::Error::other("reset on cue")),
    }
}

/// Ports for sidecars: below the ephemeral range, see there.
pub use storerelay_testenv::free_port;

/// The sidecar binary running as a child process with its own config, spool and log file.
pub struct Sidecar {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    /// The child leads its own process group (a wrapper with the sidecar under it): kill the group.
    group: bool,
    log_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_storerelay-sidecar")
}

impl Sidecar {
    /// Starts the sidecar with `extra` YAML appended to generated listen/admin/spool settings. `spool`
    /// is YAML for keys inside `spool:` other than `path`.
    pub async fn start(extra: &str, spool_extra: &str) -> Sidecar {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut sidecar = Sidecar::prepare(dir, extra, spool_extra);
        sidecar._tmp = Some(tmp);
        // A port that was free when picked may be taken by the time the sidecar binds it (tests run in
        // parallel): then pick new ones and start again.
        for _ in 0..5 {
            sidecar.spawn();
            if !sidecar.exited_on_a_taken_port(Duration::from_secs(20)).await {
                return sidecar;
            }
            sidecar.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            sidecar.admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            sidecar.write_config(extra, spool_extra);
        }
        panic!("the sidecar found its ports taken five times; log:\n{}", sidecar.log());
    }

    /// Waits until the sidecar is ready (false), or has exited because a port was taken (true).
    async fn exited_on_a_taken_port(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let client = client();
        loop {
            if let Ok(response) = client.get(format!("http://{}/readyz", self.admin)).send().await {
                if response.status() == 200 {
                    return false;
                }
            }
            let exited = self.child.as_mut().is_some_and(|child| child.try_wait().ok().flatten().is_some());
            if exited && self.log().contains("Address already in use") {
                self.child = None;
                std::fs::write(&self.log_path, "").unwrap();
                return true;
            }
            if Instant::now() > deadline {
                panic!("sidecar not ready within {within:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Writes the config without starting the process.
    pub fn prepare(dir: PathBuf, extra: &str, spool_extra: &str) -> Sidecar {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config_path = dir.join("config.yaml");
        let sidecar = Sidecar {
            config_path,
            listen,
            admin,
            child: None,
            group: false,
            log_path: dir.join("sidecar.log"),
            dir,
            _tmp: None,
        };
        sidecar.write_config(extra, spool_extra);
        sidecar
    }

    pub fn spool_path(&self) -> PathBuf {
        self.dir.join("spool.db")
    }

    pub fn config_text(&self, extra: &str, spool_extra: &str) -> String {
        format!(
            "listen: {}\nadmin: {}\nspool:\n  path: {}\n{}\n{}\n",
            self.listen,
            self.admin,
            self.spool_path().display(),
            indent(spool_extra, "  "),
            extra
        )
    }

    /// Replaces the config the way Kubernetes does: write beside it, then rename over it.
    pub fn write_config(&self, extra: &str, spool_extra: &str) {
        let next = self.dir.join(".config.yaml.next");
        std::fs::write(&next, self.config_text(extra, spool_extra)).unwrap();
        std::fs::rename(&next, &self.config_path).unwrap();
    }

    pub fn write_raw_config(&self, text: &str) {
        let next = self.dir.join(".config.yaml.next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &self.config_path).unwrap();
    }

    pub fn spawn(&mut self) {
        self.spawn_with(&[], false, Path::new(binary()));
    }

    /// Runs the sidecar as the last arguments of `wrapper` (a shell that mounts something first, say),
    /// in a process group of its own that is killed as a whole.
    pub fn spawn_wrapped(&mut self, wrapper: &[&str]) {
        self.spawn_with(wrapper, true, Path::new(binary()));
    }

    /// Runs another build of the sidecar (the release binary, say) instead of this crate's test build.
    pub fn spawn_program(&mut self, program: &Path) {
        self.spawn_with(&[], false, program);
    }

    fn spawn_with(&mut self, wrapper: &[&str], group: bool, program: &Path) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        let mut command = match wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut command = Command::new(wrapper);
                command.args(args).arg(program);
                command
            }
            None => Command::new(program),
        };
        if group {
            command.process_group(0);
        }
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .env("STORERELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn storerelay-sidecar");
        self.child = Some(child);
        self.group = group;
    }

    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let client = client();
        loop {
            if let Ok(response) = client.get(format!("http://{}/readyz", self.admin)).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("sidecar not ready within {within:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn ingest_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    pub async fn post(&self, body: impl Into<Bytes>) -> reqwest::Response {
        client()
            .post(self.ingest_url("/apple/notifications"))
            .header("content-type", "application/json")
            .body(body.into())
            .send()
            .await
            .expect("post to sidecar")
    }

    pub async fn metrics(&self) -> String {
        client().get(format!("http://{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    /// The value of one metric line (exact name with labels), or 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// The sum over every series of a metric family (all label values).
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|line| line.starts_with(name) && matches!(line.as_bytes().get(name.len()), Some(b' ' | b'{')))
            .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    pub async fn wait_metric(&self, series: &str, at_least: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let value = self.metric(series).await;
            if value >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} = {value}, wanted >= {at_least} within {within:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let mut child = self.child.take().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sidecar did not exit within {within:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `storerelay-sidecar --config CONFIG spool ARGS`: the spool and its destinations come from the
    /// config file, as in a pod.
    pub fn spool_tool(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary())
            .arg("--config")
            .arg(&self.config_path)
            .arg("spool")
            .args(args)
            .output()
            .expect("run spool tool")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.group {
                // SAFETY: kill(2) on the process group our own child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}")).collect::<Vec<_>>().join("\n")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

/// A V2-shaped body: `{"signedPayload": "<header>.<payload>.<signature>"}` of realistic size.
pub fn v2_body(n: usize) -> Vec<u8> {
    let filler: String = (0..1500).map(|i| char::from(b'A' + ((i * 7 + n) % 26) as u8)).collect();
    format!("{{\"signedPayload\":\"eyJhbGciOiJFUzI1NiIsIng1YyI6WyJNSUlF{filler}.eyJub3RpZmljYXRpb25UeXBlIjoiVEVTVCIsIm4iOj{n}.c2lnbmF0dXJl{n}\"}}")
        .into_bytes()
}

/// A V1-shaped body with non-ASCII, escapes and odd spacing that a re-serializer would change.
pub fn v1_body(n: usize) -> Vec<u8> {
    format!(
        "{{ \"notification_type\" : \"DID_RENEW\",\"environment\":\"Sandbox\", \"password\":\"shared-SECRET-{n}\",\n  \"bid\":\"com.example.app\",\"note\":\"caf\u{e9} \\u00e9 \\/ {n}\",\"unified_receipt\":{{\"latest_receipt\":\"MIIT...{n}\",\"status\":0}} }}"
    )
    .into_bytes()
}

pub fn assert_file_sound(path: &Path) {
    let db = storerelay_sidecar::spool::SpoolDb::open(path, storerelay_config::SyncMode::Full).unwrap();
    assert_eq!(db.quick_check().unwrap(), None, "spool failed its integrity check");
}
