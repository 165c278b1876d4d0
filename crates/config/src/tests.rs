use super::*;

fn file() -> &'static Path {
    Path::new("/etc/storerelay/config.yaml")
}

const FULL: &str = r#"
listen: 0.0.0.0:8089
admin: 0.0.0.0:9089
paths: [/apple/notifications]
upstream:
  url: http://127.0.0.1:8080
  timeout: 5s
ack: upstream
ackTimeout: 5s
spool:
  path: /var/lib/storerelay/spool.db
  maxBytes: 256Mi
  sync: full
  retainDelivered: 168h
  retainDead: 168h
limits: {maxBodyBytes: 1Mi, headerTimeout: 5s, bodyTimeout: 10s, maxConcurrentRequests: 256}
shutdownGracePeriod: 20s
destinations:
  - name: revenuecat
    url: https://example.invalid/hook
    headers: {}
    timeout: 10s
    concurrency: 4
    retry: {initialBackoff: 1s, maxBackoff: 10m, maxAge: 168h}
"#;

#[test]
fn the_documented_example_equals_the_defaults() {
    let full = parse(FULL, file()).unwrap();
    let minimal = parse(
        "upstream: {url: http://127.0.0.1:8080}\ndestinations: [{name: revenuecat, url: https://example.invalid/hook}]\n",
        file(),
    )
    .unwrap();
    assert_eq!(full.ack, Some(AckMode::Upstream));
    let mut minimal_with_ack = minimal.clone();
    minimal_with_ack.ack = Some(AckMode::Upstream);
    assert_eq!(full, minimal_with_ack);
    assert_eq!(minimal.effective_ack(), AckMode::Upstream);
}

#[test]
fn ack_defaults_to_spooled_without_upstream() {
    let config = parse("", file()).unwrap();
    assert_eq!(config.effective_ack(), AckMode::Spooled);
    assert_eq!(config.listen.port(), 8089);
    assert_eq!(config.spool.max_bytes, ByteSize(256 << 20));
}

#[test]
fn unknown_keys_name_the_key_and_file() {
    let err = parse("destinations:\n  - name: rc\n    url: https://x.invalid/\n    retry: {maxAgee: 1h}\n", file())
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("/etc/storerelay/config.yaml: key `destinations[0].retry"), "{text}");
    assert!(text.contains("maxAgee"), "{text}");

    let err = parse("listn: 0.0.0.0:1\n", file()).unwrap_err().to_string();
    assert!(err.contains("listn"), "{err}");
}

#[test]
fn bad_values_name_the_key() {
    let err = parse("limits: {headerTimeout: 5 seconds}\n", file()).unwrap_err().to_string();
    assert!(err.contains("limits.headerTimeout"), "{err}");
    assert!(err.contains("`5 seconds` is not a duration"), "{err}");
}

