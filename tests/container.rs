//! The OCI image (scripts/build-image) under Debian's podman, in front of a
//! real Synapse on loopback: non-root, read-only root, config and
//! certificates mounted read-only, host network; probes, SIGHUP reload,
//! a clean `podman stop`, ports below 1024 with and without
//! NET_BIND_SERVICE, and contrib/kubernetes/matrix-edge.yaml under
//! `podman kube play`.
//!
//! podman runs with its own store in a temporary folder, runc, cgroupfs and
//! vfs, and a containers.conf without default ulimits: this machine's
//! hybrid cgroups refuse crun, and podman's default limits exceed the hard
//! ones here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{get, h1_tls};
use support::free_port;
use support::synapse::Synapse;

const HOST: &str = "matrix.container.test";
const TAG: &str = concat!("localhost/matrix-edge:", env!("CARGO_PKG_VERSION"));

struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("containers.conf"), "[containers]\ndefault_ulimits = []\n").unwrap();
        Podman { dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .args(args);
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            output.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn logs(&self, name: &str) -> String {
        let output = self.output(&["logs", name]);
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command(&["rm", "--all", "--force", "--time", "0"]).output();
        let _ = self.command(&["pod", "rm", "--all", "--force"]).output();
    }
}

/// `/readyz` on the metrics listener, as the kubelet asks it.
fn readyz(metrics: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&metrics, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

fn wait_ready(metrics: SocketAddr, podman: &Podman, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if readyz(metrics).is_some_and(|answer| answer.starts_with("HTTP/1.1 200")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{name} never became ready on {metrics}:\n{}", podman.logs(name));
}

fn edge_config(tls: SocketAddr, metrics: SocketAddr, synapse: SocketAddr, m_server: &str) -> String {
    format!(
        r#"server_name: container.test
listeners:
  - {{ address: "{tls}", tls: true, serves: [well_known, client, federation] }}
tls:
  certificates: [{{ cert: /etc/matrix-edge/certs/{HOST}/fullchain.pem, key: /etc/matrix-edge/certs/{HOST}/privkey.pem }}]
well_known:
  server: "{m_server}"
synapse:
  main: "{synapse}"
metrics: {{ address: "{metrics}" }}
"#
    )
}

/// Readable by the image's user (991): the files a config map would hold.
fn open_up(path: &Path) {
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            open_up(&entry.unwrap().path());
        }
    }
}

/// The well-known and Synapse's `/versions` through the edge at `tls`.
fn assert_serves(tls: SocketAddr, pki: &TestPki, m_server: &str) {
    let (well_known, _) = h1_tls(tls, HOST, &pki.root_pem, &get("/.well-known/matrix/server", HOST));
    assert_eq!(well_known.status, 200);
    assert_eq!(well_known.json()["m.server"], m_server);
    let (versions, _) = h1_tls(tls, HOST, &pki.root_pem, &get("/_matrix/client/versions", HOST));
    assert_eq!(versions.status, 200, "{}", String::from_utf8_lossy(&versions.body));
    assert!(versions.json()["versions"].is_array(), "not Synapse's answer: {:?}", versions.json());
}

/// The real user ID of a container's process, as the host's kernel sees it.
fn uid_of(podman: &Podman, name: &str) -> String {
    let pid = podman.run(&["inspect", "--format", "{{.State.Pid}}", name]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    uid.split_whitespace().nth(1).unwrap().to_string()
}

/// A port below 1024 that nothing listens on here.
fn free_low_port() -> u16 {
    (600..1000).find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()).expect("no free port below 1024")
}

