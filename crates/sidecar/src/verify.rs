//! Is this notification really from Apple, for our app, in an environment we take?
//!
//! V2 is checked the way Apple's own libraries do it: `alg` ES256, an `x5c` chain of three, the leaf
//! and intermediate validated against the configured roots at the notification's `signedDate` with
//! Apple's OIDs required (the maintained `app-store-server-library` chain verifier), then the ES256
//! signature with its crypto provider, then the allowlists. V1 carries no signature, only the app's
//! shared secret, compared in constant time.

use std::path::{Path, PathBuf};

use app_store_server_library::chain_verifier::ChainVerifier;
use app_store_server_library::crypto::{CryptoProvider, jws};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use storerelay_config::{Environment, NotificationVersion, VerifyConfig, VerifyMode};
use subtle::ConstantTimeEq;

use crate::apple::Notification;

/// The JWS header segment, base64url: Apple's (`alg` and an `x5c` of three certificates) is about 4 KB.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// An ES256 signature is 64 bytes, 86 characters of base64url.
const MAX_SIGNATURE_CHARS: usize = 128;

/// SHA-256 of Apple Root CA - G3, the production trust anchor.
pub const APPLE_ROOT_CA_G3_SHA256: &str = "63343abfb89a6a03ebb57e9b3f5fa7be7c4f5c756f3017b3a8c488c3653e9179";

/// Why a notification failed verification: the `reason` label of the rejected counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Signature,
    Chain,
    AppIdentity,
    Environment,
    V1Password,
    Malformed,
    /// Our own verification material (a root certificate, the V1 shared secret) is not mounted: the
    /// notification cannot be judged, which is no fault of the sender.
    Unavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Signature => "signature",
            Reason::Chain => "chain",
            Reason::AppIdentity => "app_identity",
            Reason::Environment => "environment",
            Reason::V1Password => "v1_password",
            Reason::Malformed => "malformed",
            Reason::Unavailable => "verify_unavailable",
        }
    }
}

