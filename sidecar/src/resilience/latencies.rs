//! Recent response times of one service, to answer "what is its p95 now?" (the hedge delay
//! `p95`: hedge only the slowest 5%, whatever the service's normal speed).
//!
//! Why buckets of atomics: every answer records a sample, so recording must not lock; a
//! percentile is read once per hedged request. Buckets grow by 25% from 100 µs (about 12%
//! error either way, plenty for a hedge delay) up to minutes. Two windows of 10 s take turns,
//! so a percentile covers the last 10 to 20 s and an old regime is forgotten. Counts from a
//! window being cleared while another thread records into it may be off by a few samples:
//! good enough for a delay, and never unsafe.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BUCKETS: usize = 64;
const FIRST: Duration = Duration::from_micros(100);
const GROWTH: f64 = 1.25;
/// The length of one of the two windows.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Recent response times, in two alternating windows of bucket counts.
#[derive(Debug)]
pub struct Latencies {
    origin: Instant,
    /// The window number (time since `origin` / `WINDOW`) that `counts[n % 2]` holds.
    current: AtomicU64,
    counts: [[AtomicU32; BUCKETS]; 2],
}

impl Latencies {
    pub fn new(now: Instant) -> Self {
        Latencies {
            origin: now,
            current: AtomicU64::new(0),
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU32::new(0))),
        }
    }

    fn window(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / WINDOW.as_nanos()) as u64
    }

    /// Moves to the window of `now`, clearing what it will reuse.
    fn advance(&self, now: Instant) -> u64 {
        let window = self.window(now);
        let current = self.current.load(Ordering::Acquire);
        if window > current
            && self
                .current
                .compare_exchange(current, window, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The slot `window` reuses held window - 2 (stale); if more than one window
            // passed, the other slot is stale too.
            let stale: &[u64] = if window - current > 1 {
                &[0, 1]
            } else {
                &[window % 2][..]
            };
            for &slot in stale {
                for count in &self.counts[slot as usize] {
                    count.store(0, Ordering::Relaxed);
                }
            }
        }
        window
    }

    /// Records one response time.
    pub fn record(&self, rtt: Duration, now: Instant) {
        let window = self.advance(now);
        self.counts[(window % 2) as usize][bucket(rtt)].fetch_add(1, Ordering::Relaxed);
    }

    /// The response time below which `per_mille`/1000 of the recent samples fell (the
    /// upper edge of its bucket), or `None` with fewer than `min_samples` samples.
    pub fn percentile(&self, per_mille: u16, min_samples: u64, now: Instant) -> Option<Duration> {
        self.advance(now);
        let mut merged = [0u64; BUCKETS];
        for slot in &self.counts {
            for (i, count) in slot.iter().enumerate() {
                merged[i] += u64::from(count.load(Ordering::Relaxed));
            }
        }
        let total: u64 = merged.iter().sum();
        if total < min_samples.max(1) {
            return None;
        }
        let rank = (total * u64::from(per_mille.min(1000)))
            .div_ceil(1000)
            .max(1);
        let mut seen = 0;
        for (i, count) in merged.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(upper_edge(i));
            }
        }
        Some(upper_edge(BUCKETS - 1))
    }
}

fn bucket(rtt: Duration) -> usize {
    if rtt <= FIRST {
        return 0;
    }
    let ratio = rtt.as_secs_f64() / FIRST.as_secs_f64();
    ((ratio.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
}

/// The largest response time bucket `i` holds.
fn upper_edge(i: usize) -> Duration {
    FIRST.mul_f64(GROWTH.powi(i as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(actual: Duration, expected: Duration) {
        let ratio = actual.as_secs_f64() / expected.as_secs_f64();
        assert!(
            (1.0..=GROWTH + 1e-9).contains(&ratio),
            "{actual:?} is not within one bucket above {expected:?}"
        );
    }

    #[test]
    fn a_bucket_holds_everything_up_to_its_edge() {
        for rtt in [
            Duration::ZERO,
            FIRST,
            ms(1),
            ms(7),
            ms(200),
            Duration::from_secs(3),
        ] {
            let i = bucket(rtt);
            assert!(rtt <= upper_edge(i), "{rtt:?}");
            if i > 0 {
                assert!(rtt > upper_edge(i - 1), "{rtt:?}");
            }
        }
        assert_eq!(bucket(Duration::from_secs(100_000)), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_a_known_spread() {
        let t0 = Instant::now();
        let l = Latencies::new(t0);
        assert_eq!(l.percentile(950, 20, t0), None, "no samples yet");
        // 95 fast answers at 2 ms, 5 slow ones at 300 ms.
        for i in 0..100 {
            let rtt = if i < 95 { ms(2) } else { ms(300) };
            l.record(rtt, t0 + ms(i));
        }
        let now = t0 + ms(100);
        close(l.percentile(500, 20, now).unwrap(), ms(2));
        close(l.percentile(950, 20, now).unwrap(), ms(2));
        close(l.percentile(960, 20, now).unwrap(), ms(300));
        close(l.percentile(999, 20, now).unwrap(), ms(300));
        assert_eq!(l.percentile(950, 101, now), None, "too few samples");
    }

    #[test]
    fn old_windows_are_forgotten() {
        let t0 = Instant::now();
        let l = Latencies::new(t0);
        for _ in 0..50 {
            l.record(ms(100), t0);
        }
        // The next window still sees the last one.
        for _ in 0..50 {
            l.record(ms(1), t0 + WINDOW);
        }
        close(l.percentile(900, 20, t0 + WINDOW).unwrap(), ms(100));
        // Two windows on, the 100 ms regime is gone.
        for _ in 0..50 {
            l.record(ms(1), t0 + WINDOW * 2);
        }
        close(l.percentile(999, 20, t0 + WINDOW * 2).unwrap(), ms(1));
        // A long silence forgets everything.
        assert_eq!(l.percentile(500, 1, t0 + WINDOW * 10), None);
    }
}
