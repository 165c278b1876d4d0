//! A real etcd and kube-apiserver on loopback, for the operator's integration tier and its benchmark:
//! generated certificates, RBAC, the MutatingAdmissionWebhook plugin, an admin kubeconfig. Everything
//! stops, and its data is deleted, when the `Cluster` drops — also when a test fails.

use crate::free_port;
use crate::process::{Process, spawn};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// Where the binaries are: `STORERELAY_KUBE_BIN`, else built by tests/kube-bin/build.sh. `None` (skip)
/// when Go is missing outside CI; under CI a missing toolchain is a failure.
pub fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STORERELAY_KUBE_BIN") {
        return Some(PathBuf::from(dir));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    if Command::new("go").arg("version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "Go is needed to build kube-apiserver for the integration tier");
        eprintln!("skipping the kube-apiserver tier: Go is not installed");
        return None;
    }
    let output =
        Command::new(root.join("tests/kube-bin/build.sh")).stderr(Stdio::inherit()).output().expect("run build.sh");
    assert!(output.status.success(), "tests/kube-bin/build.sh failed");
    Some(PathBuf::from(String::from_utf8(output.stdout).unwrap().trim()))
}

pub(crate) fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// How the API server is set up. The default is the operator's tier: loopback, a free port, no nodes.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Where it listens and what it advertises (the `kubernetes` Service's endpoint).
    pub address: IpAddr,
    /// Where it listens, if not only on `address` (`0.0.0.0`: also the ClusterIP a test puts on `lo`).
    pub bind: Option<IpAddr>,
    /// Its port; `None` picks a free one.
    pub port: Option<u16>,
    /// More addresses its serving certificate names (the `kubernetes` Service's ClusterIP, say).
    pub extra_addresses: Vec<IpAddr>,
    /// A kubelet will register: the Node authorizer, NodeRestriction and ServiceAccount admission, a client
    /// certificate for it (`kubelet.crt`) and a serving one (`kubelet-serving.crt`) for this node.
    pub node: Option<NodeIdentity>,
}

#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: IpAddr,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            address: IpAddr::from([127, 0, 0, 1]),
            bind: None,
            port: None,
            extra_addresses: Vec::new(),
            node: None,
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub ca_pem: String,
    processes: Vec<Process>,
}

impl Cluster {
    pub fn start(bin: &Path) -> Cluster {
        Cluster::start_with(bin, &ClusterOptions::default())
    }

    pub fn start_with(bin: &Path, options: &ClusterOptions) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let path = |name: &str| base.join(name);

