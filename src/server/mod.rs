//! Turns an `Edge` into a Pingora server: one proxy service per listener,
//! sharing one configuration snapshot cell and one certificate cell.

pub mod connections;
pub mod framing;
pub mod gate;
pub mod http2;
pub mod proxy;
pub mod proxy_protocol;
pub mod respond;

use crate::edge::Edge;
use crate::server::connections::{CapFilter, ConnectionCounts, GuardedApp};
use crate::server::proxy::EdgeProxy;
use crate::tls::SniResolver;
use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use std::sync::Arc;

/// Process-level options from the command line.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take over the listening sockets of a running instance.
    pub upgrade: bool,
    pub pid_file: Option<String>,
    pub upgrade_socket: Option<String>,
    /// Where `matrix-edge workers` reaches the running edge.
    pub control_socket: Option<std::path::PathBuf>,
}

/// The read buffer under each TLS client connection. Pingora's default,
/// 64 KiB, stays with every idle keep-alive connection (about 34 KiB
/// resident each, measured); 4 KiB still takes a few TLS records per read
/// (OpenSSL reads a record's header, then its body), and measured no more
/// CPU per request (bench/RESULTS.md).
const TLS_READ_BUFFER: usize = 4096;
/// Plaintext connections read straight into Pingora's request buffer, which
/// exists only while a request is in flight: a buffer under the socket
/// would stay with each idle keep-alive connection (4 KiB of about 11).
const PLAIN_READ_BUFFER: usize = 0;

/// One listener's Pingora service: the proxy behind the connection guard,
/// the per-address cap, PROXY headers and, on TLS listeners, SNI and h2.
fn listener_service(
    server: &Server,
    listener: crate::edge::Listener,
    edge: &Arc<ArcSwap<Edge>>,
    counts: &Arc<ConnectionCounts>,
    challenges: &crate::acme::SharedChallenges,
    runtime: &Arc<crate::runtime::Runtime>,
) -> Result<Service<GuardedApp<pingora::proxy::HttpProxy<EdgeProxy>>>, String> {
    let address = listener.address.to_string();
    let name = format!("matrix-edge {address}");
    let tls = listener.tls;
    let proxy = listener.proxy_protocol.clone();
    let buffers = L4BufferSettings::default().read(if tls { TLS_READ_BUFFER } else { PLAIN_READ_BUFFER });
    let http_app = pingora::proxy::http_proxy(
        &server.configuration,
        EdgeProxy {
            listener,
            edge: Arc::clone(edge),
            challenges: Arc::clone(challenges),
            runtime: Arc::clone(runtime),
        },
    );
    let app = GuardedApp {
        inner: Arc::new(http_app),
        edge: Arc::clone(edge),
        counts: Arc::clone(counts),
        plain_proxy: proxy.clone().filter(|_| !tls),
    };
    let mut service = Service::new(name, app);
    service.set_connection_filter(Arc::new(CapFilter {
        counts: Arc::clone(counts),
        edge: Arc::clone(edge),
        proxy: proxy.clone(),
    }));
    if let Some(proxy) = proxy.filter(|_| tls) {
        let header = crate::server::proxy_protocol::PreTlsHeader { proxy };
        service.endpoints().set_pre_tls_callback(Arc::new(header));
    }
    if tls {
        let resolver = SniResolver { source: Arc::clone(edge) };
        let mut settings = TlsSettings::with_callbacks(Box::new(resolver))
            .map_err(|e| format!("cannot set up TLS for {address}: {e}"))?;
        settings.enable_h2();
        // OpenSSL's per-connection record buffers go back while a
        // connection is idle, as nginx does.
        settings.set_mode(pingora::tls::ssl::SslMode::RELEASE_BUFFERS);
        service.add_listener(ListenerConfig::tcp(&address).tls(settings).l4_buffer(buffers));
    } else {
        service.add_listener(ListenerConfig::tcp(&address).l4_buffer(buffers));
    }
    Ok(service)
}

/// Pingora binds in each service's thread and panics there on failure,
/// leaving a process that runs without the listener. Binding once here
/// first turns that into an error before anything starts. Skipped on an
/// upgrade: the sockets then come from the running instance.
fn check_bindable(addresses: impl IntoIterator<Item = std::net::SocketAddr>) -> Result<(), String> {
    for address in addresses {
        if let Err(error) = std::net::TcpListener::bind(address) {
            let hint = if error.kind() == std::io::ErrorKind::PermissionDenied && address.port() < 1024 {
                ": ports below 1024 need CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=, podman: --cap-add NET_BIND_SERVICE) or a lower net.ipv4.ip_unprivileged_port_start"
            } else {
                ""
            };
            return Err(format!("cannot listen on {address}: {error}{hint}"));
        }
    }
    Ok(())
}

