//! TLS for clients that send an SSLRequest: a rustls acceptor from a certificate and key, and
//! the self-signed pair (a CA and a server certificate it signs) the local daemon makes on
//! first start.

use std::fs;
use std::io;
use std::net::IpAddr;
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

/// The names the certificates of homes from before `server.hosts` were made for.
const LEGACY_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The TLS files in `dir`, made as needed: a CA (its key kept as `ca.key`, 0600) and a server
/// certificate it signs for `hosts` (names or IP addresses), recorded in `server.hosts`. When
/// a later call names a host the certificate does not cover, a new server certificate is
/// signed by the same CA for every host so far, so clients that trust `ca.pem` still do.
pub fn ensure_self_signed(dir: &Path, hosts: &[&str]) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles::in_dir(dir);
    let ca_key = dir.join("ca.key");
    let hosts_file = dir.join("server.hosts");
    let mut all: Vec<String> = Vec::new();
    let complete = files.ca.exists() && files.cert.exists() && files.key.exists();
    if complete {
        all = match fs::read_to_string(&hosts_file) {
            Ok(text) => text
                .lines()
                .map(str::to_owned)
                .filter(|l| !l.is_empty())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                LEGACY_HOSTS.iter().map(|h| (*h).to_owned()).collect()
            }
            Err(e) => return Err(io_err(&hosts_file)(e)),
        };
        if hosts.iter().all(|h| all.iter().any(|a| a == h)) {
            return Ok(files);
        }
    }
    for h in hosts {
        if !all.iter().any(|a| a == h) {
            all.push((*h).to_owned());
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;

    let kept_ca = if complete && ca_key.exists() {
        let key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        let ca_pem = fs::read_to_string(&files.ca).map_err(io_err(&files.ca))?;
        Some((
            rcgen::KeyPair::from_pem(&key_pem).map_err(TlsError::Generate)?,
            ca_pem,
        ))
    } else {
        if complete {
            tracing::warn!(dir = %dir.display(), "the CA's key was not kept: making a new CA for the new server certificate");
        }
        None
    };
    let (ca_key_pair, ca_pem) = match kept_ca {
        Some(kept) => kept,
        None => {
            let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
            let pem = ca_params()?
                .self_signed(&key)
                .map_err(TlsError::Generate)?
                .pem();
            write_file(&ca_key, &key.serialize_pem(), 0o600)?;
            write_file(&files.ca, &pem, 0o644)?;
            (key, pem)
        }
    };
    // The same name, key and key identifier as `ca.pem`: what it signs verifies against it.
    let ca = ca_params()?
        .self_signed(&ca_key_pair)
        .map_err(TlsError::Generate)?;

    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::new(all.clone()).map_err(TlsError::Generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "taidon gateway");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params
        .signed_by(&key, &ca, &ca_key_pair)
        .map_err(TlsError::Generate)?;

    write_file(&files.key, &key.serialize_pem(), 0o600)?;
    write_file(&files.cert, &(cert.pem() + &ca_pem), 0o644)?;
    write_file(&hosts_file, &(all.join("\n") + "\n"), 0o644)?;
    Ok(files)
}

fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Taidon local gateway CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// The names a server listening on `ip` is reached by, for its certificate: `ip` itself, or
/// for an unspecified address (`0.0.0.0`, `::`) every address of this machine's interfaces
/// and its host name.
pub fn listen_hosts(ip: IpAddr) -> Vec<String> {
    if !ip.is_unspecified() {
        return vec![ip.to_string()];
    }
    let mut hosts = interface_addresses();
    // A name a certificate cannot carry (an underscore, say) is left out.
    if let Some(name) = host_name().filter(|n| {
        n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    }) {
        hosts.push(name);
    }
    hosts
}

fn interface_addresses() -> Vec<String> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
            let s = ip.to_string();
            if !link_local && !out.contains(&s) {
                out.push(s);
            }
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a client trusting `ca` completes a handshake with `server` for `name`.
    async fn handshake(ca: &Path, server: Arc<rustls::ServerConfig>, name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut io::BufReader::new(fs::File::open(ca).unwrap())) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server_side = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .is_ok()
        });
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let client_side = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, a)
            .await;
        // The client's stream lives until the server has read its last handshake message.
        let mut client_side = match client_side {
            Ok(s) => s,
            Err(_) => return false,
        };
        use tokio::io::AsyncWriteExt;
        let _ = client_side.flush().await;
        let served = server_side.await.unwrap();
        drop(client_side);
        served
    }

    #[tokio::test]
    async fn a_new_host_gets_a_certificate_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let files = ensure_self_signed(&tls, &LEGACY_HOSTS).unwrap();
        let ca_before = fs::read_to_string(&files.ca).unwrap();
        let config = server_config(&files.cert, &files.key).unwrap();
        assert!(handshake(&files.ca, Arc::clone(&config), "127.0.0.1").await);
        assert!(!handshake(&files.ca, config, "198.18.0.1").await);

        // Covered already: nothing changes.
        let cert_before = fs::read_to_string(&files.cert).unwrap();
        ensure_self_signed(&tls, &["localhost"]).unwrap();
        assert_eq!(fs::read_to_string(&files.cert).unwrap(), cert_before);

        let files = ensure_self_signed(&tls, &["198.18.0.1"]).unwrap();
        assert_eq!(fs::read_to_string(&files.ca).unwrap(), ca_before, "same CA");
        let config = server_config(&files.cert, &files.key).unwrap();
        assert!(handshake(&files.ca, Arc::clone(&config), "198.18.0.1").await);
        assert!(
            handshake(&files.ca, config, "localhost").await,
            "old hosts kept"
        );
        assert_eq!(
            fs::metadata(tls.join("ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn a_home_without_the_ca_key_gets_a_new_ca_for_a_new_host() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_self_signed(dir.path(), &LEGACY_HOSTS).unwrap();
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        fs::remove_file(dir.path().join("server.hosts")).unwrap();
        // What older homes have covers the local names.
        let before = fs::read_to_string(&files.ca).unwrap();
        ensure_self_signed(dir.path(), &["::1"]).unwrap();
        assert_eq!(fs::read_to_string(&files.ca).unwrap(), before);
        ensure_self_signed(dir.path(), &["198.18.0.1"]).unwrap();
        assert_ne!(fs::read_to_string(&files.ca).unwrap(), before);
        let config = server_config(&files.cert, &files.key).unwrap();
        assert!(handshake(&files.ca, config, "198.18.0.1").await);
    }

    #[test]
    fn listen_hosts_names_the_address_or_every_interface() {
        assert_eq!(listen_hosts("198.18.0.1".parse().unwrap()), ["198.18.0.1"]);
        let all = listen_hosts("0.0.0.0".parse().unwrap());
        assert!(all.iter().any(|h| h == "127.0.0.1"), "{all:?}");
    }
}
