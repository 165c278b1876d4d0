//! A child process whose output goes to a log file in the test's folder, so a failure can show its tail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub(crate) struct Process {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

pub(crate) fn spawn(name: &'static str, binary: &Path, args: &[String], dir: &Path) -> Process {
    spawn_command(name, Command::new(binary).args(args), dir)
}

pub(crate) fn spawn_command(name: &'static str, command: &mut Command, dir: &Path) -> Process {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Process { name, child, log }
}

impl Process {
    /// The last `lines` lines of its log, headed by its name.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        format!("--- {} ---\n{}", self.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    /// Panics with its log if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    #[cfg_attr(not(feature = "node"), allow(dead_code))]
    pub fn stop(&mut self, grace: std::time::Duration) {
        if self.child.try_wait().is_ok_and(|s| s.is_some()) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
