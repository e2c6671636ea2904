//! Named upstreams (`upstreams:` in the config): MAS, LiveKit, lk-jwt-service,
//! anything HTTP, each a pool with the same machinery as Synapse's workers.

use crate::config::sites::{Balance, NamedUpstreamConfig};
use crate::config::values::{InvalidValue, Lookups, ResolveError, UpstreamTarget};
use crate::upstream::balance::{Balancing, Choice, SettingError};
use crate::upstream::peer::Upstream;
use crate::upstream::pool::{Member, Pool};
use std::time::Duration;

/// Active checks of one named upstream.
#[derive(Debug, Clone)]
pub struct NamedHealth {
    pub path: String,
    pub timeout: Duration,
}

pub struct NamedUpstream {
    pub name: String,
    pub pool: Pool,
    pub balance: Balance,
    /// Absent: failed connections skip a member for that request only,
    /// since nothing would bring a member marked down back.
    pub health: Option<NamedHealth>,
}

impl NamedUpstream {
    /// A refused `balancing` setting comes back apart, to be located by its key.
    pub fn from_config(
        name: &str,
        config: &NamedUpstreamConfig,
        lookups: &Lookups,
    ) -> Result<NamedUpstream, NamedUpstreamError> {
        if !config.balancing.groups.is_empty() {
            return Err(NamedUpstreamError::Balancing((
                "groups",
                "per-group settings belong in synapse.balancing".into(),
            )));
        }
        let choice = match config.balance {
            Balance::RoundRobin => Choice::RoundRobin,
            Balance::LeastOutstanding | Balance::ClientIp => Choice::LeastOutstanding,
        };
        let balancing = Balancing::from_config(&config.balancing, choice).map_err(NamedUpstreamError::Balancing)?;
        Self::build(name, config, balancing, lookups)
    }

    fn build(
        name: &str,
        config: &NamedUpstreamConfig,
        balancing: Balancing,
        lookups: &Lookups,
    ) -> Result<NamedUpstream, NamedUpstreamError> {
        let addresses: Vec<&UpstreamTarget> = match (&config.address, config.members.as_slice()) {
            (Some(address), []) => vec![address],
            (None, members) if !members.is_empty() => members.iter().collect(),
            (Some(_), _) => return Err(NamedUpstreamError::Shape("give either `address` or `members`, not both")),
            (None, _) => {
                return Err(NamedUpstreamError::Shape("give the upstream's `address` (or a list of `members`)"))
            }
        };
        let mut members = Vec::with_capacity(addresses.len());
        for target in addresses {
            let address = lookups.address(target).map_err(NamedUpstreamError::Resolve)?;
            let upstream = Upstream::new(&address, &config.timeouts).map_err(NamedUpstreamError::Invalid)?;
            members.push(Member::new(name, upstream, address, 1));
        }
        let health = config
            .health_check
            .as_ref()
            .map(|check| NamedHealth { path: check.path.clone(), timeout: check.timeout.0 });
        if let Some(check) = &health {
            if !check.path.starts_with('/')
                || check.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return Err(NamedUpstreamError::Invalid(InvalidValue {
                    what: "health_check.path",
                    text: check.path.clone(),
                    expected: "it must be a path starting with /".into(),
                }));
            }
        }
        Ok(NamedUpstream {
            name: name.to_string(),
            pool: Pool::new(name, members, balancing),
            balance: config.balance,
            health,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NamedUpstreamError {
    /// A `balancing` key and why.
    #[error("{}: {}", .0.0, .0.1)]
    Balancing(SettingError),
    /// Neither or both of `address` and `members`.
    #[error("{0}")]
    Shape(&'static str),
    #[error("{0}")]
    Resolve(ResolveError),
    #[error("{0}")]
    Invalid(InvalidValue),
}

/// Every named upstream, addressed by its index (`UpstreamId`).
#[derive(Default)]
pub struct NamedUpstreams {
    upstreams: Vec<NamedUpstream>,
}

/// Index of a named upstream in the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamId(pub usize);

impl NamedUpstreams {
    pub fn new(upstreams: Vec<NamedUpstream>) -> NamedUpstreams {
        NamedUpstreams { upstreams }
    }

    pub fn id(&self, name: &str) -> Option<UpstreamId> {
        self.upstreams.iter().position(|u| u.name == name).map(UpstreamId)
    }

    pub fn get(&self, id: UpstreamId) -> &NamedUpstream {
        &self.upstreams[id.0]
    }

    pub fn all(&self) -> &[NamedUpstream] {
        &self.upstreams
    }

    /// Keeps each member's health, load and failures across a reload.
    pub fn adopt_state(&mut self, old: &NamedUpstreams) {
        for upstream in &mut self.upstreams {
            if let Some(previous) = old.id(&upstream.name).map(|id| old.get(id)) {
                upstream.pool.adopt_state(&previous.pool);
            }
        }
    }
}
