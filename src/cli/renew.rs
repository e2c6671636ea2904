//! `matrix-edge renew`: renew ACME certificates now, for instance after
//! fixing what made an order fail, without waiting for the backoff.
//!
//! The running instance owns the CA conversation; this only leaves a marker
//! per name in the state directory and sends SIGHUP, which wakes the ACME
//! service. The certificate in place keeps serving until the new one is in.

use crate::cli::{input, CliError};
use crate::edge::Edge;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;

pub fn request(edge: &Edge, names: &[String], pid_file: &Path) -> Result<String, CliError> {
    let Some(plan) = &edge.tls.acme else {
        return Err(input("tls.acme is not configured: there is nothing to renew"));
    };
    let chosen: Vec<&String> = if names.is_empty() {
        plan.names.iter().collect()
    } else {
        let mut chosen = Vec::with_capacity(names.len());
        for name in names {
            let lowered = name.to_ascii_lowercase();
            let Some(known) = plan.names.iter().find(|n| **n == lowered) else {
                return Err(input(format!("{name} is not one of the ACME names ({})", plan.names.join(", "))));
            };
            chosen.push(known);
        }
        chosen
    };
    for name in &chosen {
        plan.store
            .request_renewal(name)
            .map_err(|e| input(format!("cannot mark {name} for renewal in {}: {e}", plan.store.dir.display())))?;
    }
    let pid = crate::cli::reload_command::read_pid(pid_file)?;
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| input(format!("cannot signal process {pid}: {e}")))?;
    let list: Vec<&str> = chosen.iter().map(|n| n.as_str()).collect();
    Ok(format!("asked process {pid} to renew {}; watch its log for the result", list.join(", ")))
}
