//! The coordinator's certificate authority: created by `init`, it signs the
//! coordinator's server certificate, the admin's client certificate and
//! every agent's certificate at enrollment.
//!
//! The CA, server and agent certificates are valid from 1970 to 4000:
//! devices with bad clocks must still connect, and revocation (refusal at
//! the handshake) ends an agent's access instead of expiry. Admin
//! certificates are people's: each names its admin and ends (a year by
//! default), and is renewed with `sundialctl admin renew`. A certificate
//! is made from the public key of its CSR alone; whatever else the CSR
//! asks for is ignored.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sundial_net::tls::Identity;
use sundial_protocol::AgentId;

/// Files in the coordinator's data directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const ADMIN_CREDS: &str = "admin.creds";

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path}: not a valid PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Cert { what, source }
}

fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(1970, 1, 1);
    p.not_after = rcgen::date_time_ymd(4000, 1, 1);
}

fn write_private(path: &Path, data: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The loaded CA and server identity.
#[derive(Debug)]
pub struct Pki {
    ca_cert_pem: String,
    ca_key: KeyPair,
    pub ca_der: CertificateDer<'static>,
    server_cert_pem: String,
    server_key_pem: String,
}

/// What `sundialctl` needs to reach the coordinator as admin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminCreds {
    /// Where the coordinator listens, as HOST:PORT.
    pub coordinator: String,
    /// The name in the coordinator's certificate.
    pub server_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The admin's name and role, and the end of the certificate's life
    /// (absent in files from before named admins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub expires_at: Option<sundial_protocol::Timestamp>,
}

/// An optional instant as RFC 3339 text (the file is read by people too).
mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use sundial_protocol::Timestamp;

    pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => Timestamp::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A DER certificate as PEM text.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Writes credentials to `path`, readable by its owner only; refuses to
/// replace a file that exists.
pub fn write_creds(path: &Path, creds: &AdminCreds) -> Result<(), String> {
    if path.exists() {
        return Err(format!(
            "{} exists; refusing to replace it (choose another --out, or move it away)",
            path.display()
        ));
    }
    let text = serde_json::to_string_pretty(creds)
        .map_err(|e| format!("cannot encode the credentials: {e}"))?;
    write_private(path, &text).map_err(|e| e.to_string())
}

/// Writes a credential as `ca.pem`, `cert.pem` and `key.pem` (0600) in
/// `dir` (made 0700 if missing), replacing none; the paths written.
pub fn export_pem(dir: &Path, creds: &AdminCreds) -> Result<Vec<PathBuf>, String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let files = [
        ("ca.pem", &creds.ca_pem, 0o644),
        ("cert.pem", &creds.cert_pem, 0o644),
        ("key.pem", &creds.key_pem, 0o600),
    ];
    for (name, _, _) in &files {
        let path = dir.join(name);
        if path.exists() {
            return Err(format!(
                "{} exists; refusing to replace it (choose another --out)",
                path.display()
            ));
        }
    }
    let mut written = Vec::new();
    for (name, text, mode) in files {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

impl AdminCreds {
    pub fn load(path: &Path) -> Result<AdminCreds, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read credentials {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a Sundial credentials file: {e}", path.display()))
    }

    pub fn ca_der(&self) -> Result<CertificateDer<'static>, String> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| format!("credentials: bad CA certificate: {e}"))
    }

    pub fn identity(&self) -> Result<Identity, String> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| format!("credentials: bad certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| format!("credentials: bad key: {e}"))?;
        Ok(Identity {
            chain: vec![cert],
            key,
        })
    }
}

