//! Whatever arrives on the public port, the sidecar stays inside the memory limit the operator gives
//! it (finding 1 of the hardening review: sixteen 1 MiB `[0,0,...]` bodies at once took a debug build
//! to 115 MiB, past the injected 64 Mi, which kills the pod's app path with it).
//!
//! Measured on the release binary (`make test` builds it and passes `STORERELAY_RELEASE_SIDECAR`), as
//! the kernel sees it: the peak resident set (`VmHWM`) read from `/proc` after the attack. The
//! threshold is the container's limit, not a timing.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use support::{Sidecar, StandIn};

const MIB: usize = 1024 * 1024;
/// Requests at once, and how many rounds of them.
const CONCURRENT: usize = 16;
const ROUNDS: usize = 4;

/// The release build of the sidecar; `None` outside `make test` unless the variable is set (the test
/// then says it did not run; under CI it fails instead).
fn release_binary() -> Option<PathBuf> {
    match std::env::var_os("STORERELAY_RELEASE_SIDECAR") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "STORERELAY_RELEASE_SIDECAR={} is not a file", path.display());
            Some(path)
        }
        None if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("STORERELAY_RELEASE_SIDECAR is not set: run this through `make test`")
        }
        None => None,
    }
}

fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A JSON array of zeros, `len` bytes at most: the body that cost 32 bytes of tree per 2 bytes of
/// input. It starts with `n` so that no two are duplicates (which are stored and delivered once).
fn zeros(n: usize, len: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(format!("[{n},").as_bytes());
    while body.len() + 4 <= len {
        body.extend_from_slice(b"0,");
    }
    body.extend_from_slice(b"0]");
    body
}

/// The same array inside a V2 envelope, where it is decoded from base64 before being read.
fn v2_zeros(n: usize, len: usize) -> Vec<u8> {
    let payload = URL_SAFE_NO_PAD.encode(zeros(n, len * 3 / 4 - 64));
    format!("{{\"signedPayload\":\"eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln\"}}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_mebibyte_arrays_sent_sixteen_at_once_stay_under_the_injected_memory_limit() {
    let Some(program) = release_binary() else {
        eprintln!("not run: set STORERELAY_RELEASE_SIDECAR to a release build (make test does)");
        return;
    };
    let limit_kib = storerelay_config::SIDECAR_MEMORY_LIMIT_MIB * 1024;
    let rc = StandIn::start().await;
    // The defaults, as an injected sidecar runs them: verification off and unknown bodies accepted is
    // the costliest case, since every body is stored and then delivered.
    let tmp = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::prepare(
        tmp.path().to_path_buf(),
        &format!("destinations: [{{name: rc, url: \"{}\"}}]\n", rc.url("/")),
        "",
    );
    sidecar.spawn_program(&program);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let idle_kib = peak_rss_kib(sidecar.pid());

    let body = |n: usize| bytes::Bytes::from(if n % 2 == 0 { zeros(n, MIB) } else { v2_zeros(n, MIB) });
    // Just under the default `maxBodyBytes`, so they are read in full.
    assert!([body(0), body(1)].iter().all(|body| body.len() <= MIB && body.len() > MIB - 128));
    let client = support::client();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..ROUNDS {
        // Every request is on its way before the first answer is awaited.
        let requests: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let body = body(round * CONCURRENT + i);
                tokio::spawn(client.post(sidecar.ingest_url("/apple/notifications")).body(body).send())
            })
            .collect();
        for request in requests {
            let status = request.await.unwrap().expect("the sidecar answered").status().as_u16();
            *statuses.entry(status).or_default() += 1;
        }
    }
    let stored = statuses.get(&200).copied().unwrap_or(0);
    // The budget turns some away with 503 (Apple retries those); nothing else is an acceptable answer.
    assert!(statuses.keys().all(|status| [200, 503].contains(status)), "answers: {statuses:?}");
    assert!(stored >= ROUNDS, "the budget should still take some bodies: {statuses:?}");
    // Stored bodies are delivered too (a reader of 1 MiB rows and an HTTP client sending them).
    rc.wait_for(stored, Duration::from_secs(60)).await;

    let peak_kib = peak_rss_kib(sidecar.pid());
    eprintln!(
        "peak RSS {:.1} MiB (idle {:.1} MiB) after {} x {CONCURRENT} concurrent 1 MiB bodies, answers {statuses:?}; limit {} MiB",
        peak_kib as f64 / 1024.0,
        idle_kib as f64 / 1024.0,
        ROUNDS,
        limit_kib / 1024
    );
    assert!(
        peak_kib < limit_kib,
        "peak RSS {peak_kib} KiB is over the injected limit of {limit_kib} KiB; log:\n{}",
        sidecar.log()
    );
    assert_eq!(client.get(format!("http://{}/healthz", sidecar.admin)).send().await.unwrap().status(), 200);
}
