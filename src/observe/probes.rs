//! Liveness and readiness, as the metrics listener reports them to
//! Kubernetes (`/livez`, `/readyz`) and `matrix-edge probe` to a container
//! health check. Written by the services that know (readiness, shutdown),
//! read per probe request; nothing here blocks.

use std::sync::atomic::{AtomicBool, Ordering};

static LISTENING: AtomicBool = AtomicBool::new(false);
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Every listener accepts connections, with a loaded configuration.
pub fn mark_listening() {
    LISTENING.store(true, Ordering::Release);
}

/// A stop was asked for: no new connections are accepted, in-flight
/// requests finish. A load balancer should send nothing more here.
pub fn mark_draining() {
    DRAINING.store(true, Ordering::Release);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Starting,
    Ready,
    Draining,
}

impl Readiness {
    pub fn now() -> Readiness {
        if DRAINING.load(Ordering::Acquire) {
            Readiness::Draining
        } else if LISTENING.load(Ordering::Acquire) {
            Readiness::Ready
        } else {
            Readiness::Starting
        }
    }

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
        assert_eq!(Readiness::now().answer().0, 503);
        mark_listening();
        assert_eq!(Readiness::now(), Readiness::Ready);
        assert_eq!(Readiness::now().answer(), (200, "ready\n"));
        mark_draining();
        assert_eq!(Readiness::now(), Readiness::Draining);
        mark_listening();
        assert_eq!(Readiness::now().answer(), (503, "draining\n"));
    }
}
