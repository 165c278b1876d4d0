//! Connections to the shared spool's database: the URL (from the config or its Secret file), TLS
//! through rustls as `sslmode` says, and the session settings every connection starts with.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use storerelay_config::{PostgresSpool as Settings, TlsMode, parse_postgres_url};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Socket};

use super::tls::{MakeRustls, TlsStream};

use super::super::Failure;

/// How to reach the database: the driver's config and the TLS to use. Built once at start; the URL
/// and its password live only here.
#[derive(Clone)]
pub struct Target {
    config: Config,
    tls: Option<MakeRustls>,
    /// `host/database` for logs.
    pub label: String,
}

/// A connection's I/O half, which must be polled (spawned) for the client to work.
pub enum Driver {
    Plain(Box<Connection<Socket, NoTlsStream>>),
    Tls(Box<Connection<Socket, TlsStream<Socket>>>),
}

impl Target {
    pub fn from_settings(settings: &Settings) -> Result<Target, Failure> {
        let (text, from_file) = match (&settings.url, &settings.url_file) {
            (Some(url), _) => (url.clone(), false),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    Failure::Setup(format!("spool.postgres.urlFile {}: cannot read: {}", file.display(), e.kind()))
                })?;
                (text, true)
            }
            (None, None) => return Err(Failure::Setup("spool.postgres: set url or urlFile".into())),
        };
        let key = if from_file { "spool.postgres.urlFile" } else { "spool.postgres.url" };
        let target = parse_postgres_url(&text, from_file)
            .map_err(|problem| Failure::Setup(format!("{key}: the URL {problem}")))?;
        let mut config: Config = target
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| Failure::Setup(format!("{key}: the URL is not usable ({e})")))?;
        config.application_name("storerelay-sidecar");
        config.connect_timeout(settings.timeout.get());
        config.keepalives_idle(Duration::from_secs(30));
        let tls = match target.tls {
            TlsMode::Disable => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            mode => {
                config.ssl_mode(SslMode::Require);
                Some(MakeRustls::new(client_config(mode, settings)?))
            }
        };
        let database = config.get_dbname().unwrap_or("postgres").to_string();
        Ok(Target { config, tls, label: format!("{}/{database}", target.host) })
    }

    /// Opens one connection, its I/O half left to the caller (the listener polls it for notifications).
    pub async fn open(&self) -> Result<(Client, Driver), Failure> {
        Ok(match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                (client, Driver::Plain(Box::new(connection)))
            }
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                (client, Driver::Tls(Box::new(connection)))
            }
        })
    }

    /// Opens one connection, runs its I/O half in a task, and sets the session up: `schema` on the
    /// search path, and `synchronous_commit` off unless `durable` (for work whose loss costs only a
    /// repeated attempt: leases and outcomes).
    pub async fn connect(&self, schema: &str, durable: bool) -> Result<Client, Failure> {
        let (client, driver) = self.open().await?;
        tokio::spawn(driver.run());
        let commit = if durable { "on" } else { "off" };
        client.batch_execute(&format!("SET search_path TO {schema}; SET synchronous_commit TO {commit}")).await?;
        Ok(client)
    }
}

impl Driver {
    /// Polls the connection until it closes.
    pub async fn run(self) {
        let result = match self {
            Driver::Plain(connection) => (*connection).await,
            Driver::Tls(connection) => (*connection).await,
        };
        if let Err(error) = result {
            tracing::debug!(error = %super::describe(&error), "spool database connection closed");
        }
    }

    /// The next message from the server: a notification, a notice, or the end.
    pub fn poll_message(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        match self {
            Driver::Plain(connection) => connection.poll_message(cx),
            Driver::Tls(connection) => connection.poll_message(cx),
        }
    }
}

/// rustls for `mode`: roots from `rootCertificateFile` or the built-in Mozilla set; `require` checks
/// nothing about the certificate (libpq's meaning), `verify-ca` the chain, `verify-full` also the name.
fn client_config(mode: TlsMode, settings: &Settings) -> Result<rustls::ClientConfig, Failure> {
    let mut roots = RootCertStore::empty();
    match &settings.root_certificate_file {
        Some(file) => {
            let setup =
                |what: String| Failure::Setup(format!("spool.postgres.rootCertificateFile {}: {what}", file.display()));
            let pem = std::fs::read(file).map_err(|e| setup(format!("cannot read: {}", e.kind())))?;
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|e| setup(format!("not PEM certificates ({e})")))?;
                roots.add(certificate).map_err(|e| setup(format!("a certificate is not usable ({e})")))?;
            }
            if roots.is_empty() {
                return Err(setup("holds no certificate".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Setup(format!("TLS: {e}")))?;
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Failure::Setup(format!("TLS: {e}")))?;
    let config = match mode {
        TlsMode::VerifyFull | TlsMode::Disable => builder.with_webpki_verifier(webpki).with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                inner: webpki,
                check_chain: mode == TlsMode::VerifyCa,
            }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// `verify-ca` (the chain, not the name) and `require` (nothing about the certificate), as libpq
/// defines them. The handshake's signatures are checked either way.
#[derive(Debug)]
struct Lenient {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
