//! Whether an endpoint's sidecar can be dialed at all, as the last dial found.
//!
//! Why beside outlier ejection: ejection needs several failures, and meanwhile every request
//! sent to a dead sidecar pays a connect timeout before its retry. A failed dial is a sure
//! sign, known at once: the endpoint counts as down (not ready for the balancer) until one
//! request is let through to dial again, after a backoff that doubles from
//! [`REDIAL_BASE`] up to [`REDIAL_MAX`]. A connection that works makes it reachable again.
//! When every endpoint is down the balancer tries them anyway: the record may be stale.

use std::time::{Duration, Instant};

/// The first wait before a down endpoint is dialed again.
pub const REDIAL_BASE: Duration = Duration::from_millis(250);
/// The longest wait between dials of a down endpoint.
pub const REDIAL_MAX: Duration = Duration::from_secs(5);

/// What the balancer may do with an endpoint, as far as its connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// No failed dial on record.
    Reachable,
    /// The last dial failed; wait.
    Down,
    /// Down, but the wait is over: send this one request to dial again. Returned once per
    /// wait, so one request (not every request) pays for a dead dial.
    Redial,
}

/// The dial record of one endpoint; plain data, `now` passed in.
#[derive(Debug, Clone, Default)]
pub struct Reachability {
    /// Failed dials in a row (0: reachable).
    failures: u32,
    /// When the next redial may go out.
    redial_at: Option<Instant>,
}

impl Reachability {
    /// Reachable, as every endpoint starts.
    pub fn new() -> Self {
        Reachability::default()
    }

    pub fn is_down(&self) -> bool {
        self.failures > 0
    }

    /// A dial failed (connect timeout, unreachable, handshake refused).
    pub fn on_connect_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.redial_at = Some(now + Self::wait(self.failures));
    }

    /// A request got through (a connection works).
    pub fn on_connected(&mut self) {
        self.failures = 0;
        self.redial_at = None;
    }

    /// Where the endpoint stands. `Redial` moves the next redial one wait later, so a redial
    /// whose result never comes (the request was cancelled) does not strand the endpoint.
    pub fn state(&mut self, now: Instant) -> Reach {
        match self.redial_at {
            None => Reach::Reachable,
            Some(at) if now < at => Reach::Down,
            Some(_) => {
                self.redial_at = Some(now + Self::wait(self.failures));
                Reach::Redial
            }
        }
    }

    fn wait(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        REDIAL_BASE.saturating_mul(1 << doublings).min(REDIAL_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_failed_dial_makes_it_down_until_one_redial_after_a_growing_wait() {
        let t0 = Instant::now();
        let mut r = Reachability::new();
        assert_eq!(r.state(t0), Reach::Reachable);
        r.on_connect_failure(t0);
        assert!(r.is_down());
        assert_eq!(r.state(t0 + ms(249)), Reach::Down);
        assert_eq!(r.state(t0 + ms(250)), Reach::Redial);
        // One redial per wait: the next requests still see it down.
        assert_eq!(r.state(t0 + ms(251)), Reach::Down);
        // The redial failed too: the wait doubles.
        let t1 = t0 + ms(260);
        r.on_connect_failure(t1);
        assert_eq!(r.state(t1 + ms(499)), Reach::Down);
        assert_eq!(r.state(t1 + ms(500)), Reach::Redial);
        // It worked: reachable again, and the next failure starts from the base wait.
        r.on_connected();
        assert_eq!(r.state(t1 + ms(501)), Reach::Reachable);
        r.on_connect_failure(t1);
        assert_eq!(r.state(t1 + ms(250)), Reach::Redial);
    }

    #[test]
    fn a_lost_redial_is_replaced_after_another_wait_and_waits_are_capped() {
        let t0 = Instant::now();
        let mut r = Reachability::new();
        for _ in 0..40 {
            r.on_connect_failure(t0);
        }
        assert_eq!(r.state(t0 + REDIAL_MAX - ms(1)), Reach::Down);
        assert_eq!(r.state(t0 + REDIAL_MAX), Reach::Redial);
        // No result ever came for that redial: another goes out one wait later.
        assert_eq!(r.state(t0 + REDIAL_MAX * 2 - ms(1)), Reach::Down);
        assert_eq!(r.state(t0 + REDIAL_MAX * 2), Reach::Redial);
    }
}
