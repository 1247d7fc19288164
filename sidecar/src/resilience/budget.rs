//! Finagle-style retry budget over a sliding window of per-second buckets.

use std::time::{Duration, Instant};

/// Default share of the request rate that retries may add (Finagle's and the 20%).
pub const DEFAULT_RATIO: f64 = 0.2;
/// Default retries per second allowed whatever the traffic, so a quiet service can still
/// retry its rare failure.
pub const DEFAULT_MIN_PER_SECOND: u32 = 10;
/// Default window: long enough to smooth bursts, short enough that a spent budget refills
/// within seconds.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// Bounds retries (and hedges) to `ratio × requests + min_per_second × window_secs` within
/// the sliding window as of each retry, so a full outage adds at most that much load instead
/// of multiplying it by the number of attempts. At a steady rate the total over a long run is
/// `ratio × requests + min_per_second × seconds`; a burst at a window's edge can shift up to
/// one window's worth of allowance into the next.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    /// counts[0]: original requests, counts[1]: retries.
    window: Window,
}

impl RetryBudget {
    /// `ratio` is clamped to ≥ 0 (NaN counts as 0); a zero `window` counts as 1 ms.
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        RetryBudget {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            min_per_second,
            window: Window::new(window),
        }
    }

    /// Records one original request (not a retry): each earns `ratio` of a retry.
    pub fn deposit(&mut self, now: Instant) {
        self.window.add(now, [1, 0]);
    }

    /// Spends one retry (or hedge) if the window still allows one; `false` means do not retry.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let [requests, retries] = self.window.totals(now);
        let allowance = self.ratio * requests as f64
            + f64::from(self.min_per_second) * self.window.length().as_secs_f64();
        // The epsilon absorbs float rounding (0.29 × 100 = 28.999…).
        if retries as f64 + 1.0 <= allowance + 1e-9 {
            self.window.add(now, [0, 1]);
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(DEFAULT_RATIO, DEFAULT_MIN_PER_SECOND, DEFAULT_WINDOW)
    }
}

/// Two counters over a sliding window of buckets (one per second, or narrower for a window
/// under a few seconds). Shared with the outlier's success-rate window. The clock starts at
/// the first event; a `now` older than the newest seen counts as the newest bucket.
#[derive(Debug, Clone)]
pub(super) struct Window {
    length: Duration,
    width_nanos: u128,
    buckets: Vec<Bucket>,
    epoch: Option<Instant>,
    latest: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    counts: [u64; 2],
}

impl Window {
    pub(super) fn new(length: Duration) -> Self {
        let length = length.max(Duration::from_millis(1));
        let n = length.as_nanos().div_ceil(1_000_000_000).clamp(1, 3600);
        Window {
            length,
            width_nanos: (length.as_nanos() / n).max(1),
            buckets: vec![Bucket::default(); n as usize],
            epoch: None,
            latest: 0,
        }
    }

    pub(super) fn length(&self) -> Duration {
        self.length
    }

    fn slot(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        let slot = now.saturating_duration_since(epoch).as_nanos() / self.width_nanos;
        self.latest = self.latest.max(u64::try_from(slot).unwrap_or(u64::MAX));
        self.latest
    }

    pub(super) fn add(&mut self, now: Instant, counts: [u64; 2]) {
        let slot = self.slot(now);
        let n = self.buckets.len() as u64;
        if let Some(b) = self.buckets.get_mut((slot % n) as usize) {
            if b.slot != slot {
                *b = Bucket {
                    slot,
                    counts: [0, 0],
                };
            }
            b.counts[0] = b.counts[0].saturating_add(counts[0]);
            b.counts[1] = b.counts[1].saturating_add(counts[1]);
        }
    }

    /// Both counters summed over the buckets still inside the window as of `now`.
    pub(super) fn totals(&mut self, now: Instant) -> [u64; 2] {
        let slot = self.slot(now);
        let n = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot) < n)
            .fold([0, 0], |[a, b], x| {
                [a.saturating_add(x.counts[0]), b.saturating_add(x.counts[1])]
            })
    }

    pub(super) fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| b.counts = [0, 0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &mut RetryBudget, now: Instant) -> u64 {
        (0..100_000).take_while(|_| b.try_withdraw(now)).count() as u64
    }

    #[test]
    fn ratio_and_floor_are_exact() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.2, 0, DEFAULT_WINDOW);
        (0..10).for_each(|_| b.deposit(t0));
        assert_eq!(drain(&mut b, t0), 2);
        let mut b = RetryBudget::new(0.0, 10, DEFAULT_WINDOW);
        assert_eq!(drain(&mut b, t0), 100);
        // The floor comes back once the spent retries leave the window.
        assert_eq!(drain(&mut b, t0 + Duration::from_millis(9_999)), 0);
        assert_eq!(drain(&mut b, t0 + DEFAULT_WINDOW), 100);
    }

    #[test]
    fn old_deposits_expire() {
        let t0 = Instant::now();
        let mut b = RetryBudget::default();
        (0..1000).for_each(|_| b.deposit(t0));
        assert_eq!(drain(&mut b, t0 + DEFAULT_WINDOW), 100);
    }

    /// Every request fails and wants up to 3 retries. Checks at each granted retry that the
    /// last 10 one-second buckets hold at most 0.2 × their requests + 10 × 10 retries.
    /// Returns (requests, retries).
    fn outage(rate_of_second: impl Fn(usize) -> u32, seconds: usize) -> (u64, u64) {
        let t0 = Instant::now();
        let mut b = RetryBudget::default();
        let (mut requests, mut retries) = (vec![0u64; seconds], vec![0u64; seconds]);
        for s in 0..seconds {
            let rate = rate_of_second(s);
            for i in 0..rate {
                let now = t0 + Duration::from_secs(s as u64) + Duration::from_secs(1) * i / rate;
                b.deposit(now);
                requests[s] += 1;
                for _ in 0..3 {
                    if !b.try_withdraw(now) {
                        break;
                    }
                    retries[s] += 1;
                    let from = s.saturating_sub(9);
                    let window_requests: u64 = requests[from..=s].iter().sum();
                    let window_retries: u64 = retries[from..=s].iter().sum();
                    assert!(window_retries as f64 <= 0.2 * window_requests as f64 + 100.0);
                }
            }
        }
        (requests.iter().sum(), retries.iter().sum())
    }

    #[test]
    fn a_steady_outage_gets_ratio_times_requests_plus_the_floor() {
        // 100 rps for 60 s: 6000 requests may buy 0.2 × 6000 + 10 × 60 = 1800 retries. At
        // the end of each aligned window of 10 s (the last bucket has requests) the sliding
        // window is exactly that window, so each window's retries are within its allowance of
        // 300, and spent to within one retry. Six windows: within six of the bound.
        let (requests, retries) = outage(|_| 100, 60);
        assert_eq!(requests, 6000);
        assert!((1800 - 6..=1800).contains(&retries), "{retries}");
    }

    #[test]
    fn a_bursty_outage_never_exceeds_the_budget_in_any_window() {
        let (requests, retries) = outage(|s| [500, 0, 0, 50, 1000, 3][s % 6], 120);
        assert!(requests > 0 && retries > 0);
    }
}
