//! The QUIC + TLS connection to a broker and the request/response exchange.
//! One bidirectional QUIC stream per request: write the frame, finish the
//! stream, read the response frame.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quiver_protocol::codec::DecodeError;
use quiver_protocol::frame::{LENGTH_PREFIX_BYTES, decode_response, encode_request, frame_len};
use quiver_protocol::messages::{ApiKey, ApiVersionsRequest, Request};
use quiver_protocol::{ALPN, ErrorCode, WireError};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::Mutex;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Broker addresses (`host:port`); the first that answers is used.
    pub brokers: Vec<String>,
    /// PEM of the CA certificate(s) that signed the brokers' certificates.
    pub ca_pem: Vec<u8>,
    /// Name expected in the broker certificate; defaults to the host part of
    /// the address.
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    /// A request unanswered this long fails with `CallError::Timeout` (its
    /// fate unknown) and closes its connection; the next one reconnects.
    pub request_timeout: Duration,
    /// Largest response frame accepted.
    pub response_bytes_max: usize,
    pub client_software: String,
    /// A client certificate chain and its key (PEM), for mutual TLS: brokers
    /// present their node certificate to each other.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Local address of the client's UDP socket (default: any address,
    /// port chosen by the system). Brokers bind their connections to each
    /// other to the address they listen on.
    pub bind: Option<SocketAddr>,
}

impl ClientConfig {
    pub fn new(broker: impl Into<String>, ca_pem: Vec<u8>) -> Self {
        ClientConfig {
            brokers: vec![broker.into()],
            ca_pem,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            response_bytes_max: 256 * 1024 * 1024,
            client_software: concat!("quiver-client ", env!("CARGO_PKG_VERSION")).into(),
            identity: None,
            bind: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the CA file holds no usable PEM certificate: {0}")]
    BadCa(String),
    #[error("cannot resolve broker address '{address}': {reason}")]
    Resolve { address: String, reason: String },
    #[error("cannot open a local UDP socket: {0}")]
    Socket(std::io::Error),
    #[error(
        "TLS handshake with {address} failed: {reason}. The broker's certificate must be signed by the CA you \
         pass (--ca or QUIVER_CA) and name the host you connect to"
    )]
    Tls { address: String, reason: String },
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("timed out connecting to {address} after {timeout:?}: is a broker listening there?")]
    Timeout { address: String, timeout: Duration },
    #[error("broker at {address} does not support {api:?} version {version} (it supports {min}..={max})")]
    Version { address: String, api: ApiKey, version: u16, min: u16, max: u16 },
    #[error("no broker given")]
    NoBrokers,
    #[error("the client certificate or key is unusable: {0}")]
    BadIdentity(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request may or may not have reached the broker.
    #[error("connection lost during the request: {0}")]
    ConnectionLost(String),
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("response of {size} bytes exceeds the limit of {limit} bytes")]
    ResponseTooLarge { size: usize, limit: usize },
    // Not `#[from]`: the message already includes the inner error, which
    // as a source would print twice in an error chain (`{:#}`).
    #[error("malformed response: {0}")]
    Decode(DecodeError),
    #[error("broker refused the request: {0}")]
    Broker(WireError),
    /// The request went unanswered and the cluster moved the leadership of
    /// one of its partitions meanwhile; it may or may not have been applied.
    #[error("leadership moved during the request: {0}")]
    LeaderMoved(String),
}

impl From<DecodeError> for CallError {
    fn from(e: DecodeError) -> Self {
        CallError::Decode(e)
    }
}

impl From<WireError> for CallError {
    fn from(e: WireError) -> Self {
        CallError::Broker(e)
    }
}

