//! The spool's files stay inside the volume the operator gives them (finding 3 of the hardening
//! review: `maxBytes` counted bodies only, while the WAL kept its peak size beside the database, so
//! a burst could pass the `emptyDir` sizeLimit, and the kubelet evicts the pod and deletes the spool).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use storerelay_config::ByteSize;
use support::{Behavior, Sidecar, StandIn};

const MIB: u64 = 1 << 20;
const NOTIFICATIONS: usize = 190;

/// Bytes of the spool's files now: the database, its WAL and shared memory, anything set aside.
fn spool_files_bytes(spool: &Path) -> u64 {
    let (Some(dir), Some(name)) = (spool.parent(), spool.file_name().and_then(|n| n.to_str())) else { return 0 };
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_str().is_some_and(|f| f.starts_with(name)))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A 1 MiB V2-shaped body, different for each `n` (repeats would be stored once).
fn body(n: usize) -> bytes::Bytes {
    let envelope = format!("{{\"signedPayload\":\"{n}.\"}}");
    let mut body = envelope.into_bytes();
    let filler = vec![b'A'; (MIB as usize) - body.len()];
    body.splice(body.len() - 2..body.len() - 2, filler);
    bytes::Bytes::from(body)
}

/// How a burst came out.
#[derive(Debug)]
struct Burst {
    stored: usize,
    /// Refused because the spool was full (a 503 Apple retries later; not retried here).
    full: usize,
    /// Largest size the spool's files reached while it landed.
    peak_bytes: u64,
}

/// Starts a sidecar with the spool the operator renders for `size_limit`, its one destination down (so
/// nothing drains or is evicted), after `prepare` has had its way with the spool's folder.
async fn sidecar_for(size_limit: ByteSize, rc: &StandIn, prepare: impl FnOnce(&Path)) -> (Sidecar, tempfile::TempDir) {
    let max_bytes = storerelay_config::spool_max_bytes_within(size_limit);
    let tmp = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::prepare(
        tmp.path().to_path_buf(),
        &format!(
            "destinations: [{{name: rc, url: \"{}\", retry: {{initialBackoff: 1h, maxBackoff: 1h}}}}]\n",
            rc.url("/")
        ),
        &format!("maxBytes: {}", max_bytes.get()),
    );
    prepare(&sidecar.spool_path());
    match std::env::var_os("STORERELAY_RELEASE_SIDECAR") {
        Some(release) => sidecar.spawn_program(&PathBuf::from(release)),
        None => sidecar.spawn(),
    }
    sidecar.wait_ready(Duration::from_secs(20)).await;
    (sidecar, tmp)
}

/// Sends `NOTIFICATIONS` different 1 MiB bodies at once, sampling the spool's files meanwhile. A 503 for
/// a busy sidecar (the body budget) is retried as Apple would, within bounds; one for a full spool is not.
async fn burst(sidecar: &Sidecar) -> Burst {
    let spool = sidecar.spool_path();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, spool) = (peak.clone(), done.clone(), spool.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(spool_files_bytes(&spool), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = support::client();
    let tasks: Vec<_> = (0..NOTIFICATIONS)
        .map(|n| {
            let (client, url, body) = (client.clone(), sidecar.ingest_url("/apple/notifications"), body(n));
            tokio::spawn(async move {
                loop {
                    let answer = client.post(&url).body(body.clone()).send().await;
                    let (status, text) = match answer {
                        Ok(answer) => (answer.status().as_u16(), answer.text().await.unwrap_or_default()),
                        Err(_) => (0, String::new()),
                    };
                    match status {
                        200 => return Some(true),
                        503 if text.contains("spool full") => return Some(false),
                        503 | 0 if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20 + (n as u64 % 20))).await
                        }
                        _ => return None,
                    }
                }
            })
        })
        .collect();
    let (mut stored, mut full) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Some(true) => stored += 1,
            Some(false) => full += 1,
            None => panic!("a notification got neither 200 nor 503 within the deadline"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    Burst { stored, full, peak_bytes: peak.load(Ordering::SeqCst) }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_190_one_mebibyte_notifications_keeps_the_files_inside_the_rendered_volume() {
    let size_limit: ByteSize = storerelay_config::DEFAULT_SPOOL_SIZE_LIMIT.parse().unwrap();
    let max_bytes = storerelay_config::spool_max_bytes_within(size_limit);
    let rc = StandIn::start().await;
    rc.set_default(Behavior::Status(503));
    let (sidecar, _tmp) = sidecar_for(size_limit, &rc, |_| {}).await;
    let burst = burst(&sidecar).await;
    eprintln!(
        "{burst:?}: peak {:.1} MiB, at rest {:.1} MiB; maxBytes {:.1} MiB, sizeLimit {:.0} MiB",
        mib(burst.peak_bytes),
        mib(spool_files_bytes(&sidecar.spool_path())),
        mib(max_bytes.get()),
        mib(size_limit.get())
    );
    assert_eq!(burst.stored, NOTIFICATIONS, "190 MiB of bodies fit in maxBytes {max_bytes}");
    assert!(
        burst.peak_bytes < size_limit.get(),
        "the spool's files reached {} bytes, past {size_limit}",
        burst.peak_bytes
    );
    assert!(sidecar.metric("storerelay_spool_bytes").await <= max_bytes.get() as f64, "maxBytes holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_spool_set_aside_leaves_less_room_instead_of_passing_the_volume() {
    let size_limit: ByteSize = storerelay_config::DEFAULT_SPOOL_SIZE_LIMIT.parse().unwrap();
    let max_bytes = storerelay_config::spool_max_bytes_within(size_limit);
    let rc = StandIn::start().await;
    rc.set_default(Behavior::Status(503));
    // 64 MiB of garbage where the spool should be: set aside at start, and kept for recovery.
    let damaged = 64 * MIB;
    let (sidecar, _tmp) = sidecar_for(size_limit, &rc, |spool| {
        std::fs::write(spool, vec![0x42; damaged as usize]).unwrap();
    })
    .await;
    let burst = burst(&sidecar).await;
    eprintln!(
        "{burst:?}: peak {:.1} MiB with {:.0} MiB set aside; maxBytes {:.1} MiB, sizeLimit {:.0} MiB",
        mib(burst.peak_bytes),
        mib(damaged),
        mib(max_bytes.get()),
        mib(size_limit.get())
    );
    assert!(
        burst.peak_bytes < size_limit.get(),
        "the spool's files reached {} bytes, past {size_limit}",
        burst.peak_bytes
    );
    assert!(burst.full > 0, "the set-aside copy takes room, so some of the burst is refused for now: {burst:?}");
    assert!(burst.stored as u64 * MIB + damaged <= max_bytes.get(), "{burst:?}");
    assert!(burst.stored as u64 * MIB + damaged > max_bytes.get() - 4 * MIB, "all the room left is used: {burst:?}");
    let stats = sidecar.spool_tool(&["stats"]);
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains("set aside (damaged, counted)"), "{stats}");
    // Discarded with the tool, the room comes back at the next housekeeping pass (every minute), or now
    // on a restart; the copy itself is gone.
    let discarded = sidecar.spool_tool(&["discard-set-aside"]);
    assert!(String::from_utf8_lossy(&discarded.stdout).starts_with("1 set-aside files deleted"), "{discarded:?}");
}
