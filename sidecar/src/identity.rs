//! This sidecar's certificate. The control plane is the mesh CA: the sidecar proves itself
//! with the join token, sends a CSR, and receives a certificate for
//! `spiffe://<trust-domain>/svc/<service>`. The certificate, its key and the CA are cached in
//! the data dir (mode 0600) so a restart works without the control plane until it expires.

use crate::backoff::Backoff;
use crate::config::Config;
use crate::transport::tls::MeshIdentity;
use anyhow::{Context, anyhow};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sinew_proto::v1::CertificateRequest;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Issued {
    service: String,
    certificate_pem: String,
    key_pem: String,
    ca_pem: String,
    spiffe_id: String,
    not_after_unix: i64,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn cache_path(config: &Config) -> PathBuf {
    config.data_dir.join("identity.json")
}

/// A cached certificate if one is valid for at least another minute, else one from the
/// control plane (retrying every configured address with backoff until one answers).
pub async fn obtain(config: &Config) -> anyhow::Result<MeshIdentity> {
    let path = cache_path(config);
    match load(&path) {
        Ok(Some(issued))
            if issued.service == config.service && issued.not_after_unix > now_unix() + 60 =>
        {
            tracing::info!(id = %issued.spiffe_id, "using the cached certificate");
            return issued.to_identity();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("ignoring the cached certificate: {e:#}"),
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        for addr in &config.control {
            match request(config, addr).await {
                Ok(issued) => {
                    if let Err(e) = save(&path, &issued) {
                        tracing::warn!("could not cache the certificate: {e:#}");
                    }
                    tracing::info!(id = %issued.spiffe_id, "certificate issued");
                    return issued.to_identity();
                }
                Err(e) => tracing::warn!("certificate from {addr}: {e:#}"),
            }
        }
        tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
    }
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
    fn to_identity(&self) -> anyhow::Result<MeshIdentity> {
        let chain = CertificateDer::pem_slice_iter(self.certificate_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("certificate PEM")?;
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).context("CA PEM")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("key PEM")?;
        if chain.is_empty() {
            return Err(anyhow!("the control plane sent no certificate"));
        }
        Ok(MeshIdentity {
            chain,
            key,
            ca,
            spiffe_id: self.spiffe_id.clone(),
        })
    }
}

fn load(path: &Path) -> anyhow::Result<Option<Issued>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn save(path: &Path, issued: &Issued) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(issued)?)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)?;
    Ok(())
}
