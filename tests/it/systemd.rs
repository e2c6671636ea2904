//! The systemd unit and `matrix-edge reload`, which `systemctl reload` runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::client;
use support::upstream::RecordingUpstream;
use support::{binary, free_port};

#[test]
fn the_unit_file_verifies_without_warnings() {
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/matrix-edge.service")).unwrap();
    for directive in [
        "Type=notify",
        "ExecReload=/usr/bin/matrix-edge reload",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ExecStartPre=/usr/bin/matrix-edge check",
    ] {
        assert!(unit.contains(directive), "the unit lacks {directive}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("matrix-edge.service");
    std::fs::write(&path, unit.replace("/usr/bin/matrix-edge", binary())).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let own: Vec<&str> = stderr.lines().filter(|l| l.contains("matrix-edge")).collect();
    assert!(own.is_empty(), "systemd-analyze warned: {own:?}");
}

fn m_server(addr: SocketAddr) -> String {
    let (response, _) = client::h1_plain(addr, &client::get("/.well-known/matrix/server", "example.com"));
    response.json()["m.server"].as_str().unwrap_or_default().to_string()
}

fn config(listen: SocketAddr, main: SocketAddr, m_server: &str) -> String {
    format!(
        "server_name: example.com\nlisteners: [{{ address: \"{listen}\", serves: [well_known, client, federation] }}]\nwell_known: {{ server: \"{m_server}\" }}\nsynapse: {{ main: \"{main}\" }}\nprocess: {{ shutdown_drain: 2s }}\n"
    )
}

fn reload(exe: &Path, dir: &Path) -> String {
    let output = Command::new(exe)
        .arg("reload")
        .arg("-c")
        .arg(dir.join("config.yaml"))
        .arg("--pid-file")
        .arg(dir.join("edge.pid"))
        .arg("--upgrade-socket")
        .arg(dir.join("upgrade.sock"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "reload failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn pid(dir: &Path) -> i32 {
    std::fs::read_to_string(dir.join("edge.pid")).unwrap_or_default().trim().parse().unwrap_or(0)
}

#[test]
fn reload_sends_sighup_and_upgrades_when_the_binary_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("matrix-edge");
    std::fs::copy(binary(), &exe).unwrap();
    let upstream = RecordingUpstream::start();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(dir.path().join("config.yaml"), config(listen, upstream.addr, "one.example.com:443")).unwrap();
    let mut first = KillOnDrop(
        Command::new(&exe)
            .arg("-c")
            .arg(dir.path().join("config.yaml"))
            .arg("--pid-file")
            .arg(dir.path().join("edge.pid"))
            .arg("--upgrade-socket")
            .arg(dir.path().join("upgrade.sock"))
            .stderr(std::fs::File::create(dir.path().join("edge.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(listen).is_err() || pid(dir.path()) != first.0.id() as i32 {
        if Instant::now() > deadline {
            let _ = first.0.kill();
            panic!("the edge did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(m_server(listen), "one.example.com:443");

    // Same binary: a reload is a SIGHUP.
    std::fs::write(dir.path().join("config.yaml"), config(listen, upstream.addr, "two.example.com:443")).unwrap();
    let said = reload(&exe, dir.path());
    assert!(said.contains("sent SIGHUP"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m_server(listen) != "two.example.com:443" {
        assert!(Instant::now() < deadline, "the reload did not apply");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pid(dir.path()), first.0.id() as i32);

    // A package upgrade replaces the file: the reload hands over to it.
    let staged = dir.path().join("matrix-edge.new");
    std::fs::copy(binary(), &staged).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    let said = reload(&exe, dir.path());
    assert!(said.contains("upgraded"), "{said}");
    let new_pid = pid(dir.path());
    assert_ne!(new_pid, first.0.id() as i32);
    for _ in 0..20 {
        assert_eq!(m_server(listen), "two.example.com:443");
    }
    // The old process drains and exits on its own after the handover.
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old process did not exit after handing over");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::path::Path::new(&format!("/proc/{new_pid}")).exists());
    let _ = Command::new("kill").arg(new_pid.to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{new_pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill").args(["-KILL", &new_pid.to_string()]).status();
}

/// Stops the process even when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
