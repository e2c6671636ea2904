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

impl Upstream {
    pub fn new(address: &UpstreamAddr, timeouts: &UpstreamTimeoutsConfig) -> Result<Upstream, String> {
        let mut peer = match address {
            UpstreamAddr::Tcp(addr) => HttpPeer::new(*addr, false, String::new()),
            UpstreamAddr::Tls(addr, host) => HttpPeer::new(*addr, true, host.clone()),
            UpstreamAddr::Unix(path) => {
                let path = path.to_str().ok_or_else(|| format!("socket path {} is not UTF-8", path.display()))?;
                HttpPeer::new_uds(path, false, String::new())
                    .map_err(|e| format!("bad unix socket path {path}: {e}"))?
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
