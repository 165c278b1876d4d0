//! The test's own namespaces, which tests/node/run.sh makes with `unshare --net --mount --pid --fork
//! --mount-proc`: a network with nothing but `lo` and the pods' bridge (no route out), private mounts, and
//! a PID namespace whose first process is this binary. The teardown relies on that last one: when this
//! process kills every other process in the namespace, nothing the cluster started (containerd's shims, the
//! containers) can survive it.

use anyhow::{Context, Result, bail};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Refuses to run anywhere but inside the namespaces run.sh makes: the setup below rewrites the network
/// and mounts of the namespace it runs in.
pub fn check_isolated() -> Result<()> {
    if std::process::id() != 1 {
        bail!(
            "run me through tests/node/run.sh: I must be the first process of my own PID, mount and network namespaces"
        );
    }
    // Not /sys/class/net: sysfs shows the network namespace of whoever mounted it.
    let output = Command::new("ip").args(["-o", "link", "show"]).output().context("run ip link")?;
    let links = String::from_utf8_lossy(&output.stdout).lines().count();
    if links != 1 {
        bail!("this network namespace has {links} links; expected only lo (run through tests/node/run.sh)");
    }
    Ok(())
}

/// `lo` up with the node's address and the `kubernetes` Service's ClusterIP on it (there is no kube-proxy:
/// a pod's packets to the ClusterIP reach this namespace through the bridge and are delivered locally, to
/// the API server listening on every address), and a fresh `/run` and `/var/log` (containerd's shims and
/// the kubelet's container-log links use fixed paths there).
pub fn set_up(node_ip: IpAddr, service_ip: IpAddr) -> Result<()> {
    run("ip", &["link", "set", "lo", "up"])?;
    for address in [node_ip, service_ip] {
        run("ip", &["addr", "add", &format!("{address}/32"), "dev", "lo"])?;
    }
    for dir in ["/run", "/var/log"] {
        run("mount", &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", dir])?;
    }
    Ok(())
}

/// Ends every other process in the namespace (this is its PID 1, which a signal from inside cannot
/// reach), reaps them, and unmounts what the kubelet and containerd mounted under `work`, deepest first.
pub fn tear_down(work: &Path) {
    let _ = Command::new("kill").args(["-KILL", "-1"]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: waitpid with a null status pointer only reaps; we are the namespace's init.
        let reaped = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if reaped < 0 || Instant::now() > deadline {
            break;
        }
        if reaped == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .filter(|point| Path::new(point).starts_with(work))
        .collect();
    under.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in under {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program).args(args).output().with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
