//! Resident memory and CPU time of a process and its children, from /proc; the machine's description.

use serde_json::{Value, json};

fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            found.push(child);
        }
    }
    found
}

fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut index = 0;
    while index < all.len() {
        let next = children(all[index]);
        all.extend(next);
        index += 1;
    }
    all
}

/// A `kB` field of /proc/<pid>/status, such as `VmRSS:` or `VmHWM:`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

pub fn tree_rss_kib(pid: u32) -> u64 {
    tree(pid).iter().filter_map(|&p| status_kib(p, "VmRSS:")).sum()
}

/// Peak resident memory of one process (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:").unwrap_or(0)
}

/// Waits until the process tree is idle again (under 5 % of a core over a quarter second; at most a
/// minute) and returns its CPU seconds then. Work a load leaves behind (the sidecar's deliveries lag
/// its ingest at saturation and drain afterwards) is counted against that load, and does not run into
/// the next measurement.
pub async fn settled_cpu_seconds(pid: u32) -> f64 {
    const LOOK: std::time::Duration = std::time::Duration::from_millis(250);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = tree_cpu_seconds(pid);
    loop {
        tokio::time::sleep(LOOK).await;
        let now = tree_cpu_seconds(pid);
        if now - last < 0.05 * LOOK.as_secs_f64() || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

pub fn tree_cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            let fields: Vec<&str> =
                stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default().split_whitespace().collect();
            // utime and stime are fields 14 and 15; `fields` starts at field 3.
            let value = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (value(11) + value(12)) / ticks
        })
        .sum()
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or("?".into(), |kib| format!("{:.0} GiB", kib as f64 / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} × {cpu}, {memory} RAM, Linux {}; load generator and targets share these cores over loopback",
        kernel.trim()
    )
}

/// The size of a locally built image, if there is one (podman or docker).
pub fn image_size(repository: &str) -> Value {
    let version = env!("CARGO_PKG_VERSION");
    for tool in ["podman", "docker"] {
        let output = std::process::Command::new(tool)
            .args(["image", "inspect", &format!("{repository}:{version}"), "--format", "{{.Size}}"])
            .output();
        if let Ok(output) = output {
            if let Ok(size) = String::from_utf8_lossy(&output.stdout).trim().parse::<u64>() {
                return json!(size);
            }
        }
    }
    Value::Null
}
