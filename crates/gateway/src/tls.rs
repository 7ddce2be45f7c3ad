//! TLS for clients that send an SSLRequest: a rustls acceptor from a certificate and key, and
//! the self-signed pair (a CA and a server certificate it signs) the local daemon makes on
//! first start.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::io::Write;

/// Why TLS material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot generate a certificate")]
    Generate(#[source] rcgen::Error),
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("certificate and key do not make a TLS configuration")]
    Config(#[source] rustls::Error),
}

/// Where a gateway's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate clients trust (`sslrootcert`).
    pub ca: PathBuf,
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM, mode 0600).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The file names under `dir`: `ca.pem`, `server.pem`, `server.key`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(content.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The TLS files in `dir`, generated first if any is missing: a CA, and a server certificate
/// it signs for `hosts` (names or IP addresses). The CA's key is not kept.
pub fn ensure_self_signed(dir: &Path, hosts: &[&str]) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles::in_dir(dir);
    if files.ca.exists() && files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Taidon local gateway CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).map_err(TlsError::Generate)?;

    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let mut params = CertificateParams::new(names).map_err(TlsError::Generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "taidon gateway");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(TlsError::Generate)?;

    write_file(&files.key, &key.serialize_pem(), 0o600)?;
    write_file(&files.cert, &(cert.pem() + &ca.pem()), 0o644)?;
    write_file(&files.ca, &ca.pem(), 0o644)?;
    Ok(files)
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(
        fs::File::open(cert).map_err(io_err(cert))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(io_err(cert))?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: cert.to_path_buf(),
            what: "certificate",
        });
    }
    let key_der = rustls_pemfile::private_key(&mut io::BufReader::new(
        fs::File::open(key).map_err(io_err(key))?,
    ))
    .map_err(io_err(key))?
    .ok_or_else(|| TlsError::Missing {
        path: key.to_path_buf(),
        what: "private key",
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}
