//! `matrix-edge reload`: what `systemctl reload` runs.
//!
//! When the binary on disk is the one running, a reload is a SIGHUP (new
//! config and certificates, same process). When a package upgrade replaced
//! the binary, it is a zero-downtime upgrade instead: the new binary starts
//! with `--upgrade`, the running one (SIGQUIT) hands it the listening
//! sockets and drains, and the new one tells systemd it is the main process.

use crate::cli::{edge, CliError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn read_pid(pid_file: &Path) -> Result<i32, CliError> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| edge(format!("cannot read the pid file {}: {e}", pid_file.display())))?;
    text.trim().parse::<i32>().map_err(|_| edge(format!("{} does not hold a process ID", pid_file.display())))
}

/// Whether the running process executes a different file than this one
/// (the package manager replaced it since it started).
fn binary_changed(pid: i32) -> Result<bool, CliError> {
    let running = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map_err(|e| edge(format!("cannot inspect process {pid}: {e}")))?;
    let current = std::fs::metadata("/proc/self/exe").map_err(|e| edge(format!("cannot inspect this binary: {e}")))?;
    Ok((running.dev(), running.ino()) != (current.dev(), current.ino()))
}

pub fn reload(config: &Path, pid_file: &Path, upgrade_socket: &Path, force_upgrade: bool) -> Result<String, CliError> {
    let pid = read_pid(pid_file)?;
    let changed = binary_changed(pid).unwrap_or_else(|e| {
        eprintln!("matrix-edge: {e}; reloading in place");
        false
    });
    if !force_upgrade && !changed {
        kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| edge(format!("cannot signal process {pid}: {e}")))?;
        return Ok(format!("sent SIGHUP to {pid}: configuration and certificates reload"));
    }
    let exe = std::env::current_exe().map_err(|e| edge(format!("cannot find this binary: {e}")))?;
    let child = std::process::Command::new(exe)
        .arg("-c")
        .arg(config)
        .arg("--upgrade")
        .arg("--pid-file")
        .arg(pid_file)
        .arg("--upgrade-socket")
        .arg(upgrade_socket)
        .stdin(std::process::Stdio::null())
        // Logs go to stderr (the journal under systemd); holding stdout open
        // would keep whoever runs `reload` waiting for it.
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| edge(format!("cannot start the new binary: {e}")))?;
    let new_pid = child.id();
    // The new process listens on the upgrade socket; the old one retries
    // until it can connect, so the order here is safe.
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(pid), Signal::SIGQUIT).map_err(|e| edge(format!("cannot signal process {pid}: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if read_pid(pid_file).is_ok_and(|p| p == new_pid as i32) {
            return Ok(format!("upgraded: process {new_pid} took over the listening sockets from {pid}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(edge(format!(
        "the new process {new_pid} did not take over within 30s; {pid} keeps serving unless it already handed over"
    )))
}
