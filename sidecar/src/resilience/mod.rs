//! Self-healing policy mechanisms, each a plain struct with no clock, task or I/O of its own:
//! callers pass `now` (and any randomness), so tests step time by hand and the data path
//! decides where the state lives and which metric to count.
//!
//! - [`RetryBudget`]: retries (and hedges) may add at most a fraction of the request rate plus
//!   a small floor, so an outage never multiplies load (Finagle's retry budget).
//! - [`Outlier`]: per-endpoint ejection on consecutive failures or a bad success rate, with a
//!   growing ejection time and a single probe to come back (Envoy outlier detection,
//!   Linkerd failure accrual).
//! - [`ConcurrencyLimit`]: at most N requests in flight per upstream service; past it, fail
//!   fast instead of queueing (Envoy's circuit-breaker thresholds).
//! - [`Reachability`]: an endpoint whose last dial failed is not ready until one request
//!   dials it again after a growing wait.
//! - [`Replay`]: a request body kept while it streams, so a try can be sent again.
//! - [`Latencies`]: a service's recent response times, for a percentile hedge delay.

use std::time::{Duration, Instant};

pub mod budget;
pub mod latencies;
pub mod limits;
pub mod outlier;
pub mod reachability;
pub mod replay;

pub use budget::RetryBudget;
pub use latencies::Latencies;
pub use limits::{ConcurrencyLimit, Overloaded, Permit};
pub use outlier::Outlier;
pub use reachability::{Reach, Reachability};
pub use replay::Replay;

// The outlier's vocabulary, what the data path reads and writes (policy in, verdicts out),
// lives here; `outlier.rs` holds the mechanism and its tests.

/// Outlier-detection policy for one upstream service ([`Outlier`]); `Default` holds the
/// documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Failures in a row that eject (default 5); 0 disables this trigger.
    pub consecutive_failures: u32,
    /// The first ejection's length (default 5 s); each further one doubles it.
    pub base_ejection: Duration,
    /// Cap on the ejection length before jitter (default 60 s); also how long an endpoint must
    /// stay healthy after coming back before its ejection count starts again from zero.
    pub max_ejection: Duration,
    /// ± fraction of randomness on each ejection (default 0.1), so endpoints ejected together
    /// are not probed in lockstep.
    pub jitter: f64,
    /// Results needed in the window before the failure ratio may eject (default 20).
    pub success_rate_min_requests: u32,
    /// Eject when failures / results over the window exceed this (default 0.5; ≥ 1 disables).
    pub success_rate_threshold: f64,
    /// The success-rate window (default 10 s).
    pub success_rate_window: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
            jitter: 0.1,
            success_rate_min_requests: 20,
            success_rate_threshold: 0.5,
            success_rate_window: Duration::from_secs(10),
        }
    }
}

/// Which trigger ejected an endpoint: the label of the ejection metric (`{:?}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `consecutive_failures` in a row.
    ConsecutiveFailures,
    /// The failure ratio over the window passed the threshold.
    SuccessRate,
    /// The single probe after an ejection failed.
    ProbeFailed,
}

/// One ejection, returned by the result that caused it so the caller can count and log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// The trigger, for the metric's label.
    pub reason: Reason,
    /// When the probe becomes possible.
    pub until: Instant,
    /// This ejection's length, jitter included.
    pub duration: Duration,
    /// Ejections since the endpoint was last healthy for `max_ejection` (1 for the first).
    pub count: u32,
}

/// What the balancer may do with an endpoint now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Send it traffic.
    Ready,
    /// Send it nothing until `until`.
    Ejected { until: Instant },
    /// The ejection ran out: send it exactly one request, the probe. Returned once.
    Probe,
    /// The probe is out: send nothing until its result arrives.
    ProbeInFlight,
}

impl State {
    /// Whether a request may go to the endpoint (`Ready`, or the one `Probe`).
    pub fn is_available(self) -> bool {
        matches!(self, State::Ready | State::Probe)
    }
}
