//! TLS material: a development CA and broker certificate made with rcgen (so
//! nobody has to touch OpenSSL), and the rustls server configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Paths of a node's TLS files.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    pub fn in_dir(dir: &Path) -> Self {
        TlsPaths { ca_cert: dir.join("ca.pem"), cert: dir.join("broker.pem"), key: dir.join("broker.key") }
    }
}

/// Creates a self-signed CA and a broker certificate for `hosts` in `dir`
/// unless they already exist. The CA key is kept beside them so more
/// certificates can be issued later.
pub fn ensure_dev_certs(dir: &Path, hosts: &[String]) -> anyhow::Result<TlsPaths> {
    let paths = TlsPaths::in_dir(dir);
    if paths.ca_cert.exists() && paths.cert.exists() && paths.key.exists() {
        return Ok(paths);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let issuer = create_ca(dir, "Quiver development CA")?;
    issue(&issuer, dir, "quiver broker", hosts, Holder::Node)?;
    Ok(paths)
}

/// The parameters of a Quiver CA named `name`. Re-creating them with the
/// CA's key gives an issuer whose certificates chain to the CA certificate
/// written earlier (same subject, same key).
fn ca_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Writes a new CA (`ca.pem`, and `ca.key` readable by the owner only).
fn create_ca(dir: &Path, name: &str) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let params = ca_params(name)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("ca.pem"), cert.pem())?;
    Ok(Issuer::new(params, key))
}

/// Who a certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A broker: `broker.pem` and `broker.key`, valid for localhost and its
    /// host names, for both ends of TLS (brokers also connect to each other).
    Node,
    /// A client that authenticates as its common name: `client.pem` and
    /// `client.key`, for the client end only.
    Client,
}

/// Writes a certificate and its key in `dir`, signed by `issuer`, with the
/// common name `name`.
fn issue(
    issuer: &Issuer<'static, KeyPair>,
    dir: &Path,
    name: &str,
    hosts: &[String],
    holder: Holder,
) -> anyhow::Result<()> {
    let (names, usages, files) = match holder {
        Holder::Node => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
            names.extend(hosts.iter().filter(|h| !h.is_empty()).cloned());
            names.sort();
            names.dedup();
            let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let paths = TlsPaths::in_dir(dir);
            (names, usages, (paths.cert, paths.key))
        }
        Holder::Client => {
            (Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth], (dir.join("client.pem"), dir.join("client.key")))
        }
    };
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_private(&files.1, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.0, cert.pem())?;
    Ok(())
}

/// What `quiver certs init` did.
#[derive(Debug)]
pub struct ClusterCerts {
    pub created_ca: bool,
    /// Node ids that got a new certificate (existing ones are kept).
    pub issued: Vec<u32>,
    /// Clients that got a new certificate (existing ones are kept).
    pub clients: Vec<String>,
}

/// `quiver certs init`: a cluster CA in `dir` (created once, reused after,
/// so nodes added later chain to the same CA) and, for each node without
/// one, `dir/node-<id>/broker.{pem,key}` valid for localhost, `node-<id>` and
/// the node's extra host names; and for each client name without one,
/// `dir/client-<name>/client.{pem,key}` (its principal is `User:<name>`).
pub fn init_cluster_certs(
    dir: &Path,
    nodes: &[(u32, Vec<String>)],
    clients: &[String],
) -> anyhow::Result<ClusterCerts> {
    const CA_NAME: &str = "Quiver cluster CA";
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (issuer, created_ca) = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let pem = std::fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
            let key = KeyPair::from_pem(&pem).with_context(|| format!("{} is not a private key", ca_key.display()))?;
            (Issuer::new(ca_params(CA_NAME)?, key), false)
        }
        (false, false) => (create_ca(dir, CA_NAME)?, true),
        (true, false) => {
            bail!("{} exists without its key {}: cannot issue certificates", ca_cert.display(), ca_key.display())
        }
        (false, true) => {
            bail!("{} exists without {}: remove it or restore the CA certificate", ca_key.display(), ca_cert.display())
        }
    };
    let mut issued = Vec::new();
    for (id, hosts) in nodes {
        let node_dir = dir.join(format!("node-{id}"));
        if TlsPaths::in_dir(&node_dir).cert.exists() {
            continue;
        }
        std::fs::create_dir_all(&node_dir).with_context(|| format!("creating {}", node_dir.display()))?;
        let mut names = vec![format!("node-{id}")];
        names.extend(hosts.iter().cloned());
        issue(&issuer, &node_dir, &format!("quiver node {id}"), &names, Holder::Node)?;
        issued.push(*id);
    }
    let mut issued_clients = Vec::new();
    for name in clients {
        if name.is_empty() || name.starts_with("quiver node ") || name.contains(['/', '\\']) {
            bail!("'{name}' cannot name a client: it must be non-empty, without '/' or '\\', and not a node's name");
        }
        let client_dir = dir.join(format!("client-{name}"));
        if client_dir.join("client.pem").exists() {
            continue;
        }
        std::fs::create_dir_all(&client_dir).with_context(|| format!("creating {}", client_dir.display()))?;
        issue(&issuer, &client_dir, name, &[], Holder::Client)?;
        issued_clients.push(name.clone());
    }
    Ok(ClusterCerts { created_ca, issued, clients: issued_clients })
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// The QUIC server configuration for a broker: TLS 1.3 only, ALPN
/// `quiver/1`, the same transport windows as the client.
pub fn server_config(cert_path: &Path, key_path: &Path) -> anyhow::Result<quinn::ServerConfig> {
    server_config_with_clients(cert_path, key_path, None)
}

/// Like [`server_config`]; with `client_ca`, a client may present a
/// certificate, which must then chain to that CA (other brokers do; plain
/// clients present none). A certificate from another CA fails the handshake.
pub fn server_config_with_clients(
    cert_path: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<quinn::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .with_context(|| format!("reading certificate {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cert_path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading private key {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading CA {}", ca.display()))? {
                roots.add(cert.with_context(|| format!("parsing CA {}", ca.display()))?)?;
            }
            if roots.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("certificate {} does not match key {}", cert_path.display(), key_path.display()))?;
    tls.alpn_protocols = vec![quiver_protocol::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    // What one connection can make the broker buffer before it reads is its
    // unread bytes (the broker-wide budget bounds what it reads, see `net`);
    // the client's 1024 concurrent streams stay (a follower long-polls one
    // per partition it copies from a leader).
    let mut transport = quiver_client::transport_config();
    transport.receive_window(CONNECTION_RECEIVE_WINDOW_BYTES.into());
    transport.stream_receive_window(STREAM_RECEIVE_WINDOW_BYTES.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Bytes a client may send on one connection before the broker reads them.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Bytes a client may send on one stream before the broker reads them.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
