//! Worker pools: consistent hashing (Ketama) for sticky groups, round robin
//! for the rest, and per-member health that active checks and failed
//! connections both update. Picking reads atomics only.

use crate::config::values::UpstreamAddr;
use crate::synapse::table::Group;
use crate::upstream::peer::Upstream;
use pingora_ketama::{Bucket, Continuum};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct Member {
    pub upstream: Upstream,
    /// The address as logs and metrics show it, rendered once.
    pub label: String,
    /// Where `GET /health` goes (the worker's own address unless a health port is set).
    pub health: UpstreamAddr,
    pub weight: u32,
    healthy: AtomicBool,
    /// The member's identity on the hash ring.
    ring_id: SocketAddr,
}

impl Member {
    pub fn new(upstream: Upstream, health: UpstreamAddr, weight: u32) -> Member {
        let ring_id = ring_identity(&upstream.address);
        let label = upstream.address.to_string();
        Member { upstream, label, health, weight: weight.max(1), healthy: AtomicBool::new(true), ring_id }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Returns whether the state changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }
}

/// TCP workers are placed on the ring by address; Unix-socket workers by a
/// stable hash of their path, so the ring does not depend on config order.
fn ring_identity(address: &UpstreamAddr) -> SocketAddr {
    match address {
        UpstreamAddr::Tcp(addr) | UpstreamAddr::Tls(addr, _) => *addr,
        UpstreamAddr::Unix(path) => {
            let hash = crc32(path.as_os_str().as_encoded_bytes());
            SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, (hash >> 16) as u16, hash as u16)), 1)
        }
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

pub struct Pool {
    /// The group or upstream name, as logs and metrics show it.
    pub label: String,
    pub members: Vec<Member>,
    ring: Continuum,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(label: impl Into<String>, members: Vec<Member>) -> Pool {
        let buckets: Vec<Bucket> = members.iter().map(|m| Bucket::new(m.ring_id, m.weight)).collect();
        Pool { label: label.into(), ring: Continuum::new(&buckets), members, next: AtomicUsize::new(0) }
    }

    fn usable(&self, index: usize, avoid: &[usize]) -> bool {
        self.members[index].is_healthy() && !avoid.contains(&index)
    }

    /// A live member for `key` (consistent: a key stays on its member while
    /// that member lives, and only a dead member's keys move), or round
    /// robin without a key. `avoid` lists members already tried.
    pub fn pick(&self, key: Option<&[u8]>, avoid: &[usize]) -> Option<usize> {
        match key {
            Some(key) => self.pick_hashed(key, avoid),
            None => self.pick_round_robin(avoid),
        }
    }

    fn pick_hashed(&self, key: &[u8], avoid: &[usize]) -> Option<usize> {
        // Walking the ring visits every member after a bounded number of
        // points; stop once each has been seen.
        let mut seen = 0u64;
        let all = if self.members.len() >= 64 { u64::MAX } else { (1u64 << self.members.len()) - 1 };
        for ring_id in self.ring.node_iter(key).take(self.members.len() * 160 + 1) {
            let index = self.members.iter().position(|m| m.ring_id == *ring_id)?;
            if self.usable(index, avoid) {
                return Some(index);
            }
            if index < 64 {
                seen |= 1 << index;
                if seen == all {
                    break;
                }
            }
        }
        None
    }

    fn pick_round_robin(&self, avoid: &[usize]) -> Option<usize> {
        let count = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count).map(|offset| (start + offset) % count).find(|&index| self.usable(index, avoid))
    }

    /// Records a health change; returns whether it was one.
    pub fn mark(&self, index: usize, healthy: bool) -> bool {
        let member = &self.members[index];
        let changed = member.set_healthy(healthy);
        if changed {
            let worker = member.upstream.address.to_string();
            crate::observe::metrics::METRICS
                .operations
                .worker_up
                .with_label_values(&[&self.label, &worker])
                .set(i64::from(healthy));
            let state = if healthy { "up" } else { "down" };
            log::warn!("worker {worker} ({}) is {state}", self.label);
        }
        changed
    }

    pub fn live_count(&self) -> usize {
        self.members.iter().filter(|m| m.is_healthy()).count()
    }

    /// Carries member health over from a previous pool of the same name.
    pub fn inherit_health(&self, previous: &Pool) {
        for member in &self.members {
            if let Some(same) = previous.members.iter().find(|m| m.upstream.address == member.upstream.address) {
                member.set_healthy(same.is_healthy());
            }
        }
    }
}

/// Every declared group's pool; groups without one go to main.
#[derive(Default)]
pub struct Pools {
    groups: Vec<Group>,
    pools: Vec<Pool>,
}

impl Pools {
    pub fn new(pools: Vec<(Group, Pool)>) -> Pools {
        let (groups, pools) = pools.into_iter().unzip();
        Pools { groups, pools }
    }

    pub fn get(&self, group: Group) -> Option<&Pool> {
        self.groups.iter().position(|g| *g == group).map(|index| &self.pools[index])
    }

    pub fn all(&self) -> &[Pool] {
        &self.pools
    }

    /// Carries worker health over from the previous snapshot, so a reload
    /// does not send traffic to a worker known to be down.
    pub fn inherit_health(&self, old: &Pools) {
        for (group, pool) in self.groups.iter().zip(&self.pools) {
            if let Some(previous) = old.get(*group) {
                pool.inherit_health(previous);
            }
        }
    }

    pub fn declared(&self) -> Vec<Group> {
        self.groups.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamTimeoutsConfig;

    fn pool(ports: &[u16]) -> Pool {
        let members = ports
            .iter()
            .map(|port| {
                let address = UpstreamAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], *port)));
                Member::new(Upstream::new(&address, &UpstreamTimeoutsConfig::default()).unwrap(), address, 1)
            })
            .collect();
        Pool::new(Group::Synchrotron.name(), members)
    }

    #[test]
    fn a_dead_member_moves_only_its_own_keys() {
        let p = pool(&[8001, 8002, 8003, 8004]);
        let keys: Vec<String> = (0..2000).map(|i| format!("user{i}")).collect();
        let before: Vec<usize> = keys.iter().map(|k| p.pick(Some(k.as_bytes()), &[]).unwrap()).collect();
        for member in 0..4 {
            assert!(before.contains(&member), "member {member} got no keys");
        }
        p.members[1].set_healthy(false);
        let after: Vec<usize> = keys.iter().map(|k| p.pick(Some(k.as_bytes()), &[]).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b == 1 {
                assert_ne!(*a, 1);
            } else {
                assert_eq!(a, b, "a live member's key moved");
            }
        }
        p.members[1].set_healthy(true);
        let back: Vec<usize> = keys.iter().map(|k| p.pick(Some(k.as_bytes()), &[]).unwrap()).collect();
        assert_eq!(back, before);
    }

    #[test]
    fn round_robin_skips_dead_and_tried_members() {
        let p = pool(&[8001, 8002, 8003]);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(None, &[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        p.members[0].set_healthy(false);
        assert!((0..6).all(|_| p.pick(None, &[]) != Some(0)));
        assert_eq!(p.pick(None, &[1, 2]), None);
        assert!(p.pick(Some(b"k"), &[1]).is_some_and(|m| m == 2));
    }

    #[test]
    fn a_fully_dead_pool_picks_nothing() {
        let p = pool(&[8001, 8002]);
        p.members.iter().for_each(|m| {
            m.set_healthy(false);
        });
        assert_eq!(p.pick(Some(b"k"), &[]), None);
        assert_eq!(p.pick(None, &[]), None);
        assert_eq!(p.live_count(), 0);
    }
}
