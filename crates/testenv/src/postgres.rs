//! A real PostgreSQL server from the machine's packages, on a loopback port, for the shared spool's
//! tests and benchmarks: `initdb` into a temporary folder, `postgres` as a child process (as the
//! `postgres` user when the tests run as root: the server refuses root), stopped and deleted on drop,
//! also when a test fails. `stop` and `start` take it down and up again on the same port and data.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `initdb` and `postgres` are: `STORERELAY_POSTGRES_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`. `None` (skip) when missing outside CI; under CI a missing
/// server is a failure (`.ci/run` installs it).
pub fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STORERELAY_POSTGRES_BIN") {
        return Some(PathBuf::from(dir));
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse::<u32>().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").exists() && bin.join("initdb").exists())
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin);
    if newest.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL is needed for the shared-spool tests (apt-get install postgresql)"
        );
        eprintln!("skipping: PostgreSQL is not installed (apt-get install postgresql)");
    }
    newest
}

/// The uid and gid to run the server as: ours, or the `postgres` account's when we are root.
fn server_user() -> Option<(u32, u32)> {
    // /proc/self belongs to the process's effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self")) == 0;
    if !root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres"))
        .or_else(|| passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.first() == Some(&"nobody")))
        .expect("a `postgres` or `nobody` account to run PostgreSQL as");
    Some((entry[2].parse().expect("uid"), entry[3].parse().expect("gid")))
}

pub struct Postgres {
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub port: u16,
    user: Option<(u32, u32)>,
    child: Option<Child>,
    /// Server settings added by [`Postgres::enable_tls`].
    extra: Vec<String>,
}

impl Postgres {
    /// Initialises a cluster (superuser `storerelay`, trust on loopback, `fsync` and
    /// `synchronous_commit` on as in production) and starts it.
    pub fn start(bin: &Path) -> Postgres {
        let dir = tempfile::Builder::new().prefix("storerelay-pg").tempdir().unwrap();
        let user = server_user();
        if let Some((uid, gid)) = user {
            chown(dir.path(), uid, gid);
        }
        let mut server =
            Postgres { bin: bin.to_path_buf(), port: crate::free_port(), dir, user, child: None, extra: Vec::new() };
        let data = server.data();
        let initdb = server
            .command("initdb")
            .args(["-U", "storerelay", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        server.resume();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.stdin(Stdio::null()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// `postgres://storerelay@127.0.0.1:<port>/postgres?sslmode=disable`
    pub fn url(&self) -> String {
        format!("postgres://storerelay@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Starts the server (again) on the same port and data, and waits until it takes connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log")).unwrap();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", "-c", "fsync=on"])
            .args(["-c", "synchronous_commit=on", "-c", "shared_buffers=64MB"])
            .args(&self.extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "storerelay"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start within 30s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts the server with TLS on (plain connections still work), serving this certificate chain
    /// and key (PEM).
    pub fn enable_tls(&mut self, certificate_chain: &str, key: &str) {
        let (crt, pem) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        std::fs::write(&crt, certificate_chain).unwrap();
        std::fs::write(&pem, key).unwrap();
        // The server refuses a key file others can read.
        std::fs::set_permissions(&pem, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = self.user {
            chown(&crt, uid, gid);
            chown(&pem, uid, gid);
        }
        self.extra = vec![
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", crt.display()),
            "-c".into(),
            format!("ssl_key_file={}", pem.display()),
        ];
        self.stop();
        self.resume();
    }

    /// Stops the server the way an outage does: every connection is cut at once (an immediate
    /// shutdown; committed work survives, as after a crash).
    /// Also listens on `address` and lets clients from `cidr` in (trust, as on loopback): for pods, in
    /// the real-node tier's own network namespace. Restarts the server.
    pub fn allow_network(&mut self, address: &str, cidr: &str) {
        let hba = self.data().join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).unwrap();
        rules.push_str(&format!("host all all {cidr} trust\n"));
        std::fs::write(&hba, rules).unwrap();
        self.extra.extend(["-c".into(), format!("listen_addresses=127.0.0.1,{address}")]);
        self.stop();
        self.resume();
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown.
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Runs SQL through psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "storerelay", "-d", "postgres"])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(output.status.success(), "psql failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}
