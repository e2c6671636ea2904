//! Shared test harness: certificates, a recording upstream, the real
//! matrix-edge binary on free loopback ports, and raw h1/h2 TLS clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod client;
pub mod h2frames;
pub mod key_server;
pub mod matrix;
pub mod synapse;
pub mod tee;
pub mod upstream;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A loopback port nobody listens on right now, taken below the kernel's
/// ephemeral range (32768 and up on Linux) and never handed out twice by
/// one test process. A port from `bind(0)` is itself ephemeral: between
/// the pick and the edge's bind, an outgoing connection of a test running
/// beside it could take it as its source port.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another, but a killed edge from the
    // previous one may still hold its ports for a moment: start each
    // process somewhere else in the span.
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + offset) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN);
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_matrix-edge")
}

/// The real binary running a config, killed on drop. Its stderr is kept
/// in a file so tests can read the log.
pub struct EdgeProcess {
    child: Child,
    /// Processes replaced by an upgrade, still draining.
    pub retired: Vec<u32>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl EdgeProcess {
    /// Writes `config` (YAML) into a fresh directory that already holds
    /// `certs/` from `certs`, starts the binary and waits until every
    /// address in `wait_for` accepts connections.
    pub fn start(config: &str, certs: Option<&certs::TestPki>, wait_for: &[SocketAddr]) -> EdgeProcess {
        let dir = tempfile::tempdir().unwrap();
        if let Some(pki) = certs {
            pki.copy_into(&dir.path().join("certs"));
        }
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config).unwrap();
        Self::spawn(dir, config_path, wait_for)
    }

    /// The binary on `config`, with its pid file and upgrade socket in `dir`
    /// and its log in `log`.
    fn launch(dir: &Path, config: &Path, log: &Path) -> Child {
        Command::new(binary())
            .arg("-c")
            .arg(config)
            .arg("--pid-file")
            .arg(dir.join("edge.pid"))
            .arg("--upgrade-socket")
            .arg(dir.join("upgrade.sock"))
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    pub fn spawn(dir: tempfile::TempDir, config: PathBuf, wait_for: &[SocketAddr]) -> EdgeProcess {
        let log = dir.path().join("edge.log");
        let child = Self::launch(dir.path(), &config, &log);
        let mut edge = EdgeProcess { child, retired: Vec::new(), dir, config, log };
        for addr in wait_for {
            edge.wait_listening(*addr);
        }
        edge
    }

    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("matrix-edge exited early ({status}): {}", self.log_text());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("matrix-edge did not listen on {addr}: {}", self.log_text());
    }

    /// The log once it contains `needle` (the access line of a request is
    /// written after its answer is sent), or as it is after `within`.
    pub fn log_with(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.log_text();
            if text.contains(needle) || Instant::now() >= deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Where `matrix-edge workers --control-socket` reaches this edge.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `QUIT`, `TERM`) to a process.
    pub fn signal(pid: u32, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Starts a second process with `--upgrade` on the same config, then asks
    /// this one (SIGQUIT) to hand over its listening sockets and drain.
    pub fn upgrade(&mut self) {
        let log = self.dir.path().join("edge-upgraded.log");
        let new = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .arg("--upgrade")
            .arg("--pid-file")
            .arg(self.dir.path().join("edge.pid"))
            .arg("--upgrade-socket")
            .arg(self.dir.path().join("upgrade.sock"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Give the new process time to wait on the upgrade socket.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Self::signal(self.child.id(), "QUIT");
        let mut old = std::mem::replace(&mut self.child, new);
        self.retired.push(old.id());
        std::thread::spawn(move || {
            let _ = old.wait();
        });
        self.log = log;
    }
}

impl EdgeProcess {
    /// Stops the process (SIGKILL, as a crash would) and starts it again on
    /// the same directory and config; the new log replaces the old one.
    pub fn restart(&mut self, wait_for: &[SocketAddr]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.dir.path().join(format!("edge-restarted-{}.log", self.child.id()));
        self.child = Self::launch(self.dir.path(), &self.config, &log);
        self.log = log;
        for addr in wait_for {
            self.wait_listening(*addr);
        }
    }
}

/// A helper process (a CA, a DNS server, a load balancer) killed on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process's resident memory, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {addr}");
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `matrix-edge workers ARGS` against `edge`'s control socket: exit code, stdout, stderr.
pub fn workers_cli(edge: &EdgeProcess, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary())
        .arg("workers")
        .arg("--control-socket")
        .arg(edge.control_socket())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A Redis on `port` keeping its data in `dir` across a restart (append-only file).
pub fn start_redis(dir: &Path, port: u16) -> ChildGuard {
    let redis = ChildGuard(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-deps installs it)"),
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap(), "redis");
    redis
}

/// Debian's HAProxy in TCP mode on `front`, balancing connections round
/// robin over `backs` (TLS passes through), as in front of several edges.
pub fn haproxy_round_robin(dir: &Path, front: SocketAddr, backs: &[SocketAddr]) -> ChildGuard {
    assert!(Path::new("/usr/sbin/haproxy").exists(), "haproxy is missing: scripts/install-deps installs it");
    let mut config = format!(
        "global\n  maxconn 500\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 90s\n  timeout server 90s\nfrontend in\n  bind {front}\n  default_backend edges\nbackend edges\n  balance roundrobin\n"
    );
    for (index, back) in backs.iter().enumerate() {
        config.push_str(&format!("  server edge{index} {back}\n"));
    }
    let file = dir.join("haproxy-edges.cfg");
    std::fs::write(&file, config).unwrap();
    let child = Command::new("/usr/sbin/haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy-edges.log")).unwrap())
        .spawn()
        .unwrap();
    let helper = ChildGuard(child);
    wait_listening(front, "haproxy");
    helper
}

/// The DOM of `url` as headless Chromium renders it (Debian's `chromium`),
/// and its stderr.
pub fn chromium_dump(url: &str) -> (String, String) {
    let work = tempfile::tempdir().unwrap();
    let output = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        .args(["--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", work.path().join("profile").display()))
        .arg("--timeout=30000")
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}