pub struct Verifier {
    pub mode: VerifyMode,
    chain: Option<ChainVerifier>,
    /// The roots in use, by file: a reload that cannot read one keeps the copy it had.
    roots: Vec<(PathBuf, Vec<u8>)>,
    /// Root files that could not be read, with no earlier copy to use.
    missing_roots: Vec<CertificateError>,
    /// `v1PasswordFile` is configured but no password could be read (now or before).
    v1_password_missing: bool,
    bundle_ids: Vec<String>,
    app_apple_ids: Vec<i64>,
    environments: Vec<Environment>,
    v1_password: Option<String>,
    /// Whether one of the roots is Apple Root CA - G3 (false in tests with Apple's test CA).
    pub has_apple_root: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode)
            .field("has_apple_root", &self.has_apple_root)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier, reading the root certificates. `v1_password` is the resolved secret (from
    /// `v1Password` or `v1PasswordFile`). A root file that cannot be read keeps the copy `previous` had
    /// of it; without one it is reported by [`Verifier::missing`], and notifications that need it are
    /// answered [`Reason::Unavailable`] rather than refused, until a reload finds it.
    pub fn new(config: &VerifyConfig, v1_password: Option<String>, previous: Option<&Verifier>) -> Verifier {
        let mut roots = Vec::new();
        let mut missing_roots = Vec::new();
        for path in &config.root_certificates {
            match read_certificate(path) {
                Ok(der) => roots.push((path.clone(), der)),
                Err(problem) => match previous.and_then(|p| p.roots.iter().find(|(kept, _)| kept == path)) {
                    Some(kept) => roots.push(kept.clone()),
                    None => missing_roots.push(problem),
                },
            }
        }
        let has_apple_root = roots.iter().any(|(_, der)| hex(&Sha256::digest(der)) == APPLE_ROOT_CA_G3_SHA256);
        let chain = (!roots.is_empty()).then(|| ChainVerifier::new(roots.iter().map(|(_, der)| der.clone()).collect()));
        Verifier {
            mode: config.mode,
            chain,
            roots,
            missing_roots,
            v1_password_missing: config.v1_password_file.is_some() && v1_password.is_none(),
            bundle_ids: config.bundle_ids.clone(),
            app_apple_ids: config.app_apple_ids.clone(),
            environments: config.environments.clone(),
            v1_password,
            has_apple_root,
        }
    }

    /// The root certificates that could not be read (never a secret: paths and error kinds).
    pub fn missing(&self) -> Vec<String> {
        self.missing_roots.iter().map(ToString::to_string).collect()
    }

    /// Whether some notifications cannot be verified for want of our own files.
    pub fn lacks_material(&self) -> bool {
        !self.missing_roots.is_empty() || self.v1_password_missing
    }

    pub fn off() -> Verifier {
        Verifier {
            mode: VerifyMode::Off,
            chain: None,
            roots: Vec::new(),
            missing_roots: Vec::new(),
            v1_password_missing: false,
            bundle_ids: Vec::new(),
            app_apple_ids: Vec::new(),
            environments: Vec::new(),
            v1_password: None,
            has_apple_root: false,
        }
    }

    /// Checks a notification decoded from `body`; `Ok` when it passes every check that applies to its
    /// version.
    pub fn check(&self, notification: &Notification, body: &[u8]) -> Result<(), Reason> {
        match notification.version {
            Some(NotificationVersion::V2) => self.check_v2(notification, body)?,
            Some(NotificationVersion::V1) => self.check_v1(notification)?,
            // Nothing to verify in a body of unknown shape.
            None => return Err(Reason::Malformed),
        }
        self.check_allowlists(notification)
    }

    fn check_v2(&self, notification: &Notification, body: &[u8]) -> Result<(), Reason> {
        if notification.malformed.is_some() {
            return Err(Reason::Malformed);
        }
        let token = crate::apple::signed_payload(body).ok_or(Reason::Malformed)?;
        let token = token.as_ref();
        let (signing_input, signature) = token.rsplit_once('.').ok_or(Reason::Malformed)?;
        // Apple's header is three certificates (about 4 KB): a bigger one is not Apple's, and decoding it
        // into typed certificates would cost many times its size.
        if signing_input.split_once('.').is_none_or(|(header, _)| header.len() > MAX_HEADER_BYTES) {
            return Err(Reason::Malformed);
        }
        if signature.len() > MAX_SIGNATURE_CHARS {
            return Err(Reason::Signature);
        }
        let header = jws::decode_header(token).map_err(|_| Reason::Malformed)?;
        if header.alg.as_deref() != Some("ES256") {
            return Err(Reason::Signature);
        }
        let x5c = header.x5c.ok_or(Reason::Chain)?;
        if x5c.len() != 3 {
            return Err(Reason::Chain);
        }
        let certificates: Vec<Vec<u8>> =
            x5c.iter().map(|c| STANDARD.decode(c)).collect::<Result<_, _>>().map_err(|_| Reason::Chain)?;
        // A chain that does not lead to the roots we have may lead to one we could not read.
        let chain_failed = if self.missing_roots.is_empty() { Reason::Chain } else { Reason::Unavailable };
        let chain = self.chain.as_ref().ok_or(chain_failed)?;
        // As Apple's libraries do without online checks: validity at the time Apple signed it.
        let effective = notification
            .signed_date
            .map(|ms| (ms / 1000).max(0) as u64)
            .unwrap_or_else(|| crate::clock::now_ms() as u64 / 1000);
        let public_key =
            chain.verify(&certificates[0], &certificates[1], Some(effective), false).map_err(|_| chain_failed)?;

        let signature: [u8; 64] = jws::decode_signature_bytes(token)
            .map_err(|_| Reason::Signature)?
            .try_into()
            .map_err(|_| Reason::Signature)?;
        CryptoProvider::default_provider()
            .p256_signing
            .public_key(&public_key)
            .and_then(|key| key.is_valid_signature(&signature, signing_input.as_bytes()))
            .map_err(|_| Reason::Signature)
    }

    fn check_v1(&self, notification: &Notification) -> Result<(), Reason> {
        if self.v1_password_missing {
            return Err(Reason::Unavailable);
        }
        let (Some(expected), Some(given)) = (&self.v1_password, &notification.v1_password) else {
            return Err(Reason::V1Password);
        };
        if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) { Ok(()) } else { Err(Reason::V1Password) }
    }

    fn check_allowlists(&self, notification: &Notification) -> Result<(), Reason> {
        if !self.bundle_ids.is_empty() && !notification.bundle_id.as_ref().is_some_and(|b| self.bundle_ids.contains(b))
        {
            return Err(Reason::AppIdentity);
        }
        // V1 carries no appAppleId, so that allowlist applies to V2 only.
        if notification.version == Some(NotificationVersion::V2)
            && !self.app_apple_ids.is_empty()
            && !notification.app_apple_id.is_some_and(|id| self.app_apple_ids.contains(&id))
        {
            return Err(Reason::AppIdentity);
        }
        if !self.environments.is_empty() && !notification.environment.is_some_and(|e| self.environments.contains(&e)) {
            return Err(Reason::Environment);
        }
        Ok(())
    }
}

