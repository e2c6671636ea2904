use clap::{Parser, Subcommand};
use matrix_edge::edge::Edge;
use matrix_edge::server::{self, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc for every allocation of the process, OpenSSL's included: glibc
/// kept the heap of a 2,000-connection TLS burst (18 -> 130 MiB) until a
/// periodic `malloc_trim` walked its arenas; jemalloc's background thread
/// returns freed pages on its own, and it costs less CPU per request
/// (measured in bench/RESULTS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc at start: a background thread purges freed pages after
/// a second (the default is ten, in the allocating threads themselves).
/// The one exported symbol of the binary: jemalloc looks it up by name.
#[allow(unsafe_code)]
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Where the pid file and upgrade socket live: systemd's RuntimeDirectory
/// when it exists, else the temporary directory.
fn runtime_path(name: &str) -> String {
    let run = std::path::Path::new("/run/matrix-edge");
    let dir = if run.is_dir() { run.to_path_buf() } else { std::env::temp_dir() };
    dir.join(name).display().to_string()
}

/// The front door of a Matrix homeserver: TLS, .well-known and Synapse routing.
#[derive(Parser)]
#[command(name = "matrix-edge", version)]
struct Cli {
    /// The YAML configuration file.
    #[arg(short = 'c', long = "config", global = true, default_value = "/etc/matrix-edge/config.yaml")]
    config: PathBuf,
    /// Take over the listening sockets of the running instance (zero-downtime upgrade).
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Where to write the process ID.
    #[arg(long, global = true)]
    pid_file: Option<String>,
    /// The Unix socket used to hand listening sockets to a new instance.
    #[arg(long, global = true)]
    upgrade_socket: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, like `nginx -t`: exit 0 with a summary, or 1 with the error.
    Check {
        /// Also cross-check against Synapse's homeserver.yaml.
        #[arg(long)]
        synapse: Option<PathBuf>,
        /// With --synapse: the directory of the workers' config files.
        #[arg(long, requires = "synapse")]
        workers: Option<PathBuf>,
    },
    /// Print the effective routing table: pattern, methods, serving group, sticky key.
    Routes,
    /// What `systemctl reload` runs: SIGHUP the running instance, or, when the
    /// binary on disk was replaced, upgrade to it without dropping connections.
    Reload {
        /// Upgrade even when the binary did not change.
        #[arg(long)]
        upgrade: bool,
    },
    /// Check the deployment from outside, as another homeserver and a client
    /// see it; each failure with its fix, exit 1 on any failure.
    Doctor {
        /// The server name to check (default: the config's `server_name`).
        #[arg(long)]
        server_name: Option<String>,
        /// curl's HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT (repeatable): test before DNS points here.
        #[arg(long = "connect-to")]
        connect_to: Vec<String>,
        /// A CA certificate (PEM) to trust besides the system's.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Synapse's signing key: also send a signed federation request through the edge.
        #[arg(long)]
        signing_key: Option<PathBuf>,
        /// DNS server (IP:port) for SRV lookups.
        #[arg(long)]
        dns: Option<std::net::SocketAddr>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a commented config from Synapse's own (to stdout).
    Init {
        /// Synapse's homeserver.yaml.
        #[arg(long = "from-synapse")]
        from_synapse: PathBuf,
        /// The directory of the workers' config files.
        #[arg(long)]
        workers: Option<PathBuf>,
        /// The public listener (default [::]:443).
        #[arg(long)]
        listen: Option<String>,
        /// Certificate chain file; without --cert/--key the config orders certificates by ACME.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Renew ACME certificates now (all, or the names given): marks them in
    /// the state directory and signals the running instance.
    Renew { names: Vec<String> },
    /// Ask the running edge's metrics listener whether it is ready (or alive):
    /// exit 0 on yes. For container health checks; needs `metrics` in the config.
    Probe {
        #[arg(value_enum, default_value = "ready")]
        probe: matrix_edge::cli::probe::Probe,
        /// The metrics listener (default: the config's `metrics.address`).
        #[arg(long)]
        address: Option<std::net::SocketAddr>,
    },
    /// Explain where one request would go and why, e.g. `route GET '/_matrix/client/v3/sync?since=x'`.
    Route {
        method: String,
        target: String,
        /// A request header, `Name: value` (repeatable), e.g. `-H 'Authorization: Bearer syt_...'`.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
}

fn init_logging(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.format_timestamp_millis().target(env_logger::Target::Stderr).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Reload { upgrade }) = cli.command {
        let pid_file = cli.pid_file.clone().unwrap_or_else(|| runtime_path("matrix-edge.pid"));
        let socket = cli.upgrade_socket.clone().unwrap_or_else(|| runtime_path("matrix-edge-upgrade.sock"));
        // Refuse to touch the running instance with a config it would reject.
        if let Err(error) = Edge::load(&cli.config) {
            eprintln!("matrix-edge: not reloading: {error}");
            return ExitCode::FAILURE;
        }
        return report(matrix_edge::cli::reload_command::reload(
            &cli.config,
            pid_file.as_ref(),
            socket.as_ref(),
            upgrade,
        ));
    }
    if let Some(Command::Init { from_synapse, workers, listen, cert, key }) = &cli.command {
        let options = matrix_edge::cli::init::InitOptions {
            homeserver: from_synapse.clone(),
            workers: workers.clone(),
            listen: listen.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        return match matrix_edge::cli::init::init(&options) {
            Ok((config, warnings)) => {
                print!("{config}");
                for warning in warnings {
                    eprintln!("matrix-edge: warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("matrix-edge: {error}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Probe { probe, address }) = &cli.command {
        let address = match address {
            Some(address) => Ok(*address),
            None => matrix_edge::cli::probe::address_from_config(&cli.config),
        };
        return report(address.and_then(|address| matrix_edge::cli::probe::run(address, *probe)));
    }
    if let Some(Command::Doctor { server_name, connect_to, ca, signing_key, dns, json }) = &cli.command {
        return doctor(&cli.config, server_name.clone(), connect_to, ca.clone(), signing_key.clone(), *dns, *json);
    }
    let edge = match Edge::load(&cli.config) {
        Ok(edge) => edge,
        Err(error) => {
            eprintln!("matrix-edge: {error}");
            return ExitCode::FAILURE;
        }
    };
    for warning in &edge.warnings {
        eprintln!("matrix-edge: warning: {warning}");
    }
    match cli.command {
        Some(Command::Check { synapse, workers }) => {
            if let Some(homeserver) = synapse {
                let checked = matrix_edge::cli::synapse_check::cross_check(&edge, &homeserver, workers.as_deref());
                let checked = match checked {
                    Ok(checked) => checked,
                    Err(error) => {
                        eprintln!("matrix-edge: {error}");
                        return ExitCode::FAILURE;
                    }
                };
                for warning in &checked.warnings {
                    eprintln!("matrix-edge: warning: {warning}");
                }
                if !checked.problems.is_empty() {
                    for problem in &checked.problems {
                        eprintln!(
                            "matrix-edge: {} disagrees with {}: {problem}",
                            cli.config.display(),
                            homeserver.display()
                        );
                    }
                    return ExitCode::FAILURE;
                }
            }
            println!("matrix-edge: {} ok: {}", cli.config.display(), edge.summary());
            return ExitCode::SUCCESS;
        }
        Some(Command::Routes) => {
            print!("{}", matrix_edge::cli::explain::routes_table(&edge));
            return ExitCode::SUCCESS;
        }
        Some(Command::Reload { .. })
        | Some(Command::Doctor { .. })
        | Some(Command::Init { .. })
        | Some(Command::Probe { .. }) => return ExitCode::FAILURE,
        Some(Command::Renew { names }) => {
            let pid_file = cli.pid_file.clone().unwrap_or_else(|| runtime_path("matrix-edge.pid"));
            return report(matrix_edge::cli::renew::request(&edge, &names, pid_file.as_ref()));
        }
        Some(Command::Route { method, target, headers }) => {
            let mut parsed = Vec::with_capacity(headers.len());
            for header in &headers {
                let Some((name, value)) = header.split_once(':') else {
                    eprintln!("matrix-edge: header {header:?} is not `Name: value`");
                    return ExitCode::FAILURE;
                };
                parsed.push((name.trim().to_string(), value.trim().to_string()));
            }
            print!("{}", matrix_edge::cli::explain::explain(&edge, &method.to_ascii_uppercase(), &target, &parsed));
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    init_logging(edge.config.process.log_level.as_filter());
    let options = RunOptions {
        upgrade: cli.upgrade,
        pid_file: Some(cli.pid_file.unwrap_or_else(|| runtime_path("matrix-edge.pid"))),
        upgrade_socket: Some(cli.upgrade_socket.unwrap_or_else(|| runtime_path("matrix-edge-upgrade.sock"))),
    };
    match server::build(edge, &cli.config, &options) {
        Ok(server) => {
            log::info!("matrix-edge {} starting", env!("CARGO_PKG_VERSION"));
            server.run_forever()
        }
        Err(error) => {
            eprintln!("matrix-edge: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The server name comes from `--server-name` or, failing that, the config
/// (a config is not needed otherwise: the doctor looks from outside).
fn doctor(
    config: &std::path::Path,
    server_name: Option<String>,
    connect_to: &[String],
    ca: Option<PathBuf>,
    signing_key: Option<PathBuf>,
    dns: Option<std::net::SocketAddr>,
    json: bool,
) -> ExitCode {
    use matrix_edge::cli::doctor;
    let server_name = match server_name {
        Some(name) => name,
        None => match Edge::load(config) {
            Ok(edge) => edge.server_name.clone(),
            Err(error) => {
                eprintln!("matrix-edge: give --server-name, or a config that loads: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut rules = Vec::with_capacity(connect_to.len());
    for rule in connect_to {
        match rule.parse::<doctor::fetch::ConnectTo>() {
            Ok(rule) => rules.push(rule),
            Err(error) => {
                eprintln!("matrix-edge: --connect-to {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    let options = doctor::Options { server_name: server_name.clone(), connect_to: rules, ca, signing_key, dns };
    let findings = doctor::run(&options);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings).unwrap_or_default());
    } else {
        print!("{}", doctor::render(&server_name, &findings));
    }
    if findings.iter().any(|f| f.verdict == doctor::Verdict::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A command's one-line outcome: on stdout with exit 0, or on stderr with 1.
fn report(outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(done) => {
            println!("matrix-edge: {done}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("matrix-edge: {error}");
            ExitCode::FAILURE
        }
    }
}
