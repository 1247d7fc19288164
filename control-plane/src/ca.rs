//! The mesh certificate authority.
//!
//! Created on first start and kept in the store, so certificates issued before a restart
//! stay valid after it. A sidecar proves it may join with the join token and sends a CSR; the
//! CA takes only the public key from it and decides everything else itself: exactly one URI
//! SAN, `spiffe://<trust-domain>/svc/<service>`, a short lifetime, and the key usages of a
//! TLS client and server. Whatever subject or SANs the CSR asks for are ignored, so a leaked
//! join token cannot mint a certificate for a DNS name or for another trust domain.

use crate::snapshot::spiffe_id;
use crate::store::Store;
use crate::tokens::random_bytes;
use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::ops::Add;
use std::time::Duration;

/// How long a new CA certificate is valid, unless `--ca-lifetime` says otherwise.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates are valid from a little before now, to tolerate clock skew: a minute,
/// or a tenth of the lifetime when that is shorter (so that sidecars, which renew at 70% of
/// the whole validity, do not find a seconds-long certificate already due).
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
}

/// A certificate issued to one sidecar.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub spiffe_id: String,
    pub not_after_unix: i64,
}

pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    trust_domain: String,
    lifetime: Duration,
    /// The CA certificate's validity, unix seconds: no certificate outlives it.
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Loads the CA from the store, or creates and stores a new one valid for `ca_lifetime`
    /// (default [`CA_LIFETIME`]). A stored CA keeps its own lifetime: `ca_lifetime` is then
    /// ignored, with a warning.
    pub fn load_or_create(
        store: &Store,
        trust_domain: &str,
        lifetime: Duration,
        ca_lifetime: Option<Duration>,
        now_unix: i64,
    ) -> anyhow::Result<MeshCa> {
        let (cert_pem, key_pem) = match store.ca()? {
            Some(pair) => {
                if ca_lifetime.is_some() {
                    tracing::warn!(
                        "--ca-lifetime applies only to a new CA; the stored CA keeps its own"
                    );
                }
                pair
            }
            None => {
                let (cert_pem, key_pem) =
                    create(trust_domain, ca_lifetime.unwrap_or(CA_LIFETIME), now_unix)?;
                store.put_ca(&cert_pem, &key_pem)?;
                tracing::info!("created a new mesh CA");
                (cert_pem, key_pem)
            }
        };
        let key = KeyPair::from_pem(&key_pem).context("the stored CA key is unreadable")?;
        let (not_before_unix, not_after_unix) =
            validity_of(&cert_pem).context("the stored CA certificate is unreadable")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .context("the stored CA certificate is unreadable")?;
        Ok(MeshCa {
            issuer,
            ca_pem: cert_pem,
            trust_domain: trust_domain.to_string(),
            lifetime,
            not_before_unix,
            not_after_unix,
        })
    }

    /// The CA certificate, PEM: what sidecars trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a certificate for an instance of `service` (already validated) to the public
    /// key of `csr_pem`.
    pub fn issue(&self, service: &str, csr_pem: &str, now_unix: i64) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let id = spiffe_id(&self.trust_domain, service);
        let uri = id
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = random_serial();
        let backdate = BACKDATE.min(self.lifetime / 10).as_secs() as i64;
        let not_before = now_unix.saturating_sub(backdate);
        let not_after = now_unix
            .saturating_add(i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX))
            .min(self.not_after_unix);
        if not_after <= now_unix {
            return Err(CaError::Sign(format!(
                "the mesh CA expired at {} (unix); it cannot issue certificates",
                self.not_after_unix
            )));
        }
        params.not_before = at_unix(rcgen::date_time_ymd(1970, 1, 1), not_before)?;
        params.not_after = at_unix(rcgen::date_time_ymd(1970, 1, 1), not_after)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            spiffe_id: id,
            not_after_unix: not_after,
        })
    }
}

