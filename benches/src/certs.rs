//! Certificates for the peer proxies' mutual TLS: one CA, a server certificate for proxy B
//! and a client certificate for proxy A, both for `localhost` and 127.0.0.1.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use std::path::{Path, PathBuf};

/// PEM files in a directory.
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Certificate then key, for HAProxy's `crt`.
    pub server_bundle: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_bundle: PathBuf,
}

pub fn generate(dir: &Path) -> anyhow::Result<Certs> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sinew bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf("proxy-b", ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_cert, client_key) = leaf("proxy-a", ExtendedKeyUsagePurpose::ClientAuth)?;

    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    Ok(Certs {
        ca: write("ca.pem", &ca_cert.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server.key", &server_key)?,
        server_bundle: write("server-bundle.pem", &format!("{server_cert}{server_key}"))?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client.key", &client_key)?,
        client_bundle: write("client-bundle.pem", &format!("{client_cert}{client_key}"))?,
    })
}
