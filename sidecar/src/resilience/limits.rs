//! Concurrency limit per upstream service (Envoy's circuit-breaker thresholds): past it, fail
//! fast with 503 `overloaded` rather than queue without bound.
//!
//! Only the concurrency half is here. Pending requests (waiting for a ready endpoint or a
//! connection) are not queued by this type: to bound them, hold a permit of a second
//! `ConcurrencyLimit` (sized `max_pending`) while waiting. A real FIFO queue with wake-ups
//! is a follow-up if fairness between waiters turns out to matter.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most `max` requests at once, counted with atomics: no lock on the hot path. The limit
/// can be changed in place (a policy update) without losing the in-flight count.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    max: AtomicUsize,
    in_flight: Arc<AtomicUsize>,
}

/// Returned when the limit is reached: answer 503 `sinew-error: overloaded` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("overloaded: the concurrency limit is reached")]
pub struct Overloaded;

/// One admitted request; dropping it (however the request ends) frees the slot.
#[derive(Debug)]
#[must_use = "the slot is freed as soon as the permit is dropped"]
pub struct Permit {
    in_flight: Arc<AtomicUsize>,
}

impl ConcurrencyLimit {
    /// A limit of `max` concurrent requests; 0 refuses everything.
    pub fn new(max: usize) -> Self {
        ConcurrencyLimit {
            max: AtomicUsize::new(max),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Admits one request if fewer than `max` are in flight, else fails fast.
    pub fn try_acquire(&self) -> Result<Permit, Overloaded> {
        let max = self.max.load(Ordering::Relaxed);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Permit {
                in_flight: self.in_flight.clone(),
            })
            .map_err(|_| Overloaded)
    }

    /// Changes the limit; permits already out stay valid (lowering it only refuses new ones
    /// until enough finish).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The current limit, for the admin view.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Requests admitted and not yet finished, for a gauge.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn refuses_past_the_limit_and_frees_on_drop() {
        let limit = ConcurrencyLimit::new(2);
        let a = limit.try_acquire().unwrap();
        let b = limit.try_acquire().unwrap();
        assert_eq!(limit.try_acquire().unwrap_err(), Overloaded);
        assert_eq!(limit.in_flight(), 2);
        drop(a);
        assert_eq!(limit.in_flight(), 1);
        let c = limit.try_acquire().unwrap();
        drop((b, c));
        assert_eq!(limit.in_flight(), 0);
        assert!(ConcurrencyLimit::new(0).try_acquire().is_err());
    }

    #[test]
    fn a_permit_outlives_the_borrow_and_lowering_the_limit_keeps_it() {
        let limit = ConcurrencyLimit::new(3);
        let permits: Vec<Permit> = (0..3).map(|_| limit.try_acquire().unwrap()).collect();
        limit.set_max(1);
        assert_eq!(limit.max(), 1);
        assert!(limit.try_acquire().is_err());
        let mut permits = permits.into_iter();
        drop(permits.next());
        drop(permits.next());
        assert!(limit.try_acquire().is_err(), "still one in flight");
        drop(permits);
        let p = limit.try_acquire().unwrap();
        assert_eq!(limit.in_flight(), 1);
        drop(p);
    }

    #[test]
    fn never_exceeded_under_contention() {
        let limit = Arc::new(ConcurrencyLimit::new(3));
        let over = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (limit, over, admitted) = (limit.clone(), over.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Ok(permit) = limit.try_acquire() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            if limit.in_flight() > 3 {
                                over.store(true, Ordering::Relaxed);
                            }
                            std::hint::black_box(&permit);
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(!over.load(Ordering::Relaxed));
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(limit.in_flight(), 0);
    }
}