#[test]
#[ignore = "needs root, podman, buildah and runc (scripts/test installs them)"]
fn the_image_runs_non_root_read_only_in_front_of_synapse_and_the_kubernetes_example_serves() {
    let work = tempfile::tempdir().unwrap();
    open_up(work.path());
    let podman = Podman::new();

    // The image, built once from the binary this test run built.
    let archive = work.path().join("matrix-edge.tar");
    let built = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image"))
        .args(["--binary", support::binary(), "--output"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(built.status.success(), "build-image: {}", String::from_utf8_lossy(&built.stderr));
    podman.run(&["load", "--quiet", "--input", archive.to_str().unwrap()]);
    let labels = podman.run(&["image", "inspect", "--format", "{{json .Labels}}", TAG]);
    for label in
        ["org.opencontainers.image.version", "org.opencontainers.image.source", "org.opencontainers.image.licenses"]
    {
        assert!(labels.contains(label), "no {label} in {labels}");
    }
    assert_eq!(podman.run(&["image", "inspect", "--format", "{{.Config.User}}", TAG]), "991:991");

    let synapse_port = free_port();
    let synapse_addr = SocketAddr::from(([127, 0, 0, 1], synapse_port));
    let _synapse =
        Synapse::start(&work.path().join("synapse"), synapse_port, "container.test", &format!("https://{HOST}/"));
    let pki = TestPki::new(&[&[HOST]]);
    let conf = work.path().join("conf");
    pki.copy_into(&conf.join("certs"));
    let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(conf.join("config.yaml"), edge_config(tls, metrics, synapse_addr, "before.test:443")).unwrap();
    open_up(&conf);
    let volume = format!("{}:/etc/matrix-edge:ro", conf.display());

    // Non-root, read-only root, config and certificates read-only, host network.
    podman.run(&["run", "--detach", "--name", "edge", "--network", "host", "--read-only", "--volume", &volume, TAG]);
    wait_ready(metrics, &podman, "edge");
    let probe = podman.output(&["exec", "edge", "/usr/bin/matrix-edge", "probe"]);
    assert!(probe.status.success(), "probe: {}", String::from_utf8_lossy(&probe.stderr));
    assert_eq!(uid_of(&podman, "edge"), "991");
    assert_eq!(podman.run(&["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", "edge"]), "true");
    assert_serves(tls, &pki, "before.test:443");

    // SIGHUP through podman reloads the mounted config.
    std::fs::write(conf.join("config.yaml"), edge_config(tls, metrics, synapse_addr, "after.test:443")).unwrap();
    podman.run(&["kill", "--signal", "HUP", "edge"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (answer, _) = h1_tls(tls, HOST, &pki.root_pem, &get("/.well-known/matrix/server", HOST));
        if answer.json()["m.server"] == "after.test:443" {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{}", podman.logs("edge"));
        std::thread::sleep(Duration::from_millis(200));
    }

    // `podman stop` (SIGTERM, SIGKILL after 10 s): the edge stops as soon as
    // nothing is in flight, with exit status 0.
    let started = Instant::now();
    podman.run(&["stop", "edge"]);
    let stopped_in = started.elapsed();
    assert!(stopped_in < Duration::from_secs(5), "podman stop took {stopped_in:?}");
    assert_eq!(podman.run(&["inspect", "--format", "{{.State.ExitCode}}", "edge"]), "0", "{}", podman.logs("edge"));
    eprintln!("podman stop: {stopped_in:?}");

    // A port below 1024: refused without NET_BIND_SERVICE, with a clear
    // error and a non-zero exit; served with it.
    let low = SocketAddr::from(([127, 0, 0, 1], free_low_port()));
    std::fs::write(conf.join("low.yaml"), edge_config(low, metrics, synapse_addr, "low.test:443")).unwrap();
    open_up(&conf);
    let config = ["-c", "/etc/matrix-edge/low.yaml"];
    let refused = podman.output(
        &[&["run", "--name", "low", "--network", "host", "--read-only", "-v", &volume, TAG], &config[..]].concat(),
    );
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains(&format!("cannot listen on {low}")) && said.contains("CAP_NET_BIND_SERVICE"), "{said}");
    podman.run(&["rm", "low"]);
    let args = [
        "run",
        "--detach",
        "--name",
        "low",
        "--cap-add",
        "NET_BIND_SERVICE",
        "--network",
        "host",
        "--read-only",
        "-v",
        &volume,
        TAG,
    ];
    podman.run(&[&args[..], &config[..]].concat());
    wait_ready(metrics, &podman, "low");
    assert_serves(low, &pki, "low.test:443");
    podman.run(&["stop", "low"]);

    // The Kubernetes example, with free loopback ports and this Synapse.
    kube_play(&podman, work.path(), &pki, synapse_addr);
}

/// The container's port list in the example.
const PORTS: &str = "          ports:\n            - { name: https, containerPort: 8443 }\n            - { name: metrics, containerPort: 9090 }\n";

fn kube_play(podman: &Podman, work: &Path, pki: &TestPki, synapse: SocketAddr) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/kubernetes/matrix-edge.yaml");
    let text = std::fs::read_to_string(&example).unwrap();
    let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let leaf = &pki.leaves[0];
    let base64 = |pem: &str| openssl::base64::encode_block(pem.as_bytes());
    let redis_port = free_port();
    let _redis = support::start_redis(work, redis_port);
    let manifest = text
        .replace("redis://redis:6379/0", &format!("redis://127.0.0.1:{redis_port}/0"))
        .replace("\"[::]:8443\"", &format!("\"{tls}\""))
        .replace("\"0.0.0.0:9090\"", &format!("\"{metrics}\""))
        .replace("\"synapse:8008\"", &format!("\"{synapse}\""))
        .replace("localhost/matrix-edge:0.1.0", TAG)
        // One pod on the host's network: replicas would share its ports,
        // and podman refuses port mappings there.
        .replace("replicas: 2", "replicas: 1")
        .replace(PORTS, "")
        .replace("tls.crt: \"\"", &format!("tls.crt: {}", base64(&leaf.fullchain_pem)))
        .replace("tls.key: \"\"", &format!("tls.key: {}", base64(&leaf.key_pem)));
    assert!(text.contains(PORTS), "the example's port list changed; update PORTS");
    assert!(manifest.contains(&format!("127.0.0.1:{redis_port}")), "the example no longer has the cluster's Redis");
    for (what, changed) in [("listener", &tls), ("metrics", &metrics), ("synapse", &synapse)] {
        assert!(manifest.contains(&changed.to_string()), "the example no longer has the {what} address the test swaps");
    }
    let path: PathBuf = work.join("kube.yaml");
    std::fs::write(&path, &manifest).unwrap();
    // podman 4.3 writes a Secret's data into its volume still base64-encoded
    // (a podman bug): the pod is created stopped, the volume given the files
    // as Kubernetes mounts them, then the pod started.
    podman.run(&["kube", "play", "--start=false", "--network", "host", path.to_str().unwrap()]);
    let mountpoint =
        PathBuf::from(podman.run(&["volume", "inspect", "--format", "{{.Mountpoint}}", "matrix-edge-tls"]));
    std::fs::write(mountpoint.join("tls.crt"), &leaf.fullchain_pem).unwrap();
    std::fs::write(mountpoint.join("tls.key"), &leaf.key_pem).unwrap();
    open_up(&mountpoint);
    podman.run(&["pod", "start", "matrix-edge-pod-0"]);
    wait_ready(metrics, podman, "matrix-edge-pod-0-edge");
    assert_serves(tls, pki, "matrix.example.org:443");
    // The replica joined the cluster through the example's Redis setting.
    let deadline = Instant::now() + Duration::from_secs(15);
    while support::client::metric(metrics, "matrix_edge_cluster_redis_up ") != Some(1.0) {
        assert!(Instant::now() < deadline, "the pod's edge never reached the cluster's Redis");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(uid_of(podman, "matrix-edge-pod-0-edge"), "991", "runAsUser");
    podman.run(&["kube", "down", path.to_str().unwrap()]);
}
