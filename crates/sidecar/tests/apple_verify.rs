//! Decoding and verification against Apple's public test vectors and against chains made in the test.

mod support;

use std::path::Path;

use app_store_server_library::chain_verifier::ChainVerifier;
use storerelay_config::{Environment, NotificationVersion, VerifyConfig, VerifyMode};
use storerelay_sidecar::apple::decode;
use storerelay_sidecar::verify::{APPLE_ROOT_CA_G3_SHA256, Reason, Verifier, fingerprint, read_certificate};
use support::apple::{Chain, ChainOptions, body, fixtures, header, payload, pem_to_der, read, sec1_key, sign_jws};

fn verifier(roots: &[&Path], configure: impl FnOnce(&mut VerifyConfig)) -> Verifier {
    let mut config = VerifyConfig {
        mode: VerifyMode::Enforce,
        root_certificates: roots.iter().map(|p| p.to_path_buf()).collect(),
        ..Default::default()
    };
    configure(&mut config);
    let verifier = Verifier::new(&config, None, None);
    assert_eq!(verifier.missing(), Vec::<String>::new(), "every root was read");
    verifier
}

fn check(verifier: &Verifier, body: &[u8]) -> Result<(), Reason> {
    verifier.check(&decode(body).expect("decodes"), body)
}

fn signed_fixture(dir: &Path, name: &str) -> Vec<u8> {
    body(String::from_utf8(read(dir.join("signed").join(name))).unwrap().trim())
}

#[test]
fn apples_test_notification_verifies_as_sandbox_only() {
    let Some(dir) = fixtures() else { return };
    let root = dir.join("certs/testCA.der");
    let test_notification = signed_fixture(&dir, "testNotification");

    let decoded = decode(&test_notification).unwrap();
    assert_eq!(decoded.version, Some(NotificationVersion::V2));
    assert_eq!(decoded.notification_type.as_deref(), Some("TEST"));
    assert_eq!(decoded.uuid.as_deref(), Some("9ad56bd2-0bc6-42e0-af24-fd996d87a1e6"));
    assert_eq!(decoded.environment, Some(Environment::Sandbox));
    assert_eq!(decoded.bundle_id.as_deref(), Some("com.example"));
    assert_eq!(decoded.app_apple_id, Some(1234));
    assert_eq!(decoded.signed_date, Some(1_681_314_324_000));

    let sandbox = verifier(&[&root], |c| {
        c.environments = vec![Environment::Sandbox];
        c.bundle_ids = vec!["com.example".into()];
        c.app_apple_ids = vec![1234];
    });
    assert_eq!(check(&sandbox, &test_notification), Ok(()));
    let production = verifier(&[&root], |c| c.environments = vec![Environment::Production]);
    assert_eq!(check(&production, &test_notification), Err(Reason::Environment));
    let other_app = verifier(&[&root], |c| c.bundle_ids = vec!["com.examplex".into()]);
    assert_eq!(check(&other_app, &test_notification), Err(Reason::AppIdentity));
    let other_apple_id = verifier(&[&root], |c| c.app_apple_ids = vec![9]);
    assert_eq!(check(&other_apple_id, &test_notification), Err(Reason::AppIdentity));
    // Trusting only the production root, Apple's test chain does not verify.
    let apple_root = verifier(&[&dir.join("AppleRootCA-G3.cer")], |_| {});
    assert_eq!(check(&apple_root, &test_notification), Err(Reason::Chain));
}

#[test]
fn wrong_bundle_and_missing_x5c_fail() {
    let Some(dir) = fixtures() else { return };
    let root = dir.join("certs/testCA.der");
    let for_com_example = verifier(&[&root], |c| c.bundle_ids = vec!["com.example".into()]);
    assert_eq!(check(&for_com_example, &signed_fixture(&dir, "wrongBundleId")), Err(Reason::AppIdentity));
    assert_eq!(check(&for_com_example, &signed_fixture(&dir, "missingX5CHeaderClaim")), Err(Reason::Chain));
}