impl CallError {
    /// True when the request was certainly not applied, so that sending it
    /// again cannot duplicate anything.
    pub fn is_safe_to_retry(&self) -> bool {
        match self {
            CallError::Connect(_) => true,
            CallError::Broker(e) => e.code.is_retriable(),
            _ => false,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    connection: Mutex<Option<(String, quinn::Connection)>>,
}

impl Inner {
    /// A connection to another broker of the same cluster, over the same
    /// endpoint and TLS settings.
    pub(crate) fn sibling(&self, address: &str) -> Inner {
        let mut config = self.config.clone();
        config.brokers = vec![address.to_string()];
        Inner {
            config,
            endpoint: self.endpoint.clone(),
            client_config: self.client_config.clone(),
            connection: Mutex::new(None),
        }
    }
}

/// A connection to a Quiver broker. Cheap to clone; reconnects on demand
/// after the connection is lost. In a cluster, [`Client::for_partition`]
/// gives the connection to a partition's leader (connections and leaders
/// are shared by every clone).
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    pub(crate) routing: Arc<crate::routing::Routing>,
}

impl Client {
    /// Connects and checks that the broker speaks every API version this
    /// client uses.
    pub async fn connect(config: ClientConfig) -> Result<Client, ConnectError> {
        let client_config = match &config.identity {
            None => quic_client_config(&config.ca_pem)?,
            Some((cert, key)) => quic_client_config_with_identity(&config.ca_pem, Some((cert, key)))?,
        };
        let bind = config.bind.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Socket)?;
        let inner = Arc::new(Inner { config, endpoint, client_config, connection: Mutex::new(None) });
        let client = Client { routing: Arc::new(crate::routing::Routing::new(inner.clone())), inner };
        client.connection().await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Whether both use the same connection (the same broker).
    pub fn same_connection(&self, other: &Client) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The current connection, connecting (and handshaking) if needed.
    /// Brokers that failed lately are tried last, so that a dead node
    /// given first does not cost a connect timeout on every reconnect.
    async fn connection(&self) -> Result<(String, quinn::Connection), ConnectError> {
        let mut guard = self.inner.connection.lock().await;
        if let Some((address, conn)) = guard.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok((address.clone(), conn.clone()));
        }
        let mut last_error = ConnectError::NoBrokers;
        for address in self.routing.suspects.ordered(&self.inner.config.brokers) {
            match self.connect_one(address).await {
                Ok(conn) => {
                    self.routing.suspects.clear(address);
                    *guard = Some((address.clone(), conn.clone()));
                    return Ok((address.clone(), conn));
                }
                Err(e) => {
                    self.routing.suspects.mark(address);
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    async fn connect_one(&self, address: &str) -> Result<quinn::Connection, ConnectError> {
        let config = &self.inner.config;
        let resolve_err = |reason: String| ConnectError::Resolve { address: address.to_string(), reason };
        let addr = address
            .to_socket_addrs()
            .map_err(|e| resolve_err(e.to_string()))?
            .next()
            .ok_or_else(|| resolve_err("no addresses".into()))?;
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = config.server_name.clone().unwrap_or_else(|| host.to_string());
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client_config.clone(), addr, &server_name)
            .map_err(|e| ConnectError::Connect { address: address.to_string(), reason: e.to_string() })?;
        let conn = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Err(_) => {
                return Err(ConnectError::Timeout { address: address.to_string(), timeout: config.connect_timeout });
            }
            Ok(Err(e)) => return Err(classify_connection_error(address, e)),
            Ok(Ok(conn)) => conn,
        };
        // Version handshake: refuse early with a clear message rather than
        // failing on the first real request.
        let request = ApiVersionsRequest { client_software: config.client_software.clone() };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ConnectError::Connect { address: address.to_string(), reason: e.to_string() })?;
        let versions = exchange(send, recv, encode_request(&request), config)
            .await
            .and_then(|frame| Ok(decode_response::<<ApiVersionsRequest as Request>::Response>(frame)??))
            .map_err(|e| ConnectError::Connect {
                address: address.to_string(),
                reason: format!("version handshake failed: {e}"),
            })?;
        for api in ApiKey::ALL {
            let version = api.supported_versions().1; // what this build sends
            let range = versions.apis.iter().find(|r| r.api_key == api as u16);
            let ok = range.is_some_and(|r| r.min_version <= version && version <= r.max_version);
            if !ok {
                let (min, max) = range.map_or((0, 0), |r| (r.min_version, r.max_version));
                return Err(ConnectError::Version { address: address.to_string(), api, version, min, max });
            }
        }
        tracing::debug!(address, broker = %versions.broker_software, "connected");
        Ok(conn)
    }

