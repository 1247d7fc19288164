//! This sidecar's certificate. The control plane is the mesh CA: the sidecar proves itself
//! with the join token, sends a CSR, and receives a certificate for
//! `spiffe://<trust-domain>/svc/<service>`. The certificate, its key and the CA are cached in
//! the data dir (mode 0600, in a 0700 dir) so a restart serves without the control plane
//! while the cached certificate is valid; `crate::renewal` renews it before it expires (at
//! once, when the cache has less than 30% of its life left).

use crate::backoff::Backoff;
use crate::config::Config;
use crate::renewal::Validity;
use crate::transport::tls::MeshIdentity;
use anyhow::{Context, anyhow};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sinew_proto::v1::CertificateRequest;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Issued {
    service: String,
    certificate_pem: String,
    key_pem: String,
    ca_pem: String,
    spiffe_id: String,
    not_after_unix: i64,
}

/// What others may know of the certificate presented now: for `/ready`, the metrics and the
/// control plane's `sinewctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub validity: Validity,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
}

/// A certificate with its key, and what it says about itself.
#[derive(Debug)]
pub struct Held {
    pub identity: MeshIdentity,
    pub info: CertificateInfo,
}

fn cache_path(config: &Config) -> PathBuf {
    config.data_dir.join("identity.json")
}

/// The cached certificate if it has not expired, else one from the control plane (retrying
/// every configured address with backoff until one answers).
pub async fn obtain(config: &Config) -> anyhow::Result<Held> {
    let path = cache_path(config);
    let now_ms = crate::renewal::unix_ms();
    let cached = load(&path).and_then(|cached| match cached {
        Some(issued) if issued.service == config.service => issued.to_held().map(Some),
        _ => Ok(None),
    });
    match cached {
        Ok(Some(held)) if !held.info.validity.is_expired(now_ms) => {
            tracing::info!(
                id = %held.identity.spiffe_id,
                not_after = held.info.validity.not_after_unix,
                "using the cached certificate"
            );
            return Ok(held);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("ignoring the cached certificate: {e:#}"),
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        match issue(config).await {
            Ok(held) => return Ok(held),
            Err(e) => tracing::warn!("{e:#}"),
        }
        tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
    }
}

/// One attempt at a new certificate: asks each control-plane address in turn until one
/// issues it, caches it, and returns it. The error names every address's failure.
pub async fn issue(config: &Config) -> anyhow::Result<Held> {
    let mut failures = Vec::new();
    for addr in &config.control {
        match request(config, addr)
            .await
            .and_then(|i| Ok((i.to_held()?, i)))
        {
            Ok((held, issued)) => {
                if let Err(e) = save(&cache_path(config), &issued) {
                    tracing::warn!("could not cache the certificate: {e:#}");
                }
                tracing::info!(
                    id = %issued.spiffe_id,
                    serial = %held.info.serial,
                    not_after = held.info.validity.not_after_unix,
                    "certificate issued"
                );
                return Ok(held);
            }
            Err(e) => failures.push(format!("{addr}: {e:#}")),
        }
    }
    Err(anyhow!("no certificate: {}", failures.join("; ")))
}

async fn request(config: &Config, addr: &str) -> anyhow::Result<Issued> {
    let token = std::fs::read_to_string(&config.join_token_file).with_context(|| {
        format!(
            "reading the join token {}",
            config.join_token_file.display()
        )
    })?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .context("connecting to the control plane")?;
    let response = SidecarApiClient::new(channel)
        .issue_certificate(CertificateRequest {
            join_token: token.trim().to_string(),
            service: config.service.clone(),
            csr_pem: csr,
        })
        .await
        .map_err(|status| anyhow!("{}: {}", status.code(), status.message()))?
        .into_inner();
    Ok(Issued {
        service: config.service.clone(),
        certificate_pem: response.certificate_pem,
        key_pem: key.serialize_pem(),
        ca_pem: response.ca_pem,
        spiffe_id: response.spiffe_id,
        not_after_unix: response.not_after_unix,
    })
}

impl Issued {
    fn to_held(&self) -> anyhow::Result<Held> {
        let chain = CertificateDer::pem_slice_iter(self.certificate_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("certificate PEM")?;
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).context("CA PEM")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("key PEM")?;
        let leaf = chain
            .first()
            .ok_or_else(|| anyhow!("the control plane sent no certificate"))?;
        let info = certificate_info(leaf)?;
        Ok(Held {
            identity: MeshIdentity {
                chain,
                key,
                ca,
                spiffe_id: self.spiffe_id.clone(),
            },
            info,
        })
    }
}

/// The validity and serial of a certificate, read from the certificate itself.
pub fn certificate_info(der: &CertificateDer<'_>) -> anyhow::Result<CertificateInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow!("the certificate does not parse: {e}"))?;
    let validity = cert.validity();
    Ok(CertificateInfo {
        validity: Validity {
            not_before_unix: validity.not_before.timestamp(),
            not_after_unix: validity.not_after.timestamp(),
        },
        serial: cert.raw_serial_as_string().replace(':', ""),
    })
}

fn load(path: &Path) -> anyhow::Result<Option<Issued>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes the cache (it holds the private key) readable by its owner only.
fn save(path: &Path, issued: &Issued) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // `mode` applies only to a new file; a leftover temporary keeps its own.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(&serde_json::to_vec(issued)?)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)?;
    Ok(())
}
