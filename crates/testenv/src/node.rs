//! A real node beside the API server: containerd serving CRI, a kubelet, kube-scheduler and
//! kube-controller-manager, pods on a CNI bridge. It changes the network and the mounts of the namespace
//! it runs in, and the kubelet writes host sysctls: run it only inside the network, mount and PID
//! namespaces that tests/node/run.sh makes (that script restores the sysctls and removes the cgroups when
//! the namespaces are gone).

use crate::apiserver::{Cluster, write};
use crate::process::{Process, spawn, spawn_command};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the kubelet, kube-scheduler and kube-controller-manager are: `STORERELAY_KUBE_NODE_BIN`, else
/// built by tests/kube-bin/build-node.sh.
pub fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("STORERELAY_KUBE_NODE_BIN") {
        return PathBuf::from(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(root.join("tests/kube-bin/build-node.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-node.sh");
    assert!(output.status.success(), "tests/kube-bin/build-node.sh failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The folder with kubelet, kube-scheduler and kube-controller-manager.
    pub bin: PathBuf,
    /// The node's name; the API server's `ClusterOptions::node` must name it too (its certificates).
    pub name: String,
    /// The node's address (the kubelet serves on it; pods reach the host through it).
    pub ip: IpAddr,
    /// Pod addresses, e.g. `10.88.0.0/16`: a bridge `cni0` with the subnet's first address as gateway.
    pub pod_subnet: String,
    /// The cgroup (in every hierarchy) that holds the kubelet's `kubepods`, e.g. `/storerelay-node`.
    pub cgroup_root: String,
    /// The pod sandbox ("pause") image, already in one of `images`.
    pub pause_image: String,
    /// Image archives (`podman save`) imported into containerd before the kubelet starts: no image can
    /// be pulled here.
    pub images: Vec<PathBuf>,
}

pub struct Node {
    pub dir: PathBuf,
    pub name: String,
    bin: PathBuf,
    socket: PathBuf,
    processes: Vec<Process>,
}

impl Node {
    /// Starts containerd, imports the images, starts the scheduler, controller-manager and kubelet, and
    /// waits until the node is Ready and untainted (up to two minutes).
    pub fn start(cluster: &Cluster, options: &NodeOptions) -> Node {
        let dir = cluster.dir.path().join("node");
        for sub in ["containerd", "cni/net.d", "cni/ipam", "kubelet", "pod-logs"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        create_cgroup_root(&options.cgroup_root);
        let mut node = Node {
            socket: dir.join("containerd.sock"),
            dir,
            name: options.name.clone(),
            bin: options.bin.clone(),
            processes: Vec::new(),
        };
        node.start_containerd(options);
        for archive in &options.images {
            let imported = node.ctr(&["images", "import"], Some(archive));
            assert!(imported.status.success(), "import {}: {}", archive.display(), text(&imported));
        }
        node.start_control_plane(cluster);
        node.start_kubelet(cluster, options);
        node.wait_until_ready(cluster, Duration::from_secs(120));
        node
    }

    fn start_containerd(&mut self, options: &NodeOptions) {
        let dir = &self.dir;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# The host's other snapshotters and the tracing exporters cannot start here.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This VM's root lacks CAP_SYS_RESOURCE: containers may only raise their OOM score.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
            root = dir.join("containerd/root").display(),
            state = dir.join("containerd/state").display(),
            socket = self.socket.display(),
            pause = options.pause_image,
            cni_bin = cni_plugins().display(),
            cni_conf = dir.join("cni/net.d").display(),
        );
        write(&dir.join("containerd.toml"), &config);
        let gateway = gateway_of(&options.pod_subnet);
        let cni = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "storerelay-test",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                // Nothing leaves the namespace: no masquerading, so no iptables rules.
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": options.pod_subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("cni/ipam"),
                },
            }],
        });
        write(&dir.join("cni/net.d/10-storerelay.conflist"), &serde_json::to_string_pretty(&cni).unwrap());
        let containerd = spawn(
            "containerd",
            Path::new("containerd"),
            &[format!("--config={}", dir.join("containerd.toml").display())],
            dir,
        );
        self.processes.push(containerd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctr(&["version"], None).status.success() {
            self.assert_running();
            assert!(Instant::now() < deadline, "containerd did not answer within 30s:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start_control_plane(&mut self, cluster: &Cluster) {
        let base = cluster.dir.path();
        let file = |flag: &str, name: &str| format!("--{flag}={}", base.join(name).display());
        let kubeconfig = file("kubeconfig", "kubeconfig");
        let controller_manager = spawn(
            "kube-controller-manager",
            &self.binary("kube-controller-manager"),
            &[
                kubeconfig.clone(),
                "--leader-elect=false".into(),
                // The service-account, token, root-CA publisher, deployment, replica-set, endpoint and
                // node-lifecycle (which lifts the not-ready taint) controllers, among the defaults.
                "--controllers=*".into(),
                file("root-ca-file", "ca.crt"),
                file("service-account-private-key-file", "sa.key"),
                "--use-service-account-credentials=false".into(),
                "--node-monitor-grace-period=20s".into(),
                "--secure-port=0".into(),
                "--v=1".into(),
            ],
            &self.dir,
        );
        let scheduler = spawn(
            "kube-scheduler",
            &self.binary("kube-scheduler"),
            &[kubeconfig, "--leader-elect=false".into(), "--secure-port=0".into(), "--v=1".into()],
            &self.dir,
        );
        self.processes.push(controller_manager);
        self.processes.push(scheduler);
    }

    fn start_kubelet(&mut self, cluster: &Cluster, options: &NodeOptions) {
        let base = cluster.dir.path();
        let dir = &self.dir;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: kubelet\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: test\n  context: {{cluster: test, user: kubelet}}\ncurrent-context: test\n",
            server = cluster.server,
            ca = base.join("ca.crt").display(),
            cert = base.join("kubelet.crt").display(),
            key = base.join("kubelet.key").display(),
        );
        write(&dir.join("kubelet.kubeconfig"), &kubeconfig);
        write(&dir.join("resolv.conf"), "");
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": options.ip.to_string(),
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "tlsCertFile": base.join("kubelet-serving.crt"),
            "tlsPrivateKeyFile": base.join("kubelet-serving.key"),
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": base.join("ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": format!("unix://{}", self.socket.display()),
            "imageServiceEndpoint": format!("unix://{}", self.socket.display()),
            "podLogsDir": dir.join("pod-logs"),
            "resolvConf": dir.join("resolv.conf"),
            // This VM runs cgroup v1 (hybrid), has swap, and its root lacks CAP_SYS_RESOURCE.
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": options.cgroup_root,
            "failCgroupV1": false,
            "failSwapOn": false,
            "oomScoreAdj": 0,
            "maxOpenFiles": 16384,
            "protectKernelDefaults": false,
            // Projected Secrets and ConfigMaps reach running pods within seconds, not a minute.
            "syncFrequency": "5s",
            "nodeStatusUpdateFrequency": "4s",
            // The images were imported and cannot be pulled again: never collect them, never evict.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "serializeImagePulls": false,
            "staticPodPath": "",
            "shutdownGracePeriod": "0s",
            "registerNode": true,
        });
        write(&dir.join("kubelet.json"), &serde_json::to_string_pretty(&config).unwrap());
        let kubelet = spawn_command(
            "kubelet",
            Command::new(self.binary("kubelet")).args([
                format!("--config={}", dir.join("kubelet.json").display()),
                format!("--kubeconfig={}", dir.join("kubelet.kubeconfig").display()),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--hostname-override={}", options.name),
                format!("--node-ip={}", options.ip),
                "--v=1".into(),
            ]),
            dir,
        );
        self.processes.push(kubelet);
    }

    fn wait_until_ready(&mut self, cluster: &Cluster, within: Duration) {
        let client = cluster.http();
        let url = format!("{}/api/v1/nodes/{}", cluster.server, self.name);
        let deadline = Instant::now() + within;
        loop {
            let node: Option<serde_json::Value> = client
                .get(&url)
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .and_then(|r| r.text().ok())
                .and_then(|t| serde_json::from_str(&t).ok());
            if node.as_ref().is_some_and(is_ready_and_untainted) {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "node {} not Ready and untainted within {within:?}: {}\n{}\n{}",
                self.name,
                node.map(|n| n["status"]["conditions"].to_string()).unwrap_or_default(),
                self.logs(),
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn assert_running(&mut self) {
        for process in &mut self.processes {
            process.assert_running();
        }
    }

    /// `ctr` against this node's containerd, in the kubelet's `k8s.io` namespace; `input` is appended.
    pub fn ctr(&self, args: &[&str], input: Option<&Path>) -> Output {
        let mut command = Command::new("ctr");
        command.arg(format!("--address={}", self.socket.display())).args(["--namespace", "k8s.io"]).args(args);
        if let Some(path) = input {
            command.arg(path);
        }
        command.stdin(Stdio::null()).output().expect("run ctr")
    }

    /// The last lines of each component's log.
    pub fn logs(&self) -> String {
        self.processes.iter().map(|p| p.tail(30)).collect::<Vec<_>>().join("\n")
    }

    /// The full log of one component (`kubelet`, `containerd`, ...).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Node {
    /// Stops the kubelet first (so it does not restart what it sees die), then the control plane and
    /// containerd. Pods' processes outlive containerd (their shims are separate); the PID namespace they
    /// run in ends them (see tests/node/run.sh).
    fn drop(&mut self) {
        for process in self.processes.iter_mut().rev() {
            process.stop(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn is_ready_and_untainted(node: &serde_json::Value) -> bool {
    let ready = node["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
    let tainted = node["spec"]["taints"].as_array().is_some_and(|t| !t.is_empty());
    ready && !tainted
}

/// The first address of an IPv4 subnet `a.b.c.d/n` (the bridge's, the pods' gateway).
fn gateway_of(subnet: &str) -> String {
    let network: std::net::Ipv4Addr =
        subnet.split('/').next().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("bad subnet {subnet}"));
    std::net::Ipv4Addr::from(u32::from(network) + 1).to_string()
}

/// Debian's containernetworking-plugins, or the upstream default folder.
fn cni_plugins() -> PathBuf {
    ["/usr/lib/cni", "/opt/cni/bin"]
        .into_iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("bridge").exists())
        .expect("the CNI plugins bridge, host-local and loopback (Debian: containernetworking-plugins)")
}

/// The cgroup mounts of this machine (cgroup v1 hierarchies and the unified one).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            matches!(fields.get(2), Some(&"cgroup") | Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .collect()
}

/// The kubelet refuses a cgroup root that does not exist. cpuset children start empty: copy the parent's.
fn create_cgroup_root(root: &str) {
    let relative = root.trim_start_matches('/');
    for mount in cgroup_mounts() {
        let path = mount.join(relative);
        if std::fs::create_dir_all(&path).is_err() {
            continue;
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(mount.join(file)) {
                let _ = std::fs::write(path.join(file), value.trim());
            }
        }
    }
}

/// Removes the cgroup root and everything under it, deepest first, in every hierarchy; retries while
/// the kernel still holds the last exited processes. Returns what it could not remove.
pub fn remove_cgroup_root(root: &str, within: Duration) -> Vec<PathBuf> {
    let relative = root.trim_start_matches('/');
    let deadline = Instant::now() + within;
    loop {
        let mut left = Vec::new();
        for mount in cgroup_mounts() {
            let top = mount.join(relative);
            if top.exists() {
                remove_depth_first(&top, &mut left);
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn remove_depth_first(dir: &Path, left: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_depth_first(&entry.path(), left);
            }
        }
    }
    if std::fs::remove_dir(dir).is_err() {
        left.push(dir.to_path_buf());
    }
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}
