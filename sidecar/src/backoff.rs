//! Exponential backoff with jitter, for reconnecting to the control plane.

use std::time::Duration;

/// Doubles from `base` up to `max`. Each delay is drawn from the upper half of the current
/// step ("equal jitter"): spread enough that sidecars do not reconnect in lockstep, never so
/// short that a dead control plane is hammered.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay; `unit` is a random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        step.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let highs: Vec<Duration> = (0..12).map(|_| b.next_delay(0.999_999)).collect();
        assert!(highs[0] <= Duration::from_millis(100));
        assert!(highs[1] > Duration::from_millis(190) && highs[1] <= Duration::from_millis(200));
        assert!(highs[11] <= Duration::from_secs(30) && highs[11] > Duration::from_secs(29));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        for _ in 0..100 {
            b.next_delay(0.5);
        }
        assert_eq!(b.next_delay(0.0), Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }
}
