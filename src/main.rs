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
    /// The running edge's control socket (`workers` talks to it).
    #[arg(long, global = true)]
    control_socket: Option<PathBuf>,
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
    /// The running edge's workers and upstream members: list them, or drain
    /// one (no new requests; `--wait` until nothing is in flight), put it in
    /// maintenance, or make it ready again. Through the control socket.
    Workers {
        #[command(subcommand)]
        action: Option<WorkersAction>,
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

#[derive(Subcommand)]
enum WorkersAction {
    /// Every member with its state and requests in flight (the default).
    List,
    /// No new requests for ADDRESS (its sticky keys move to the others).
    Drain {
        address: String,
        /// Return once nothing is in flight on it, or fail after this long (e.g. 2m).
        #[arg(long, value_name = "LIMIT", num_args = 0..=1, default_missing_value = "10m")]
        wait: Option<String>,
    },
    /// As drain, and its health checks stop too (it is down on purpose).
    Maintenance {
        address: String,
        #[arg(long, value_name = "LIMIT", num_args = 0..=1, default_missing_value = "10m")]
        wait: Option<String>,
    },
    /// Back in rotation, ramping up over the pool's slow start.
    Ready { address: String },
}

fn init_logging(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.format_timestamp_millis().target(env_logger::Target::Stderr).init();
}

/// Why a command failed: printed as `matrix-edge: <error>` with exit 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Config(#[from] matrix_edge::config::ConfigError),
    #[error("{0}")]
    Command(#[from] matrix_edge::cli::CliError),
    #[error("{0}")]
    Failed(String),
}

impl From<String> for CliError {
    fn from(message: String) -> CliError {
        CliError::Failed(message)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let paths = RuntimePaths::of(&cli);
    let outcome = match cli.command {
        None => serve(&cli.config, cli.upgrade, paths),
        Some(Command::Check { synapse, workers }) => check(&cli.config, synapse.as_deref(), workers.as_deref()),
        Some(Command::Routes) => routes(&cli.config),
        Some(Command::Reload { upgrade }) => reload(&cli.config, &paths, upgrade),
        Some(Command::Doctor { server_name, connect_to, ca, signing_key, dns, json }) => {
            doctor(&cli.config, server_name, &connect_to, ca, signing_key, dns, json)
        }
        Some(Command::Init { from_synapse, workers, listen, cert, key }) => {
            init(matrix_edge::cli::init::InitOptions { homeserver: from_synapse, workers, listen, cert, key })
        }
        Some(Command::Renew { names }) => renew(&cli.config, &paths, &names),
        Some(Command::Probe { probe: which, address }) => probe(&cli.config, which, address),
        Some(Command::Route { method, target, headers }) => route(&cli.config, &method, &target, &headers),
        Some(Command::Workers { action }) => workers(&paths.control_socket, action.unwrap_or(WorkersAction::List)),
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("matrix-edge: {error}");
        ExitCode::FAILURE
    })
}

/// The pid file and upgrade socket: from the command line, else beside systemd's runtime directory.
struct RuntimePaths {
    pid_file: String,
    upgrade_socket: String,
    control_socket: PathBuf,
}

impl RuntimePaths {
    fn of(cli: &Cli) -> RuntimePaths {
        RuntimePaths {
            pid_file: cli.pid_file.clone().unwrap_or_else(|| runtime_path("matrix-edge.pid")),
            upgrade_socket: cli.upgrade_socket.clone().unwrap_or_else(|| runtime_path("matrix-edge-upgrade.sock")),
            control_socket: cli.control_socket.clone().unwrap_or_else(|| runtime_path("control.sock").into()),
        }
    }
}

/// Loads and checks the config, printing its warnings.
fn load(config: &std::path::Path) -> Result<Edge, CliError> {
    let edge = Edge::load(config)?;
    for warning in &edge.ops.warnings {
        eprintln!("matrix-edge: warning: {warning}");
    }
    Ok(edge)
}

fn serve(config: &std::path::Path, upgrade: bool, paths: RuntimePaths) -> Result<ExitCode, CliError> {
    let edge = load(config)?;
    init_logging(edge.ops.config.process.log_level.as_filter());
    let options = RunOptions {
        upgrade,
        pid_file: Some(paths.pid_file),
        upgrade_socket: Some(paths.upgrade_socket),
        control_socket: Some(paths.control_socket),
    };
    let server = server::build(edge, config, &options)?;
    log::info!("matrix-edge {} starting", env!("CARGO_PKG_VERSION"));
    server.run_forever()
}

fn check(
    config: &std::path::Path,
    synapse: Option<&std::path::Path>,
    workers: Option<&std::path::Path>,
) -> Result<ExitCode, CliError> {
    let edge = Edge::check_file(config)?;
    for warning in &edge.ops.warnings {
        eprintln!("matrix-edge: warning: {warning}");
    }
    if let Some(homeserver) = synapse {
        let checked = matrix_edge::cli::synapse_check::cross_check(&edge, homeserver, workers)?;
        for warning in &checked.warnings {
            eprintln!("matrix-edge: warning: {warning}");
        }
        if !checked.problems.is_empty() {
            for problem in &checked.problems {
                eprintln!("matrix-edge: {} disagrees with {}: {problem}", config.display(), homeserver.display());
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    println!("matrix-edge: {} ok: {}", config.display(), edge.summary());
    Ok(ExitCode::SUCCESS)
}

fn routes(config: &std::path::Path) -> Result<ExitCode, CliError> {
    print!("{}", matrix_edge::cli::explain::routes_table(&load(config)?));
    Ok(ExitCode::SUCCESS)
}

fn reload(config: &std::path::Path, paths: &RuntimePaths, upgrade: bool) -> Result<ExitCode, CliError> {
    // Refuse to touch the running instance with a config it would reject.
    Edge::load(config).map_err(|error| CliError::Failed(format!("not reloading: {error}")))?;
    let pid_file = paths.pid_file.as_ref();
    let socket = paths.upgrade_socket.as_ref();
    report(matrix_edge::cli::reload_command::reload(config, pid_file, socket, upgrade)?)
}

fn init(options: matrix_edge::cli::init::InitOptions) -> Result<ExitCode, CliError> {
    let (config, warnings) = matrix_edge::cli::init::init(&options)?;
    print!("{config}");
    for warning in warnings {
        eprintln!("matrix-edge: warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

fn renew(config: &std::path::Path, paths: &RuntimePaths, names: &[String]) -> Result<ExitCode, CliError> {
    let edge = load(config)?;
    report(matrix_edge::cli::renew::request(&edge, names, paths.pid_file.as_ref())?)
}

fn probe(
    config: &std::path::Path,
    probe: matrix_edge::cli::probe::Probe,
    address: Option<std::net::SocketAddr>,
) -> Result<ExitCode, CliError> {
    let address = match address {
        Some(address) => address,
        None => matrix_edge::cli::probe::address_from_config(config)?,
    };
    report(matrix_edge::cli::probe::run(address, probe)?)
}

fn route(config: &std::path::Path, method: &str, target: &str, headers: &[String]) -> Result<ExitCode, CliError> {
    let edge = load(config)?;
    let mut parsed = Vec::with_capacity(headers.len());
    for header in headers {
        let (name, value) = header.split_once(':').ok_or_else(|| format!("header {header:?} is not `Name: value`"))?;
        parsed.push((name.trim().to_string(), value.trim().to_string()));
    }
    print!("{}", matrix_edge::cli::explain::explain(&edge, &method.to_ascii_uppercase(), target, &parsed));
    Ok(ExitCode::SUCCESS)
}

fn workers(socket: &std::path::Path, action: WorkersAction) -> Result<ExitCode, CliError> {
    use matrix_edge::cli::workers;
    let limit = |wait: Option<String>| -> Result<Option<std::time::Duration>, CliError> {
        wait.map(|text| humantime::parse_duration(&text).map_err(|e| CliError::Failed(format!("--wait {text:?}: {e}"))))
            .transpose()
    };
    let out = match action {
        WorkersAction::List => workers::list(socket)?,
        WorkersAction::Drain { address, wait } => workers::set(socket, "drain", &address, limit(wait)?)?,
        WorkersAction::Maintenance { address, wait } => workers::set(socket, "maintenance", &address, limit(wait)?)?,
        WorkersAction::Ready { address } => workers::set(socket, "ready", &address, None)?,
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
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
) -> Result<ExitCode, CliError> {
    use matrix_edge::cli::doctor;
    let server_name = match server_name {
        Some(name) => name,
        None => Edge::load(config)
            .map_err(|error| format!("give --server-name, or a config that loads: {error}"))?
            .server_name
            .clone(),
    };
    let mut rules = Vec::with_capacity(connect_to.len());
    for rule in connect_to {
        rules.push(
            rule.parse::<matrix_edge::federation::fetch::ConnectTo>()
                .map_err(|error| format!("--connect-to {error}"))?,
        );
    }
    let options = doctor::Options { server_name: server_name.clone(), connect_to: rules, ca, signing_key, dns };
    let findings = doctor::run(&options);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings).unwrap_or_default());
    } else {
        print!("{}", doctor::render(&server_name, &findings));
    }
    if findings.iter().any(|f| f.verdict == doctor::Verdict::Fail) {
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// A command's one-line outcome on stdout, exit 0 (failures go through `CliError`).
fn report(done: String) -> Result<ExitCode, CliError> {
    println!("matrix-edge: {done}");
    Ok(ExitCode::SUCCESS)
}