    /// Sends one request and waits for its response. A broker that answers
    /// `broker_not_ready` (it restarted and is catching up with the
    /// metadata log; nothing was done) is asked again, or another of the
    /// given brokers is, for up to `request_timeout`.
    pub async fn call<R: Request>(&self, request: &R) -> Result<R::Response, CallError> {
        let started = Instant::now();
        let mut backoff = NOT_READY_BACKOFF_MIN;
        loop {
            let stream = self.open_stream().await?;
            let address = stream.address.clone();
            match stream.call(request).await {
                Err(CallError::Broker(e))
                    if e.code == ErrorCode::BrokerNotReady
                        && started.elapsed() + backoff < self.inner.config.request_timeout =>
                {
                    tracing::debug!(address, error = %e, "broker not ready; asking again");
                    if self.inner.config.brokers.len() > 1 {
                        self.routing.suspects.mark(&address);
                        let mut connection = self.inner.connection.lock().await;
                        if connection.as_ref().is_some_and(|(a, _)| *a == address) {
                            *connection = None;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(NOT_READY_BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    /// Sends one request without waiting for any answer (acks=none).
    pub async fn send_only<R: Request>(&self, request: &R) -> Result<(), CallError> {
        self.open_stream().await?.send_only(request).await
    }

    /// Opens the stream for one request. The broker appends produce
    /// requests of a connection in the order their streams were opened, so a
    /// caller that needs order opens streams in that order.
    pub async fn open_stream(&self) -> Result<RequestStream, CallError> {
        let (address, conn) = self.connection().await?;
        let (send, recv) = conn.open_bi().await.map_err(|e| {
            // Opening a stream sends nothing: the request was not applied.
            CallError::Connect(ConnectError::Connect {
                address: conn.remote_address().to_string(),
                reason: e.to_string(),
            })
        })?;
        Ok(RequestStream { send, recv, client: self.clone(), connection: conn, address })
    }

    /// Closes the connection; outstanding requests fail.
    pub fn close(&self) {
        self.inner.endpoint.close(0u32.into(), b"client closed");
    }
}

/// Waits between asking a broker that is not ready yet.
const NOT_READY_BACKOFF_MIN: Duration = Duration::from_millis(50);
const NOT_READY_BACKOFF_MAX: Duration = Duration::from_millis(500);

fn lost(reason: String) -> CallError {
    CallError::ConnectionLost(reason)
}

/// Reads exactly `len` bytes of a frame body into one buffer, without
/// zero-filling it first (QUIC hands data over in packet-sized chunks, so
/// copying them once into place is cheaper than keeping them apart).
pub(crate) async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Bytes, std::io::Error> {
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        let want = len - body.len();
        let n = recv.read_buf(&mut (&mut body).limit(want)).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream ended after {} of {len} frame bytes", body.len()),
            ));
        }
    }
    Ok(body.freeze())
}

/// An opened request stream: one request, one response.
pub struct RequestStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    client: Client,
    connection: quinn::Connection,
    /// The broker address it was connected to.
    address: String,
}

impl RequestStream {
    /// Sends the request and waits for the answer. A broker that does not
    /// answer within `request_timeout` is taken for gone (killed, paused,
    /// cut off): the connection is closed, so the next request connects
    /// anew instead of waiting for QUIC's idle timeout.
    pub async fn call<R: Request>(self, request: &R) -> Result<R::Response, CallError> {
        let config = self.client.inner.config.clone();
        let response = match exchange(self.send, self.recv, encode_request(request), &config).await {
            Err(e @ CallError::Timeout(_)) => {
                self.connection.close(0u32.into(), b"request timed out");
                self.client.routing.suspects.mark(&self.address);
                return Err(e);
            }
            other => other?,
        };
        Ok(decode_response::<R::Response>(response)??)
    }

    pub async fn send_only<R: Request>(mut self, request: &R) -> Result<(), CallError> {
        let mut frame = encode_request(request);
        self.send.write_all_chunks(&mut frame).await.map_err(|e| lost(e.to_string()))?;
        self.send.finish().map_err(|e| lost(e.to_string()))?;
        Ok(())
    }
}

async fn exchange(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut frame: Vec<Bytes>,
    config: &ClientConfig,
) -> Result<Bytes, CallError> {
    let work = async {
        send.write_all_chunks(&mut frame).await.map_err(|e| lost(e.to_string()))?;
        send.finish().map_err(|e| lost(e.to_string()))?;
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await.map_err(|e| lost(e.to_string()))?;
        let len = frame_len(prefix);
        if len > config.response_bytes_max {
            return Err(CallError::ResponseTooLarge { size: len, limit: config.response_bytes_max });
        }
        read_body(&mut recv, len).await.map_err(|e| lost(e.to_string()))
    };
    match tokio::time::timeout(config.request_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout(config.request_timeout)),
    }
}

fn classify_connection_error(address: &str, e: quinn::ConnectionError) -> ConnectError {
    let reason = e.to_string();
    let tls = matches!(e, quinn::ConnectionError::TransportError(ref t) if t.code.to_string().contains("crypto"))
        || reason.contains("certificate")
        || reason.contains("crypto");
    if tls {
        ConnectError::Tls { address: address.to_string(), reason }
    } else if matches!(e, quinn::ConnectionError::TimedOut) {
        ConnectError::Connect {
            address: address.to_string(),
            reason: "no answer (is a broker listening there?)".into(),
        }
    } else {
        ConnectError::Connect { address: address.to_string(), reason }
    }
}

/// QUIC transport settings shared by clients: large windows so that one
/// connection can carry a produce or fetch stream at full speed.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 * 1024 * 1024).into());
    t.receive_window((64u32 * 1024 * 1024).into());
    t.send_window(64 * 1024 * 1024);
    t.max_concurrent_bidi_streams(1024u32.into());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("valid idle timeout")));
    t
}

/// The QUIC client configuration trusting the CA certificates in `ca_pem`.
pub fn quic_client_config(ca_pem: &[u8]) -> Result<quinn::ClientConfig, ConnectError> {
    quic_client_config_with_identity(ca_pem, None)
}

/// Like [`quic_client_config`], presenting a client certificate chain and
/// key (PEM) when given.
pub fn quic_client_config_with_identity(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<quinn::ClientConfig, ConnectError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| ConnectError::BadCa(e.to_string()))?;
        roots.add(cert).map_err(|e| ConnectError::BadCa(e.to_string()))?;
        count += 1;
    }
    if count == 0 {
        return Err(ConnectError::BadCa("no CERTIFICATE block found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConnectError::BadCa(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let bad = |e: String| ConnectError::BadIdentity(e);
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(e.to_string()))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| bad(e.to_string()))?
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ConnectError::BadCa(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}
