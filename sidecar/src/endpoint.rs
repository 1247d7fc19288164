//! What the outbound learns about each endpoint and service, kept across configuration
//! updates: load (requests in flight), latency (peak EWMA), health (outlier ejection), and
//! per service the retry budget. A new snapshot takes these over from the previous one for
//! every endpoint it keeps, so an update never makes the balancer forget.
//!
//! Each piece is a plain struct that takes `now` (in `balance` and `resilience`); this
//! module only puts them behind per-endpoint locks, held for a few instructions and never
//! across an await.

use crate::balance::PeakEwma;
use crate::resilience::{
    ConcurrencyLimit, Latencies, Outlier, OutlierConfig, Reach, Reachability, RetryBudget, State,
};
use sinew_proto::policy::{OutlierPolicy, RetryBudgetPolicy};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many of one service's endpoints are not plainly ready (ejected, probing, or with a
/// failed dial on record), kept up to date by their [`EndpointState`]s. At zero the balancer
/// may skip its scan: every endpoint is ready and reachable, so plain P2C over all of them
/// is exactly what the scan would do.
#[derive(Debug, Default)]
pub struct Unsettled(AtomicUsize);

impl Unsettled {
    /// Whether every endpoint counted here is ready and reachable.
    pub fn none(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    /// Sets one of an endpoint's flags, counting the change.
    fn set(&self, flag: &AtomicBool, on: bool) {
        if flag.swap(on, Ordering::AcqRel) != on {
            if on {
                self.0.fetch_add(1, Ordering::AcqRel);
            } else {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// One endpoint's load, latency and health.
#[derive(Debug)]
pub struct EndpointState {
    in_flight: AtomicUsize,
    ewma: Mutex<PeakEwma>,
    outlier: Mutex<Outlier>,
    /// Whether the outlier is anything but ready (ejected, probing); changed under its lock.
    unready: AtomicBool,
    /// Whether the last dial failed; the fast path reads only this flag.
    down: AtomicBool,
    reach: Mutex<Reachability>,
    /// The service's count of endpoints with `unready` or `down` set.
    unsettled: Arc<Unsettled>,
}

impl EndpointState {
    /// A ready endpoint of the service whose endpoints `unsettled` counts.
    pub fn new(now: Instant, unsettled: Arc<Unsettled>) -> Self {
        EndpointState {
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(PeakEwma::new(
                crate::balance::DEFAULT_RTT,
                crate::balance::DECAY,
                now,
            )),
            outlier: Mutex::new(Outlier::new(now)),
            unready: AtomicBool::new(false),
            down: AtomicBool::new(false),
            reach: Mutex::new(Reachability::new()),
            unsettled,
        }
    }

    /// The balancer's cost: latency estimate weighted by requests in flight.
    pub fn cost(&self, now: Instant) -> f64 {
        lock(&self.ewma).cost(now, self.in_flight.load(Ordering::Relaxed))
    }

    /// Whether the endpoint may take a request (an ended ejection yields one probe).
    pub fn state(&self, now: Instant) -> State {
        lock(&self.outlier).state(now)
    }

    /// Whether a connection to the endpoint's sidecar is known to work (or was never
    /// tried): `Down` after a failed dial, with one `Redial` let through now and then.
    pub fn reach(&self, now: Instant) -> Reach {
        if !self.down.load(Ordering::Relaxed) {
            return Reach::Reachable;
        }
        lock(&self.reach).state(now)
    }

    /// A dial to the endpoint failed. Returns true when it was reachable until now.
    pub fn connect_failed(&self, now: Instant) -> bool {
        let mut reach = lock(&self.reach);
        let was_down = reach.is_down();
        reach.on_connect_failure(now);
        self.unsettled.set(&self.down, true);
        !was_down
    }

    /// A request reached the endpoint's sidecar: its connection works.
    pub fn connected(&self) {
        if self.down.load(Ordering::Relaxed) {
            let mut reach = lock(&self.reach);
            reach.on_connected();
            self.unsettled.set(&self.down, false);
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a latency sample alone: the time a try had taken when it was abandoned (it
    /// lost a hedge race, its client went away), a lower bound of the real latency.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        lock(&self.ewma).observe(rtt, now);
    }

    /// Records a try's outcome; `rtt` is the time to the response head when there was one.
    /// Returns true when this outcome ejected the endpoint.
    pub fn record(
        &self,
        ok: bool,
        rtt: Option<Duration>,
        now: Instant,
        policy: &OutlierPolicy,
    ) -> bool {
        if let Some(rtt) = rtt {
            lock(&self.ewma).observe(rtt, now);
        }
        let config = outlier_config(policy);
        let mut outlier = lock(&self.outlier);
        let ejected = outlier
            .on_result(ok, now, &config, fastrand::f64())
            .is_some();
        // Under the lock, so the flag follows the outlier's changes in their order.
        self.unsettled.set(&self.unready, !outlier.is_ready());
        ejected
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        self.unsettled.set(&self.unready, false);
        self.unsettled.set(&self.down, false);
    }
}

fn outlier_config(policy: &OutlierPolicy) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: policy.consecutive_failures,
        base_ejection: policy.base_ejection,
        max_ejection: policy.max_ejection,
        success_rate_min_requests: policy.min_requests,
        success_rate_threshold: f64::from(policy.failure_percent) / 100.0,
        ..OutlierConfig::default()
    }
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One service's retry budget and concurrency limit.
#[derive(Debug)]
pub struct ServiceState {
    budget: Mutex<RetryBudget>,
    policy: RetryBudgetPolicy,
    /// Requests in flight to the service; its maximum follows the policy in place.
    pub limit: ConcurrencyLimit,
    /// Recent response times (for a percentile hedge delay).
    pub latencies: Latencies,
    /// Requests waiting for the service to have an instance (bounded by `max_pending`).
    pub pending: std::sync::atomic::AtomicUsize,
}

impl ServiceState {
    pub fn new(policy: &RetryBudgetPolicy, max_concurrent: u32, now: Instant) -> Self {
        ServiceState {
            budget: Mutex::new(RetryBudget::new(
                policy.ratio,
                policy.min_per_second,
                BUDGET_WINDOW,
            )),
            policy: policy.clone(),
            limit: ConcurrencyLimit::new(max_concurrent as usize),
            latencies: Latencies::new(now),
            pending: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Whether this state can serve `policy` (a changed budget starts afresh).
    pub fn fits(&self, policy: &RetryBudgetPolicy) -> bool {
        self.policy == *policy
    }

    /// An original request: it earns the budget its share.
    pub fn deposit(&self, now: Instant) {
        lock(&self.budget).deposit(now);
    }

    /// A retry: spends from the budget, if there is any left.
    pub fn try_retry(&self, now: Instant) -> bool {
        lock(&self.budget).try_withdraw(now)
    }
}

/// The window the retry budget counts requests and retries over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