pub fn build(edge: Edge, config_path: &std::path::Path, options: &RunOptions) -> Result<Server, String> {
    if !options.upgrade {
        check_bindable(edge.ops.listeners.iter().map(|l| l.address).chain(edge.ops.metrics_address))?;
    }
    let process = &edge.ops.config.process;
    let threads = match process.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut conf = ServerConf { threads, ..ServerConf::default() };
    conf.grace_period_seconds = Some(process.shutdown_drain.0.as_secs());
    conf.graceful_shutdown_timeout_seconds = Some(process.shutdown_drain.0.as_secs() + 5);
    conf.upstream_keepalive_pool_size = 512;
    // Requests held while their upstream restarts try again every second
    // at most (`synapse.hold`, 15 s by default): room for that.
    conf.max_retries = 64;
    if let Some(pid_file) = &options.pid_file {
        conf.pid_file = pid_file.clone();
    }
    if let Some(socket) = &options.upgrade_socket {
        conf.upgrade_sock = socket.clone();
    }
    let opt = Opt { upgrade: options.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    crate::services::reload::publish(&edge);
    let listeners = edge.ops.listeners.clone();
    let metrics_address = edge.ops.metrics_address;
    let edge = Arc::new(ArcSwap::from_pointee(edge));
    let counts = Arc::new(ConnectionCounts::default());
    let challenges: crate::acme::SharedChallenges = Arc::default();
    let reloaded = Arc::new(tokio::sync::Notify::new());
    let runtime = Arc::new(crate::runtime::Runtime::default());
    for listener in listeners {
        let service = listener_service(&server, listener, &edge, &counts, &challenges, &runtime)?;
        server.add_service(service);
    }
    if let Some(address) = metrics_address {
        let mut metrics = pingora::services::listening::Service::new(
            "metrics".to_string(),
            pingora::apps::http_app::HttpServer::new_app(crate::services::status::PrivateApp {
                edge: Arc::clone(&edge),
                runtime: Arc::clone(&runtime),
            }),
        );
        metrics.add_tcp(&address.to_string());
        server.add_service(metrics);
    }
    let installer = crate::services::install::Installer::new(
        Arc::clone(&edge),
        config_path.to_path_buf(),
        Arc::clone(&reloaded),
        Arc::clone(&runtime),
    );
    let (installer, installs) = installer.service();
    server.add_service(pingora::services::background::background_service("installer", installer));
    let reloader = crate::services::reload::Reloader { edge: Arc::clone(&edge), installs: installs.clone() };
    server.add_service(pingora::services::background::background_service("reload", reloader));
    let readiness = crate::services::readiness::Readiness {
        addresses: edge.load().ops.listeners.iter().map(|l| l.address).collect(),
        pid_file: options.pid_file.as_ref().map(std::path::PathBuf::from),
        runtime: Arc::clone(&runtime),
    };
    server.add_service(pingora::services::background::background_service("readiness", readiness));
    let stop = crate::services::shutdown::StopWhenDrained { runtime: Arc::clone(&runtime) };
    server.add_service(pingora::services::background::background_service("stop when drained", stop));
    // Always running: a reload may add workers or upstreams with checks.
    let checker = crate::services::health::HealthChecker { edge: Arc::clone(&edge), runtime: Arc::clone(&runtime) };
    server.add_service(pingora::services::background::background_service("worker health", checker));
    if let Some(path) = &options.control_socket {
        let control = crate::services::control::ControlSocket {
            path: path.clone(),
            edge: Arc::clone(&edge),
            runtime: Arc::clone(&runtime),
        };
        server.add_service(pingora::services::background::background_service("control socket", control));
    }
    // Always running: idle without `cluster`, and a reload may add it.
    let cluster = crate::services::cluster::ClusterService { edge: Arc::clone(&edge), runtime: Arc::clone(&runtime) };
    server.add_service(pingora::services::background::background_service("cluster", cluster));
    let stalls = crate::services::health::StallWatch { edge: Arc::clone(&edge) };
    server.add_service(pingora::services::background::background_service("stall watch", stalls));
    let discovery = crate::services::discovery::Discovery { edge: Arc::clone(&edge), installs };
    server.add_service(pingora::services::background::background_service("worker discovery", discovery));
    // Always running too: idle without `tls.acme`, and a reload may add it.
    let acme = crate::services::acme::AcmeManager { edge: Arc::clone(&edge), challenges, wake: reloaded };
    server.add_service(pingora::services::background::background_service("acme", acme));
    Ok(server)
}
