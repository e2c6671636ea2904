//! Liveness and readiness, as the metrics listener reports them to
//! Kubernetes (`/livez`, `/readyz`) and `matrix-edge probe` to a container
//! health check. Written by the services that know (readiness, shutdown),
//! read per probe request; nothing here blocks.

use std::sync::atomic::{AtomicBool, Ordering};

/// What the probes answer from, held by the runtime (`runtime::Runtime`).
#[derive(Debug, Default)]
pub struct Probes {
    listening: AtomicBool,
    draining: AtomicBool,
}

impl Probes {
    /// Every listener accepts connections, with a loaded configuration.
    pub fn mark_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// A stop was asked for: no new connections are accepted, in-flight
    /// requests finish. A load balancer should send nothing more here.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn readiness(&self) -> Readiness {
        if self.draining.load(Ordering::Acquire) {
            Readiness::Draining
        } else if self.listening.load(Ordering::Acquire) {
            Readiness::Ready
        } else {
            Readiness::Starting
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Starting,
    Ready,
    Draining,
}

impl Readiness {
    /// The probe's answer: status and a one-word body.
    pub fn answer(self) -> (u16, &'static str) {
        match self {
            Readiness::Ready => (200, "ready\n"),
            Readiness::Starting => (503, "starting\n"),
            Readiness::Draining => (503, "draining\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_goes_starting_ready_draining_and_never_back() {
        let probes = Probes::default();
        assert_eq!(probes.readiness().answer().0, 503);
        probes.mark_listening();
        assert_eq!(probes.readiness(), Readiness::Ready);
        assert_eq!(probes.readiness().answer(), (200, "ready\n"));
        probes.mark_draining();
        assert_eq!(probes.readiness(), Readiness::Draining);
        probes.mark_listening();
        assert_eq!(probes.readiness().answer(), (503, "draining\n"));
    }
}