#[test]
fn validation_reports_every_problem_with_its_key() {
    let text = r#"
listen: 127.0.0.1:1
admin: 127.0.0.1:1
paths: [apple, /a, /a]
ack: upstream
spool: {maxBytes: 1Ki}
destinations:
  - {name: RevenueCat, url: "ftp://x"}
  - {name: b, url: "https://x.invalid/a", urlFile: /f, concurrency: 0, headers: {"bad header": x}}
  - {name: b, retry: {initialBackoff: 10s, maxBackoff: 1s}}
"#;
    let ConfigError::Invalid { problems, .. } = parse(text, file()).unwrap_err() else {
        panic!("expected validation problems");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for expected in [
        "admin",
        "paths[0]",
        "paths[2]",
        "ack",
        "spool.maxBytes",
        "destinations[0].name",
        "destinations[0].url",
        "destinations[1].url",
        "destinations[1].headers.bad header",
        "destinations[1].concurrency",
        "destinations[2].name",
        "destinations[2].url",
        "destinations[2].retry.maxBackoff",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
}

#[test]
fn spooled_ack_with_an_upstream_is_refused() {
    let err = parse("upstream: {url: http://127.0.0.1:8080}\nack: spooled\n", file()).unwrap_err();
    assert!(err.to_string().contains("`ack`"), "{err}");
}

#[test]
fn errors_never_echo_destination_urls() {
    let secret = "https://user:tok3n@example.invalid/hook/SECRET";
    let err = parse(&format!("destinations: [{{name: rc, url: \"{secret}\"}}]\n"), file()).unwrap_err().to_string();
    assert!(!err.contains("tok3n") && !err.contains("SECRET"), "{err}");
}

#[test]
fn a_unicode_host_name_is_refused_with_its_ascii_form_asked_for() {
    let err = parse("destinations: [{name: rc, url: \"https://bücher.example/hook/SECRET\"}]\n", file())
        .unwrap_err()
        .to_string();
    assert!(err.contains("destinations[0].url") && err.contains("punycode"), "{err}");
    assert!(!err.contains("SECRET") && !err.contains("bücher"), "{err}");
    parse("destinations: [{name: rc, url: \"https://xn--bcher-kva.example/hook\"}]\n", file()).expect("punycode");
}

#[test]
fn redaction_hides_tokens_and_header_values() {
    let text = "destinations:\n  - name: rc\n    url: https://api.example.invalid:8443/v1/hook/SECRET?k=SECRET\n    headers: {Authorization: Bearer SECRET}\n";
    let config = parse(text, file()).unwrap();
    let printed = config.redacted().to_yaml();
    assert!(!printed.contains("SECRET"), "{printed}");
    assert!(printed.contains("https://api.example.invalid:8443/<redacted>"), "{printed}");
    assert!(printed.contains("Authorization: <redacted>"), "{printed}");
    assert!(printed.contains("ack: spooled"), "{printed}");
    // What `check` prints parses back to a config with the same shape.
    let reparsed = parse(&printed, file()).unwrap();
    assert_eq!(reparsed.destinations.len(), 1);
}

#[test]
fn rendered_yaml_round_trips() {
    let config = parse(FULL, file()).unwrap();
    assert_eq!(parse(&config.to_yaml(), file()).unwrap(), config);
}

#[test]
fn secret_files_are_listed_for_watching() {
    let config = parse(
        "destinations:\n  - {name: a, urlFile: /s/a/url, headersFile: /s/a/headers}\n  - {name: b, url: https://b.invalid/}\n",
        file(),
    )
    .unwrap();
    assert_eq!(config.secret_files(), vec![Path::new("/s/a/url"), Path::new("/s/a/headers")]);
}

#[test]
fn schema_describes_camel_case_keys() {
    let schema = json_schema().to_string();
    for key in ["maxBodyBytes", "retainDelivered", "urlFile", "headersFile", "shutdownGracePeriod"] {
        assert!(schema.contains(key), "{key}");
    }
}

#[test]
fn load_names_a_missing_file() {
    let err = load(Path::new("/nonexistent/storerelay.yaml")).unwrap_err().to_string();
    assert!(err.starts_with("/nonexistent/storerelay.yaml: cannot read"), "{err}");
}

#[test]
fn apple_keys_parse_validate_and_redact() {
    let text = r#"
verify:
  mode: enforce
  rootCertificates: [/etc/storerelay/apple/AppleRootCA-G3.cer]
  bundleIds: [com.example.app]
  appAppleIds: [1234]
  environments: [Production, Sandbox]
  v1Password: "V1-SECRET"
unknownBodies: reject
dedupe: {window: 72h}
destinations:
  - name: revenuecat
    url: https://example.invalid/hook
    match: {environments: [Production], versions: [v2], notificationTypes: [DID_RENEW]}
"#;
    let config = parse(text, file()).unwrap();
    assert_eq!(config.verify.mode, VerifyMode::Enforce);
    assert_eq!(config.unknown_bodies, UnknownBodies::Reject);
    assert_eq!(config.dedupe.window, Duration::from_secs(72 * 3600));
    assert_eq!(config.destinations[0].filter.environments, vec![Environment::Production]);
    assert_eq!(config.secret_files().len(), 1, "the root certificate is watched");
    let printed = config.redacted().to_yaml();
    assert!(!printed.contains("V1-SECRET"), "{printed}");
    assert_eq!(parse(&config.to_yaml(), file()).unwrap(), config);
}

#[test]
fn enforce_without_a_root_is_refused_with_the_fingerprint_to_look_for() {
    let err = parse("verify: {mode: enforce}\n", file()).unwrap_err().to_string();
    assert!(err.contains("verify.rootCertificates") && err.contains("63343abfb89a6a03"), "{err}");
    let err = parse("verify: {v1Password: a, v1PasswordFile: /f}\n", file()).unwrap_err().to_string();
    assert!(err.contains("verify.v1Password"), "{err}");
    let err = parse("destinations: [{name: a, url: \"https://a.invalid/\", match: {environments: [Prod]}}]\n", file())
        .unwrap_err()
        .to_string();
    assert!(err.contains("destinations[0].match.environments"), "{err}");
}

#[test]
fn dedupe_defaults_to_seven_days() {
    assert_eq!(parse("", file()).unwrap().dedupe.window, Duration::from_secs(168 * 3600));
}

#[test]
fn durations_too_long_for_millisecond_arithmetic_are_refused() {
    // 3,000,000,000,000 h fits in u64 milliseconds but not in the i64 the spool schedules with: it
    // would wrap negative and kill every delivery at once.
    let err = parse("destinations: [{name: a, url: 'https://a.invalid/', retry: {maxAge: 3000000000000h}}]\n", file())
        .unwrap_err()
        .to_string();
    assert!(err.contains("destinations[0].retry.maxAge"), "{err}");
    assert!(err.contains("longer than 100 years"), "{err}");
    assert!(parse("spool: {retainDelivered: 876000h}\n", file()).is_ok(), "100 years is still accepted");
}

#[test]
fn headers_that_would_replace_fixed_request_headers_are_refused() {
    let text = "destinations:\n  - {name: a, url: 'https://a.invalid/', headers: {Content-Type: text/plain, user-agent: x, HOST: h, Content-Length: '1', Authorization: ok}}\n";
    let ConfigError::Invalid { problems, .. } = parse(text, file()).unwrap_err() else {
        panic!("expected validation problems");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for expected in [
        "destinations[0].headers.Content-Type",
        "destinations[0].headers.user-agent",
        "destinations[0].headers.HOST",
        "destinations[0].headers.Content-Length",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
    assert!(!keys.iter().any(|k| k.ends_with("Authorization")), "{keys:?}");
    assert!(problems.iter().all(|p| !p.key.ends_with("Content-Type") || p.message.contains("storerelay sets")));
}

#[test]
fn the_postgres_spool_is_checked_key_by_key_and_its_password_never_printed() {
    let config = parse(
        "spool:\n  backend: postgres\n  postgres: {url: \"postgres://relay@db/app?sslmode=disable\", queue: shop/payments}\n",
        file(),
    )
    .unwrap();
    let postgres = config.spool.postgres.as_ref().unwrap();
    assert_eq!((postgres.schema.as_str(), postgres.max_connections), ("storerelay", 4));
    assert_eq!(postgres.timeout, Duration::from_secs(5));

    let err = parse(
        "spool:\n  backend: postgres\n  postgres: {url: \"postgres://relay:hunter2@db/app\", queue: \"a b\", schema: Bad, maxConnections: 0}\n",
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("/etc/storerelay/config.yaml: "), "{err}");
    for key in ["spool.postgres.url", "spool.postgres.queue", "spool.postgres.schema", "spool.postgres.maxConnections"]
    {
        assert!(err.contains(&format!("`{key}`")), "{key} not named: {err}");
    }
    assert!(err.contains("urlFile") && !err.contains("hunter2"), "{err}");

    let missing = parse("spool: {backend: postgres}\n", file()).unwrap_err().to_string();
    assert!(missing.contains("`spool.postgres` is needed with `backend: postgres`"), "{missing}");
    let stray = parse("spool: {postgres: {urlFile: /s/url, queue: q}}\n", file()).unwrap_err().to_string();
    assert!(stray.contains("`spool.postgres` is only used with `backend: postgres`"), "{stray}");
    let files = parse(
        "spool: {backend: postgres, postgres: {urlFile: /s/url, rootCertificateFile: /s/ca, queue: q}}\n",
        file(),
    )
    .unwrap();
    assert!(files.secret_files().contains(&Path::new("/s/url")) && files.secret_files().contains(&Path::new("/s/ca")));
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let generated = format!("{:#}\n", json_schema());
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.json");
    if std::env::var_os("STORERELAY_BLESS").is_some() {
        std::fs::write(&committed, &generated).unwrap();
    }
    assert!(
        JSON_SCHEMA == generated,
        "crates/config/schema.json is stale: run `STORERELAY_BLESS=1 cargo test -p storerelay-config`"
    );
}

#[test]
fn app_store_server_api_names_each_bad_key_and_never_reads_the_key() {
    let good = parse(
        "appStoreServerApi:\n  keyId: 2X9R4HXF34\n  issuerId: 57246542-96fe-1a63-e053-0824d011072a\n  bundleId: com.example.app\n  privateKeyFile: /etc/storerelay/secrets/apple-api/SubscriptionKey.p8\n  environment: Sandbox\n",
        file(),
    )
    .unwrap();
    let api = good.app_store_server_api.as_ref().unwrap();
    assert_eq!(api.timeout, Duration::from_secs(10));
    assert_eq!(api.environment.history_retention(), std::time::Duration::from_secs(30 * 86400));
    assert!(good.problems().is_empty(), "{:?}", good.problems());
    assert!(good.secret_files().contains(&Path::new("/etc/storerelay/secrets/apple-api/SubscriptionKey.p8")));

    let bad = parse(
        "appStoreServerApi:\n  keyId: 'not a key'\n  issuerId: issuer\n  bundleId: ''\n  privateKeyFile: ''\n  environment: Production\n  baseUrl: ftp://proxy.invalid/\n  timeout: 0s\n",
        file(),
    )
    .unwrap_err();
    let ConfigError::Invalid { problems, .. } = bad else { panic!("not a validation error: {bad}") };
    let keys: Vec<String> = problems.into_iter().map(|p| p.key).collect();
    for key in ["keyId", "issuerId", "bundleId", "privateKeyFile", "baseUrl", "timeout"] {
        assert!(keys.contains(&format!("appStoreServerApi.{key}")), "{key} not reported: {keys:?}");
    }

    let xcode = parse(
        "appStoreServerApi: {keyId: A, issuerId: b, bundleId: c, privateKeyFile: /k, environment: Xcode}\n",
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(xcode.contains("appStoreServerApi") && xcode.contains("Xcode"), "{xcode}");
}

#[test]
fn gap_fill_needs_the_api_dedupe_and_one_spool_and_says_why() {
    let api =
        "appStoreServerApi: {keyId: K1, issuerId: 0a-1b, bundleId: b, privateKeyFile: /k.p8, environment: Sandbox}\n";
    let problems = |text: &str| match parse(text, file()) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("{other}"),
    };
    let alone = problems("gapFill: {onlyReplica: true}\n");
    assert!(alone.iter().any(|p| p.key == "gapFill" && p.message.contains("appStoreServerApi")), "{alone:?}");
    let sqlite = problems(&format!("{api}gapFill: {{}}\n"));
    assert!(sqlite.iter().any(|p| p.key == "gapFill.onlyReplica" && p.message.contains("postgres")), "{sqlite:?}");
    let too_far = problems(&format!("{api}gapFill: {{lookback: 800h, onlyReplica: true}}\n"));
    assert!(too_far.iter().any(|p| p.key == "gapFill.lookback" && p.message.contains("30 days")), "{too_far:?}");
    let past_dedupe =
        problems(&format!("{api}dedupe: {{window: 24h}}\ngapFill: {{lookback: 48h, onlyReplica: true}}\n"));
    assert!(past_dedupe.iter().any(|p| p.key == "gapFill.lookback" && p.message.contains("dedupe.window")));
    let no_dedupe = problems(&format!("{api}dedupe: {{window: 0s}}\ngapFill: {{onlyReplica: true}}\n"));
    assert!(no_dedupe.iter().any(|p| p.key == "gapFill" && p.message.contains("dedupe.window")));
    let fine = parse(&format!("{api}gapFill: {{onlyReplica: true, scope: all}}\n"), file()).unwrap();
    let gap_fill = fine.gap_fill.unwrap();
    assert_eq!((gap_fill.interval, gap_fill.lookback), (Duration::from_secs(900), Duration::from_secs(72 * 3600)));
    assert_eq!(gap_fill.scope, GapFillScope::All);

    let self_test = problems("selfTest: {}\n");
    assert!(self_test.iter().any(|p| p.key == "selfTest" && p.message.contains("appStoreServerApi")));
    assert!(self_test.iter().any(|p| p.key == "selfTest.onlyReplica"), "{self_test:?}");
    let fine = parse(&format!("{api}selfTest: {{onlyReplica: true}}\n"), file()).unwrap().self_test.unwrap();
    assert_eq!((fine.interval, fine.timeout), (Duration::from_secs(86_400), Duration::from_secs(120)));
}