        // A CA for the API server's serving certificate and for client certificates.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "storerelay-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let issue = |cn: &str, org: Option<&str>, names: Vec<SanType>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(org) = org {
                params.distinguished_name.push(DnType::OrganizationName, org);
            }
            params.subject_alt_names = names;
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let mut server_names: Vec<SanType> = ["localhost", "kubernetes.default.svc"]
            .into_iter()
            .map(|name| SanType::DnsName(name.try_into().unwrap()))
            .collect();
        let mut addresses = vec![IpAddr::from([127, 0, 0, 1]), options.address];
        addresses.extend(&options.extra_addresses);
        addresses.dedup();
        server_names.extend(addresses.into_iter().map(SanType::IpAddress));
        let (server_cert, server_key) = issue("kube-apiserver", None, server_names);
        let (admin_cert, admin_key) = issue("storerelay-admin", Some("system:masters"), Vec::new());
        if let Some(node) = &options.node {
            let (cert, key) = issue(&format!("system:node:{}", node.name), Some("system:nodes"), Vec::new());
            write(&path("kubelet.crt"), &cert);
            write(&path("kubelet.key"), &key);
            let (cert, key) = issue(&node.name, None, vec![SanType::IpAddress(node.ip)]);
            write(&path("kubelet-serving.crt"), &cert);
            write(&path("kubelet-serving.key"), &key);
        }
        let service_account_key = KeyPair::generate().unwrap();
        write(&path("ca.crt"), &ca.pem());
        write(&path("server.crt"), &server_cert);
        write(&path("server.key"), &server_key);
        write(&path("admin.crt"), &admin_cert);
        write(&path("admin.key"), &admin_key);
        write(&path("sa.key"), &service_account_key.serialize_pem());
        write(&path("sa.pub"), &service_account_key.public_key_pem());

        let (etcd_port, peer_port) = (free_port(), free_port());
        let api_port = options.port.unwrap_or_else(free_port);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn(
            "etcd",
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", path("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--name=default".into(),
                "--log-level=warn".into(),
                "--quota-backend-bytes=1073741824".into(),
            ],
            dir.path(),
        );
        let mut cluster = Cluster {
            kubeconfig: path("kubeconfig"),
            server: format!("https://{}", std::net::SocketAddr::new(options.address, api_port)),
            ca_pem: ca.pem(),
            dir,
            processes: vec![etcd],
        };
        cluster.wait_for(&format!("{etcd_url}/health"), Duration::from_secs(30), false);

        let apiserver = spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &apiserver_args(options, &etcd_url, api_port, &path),
            cluster.dir.path(),
        );
        cluster.processes.push(apiserver);
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
            server = cluster.server,
            ca = path("ca.crt").display(),
            cert = path("admin.crt").display(),
            key = path("admin.key").display(),
        );
        write(&cluster.kubeconfig, &kubeconfig);
        cluster.wait_for(&format!("{}/readyz", cluster.server), Duration::from_secs(120), true);
        cluster
    }

    /// A client of the API server with the admin's certificate.
    pub fn http(&self) -> reqwest::blocking::Client {
        let identity = format!(
            "{}{}",
            std::fs::read_to_string(self.dir.path().join("admin.crt")).unwrap(),
            std::fs::read_to_string(self.dir.path().join("admin.key")).unwrap()
        );
        reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    fn wait_for(&mut self, url: &str, within: Duration, tls: bool) {
        let deadline = Instant::now() + within;
        let client = if tls { self.http() } else { reqwest::blocking::Client::builder().no_proxy().build().unwrap() };
        loop {
            if client.get(url).send().is_ok_and(|r| r.status().is_success()) {
                return;
            }
            for process in &mut self.processes {
                process.assert_running();
            }
            assert!(Instant::now() < deadline, "{url} not ready within {within:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn logs(&self) -> String {
        self.processes.iter().map(|p| p.tail(40)).collect::<Vec<_>>().join("\n")
    }

    /// A kube client with the admin's credentials.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// `kubectl` against this server, when kubectl is installed.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }
}

fn apiserver_args(options: &ClusterOptions, etcd_url: &str, port: u16, path: &dyn Fn(&str) -> PathBuf) -> Vec<String> {
    let file = |flag: &str, name: &str| format!("--{flag}={}", path(name).display());
    let mut args = vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--secure-port={port}"),
        format!("--bind-address={}", options.bind.unwrap_or(options.address)),
        format!("--advertise-address={}", options.address),
        file("tls-cert-file", "server.crt"),
        file("tls-private-key-file", "server.key"),
        file("client-ca-file", "ca.crt"),
        file("service-account-key-file", "sa.pub"),
        file("service-account-signing-key-file", "sa.key"),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        "--service-cluster-ip-range=10.96.0.0/24".into(),
        "--allow-privileged=false".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    if options.node.is_some() {
        args.extend([
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook".into(),
            // There is no kube-proxy: the API server calls webhooks at their endpoints' pod IPs.
            "--enable-aggregator-routing=true".into(),
            file("kubelet-client-certificate", "admin.crt"),
            file("kubelet-client-key", "admin.key"),
            file("kubelet-certificate-authority", "ca.crt"),
            // No DNS here: reach the kubelet (logs, exec) at the node's address.
            "--kubelet-preferred-address-types=InternalIP".into(),
        ]);
    } else {
        args.extend([
            "--authorization-mode=RBAC".into(),
            "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook".into(),
            // No controller-manager creates the `default` ServiceAccounts.
            "--disable-admission-plugins=ServiceAccount".into(),
        ]);
    }
    args
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for process in self.processes.iter_mut().rev() {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