/// A certificate file, DER or PEM.
pub fn read_certificate(path: &Path) -> Result<Vec<u8>, CertificateError> {
    let bytes =
        std::fs::read(path).map_err(|e| CertificateError::Unreadable { path: path.to_path_buf(), kind: e.kind() })?;
    certificate_der(&bytes).ok_or_else(|| CertificateError::NotACertificate { path: path.to_path_buf() })
}

/// Why a root certificate in `verify.rootCertificates` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("verify.rootCertificates: cannot read {}: {kind}", path.display())]
    Unreadable { path: std::path::PathBuf, kind: std::io::ErrorKind },
    #[error("verify.rootCertificates: {} is neither a DER nor a PEM certificate", path.display())]
    NotACertificate { path: std::path::PathBuf },
}

/// The DER bytes of a certificate given as DER or PEM.
///
/// PEM files may carry explanatory text before the `BEGIN` line (RFC 7468 §5.2, and what
/// `openssl x509 -text` writes), so PEM is recognised anywhere in the file, not only at its start.
pub fn certificate_der(bytes: &[u8]) -> Option<Vec<u8>> {
    const PEM_MARKER: &[u8] = b"-----BEGIN";
    if bytes.windows(PEM_MARKER.len()).any(|w| w == PEM_MARKER) {
        return CertificateDer::from_pem_slice(bytes).ok().map(|c| c.to_vec());
    }
    // A DER certificate is an ASN.1 SEQUENCE.
    (bytes.first() == Some(&0x30)).then(|| bytes.to_vec())
}

pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A minimal DER SEQUENCE stands in for a certificate: only the framing is under test here.
    const DER: &[u8] = &[0x30, 0x03, 0x02, 0x01, 0x01];

    fn pem(der: &[u8]) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", STANDARD.encode(der))
    }

    #[test]
    fn der_and_pem_give_the_same_bytes() {
        assert_eq!(certificate_der(DER).as_deref(), Some(DER));
        assert_eq!(certificate_der(pem(DER).as_bytes()).as_deref(), Some(DER));
    }

    #[test]
    fn explanatory_text_before_the_pem_block_is_skipped() {
        let with_text = format!("Certificate:\n    Data:\n        Version: 3 (0x2)\n{}", pem(DER));
        assert_eq!(certificate_der(with_text.as_bytes()).as_deref(), Some(DER));
    }

    #[test]
    fn neither_der_nor_pem_is_refused() {
        assert_eq!(certificate_der(b"not a certificate"), None);
        assert_eq!(certificate_der(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"), None);
        assert_eq!(certificate_der(b""), None);
    }
}
