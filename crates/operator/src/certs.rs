//! The webhook's TLS: a CA and a serving certificate the operator makes itself (rcgen), and a rustls
//! certificate resolver that every replica swaps in place when the certificate changes, so rotation
//! needs no restart.

use std::io::ErrorKind;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// The CA lives ten years; serving certificates one, and are replaced 30 days before they expire.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A CA and a serving certificate signed by it, PEM encoded, with their expiry times (unix seconds).
#[derive(Clone, PartialEq, Eq)]
pub struct CertBundle {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_not_after: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle")
            .field("ca_not_after", &self.ca_not_after)
            .field("not_after", &self.not_after)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading a certificate or key: {0}")]
    Pem(String),
    #[error("the private key is not usable by rustls: {0}")]
    Key(#[from] rustls::Error),
}

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "storerelay-webhook-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + CA_VALIDITY;
    params
}

/// A new CA and serving certificate for the given DNS names and IP addresses.
pub fn generate(dns_names: &[String], ips: &[IpAddr], now: OffsetDateTime) -> Result<CertBundle, CertError> {
    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(now);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_not_after = ca_params.not_after.unix_timestamp();
    let serving = issue(&ca_params, &ca_key, dns_names, ips, now)?;
    Ok(CertBundle {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: serving.0,
        key_pem: serving.1,
        ca_not_after,
        not_after: (now + SERVING_VALIDITY).unix_timestamp(),
    })
}

/// A new serving certificate from the existing CA (the caBundle stays the same).
pub fn renew(
    bundle: &CertBundle,
    dns_names: &[String],
    ips: &[IpAddr],
    now: OffsetDateTime,
) -> Result<CertBundle, CertError> {
    let ca_key = KeyPair::from_pem(&bundle.ca_key_pem)?;
    let mut params = ca_params(now);
    params.not_after = OffsetDateTime::from_unix_timestamp(bundle.ca_not_after).unwrap_or(params.not_after);
    let (cert_pem, key_pem) = issue(&params, &ca_key, dns_names, ips, now)?;
    Ok(CertBundle { cert_pem, key_pem, not_after: (now + SERVING_VALIDITY).unix_timestamp(), ..bundle.clone() })
}

fn issue(
    ca_params: &CertificateParams,
    ca_key: &KeyPair,
    dns_names: &[String],
    ips: &[IpAddr],
    now: OffsetDateTime,
) -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, dns_names.first().cloned().unwrap_or_else(|| "storerelay-webhook".into()));
    params.subject_alt_names = dns_names
        .iter()
        .filter_map(|name| name.clone().try_into().ok().map(SanType::DnsName))
        .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
        .collect();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + SERVING_VALIDITY;
    let cert = params.signed_by(&key, &Issuer::from_params(ca_params, ca_key))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What to do with the certificate in store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertAction {
    Keep,
    /// New serving certificate, same CA.
    Renew,
    /// New CA and serving certificate (none yet, unreadable, or the CA itself is expiring).
    Regenerate,
}

pub fn plan(bundle: Option<&CertBundle>, now: OffsetDateTime) -> CertAction {
    let now = now.unix_timestamp();
    let margin = RENEW_BEFORE.as_secs() as i64;
    match bundle {
        None => CertAction::Regenerate,
        Some(b) if b.ca_not_after - now < 2 * margin => CertAction::Regenerate,
        Some(b) if b.not_after - now < margin => CertAction::Renew,
        Some(_) => CertAction::Keep,
    }
}

pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::Pem("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CertError::Pem(e.to_string()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// Serves whatever certificate was loaded last; `None` until the first one (handshakes then fail).
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    loaded_pem: RwLock<Option<String>>,
}

impl CertResolver {
    /// Loads a certificate and key unless they are the ones already in use. Returns whether it changed.
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> Result<bool, CertError> {
        let already = self.loaded_pem.read().map(|p| p.as_deref() == Some(cert_pem)).unwrap_or(false);
        if already {
            return Ok(false);
        }
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        if let Ok(mut current) = self.current.write() {
            *current = Some(key);
        }
        if let Ok(mut loaded) = self.loaded_pem.write() {
            *loaded = Some(cert_pem.to_string());
        }
        Ok(true)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Loads from files (cert-manager or any mounted certificate), for the `files` mode.
    pub fn load_files(&self, cert: &std::path::Path, key: &std::path::Path) -> Result<bool, CertError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| match e.kind() {
                ErrorKind::NotFound => CertError::Pem(format!("{} does not exist", path.display())),
                _ => CertError::Pem(format!("{}: {e}", path.display())),
            })
        };
        self.load(&read(cert)?, &read(key)?)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

/// The TLS settings for the webhook: HTTP/1.1, certificates from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| rustls::ServerConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS))
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_renew_under_the_same_ca() {
        let now = OffsetDateTime::now_utc();
        let names = vec!["storerelay-webhook.storerelay.svc".to_string()];
        let bundle = generate(&names, &["127.0.0.1".parse().unwrap()], now).unwrap();
        let resolver = CertResolver::default();
        assert!(resolver.load(&bundle.cert_pem, &bundle.key_pem).unwrap());
        assert!(!resolver.load(&bundle.cert_pem, &bundle.key_pem).unwrap(), "same certificate: no reload");
        let renewed = renew(&bundle, &names, &[], now).unwrap();
        assert_eq!(renewed.ca_cert_pem, bundle.ca_cert_pem);
        assert_ne!(renewed.cert_pem, bundle.cert_pem);
        assert!(resolver.load(&renewed.cert_pem, &renewed.key_pem).unwrap());
        assert!(format!("{bundle:?}").find("PRIVATE").is_none(), "keys never reach Debug output");
    }

    #[test]
    fn plans_renewal_well_before_expiry() {
        let now = OffsetDateTime::now_utc();
        let bundle = generate(&["x".into()], &[], now).unwrap();
        assert_eq!(plan(None, now), CertAction::Regenerate);
        assert_eq!(plan(Some(&bundle), now), CertAction::Keep);
        assert_eq!(plan(Some(&bundle), now + time::Duration::days(340)), CertAction::Renew);
        assert_eq!(plan(Some(&bundle), now + time::Duration::days(3600)), CertAction::Regenerate);
    }
}
