//! The Debian package, installed for real with dpkg on this machine: files,
//! owners and modes, the system user, the conffile, the unit verified by
//! systemd-analyze, `matrix-edge check` on the installed config, an upgrade
//! that keeps an edited config, then remove and purge leaving nothing.
//!
//! Root only, and it refuses to run where a matrix-edge package is already
//! installed (it would take it away).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::certs::TestPki;

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "matrix-edge"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

/// `owner:group mode` as stat prints them.
fn ownership(path: &str) -> String {
    String::from_utf8(run("stat", &["-c", "%U:%G %a", path]).stdout).unwrap().trim().to_string()
}

/// Purges the package even when an assertion fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "matrix-edge"]).output();
    }
}

/// What a purge must leave no trace of.
const TRACES: [&str; 8] = [
    "/usr/bin/matrix-edge",
    "/etc/matrix-edge",
    "/var/lib/matrix-edge",
    "/lib/systemd/system/matrix-edge.service",
    "/usr/share/matrix-edge",
    "/usr/share/doc/matrix-edge",
    "/etc/systemd/system/multi-user.target.wants/matrix-edge.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/matrix-edge.service.dsh-also",
];

fn build_package(dir: &Path) -> PathBuf {
    // The debug binary the test run already built: a release build would
    // add minutes and test the same packaging (scripts/build-deb builds release).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["deb", "--profile", "dev", "--no-build", "--output"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo deb failed: {}", String::from_utf8_lossy(&output.stderr));
    let deb =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "deb"));
    deb.expect("cargo deb wrote no .deb")
}

#[test]
#[ignore = "installs a package with dpkg (root, cargo-deb): run scripts/test"]
fn the_package_installs_upgrades_removes_and_purges_cleanly() {
    assert_eq!(String::from_utf8(run("id", &["-u"]).stdout).unwrap().trim(), "0", "dpkg -i needs root");
    assert!(!installed(), "a matrix-edge package is installed here; this test installs and purges its own");
    for trace in TRACES {
        assert!(!Path::new(trace).exists(), "{trace} exists before the test");
    }
    let work = tempfile::tempdir().unwrap();
    let deb = build_package(work.path());
    let deb = deb.to_str().unwrap();
    let _purge = Purge;
    run("dpkg", &["-i", deb]);
    assert!(installed());

    // Files, owners and modes.
    for (path, expected) in [
        ("/usr/bin/matrix-edge", "root:root 755"),
        ("/etc/matrix-edge", "root:matrix-edge 750"),
        ("/etc/matrix-edge/config.yaml", "root:matrix-edge 640"),
        ("/lib/systemd/system/matrix-edge.service", "root:root 644"),
        ("/var/lib/matrix-edge", "matrix-edge:matrix-edge 750"),
        ("/usr/share/matrix-edge/grafana/matrix-edge.json", "root:root 644"),
        ("/usr/share/matrix-edge/prometheus/matrix-edge.rules.yml", "root:root 644"),
        ("/usr/share/doc/matrix-edge/examples/full-stack.yaml", "root:root 644"),
    ] {
        assert_eq!(ownership(path), expected, "{path}");
    }
    let user = String::from_utf8(run("getent", &["passwd", "matrix-edge"]).stdout).unwrap();
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert!(fields[2].parse::<u32>().unwrap() < 1000, "not a system user: {user}");
    assert_eq!(fields[5], "/var/lib/matrix-edge");
    assert!(fields[6].ends_with("nologin") || fields[6].ends_with("false"), "{user}");
    let conffiles = String::from_utf8(run("dpkg-query", &["-W", "-f=${Conffiles}", "matrix-edge"]).stdout).unwrap();
    assert!(conffiles.contains("/etc/matrix-edge/config.yaml"), "{conffiles}");
    assert!(Path::new("/etc/systemd/system/multi-user.target.wants/matrix-edge.service").exists(), "not enabled");

    // The installed unit, as systemd reads it.
    let verify =
        Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/matrix-edge.service"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{stderr}");
    assert!(!stderr.lines().any(|l| l.contains("matrix-edge")), "systemd-analyze warned: {stderr}");

    // The installed config passes `check` once certificates are where it says
    // (here: test certificates, the config otherwise as installed).
    let pki = TestPki::new(&[&["example.com"], &["matrix.example.com"]]);
    let certs = work.path().join("letsencrypt-live");
    pki.copy_into(&certs);
    let installed_config = std::fs::read_to_string("/etc/matrix-edge/config.yaml").unwrap();
    let config = work.path().join("config.yaml");
    std::fs::write(&config, installed_config.replace("/etc/letsencrypt/live/", &format!("{}/", certs.display())))
        .unwrap();
    let check = run("/usr/bin/matrix-edge", &["check", "-c", config.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok: server_name example.com"));

    // An upgrade (the same package again) keeps the admin's edits and the user.
    let edited = format!("{installed_config}# edited by the admin\n");
    std::fs::write("/etc/matrix-edge/config.yaml", &edited).unwrap();
    run("dpkg", &["-i", "--force-confold", deb]);
    assert_eq!(std::fs::read_to_string("/etc/matrix-edge/config.yaml").unwrap(), edited);
    assert_eq!(ownership("/etc/matrix-edge/config.yaml"), "root:matrix-edge 640");

    // Remove keeps the configuration; purge takes everything.
    run("dpkg", &["--remove", "matrix-edge"]);
    assert!(!Path::new("/usr/bin/matrix-edge").exists());
    assert!(Path::new("/etc/matrix-edge/config.yaml").exists(), "remove must keep the conffile");
    run("dpkg", &["--purge", "matrix-edge"]);
    assert!(!installed());
    for trace in TRACES {
        assert!(!Path::new(trace).exists(), "{trace} is left after purge");
    }
    assert!(!Command::new("getent").args(["passwd", "matrix-edge"]).status().unwrap().success(), "user left");
    assert!(!Command::new("getent").args(["group", "matrix-edge"]).status().unwrap().success(), "group left");
}
