//! A real single-process Synapse from the test virtualenv.

use super::matrix::synapse_python;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Synapse {
    pub child: Child,
    pub dir: PathBuf,
}

impl Synapse {
    /// Writes a single-process config (SQLite, registration open) and
    /// starts Synapse on 127.0.0.1:`port`, returning once `/health` answers.
    pub fn start(dir: &Path, port: u16, server_name: &str, public_baseurl: &str) -> Synapse {
        Self::start_with(dir, port, server_name, public_baseurl, &[])
    }

    /// As `start`, with more arguments for `synapse_dev.py config` (`--mas URL --mas-secret S`).
    pub fn start_with(dir: &Path, port: u16, server_name: &str, public_baseurl: &str, extra: &[&str]) -> Synapse {
        Self::start_with_yaml(dir, port, server_name, public_baseurl, extra, "")
    }

    /// As `start_with`, with `yaml` appended to the config `synapse_dev.py` wrote.
    pub fn start_with_yaml(
        dir: &Path,
        port: u16,
        server_name: &str,
        public_baseurl: &str,
        extra: &[&str],
        yaml: &str,
    ) -> Synapse {
        let python = synapse_python();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/synapse_dev.py");
        let status = Command::new("python3")
            .arg(&script)
            .arg("config")
            .arg(dir)
            .args(["--port", &port.to_string(), "--server-name", server_name, "--public-baseurl", public_baseurl])
            .args(extra)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let config = dir.join("homeserver.yaml");
        if !yaml.is_empty() {
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(yaml);
            std::fs::write(&config, text).unwrap();
        }
        let status = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--generate-keys", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "synapse --generate-keys failed");
        Self::restart(dir, port)
    }

    /// Starts Synapse from the config `start` wrote: also how a service
    /// manager brings it back after a crash.
    pub fn restart(dir: &Path, port: u16) -> Synapse {
        let child = Command::new(synapse_python())
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(dir.join("homeserver.yaml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let mut synapse = Synapse { child, dir: dir.to_path_buf() };
        synapse.wait_healthy(port);
        synapse
    }

    fn wait_healthy(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Synapse exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
                );
            }
            let (response, _) = match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(_) => super::client::h1_plain(
                    format!("127.0.0.1:{port}").parse().unwrap(),
                    b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                ),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            if response.status == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("Synapse did not become healthy on port {port}");
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
