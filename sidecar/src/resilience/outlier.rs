//! Per-endpoint outlier ejection (Envoy outlier detection, Linkerd failure accrual).

use super::budget::Window;
pub use super::{Ejection, OutlierConfig, Reason, State};
use std::time::{Duration, Instant};

/// Ready(since), Ejected(until, length), Probing(rearm, length): `rearm` is when a probe
/// whose answer never came may be replaced (None: never).
#[derive(Debug, Clone, Copy)]
enum Phase {
    Ready(Instant),
    Ejected(Instant, Duration),
    Probing(Option<Instant>, Duration),
}

/// The health verdict for one endpoint, fed every result of a request sent to it.
#[derive(Debug, Clone)]
pub struct Outlier {
    phase: Phase,
    consecutive: u32,
    ejections: u32,
    /// counts[0]: successes, counts[1]: failures.
    window: Window,
}

impl Outlier {
    /// A healthy endpoint, first seen at `now`.
    pub fn new(now: Instant) -> Self {
        Outlier {
            phase: Phase::Ready(now),
            consecutive: 0,
            ejections: 0,
            window: Window::new(OutlierConfig::default().success_rate_window),
        }
    }

    /// Where the endpoint stands. The first call after an ejection runs out returns `Probe`
    /// and the caller must send it a request; later calls return `ProbeInFlight` until a
    /// result arrives. A probe whose result never comes (cancelled, lost) does not strand the
    /// endpoint: after another ejection length (at least 1 s), `Probe` is returned again.
    pub fn state(&mut self, now: Instant) -> State {
        match self.phase {
            Phase::Ready(_) => State::Ready,
            Phase::Ejected(until, _) if now < until => State::Ejected { until },
            Phase::Probing(rearm, _) if rearm.is_none_or(|t| now < t) => State::ProbeInFlight,
            Phase::Ejected(_, length) | Phase::Probing(_, length) => {
                let rearm = now.checked_add(length.max(Duration::from_secs(1)));
                self.phase = Phase::Probing(rearm, length);
                State::Probe
            }
        }
    }

    /// Feeds the result of one request; returns the ejection it caused, if any. While
    /// ejected, results are ignored (late answers, or panic-mode traffic the balancer sent
    /// anyway). While probing, any result is taken as the probe's: success makes the endpoint
    /// ready; failure ejects it again, for longer. `random_unit` in [0, 1) draws the jitter.
    pub fn on_result(
        &mut self,
        ok: bool,
        now: Instant,
        config: &OutlierConfig,
        random_unit: f64,
    ) -> Option<Ejection> {
        let reason = match self.phase {
            Phase::Ejected(..) => return None,
            Phase::Probing(..) if ok => {
                self.phase = Phase::Ready(now);
                return None;
            }
            Phase::Probing(..) => Reason::ProbeFailed,
            Phase::Ready(since) => {
                if now.saturating_duration_since(since) >= config.max_ejection {
                    self.ejections = 0;
                }
                self.accrue(ok, now, config)?
            }
        };
        Some(self.eject(reason, now, config, random_unit))
    }

    /// Whether the endpoint is plainly ready: not ejected, no probe pending or out. Only
    /// [`Outlier::on_result`] moves it in or out of this phase.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    /// Ejections since the endpoint was last healthy for `max_ejection`, for the admin view.
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Counts a result of a ready endpoint; returns the trigger it fires, if any.
    fn accrue(&mut self, ok: bool, now: Instant, c: &OutlierConfig) -> Option<Reason> {
        if self.window.length() != c.success_rate_window {
            self.window = Window::new(c.success_rate_window);
        }
        self.window.add(now, if ok { [1, 0] } else { [0, 1] });
        let streak = self.consecutive.saturating_add(1);
        self.consecutive = if ok { 0 } else { streak };
        let [successes, failures] = self.window.totals(now);
        let total = successes.saturating_add(failures);
        if c.consecutive_failures > 0 && self.consecutive >= c.consecutive_failures {
            Some(Reason::ConsecutiveFailures)
        } else {
            let volume = total > 0 && total >= u64::from(c.success_rate_min_requests);
            let ratio = failures as f64 / total.max(1) as f64;
            (volume && ratio > c.success_rate_threshold).then_some(Reason::SuccessRate)
        }
    }

    /// base × 2^(ejections − 1), capped at max, then ± jitter: after the cap, so that
    /// endpoints ejected at the cap still come back spread out.
    fn eject(&mut self, reason: Reason, now: Instant, c: &OutlierConfig, unit: f64) -> Ejection {
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive = 0;
        self.window.clear();
        let doubling = 1u32.checked_shl(self.ejections - 1).unwrap_or(u32::MAX);
        let step = c.base_ejection.saturating_mul(doubling).min(c.max_ejection);
        let factor = 1.0 + unit_or(c.jitter, 0.0) * (2.0 * unit_or(unit, 0.5) - 1.0);
        let duration = Duration::try_from_secs_f64(step.as_secs_f64() * factor).unwrap_or(step);
        let until = now.checked_add(duration).unwrap_or(now);
        self.phase = Phase::Ejected(until, duration);
        let count = self.ejections;
        Ejection {
            reason,
            until,
            duration,
            count,
        }
    }
}

