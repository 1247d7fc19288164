//! A raw QUIC client of the mesh's inbound, for tests that speak the framing themselves (as a
//! peer with or without a mesh certificate, or as an attacker would).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;

/// Trusts any server (these clients test whether the *server* accepts *them*), and keeps the
/// certificate it last presented, for tests that look at what a sidecar serves.
#[derive(Debug, Default)]
pub struct AnyServer {
    presented: std::sync::Mutex<Option<Vec<u8>>>,
}

impl AnyServer {
    /// The DER of the last certificate a server presented, taken.
    pub fn presented(&self) -> Option<Vec<u8>> {
        self.presented.lock().unwrap().take()
    }
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.presented.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client endpoint on loopback speaking Sinew's ALPN, presenting `client_cert` if given.
pub fn client_endpoint(
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> quinn::Endpoint {
    client_endpoint_with(Arc::new(AnyServer::default()), client_cert)
}

/// [`client_endpoint`] with a verifier the caller keeps, to see what the server presented.
pub fn client_endpoint_with(
    verifier: Arc<AnyServer>,
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> quinn::Endpoint {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(verifier);
    let mut tls = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"sinew/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// The certificate and key a sidecar obtained from the control plane (cached in its data dir):
/// a real mesh identity, as a peer that holds one (or stole one) would use it.
pub fn mesh_credentials(
    sidecar_data_dir: &Path,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let text = std::fs::read_to_string(sidecar_data_dir.join("identity.json")).unwrap();
    let issued: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cert =
        CertificateDer::from_pem_slice(issued["certificate_pem"].as_str().unwrap().as_bytes())
            .unwrap();
    let key =
        PrivateKeyDer::from_pem_slice(issued["key_pem"].as_str().unwrap().as_bytes()).unwrap();
    (cert, key)
}
