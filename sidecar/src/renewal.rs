//! Renewing this sidecar's certificate before it expires.
//!
//! Certificates are short-lived (24 h by default) so a stolen key is worth little for long;
//! the price is that every sidecar must renew, forever, without a failed request. When:
//! at about 70% of the lifetime, the point drawn within ±10% of it (63%–77%) so sidecars
//! started together do not all ask the control plane at once ([`renew_in`], a pure function
//! of the validity, `now` and a random number). A cached certificate with less than 30% of
//! its life left is renewed at start. What is left after 70% is the margin for a control
//! plane that is down: a failed renewal is retried with backoff (`crate::backoff`, 1 s
//! doubling to 30 s, never sleeping more than a quarter of the time left, nor more than 5 s
//! once expired), and the old certificate keeps serving meanwhile. Should it expire without a successor, `/ready` says
//! so (peers refuse an expired certificate at the handshake).
//!
//! A new certificate goes into [`CurrentCert`]: the next QUIC handshake, in either direction,
//! presents it; connections opened before keep going until they close.

use crate::backoff::Backoff;
use crate::config::Config;
use crate::identity::{self, CertificateInfo};
use crate::state::Shared;
use crate::transport::tls::CurrentCert;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Renew at this fraction of the lifetime...
pub const RENEW_AT: f64 = 0.7;
/// ...give or take this fraction of it (63%–77%).
pub const JITTER: f64 = 0.1;
/// A certificate with less than this fraction of its life left is renewed at once (at start,
/// a cached one).
pub const RENEW_NOW_BELOW: f64 = 0.3;

pub const RENEWALS: &str = "sinew_certificate_renewals_total";
pub const FAILURES: &str = "sinew_certificate_renewal_failures_total";
pub const EXPIRY: &str = "sinew_certificate_expiry_timestamp_seconds";

/// HELP text of the renewal metrics, and the counters at 0 from the start.
pub fn describe() {
    metrics::describe_counter!(
        RENEWALS,
        "Certificates renewed (replaced before expiry, including at start)."
    );
    metrics::describe_counter!(
        FAILURES,
        "Failed renewal attempts (each is retried with backoff)."
    );
    metrics::describe_gauge!(
        EXPIRY,
        "When the certificate this sidecar presents expires (unix seconds)."
    );
    metrics::counter!(RENEWALS).increment(0);
    metrics::counter!(FAILURES).increment(0);
}

/// When a certificate is valid: [not_before, not_after], unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl Validity {
    fn lifetime_ms(&self) -> i64 {
        (self.not_after_unix - self.not_before_unix).max(0) * 1000
    }

    /// The fraction of its lifetime left at `now_ms`: 1 before it starts, 0 once expired.
    pub fn life_left(&self, now_ms: i64) -> f64 {
        let life = self.lifetime_ms();
        if life == 0 {
            return 0.0;
        }
        let left = self.not_after_unix * 1000 - now_ms;
        (left as f64 / life as f64).clamp(0.0, 1.0)
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        now_ms >= self.not_after_unix * 1000
    }
}

/// How long to wait before renewing a certificate of `validity` at `now_ms`: until
/// [`RENEW_AT`] ± [`JITTER`] of its lifetime (`unit`, a random number in [0, 1), picks the
/// point), and zero when less than [`RENEW_NOW_BELOW`] of it is left.
pub fn renew_in(validity: Validity, now_ms: i64, unit: f64) -> Duration {
    if validity.life_left(now_ms) < RENEW_NOW_BELOW {
        return Duration::ZERO;
    }
    let fraction = RENEW_AT + JITTER * RENEW_AT * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    let at =
        validity.not_before_unix * 1000 + (validity.lifetime_ms() as f64 * fraction).round() as i64;
    Duration::from_millis(u64::try_from(at - now_ms).unwrap_or(0))
}

