//! Peak-EWMA estimate of one endpoint's response latency (Finagle's and Linkerd's `PeakEwma`).

use std::time::{Duration, Instant};

/// The estimate a new endpoint starts with (Linkerd's seed): low enough that a new instance
/// gets traffic at once, high enough that it is not flooded ahead of endpoints measured to
/// answer in a few milliseconds, until its own samples arrive.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// The time constant of the average (Linkerd's and Finagle's 10 s). Long enough that one fast
/// answer does not erase a slow history and that load does not flap between endpoints on
/// every sample; short enough to follow a change of regime within seconds. With no samples
/// the estimate decays toward zero, so an endpoint shunned for being slow looks cheap again
/// after some tens of seconds, gets a request, and is measured afresh: a recovered instance
/// wins traffic back without any explicit probe.
pub const DECAY: Duration = Duration::from_secs(10);

/// Peak-sensitive exponentially weighted moving average of latency: pessimistic at once,
/// optimistic slowly, which is the safe direction for a balancer.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    /// The estimate as of `stamp`, in nanoseconds.
    rtt_nanos: f64,
    decay_nanos: f64,
    stamp: Instant,
}

impl PeakEwma {
    /// Starts at `default_rtt` as of `now`; `decay` is the time constant (a zero decay is
    /// treated as 1 ns: every sample replaces the estimate).
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            rtt_nanos: nanos(default_rtt),
            decay_nanos: nanos(decay).max(1.0),
            stamp: now,
        }
    }

    /// Records one response's latency. The estimate is first decayed to `now`; a sample above
    /// it replaces it (the peak), a lower one pulls it toward the sample with weight
    /// `1 - exp(-elapsed / decay)`, so a sample after a long silence counts for more than
    /// one right after the last. A `now` older than the last sample counts as no time passed.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let current = self.decayed(now);
        let rtt = nanos(rtt);
        self.rtt_nanos = if rtt > current {
            rtt
        } else {
            // Blend the stored value, not `current`: `current` is already decayed by `w`.
            let w = self.weight(now);
            self.rtt_nanos * w + rtt * (1.0 - w)
        };
        self.stamp = self.stamp.max(now);
    }

    /// The estimate as of `now`, decayed toward zero since the last sample.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.decayed(now) as u64)
    }

    /// What sending one more request here costs: estimate (ns) × (requests in flight + 1),
    /// so a fast but busy endpoint is charged for the queueing it is about to add.
    pub fn cost(&self, now: Instant, in_flight: usize) -> f64 {
        self.decayed(now) * (in_flight as f64 + 1.0)
    }

    /// exp(-elapsed/decay): how much of the old estimate survives until `now`.
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(self.stamp));
        (-elapsed / self.decay_nanos).exp()
    }

    fn decayed(&self, now: Instant) -> f64 {
        (self.rtt_nanos * self.weight(now)).max(0.0)
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn approx(actual: Duration, expected_ms: f64) {
        let a = actual.as_secs_f64() * 1000.0;
        assert!(
            (a - expected_ms).abs() < 0.01,
            "{a} ms, expected {expected_ms} ms"
        );
    }

    #[test]
    fn starts_at_the_seed_and_costs_scale_with_in_flight() {
        let t0 = Instant::now();
        let e = PeakEwma::new(DEFAULT_RTT, DECAY, t0);
        assert_eq!(e.estimate(t0), ms(30));
        assert_eq!(e.cost(t0, 0), 30e6);
        assert_eq!(e.cost(t0, 3), 120e6);
    }

    #[test]
    fn a_slow_sample_replaces_the_estimate_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_RTT, DECAY, t0);
        e.observe(ms(200), t0 + ms(1));
        assert_eq!(e.estimate(t0 + ms(1)), ms(200));
    }

    #[test]
    fn a_fast_sample_moves_it_by_elapsed_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(ms(100), DECAY, t0);
        // No time passed: weight 0, the fast sample changes nothing.
        e.observe(ms(10), t0);
        assert_eq!(e.estimate(t0), ms(100));
        // One time constant later: pulled from 100 toward 10 with weight 1 - 1/e (as
        // tower's PeakEwma: the stored value is blended, not its decayed reading).
        let t1 = t0 + DECAY;
        e.observe(ms(10), t1);
        let w = (-1.0f64).exp();
        approx(e.estimate(t1), 100.0 * w + 10.0 * (1.0 - w));
        // After a long silence, a sample is taken almost as is.
        let t2 = t1 + DECAY * 100;
        e.observe(ms(10), t2);
        approx(e.estimate(t2), 10.0);
    }

    #[test]
    fn steady_samples_hold_the_estimate_and_the_seed_is_forgotten() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(ms(1), DECAY, t0);
        for i in 1..=1000 {
            e.observe(ms(5), t0 + ms(i));
        }
        assert_eq!(e.estimate(t0 + ms(1000)), ms(5));
        // A fast endpoint starting from the 30 ms seed forgets it with the time constant:
        // after 3 of them (samples every 10 ms for 30 s) 5% of the difference is left.
        let mut e = PeakEwma::new(DEFAULT_RTT, DECAY, t0);
        for i in 1..=3000 {
            e.observe(ms(5), t0 + ms(10 * i));
        }
        approx(e.estimate(t0 + ms(30_000)), 5.0 + 25.0 * (-3.0f64).exp());
    }

    #[test]
    fn decays_toward_zero_without_samples_and_never_below() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_RTT, DECAY, t0);
        e.observe(ms(200), t0);
        approx(e.estimate(t0 + DECAY), 200.0 * (-1.0f64).exp());
        assert!(e.estimate(t0 + DECAY * 3) < ms(10));
        assert_eq!(
            e.estimate(t0 + Duration::from_secs(1_000_000)),
            Duration::ZERO
        );
        assert_eq!(e.cost(t0 + Duration::from_secs(1_000_000), 5), 0.0);
    }

    #[test]
    fn degenerate_inputs_do_not_break_it() {
        let t0 = Instant::now();
        // Zero decay: every sample replaces the estimate, no NaN.
        let mut e = PeakEwma::new(ms(50), Duration::ZERO, t0);
        e.observe(ms(5), t0 + ms(1));
        assert_eq!(e.estimate(t0 + ms(1)), ms(5));
        // A `now` older than the last sample: no time passed, no panic.
        let mut e = PeakEwma::new(ms(50), DECAY, t0 + ms(10));
        e.observe(ms(20), t0);
        assert_eq!(e.estimate(t0), ms(50));
        e.observe(ms(80), t0);
        assert_eq!(e.estimate(t0 + ms(10)), ms(80));
    }
}