/// `x` clamped to [0, 1], or `default` when it is NaN.
fn unit_or(x: f64, default: f64) -> f64 {
    if x.is_nan() {
        default
    } else {
        x.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Feeds `n` equal results at `now`; returns the last one's ejection.
    fn feed(o: &mut Outlier, ok: bool, now: Instant, n: u32, unit: f64) -> Option<Ejection> {
        let c = OutlierConfig::default();
        (0..n).fold(None, |_, _| o.on_result(ok, now, &c, unit))
    }

    /// Ejects with `n` failures at `now`, checks the length, probes at the end of it.
    fn eject_and_probe(o: &mut Outlier, now: Instant, n: u32, secs: u32) -> Instant {
        let e = feed(o, false, now, n, 0.5).unwrap();
        assert_eq!(e.duration, S * secs);
        assert_eq!(
            o.state(e.until - S / 1000),
            State::Ejected { until: e.until }
        );
        assert_eq!(o.state(e.until), State::Probe);
        e.until
    }

    #[test]
    fn consecutive_failures_eject_then_a_single_probe_brings_it_back() {
        let t0 = Instant::now();
        let mut o = Outlier::new(t0);
        assert_eq!(feed(&mut o, false, t0, 4, 0.5), None);
        assert_eq!(
            feed(&mut o, true, t0, 1, 0.5),
            None,
            "a success resets the streak"
        );
        assert_eq!(feed(&mut o, false, t0, 4, 0.5), None);
        assert_eq!(o.state(t0), State::Ready);
        let e = feed(&mut o, false, t0, 1, 0.5).unwrap();
        assert_eq!(
            (e.reason, e.until, e.count),
            (Reason::ConsecutiveFailures, t0 + 5 * S, 1)
        );
        assert_eq!(
            feed(&mut o, false, t0 + S, 9, 0.5),
            None,
            "ignored while ejected"
        );
        assert_eq!(o.state(t0 + 5 * S), State::Probe);
        // One probe only until its result; one whose result never comes is re-armed 5 s later.
        for i in 0..10 {
            let state = o.state(t0 + 5 * S + S / 2 * i);
            assert!(state == State::ProbeInFlight && !state.is_available());
        }
        assert_eq!(o.state(t0 + 10 * S), State::Probe);
        assert_eq!(o.state(t0 + 10 * S), State::ProbeInFlight);
        assert_eq!(feed(&mut o, true, t0 + 11 * S, 1, 0.5), None);
        assert_eq!(o.state(t0 + 11 * S), State::Ready);
    }

    #[test]
    fn failed_probes_double_the_ejection_to_the_cap_and_health_resets_it() {
        let t0 = Instant::now();
        let mut o = Outlier::new(t0);
        let mut now = eject_and_probe(&mut o, t0, 5, 5);
        for secs in [10, 20, 40, 60, 60] {
            let e = feed(&mut o, false, now, 1, 0.5).unwrap();
            assert_eq!((e.reason, e.duration), (Reason::ProbeFailed, S * secs));
            assert_eq!(o.state(e.until), State::Probe);
            now = e.until;
        }
        // ±10% jitter, at the cap too.
        let low = feed(&mut o, false, now, 1, 0.0).unwrap();
        assert_eq!((low.duration, low.count), (S * 54, 7));
        assert_eq!(o.state(low.until), State::Probe);
        assert_eq!(
            feed(&mut o, false, low.until, 1, 1.0).unwrap().duration,
            S * 66
        );
        // Back, then failing again soon: 2× base; after staying healthy 60 s: base again.
        let mut o = Outlier::new(t0);
        let t1 = eject_and_probe(&mut o, t0, 5, 5);
        assert_eq!(feed(&mut o, true, t1, 1, 0.5), None);
        let t2 = eject_and_probe(&mut o, t1 + S, 5, 10);
        assert_eq!(feed(&mut o, true, t2, 1, 0.5), None);
        eject_and_probe(&mut o, t2 + 60 * S, 5, 5);
        assert_eq!(o.ejections(), 1);
    }

    #[test]
    fn a_bad_success_rate_ejects_past_the_minimum_volume() {
        let (t0, c) = (Instant::now(), OutlierConfig::default());
        let mut o = Outlier::new(t0);
        // Half failing is not above the threshold, and never five in a row.
        for i in 0..100 {
            assert_eq!(o.on_result(i % 2 == 0, t0 + S / 10 * i, &c, 0.5), None);
        }
        // Two of three failing: ejected at the 20th result of the window, not before.
        let t1 = t0 + 20 * S;
        let ejected: Vec<u32> = (0..30)
            .filter(|i| o.on_result(i % 3 == 2, t1, &c, 0.5).is_some())
            .collect();
        assert_eq!(ejected, [19]);
        // Failures older than the window do not count.
        let mut o = Outlier::new(t0);
        (0..19).for_each(|i| assert_eq!(o.on_result(i % 3 == 2, t0, &c, 0.5), None));
        assert_eq!(feed(&mut o, false, t0 + 10 * S, 1, 0.5), None);
    }
}
