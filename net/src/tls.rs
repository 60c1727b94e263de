//! TLS settings both sides agree on: TLS 1.3 only, the `ring` provider, and
//! how an agent or admin trusts the coordinator.
//!
//! The coordinator is trusted by its CA, never by the address dialed: by the
//! CA's SHA-256 fingerprint from a join token (before enrollment), or by the
//! CA certificate stored at enrollment (after). Its certificate is checked
//! for the name carried in the token. A device clock years off must not
//! break this, so certificates are issued valid from 1970 and the check
//! clamps a clock past [`VALIDITY_CHECK_MAX_UNIX`] to it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use sundial_protocol::token::sha256;

/// The name in the coordinator's certificate unless `init` is told otherwise.
pub const SERVER_NAME_DEFAULT: &str = "sundial-coordinator";
/// 3000-01-01T00:00:00Z: a device clock later than this is treated as this
/// when checking certificate validity (certificates are valid to 4000).
pub const VALIDITY_CHECK_MAX_UNIX: u64 = 32_503_680_000;

/// The crypto provider everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a client trusts the coordinator.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// The CA whose certificate has this SHA-256 (from a join token); the
    /// coordinator sends the CA certificate in its chain.
    Pinned([u8; 32]),
    /// This CA certificate.
    Ca(CertificateDer<'static>),
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

#[derive(Debug)]
struct CoordinatorVerifier {
    trust: ServerTrust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = match &self.trust {
            ServerTrust::Ca(ca) => ca.clone(),
            ServerTrust::Pinned(pin) => intermediates
                .iter()
                .find(|c| sha256(c.as_ref()) == *pin)
                .map(|c| c.clone().into_owned())
                .ok_or_else(|| {
                    rustls::Error::General(
                        "the coordinator's CA does not match the fingerprint in the join token"
                            .into(),
                    )
                })?,
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now.as_secs().min(VALIDITY_CHECK_MAX_UNIX),
        ));
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
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

/// A TLS 1.3 client configuration for talking to the coordinator.
pub fn client_config(
    trust: ServerTrust,
    identity: Option<Identity>,
    alpn: &[u8],
) -> Result<ClientConfig, rustls::Error> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CoordinatorVerifier { trust, provider }));
    let mut cfg = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}