/// After a failed attempt on an expired certificate, retry at least this often: the
/// sidecar is of no use to its peers until it has a new one.
pub const EXPIRED_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long to wait after a failed attempt: the backoff's delay, but at most a quarter of
/// the time left (at least 1 s), so a short-lived certificate is retried before it ends,
/// and at most [`EXPIRED_RETRY_MAX`] once it has.
pub fn retry_in(backoff_delay: Duration, validity: Validity, now_ms: i64) -> Duration {
    let left = u64::try_from(validity.not_after_unix * 1000 - now_ms).unwrap_or(0);
    if left == 0 {
        return backoff_delay.min(EXPIRED_RETRY_MAX);
    }
    backoff_delay
        .min(Duration::from_millis(left / 4))
        .max(Duration::from_secs(1))
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Makes `info` the certificate others see: `/ready`, the expiry gauge, the control plane.
pub fn publish(shared: &Shared, info: CertificateInfo) {
    metrics::gauge!(EXPIRY).set(info.validity.not_after_unix as f64);
    shared.certificate.send_replace(Some(info));
}

/// Renews the certificate in `current` until shutdown. `ca` is the CA peers trust: a
/// certificate of another CA would be refused by them, so it is not installed (CA rotation
/// is not supported yet; the error says so).
pub async fn run(
    config: Config,
    shared: Arc<Shared>,
    current: Arc<CurrentCert>,
    ca: CertificateDer<'static>,
    mut validity: Validity,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut wait = renew_in(validity, unix_ms(), fastrand::f64());
    loop {
        if !wait.is_zero() {
            tracing::debug!(?wait, "next certificate renewal");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = crate::state::shutdown_begun(&mut shutdown) => return,
        }
        let attempt = identity::issue(&config).await.and_then(|held| {
            if held.identity.ca != ca {
                anyhow::bail!(
                    "the control plane answered with a certificate of another CA; peers would \
                     refuse it (restart this sidecar to trust the new CA)"
                );
            }
            current.replace(&held.identity)?;
            Ok(held.info)
        });
        match attempt {
            Ok(info) => {
                metrics::counter!(RENEWALS).increment(1);
                tracing::info!(
                    serial = %info.serial,
                    not_after = info.validity.not_after_unix,
                    "certificate renewed"
                );
                validity = info.validity;
                publish(&shared, info);
                backoff.reset();
                wait = renew_in(validity, unix_ms(), fastrand::f64());
            }
            Err(e) => {
                metrics::counter!(FAILURES).increment(1);
                let now = unix_ms();
                wait = retry_in(backoff.next_delay(fastrand::f64()), validity, now);
                if validity.is_expired(now) {
                    tracing::error!(
                        "certificate expired, renewal failed: {e:#}; retrying in {wait:?}"
                    );
                } else {
                    tracing::warn!("certificate renewal failed: {e:#}; retrying in {wait:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1000 s of life starting at 1_000_000 s.
    const V: Validity = Validity {
        not_before_unix: 1_000_000,
        not_after_unix: 1_001_000,
    };
    const START_MS: i64 = 1_000_000_000;

    #[test]
    fn renews_at_seventy_percent_with_ten_percent_jitter() {
        assert_eq!(renew_in(V, START_MS, 0.5), Duration::from_secs(700));
        assert_eq!(renew_in(V, START_MS, 0.0), Duration::from_secs(630));
        assert_eq!(renew_in(V, START_MS, 1.0), Duration::from_secs(770));
        // Out-of-range randomness is clamped, not trusted.
        assert_eq!(renew_in(V, START_MS, 7.0), Duration::from_secs(770));
        // Later, the wait is what remains until the same point.
        assert_eq!(
            renew_in(V, START_MS + 600_000, 0.5),
            Duration::from_secs(100)
        );
    }

    #[test]
    fn less_than_thirty_percent_left_renews_now() {
        // 69% of the life gone: 31% left, the usual schedule (jitter may still say "now").
        assert_eq!(
            renew_in(V, START_MS + 690_000, 0.5),
            Duration::from_secs(10)
        );
        assert_eq!(renew_in(V, START_MS + 690_000, 0.0), Duration::ZERO);
        // 71% gone: at once, whatever the jitter drew.
        assert_eq!(renew_in(V, START_MS + 710_000, 1.0), Duration::ZERO);
        // Expired, or a nonsense validity: at once.
        assert_eq!(renew_in(V, START_MS + 5_000_000, 1.0), Duration::ZERO);
        let empty = Validity {
            not_before_unix: 5,
            not_after_unix: 5,
        };
        assert_eq!(renew_in(empty, 0, 0.5), Duration::ZERO);
    }

    #[test]
    fn life_left_and_expiry() {
        assert_eq!(V.life_left(START_MS - 1), 1.0);
        assert!((V.life_left(START_MS + 250_000) - 0.75).abs() < 1e-9);
        assert_eq!(V.life_left(START_MS + 2_000_000), 0.0);
        assert!(!V.is_expired(1_000_999_999));
        assert!(V.is_expired(1_001_000_000));
    }

    #[test]
    fn retries_never_sleep_past_a_quarter_of_what_is_left() {
        let long = Duration::from_secs(30);
        // 400 s left: the backoff's 30 s stands.
        assert_eq!(retry_in(long, V, START_MS + 600_000), long);
        // 8 s left: 2 s; 2 s left: 1 s at the fastest.
        assert_eq!(
            retry_in(long, V, START_MS + 992_000),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_in(long, V, START_MS + 998_000),
            Duration::from_secs(1)
        );
        assert_eq!(
            retry_in(Duration::from_millis(10), V, START_MS),
            Duration::from_secs(1)
        );
        // Expired: the backoff, up to 5 s.
        assert_eq!(retry_in(long, V, START_MS + 2_000_000), EXPIRED_RETRY_MAX);
        assert_eq!(
            retry_in(Duration::from_secs(2), V, START_MS + 2_000_000),
            Duration::from_secs(2)
        );
    }
}