/// A PEM certificate's (not_before, not_after), unix seconds.
pub fn validity_of(cert_pem: &str) -> anyhow::Result<(i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// A new self-signed CA: (certificate PEM, key PEM). ECDSA P-256 with ring.
fn create(
    trust_domain: &str,
    lifetime: Duration,
    now_unix: i64,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sinew");
    dn.push(
        DnType::CommonName,
        format!("Sinew mesh CA ({trust_domain})"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = random_serial();
    params.not_before = at_unix(
        rcgen::date_time_ymd(1970, 1, 1),
        now_unix.saturating_sub(BACKDATE.as_secs() as i64),
    )?;
    params.not_after = at_unix(
        rcgen::date_time_ymd(1970, 1, 1),
        now_unix.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
    )?;
    let cert = params
        .self_signed(&key)
        .context("cannot self-sign the CA certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A random positive 16-byte serial (rcgen's default derives it from the key, so a renewal
/// with the same key would repeat it). `None` falls back to that default.
fn random_serial() -> Option<SerialNumber> {
    let mut bytes = random_bytes(16).ok()?;
    if let Some(first) = bytes.first_mut() {
        *first &= 0x7f;
        *first |= 0x01;
    }
    Some(SerialNumber::from_slice(&bytes))
}

/// The last second of year 9999: rcgen's date type cannot go past it.
const MAX_UNIX: i64 = 253_402_300_799;

/// A unix time as the date type rcgen takes, built from rcgen's own epoch constructor (which
/// spares a direct dependency on `time`). Times outside 1970..=9999 are refused rather than
/// left to overflow.
fn at_unix<T: Add<Duration, Output = T>>(epoch: T, secs: i64) -> Result<T, CaError> {
    if !(0..=MAX_UNIX).contains(&secs) {
        return Err(CaError::Sign(format!("time {secs} (unix) is out of range")));
    }
    Ok(epoch + Duration::from_secs(secs.unsigned_abs()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ca() -> (MeshCa, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "sinew-ca-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("control.redb")).unwrap();
        let ca = MeshCa::load_or_create(
            &store,
            "sinew.local",
            Duration::from_secs(3600),
            None,
            1_700_000_000,
        )
        .unwrap();
        (ca, dir)
    }

    #[test]
    fn issues_a_spiffe_certificate_whatever_the_csr_asks() {
        let (ca, dir) = ca();
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        asked.distinguished_name.push(DnType::CommonName, "admin");
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.issue("orders", &csr, 1_700_000_000).unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://sinew.local/svc/orders");
        assert_eq!(issued.not_after_unix, 1_700_003_600);
        assert!(
            issued
                .certificate_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(!issued.certificate_pem.contains("evil"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn no_certificate_outlives_the_ca_and_short_ones_are_barely_backdated() {
        let dir = std::env::temp_dir().join(format!(
            "sinew-ca-short-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("control.redb")).unwrap();
        let now = 1_700_000_000;
        let ca = MeshCa::load_or_create(
            &store,
            "sinew.local",
            Duration::from_secs(20),
            Some(Duration::from_secs(600)),
            now,
        )
        .unwrap();
        assert_eq!(
            (ca.not_before_unix, ca.not_after_unix),
            (now - 60, now + 600)
        );
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = ca.issue("orders", &csr, now).unwrap();
        assert_eq!(issued.not_after_unix, now + 20);
        let (not_before, not_after) = validity_of(&issued.certificate_pem).unwrap();
        assert_eq!(
            (not_before, not_after),
            (now - 2, now + 20),
            "backdated a tenth of 20 s"
        );
        // Near the CA's end, certificates end with it; after it, none are issued.
        let late = ca.issue("orders", &csr, now + 590).unwrap();
        assert_eq!(late.not_after_unix, now + 600);
        assert!(ca.issue("orders", &csr, now + 600).is_err());
        // A stored CA keeps its lifetime whatever the flag says now.
        let again = MeshCa::load_or_create(
            &store,
            "sinew.local",
            Duration::from_secs(20),
            Some(Duration::from_secs(9999)),
            now + 5,
        )
        .unwrap();
        assert_eq!(again.not_after_unix, now + 600);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bad_csr_is_refused_with_the_reason() {
        let (ca, dir) = ca();
        let err = ca.issue("orders", "not a csr", 1_700_000_000).unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn out_of_range_times_are_errors_not_panics() {
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        assert!(at_unix(epoch, -1).is_err());
        assert!(at_unix(epoch, i64::MAX).is_err());
        assert!(at_unix(epoch, MAX_UNIX).is_ok());
    }
}
