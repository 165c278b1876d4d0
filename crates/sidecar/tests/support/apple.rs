//! Apple's public test vectors (read from ../shared at test time) and certificate chains and JWS made
//! on the spot, to sign notifications the way the App Store does.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use rcgen::{BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair};

/// `../shared/fixtures/apple` beside the project (or `$STORERELAY_APPLE_FIXTURES`, for a checkout that
/// lives elsewhere). Missing fixtures fail the test under CI and skip it elsewhere.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("STORERELAY_APPLE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/apple"));
    if dir.join("README.md").exists() {
        return Some(dir);
    }
    assert!(std::env::var_os("CI").is_none(), "Apple's test vectors are missing at {}", dir.display());
    eprintln!("skipping: Apple's test vectors are not at {}", dir.display());
    None
}

pub fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    storerelay_sidecar::verify::certificate_der(pem).expect("PEM body")
}

/// Apple's test leaf key (SEC1 PEM) as a signing key.
pub fn sec1_key(pem: &[u8]) -> SigningKey {
    let secret = p256::SecretKey::from_sec1_pem(&String::from_utf8_lossy(pem)).expect("SEC1 EC key");
    SigningKey::from(secret)
}

/// A compact JWS: base64url(header).base64url(payload).base64url(ES256 r||s).
pub fn sign_jws(header: &serde_json::Value, payload: &str, key: &SigningKey) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(payload));
    let signature: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

pub fn header(chain: &[&[u8]]) -> serde_json::Value {
    serde_json::json!({"alg": "ES256", "x5c": chain.iter().map(|der| STANDARD.encode(der)).collect::<Vec<_>>()})
}

pub fn body(jws: &str) -> Vec<u8> {
    format!("{{\"signedPayload\":\"{jws}\"}}").into_bytes()
}

pub fn payload(uuid: &str, environment: &str, bundle: &str, signed_date_ms: i64) -> String {
    serde_json::json!({
        "notificationType": "DID_RENEW",
        "subtype": "BILLING_RECOVERY",
        "notificationUUID": uuid,
        "version": "2.0",
        "signedDate": signed_date_ms,
        "data": {"environment": environment, "bundleId": bundle, "appAppleId": 1234, "signedTransactionInfo": "x"},
        "someFieldAppleAddsLater": {"nested": true}
    })
    .to_string()
}

/// A root, an intermediate and a leaf made for one test, with Apple's OIDs where Apple puts them.
pub struct Chain {
    pub root: Vec<u8>,
    pub intermediate: Vec<u8>,
    pub leaf: Vec<u8>,
    pub leaf_key: SigningKey,
}

pub struct ChainOptions {
    pub leaf_expired: bool,
    pub leaf_oid: bool,
    pub intermediate_oid: bool,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions { leaf_expired: false, leaf_oid: true, intermediate_oid: true }
    }
}

const WWDR_OID: &[u64] = &[1, 2, 840, 113635, 100, 6, 2, 1];
const RECEIPT_SIGNER_OID: &[u64] = &[1, 2, 840, 113635, 100, 6, 11, 1];

fn params(name: &str, ca: bool) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    params
}

impl Chain {
    pub fn generate(options: ChainOptions) -> Chain {
        let root_key = KeyPair::generate().expect("key");
        let root_params = params("storerelay test root", true);
        let root = root_params.self_signed(&root_key).expect("root");

        let intermediate_key = KeyPair::generate().expect("key");
        let mut intermediate_params = params("storerelay test intermediate", true);
        if options.intermediate_oid {
            intermediate_params.custom_extensions.push(CustomExtension::from_oid_content(WWDR_OID, vec![0x05, 0x00]));
        }
        let intermediate = intermediate_params
            .signed_by(&intermediate_key, &Issuer::from_params(&root_params, &root_key))
            .expect("int");

        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf_params = params("storerelay test leaf", false);
        if options.leaf_expired {
            leaf_params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        if options.leaf_oid {
            leaf_params.custom_extensions.push(CustomExtension::from_oid_content(RECEIPT_SIGNER_OID, vec![0x05, 0x00]));
        }
        let leaf = leaf_params
            .signed_by(&leaf_key, &Issuer::from_params(&intermediate_params, &intermediate_key))
            .expect("leaf");
        Chain {
            root: root.der().to_vec(),
            intermediate: intermediate.der().to_vec(),
            leaf: leaf.der().to_vec(),
            leaf_key: SigningKey::from_pkcs8_pem(&leaf_key.serialize_pem()).expect("pkcs8"),
        }
    }

    pub fn x5c(&self) -> serde_json::Value {
        header(&[&self.leaf, &self.intermediate, &self.root])
    }
}