#[test]
fn fresh_notifications_signed_with_apples_test_leaf_pass_and_bad_chains_fail() {
    let Some(dir) = fixtures() else { return };
    let root_path = dir.join("certs/testCA.der");
    let root = read(root_path.clone());
    let intermediate = pem_to_der(&read(dir.join("certs/testIntermediate.pem")));
    let leaf = pem_to_der(&read(dir.join("certs/testLeaf.pem")));
    let key = sec1_key(&read(dir.join("certs/testLeaf.key")));
    let verifier = verifier(&[&root_path], |_| {});
    // Inside the test chain's validity (2023-01-05..2033-01-01).
    let signed_date = 1_700_000_000_000;
    let claims = payload("fresh-1", "Sandbox", "com.example", signed_date);

    let good = sign_jws(&header(&[&leaf, &intermediate, &root]), &claims, &key);
    assert_eq!(check(&verifier, &body(&good)), Ok(()));

    let bad_leaf = pem_to_der(&read(dir.join("certs/testInvalidOIDLeaf.pem")));
    let jws = sign_jws(&header(&[&bad_leaf, &intermediate, &root]), &claims, &key);
    assert_eq!(check(&verifier, &body(&jws)), Err(Reason::Chain), "leaf without the receipt-signing OID");

    let bad_intermediate = pem_to_der(&read(dir.join("certs/testInvalidOIDIntermediate.pem")));
    let leaf_under_it = pem_to_der(&read(dir.join("certs/testInvalidIntermediateLeaf.pem")));
    let jws = sign_jws(&header(&[&leaf_under_it, &bad_intermediate, &root]), &claims, &key);
    assert_eq!(check(&verifier, &body(&jws)), Err(Reason::Chain), "intermediate without the WWDR OID");

    // Signed at a time outside the chain's validity.
    let late = payload("fresh-2", "Sandbox", "com.example", 2_000_000_000_000);
    let jws = sign_jws(&header(&[&leaf, &intermediate, &root]), &late, &key);
    assert_eq!(check(&verifier, &body(&jws)), Err(Reason::Chain), "verified at signedDate, after the chain expired");
}

#[test]
fn the_real_apple_chain_validates_against_apple_root_g3() {
    let Some(dir) = fixtures() else { return };
    let root = read_certificate(&dir.join("AppleRootCA-G3.cer")).unwrap();
    assert_eq!(fingerprint(&root), APPLE_ROOT_CA_G3_SHA256);
    let leaf = read(dir.join("real-chain/leaf.der"));
    let intermediate = read(dir.join("real-chain/intermediate.der"));
    let chain = ChainVerifier::new(vec![root]);
    assert!(chain.verify(&leaf, &intermediate, Some(1_761_962_975), false).is_ok());
    assert!(chain.verify(&leaf, &intermediate, Some(1_900_000_000), false).is_err(), "after the leaf expired");
    // A verifier built from the production root knows it has Apple's anchor.
    assert!(verifier(&[&dir.join("AppleRootCA-G3.cer")], |_| {}).has_apple_root);
    assert!(!verifier(&[&dir.join("certs/testCA.der")], |_| {}).has_apple_root);
}

#[test]
fn apples_payload_models_decode_to_their_documented_values() {
    let Some(dir) = fixtures() else { return };
    let key = p256::ecdsa::SigningKey::from(p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng));
    let decode_model = |name: &str| {
        let text = String::from_utf8(read(dir.join("models").join(name))).unwrap();
        decode(&body(&sign_jws(&serde_json::json!({"alg": "ES256"}), &text, &key))).unwrap()
    };
    let n = decode_model("signedNotification.json");
    assert_eq!(
        (n.notification_type.as_deref(), n.subtype.as_deref(), n.environment, n.bundle_id.as_deref(), n.app_apple_id),
        (Some("SUBSCRIBED"), Some("INITIAL_BUY"), Some(Environment::LocalTesting), Some("com.example"), Some(41234))
    );
    assert_eq!(n.uuid.as_deref(), Some("002e14d5-51f5-4503-b5a8-c3a1af68eb20"));
    assert_eq!(n.signed_date, Some(1_698_148_900_000));
    let n = decode_model("signedSummaryNotification.json");
    assert_eq!((n.notification_type.as_deref(), n.subtype.as_deref()), (Some("RENEWAL_EXTENSION"), Some("SUMMARY")));
    assert_eq!((n.environment, n.app_apple_id), (Some(Environment::LocalTesting), Some(41234)));
    let n = decode_model("signedExternalPurchaseTokenNotification.json");
    assert_eq!((n.environment, n.app_apple_id), (Some(Environment::Production), Some(55555)));
    let n = decode_model("signedExternalPurchaseTokenSandboxNotification.json");
    assert_eq!(n.environment, Some(Environment::Sandbox));
    let n = decode_model("signedRescindConsentNotification.json");
    assert_eq!(
        (n.notification_type.as_deref(), n.bundle_id.as_deref()),
        (Some("RESCIND_CONSENT"), Some("com.example"))
    );
    let n = decode_model("signedConsumptionRequestNotification.json");
    assert_eq!((n.notification_type.as_deref(), n.app_apple_id), (Some("CONSUMPTION_REQUEST"), Some(41234)));
}

