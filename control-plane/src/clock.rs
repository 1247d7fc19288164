//! Wall-clock time as unix milliseconds.
//!
//! The bookkeeping (leases, record retention) is plain code that takes `now` as an argument,
//! so tests step time by hand; only the async layer reads the clock, through this one function.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch (0 if the system clock is before 1970).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
