//! Synapse processes as Pingora peers, with every timeout set explicitly
//! (Pingora's defaults are "none").

use crate::config::values::UpstreamAddr;
use crate::config::UpstreamTimeoutsConfig;
use pingora::upstreams::peer::HttpPeer;

#[derive(Clone)]
pub struct Upstream {
    pub address: UpstreamAddr,
    template: HttpPeer,
}

use crate::config::values::InvalidValue;

impl Upstream {
    pub fn new(address: &UpstreamAddr, timeouts: &UpstreamTimeoutsConfig) -> Result<Upstream, InvalidValue> {
        let invalid = |path: &std::path::Path, expected: String| InvalidValue {
            what: "unix socket path",
            text: path.display().to_string(),
            expected,
        };
        let mut peer = match address {
            UpstreamAddr::Tcp(addr) => HttpPeer::new(*addr, false, String::new()),
            UpstreamAddr::Tls(addr, host) => HttpPeer::new(*addr, true, host.clone()),
            UpstreamAddr::Unix(path) => {
                let utf8 = path.to_str().ok_or_else(|| invalid(path, "it is not UTF-8".into()))?;
                HttpPeer::new_uds(utf8, false, String::new()).map_err(|e| invalid(path, e.to_string()))?
            }
        };
        let options = &mut peer.options;
        options.connection_timeout = Some(timeouts.connect.0);
        options.total_connection_timeout = Some(timeouts.connect.0 * 2);
        options.read_timeout = Some(timeouts.read.0);
        options.write_timeout = Some(timeouts.write.0);
        options.idle_timeout = Some(timeouts.keepalive_idle.0);
        Ok(Upstream { address: address.clone(), template: peer })
    }

    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.template.clone())
    }
}