#[test]
fn generated_chains_pass_and_every_kind_of_forgery_fails() {
    let dir = tempfile::tempdir().unwrap();
    let chain = Chain::generate(ChainOptions::default());
    let root_path = dir.path().join("root.der");
    std::fs::write(&root_path, &chain.root).unwrap();
    let trusted = verifier(&[&root_path], |c| c.bundle_ids = vec!["com.example.app".into()]);
    let claims = payload("gen-1", "Production", "com.example.app", storerelay_sidecar::clock::now_ms());

    let good = sign_jws(&chain.x5c(), &claims, &chain.leaf_key);
    assert_eq!(check(&trusted, &body(&good)), Ok(()));

    // Payload changed after signing.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    let tampered_claims = claims.replace("Production", "Sandbox");
    parts[1] = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, tampered_claims);
    assert_eq!(check(&trusted, &body(&parts.join("."))), Err(Reason::Signature));

    // alg other than ES256.
    let mut es384 = chain.x5c();
    es384["alg"] = "ES384".into();
    assert_eq!(check(&trusted, &body(&sign_jws(&es384, &claims, &chain.leaf_key))), Err(Reason::Signature));
    let mut none = chain.x5c();
    none["alg"] = "none".into();
    assert_eq!(check(&trusted, &body(&sign_jws(&none, &claims, &chain.leaf_key))), Err(Reason::Signature));

    // Two certificates instead of three.
    let short = header(&[&chain.leaf, &chain.intermediate]);
    assert_eq!(check(&trusted, &body(&sign_jws(&short, &claims, &chain.leaf_key))), Err(Reason::Chain));

    // An unknown root: a whole chain made by someone else.
    let stranger = Chain::generate(ChainOptions::default());
    assert_eq!(check(&trusted, &body(&sign_jws(&stranger.x5c(), &claims, &stranger.leaf_key))), Err(Reason::Chain));

    // Signed with a key other than the leaf's.
    assert_eq!(check(&trusted, &body(&sign_jws(&chain.x5c(), &claims, &stranger.leaf_key))), Err(Reason::Signature));

    // Expired leaf, and chains without Apple's OIDs, under the trusted root's sibling chains.
    for (options, what) in [
        (ChainOptions { leaf_expired: true, ..Default::default() }, "expired leaf"),
        (ChainOptions { leaf_oid: false, ..Default::default() }, "leaf without OID"),
        (ChainOptions { intermediate_oid: false, ..Default::default() }, "intermediate without OID"),
    ] {
        let other = Chain::generate(options);
        let path = dir.path().join("other-root.der");
        std::fs::write(&path, &other.root).unwrap();
        let trusting = verifier(&[&path], |_| {});
        assert_eq!(
            check(&trusting, &body(&sign_jws(&other.x5c(), &claims, &other.leaf_key))),
            Err(Reason::Chain),
            "{what}"
        );
    }

    // Not a JWS at all.
    assert_eq!(check(&trusted, br#"{"signedPayload":"not.a.jws"}"#), Err(Reason::Malformed));
}

#[test]
fn v1_needs_the_shared_secret() {
    let config = VerifyConfig { mode: VerifyMode::Enforce, ..Default::default() };
    let v1 = br#"{"notification_type":"DID_RENEW","environment":"PROD","bid":"com.example.app","password":"right"}"#;
    let with_password = Verifier::new(&config, Some("right".into()), None);
    assert_eq!(check(&with_password, v1), Ok(()));
    let wrong = Verifier::new(&config, Some("wrong".into()), None);
    assert_eq!(check(&wrong, v1), Err(Reason::V1Password));
    let none_configured = Verifier::new(&config, None, None);
    assert_eq!(check(&none_configured, v1), Err(Reason::V1Password), "enforce without v1Password rejects V1");
    let no_password = br#"{"notification_type":"DID_RENEW","environment":"PROD"}"#;
    assert_eq!(check(&with_password, no_password), Err(Reason::V1Password));
}
