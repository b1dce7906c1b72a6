//! The real `idemgate` binary as a child process, its JSON log captured.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin listener's address, when the config has one.
    pub admin: Option<SocketAddr>,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Runs `idemgate serve --config <path>` and waits (bounded) for its listening line.
    pub fn serve(config_path: &std::path::Path) -> Binary {
        Binary::serve_with(config_path, &[], &[])
    }

    /// `serve` with more arguments and environment variables.
    pub fn serve_with(
        config_path: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_idemgate"));
        command.envs(env.iter().copied());
        Binary::spawn(command, config_path, args)
    }

    /// `serve` run by `wrapper` (a program and its arguments that ends by
    /// executing the binary, e.g. `prlimit --nofile=256:`).
    pub fn serve_wrapped(config_path: &std::path::Path, wrapper: &[&str]) -> Binary {
        let mut command = Command::new(wrapper[0]);
        command
            .args(&wrapper[1..])
            .arg(env!("CARGO_BIN_EXE_idemgate"));
        Binary::spawn(command, config_path, &[])
    }

    /// Starts `command` with `serve --config <path>` and `args`.
    fn spawn(mut command: Command, config_path: &std::path::Path, args: &[&str]) -> Binary {
        let mut child = command
            .args(["serve", "--log-format", "json", "--config"])
            .arg(config_path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start idemgate");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let start = Instant::now();
        let addr = loop {
            let found = lines.lock().unwrap().iter().find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["message"] == "idemgate listening")
                    .then(|| v["address"].as_str()?.parse().ok())?
            });
            if let Some(addr) = found {
                break addr;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "idemgate did not start: {:?}",
                lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let admin = lines.lock().unwrap().iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "admin listening").then(|| v["address"].as_str()?.parse().ok())?
        });
        Binary {
            child,
            addr,
            admin,
            lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        wait_exit(&mut self.child, limit)
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The JSON access lines logged so far (`target: idemgate::access`).
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "idemgate::access")
            .collect()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary started with exactly the given arguments (no `--log-format`
/// added, no readiness awaited), stdout and stderr captured line by line.
pub struct Process {
    pub child: Child,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start idemgate");
        let capture = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = capture(Box::new(child.stdout.take().unwrap()));
        let stderr = capture(Box::new(child.stderr.take().unwrap()));
        Process {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (bounded) for a stdout line that satisfies `wanted` and returns it.
    pub fn wait_for_line(&self, limit: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.stdout.lock().unwrap().iter().find(|l| wanted(l)) {
                return line.clone();
            }
            assert!(
                start.elapsed() < limit,
                "no such line within {limit:?}: {:?} {:?}",
                self.stdout.lock().unwrap(),
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        wait_exit(&mut self.child, limit)
    }

    /// Stops with SIGTERM and returns every line of stdout and of stderr
    /// (the logs are flushed on exit; the pipes are read to their end).
    pub fn stop(mut self) -> (Vec<String>, Vec<String>) {
        self.signal("TERM");
        assert_eq!(self.wait_exit(Duration::from_secs(10)), Some(0));
        // The readers end at EOF, shortly after the exit.
        let start = Instant::now();
        while Arc::strong_count(&self.stdout) > 1 || Arc::strong_count(&self.stderr) > 1 {
            assert!(start.elapsed() < Duration::from_secs(5), "pipes not closed");
            std::thread::sleep(Duration::from_millis(10));
        }
        (
            self.stdout.lock().unwrap().clone(),
            self.stderr.lock().unwrap().clone(),
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends signal `name` (`TERM`, `HUP`, ...) to `child`.
fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for `child` to exit and returns its exit code.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            start.elapsed() < limit,
            "idemgate did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
