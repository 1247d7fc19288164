//! Mutual TLS between sidecars, with SPIFFE identities.
//!
//! Every sidecar holds a certificate of the mesh CA whose only name is a URI SAN
//! `spiffe://<trust-domain>/svc/<service>`. Both sides check the chain against the mesh CA.
//! Peers are dialled by IP address, which such a certificate does not name, so the client's
//! verifier checks the chain only; the caller then compares the peer's SPIFFE id with the one
//! the control plane announced for that endpoint ([`spiffe_id`]), and the server reads the
//! caller's id once per connection.
//!
//! The certificate is renewed while the sidecar runs (`crate::renewal`), so neither config
//! holds it: both resolve it through [`CurrentCert`] at each handshake. A renewal swaps it
//! there, the next handshake presents the new one, and connections made before keep going
//! (TLS checks a certificate only during the handshake).

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::Arc;
use std::time::Duration;

pub const ALPN: &[u8] = b"sinew/1";

/// A sidecar's certificate, key, and the mesh CA that vouches for its peers.
#[derive(Debug)]
pub struct MeshIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
    pub spiffe_id: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<RootCertStore, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(roots)
}

/// Settings for long-lived connections between sidecars: keep-alive so idle pools survive
/// NATs and peers notice death, bounded receive windows so memory per connection stays
/// bounded, and `incoming_streams`: how many streams the peer may have open at once (the
/// inbound's per-connection limit, far above quinn's default of 100; none for a client, since
/// only callers open streams).
fn transport_config(incoming_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(incoming_streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(2 << 20));
    t.receive_window(quinn::VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    Arc::new(t)
}

/// The certificate and key this sidecar presents, as both QUIC server and client; swapped
/// in place when the certificate is renewed.
#[derive(Debug)]
pub struct CurrentCert(ArcSwap<CertifiedKey>);

impl CurrentCert {
    pub fn new(id: &MeshIdentity) -> Result<Arc<CurrentCert>, rustls::Error> {
        Ok(Arc::new(CurrentCert(ArcSwap::from_pointee(certified(id)?))))
    }

    /// Presents `id` from the next handshake on. Fails (keeping the current one) when the
    /// key does not match the certificate.
    pub fn replace(&self, id: &MeshIdentity) -> Result<(), rustls::Error> {
        self.0.store(Arc::new(certified(id)?));
        Ok(())
    }

    /// The end-entity certificate presented now.
    pub fn end_entity(&self) -> Option<CertificateDer<'static>> {
        self.0.load().cert.first().cloned()
    }
}

fn certified(id: &MeshIdentity) -> Result<CertifiedKey, rustls::Error> {
    CertifiedKey::from_der(id.chain.clone(), id.key.clone_key(), &provider())
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The QUIC client configuration: present the current certificate, trust only the mesh CA.
pub fn client_config(
    ca: &CertificateDer<'static>,
    cert: Arc<CurrentCert>,
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(MeshServerVerifier {
        roots: roots(ca)?,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(0));
    Ok(config)
}

/// The QUIC server configuration: present the current certificate, require a client
/// certificate of the mesh CA; a peer connection may hold `max_streams` requests at once.
pub fn server_config(
    ca: &CertificateDer<'static>,
    cert: Arc<CurrentCert>,
    max_streams: u32,
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(max_streams));
    Ok(config)
}

/// Checks the server's chain against the mesh CA, but not a DNS name (see the module doc).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if spiffe_id(end_entity).is_none() {
            return Err(rustls::Error::General(
                "peer certificate has no spiffe:// URI SAN".into(),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used in the mesh".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The `spiffe://` URI SAN of a certificate, if it has one.
pub fn spiffe_id(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some(uri.to_string())
        }
        _ => None,
    })
}

/// The SPIFFE id of the peer of an established connection.
pub fn peer_spiffe_id(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    spiffe_id(chain.first()?)
}

/// `spiffe://sinew.local/svc/web` -> `web`.
pub fn service_of(spiffe_id: &str) -> Option<&str> {
    spiffe_id
        .strip_prefix("spiffe://")?
        .split_once("/svc/")
        .map(|(_, service)| service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_of_spiffe_ids() {
        assert_eq!(service_of("spiffe://sinew.local/svc/web"), Some("web"));
        assert_eq!(service_of("spiffe://sinew.local/ns/x"), None);
        assert_eq!(service_of("https://x/svc/web"), None);
    }
}
