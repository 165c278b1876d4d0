//! A real etcd and kube-apiserver on loopback, for the operator's integration tier and its benchmark:
//! generated certificates, RBAC, the MutatingAdmissionWebhook plugin, an admin kubeconfig. Everything
//! stops, and its data is deleted, when the `Cluster` drops — also when a test fails.

use crate::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub ca_pem: String,
    processes: Vec<Process>,
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn spawn(name: &'static str, binary: &Path, args: &[String], dir: &Path) -> Process {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Process { name, child, log }
}

impl Cluster {
    pub fn start(bin: &Path) -> Cluster {
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
        let issue = |cn: &str, org: Option<&str>, server: bool| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(org) = org {
                params.distinguished_name.push(DnType::OrganizationName, org);
            }
            if server {
                params.subject_alt_names = vec![
                    SanType::IpAddress("127.0.0.1".parse().unwrap()),
                    SanType::DnsName("localhost".try_into().unwrap()),
                ];
            }
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = issue("kube-apiserver", None, true);
        let (admin_cert, admin_key) = issue("storerelay-admin", Some("system:masters"), false);
        let service_account_key = KeyPair::generate().unwrap();
        write(&path("ca.crt"), &ca.pem());
        write(&path("server.crt"), &server_cert);
        write(&path("server.key"), &server_key);
        write(&path("admin.crt"), &admin_cert);
        write(&path("admin.key"), &admin_key);
        write(&path("sa.key"), &service_account_key.serialize_pem());
        write(&path("sa.pub"), &service_account_key.public_key_pem());

        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
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
            server: format!("https://127.0.0.1:{api_port}"),
            ca_pem: ca.pem(),
            dir,
            processes: vec![etcd],
        };
        cluster.wait_for(&format!("{etcd_url}/health"), Duration::from_secs(30), false);

        let apiserver = spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--tls-cert-file={}", path("server.crt").display()),
                format!("--tls-private-key-file={}", path("server.key").display()),
                format!("--client-ca-file={}", path("ca.crt").display()),
                format!("--service-account-key-file={}", path("sa.pub").display()),
                format!("--service-account-signing-key-file={}", path("sa.key").display()),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=10.96.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook".into(),
                // No controller-manager creates the `default` ServiceAccounts.
                "--disable-admission-plugins=ServiceAccount".into(),
                "--allow-privileged=false".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
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

    fn http(&self) -> reqwest::blocking::Client {
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
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!(
                        "{} exited ({status}):\n{}",
                        process.name,
                        std::fs::read_to_string(&process.log).unwrap_or_default()
                    );
                }
            }
            assert!(Instant::now() < deadline, "{url} not ready within {within:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn logs(&self) -> String {
        self.processes
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                format!("--- {} ---\n{}", p.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
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