impl Pki {
    /// Creates the CA, the server certificate (for `server_name` and the
    /// advertised host) and the credentials of the first owner, `owner`,
    /// valid until `owner_expires_at`, in `dir`. Returns the PKI and the
    /// owner certificate's DER.
    pub fn init(
        dir: &Path,
        server_name: &str,
        advertise: &str,
        owner_expires_at: sundial_protocol::Timestamp,
    ) -> Result<(Pki, CertificateDer<'static>), PkiError> {
        let ca_key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Sundial CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca_params);
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err("CA"))?;
        let issuer = Issuer::new(ca_params, &ca_key);

        // Every advertised host (several coordinators share this
        // certificate), besides the name agents verify by.
        let mut names = vec![server_name.to_owned()];
        for a in advertise.split([',', ' ']).filter(|a| !a.is_empty()) {
            let host = a
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']))
                .unwrap_or(a);
            if !host.is_empty() && !names.iter().any(|n| n == host) {
                names.push(host.to_owned());
            }
        }
        let server_key = KeyPair::generate().map_err(cert_err("server key"))?;
        let mut sp = CertificateParams::new(names).map_err(cert_err("server certificate"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, server_name);
        sp.distinguished_name = dn;
        sp.is_ca = IsCa::ExplicitNoCa;
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut sp);
        let server_cert = sp
            .signed_by(&server_key, &issuer)
            .map_err(cert_err("server certificate"))?;

        let admin_key = KeyPair::generate().map_err(cert_err("admin key"))?;
        let mut admin_params = client_params(&format!("sundial-admin {OWNER}"))?;
        admin_validity(&mut admin_params, owner_expires_at)?;
        let admin_cert = admin_params
            .signed_by(&admin_key, &issuer)
            .map_err(cert_err("admin certificate"))?;

        let io = |path: PathBuf| move |source| PkiError::Io { path, source };
        std::fs::create_dir_all(dir).map_err(io(dir.to_owned()))?;
        std::fs::write(dir.join(CA_CERT), ca_cert.pem()).map_err(io(dir.join(CA_CERT)))?;
        write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
        std::fs::write(dir.join(SERVER_CERT), server_cert.pem())
            .map_err(io(dir.join(SERVER_CERT)))?;
        write_private(&dir.join(SERVER_KEY), &server_key.serialize_pem())?;
        let creds = AdminCreds {
            coordinator: advertise.to_owned(),
            server_name: server_name.to_owned(),
            ca_pem: ca_cert.pem(),
            cert_pem: admin_cert.pem(),
            key_pem: admin_key.serialize_pem(),
            admin: Some(OWNER.into()),
            role: Some("owner".into()),
            expires_at: Some(owner_expires_at),
        };
        let creds_text = serde_json::to_string_pretty(&creds).unwrap_or_default();
        write_private(&dir.join(ADMIN_CREDS), &creds_text)?;
        let admin_der = admin_cert.der().clone();
        Ok((Pki::load(dir)?, admin_der))
    }

    /// Loads the CA and server identity from `dir`.
    pub fn load(dir: &Path) -> Result<Pki, PkiError> {
        let ca_cert_pem = read(&dir.join(CA_CERT))?;
        let ca_key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?).map_err(cert_err("CA key"))?;
        let ca_der =
            CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).map_err(|_| PkiError::Pem {
                path: dir.join(CA_CERT),
                what: "certificate",
            })?;
        Ok(Pki {
            ca_cert_pem,
            ca_key,
            ca_der,
            server_cert_pem: read(&dir.join(SERVER_CERT))?,
            server_key_pem: read(&dir.join(SERVER_KEY))?,
        })
    }

    /// The server's chain (its certificate, then the CA's) and key.
    pub fn server_identity(&self) -> Result<Identity, PkiError> {
        let cert =
            CertificateDer::from_pem_slice(self.server_cert_pem.as_bytes()).map_err(|_| {
                PkiError::Pem {
                    path: SERVER_CERT.into(),
                    what: "certificate",
                }
            })?;
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).map_err(|_| {
            PkiError::Pem {
                path: SERVER_KEY.into(),
                what: "key",
            }
        })?;
        Ok(Identity {
            chain: vec![cert, self.ca_der.clone()],
            key,
        })
    }

    /// Signs an agent certificate for the public key in `csr_der`. The subject,
    /// usage and constraints are ours: a plain client certificate for `agent`.
    pub fn sign_agent_csr(&self, csr_der: &[u8], agent: AgentId) -> Result<Vec<u8>, String> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| format!("bad certificate signing request: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.ca_key)
            .map_err(|e| format!("CA: {e}"))?;
        let params = client_params(&format!("sundial-agent {agent}")).map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(|e| format!("signing: {e}"))?;
        Ok(cert.der().to_vec())
    }

    /// Signs admin `name`'s certificate, valid until `expires_at`, for the
    /// public key in `csr_der`.
    pub fn sign_admin_csr(
        &self,
        csr_der: &[u8],
        name: &str,
        expires_at: sundial_protocol::Timestamp,
    ) -> Result<Vec<u8>, String> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| format!("bad certificate signing request: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.ca_key)
            .map_err(|e| format!("CA: {e}"))?;
        let mut params =
            client_params(&format!("sundial-admin {name}")).map_err(|e| e.to_string())?;
        admin_validity(&mut params, expires_at).map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(|e| format!("signing: {e}"))?;
        Ok(cert.der().to_vec())
    }
}

/// The name of the owner `init` makes.
pub const OWNER: &str = "owner";

/// An admin certificate's validity: from an hour before now (clocks
/// differ) to `expires_at`.
fn admin_validity(
    p: &mut CertificateParams,
    expires_at: sundial_protocol::Timestamp,
) -> Result<(), PkiError> {
    let at = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).map_err(|e| PkiError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("certificate validity: {e}")),
        })
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    p.not_before = at(now.saturating_sub(3_600_000))?;
    p.not_after = at(expires_at.as_millis())?;
    Ok(())
}

fn client_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut p =
        CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p);
    Ok(p)
}
